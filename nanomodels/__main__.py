"""The command line: python -m nanomodels {train, sample, doctor} [options]; --help lists every option."""

import argparse
import sys
from dataclasses import MISSING, fields

from nanomodels.train import TrainConfig


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a tiny GPT (defaults: the pydoc corpus, about 2 minutes on a CPU)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else None
        if f.type in (bool, "bool"):
            p.add_argument(f"--{f.name}", type=_bool, nargs="?", const=True, default=default, metavar="BOOL",
                           help=f.name.replace("_", " "))
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), type(default))
            p.add_argument(f"--{f.name}", type=kind, default=default, help=f.name.replace("_", " "))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanomodels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    p = sub.add_parser("sample", help="generate text from a trained run",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--name", default="default", help="the run folder under --out_dir")
    p.add_argument("--out_dir", default="runs")
    p.add_argument("--prompt", default="The ")
    p.add_argument("--tokens", type=int, default=200, help="how many tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
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
    except (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the last checkpoint is intact; continue with --resume", file=sys.stderr)
        return 130
    return 0


def sample(args) -> None:
    import torch

    from nanomodels.train import load_model

    if args.tokens < 0:
        raise ValueError(f"--tokens: must be >= 0, got {args.tokens}")
    from pathlib import Path
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
