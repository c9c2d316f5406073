"""LongNet dilated attention against literal oracles, in float64.

The central oracle is the paper's mixture written as dense attention with an additive bias log count(q, k), where
count(q, k) is the number of patterns that put key k in query q's kept rows (-inf where 0), built by loops over
positions. The library gathers, attends and merges by LSE; the two must agree in the forward and the backward.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomodels.attention import attention
from nanomodels.dilated import (DilatedAttention, check_patterns, dilated_attention, dilated_branch, geometric_patterns,
                                head_offsets, longnet, merge_by_lse, num_score_entries)
from nanomodels.train import FunctionTask, fit
from nanomodels.transformer import Transformer, TransformerConfig

TOL = 1e-10
CHAPTER = "06"  # tests/conftest.py runs chapter 06's graded checks (exercises/grading/checks/ch06_dilated_attention.py)


def test_graded_invariant_holds_for_the_library(graded_check):
    graded_check()


def report(name, got, want):
    diff = (got - want).abs()
    return f"{name}: max |diff| {diff.max().item():.3g}, mean {diff.mean().item():.3g}"


def qkv(B, H, T, D, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, dtype=torch.float64, generator=g).requires_grad_(requires_grad)
            for _ in range(3)]


def count_oracle(H, T, segment_lengths, dilation_rates, causal):
    """count[j, q, k]: patterns (w, r) with q, k in one segment, both at index = j mod r (mod r) in it."""
    count = torch.zeros(H, T, T, dtype=torch.float64)
    for w, r in zip(segment_lengths, dilation_rates):
        for j in range(H):
            for qi in range(T):
                for ki in range(T):
                    same_segment = qi // w == ki // w
                    kept = (qi % w) % r == j % r and (ki % w) % r == j % r
                    if same_segment and kept and (ki <= qi or not causal):
                        count[j, qi, ki] += 1
    return count


def log_count_attention(q, k, v, count):
    """softmax(q k^T / sqrt(d) + log count) v; a row with count 0 everywhere gives 0."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + torch.log(count)
    weights = torch.softmax(scores.masked_fill(count == 0, -1e300), dim=-1)
    return torch.where((count > 0).any(-1, keepdim=True), weights, 0.0) @ v


patterns = st.lists(st.tuples(st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4])), min_size=1, max_size=3)


def to_patterns(pairs):
    # w = base * r keeps r | w for every drawn pair
    return [base * r for base, r in pairs], [r for _, r in pairs]


@settings(deadline=None, max_examples=25)
@given(pairs=patterns, H=st.integers(1, 5), T=st.integers(1, 40), causal=st.booleans(), seed=st.integers(0, 99))
def test_mixture_equals_dense_attention_with_log_count_bias(pairs, H, T, causal, seed):
    ws, rs = to_patterns(pairs)
    q, k, v = qkv(2, H, T, 3, seed)
    got = dilated_attention(q, k, v, ws, rs, causal=causal)
    want = log_count_attention(q, k, v, count_oracle(H, T, ws, rs, causal))
    assert torch.allclose(got, want, atol=TOL, rtol=0), report("log-count identity (forward)", got, want)


@settings(deadline=None, max_examples=10)
@given(pairs=patterns, H=st.integers(1, 4), T=st.integers(1, 24), causal=st.booleans(), seed=st.integers(0, 99))
def test_gradients_equal_the_log_count_oracle_gradients(pairs, H, T, causal, seed):
    ws, rs = to_patterns(pairs)
    q, k, v = qkv(1, H, T, 3, seed, requires_grad=True)
    grad_out = torch.randn(1, H, T, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    got = torch.autograd.grad(dilated_attention(q, k, v, ws, rs, causal=causal), (q, k, v), grad_out)
    want = torch.autograd.grad(log_count_attention(q, k, v, count_oracle(H, T, ws, rs, causal)), (q, k, v),
                               grad_out)
    for name, a, b in zip("qkv", got, want):
        assert torch.allclose(a, b, atol=TOL, rtol=0), report(f"log-count identity (d{name})", a, b)


def test_detached_weights_keep_the_forward_but_not_the_gradient():
    ws, rs = [8, 16, 32], [1, 2, 4]
    q, k, v = qkv(1, 4, 32, 4, seed=3, requires_grad=True)
    exact = dilated_attention(q, k, v, ws, rs)
    detached = dilated_attention(q, k, v, ws, rs, detach_weights=True)
    assert torch.allclose(exact, detached, atol=TOL, rtol=0), report("detached forward", detached, exact)
    oracle = log_count_attention(q, k, v, count_oracle(4, 32, ws, rs, False))
    g_oracle = torch.autograd.grad(oracle.square().sum(), q)[0]
    g_detached = torch.autograd.grad(detached.square().sum(), q)[0]
    assert (g_detached - g_oracle).abs().max() > 1e-3, "detached alpha should not give the combined gradient"
    g_exact = torch.autograd.grad(exact.square().sum(), q)[0]
    assert torch.allclose(g_exact, g_oracle, atol=TOL, rtol=0), report("differentiable alpha dq", g_exact, g_oracle)


@pytest.mark.parametrize("causal", [False, True])
@settings(deadline=None, max_examples=15)
@given(T=st.integers(1, 50), w=st.integers(1, 20), extra=st.integers(0, 20), seed=st.integers(0, 99))
def test_one_pattern_without_dilation_is_block_diagonal_attention(causal, T, w, extra, seed):
    """r = 1 attends within segments: a block-diagonal mask of w-blocks; one segment of w >= T, dense attention."""
    q, k, v = qkv(2, 3, T, 4, seed)
    block = torch.arange(T)[:, None] // w == torch.arange(T)[None, :] // w
    got = dilated_attention(q, k, v, [w], [1], causal=causal)
    want = attention(q, k, v, block, causal=causal)
    assert torch.allclose(got, want, atol=TOL, rtol=0), report("r = 1 vs block-diagonal mask", got, want)
    got = dilated_attention(q, k, v, [T + extra], [1], causal=causal)
    want = attention(q, k, v, causal=causal)
    assert torch.allclose(got, want, atol=TOL, rtol=0), report("w >= T, r = 1 vs dense", got, want)


def test_later_keys_and_values_never_change_earlier_outputs_when_causal():
    q, k, v = qkv(1, 4, 37, 4, seed=5)
    ws, rs = [8, 16, 32], [1, 2, 4]
    before = dilated_attention(q, k, v, ws, rs, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20:] += 100.0
    v2[:, :, 20:] -= 100.0
    after = dilated_attention(q, k2, v2, ws, rs, causal=True)
    assert torch.equal(before[:, :, :20], after[:, :, :20]), "causal outputs at t < 20 changed"
    assert not torch.equal(before[:, :, 20:], after[:, :, 20:]), "the perturbation must reach t >= 20"


def test_padded_keys_of_a_short_last_segment_get_no_weight():
    # T = 10, w = 8: the last segment holds 2 real rows; 6 padded zero keys would give score 0 and absorb mass
    q, k, v = qkv(1, 1, 10, 4, seed=7)
    got = dilated_attention(q, k, v, [8], [1])
    want = attention(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:])
    assert torch.allclose(got[:, :, 8:], want, atol=TOL, rtol=0), report("short last segment", got[:, :, 8:], want)


@pytest.mark.parametrize("H, r", [(4, 4), (8, 2), (6, 4), (2, 4)])
def test_each_head_keeps_exactly_its_offset_rows(H, r):
    T, w = 32, 16
    q, k, v = qkv(1, H, T, 2, seed=1)
    _, lse = dilated_branch(q, k, v, w, r)
    covered = torch.isfinite(lse[0])  # (H, T)
    for j in range(H):
        want = torch.arange(T) % r == j % r
        assert torch.equal(covered[j], want), f"head {j}: kept rows {covered[j].nonzero().flatten().tolist()}"
    per_row = covered.sum(0)  # heads that query each position
    if H >= r and H % r == 0:
        assert torch.all(per_row == H // r), f"each position must be queried by H/r heads, got {per_row.tolist()}"
    if H < r:
        assert torch.all(per_row[torch.arange(T) % r >= H] == 0), "offsets >= H are never queried when H < r"


def test_a_query_no_pattern_covers_gets_zero():
    q, k, v = qkv(1, 2, 16, 3, seed=2)  # H = 2 < r = 4: rows with index 2, 3 (mod 4) are never queried
    out = dilated_attention(q, k, v, [8], [4])
    rows = torch.arange(16) % 4 >= 2
    assert torch.equal(out[:, :, rows], torch.zeros_like(out[:, :, rows])), "uncovered queries must output 0"
    assert not torch.isnan(out).any()


def test_merge_of_one_branch_is_that_branch_and_of_disjoint_branches_is_a_selection():
    q, k, v = qkv(1, 2, 12, 3, seed=4)
    o, lse = dilated_branch(q, k, v, 4, 2)
    assert torch.allclose(merge_by_lse([o], [lse]), o, atol=TOL, rtol=0)
    lse_a = torch.where(torch.arange(12) < 6, lse, -math.inf)
    lse_b = torch.where(torch.arange(12) >= 6, lse, -math.inf)
    merged = merge_by_lse([o, 2 * o], [lse_a, lse_b])
    want = torch.where((torch.arange(12) < 6)[:, None], o, 2 * o)
    assert torch.allclose(merged, want, atol=TOL, rtol=0), report("disjoint merge", merged, want)


def test_merge_equals_attention_over_the_union_of_two_key_sets():
    # split-KV: attention over keys [0, 7) and [7, 15) separately, merged by LSE, is attention over all 15
    q, k, v = qkv(1, 2, 15, 4, seed=6)
    parts = []
    for lo, hi in ((0, 7), (7, 15)):
        s = q @ k[:, :, lo:hi].transpose(-2, -1) / 2.0
        parts.append((torch.softmax(s, -1) @ v[:, :, lo:hi], torch.logsumexp(s, -1)))
    merged = merge_by_lse([o for o, _ in parts], [lse for _, lse in parts])
    want = attention(q, k, v)
    assert torch.allclose(merged, want, atol=TOL, rtol=0), report("split-KV merge", merged, want)


def test_score_entries_are_linear_in_the_sequence_length():
    ws, rs = [64, 128, 256], [1, 2, 4]
    assert num_score_entries(256, ws, rs) == 28_672  # 4*64^2 + 2*64^2 + 1*64^2
    assert num_score_entries(2048, ws, rs) == 229_376
    for T in (256, 512, 1024, 4096):
        assert num_score_entries(2 * T, ws, rs) == 2 * num_score_entries(T, ws, rs)


def test_geometric_patterns_follow_w0_a_power_i():
    assert geometric_patterns(64, 4, 3) == ((64, 256, 1024), (1, 4, 16))
    assert geometric_patterns(2048, 2, 2) == ((2048, 4096), (1, 2))
    with pytest.raises(ValueError, match="a: must be an integer >= 2"):
        geometric_patterns(64, 1, 3)


def test_head_offsets_are_j_mod_r():
    assert head_offsets(6, 4).tolist() == [0, 1, 2, 3, 0, 1]
    assert head_offsets(3, 1).tolist() == [0, 0, 0]


@pytest.mark.parametrize("ws, rs, match", [
    ([8, 16], [1], "same number"), ([], [], "same number"), ([8], [3], "r must divide"),
    ([0], [1], "positive integer"), ([8], [1.0], "positive integer"), ([True], [1], "positive integer")])
def test_bad_patterns_raise_value_error_naming_the_rule(ws, rs, match):
    with pytest.raises(ValueError, match=match):
        check_patterns(ws, rs)
    q, k, v = qkv(1, 1, 8, 2)
    with pytest.raises(ValueError, match=match):
        dilated_attention(q, k, v, ws, rs)


def test_mismatched_shapes_raise_value_error():
    q, k, v = qkv(1, 1, 8, 2)
    with pytest.raises(ValueError, match="same shape"):
        dilated_attention(q, k[:, :, :4], v, [4], [1])


def test_part_swapped_in_one_line_trains_and_rejects_masks_and_cache():
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=16, block_size=32, n_layers=2, d_model=32, n_heads=4)
    model = Transformer(config, attention=longnet([8, 16, 32], [1, 2, 4]))
    assert isinstance(model.blocks[0].attn, DilatedAttention)
    x = torch.randint(0, 16, (4, 32))
    losses = fit(model, FunctionTask(lambda step: (x[:, :-1], x[:, 1:])), 8,
                 optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3))
    assert losses[-1] < losses[0] - 0.1, f"loss did not fall: {losses}"
    with pytest.raises(ValueError, match="cache"):
        model.generate(x[:, :4], 2)
    assert model.generate(x[:, :4], 2, use_cache=False).shape == (4, 6)
    with pytest.raises(ValueError, match="allowed"):
        model(x, allowed=torch.ones(32, 32, dtype=torch.bool))


def test_part_attention_equals_the_function_on_its_projections():
    torch.manual_seed(1)
    config = TransformerConfig(vocab_size=16, block_size=16, n_layers=1, d_model=8, n_heads=2)
    part = DilatedAttention(config, segment_lengths=[4, 8], dilation_rates=[1, 2]).double()
    x = torch.randn(2, 13, 8, dtype=torch.float64)
    q, k, v = (part.split_heads(p(x)) for p in (part.q_proj, part.k_proj, part.v_proj))
    y = dilated_attention(q, k, v, [4, 8], [1, 2], causal=True).transpose(1, 2).reshape(2, 13, 8)
    want = part.out_proj(y)
    got = part(x, causal=True)
    assert torch.allclose(got, want, atol=TOL, rtol=0), report("part vs function", got, want)
    with pytest.raises(ValueError, match="r must divide"):
        longnet([6], [4])(config)
