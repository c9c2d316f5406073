"""The command line: python -m nanomodels {train, train-latentlm, sample, doctor}; COMMAND --help lists its options.

Misuse never prints a traceback: a wrong option or an unusable path gives one line, "error: ...", that names
the option and its rule, and exit code 2. Ctrl-C exits with 130 and says which checkpoint the run holds.
"""

import argparse
import math
import sys
from dataclasses import MISSING, fields

from nanomodels.train import TrainConfig, check_run_name
from nanomodels.train_latentlm import SAMPLE_DEFAULTS, LatentTrainConfig

TRAIN_EXAMPLES = """examples:
  python -m nanomodels train                                    the default tiny GPT on the pydoc corpus
  python -m nanomodels train --data notes.txt --tokenizer char --name notes
  python -m nanomodels train --name notes --resume              continue after Ctrl-C or --stop_at
  python -m nanomodels train --name notes --resume --steps 1000 make the run longer
  python -m nanomodels sample --name notes --prompt "Once"      generate from the trained run"""

LATENTLM_EXAMPLES = """examples:
  python -m nanomodels train-latentlm                           sigma-VAE, then LatentLM, on procedural digits
  python -m nanomodels train-latentlm --name digits --resume    continue after Ctrl-C or --stop_at
  python -m nanomodels train-latentlm --name d2 --vae_from digits   a new LatentLM on the trained sigma-VAE
  python -m nanomodels sample --name digits --cfg 1 --steps 50  an image grid without guidance"""

SAMPLE_EXAMPLES = """examples:
  python -m nanomodels sample --prompt "The "                   text from the run in runs/default/
  python -m nanomodels sample --name digits --cfg 3 --steps 20  digits from a train-latentlm run: a PNG grid"""
# sample's options for one kind of run: given for the other kind they are an error
TEXT_SAMPLE = {"prompt": "The ", "tokens": 200, "temperature": 0.8, "top_k": 40}
IMAGE_SAMPLE = {"cfg": SAMPLE_DEFAULTS["cfg"], "steps": SAMPLE_DEFAULTS["steps"], "sampler": SAMPLE_DEFAULTS["sampler"],
                "per_class": SAMPLE_DEFAULTS["per_class"], "out": ""}


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
    _config_options(p, TrainConfig)


def _train_latentlm_parser(sub) -> None:
    p = sub.add_parser("train-latentlm", help="train a sigma-VAE, then a class-conditional LatentLM (next-token "
                                              "diffusion) on procedural 16x16 digits (a few minutes on a CPU)",
                       description="Train a sigma-VAE on procedural 16x16 digits, then a class-conditional LatentLM "
                                   "over its 16 latent patches (chapter 09's recipe); every option has a default."
                                   "\nCtrl-C stops after the current step and writes its checkpoint; --resume "
                                   "continues exactly from there. The end of the run writes an image grid; "
                                   "`sample` writes more.",
                       epilog=LATENTLM_EXAMPLES, formatter_class=Formatter)
    _config_options(p, LatentTrainConfig)


def _config_options(p, config) -> None:
    """One option per field of a config dataclass, with its help, default and argparse settings."""
    for f in fields(config):
        default = f.default if f.default is not MISSING else None
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        if "choices" not in extra:  # argparse shows the choices as the metavar
            extra.setdefault("metavar", {int: "N", float: "X"}.get(type(default), f.name.upper()))
        if f.type in (bool, "bool"):
            p.add_argument(f"--{f.name}", type=_bool, nargs="?", const=True, default=default,
                           help=f.metadata["help"] + " (a bare flag means true)", **{**extra, "metavar": "BOOL"})
        else:
            kind = extra.pop("type", None) or {"int": int, "float": float, "str": str}.get(str(f.type), type(default))
            p.add_argument(f"--{f.name}", type=kind, default=default, help=f.metadata["help"], **extra)


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate text (a `train` run) or an image grid of digits (a "
                                      "`train-latentlm` run) from a trained run", formatter_class=Formatter,
                       description="Generate from the checkpoint of a trained run, OUT_DIR/NAME/ckpt.pt: text from a "
                                   "`train` run, a PNG grid of digits from a `train-latentlm` run (one row per "
                                   "class, row k = digit k). Text options and image options each belong to "
                                   "their kind of run.", epilog=SAMPLE_EXAMPLES)
    p.add_argument("--name", default="default", help="the run's folder name under --out_dir")
    p.add_argument("--out_dir", default="runs", help="the folder that holds the run folders")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    text = p.add_argument_group("text runs (train)")
    kind = argparse.SUPPRESS  # absent unless given, so that an option given for the wrong kind of run is seen
    text.add_argument("--prompt", default=kind, help="the text to continue (default: 'The ')")
    text.add_argument("--tokens", type=int, default=kind, help="how many tokens to generate (default: 200)")
    text.add_argument("--temperature", type=float, default=kind, help="softmax temperature; 0 = greedy "
                                                                        "(default: 0.8)")
    text.add_argument("--top_k", type=int, default=kind, help="sample among the k most likely tokens (default: 40)")
    image = p.add_argument_group("image runs (train-latentlm)")
    image.add_argument("--cfg", type=float, default=kind, metavar="SCALE",
                       help="classifier-free guidance scale: eps_uncond + SCALE (eps_cond - eps_uncond); 1 = no "
                            f"guidance, 0 = unconditional (default: {IMAGE_SAMPLE['cfg']:g})")
    image.add_argument("--steps", type=int, default=kind, metavar="N",
                       help="sampling steps of the diffusion head per latent, in [1, 1000] (the training schedule's "
                            f"T) (default: {IMAGE_SAMPLE['steps']})")
    image.add_argument("--sampler", choices=("dpm", "ddim"), default=kind,
                       help="dpm = DPM-Solver++(2M), ddim = DDIM (eta = 0), both deterministic given the "
                            f"starting noise (default: {IMAGE_SAMPLE['sampler']})")
    image.add_argument("--per_class", type=int, default=kind, metavar="N",
                       help=f"digits per class: the grid's columns (default: {IMAGE_SAMPLE['per_class']})")
    image.add_argument("--out", default=kind, metavar="PATH.png",
                       help="where to write the grid (default: OUT_DIR/NAME/samples_cfg<SCALE>_<sampler><N>"
                            "_seed<SEED>.png)")


def main(argv=None) -> int:
    parser = Parser(prog="python -m nanomodels", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _train_latentlm_parser(sub)
    _sample_parser(sub)
    sub.add_parser("doctor", help="what this machine can run: versions, device, kernel test tiers")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from nanomodels.train import train
            options = {k: v for k, v in vars(args).items() if k != "command"}
            train(TrainConfig(**options))
        elif args.command == "train-latentlm":
            from nanomodels.train_latentlm import train_latentlm
            options = {k: v for k, v in vars(args).items() if k != "command"}
            train_latentlm(LatentTrainConfig(**options))
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
                               if args.command.startswith("train") else "interrupted")
        print(f"\n{message}", file=sys.stderr)
        return 130
    return 0


def sample(args) -> None:
    """Text from a `train` run, an image grid from a `train-latentlm` run; the checkpoint says which."""
    from pathlib import Path

    from nanomodels.checkpoint import CHECKPOINT, KINDS, load_checkpoint, run_kind

    check_run_name(args.name)
    given = vars(args)
    rules = (("cfg", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (1 = no guidance)"),
             ("steps", lambda v: v >= 1, ">= 1"), ("per_class", lambda v: v >= 1, ">= 1"),
             ("tokens", lambda v: v >= 0, ">= 0"))
    for name, ok, rule in rules:
        if name in given and not ok(given[name]):
            raise ValueError(f"--{name}: must be {rule}, got {given[name]}")
    if not str(given.get("out", ".png")).endswith(".png"):
        raise ValueError(f"--out: must be a .png file name, got {given['out']!r}")
    run_dir = Path(args.out_dir) / args.name
    kind = run_kind(load_checkpoint(run_dir / CHECKPOINT))
    own, other = (TEXT_SAMPLE, IMAGE_SAMPLE) if kind == "text" else (IMAGE_SAMPLE, TEXT_SAMPLE)
    wrong = [f"--{k}" for k in other if k in given]
    if wrong:
        what = ("options" if len(wrong) > 1 else "an option") + (" for image runs" if kind == "text" else
                                                                 " for text runs")
        raise ValueError(f"{', '.join(wrong)}: {what}, but {run_dir} is a {kind} run (trained by `{KINDS[kind]}`); "
                         f"its options are {', '.join('--' + k for k in own)}")
    for k, v in own.items():
        given.setdefault(k, v)
    if kind == "text":
        sample_text(args)
    else:
        sample_images(args, run_dir)


def sample_images(args, run_dir) -> None:
    import os
    from pathlib import Path

    from nanomodels.digits import grid_name, write_samples
    from nanomodels.train_latentlm import load_latentlm

    lm, vae, norm, _ = load_latentlm(run_dir, args.device)
    T = lm.model.head.alphas_cumprod.numel()
    if args.steps > T:
        raise ValueError(f"--steps: must be in [1, {T}] (the training schedule's T), got {args.steps}")
    path = Path(args.out) if args.out else run_dir / grid_name(args.cfg, args.sampler, args.steps, args.seed)
    write_samples(lm, vae, norm, path, cfg_scale=args.cfg, num_steps=args.steps, sampler=args.sampler,
                  per_class=args.per_class, seed=args.seed)
    shown = os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd()) else path
    print(f"wrote {shown}: {args.per_class} generated digits per class, row k = digit k (CFG {args.cfg:g}, "
          f"{args.sampler} {args.steps} steps, seed {args.seed})")


def sample_text(args) -> None:
    from pathlib import Path

    import torch

    from nanomodels.parts import uses_kv_cache
    from nanomodels.train import load_model

    model, tok, _ = load_model(Path(args.out_dir) / args.name, args.device)
    device = next(model.parameters()).device
    prompt = torch.tensor([tok.encode(args.prompt)], dtype=torch.long, device=device)
    if prompt.numel() == 0:
        raise ValueError("--prompt: must not be empty")
    out = model.generate(prompt, args.tokens, temperature=args.temperature, top_k=args.top_k,
                         generator=torch.Generator(device=device).manual_seed(args.seed), use_cache=uses_kv_cache(model))
    print(tok.decode(out[0].tolist()))


if __name__ == "__main__":
    sys.exit(main())
