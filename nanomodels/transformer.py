"""The core Transformer, assembled from parts.

Every chapter uses this one small model and swaps one part, in one visible line:

    Transformer(config)                                        # GPT: Pre-LN, dense MLP, nn.Linear, LM head
    Transformer(config, residual=PostNorm, final_norm=None)    # the original Post-LN Transformer
    Transformer(config, attention_fn=attention)                # the readable reference attention instead of SDPA
    Transformer(config, linear=BitLinear)                      # ternary body, full-precision head (chapter 08)

Every part is built as `part(config, ...)` (extra arguments with functools.partial); the typing Protocols
below state each contract:
  embed         embed(config) -> forward(inputs, positions, segments=None) -> (B, T, d)
                                                   token + position (+ segment) embeddings; or continuous
                                                   inputs (LatentLM's LatentEmbedding, nanomodels/latentlm.py)
  attention_fn  fn(q, k, v, allowed=None, *, causal=False) -> (B, H, Tq, D)     who attends to whom (attention.py)
  attention     attention(config, attn_fn=..., linear=...) -> forward(x, allowed, causal, cache, memory=None)
  ffn           ffn(config, linear=...) -> forward(x)          the feed-forward sublayer (dense MLP; MoE)
  residual      residual(config) -> forward(x, sublayer)       how a sublayer is added and normed
  final_norm    final_norm(config) -> forward(x), or None      the norm before the head (Pre-LN needs one)
  linear        nn.Linear-like class for the body; head_linear the same for the head (chosen independently)
  head          head(config, linear=head_linear) -> forward(h) -> outputs; loss(h, targets, outputs=None)
                                                   the head owns its loss (LM: cross-entropy; diffusion: MSE)

Auxiliary losses: any part that has an `aux_weight` attribute and sets `aux_loss` (a scalar) in its forward
contributes `aux_weight * aux_loss` to the loss `forward` returns (MoE's load balancing); `auxiliary_loss()` is
their weighted sum (what a trainer logs), `aux_losses()` lists them by module.

Positions: learned absolute position embeddings (GPT-2, BERT, UniLM), added to the token embeddings.
`positions` can be passed explicitly, which the pseudo-masked LM needs (several tokens share a position).
Segments: with config.n_segments > 0, a learned segment embedding is added too (UniLM's segment ids).

Residual schemes (x is the residual stream, f the sublayer):
  PreNorm   x + f(LN(x)), and a final LN before the head          (GPT-2; stable, the default)
  PostNorm  LN(x + f(x)), final_norm=None                         (Vaswani et al. 2017; BERT, UniLM)

nanomodels/encoder_decoder.py assembles the same parts into an encoder (bidirectional) and a decoder (causal, with
cross-attention over the encoder's output), the model the encoder-decoder rows of DeepNet and Sub-LN are for.
"""

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanomodels.attention import MultiHeadAttention, sdpa_attention


IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: targets that take no loss


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
    n_segments: int = 0  # learned segment embeddings (UniLM's segment ids); 0 = none

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layers", "d_model", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: must divide d_model ({self.d_model}), got {self.n_heads}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if not isinstance(self.d_ff, int) or isinstance(self.d_ff, bool) or self.d_ff < 1:
            raise ValueError(f"d_ff: must be a positive integer or None (= 4 * d_model), got {self.d_ff!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.n_segments, int) or isinstance(self.n_segments, bool) or self.n_segments < 0:
            raise ValueError(f"n_segments: must be an integer >= 0, got {self.n_segments!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the part contracts ------------------------------------------------------------------------------------

class Embed(Protocol):
    def __call__(self, inputs: torch.Tensor, positions: torch.Tensor,
                 segments: Optional[torch.Tensor] = None) -> torch.Tensor: ...


class Attention(Protocol):
    def __call__(self, x: torch.Tensor, allowed: Optional[torch.Tensor] = None, causal: bool = False,
                 cache: Optional[dict] = None, memory: Optional[torch.Tensor] = None) -> torch.Tensor: ...


class FeedForward(Protocol):
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class Residual(Protocol):
    def __call__(self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor: ...


class Head(Protocol):
    def __call__(self, h: torch.Tensor) -> torch.Tensor: ...

    def loss(self, h: torch.Tensor, targets: torch.Tensor,
             outputs: Optional[torch.Tensor] = None) -> torch.Tensor: ...


# ---- the default parts -------------------------------------------------------------------------------------

class TokenEmbedding(nn.Module):
    """Token + learned absolute position (+ segment) embeddings: ids (B, T) -> (B, T, d)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.wte = nn.Embedding(config.vocab_size, config.d_model)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.d_model)  # learned absolute positions
        self.wse = nn.Embedding(config.n_segments, config.d_model) if config.n_segments else None
        self.drop = nn.Dropout(config.dropout)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor,
                segments: Optional[torch.Tensor] = None) -> torch.Tensor:
        if idx.dim() != 2:
            raise ValueError(f"idx: expected token ids of shape (B, T), got {tuple(idx.shape)}")
        # one host sync per forward; measured by scripts/bench_train.py (the README's throughput row)
        if idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < self.vocab_size:
            raise ValueError(f"idx: token ids must be in [0, vocab_size={self.vocab_size}), "
                             f"got values in [{int(idx.min())}, {int(idx.max())}]")
        x = self.wte(idx) + self.wpe(positions)
        if segments is not None:
            if self.wse is None:
                raise ValueError("segments: this model has no segment embeddings (set config.n_segments > 0)")
            if segments.shape != idx.shape or int(segments.min()) < 0 or int(segments.max()) >= self.wse.num_embeddings:
                raise ValueError(f"segments: expected shape {tuple(idx.shape)} with values in "
                                 f"[0, n_segments={self.wse.num_embeddings})")
            x = x + self.wse(segments)
        return self.drop(x)


class PreNorm(nn.Module):
    """x + f(LN(x)); pair it with a final LayerNorm (the default `final_norm`)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model, bias=config.bias)

    def forward(self, x, sublayer):
        return x + sublayer(self.norm(x))


class PostNorm(nn.Module):
    """LN(x + f(x)); pair it with final_norm=None (the last block already ends with a LayerNorm)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model, bias=config.bias)

    def forward(self, x, sublayer):
        return self.norm(x + sublayer(x))


def layer_norm(config: TransformerConfig) -> nn.Module:
    """The final-norm part: LayerNorm over d."""
    return nn.LayerNorm(config.d_model, bias=config.bias)



class MLP(nn.Module):
    """fc2(GELU(fc1(x))): d -> d_ff -> d."""

    def __init__(self, config: TransformerConfig, *, linear: type = nn.Linear):
        super().__init__()
        self.fc1 = linear(config.d_model, config.d_ff, bias=config.bias)
        self.fc2 = linear(config.d_ff, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class LMHead(nn.Module):
    """Logits over the vocabulary, h (B, T, d) -> (B, T, |V|), and their cross-entropy loss."""

    def __init__(self, config: TransformerConfig, *, linear: type = nn.Linear):
        super().__init__()
        self.proj = linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, h):
        return self.proj(h)

    def loss(self, h, targets, outputs=None):
        """Mean cross-entropy over the targets that are not IGNORE_INDEX; computed in float32 at least."""
        logits = self(h) if outputs is None else outputs
        flat = logits.reshape(-1, logits.size(-1))
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))  # half precision -> float32 loss
        return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX)


class Block(nn.Module):
    """One layer: self-attention, optional cross-attention, feed-forward, each wrapped by the residual scheme."""

    def __init__(self, config, *, attention_fn, attention, ffn, residual, linear, cross_attention=None):
        super().__init__()
        self.attn = attention(config, attn_fn=attention_fn, linear=linear)
        self.attn_residual = residual(config)
        if cross_attention is not None:
            self.cross_attn = cross_attention(config, attn_fn=attention_fn, linear=linear)
            self.cross_residual = residual(config)
        self.ffn = ffn(config, linear=linear)
        self.ffn_residual = residual(config)

    def forward(self, x, allowed=None, causal=False, cache=None, memory=None, memory_allowed=None):
        x = self.attn_residual(x, lambda h: self.attn(h, allowed, causal, cache))
        if memory is not None:
            cross_cache = None if cache is None else cache.setdefault("cross", {})
            x = self.cross_residual(x, lambda h: self.cross_attn(h, memory_allowed, False, cross_cache, memory))
        return self.ffn_residual(x, self.ffn)


def gpt2_init_(model: nn.Module, n_layers: int) -> nn.Module:
    """GPT-2's init: N(0, 0.02) for linear and embedding weights, zero biases, and the residual-branch outputs
    (out_proj, fc2) at 0.02 / sqrt(2N). Returns the model."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    for name, p in model.named_parameters():
        if name.endswith(("out_proj.weight", "fc2.weight")):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))
    return model


BRANCH_PROJECTIONS = ("v_proj", "out_proj", "fc1", "fc2")  # the matrices on the residual update's path
QK_PROJECTIONS = ("q_proj", "k_proj")  # they only shape the attention pattern


def init_branches_(model: nn.Module, gain: float, *, qk_gain: float = 1.0) -> nn.Module:
    """In place: xavier_normal_(W, gain) for each linear layer named in BRANCH_PROJECTIONS, xavier_normal_(W,
    qk_gain) for q_proj and k_proj; every other parameter (embeddings, head, norms, biases) untouched.

    The shared mechanism of DeepNet's (gain beta < 1) and Sub-LN's (gain gamma > 1) initializations."""
    # BEGIN EXERCISE 4.3: which matrices get which gain
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in BRANCH_PROJECTIONS:
            nn.init.xavier_normal_(module.weight, gain=gain)
        elif leaf in QK_PROJECTIONS:
            nn.init.xavier_normal_(module.weight, gain=qk_gain)
    return model
    # END EXERCISE


class _Model(nn.Module):
    """What Transformer and EncoderDecoder share: positions, the head's loss plus the auxiliary losses."""

    def _positions(self, T, past, positions, device):
        block = self.config.block_size
        if positions is None:
            if past + T > block:
                raise ValueError(f"inputs: sequence length {past + T} exceeds block_size {block}")
            return torch.arange(past, past + T, device=device)
        if positions.shape[-1] != T or int(positions.max()) >= block or int(positions.min()) < 0:
            raise ValueError(f"positions: must have last dimension {T} and values in [0, {block})")
        return positions

    def _tie(self):
        proj = getattr(self.head, "proj", None)
        if self.config.tie_weights and type(proj) is nn.Linear and hasattr(self.embed, "wte"):
            proj.weight = self.embed.wte.weight

    def _aux_parts(self):
        return [(name, m) for name, m in self.named_modules()
                if hasattr(m, "aux_weight") and getattr(m, "aux_loss", None) is not None]

    def aux_losses(self) -> dict:
        """{module name: aux_loss} of the parts that set one in the last forward (unweighted)."""
        return {name: m.aux_loss for name, m in self._aux_parts()}

    def auxiliary_loss(self):
        """The sum of aux_weight * aux_loss over the parts that set one in the last forward (0.0 when none): what
        `forward` adds to the head's loss, and the one place a trainer reads it (to log it apart)."""
        return sum((m.aux_weight * m.aux_loss for _, m in self._aux_parts()), 0.0)

    def _loss(self, h, targets, outputs):
        loss = self.head.loss(h, targets, outputs)
        for _, m in self._aux_parts():
            loss = loss + m.aux_weight * m.aux_loss  # visibly weighted: the part's aux_weight
        return loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; without the position embeddings by default (as GPT-2 counts)."""
        n = sum(p.numel() for p in self.parameters())
        wpe = getattr(self.embed, "wpe", None)
        return n - wpe.weight.numel() if non_embedding and wpe is not None else n


class Transformer(_Model):
    def __init__(self, config: TransformerConfig, *, embed=TokenEmbedding, attention_fn=sdpa_attention,
                 attention=MultiHeadAttention, ffn=MLP, residual=PreNorm, final_norm=layer_norm,
                 linear: type = nn.Linear, head=LMHead, head_linear: type = nn.Linear):
        super().__init__()
        self.config = config
        self.embed = embed(config)
        self.blocks = nn.ModuleList(
            Block(config, attention_fn=attention_fn, attention=attention, ffn=ffn, residual=residual, linear=linear)
            for _ in range(config.n_layers))
        self.final_norm = final_norm(config) if final_norm is not None else nn.Identity()
        self.head = head(config, linear=head_linear)
        gpt2_init_(self, config.n_layers)
        self._tie()

    def hidden(self, inputs, *, allowed=None, causal=True, positions=None, segments=None, cache=None):
        """Final hidden states (B, T, d), before the head. `cache`: a list with one dict per layer, or None."""
        if inputs.dim() < 2:
            raise ValueError(f"inputs: expected a batch of sequences, (B, T) token ids or (B, T, C) vectors, "
                             f"got shape {tuple(inputs.shape)}")
        past = (cache[0]["k"].size(2) if "k" in cache[0] else cache[0].get("offset", 0)) if cache else 0
        positions = self._positions(inputs.shape[1], past, positions, inputs.device)
        x = self.embed(inputs, positions, segments)
        for i, block in enumerate(self.blocks):
            x = block(x, allowed, causal, None if cache is None else cache[i])
        return self.final_norm(x)

    def forward(self, inputs, targets=None, *, allowed=None, causal=True, positions=None, segments=None,
                cache=None):
        """inputs (B, T) token ids (or what the embed part takes) -> (head outputs, loss or None).

        targets (B, T) with IGNORE_INDEX where no loss is taken (for the LM head). Attention is causal by default
        (a GPT); pass causal=False and/or a boolean `allowed` of shape (T, T), (B, T, T) or (B, H, T, T) for other
        masks. The loss is the head's loss plus each part's aux_weight * aux_loss.
        """
        h = self.hidden(inputs, allowed=allowed, causal=causal, positions=positions, segments=segments, cache=cache)
        outputs = self.head(h)
        return outputs, (None if targets is None else self._loss(h, targets, outputs))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, *, temperature: float = 1.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, use_cache: bool = True):
        """Extend idx (B, T) by max_new_tokens sampled tokens. temperature=0 is greedy decoding.

        With use_cache, each step feeds only the newest token and reuses the keys and values of the past
        (a KV cache); once the sequence reaches block_size the window slides and the prefix is recomputed.
        """
        _check_sampling(max_new_tokens, temperature, top_k)
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


def _check_sampling(max_new_tokens, temperature, top_k):
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: must be >= 1 or None, got {top_k}")


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
