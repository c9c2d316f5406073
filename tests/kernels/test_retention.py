"""Chunkwise (gated) retention (kernels/retention.py) under the interpreter, against nanomodels' float64 parallel
forms: forward and the gradients of q, k, v and log_decay."""

import pytest
import torch

from kernels.retention import gated_retention, gated_retention_forward, retention
from nanomodels.gated_retention import gated_retention as reference
from nanomodels.retnet import retention_parallel
from tiers import SENTINEL, assert_close, needs_interpreter


def _inputs(B, H, T, dk, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, B, H, T, dk, generator=g).unbind(0)
    return q, k, torch.randn(B, H, T, dv, generator=g), -0.5 * torch.rand(B, H, T, generator=g)


@needs_interpreter
@pytest.mark.parametrize("shape", [(2, 2, 37, 16, 24), (1, 2, 5, 8, 16), (1, 1, 1, 16, 16)],
                         ids=["T%chunk!=0,Dk!=Dv", "T<chunk", "T=1"])
def test_forward_and_all_four_gradients_match_float64(shape):
    q, k, v, g = _inputs(*shape)
    xs = [t.clone().requires_grad_() for t in (q, k, v, g)]
    out = gated_retention(*xs, chunk_size=16)
    do = torch.randn_like(out)
    out.backward(do)
    ys = [t.double().requires_grad_() for t in (q, k, v, g)]
    ref = reference(*ys)
    ref.backward(do.double())
    assert_close(out, ref, "out", atol=1e-4, rtol=1e-5)
    for name, x, y in zip(("dq", "dk", "dv", "dlog_decay"), xs, ys):
        assert_close(x.grad, y.grad, name, atol=2e-4, rtol=1e-5)


@needs_interpreter
def test_constant_decay_is_retention_parallel():
    q, k, v, _ = _inputs(2, 3, 21, 16, 16, seed=1)
    gamma = torch.tensor([0.9, 0.97, 1.0])
    assert_close(retention(q, k, v, gamma, chunk_size=16),
                 retention_parallel(q.double(), k.double(), v.double(), gamma.double()), "retention", atol=1e-4)


@needs_interpreter
def test_transposed_inputs_and_guard_bands():
    q, k, v, g = _inputs(2, 2, 19, 16, 16, seed=2)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # a (B, T, H, D) layout seen as (B, H, T, D)
    big = torch.full((3, 2, 25, 20), SENTINEL)
    view = big[1:, :, 3:22, 2:18]
    gated_retention_forward(qt, k, v, g, chunk_size=16, out=view)
    assert_close(view, reference(q.double(), k.double(), v.double(), g.double()), "out", atol=1e-4)
    view.fill_(SENTINEL)
    assert bool((big == SENTINEL).all()), "the kernel wrote outside its output view"


def test_empty_and_bad_inputs():
    q, k, v, g = _inputs(1, 1, 0, 16, 16)
    assert gated_retention(q, k, v, g).shape == (1, 1, 0, 16)
    q, k, v, g = _inputs(1, 1, 4, 16, 16)
    with pytest.raises(ValueError, match="q: dtype"):
        gated_retention(q.double(), k.double(), v.double(), g)
    with pytest.raises(ValueError, match="log_decay: must be finite and <= 0"):
        gated_retention(q, k, v, -g)
    with pytest.raises(ValueError, match="v: must have shape"):
        gated_retention(q, k, v[:, :, :2], g)
    with pytest.raises(ValueError, match="chunk_size"):
        gated_retention(q, k, v, g, chunk_size=20)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_the_float64_result_within_their_rounding(dtype):
    q, k, v, g = (t.to(dtype) for t in _inputs(1, 2, 23, 16, 16, seed=3))
    out = gated_retention(q, k, v, g.float(), chunk_size=16)
    assert out.dtype == dtype
    ref = reference(q.double(), k.double(), v.double(), g.double())
    eps = torch.finfo(dtype).eps  # the kernel accumulates in fp32; the error is the output's own rounding
    assert_close(out.double(), ref, f"out ({dtype})", atol=4 * eps * ref.abs().max().item(), rtol=0)


def test_the_default_chunk_is_one_the_compile_tier_builds_without_spills():
    from kernels.retention import AOT_SPECS, default_chunk

    built = {(spec.name.split("Dk ")[1].split(",")[0], spec.constexprs["CHUNK"]) for spec in AOT_SPECS}
    assert {(str(d), default_chunk(d)) for d in (64, 128)} <= built  # `python -m kernels.aot --only retention`
    assert default_chunk(16) == 64 and default_chunk(128) == 32
