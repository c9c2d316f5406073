"""Training-step throughput: nanomodels' Transformer vs a minimal nanoGPT-style model of the same size.

    OMP_NUM_THREADS=1 python scripts/bench_train.py [--threads 1] [--steps 20]

Both do forward + backward + AdamW on the same (batch, block) of random tokens; the baseline is the
smallest faithful nanoGPT loop (fused qkv projection, SDPA causal, GELU MLP, pre-LN, tied head).
Prints the median step time of each and their ratio (medians: the machine may be shared).
"""

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanomodels.train import TrainConfig, build_model, make_optimizer


class NanoGPTBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h, self.ln1, self.ln2 = h, nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab, block, d, h, n):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(NanoGPTBlock(d, h) for _ in range(n))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def time_steps(model, opt, x, y, steps):
    times = []
    for _ in range(steps + 3):
        t = time.perf_counter()
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[3:])  # the first steps warm up allocators and caches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig()
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size))
    y = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size))
    ours = build_model(cfg, cfg.vocab_size)
    base = NanoGPT(cfg.vocab_size, cfg.block_size, cfg.d_model, cfg.n_heads, cfg.n_layers)
    results = {}
    for _ in range(2):  # alternate the two, twice, so that a burst of load hits both alike
        for name, model in (("nanomodels", ours), ("nanoGPT-style", base)):
            opt = make_optimizer(model, cfg, torch.device("cpu"))
            results.setdefault(name, []).append(time_steps(model, opt, x, y, args.steps))
    tokens = cfg.batch_size * cfg.block_size
    print(f"batch {cfg.batch_size} x block {cfg.block_size}, d_model {cfg.d_model}, {cfg.n_layers} layers, "
          f"{args.threads} thread(s), median of {args.steps} steps")
    med = {k: statistics.median(v) for k, v in results.items()}
    for name, t in med.items():
        print(f"{name:<14} {t * 1e3:8.1f} ms/step  {tokens / t:10,.0f} tokens/s")
    print(f"ratio nanomodels / nanoGPT-style throughput: {med['nanoGPT-style'] / med['nanomodels']:.3f}")


if __name__ == "__main__":
    main()
