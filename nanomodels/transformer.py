"""The core Transformer, assembled from parts.

Every chapter uses this one small model and swaps one part, in one visible line:

    Transformer(config)                                # GPT: Pre-LN, dense MLP, nn.Linear, LM head
    Transformer(config, residual=PostNorm)             # the original Post-LN Transformer
    Transformer(config, attention_fn=attention)        # the readable reference attention instead of SDPA

The parts, each a factory called once per layer (or once per model, for the head):
  attention_fn  fn(q, k, v, allowed=None, *, causal=False)          who attends to whom and how (attention.py)
  attention     attention(config, attn_fn, linear) -> nn.Module       the attention sublayer
  ffn           ffn(config, linear) -> nn.Module                      the feed-forward sublayer (dense MLP; MoE)
  residual      residual(config) -> nn.Module, forward(x, sublayer)   how a sublayer is added and normed
  linear        nn.Linear-like class                                   (BitLinear in chapter 07)
  head          head(config, linear) -> nn.Module                     hidden states -> outputs (LM head)

Positions: learned absolute position embeddings (GPT-2, BERT, UniLM), added to the token embeddings.
`positions` can be passed explicitly, which the pseudo-masked LM needs (several tokens share a position).

Residual schemes (x is the residual stream, f the sublayer):
  PreNorm   x + f(LN(x)), and a final LN before the head          (GPT-2; stable, the default)
  PostNorm  LN(x + f(x)), no final LN                              (Vaswani et al. 2017; BERT, UniLM)
"""

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanomodels.attention import MultiHeadAttention, sdpa_attention


@dataclass
class TransformerConfig:
    vocab_size: int = 1024  # |V|
    block_size: int = 128  # the longest sequence (number of learned positions)
    n_layers: int = 4  # N, the number of blocks (each block = attention + feed-forward)
    d_model: int = 128  # d, the width of the residual stream
    n_heads: int = 4  # h; head size d / h
    d_ff: Optional[int] = None  # feed-forward width; None = 4 d
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True  # the LM head shares the token embedding matrix

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layers", "d_model", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: must divide d_model ({self.d_model}), got {self.n_heads}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if not isinstance(self.d_ff, int) or self.d_ff < 1:
            raise ValueError(f"d_ff: must be a positive integer or None (= 4 * d_model), got {self.d_ff!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class PreNorm(nn.Module):
    """x + f(LN(x)); the model ends with a final LayerNorm."""

    final_norm = True

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model, bias=config.bias)

    def forward(self, x, sublayer):
        return x + sublayer(self.norm(x))


class PostNorm(nn.Module):
    """LN(x + f(x)); no final LayerNorm (the last block already ends with one)."""

    final_norm = False

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model, bias=config.bias)

    def forward(self, x, sublayer):
        return self.norm(x + sublayer(x))


RESIDUALS = {"pre": PreNorm, "post": PostNorm}


class MLP(nn.Module):
    """fc2(GELU(fc1(x))): d -> d_ff -> d."""

    def __init__(self, config: TransformerConfig, linear: type = nn.Linear):
        super().__init__()
        self.fc1 = linear(config.d_model, config.d_ff, bias=config.bias)
        self.fc2 = linear(config.d_ff, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


def mha(config: TransformerConfig, attn_fn, linear: type = nn.Linear) -> nn.Module:
    return MultiHeadAttention(config.d_model, config.n_heads, attn_fn=attn_fn, linear=linear,
                              bias=config.bias, dropout=config.dropout)


class LMHead(nn.Module):
    """Logits over the vocabulary: h (B, T, d) -> (B, T, |V|)."""

    def __init__(self, config: TransformerConfig, linear: type = nn.Linear):
        super().__init__()
        self.proj = linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, h):
        return self.proj(h)


class Block(nn.Module):
    """One layer: the attention sublayer, then the feed-forward sublayer, each wrapped by the residual scheme."""

    def __init__(self, config, *, attention_fn, attention, ffn, residual, linear):
        super().__init__()
        self.attn = attention(config, attention_fn, linear)
        self.attn_residual = residual(config)
        self.ffn = ffn(config, linear)
        self.ffn_residual = residual(config)

    def forward(self, x, allowed=None, causal=False, cache=None):
        x = self.attn_residual(x, lambda h: self.attn(h, allowed, causal, cache))
        return self.ffn_residual(x, self.ffn)


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig, *, attention_fn=sdpa_attention, attention=mha, ffn=MLP,
                 residual=PreNorm, linear: type = nn.Linear, head=LMHead):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.d_model)  # learned absolute positions
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config, attention_fn=attention_fn, attention=attention, ffn=ffn, residual=residual, linear=linear)
            for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model, bias=config.bias) if residual.final_norm else nn.Identity()
        self.head = head(config, linear)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual-branch outputs scaled by 1/sqrt(2N)
            if name.endswith(("out_proj.weight", "fc2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))
        if config.tie_weights and isinstance(getattr(self.head, "proj", None), nn.Linear):
            self.head.proj.weight = self.wte.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def hidden(self, idx, *, allowed=None, causal=True, positions=None, cache=None):
        """Final hidden states (B, T, d), before the head. `cache`: a list with one dict per layer, or None."""
        B, T = idx.shape
        if idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < self.config.vocab_size:
            raise ValueError(f"idx: token ids must be in [0, vocab_size={self.config.vocab_size}), "
                             f"got values in [{int(idx.min())}, {int(idx.max())}]")
        past = cache[0]["k"].size(2) if cache and "k" in cache[0] else 0
        if positions is None:
            if past + T > self.config.block_size:
                raise ValueError(f"idx: sequence length {past + T} exceeds block_size {self.config.block_size}")
            positions = torch.arange(past, past + T, device=idx.device)
        elif positions.shape[-1] != T or int(positions.max()) >= self.config.block_size or int(positions.min()) < 0:
            raise ValueError(f"positions: must have last dimension {T} and values in [0, {self.config.block_size})")
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for i, block in enumerate(self.blocks):
            x = block(x, allowed, causal, None if cache is None else cache[i])
        return self.final_norm(x)

    def forward(self, idx, targets=None, *, allowed=None, causal=True, positions=None, cache=None):
        """idx (B, T) token ids -> (logits (B, T, |V|), loss or None).

        targets (B, T) with -100 where no loss is taken. Attention is causal by default (a GPT); pass
        causal=False and/or a boolean `allowed` of shape (T, T), (B, T, T) or (B, H, T, T) for other masks.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx: expected token ids of shape (B, T), got {tuple(idx.shape)}")
        logits = self.head(self.hidden(idx, allowed=allowed, causal=causal, positions=positions, cache=cache))
        loss = None
        if targets is not None:
            flat = logits.view(-1, logits.size(-1))
            flat = flat.to(torch.promote_types(flat.dtype, torch.float32))  # half precision -> float32 loss
            loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, *, temperature: float = 1.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, use_cache: bool = True):
        """Extend idx (B, T) by max_new_tokens sampled tokens. temperature=0 is greedy decoding.

        With use_cache, each step feeds only the newest token and reuses the keys and values of the past
        (a KV cache); once the sequence reaches block_size the window slides and the prefix is recomputed.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k: must be >= 1 or None, got {top_k}")
        block = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if use_cache and cache is not None and idx.size(1) <= block:
                logits, _ = self(idx[:, -1:], cache=cache)
            else:
                cache = [{} for _ in self.blocks] if use_cache and idx.size(1) < block else None
                logits, _ = self(idx[:, -block:], cache=cache)
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, generator)
            idx = torch.cat([idx, next_token], dim=1)
        return idx


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw one token per row from logits (B, |V|) -> (B, 1).

    temperature == 0: argmax (greedy). Otherwise p = softmax(logits / temperature) restricted to the top_k
    largest logits (all tokens when top_k is None or >= |V|; ties at the k-th value are kept), renormalised, then one
    draw per row with `generator`.
    """
    # BEGIN EXERCISE 0.5: sampling with temperature and top-k
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
    # END EXERCISE
