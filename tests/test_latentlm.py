"""LatentLM on the core Transformer: causality (h_i never sees z_i), batch_mul (one backbone run, B * mul * L head
rows), zero-init start, class dropout for CFG, and KV-cache sampling equal to recomputing the prefix. float64."""

import pytest
import torch

from nanomodels.latentlm import LatentLM
from nanomodels.transformer import TransformerConfig


def _diff(a, b) -> str:
    d = (a - b).abs()
    return f"max |diff| {d.max().item():.3e}, mean {d.mean().item():.3e}"


def _latentlm(**kw):
    torch.manual_seed(0)
    config = TransformerConfig(block_size=16, n_layers=2, d_model=32, n_heads=4)
    return LatentLM(config, latent_dim=3, num_classes=10, head=dict(width=16, batch_mul=4), **kw).double()


def test_latentlm_hidden_state_i_never_sees_latent_i_or_later():
    model = _latentlm()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    z = torch.randn(2, 6, 3, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z_: model.hidden(z_, torch.tensor([1, 4])).sum(0), z)
    jac = jac.abs().sum(dim=(1, 2, 4))  # (L, L) from (L, d, B, L, C): |dh_i / dz_j| summed
    upper = torch.triu(torch.ones(6, 6, dtype=torch.bool))  # j >= i
    assert jac[upper].max() == 0, f"h_i depends on z_j for j >= i: max |grad| {jac[upper].max():.3e}"
    assert (jac[~upper] > 0).all(), "h_i must depend on every z_j with j < i"


def test_latentlm_first_state_depends_only_on_the_class():
    model = _latentlm()
    z1, z2 = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    labels = torch.tensor([2, 7])
    h1, h2 = model.hidden(z1, labels), model.hidden(z2, labels)
    assert torch.equal(h1[:, 0], h2[:, 0])
    assert not torch.allclose(model.hidden(z1, torch.tensor([3, 7]))[0, 0], h1[0, 0])


def test_batch_mul_runs_the_backbone_once_and_the_head_on_B_mul_L_rows():
    model = _latentlm()
    calls, rows = [], []
    model.model.blocks[0].register_forward_hook(lambda m, i, o: calls.append(1))
    model.model.head.x_embed.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    model(torch.randn(3, 5, 3, dtype=torch.float64), torch.tensor([0, 1, 2]))
    assert calls == [1], f"the backbone ran {len(calls)} times for one training step"
    assert rows == [3 * 4 * 5], f"the head saw {rows} rows, expected B * batch_mul * L = 60"


def test_latentlm_initial_loss_is_one_and_it_trains():
    model = _latentlm(class_dropout=0.0)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 5, 3, generator=g, dtype=torch.float64) * 0.3 + torch.linspace(-1, 1, 5)[None, :, None]
    labels = torch.arange(16) % 10
    first = model(z, labels, generator=g).item()
    assert torch.equal(model.model.head.predict(z[0], torch.zeros(5, dtype=torch.long),
                                                model.model.head(model.hidden(z, labels))[0]), torch.zeros(5, 3,
                                                                                               dtype=torch.float64))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(z, labels, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = sum(model(z, labels, generator=g).item() for _ in range(5)) / 5
    assert abs(first - 1) < 0.15 and last < 0.8 * first, f"loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_kv_cache_sampling_equals_recomputing_the_prefix(cfg_scale):
    model = _latentlm().eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    labels = torch.tensor([1, 5, 9])
    kw = dict(num_steps=3, cfg_scale=cfg_scale)
    cached = model.sample(labels, 6, generator=torch.Generator().manual_seed(0), **kw)
    full = model.sample(labels, 6, generator=torch.Generator().manual_seed(0), use_cache=False, **kw)
    assert cached.shape == (3, 6, 3)
    assert torch.allclose(cached, full, rtol=1e-10, atol=1e-10), f"KV cache vs recompute: {_diff(cached, full)}"
    other = model.sample(torch.tensor([2, 6, 0]), 6, generator=torch.Generator().manual_seed(0), **kw)
    assert not torch.allclose(cached, other, atol=1e-3), "samples must depend on the class"


def test_class_dropout_replaces_labels_by_the_null_class_in_training_only():
    model = _latentlm(class_dropout=0.5)
    seen = []
    model.model.embed.register_forward_hook(lambda m, i, o: seen.append(i[2][:, 0].clone()))
    z, labels = torch.randn(400, 2, 3, dtype=torch.float64), torch.full((400,), 3)
    model(z, labels, generator=torch.Generator().manual_seed(0))
    share = (seen[-1] == 10).float().mean().item()
    assert abs(share - 0.5) < 0.1 and set(seen[-1].tolist()) == {3, 10}, f"null share {share:.2f}"
    model.eval()
    model(z, labels)
    assert (seen[-1] == 3).all(), "no class dropout in eval mode"


def test_latentlm_rejects_bad_inputs():
    model = _latentlm()
    with pytest.raises(ValueError, match="z"):
        model(torch.zeros(2, 4, 5, dtype=torch.float64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        model(torch.zeros(2, 4, 3, dtype=torch.float64), torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="class_dropout"):
        _latentlm(class_dropout=1.0)
