"""Chapter 11's experiments: YOCO's one global KV cache against a Transformer's cache per layer.

memory: the bytes of real caches (a prefill of T random tokens, then YOCO.cache_nbytes or the bytes of the
Transformer's per-layer keys and values) at contexts up to `--measure_max` per model, and arithmetic beyond:
bytes(T) = a + b T with a, b taken from the two longest measured contexts (every other measured context is checked
against the same line). Against the context at 4 layers, and against the depth at T = 2048 (all measured).
Models: d_model 128, 4 heads, vocabulary 512 (MODEL), float32.

    OMP_NUM_THREADS=1 python chapters/yoco_experiments.py memory --out ch11_memory.json

prefill: time to first token against the prompt length (1 thread, median of `repeats` calls after a warm-up):
  transformer         the core Transformer's prefill: every layer over every prompt position, filling its cache
  yoco                YOCO.prefill with gated retention: the self-decoder over the prompt, the global KV, and the
                      cross-decoder for the last position only (the early exit)
  yoco, no exit       YOCO.forward over the prompt: the cross-decoder over every position (what the exit skips)
  yoco, sliding       YOCO.prefill with a 32-token sliding window (dense masked attention here: up to 4096 only)
then the decode latency: `steps` single-token steps after the prompt, each timed, the median.

    OMP_NUM_THREADS=1 python chapters/yoco_experiments.py prefill --repeats 5

lm: small LMs on the default corpus (pydoc, BPE 512), as chapter 10's lm experiment: length 128, 300 steps of 16
windows with nanomodels.train.fit, d_model 64, 4 layers, 4 heads, validation loss at length 128 on 8,192 tokens:
  transformer    the core Transformer (4 layers of attention)
  yoco_gret      YOCO, 2 gated-retention self-decoder layers + 2 cross-decoder layers
  yoco_swa       YOCO, 2 sliding-window (32) self-decoder layers + 2 cross-decoder layers

    OMP_NUM_THREADS=1 python chapters/yoco_experiments.py lm --seeds 0 1 2 3 4 --out ch11_lm.json

recall: multi-query associative recall. A sequence of T tokens: filler tokens with n_pairs pair tokens at random places
(one token per pair: key k with value v is token k * n_values + v; the keys of a sequence are distinct), then n_pairs
queries at the end: a query token for each key, in a new order, each followed by its value; the loss and the
accuracy count only the value after each query. Three 2-layer models of d_model 64, their position tables zeroed
and frozen (the task needs no positions; one model then runs at every length):
  swa_only       the core Transformer with every layer's attention limited to a 32-token window (it sees at most
                 2 x 31 = 62 positions back)
  yoco_swa       YOCO, 1 sliding-window (32) self-decoder layer + 1 cross-decoder layer onto the global KV
  yoco_gret      YOCO, 1 gated-retention self-decoder layer + 1 cross-decoder layer
Trained through RECALL["phases"] (a length curriculum, 1,000 steps in all: 100 steps of 64 sequences of 16 tokens,
500 of 32 of 64, 200 of 16 of 128, 100 of 8 of 512, then 100 of 4 of 1024) on fresh random sequences; accuracy on 256 fresh sequences
of 512 and of 2048 tokens, also split by the distance from the pair to its query.

    OMP_NUM_THREADS=1 python chapters/yoco_experiments.py recall --seeds 0 1 2 3 4 --out ch11_recall.json

Results go to chapters/results/; the chapter (which runs in chapters/) imports this file as `yoco_experiments`.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from nanomodels.data import get_batch
from nanomodels.runtime import median_seconds
from nanomodels.train import FunctionTask, fit, lm_loss, lr_at, make_optimizer
from nanomodels.transformer import IGNORE_INDEX, Transformer, TransformerConfig
from nanomodels.yoco import YOCO, YOCOConfig, sliding_window_mask

import retnet_experiments as ch10  # chapter 10's corpus cut and cache byte count

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# ----------------------------------------------------------------------------- models

MODEL = dict(vocab_size=512, d_model=128, n_heads=4)


def transformer(n_layers: int, block_size: int, seed: int = 0, **size) -> Transformer:
    size = {**MODEL, **size}
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(block_size=block_size, n_layers=n_layers, **size))


def yoco(n_layers: int, block_size: int, self_attention: str = "gated_retention", window: int = 32,
         seed: int = 0, **size) -> YOCO:
    """YOCO with n_layers / 2 self-decoder and n_layers / 2 cross-decoder layers."""
    size = {**MODEL, **size}
    torch.manual_seed(seed)
    return YOCO(YOCOConfig(block_size=block_size, n_layers=n_layers, self_attention=self_attention, window=window,
                           **size))


ARCHS = ("transformer", "yoco_gret", "yoco_swa")
LABELS = {"transformer": "Transformer", "yoco_gret": "YOCO, gated retention", "yoco_swa": "YOCO, sliding window",
          "swa_only": "sliding window only"}


def build(arch: str, n_layers: int, block_size: int, seed: int = 0, **size):
    if arch == "transformer":
        return transformer(n_layers, block_size, seed, **size)
    if arch == "yoco_gret":
        return yoco(n_layers, block_size, "gated_retention", seed=seed, **size)
    if arch == "yoco_swa":
        return yoco(n_layers, block_size, "sliding_window", seed=seed, **size)
    raise ValueError(f"arch: must be one of {ARCHS}, got {arch!r}")


@torch.no_grad()
def prefill(arch: str, model, idx):
    """(last logits (B, V), cache): the Transformer's cache is a list of per-layer dicts of "k", "v"."""
    if arch == "transformer":
        cache = [{} for _ in model.blocks]
        return model(idx, cache=cache)[0][:, -1], cache
    return model.prefill(idx)


@torch.no_grad()
def step(arch: str, model, token, cache):
    if arch == "transformer":
        return model(token, cache=cache)[0][:, -1], cache
    return model.step(token, cache)


def nbytes(arch: str, model, cache) -> int:
    return ch10.cache_bytes(cache) if arch == "transformer" else model.cache_nbytes(cache)


# ----------------------------------------------------------------------------- 1. memory

MEASURE_MAX = {"transformer": 4096, "yoco_gret": 65536, "yoco_swa": 4096}  # dense attention costs T^2 beyond


def measured_bytes(arch: str, model, T: int) -> int:
    idx = torch.randint(0, MODEL["vocab_size"], (1, T), generator=torch.Generator().manual_seed(T))
    return nbytes(arch, model, prefill(arch, model, idx)[1])


def memory_vs_context(contexts, n_layers: int = 4, measure_max=MEASURE_MAX, progress=print) -> list:
    rows = []
    for arch in ARCHS:
        model = build(arch, n_layers, max(contexts)).eval()
        measured = {T: measured_bytes(arch, model, T) for T in contexts if T <= measure_max[arch]}
        t1, t2 = sorted(measured)[-2:]
        slope = (measured[t2] - measured[t1]) / (t2 - t1)
        const = measured[t2] - slope * t2
        for T in contexts:
            line = const + slope * T
            how = "measured" if T in measured else "arithmetic"
            rows.append({"arch": arch, "n_layers": n_layers, "T": T, "bytes": measured.get(T, line), "how": how,
                         "line_bytes": line, "bytes_per_token": slope, "const_bytes": const})
            progress(f"{arch:>12} T={T:>6}: {rows[-1]['bytes'] / 2**20:9.3f} MiB ({how})")
    return rows


def memory_vs_depth(depths, T: int = 2048, progress=print) -> list:
    rows = []
    for n_layers in depths:
        for arch in ARCHS:
            model = build(arch, n_layers, T).eval()
            rows.append({"arch": arch, "n_layers": n_layers, "T": T, "bytes": measured_bytes(arch, model, T),
                         "how": "measured"})
            progress(f"{arch:>12} L={n_layers:>3}: {rows[-1]['bytes'] / 2**20:9.3f} MiB")
    return rows


# ----------------------------------------------------------------------------- 2. prefill and decode

PREFILL_KINDS = ("transformer", "yoco", "yoco, no exit", "yoco, sliding")
PREFILL_MAX = {"yoco, sliding": 4096}


@torch.no_grad()
def prefill_decode(lengths, repeats: int = 3, steps: int = 8, n_layers: int = 4, progress=print) -> list:
    block = max(lengths) + steps + 2
    models = {"transformer": transformer(n_layers, block).eval(), "yoco": yoco(n_layers, block).eval(),
              "yoco, sliding": yoco(n_layers, block, "sliding_window").eval()}
    models["yoco, no exit"] = models["yoco"]
    arch = {"transformer": "transformer", "yoco": "yoco_gret", "yoco, no exit": "yoco_gret",
            "yoco, sliding": "yoco_swa"}
    rows = []
    for T in lengths:
        idx = torch.randint(0, MODEL["vocab_size"], (1, T), generator=torch.Generator().manual_seed(T))
        for kind in PREFILL_KINDS:
            if T > PREFILL_MAX.get(kind, T):
                continue
            model = models[kind]
            if kind == "yoco, no exit":
                seconds = median_seconds(lambda: model(idx), repeats)
                rows.append({"kind": kind, "T": T, "prefill_ms": 1e3 * seconds, "repeats": repeats})
            else:
                seconds = median_seconds(lambda: prefill(arch[kind], model, idx), repeats)
                _, cache = prefill(arch[kind], model, idx)
                token, times = torch.zeros(1, 1, dtype=torch.long), []
                for _ in range(steps):
                    start = time.perf_counter()
                    _, cache = step(arch[kind], model, token, cache)
                    times.append(time.perf_counter() - start)
                rows.append({"kind": kind, "T": T, "prefill_ms": 1e3 * seconds, "repeats": repeats,
                             "decode_ms": 1e3 * statistics.median(times), "steps": steps})
            progress(f"T={T:>6} {kind:>14}: prefill {rows[-1]['prefill_ms']:9.1f} ms"
                     + (f", decode {rows[-1]['decode_ms']:6.2f} ms/token" if "decode_ms" in rows[-1] else ""))
    return rows


# ----------------------------------------------------------------------------- 3. LMs on the default corpus

LM = dict(vocab_size=512, d_model=64, n_layers=4, n_heads=4, window=32, train_len=128, batch=16, steps=300,
          lr=3e-3, min_lr=3e-4, warmup=30, weight_decay=0.1, grad_clip=1.0, eval_tokens=8192)
QUICK_LM = dict(LM, steps=10, eval_tokens=512)


def train(model, batch, loss, cfg: dict, on_step=None) -> tuple[list, float]:
    """cfg["steps"] steps of nanomodels.train.fit: AdamW (the default run's groups), warmup + cosine, clipping."""
    schedule = SimpleNamespace(lr=cfg["lr"], min_lr=cfg["min_lr"], warmup=cfg["warmup"], steps=cfg["steps"],
                               weight_decay=cfg["weight_decay"])
    optimizer = make_optimizer(model, schedule, torch.device("cpu"))
    start = time.perf_counter()
    losses = fit(model, FunctionTask(batch=batch, loss=loss), cfg["steps"], optimizer=optimizer,
                 lr=lambda s: lr_at(s, schedule), grad_clip=cfg["grad_clip"], on_step=on_step)
    return losses, time.perf_counter() - start


@torch.no_grad()
def val_loss(model, val_ids, length: int, n_tokens: int) -> float:
    model.eval()
    x, y = get_batch(val_ids, max(1, n_tokens // length), length, torch.Generator().manual_seed(0))
    return statistics.mean(model(x[i:i + 1], y[i:i + 1])[1].item() for i in range(x.size(0)))


def lm_run(arch: str, seed: int, cfg: dict = LM) -> dict:
    train_ids, val_ids = ch10.corpus(cfg["vocab_size"])
    size = dict(vocab_size=cfg["vocab_size"], d_model=cfg["d_model"], n_heads=cfg["n_heads"])
    if arch == "yoco_swa":
        size["window"] = cfg["window"]
        model = yoco(cfg["n_layers"], cfg["train_len"], "sliding_window", seed=seed, **size)
    else:
        model = build(arch, cfg["n_layers"], cfg["train_len"], seed, **size)
    gen = torch.Generator().manual_seed(1000 + seed)
    losses, seconds = train(model, lambda s: get_batch(train_ids, cfg["batch"], cfg["train_len"], gen), lm_loss, cfg)
    return {"arch": arch, "seed": seed, "params": model.num_params(), "train_s": seconds,
            "final_train_loss": statistics.mean(losses[-20:]),
            "val": val_loss(model, val_ids, cfg["train_len"], cfg["eval_tokens"])}


def lm(seeds, archs=ARCHS, cfg: dict = LM, progress=print) -> list:
    rows = []
    for seed in seeds:
        for arch in archs:
            rows.append(lm_run(arch, seed, cfg))
            progress(f"{arch:>12} seed {seed}: val {rows[-1]['val']:.4f} ({rows[-1]['train_s']:.0f} s)")
    return rows


# ----------------------------------------------------------------------------- 4. associative recall

RECALL = dict(n_pairs=4, n_keys=4, n_values=4, n_fillers=1, d_model=64, n_layers=2, n_heads=4, window=32,
              phases=((16, 64, 100), (64, 32, 500), (128, 16, 200), (512, 8, 100), (1024, 4, 100)), lr=3e-3, min_lr=3e-4, warmup=20, weight_decay=0.1,
              grad_clip=1.0, eval_lengths=(512, 2048), eval_sequences=256, distance_bins=(0, 62, 128, 512, 2048))
QUICK_RECALL = dict(RECALL, phases=((64, 8, 4), (128, 4, 2)), eval_lengths=(128,), eval_sequences=16,
                    distance_bins=(0, 62, 128))
RECALL_ARCHS = ("swa_only", "yoco_swa", "yoco_gret")


def recall_vocab(cfg: dict) -> dict:
    """Token ranges: K * V pair tokens (key k with value v is token k * V + v), K query keys, V values, fillers."""
    K, V = cfg["n_keys"], cfg["n_values"]
    return {"pairs": 0, "queries": K * V, "values": K * V + K, "fillers": K * V + K + V,
            "size": K * V + K + V + cfg["n_fillers"]}


def recall_batch(cfg: dict, batch: int, gen: torch.Generator):
    """(inputs (B, T), targets (B, T), distance (B, T)). Each sequence: fillers with n_pairs pair tokens (distinct
    keys, random values) at random places, then n_pairs queries at the end: a query key, then its value. Targets are
    IGNORE_INDEX except after each query key (the value its pair token held); distance is the number of positions
    from the pair token to that query key (-1 elsewhere)."""
    T, P, K, V = (cfg[k] for k in ("T", "n_pairs", "n_keys", "n_values"))
    vocab = recall_vocab(cfg)
    body = T + 1 - 2 * P  # the token after the last input is a target too
    seq = vocab["fillers"] + torch.randint(0, cfg["n_fillers"], (batch, T + 1), generator=gen)
    distance = torch.full((batch, T), -1)
    for b in range(batch):
        keys = torch.randperm(K, generator=gen)[:P]
        values = torch.randint(0, V, (P,), generator=gen)
        slots = torch.randperm(body, generator=gen)[:P]  # P distinct places in the body
        seq[b, slots] = vocab["pairs"] + keys * V + values
        order = torch.randperm(P, generator=gen)
        query = body + 2 * torch.arange(P)
        seq[b, query], seq[b, query + 1] = vocab["queries"] + keys[order], vocab["values"] + values[order]
        distance[b, query] = query - slots[order]
    inputs, targets = seq[:, :T], seq[:, 1:].clone()
    targets[distance < 0] = IGNORE_INDEX
    return inputs, targets, distance


def recall_model(arch: str, seed: int, cfg: dict):
    """The model, with its position table zeroed and frozen: the task needs no positions (the causal mask, the
    window and the retention's decay order the tokens), and without it one model runs at every length."""
    size = dict(vocab_size=recall_vocab(cfg)["size"], d_model=cfg["d_model"], n_heads=cfg["n_heads"])
    longest = max(cfg["eval_lengths"] + tuple(T for T, _, _ in cfg["phases"]))
    if arch == "swa_only":
        model = transformer(cfg["n_layers"], longest, seed, **size)
    else:
        kind = {"yoco_swa": "sliding_window", "yoco_gret": "gated_retention"}[arch]
        model = yoco(cfg["n_layers"], longest, kind, cfg["window"], seed, **size)
    model.embed.wpe.weight.data.zero_()
    model.embed.wpe.weight.requires_grad_(False)
    return model


def recall_logits(arch: str, model, inputs, cfg: dict):
    if arch == "swa_only":
        return model(inputs, allowed=sliding_window_mask(inputs.size(1), cfg["window"]))[0]
    return model(inputs)


@torch.no_grad()
def recall_eval(arch: str, model, cfg: dict, T: int, seed: int) -> dict:
    """Accuracy over cfg["eval_sequences"] fresh sequences of T tokens, overall and per distance bin."""
    model.eval()
    cfg = dict(cfg, T=T)
    gen = torch.Generator().manual_seed(10_000 + seed)
    per_batch = max(1, min(cfg["eval_sequences"], 8192 // T))
    first = recall_vocab(cfg)["values"]
    correct, dist = [], []
    for _ in range(max(1, cfg["eval_sequences"] // per_batch)):
        inputs, targets, distance = recall_batch(cfg, per_batch, gen)
        logits = recall_logits(arch, model, inputs, cfg)
        values = logits[..., first:first + cfg["n_values"]].argmax(-1) + first
        asked = distance >= 0
        correct.append((values == targets)[asked])
        dist.append(distance[asked])
    correct, dist = torch.cat(correct).float(), torch.cat(dist)
    bins = [b for b in cfg["distance_bins"] if b < T] + [T]
    by_distance = {}
    for lo, hi in zip(bins[:-1], bins[1:]):
        inside = (dist > lo) & (dist <= hi)
        if inside.any():
            by_distance[f"{lo + 1}-{hi}"] = {"accuracy": correct[inside].mean().item(), "n": int(inside.sum())}
    return {"accuracy": correct.mean().item(), "n": correct.numel(), "by_distance": by_distance}


def recall_run(arch: str, seed: int, cfg: dict = RECALL, progress=None) -> dict:
    """Train through cfg["phases"] ((T, batch, steps), one after the other, one cosine schedule over all of them),
    then evaluate at each of cfg["eval_lengths"]."""
    model = recall_model(arch, seed, cfg)
    gen = torch.Generator().manual_seed(1000 + seed)
    ends = [sum(p[2] for p in cfg["phases"][:i + 1]) for i in range(len(cfg["phases"]))]

    def batch(step):
        T, size, _ = next(p for p, end in zip(cfg["phases"], ends) if step < end)
        return recall_batch(dict(cfg, T=T), size, gen)

    def loss(model, batch):
        inputs, targets, _ = batch
        logits = recall_logits(arch, model, inputs, cfg)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)

    def on_step(done, loss):
        if progress is not None and done % 100 == 0:
            progress(f"  {arch} seed {seed} step {done}: loss {loss.item():.3f}")

    losses, seconds = train(model, batch, loss, dict(cfg, steps=ends[-1]), on_step)
    return {"arch": arch, "seed": seed, "params": model.num_params(), "train_s": seconds,
            "final_train_loss": statistics.mean(losses[-20:]),
            "eval": {str(T): recall_eval(arch, model, cfg, T, seed) for T in cfg["eval_lengths"]}}


def recall(seeds, archs=RECALL_ARCHS, cfg: dict = RECALL, progress=print) -> list:
    rows = []
    for seed in seeds:
        for arch in archs:
            r = recall_run(arch, seed, cfg, progress)
            rows.append(r)
            progress(f"{arch:>10} seed {seed} ({r['train_s']:.0f} s): " + " | ".join(
                f"T={T}: {e['accuracy']:.3f} (" + " ".join(f"{k}: {v['accuracy']:.2f}" for k, v in e["by_distance"].items())
                + ")" for T, e in r["eval"].items()))
    return rows


# ----------------------------------------------------------------------------- tables and the run


def spread(values, digits: int = 3) -> str:
    """mean (min .. max)"""
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f} .. {max(values):.{digits}f})"


def command() -> str:
    """This run's command line, from the repository root (what tests/test_notebooks.py expects of a result)."""
    return "OMP_NUM_THREADS=1 python chapters/yoco_experiments.py " + " ".join(sys.argv[1:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    me = sub.add_parser("memory", help="cache bytes against the context and the depth")
    me.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    me.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16])
    me.add_argument("--out", default="ch11_memory.json")
    pr = sub.add_parser("prefill", help="time to first token and decode latency against the prompt length")
    pr.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    pr.add_argument("--repeats", type=int, default=3)
    pr.add_argument("--steps", type=int, default=8)
    pr.add_argument("--out", default="ch11_prefill.json")
    lm_ = sub.add_parser("lm", help="validation loss of the three LMs on the default corpus")
    lm_.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    lm_.add_argument("--out", default="ch11_lm.json")
    re_ = sub.add_parser("recall", help="multi-query associative recall: sliding window only vs YOCO")
    re_.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    re_.add_argument("--archs", nargs="+", default=list(RECALL_ARCHS), choices=RECALL_ARCHS)
    re_.add_argument("--out", default="ch11_recall.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.what == "memory":
        payload = {"config": MODEL, "context": memory_vs_context(args.contexts),
                   "depth": memory_vs_depth(args.depths)}
    if args.what == "prefill":
        payload = {"config": MODEL, "rows": prefill_decode(args.lengths, args.repeats, args.steps)}
    if args.what == "lm":
        payload = {"config": LM, "rows": lm(args.seeds)}
    if args.what == "recall":
        payload = {"config": RECALL, "rows": recall(args.seeds, args.archs)}
    payload.update(command=command(), machine=ch10.machine(), threads=torch.get_num_threads(),
                   seconds=time.perf_counter() - start)
    print("saved", ch10.save(args.out, payload))


if __name__ == "__main__":
    main()
