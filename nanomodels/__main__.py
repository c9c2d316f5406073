"""The command line: python -m nanomodels {train, sample, doctor} [options]; COMMAND --help lists its options.

Misuse never prints a traceback: a wrong option or an unusable path gives one line, "error: ...", that names
the option and its rule, and exit code 2. Ctrl-C exits with 130 and says which checkpoint the run holds.
"""

import argparse
import sys
from dataclasses import MISSING, fields

from nanomodels.train import TrainConfig, check_run_name

TRAIN_EXAMPLES = """examples:
  python -m nanomodels train                                    the default tiny GPT on the pydoc corpus
  python -m nanomodels train --data notes.txt --tokenizer char --name notes
  python -m nanomodels train --name notes --resume              continue after Ctrl-C or --stop_at
  python -m nanomodels train --name notes --resume --steps 1000 make the run longer
  python -m nanomodels sample --name notes --prompt "Once"      generate from the trained run"""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (usage stays in --help)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every option's help; the examples keep their line breaks."""


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a tiny GPT (defaults: the pydoc corpus, a few minutes on a CPU)",
                       description="Train a tiny GPT; every option has a default.\nCtrl-C stops after the current "
                                   "step and writes its checkpoint; --resume continues exactly from there.",
                       epilog=TRAIN_EXAMPLES, formatter_class=Formatter)
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else None
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        if "choices" not in extra:  # argparse shows the choices as the metavar
            extra.setdefault("metavar", {int: "N", float: "X"}.get(type(default), f.name.upper()))
        if f.type in (bool, "bool"):
            p.add_argument(f"--{f.name}", type=_bool, nargs="?", const=True, default=default,
                           help=f.metadata["help"] + " (a bare flag means true)", **{**extra, "metavar": "BOOL"})
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), type(default))
            p.add_argument(f"--{f.name}", type=kind, default=default, help=f.metadata["help"], **extra)


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a trained run", formatter_class=Formatter,
                       description="Generate text from the checkpoint of a trained run, OUT_DIR/NAME/ckpt.pt.")
    p.add_argument("--name", default="default", help="the run's folder name under --out_dir")
    p.add_argument("--out_dir", default="runs", help="the folder that holds the run folders")
    p.add_argument("--prompt", default="The ", help="the text to continue")
    p.add_argument("--tokens", type=int, default=200, help="how many tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy")
    p.add_argument("--top_k", type=int, default=40, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


def main(argv=None) -> int:
    parser = Parser(prog="python -m nanomodels", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _sample_parser(sub)
    sub.add_parser("doctor", help="what this machine can run: versions, device, kernel test tiers")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from nanomodels.train import train
            options = {k: v for k, v in vars(args).items() if k != "command"}
            train(TrainConfig(**options))
        elif args.command == "sample":
            sample(args)
        else:
            from nanomodels.doctor import doctor
            doctor()
    except (ValueError, OSError) as err:  # OSError: a path that cannot be read or written
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        message = str(err) or ("interrupted before the first step: this command wrote no checkpoint"
                               if args.command == "train" else "interrupted")
        print(f"\n{message}", file=sys.stderr)
        return 130
    return 0


def sample(args) -> None:
    from pathlib import Path

    import torch

    from nanomodels.train import load_model

    check_run_name(args.name)
    if args.tokens < 0:
        raise ValueError(f"--tokens: must be >= 0, got {args.tokens}")
    model, tok, _ = load_model(Path(args.out_dir) / args.name, args.device)
    device = next(model.parameters()).device
    prompt = torch.tensor([tok.encode(args.prompt)], dtype=torch.long, device=device)
    if prompt.numel() == 0:
        raise ValueError("--prompt: must not be empty")
    out = model.generate(prompt, args.tokens, temperature=args.temperature, top_k=args.top_k,
                         generator=torch.Generator(device=device).manual_seed(args.seed))
    print(tok.decode(out[0].tolist()))


if __name__ == "__main__":
    sys.exit(main())
