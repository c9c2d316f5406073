"""BitLinear: ternary weights, 8-bit activations (BitNet arXiv 2310.11453; BitNet b1.58 arXiv 2402.17764).

BitNet b1.58 replaces every nn.Linear of the Transformer body by a BitLinear whose weights take three values
{-1, 0, +1} times one per-tensor scale, and whose inputs are 8-bit integers with one scale per token. Training
keeps full-precision *latent* weights W and quantizes them in every forward; a straight-through estimator (STE)
passes the gradient of the quantized weights to the latent ones unchanged.

    weight_quant:      s_W = 1 / max(mean|W|, 1e-5)                    (absmean, one scale per tensor)
                       W_q = clamp(round(W s_W), -1, 1) / s_W          (ternary codes times mean|W|)
    activation_quant:  s_x = 127 / max(max_j |x_j|, 1e-5)               (absmax over the last dim, per token)
                       x_q = clamp(round(x s_x), -128, 127) / s_x
    BitLinear(x):      h = RMSNorm(x);  y = x_q(h) W_q^T               STE:  q(v) := v + (q(v) - v).detach()
    inference:         y = (X_int8 W_tern^T)_int32 / s_x / s_W         one integer matmul, then two rescales

BitNet b1 (the first paper) uses binary weights instead: W_q = sign(W - mean W) * mean|W| (`binary=True`).

The RMSNorm inside each BitLinear is why a BitNet block has no norm of its own before attention or the
feed-forward: `BitNetResidual` is x + f(x), with the final norm before the full-precision head kept. The
token embeddings and the LM head stay in full precision.

Inference and export: `TernaryLinear.from_bitlinear` quantizes the latent weights once to codes in {-1, 0, 1}
and stores them packed, 4 codes per byte along the input dimension K: code c = w + 1 in {0, 1, 2}, weight k of
a row in bits 2(k mod 4) .. 2(k mod 4) + 1 of byte k // 4 (little-endian 2-bit fields), the row padded to a
whole byte with code 1 (weight 0). A 4096 x 4096 matrix is 4 MiB (fp32: 64 MiB). `to_ternary(model)` swaps
every BitLinear of a model for its TernaryLinear, whose state_dict is the 2-bit checkpoint.

Paper vs official code (the training code in microsoft/unilm @ 768a3c8, bitnet/The-Era-of-1-bit-LLMs FAQ; the
inference model microsoft/BitNet gpu/model.py @ 179c2c9):
- The quantizers and BitLinear.forward follow the FAQ code line by line except for the bias: the FAQ forward
  returns F.linear(x_quant, w_quant) and ignores self.bias; BitLinear keeps nn.Linear's default bias=True (the
  Transformer passes config.bias) and adds it, so BitLinear(..., bias=False) is the FAQ layer
  (tests/test_bitlinear.py). Its RMSNorm is a plain function here, with a learnable gain (ones at init).
- The 2-bit layout above is this project's own: none of the three official formats is byte-compatible with it.
  The GPU kernel's (microsoft/BitNet gpu/pack_weight.py): codes w + 2, the (N, K) matrix permuted in 16 x 32
  tiles into the tensor-core load order, 4 codes per byte, then the 2-bit fields of each int32 interleaved:
  int8 (N, K/4). The HF 2B4T checkpoint's (transformers' unpack_weights): codes w + 1 packed along the output
  dimension, uint8 (N/4, K), byte (r, k) holding rows r, r + N/4, r + N/2, r + 3N/4 in bits 0-1, 2-3, 4-5, 6-7
  (`pack_hf_bitnet`), with y = acc / (s_x weight_scale). bitnet.cpp's I2_S (src/ggml-bitnet-mad.cpp): codes
  w + 1, the tensor flattened into blocks of 128, byte b of a block holding weights b, b + 32, b + 64, b + 96 in
  bits 6-7, 4-5, 2-3, 0-1, one float max|W| after the data.
- Released checkpoints hold the latent full-precision weights, not ternary values (microsoft/unilm#1502):
  export must apply weight_quant. Never quantize already-quantized weights again: the codes survive but the
  values shrink, weight_quant(weight_quant(W)) = p weight_quant(W) with p the non-zero fraction (about 0.69
  for Gaussian W), because mean|W_q| = p mean|W|.
- The 2B4T model deviates from the b1.58 paper's LLaMA recipe: a squared-ReLU GLU instead of SwiGLU, extra
  sub-norms before the attention output and the down projection, grouped-query attention (20 / 5 heads).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _check_float(name: str, t, min_dim: int = 0) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name}: must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.dim() < min_dim or t.numel() == 0:
        raise ValueError(f"{name}: must be non-empty with at least {min_dim} dimension(s), got {tuple(t.shape)}")


def weight_quant(w: torch.Tensor) -> torch.Tensor:
    """W_q = clamp(round(W / mean|W|), -1, 1) * mean|W| (per tensor), in W's dtype."""
    _check_float("w", w)
    # BEGIN EXERCISE 8.1: the absmean ternary weight quantizer
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * scale).round().clamp(-1, 1) / scale
    # END EXERCISE


def activation_quant(x: torch.Tensor) -> torch.Tensor:
    """x_q = clamp(round(x * 127 / max|x|), -128, 127) * max|x| / 127, the max over the last dim (per token)."""
    _check_float("x", x, min_dim=1)
    # BEGIN EXERCISE 8.2: the per-token absmax 8-bit activation quantizer
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale
    # END EXERCISE


def weight_quant_binary(w: torch.Tensor) -> torch.Tensor:
    """BitNet b1: W_q = sign(W - mean W) * mean|W| (per tensor)."""
    _check_float("w", w)
    return (w - w.mean()).sign() * w.abs().mean()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def bitlinear(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, bias=None, eps: float = 1e-5,
              binary: bool = False) -> torch.Tensor:
    """y = activation_quant(RMSNorm(x)) weight_quant(W)^T (+ bias), both quantizers with a straight-through
    estimator: the forward sees the quantized values, the backward the identity. weight: the latent W
    (out, in); norm_weight: the RMSNorm gain; binary: BitNet b1's weight_quant_binary instead."""
    # BEGIN EXERCISE 8.3: BitLinear with straight-through estimators
    h = rms_norm(x, norm_weight, eps)
    x_q = h + (activation_quant(h) - h).detach()  # forward: quantized; backward: identity
    quant = weight_quant_binary if binary else weight_quant
    w_q = weight + (quant(weight) - weight).detach()
    return F.linear(x_q, w_q, bias)
    # END EXERCISE


class BitLinear(nn.Linear):
    """nn.Linear drop-in: y = activation_quant(RMSNorm(x)) weight_quant(W)^T (+ bias), both quantizers with STE.

    `weight` holds the latent weights W (out_features, in_features); `norm_weight` is the RMSNorm gain;
    `eps` the RMSNorm epsilon; binary=True gives the BitNet b1 weights sign(W - mean W) * mean|W|."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 eps: float = 1e-5, binary: bool = False):
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps: must be a number >= 0, got {eps!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.norm_weight = nn.Parameter(torch.ones(in_features, device=device, dtype=dtype))
        self.eps = float(eps)
        self.binary = bool(binary)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(-1) != self.in_features:
            raise ValueError(f"x: last dimension must be in_features={self.in_features}, got {tuple(x.shape)}")
        return bitlinear(x, self.weight, self.norm_weight, self.bias, self.eps, self.binary)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}" + (", binary=True" if self.binary else "")


class BitNetResidual(nn.Module):
    """x + f(x): the block's norm lives inside each BitLinear; pair it with the core's default final_norm (a norm
    before the full-precision head)."""

    def __init__(self, config=None):
        super().__init__()

    def forward(self, x, sublayer):
        return x + sublayer(x)


# ---------------------------------------------------------------------------------------- inference path

def quantize_weight(w: torch.Tensor, binary: bool = False):
    """(codes int8 in {-1, 0, 1} shaped like w, s_W = 1 / mean|W| as a 0-d tensor); W_q = codes / s_W.
    binary=True: the BitNet b1 codes sign(W - mean W), same scale."""
    _check_float("w", w)
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    codes = (w - w.mean()).sign() if binary else (w * scale).round().clamp(-1, 1)
    return codes.to(torch.int8), scale


def quantize_activation(x: torch.Tensor):
    """(codes int8 in [-127, 127] shaped like x, s_x = 127 / max|x| of shape (..., 1)); x_q = codes / s_x."""
    _check_float("x", x, min_dim=1)
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127).to(torch.int8), scale


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in {-1, 0, 1} of shape (N, K) -> uint8 (N, ceil(K / 4)), weight k at bits 2(k mod 4) of byte k//4."""
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.dtype.is_floating_point:
        raise ValueError(f"codes: must be a 2-D integer tensor (N, K), got {getattr(codes, 'shape', codes)!r}")
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise ValueError(f"codes: values must be in {{-1, 0, 1}}, got [{int(codes.min())}, {int(codes.max())}]")
    # BEGIN EXERCISE 8.4: 2-bit packing, four codes per byte
    N, K = codes.shape
    padded = torch.ones(N, 4 * math.ceil(K / 4), dtype=torch.uint8, device=codes.device)  # code 1 = weight 0
    padded[:, :K] = (codes + 1).to(torch.uint8)
    fields = padded.view(N, -1, 4)  # (N, K/4, 4): the 4 codes of one byte
    return fields[..., 0] | fields[..., 1] << 2 | fields[..., 2] << 4 | fields[..., 3] << 6
    # END EXERCISE


def unpack_ternary(packed: torch.Tensor, K: int) -> torch.Tensor:
    """The inverse of pack_ternary: uint8 (N, ceil(K / 4)) -> int8 codes (N, K) in {-1, 0, 1}."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed: must be a 2-D uint8 tensor, got {getattr(packed, 'dtype', type(packed))}")
    if not (isinstance(K, int) and 4 * packed.size(1) - 3 <= K <= 4 * packed.size(1)):
        raise ValueError(f"K: must be an int with ceil(K / 4) = {packed.size(1)} (packed's columns), got {K!r}")
    # BEGIN EXERCISE 8.5: decoding 2-bit codes, as every kernel does
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    fields = (packed.unsqueeze(-1) >> shifts) & 3  # (N, K/4, 4)
    return fields.reshape(packed.size(0), -1)[:, :K].to(torch.int8) - 1
    # END EXERCISE


def pack_hf_bitnet(codes: torch.Tensor) -> torch.Tensor:
    """The HF 2B4T layout: int8 codes (N, K) in {-1, 0, 1}, N a multiple of 4 -> uint8 (N / 4, K), row
    i (N / 4) + r of the codes in bits 2i, 2i + 1 of row r (code + 1)."""
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.size(0) % 4 or codes.is_floating_point():
        raise ValueError(f"codes: must be a 2-D integer tensor (N, K) with N a multiple of 4, got "
                         f"{getattr(codes, 'dtype', type(codes).__name__)} {tuple(getattr(codes, 'shape', ()))}")
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("codes: every entry must be -1, 0 or 1")
    fields = (codes.to(torch.uint8) + 1).view(4, codes.size(0) // 4, codes.size(1))  # (4, N/4, K)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=codes.device)[:, None, None]
    return (fields << shifts).sum(0, dtype=torch.uint8)


def unpack_hf_bitnet(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_hf_bitnet: uint8 (N / 4, K) -> int8 codes (N, K)."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed: must be a 2-D uint8 tensor, got {getattr(packed, 'dtype', type(packed))}")
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)[:, None, None]
    return ((packed[None] >> shifts) & 3).reshape(-1, packed.size(1)).to(torch.int8) - 1


def ternary_matmul_reference(x_codes: torch.Tensor, packed: torch.Tensor, K: int) -> torch.Tensor:
    """The integer matmul X_int8 W_tern^T: int8 (M, K) x packed (N, ceil(K/4)) -> int32 (M, N), exact."""
    if x_codes.dtype != torch.int8 or x_codes.dim() != 2 or x_codes.size(1) != K:
        raise ValueError(f"x_codes: must be int8 of shape (M, K={K}), got {x_codes.dtype} {tuple(x_codes.shape)}")
    w = unpack_ternary(packed, K)
    if x_codes.is_cuda:  # no integer matmul on CUDA in PyTorch; float64 sums of these integers are exact
        return (x_codes.double() @ w.double().T).to(torch.int32)
    return x_codes.to(torch.int32) @ w.to(torch.int32).T


def ternary_linear(x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, norm_weight: torch.Tensor,
                   bias=None, eps: float = 1e-5, gemm=ternary_matmul_reference) -> torch.Tensor:
    """The integer inference of a BitLinear, x (..., K) -> y (..., N): h = RMSNorm(x) with gain norm_weight (K,);
    X_int8, s_x = the per-token int8 codes of h and their scale (quantize_activation); the integer matmul
    acc = gemm(X_int8 (M, K), packed, K) -> int32 (M, N), exact, with packed (N, ceil(K / 4)) the 2-bit codes of
    W and weight_scale s_W = 1 / mean|W| (quantize_weight, once, offline); y = acc / s_x / s_W (+ bias), in x's
    dtype. Equals bitlinear(x, W, norm_weight, bias, eps), the fake-quant training forward, up to float rounding."""
    if norm_weight.dim() != 1 or x.size(-1) != norm_weight.numel() or packed.dim() != 2 \
            or packed.size(1) != -(-x.size(-1) // 4):
        raise ValueError(f"x, packed, norm_weight: need x (..., K), packed (N, ceil(K / 4)) and norm_weight (K,), got "
                         f"{tuple(x.shape)}, {tuple(packed.shape)} and {tuple(norm_weight.shape)}")
    # BEGIN EXERCISE 8.7: the integer inference path, end to end
    K = norm_weight.numel()
    h = rms_norm(x, norm_weight, eps)
    codes, x_scale = quantize_activation(h)  # int8 (..., K), float (..., 1): one scale per token
    acc = gemm(codes.reshape(-1, K), packed, K)  # (M, N) int32: additions and subtractions of int8 only
    y = acc.view(*x.shape[:-1], packed.size(0)).to(x.dtype) / x_scale / weight_scale.to(x.dtype)
    return y if bias is None else y + bias
    # END EXERCISE


class TernaryLinear(nn.Module):
    """The inference form of a BitLinear: packed 2-bit weights and s_W, RMSNorm, int8 activations, one integer
    matmul `gemm(x_codes (M, K) int8, packed, K) -> int32 (M, N)`, then y = acc / s_x / s_W (+ bias)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, eps: float = 1e-5, gemm=None):
        super().__init__()
        self.in_features, self.out_features, self.eps = in_features, out_features, float(eps)
        self.register_buffer("packed", torch.zeros(out_features, math.ceil(in_features / 4), dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(()))
        self.register_buffer("norm_weight", torch.ones(in_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.gemm = gemm or ternary_matmul_reference

    @classmethod
    def from_bitlinear(cls, layer: BitLinear, gemm=None) -> "TernaryLinear":
        """Quantize the latent weights once (never a second time) and pack them."""
        if not isinstance(layer, BitLinear):
            raise TypeError(f"layer: must be a BitLinear, got {type(layer).__name__}")
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, layer.eps, gemm)
        new.to(layer.weight.device)
        codes, scale = quantize_weight(layer.weight.detach(), binary=layer.binary)
        new.packed.copy_(pack_ternary(codes))
        new.weight_scale = scale.detach().clone()
        new.norm_weight = layer.norm_weight.detach().clone()
        if layer.bias is not None:
            new.bias = layer.bias.detach().clone()
        return new

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ternary_linear(x, self.packed, self.weight_scale, self.norm_weight, self.bias, self.eps, self.gemm)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2-bit packed"


def to_ternary(model: nn.Module, gemm=None) -> nn.Module:
    """In place: every BitLinear of `model` becomes its TernaryLinear. Returns the model; its state_dict is the
    2-bit checkpoint (load it into a model built the same way and passed through to_ternary)."""
    for name, child in list(model.named_children()):
        if isinstance(child, BitLinear):
            setattr(model, name, TernaryLinear.from_bitlinear(child, gemm))
        else:
            to_ternary(child, gemm)
    return model


__all__ = ["BitLinear", "BitNetResidual", "TernaryLinear", "activation_quant", "bitlinear", "pack_hf_bitnet",
           "pack_ternary", "quantize_activation", "quantize_weight", "rms_norm", "ternary_linear",
           "ternary_matmul_reference", "to_ternary", "unpack_hf_bitnet", "unpack_ternary", "weight_quant",
           "weight_quant_binary"]
