"""The MoE grouped GEMM (kernels/grouped_gemm.py), in tiers:

1. reference    the sort-and-pad metadata (every block one expert, token order kept, each pair once) and the
                einsum reference against a per-token loop (float64); bad arguments raise ValueError.
2. interpreter  both kernels under TRITON_INTERPRET=1 on CPU tensors: fp32 and fp16, top-1 and top-2, partial
                tiles, several blocks per expert, dropped tokens, forward and backward against the float64
                einsum reference, guard bands, the drop-in dispatch of the MoE part.
3. compile      built for sm_80 / sm_90 through the kernel registry (tests/kernels/test_compile.py).
4. gpu          (-m gpu) fp16 numerics on the device.
"""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.grouped_gemm import (BLOCK_M, _launch, align_by_expert, grouped_gemm, grouped_gemm_dispatch, moe_ffn,
                                  moe_ffn_reference)
from nanomodels.moe import MoE, top_k_routing
from nanomodels.transformer import TransformerConfig
from tiers import SENTINEL, assert_close, needs_interpreter, randn


def weights(E, d, f, seed, dtype=torch.float32):
    return (randn(E, f, d, seed=seed, dtype=dtype) * 0.3, randn(E, f, seed=seed + 1, dtype=dtype) * 0.1,
            randn(E, d, f, seed=seed + 2, dtype=dtype) * 0.3, randn(E, d, seed=seed + 3, dtype=dtype) * 0.1)


# ---- tier 1 -------------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=30)
@given(n=st.integers(0, 300), E=st.integers(1, 6), seed=st.integers(0, 2 ** 16))
def test_alignment_gives_one_expert_per_block_token_order_and_each_pair_once(n, E, seed):
    experts = torch.randint(0, E, (n,), generator=torch.Generator().manual_seed(seed))
    order, block_expert, expert_blocks = align_by_expert(experts, E)
    assert len(order) == len(block_expert) * BLOCK_M
    assert sorted(order[order >= 0].tolist()) == list(range(n)), "every pair must appear exactly once"
    for e in range(E):
        blocks = range(int(expert_blocks[e]), int(expert_blocks[e + 1]))
        assert all(int(block_expert[b]) == e for b in blocks), f"expert {e}'s blocks are labelled wrongly"
        mine = torch.cat([order[b * BLOCK_M:(b + 1) * BLOCK_M] for b in blocks]) if blocks else order[:0]
        real = mine[mine >= 0]
        assert torch.equal(real, (experts == e).nonzero().flatten()), f"expert {e}: pairs out of token order"
        assert (mine[len(real):] == -1).all(), "padding must follow the expert's pairs"
        assert len(blocks) == -(-int((experts == e).sum()) // BLOCK_M), "more blocks than the count needs"


def naive_moe_ffn(h, routing, w1, b1, w2, b2):
    y = torch.zeros_like(h)
    for s in range(h.size(0)):
        for j in range(routing.experts.size(1)):
            if routing.kept[s, j]:
                e = int(routing.experts[s, j])
                y[s] += routing.gates[s, j] * (F.gelu(h[s] @ w1[e].t() + b1[e]) @ w2[e].t() + b2[e])
    return y


@pytest.mark.parametrize("k, capacity", [(1, 3), (2, 5), (2, 100)])
def test_einsum_reference_equals_the_per_token_loop(k, capacity):
    h, logits = randn(20, 8, seed=1).double(), randn(20, 4, seed=2).double()
    w = [t.double() for t in weights(4, 8, 12, seed=3)]
    ref = naive_moe_ffn(h, top_k_routing(logits, k, capacity), *w)
    assert_close(moe_ffn_reference(h, logits, k, capacity, *w), ref, "einsum reference vs loop", 1e-12)


@pytest.mark.parametrize("call, match", [
    (lambda: grouped_gemm(torch.randn(4, 8), torch.randn(2, 3, 7), *[torch.zeros(64, dtype=torch.long)] * 2,
                          torch.zeros(1, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), 4), "equal K"),
    (lambda: grouped_gemm(torch.randn(4, 8).double(), torch.randn(2, 3, 8).double(),
                          *[torch.zeros(64, dtype=torch.long)] * 2, torch.zeros(1, dtype=torch.int32),
                          torch.zeros(3, dtype=torch.int32), 4), "dtype"),
    (lambda: grouped_gemm(torch.randn(4, 8), torch.randn(2, 3, 8), *[torch.zeros(10, dtype=torch.long)] * 2,
                          torch.zeros(1, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), 4), "BLOCK_M")])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def routed_call(M=5, E=2, out_rows=7, **bad):
    """A valid call (2 blocks of BLOCK_M rows: expert 0 then 1, 3 live rows each) with some metadata replaced."""
    from kernels.grouped_gemm import BLOCK_M

    a_rows = torch.full((2 * BLOCK_M,), -1, dtype=torch.long)
    a_rows[:3], a_rows[BLOCK_M:BLOCK_M + 3] = torch.tensor([0, 2, 4]), torch.tensor([1, 3, 4])
    c_rows = torch.where(a_rows >= 0, torch.arange(2 * BLOCK_M) % out_rows, 0)
    meta = dict(a_rows=a_rows, c_rows=c_rows, block_expert=torch.tensor([0, 1], dtype=torch.int32),
                expert_blocks=torch.tensor([0, 1, 2], dtype=torch.int32))
    for name, edit in bad.items():
        meta[name] = edit(meta[name].clone())
    return lambda: grouped_gemm(torch.randn(M, 8), torch.randn(E, 3, 8), meta["a_rows"], meta["c_rows"],
                                meta["block_expert"], meta["expert_blocks"], out_rows)


def _set(i, value):
    def edit(t):
        t[i] = value
        return t
    return edit


@pytest.mark.parametrize("call, match", [
    (routed_call(block_expert=_set(1, 2)), "block_expert"),  # expert id = E
    (routed_call(block_expert=_set(0, -1)), "block_expert"),
    (routed_call(a_rows=_set(1, 5)), "a_rows"),  # row index = M
    (routed_call(c_rows=_set(2, 7)), "c_rows"),  # destination row = out_rows
    (routed_call(c_rows=_set(0, -3)), "c_rows"),
    (routed_call(expert_blocks=_set(2, 3)), "expert_blocks"),  # the last block past len(block_expert)
    (routed_call(expert_blocks=lambda t: t[:2]), "expert_blocks"),  # not E + 1 entries
], ids=["expert id = E", "expert id < 0", "row = M", "destination = out_rows", "destination < 0",
        "blocks past the end", "expert_blocks length"])
def test_routing_metadata_out_of_range_raises_before_any_launch(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- tier 2 -------------------------------------------------------------------------------------------------

ATOL = {torch.float32: 2e-5, torch.float16: 3e-3}


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("S, d, f, E, k, cf", [(37, 24, 40, 5, 2, 0.6), (150, 16, 20, 2, 1, 1.0),
                                               (9, 32, 64, 3, 2, 4.0)])
def test_forward_and_backward_match_the_einsum_reference(S, d, f, E, k, cf, dtype):
    h, logits = randn(S, d, seed=S, dtype=dtype), randn(S, E, seed=S + 1)
    C = max(1, int(cf * k * -(-S // E)))
    leaves = [t.clone().requires_grad_() for t in (h, *weights(E, d, f, seed=S + 2, dtype=dtype))]
    out = moe_ffn(leaves[0], top_k_routing(logits, k, C), *leaves[1:])
    dy = randn(S, d, seed=S + 7, dtype=dtype)
    out.backward(dy)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    expected = moe_ffn_reference(ref[0], logits.double(), k, C, *ref[1:])
    expected.backward(dy.double())
    what = f"S={S} d={d} F={f} E={E} k={k} C={C} {dtype}"
    assert out.dtype == dtype
    assert_close(out, expected, f"{what}: y", ATOL[dtype], rtol=ATOL[dtype])
    for name, t, r in zip(("dh", "dW1", "db1", "dW2", "db2"), leaves, ref):
        # gradients sum over up to S rows whose fp16 intermediates (hidden, d hidden) are rounded: scale the bound
        scale = r.grad.abs().max().item() * (4 if dtype == torch.float16 else 1)
        assert_close(t.grad, r.grad, f"{what}: {name}", ATOL[dtype] * max(1.0, scale))


@needs_interpreter
@pytest.mark.parametrize("trans_w", [True, False])
def test_kernel_writes_only_the_scattered_rows(trans_w):
    S, d, n, E = 50, 24, 40, 3
    experts = torch.randint(0, E, (S,), generator=torch.Generator().manual_seed(0))
    order, block_expert, _ = align_by_expert(experts, E)
    a = randn(S, d, seed=1)
    w = randn(E, n, d, seed=2) if trans_w else randn(E, d, n, seed=2)
    keep = order.clone()
    keep[keep % 3 == 0] = -1  # drop a third of the pairs: their rows must stay untouched
    targets = torch.where(keep >= 0, (keep * 7) % 61, 0)  # scatter to scattered, unique rows of a 61-row output
    buf = torch.full((61 + 3, n + 19), SENTINEL)
    view = buf[1:62, 2:n + 2]
    _launch(a, w, keep, targets, block_expert, view, trans_w=trans_w)
    written = torch.zeros(61, dtype=torch.bool)
    written[targets[keep >= 0]] = True
    expected = torch.full((61, n), SENTINEL, dtype=torch.float64)
    for p in (keep >= 0).nonzero().flatten().tolist():
        e, row = int(block_expert[p // BLOCK_M]), int(keep[p])
        expected[targets[p]] = a[row].double() @ (w[e].t() if trans_w else w[e]).double()
    band = torch.ones_like(buf, dtype=torch.bool)
    band[1:62, 2:n + 2] = False
    assert (buf[band] == SENTINEL).all(), f"{int((buf[band] != SENTINEL).sum())} guard cells written"
    assert (view[~written] == SENTINEL).all(), "rows of dropped or padding pairs were written"
    assert_close(view, expected, "scattered rows", 2e-5)


@needs_interpreter
def test_bfloat16_is_computed_in_float32_under_the_interpreter():
    S, d, f, E = 20, 16, 24, 3
    h, logits = randn(S, d, seed=4, dtype=torch.bfloat16), randn(S, E, seed=5)
    w = [t.bfloat16() for t in weights(E, d, f, seed=6)]
    out = moe_ffn(h, top_k_routing(logits, 2, 20), *w)
    assert out.dtype == torch.bfloat16
    ref = moe_ffn_reference(h.double(), logits.double(), 2, 20, *(t.double() for t in w))
    assert_close(out, ref, "bf16 grouped GEMM (fp32 inside the interpreter)", 3e-2, rtol=3e-2)


@needs_interpreter
def test_drop_in_dispatch_for_the_moe_part():
    config = TransformerConfig(vocab_size=40, block_size=16, n_layers=1, d_model=16, n_heads=2, d_ff=24)
    torch.manual_seed(0)
    dense = MoE(config, num_experts=4, k=2, capacity_factor=0.75)
    kernel = MoE(config, num_experts=4, k=2, capacity_factor=0.75, dispatch=grouped_gemm_dispatch)
    kernel.load_state_dict(dense.state_dict())
    x = randn(2, 12, 16, seed=3)
    y, y_ref = kernel(x), dense(x)
    assert_close(y, y_ref, "MoE with the grouped GEMM vs einsum dispatch", 2e-5)
    (y.square().sum() + kernel.aux_loss).backward()
    (y_ref.square().sum() + dense.aux_loss).backward()
    for (name, p), q in zip(kernel.named_parameters(), dense.parameters()):
        assert_close(p.grad, q.grad, f"gradient of {name}", 5e-5)
    assert partial(MoE, dispatch=grouped_gemm_dispatch)(config).dispatch is grouped_gemm_dispatch


# ---- tier 4 -------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_fp16_on_the_device_matches_the_reference():
    S, d, f, E, k = 4096, 256, 512, 8, 2
    h, logits = randn(S, d, seed=0, dtype=torch.float16, device="cuda"), randn(S, E, seed=1, device="cuda")
    w = [t.cuda() for t in weights(E, d, f, seed=2, dtype=torch.float16)]
    C = 2 * S // E
    out = moe_ffn(h, top_k_routing(logits, k, C), *w)
    ref = moe_ffn_reference(h.double(), logits.double(), k, C, *[t.double() for t in w])
    assert_close(out, ref, "fp16 grouped GEMM on the GPU", 2e-2, rtol=2e-2)
