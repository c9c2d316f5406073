"""Gated retention with a constant decay is chapter 10's retention: log_decay = log gamma_h at every token gives
retention_parallel's (Q K^T ⊙ D) V, and the recurrent forms carry the same state (float64)."""

import pytest
import torch

from nanomodels.retnet import retention_parallel, retention_recurrent
from nanomodels.yoco import gated_retention, gated_retention_chunkwise, gated_retention_recurrent

TOL = 1e-10


def inputs(B, H, T, Dk, Dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, Dk, dtype=torch.float64, generator=g) for _ in range(2))
    v = torch.randn(B, H, T, Dv, dtype=torch.float64, generator=g)
    gamma = torch.rand(H, dtype=torch.float64, generator=g) * 0.98 + 0.01  # in (0, 1)
    return q, k, v, gamma


@pytest.mark.parametrize("B, H, T, Dk, Dv", [(1, 1, 1, 1, 1), (2, 3, 7, 4, 5), (1, 2, 16, 3, 2)])
def test_constant_log_decay_equals_retention_parallel(B, H, T, Dk, Dv):
    q, k, v, gamma = inputs(B, H, T, Dk, Dv, seed=T)
    log_decay = gamma.log()[None, :, None].expand(B, H, T)
    want = retention_parallel(q, k, v, gamma)
    for got in (gated_retention(q, k, v, log_decay), gated_retention_chunkwise(q, k, v, log_decay, 3)[0]):
        diff = (got - want).abs().max().item()
        assert torch.allclose(got, want, rtol=0, atol=TOL), f"gated retention vs retention: max |diff| {diff:.3g}"


def test_constant_log_decay_recurrent_state_equals_retention_recurrent():
    q, k, v, gamma = inputs(2, 3, 9, 4, 2, seed=1)
    log_decay = gamma.log()[None, :, None].expand(2, 3, 9)
    out, state = gated_retention_recurrent(q, k, v, log_decay)
    want_out, want_state = retention_recurrent(q, k, v, gamma)
    assert torch.allclose(out, want_out, rtol=0, atol=TOL)
    assert torch.allclose(state, want_state, rtol=0, atol=TOL)
