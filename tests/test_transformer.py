"""Property tests for nanomodels.transformer: config validation, parts, causality, KV cache, sampling."""

import pytest
import torch

from nanomodels.attention import attention, sdpa_attention
from nanomodels.transformer import (PostNorm, PreNorm, Transformer, TransformerConfig, sample_next_token)


def tiny(**overrides):
    cfg = dict(vocab_size=37, block_size=16, n_layers=2, d_model=32, n_heads=4)
    cfg.update(overrides)
    return TransformerConfig(**cfg)


def model64(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(tiny(), **kw).double().eval()


@pytest.mark.parametrize("field,value,rule", [
    ("vocab_size", 0, "positive integer"), ("block_size", -1, "positive integer"), ("n_layers", 1.5, "positive"),
    ("d_model", 0, "positive integer"), ("n_heads", 5, "must divide d_model"), ("d_ff", 0, "positive integer"),
    ("dropout", 1.0, r"\[0, 1\)"),
])
def test_impossible_config_raises_naming_field_and_rule(field, value, rule):
    with pytest.raises(ValueError, match=f"{field}: .*{rule}"):
        tiny(**{field: value})


def test_d_ff_defaults_to_four_times_width():
    assert tiny().d_ff == 128


def test_prenorm_with_zero_sublayer_is_identity_and_postnorm_is_layernorm():
    cfg = tiny()
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    zero = lambda h: torch.zeros_like(h)  # noqa: E731
    assert torch.equal(PreNorm(cfg).double()(x, zero), x)
    expected = torch.nn.functional.layer_norm(x, (32,))
    assert torch.allclose(PostNorm(cfg).double()(x, zero), expected, atol=1e-12)


def test_final_norm_only_for_prenorm():
    assert isinstance(Transformer(tiny()).final_norm, torch.nn.LayerNorm)
    assert isinstance(Transformer(tiny(), residual=PostNorm).final_norm, torch.nn.Identity)


def test_logits_at_t_do_not_depend_on_later_tokens():
    m = model64()
    idx = torch.randint(0, 37, (2, 10))
    base, _ = m(idx)
    for t in range(9):
        other = idx.clone()
        other[:, t + 1:] = (other[:, t + 1:] + 1) % 37
        out, _ = m(other)
        assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-12), f"position <= {t} saw the future"


def test_bidirectional_forward_does_see_later_tokens():
    m = model64()
    idx = torch.randint(0, 37, (1, 8))
    other = idx.clone()
    other[0, -1] = (other[0, -1] + 1) % 37
    a, _ = m(idx, causal=False)
    b, _ = m(other, causal=False)
    assert not torch.allclose(a[0, 0], b[0, 0]), "without the causal mask position 0 must see position 7"


@pytest.mark.parametrize("residual", [PreNorm, PostNorm])
def test_reference_and_sdpa_attention_give_same_model_output(residual):
    idx = torch.randint(0, 37, (2, 12))
    ref, _ = model64(attention_fn=attention, residual=residual)(idx)
    fast, _ = model64(attention_fn=sdpa_attention, residual=residual)(idx)
    assert torch.allclose(ref, fast, atol=1e-10), f"max diff {(ref - fast).abs().max():.3g}"


def test_incremental_decoding_with_cache_equals_full_recompute():
    m = model64()
    idx = torch.randint(0, 37, (3, 12))
    full, _ = m(idx)
    cache = [{} for _ in m.blocks]
    parts = [m(idx[:, :5], cache=cache)[0]] + [m(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 12)]
    step = torch.cat(parts, dim=1)
    assert torch.allclose(step, full, atol=1e-10), f"max diff {(step - full).abs().max():.3g}"


@pytest.mark.parametrize("new", [5, 30])  # 30 runs past block_size (16): the window slides
def test_generate_with_cache_equals_without(new):
    m = model64()
    idx = torch.randint(0, 37, (2, 4))
    greedy = [m.generate(idx, new, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(*greedy)
    sampled = [m.generate(idx, new, temperature=0.8, top_k=5, use_cache=c,
                          generator=torch.Generator().manual_seed(7)) for c in (True, False)]
    assert torch.equal(*sampled)
    assert sampled[0].shape == (2, 4 + new)


def test_loss_ignores_minus_100_targets():
    m = model64()
    idx = torch.randint(0, 37, (2, 6))
    targets = torch.randint(0, 37, (2, 6))
    targets[:, :3] = -100
    logits, loss = m(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 3:].reshape(-1, 37), targets[:, 3:].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-12)


def test_too_long_sequence_and_bad_positions_raise_clear_errors():
    m = model64()
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="positions: "):
        m(torch.zeros(1, 4, dtype=torch.long), positions=torch.tensor([0, 1, 2, 16]))
    with pytest.raises(ValueError, match=r"idx: token ids must be in \[0, vocab_size=37\), got values in \[0, 37\]"):
        m(torch.tensor([[0, 37]]))
    with pytest.raises(ValueError, match=r"idx: expected token ids of shape \(B, T\)"):
        m(torch.zeros(4, dtype=torch.long))


def test_explicit_positions_equal_default_positions():
    m = model64()
    idx = torch.randint(0, 37, (1, 6))
    assert torch.equal(m(idx)[0], m(idx, positions=torch.arange(6))[0])


def test_head_is_tied_to_token_embedding():
    m = Transformer(tiny())
    assert m.head.proj.weight is m.wte.weight
    assert Transformer(tiny(tie_weights=False)).head.proj.weight is not Transformer(tiny()).wte.weight


def test_greedy_and_top1_are_argmax():
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next_token(logits, 0.0), logits.argmax(-1, keepdim=True))
    assert torch.equal(sample_next_token(logits, 1.5, top_k=1), logits.argmax(-1, keepdim=True))


def test_top_k_never_samples_outside_the_k_largest():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0]]).repeat(2000, 1)
    draws = sample_next_token(logits, 2.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(draws.flatten().tolist()) == {1, 3}


def test_temperature_sharpens_and_flattens_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(20000, 1)
    for temperature in (0.5, 2.0):
        draws = sample_next_token(logits, temperature, generator=torch.Generator().manual_seed(1)).flatten()
        freq = torch.bincount(draws, minlength=3).double() / len(draws)
        expected = torch.softmax(logits[0].double() / temperature, dim=-1)
        assert torch.allclose(freq, expected, atol=0.015), f"T={temperature}: {freq} vs {expected}"
