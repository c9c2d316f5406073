"""Eager against CUDA-graph sampling of a LatentLM (chapter 09), on a CUDA device.

    python -m nanomodels.bench_latentlm --device cuda                  # random weights, the default configuration
    python -m nanomodels.bench_latentlm --device cuda --run_dir runs/digits   # a trained train-latentlm run

It times LatentLM.sample against sample_graphed (each token's solver loop a replayed CUDA graph) and one token's
solver loop alone, and prints the times with the largest difference between the two samplers' latents as JSON.
"""

import json
import time

import torch

from nanomodels.latentlm import GraphedSampler
from nanomodels.digits import LATENT_TOKENS, NUM_CLASSES
from nanomodels.train_latentlm import SAMPLE_DEFAULTS, LatentTrainConfig, build_latentlm, load_latentlm


def benchmark_cuda_graph_sampling(device: str = "cuda", *, run_dir: str = "",
                                  per_class: int = SAMPLE_DEFAULTS["per_class"],
                                  num_steps: int = SAMPLE_DEFAULTS["steps"], sampler: str = SAMPLE_DEFAULTS["sampler"],
                                  cfg_scale: float = SAMPLE_DEFAULTS["cfg"], repeats: int = 5, seed: int = 0) -> dict:
    """Milliseconds of eager LatentLM.sample against sample_graphed (each token's solver loop a replayed CUDA
    graph, captured once per call and included in the time) for per_class digits of each class, LATENT_TOKENS
    tokens, and of one token's solver loop alone (DiffusionHead.sample against a GraphedSampler replay). The
    model is the trained run in run_dir when given, else the default configuration with random weights (the
    head moved off its zero init). Also the largest difference between the two samplers' latents."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"--device: CUDA graphs need a CUDA device, got {str(device)!r}")
    if not torch.cuda.is_available():
        raise ValueError("--device: torch sees no CUDA device on this machine (torch.cuda.is_available() is False)")
    if run_dir:
        lm = load_latentlm(run_dir, str(device))[0]
    else:
        torch.manual_seed(seed)
        cfg = LatentTrainConfig()
        lm = build_latentlm(cfg, cfg.latent_dim)
        for p in lm.model.head.parameters():
            torch.nn.init.normal_(p, std=0.05)
        lm = lm.to(device).eval()
    head = lm.model.head
    labels = torch.arange(NUM_CLASSES, device=device).repeat_interleave(per_class)
    B, guided = labels.numel(), cfg_scale != 1.0
    kw = dict(num_steps=num_steps, sampler=sampler, cfg_scale=cfg_scale)

    def timed(fn):
        out = fn()  # warm-up
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize(device)
        return out, (time.perf_counter() - start) / repeats * 1e3

    def gen():
        return torch.Generator(device=device).manual_seed(seed)

    with torch.cuda.device(device):
        eager, eager_ms = timed(lambda: lm.sample(labels, LATENT_TOKENS, generator=gen(), **kw))
        graphed, graphed_ms = timed(lambda: lm.sample_graphed(labels, LATENT_TOKENS, generator=gen(), **kw))
        c = torch.randn(2 * B if guided else B, head.width, generator=gen(), device=device)
        noise = torch.randn(B, head.latent_dim, generator=gen(), device=device)
        loop = GraphedSampler(head, (B, head.latent_dim), num_steps, solver=sampler, cfg=cfg_scale)
        _, loop_eager_ms = timed(lambda: head.sample(c[:B], num_steps, sampler, c_uncond=c[B:] if guided else None,
                                                     cfg_scale=cfg_scale, generator=gen()))
        _, loop_graphed_ms = timed(lambda: loop(c, noise))
    return {"batch": B, "tokens": LATENT_TOKENS, "num_steps": num_steps, "sampler": sampler, "cfg": cfg_scale,
            "eager_ms": eager_ms, "graphed_ms": graphed_ms, "speedup": eager_ms / graphed_ms,
            "loop_eager_ms": loop_eager_ms, "loop_graphed_ms": loop_graphed_ms,
            "loop_speedup": loop_eager_ms / loop_graphed_ms,
            "max_abs_diff": (eager - graphed).abs().max().item(), "max_abs": eager.abs().max().item()}


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m nanomodels.bench_latentlm",
                                     description="Eager vs CUDA-graph sampling of a batch of digits (a CUDA device).")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--run_dir", default="", help="a train-latentlm run folder; '' = random weights")
    parser.add_argument("--steps", type=int, default=SAMPLE_DEFAULTS["steps"])
    parser.add_argument("--sampler", choices=("dpm", "ddim"), default=SAMPLE_DEFAULTS["sampler"])
    parser.add_argument("--cfg", type=float, default=SAMPLE_DEFAULTS["cfg"])
    parser.add_argument("--per_class", type=int, default=SAMPLE_DEFAULTS["per_class"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    try:
        result = benchmark_cuda_graph_sampling(args.device, run_dir=args.run_dir, per_class=args.per_class,
                                               num_steps=args.steps, sampler=args.sampler, cfg_scale=args.cfg,
                                               repeats=args.repeats)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=1))
