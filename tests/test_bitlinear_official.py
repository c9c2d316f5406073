"""BitLinear against the BitNet FAQ's code (the bias it ignores) and the HF 2B4T 2-bit layout (transformers'
unpack_weights, transcribed), float64 and exact integers."""

import pytest
import torch
import torch.nn.functional as F

from nanomodels.bitlinear import BitLinear, pack_hf_bitnet, unpack_hf_bitnet


def faq_bitlinear(layer, x):
    """The FAQ's BitLinear.forward, line by line (RMSNorm with the layer's eps and gain): no bias anywhere."""
    w = layer.weight
    x_norm = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layer.eps) * layer.norm_weight
    scale = 127.0 / x_norm.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    x_quant = x_norm + ((x_norm * scale).round().clamp_(-128, 127) / scale - x_norm).detach()
    s = 1.0 / w.abs().mean().clamp_(min=1e-5)
    w_quant = w + ((w * s).round().clamp_(-1, 1) / s - w).detach()
    return F.linear(x_quant, w_quant)


def test_bitlinear_without_bias_is_the_faq_layer_and_with_bias_adds_it():
    torch.manual_seed(0)
    layer = BitLinear(48, 20, bias=False, dtype=torch.float64)
    x = torch.randn(3, 7, 48, dtype=torch.float64)
    assert (layer(x) - faq_bitlinear(layer, x)).abs().max() < 1e-12
    biased = BitLinear(48, 20, dtype=torch.float64)  # nn.Linear's default bias=True
    with torch.no_grad():
        biased.weight.copy_(layer.weight)
    gap = biased(x) - faq_bitlinear(layer, x)
    assert (gap - biased.bias).abs().max() < 1e-12, "with a bias BitLinear is the FAQ layer plus the bias"


def transformers_unpack_weights(packed):
    """transformers.integrations.bitnet.unpack_weights: rows i * R .. (i + 1) * R - 1 from bits 2i, 2i + 1."""
    R = packed.shape[0]
    out = torch.zeros((R * 4, *packed.shape[1:]), dtype=torch.uint8)
    for i in range(4):
        out[i * R:(i + 1) * R] = (packed & (3 << (2 * i))) >> (2 * i)
    return out.to(torch.int32) - 1


@pytest.mark.parametrize("N,K", [(4, 1), (8, 5), (64, 33), (256, 128)])
def test_hf_layout_is_what_transformers_unpacks_and_round_trips(N, K):
    codes = torch.randint(-1, 2, (N, K), generator=torch.Generator().manual_seed(N + K), dtype=torch.int8)
    packed = pack_hf_bitnet(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (N // 4, K)
    assert torch.equal(transformers_unpack_weights(packed), codes.to(torch.int32))
    assert torch.equal(unpack_hf_bitnet(packed), codes)


def test_hf_layout_refuses_rows_not_a_multiple_of_four_and_values_outside_the_codes():
    with pytest.raises(ValueError, match="codes"):
        pack_hf_bitnet(torch.zeros(6, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="codes"):
        pack_hf_bitnet(torch.full((4, 4), 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="packed"):
        unpack_hf_bitnet(torch.zeros(2, 2, dtype=torch.int8))
