"""torchscale's dilated attention as nanomodels/dilated.py reproduces it: the head offsets of its diagonal trick,
the padding, the row shift when r does not divide w, the detached mixing weights. float64."""

import math

import pytest
import torch

from nanomodels.dilated import dilated_attention, torchscale_dilated_attention, torchscale_head_offsets

F64 = torch.float64


def diagonal_trick_offsets(H, r):
    """torchscale's dense_to_sparse on positions: pad heads to a multiple of r, view (l r1) x (r2 h), keep the
    r1 == r2 diagonal, heads back as (r h), cut the padded heads; the row each head keeps in the first r rows."""
    l = r * 2
    x = torch.arange(l, dtype=F64)[None, :, None, None].expand(1, l, H, 1)  # x[b, pos, head, 0] = pos
    hp = -(-H // r) * r
    x = torch.nn.functional.pad(x, (0, 0, 0, hp - H))
    x = x.reshape(1, l // r, r, r, hp // r, 1)  # b, l, r1, r2, h, d
    x = torch.diagonal(x, dim1=2, dim2=3)  # (b, l, h, d, r): element [..., i] has r1 = r2 = i
    x = x.permute(0, 1, 4, 2, 3).reshape(1, l // r, hp, 1)[:, :, :H]  # b l (r h) d
    return x[0, 0, :, 0].long()


@pytest.mark.parametrize("H", range(1, 13))
@pytest.mark.parametrize("r", [1, 2, 3, 4, 5, 8])
def test_head_offsets_are_those_of_torchscales_diagonal_trick(H, r):
    assert torch.equal(torchscale_head_offsets(H, r), diagonal_trick_offsets(H, r)), (H, r)


def test_six_heads_four_offsets_leave_offset_three_unqueried():
    assert torchscale_head_offsets(6, 4).tolist() == [0, 0, 1, 1, 2, 2]


def log_count_oracle(q, k, v, patterns, offsets):
    """Dense attention with the bias log count(q, k) for the given per-pattern offsets (every key real)."""
    T = q.size(2)
    t = torch.arange(T)
    count = 0
    for (w, r), s in zip(patterns, offsets):
        same = (t[:, None] // w) == (t[None, :] // w)
        count = count + torch.stack([same & (t[:, None] % r == o) & (t[None, :] % r == o) for o in s.tolist()]).double()
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + torch.log(count)
    out = torch.softmax(scores.masked_fill(count == 0, -math.inf), dim=-1) @ v
    return torch.nan_to_num(out)  # a query no pattern keeps gets 0


def qkv(B, H, T, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=F64) for _ in range(3)]


@pytest.mark.parametrize("H", [2, 4, 6])
def test_without_padding_torchscale_is_the_log_count_mixture_with_its_offsets(H):
    patterns = ((8, 1), (16, 2), (32, 4))
    q, k, v = qkv(2, H, 32, 8, 0)
    got = torchscale_dilated_attention(q, k, v, *zip(*patterns))
    want = log_count_oracle(q, k, v, patterns, [torchscale_head_offsets(H, r) for _, r in patterns])
    assert (got - want).abs().max() < 1e-12, f"max |diff| {(got - want).abs().max():.3g}"


def test_patterns_with_w_at_least_T_and_r_dividing_T_are_never_padded():
    q, k, v = qkv(1, 4, 40, 8, 1)
    args = (q, k, v, (64, 128), (2, 4))
    assert torch.equal(torchscale_dilated_attention(*args), torchscale_dilated_attention(*args, mask_padding=True))


def test_w_below_T_not_dividing_it_attends_to_zero_keys_in_the_last_segment_only():
    q, k, v = qkv(1, 4, 40, 8, 2)
    zero_keys = torchscale_dilated_attention(q, k, v, (32,), (1,))
    masked = torchscale_dilated_attention(q, k, v, (32,), (1,), mask_padding=True)
    assert torch.equal(zero_keys[:, :, :32], masked[:, :, :32]), "the full first segment has no padding"
    assert (zero_keys[:, :, 32:] - masked[:, :, 32:]).abs().amin() > 0, "every row of the short segment changes"


def test_r_not_dividing_w_shifts_the_later_segments_rows():
    q, k, v = qkv(1, 3, 20, 8, 3)
    out = torchscale_dilated_attention(q, k, v, (10,), (3,))
    second = torchscale_dilated_attention(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], (10,), (3,))
    assert torch.equal(out[:, :, 12:20], second[:, :, 0:8]), "rows 12-19 carry rows 10-17's results"


def test_with_equal_offsets_torchscale_is_dilated_attention_with_detached_weights_forward_and_backward():
    q, k, v = (x.requires_grad_() for x in qkv(2, 4, 32, 8, 4))
    patterns = ((8, 16, 32), (1, 4, 4))  # r in {1, H}: j // ceil(H / r) = j mod r
    ts = torchscale_dilated_attention(q, k, v, *patterns)
    ours = dilated_attention(q, k, v, *patterns, detach_weights=True)
    g_ts = torch.autograd.grad(ts.square().sum(), (q, k, v))
    g_ours = torch.autograd.grad(ours.square().sum(), (q, k, v))
    assert (ts - ours).abs().max() < 1e-12
    assert max((a - b).abs().max().item() for a, b in zip(g_ts, g_ours)) < 1e-12
