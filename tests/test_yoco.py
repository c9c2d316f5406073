"""YOCO and gated retention against literal oracles, in float64.

Gated retention: the parallel, recurrent and chunkwise forms against a triple loop over the paper's sum, a constant
decay against retention's gamma^(n-m), causality by perturbation. Sliding-window attention against a per-query loop
over its window. The YOCO model: early-exit prefill and incremental decoding against the full forward, the cache
size (independent of the cross-decoder's depth, the window's bound), causality, gradients, config validation.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nanomodels.attention import MultiHeadAttention
from nanomodels.yoco import (YOCO, GatedRetention, SlidingWindowAttention, YOCOConfig, gated_retention,
                             gated_retention_chunkwise, gated_retention_recurrent, shared_kv_cross_decoder,
                             sliding_window_mask)

TOL = 1e-10
CHAPTER = "11"  # tests/conftest.py runs its graded checks as `graded_check`


def report(name, got, want):
    diff = (got - want).abs()
    return f"{name}: max |diff| {diff.max().item():.3g}, mean {diff.mean().item():.3g}"


def inputs(B, H, T, Dk, Dv, seed=0, zero_decay_every=0):
    """q, k (B, H, T, Dk), v (B, H, T, Dv), log_decay (B, H, T) <= 0 in float64 (some exactly 0 if asked)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, Dk, dtype=torch.float64, generator=g) for _ in range(2))
    v = torch.randn(B, H, T, Dv, dtype=torch.float64, generator=g)
    log_decay = -2 * torch.rand(B, H, T, dtype=torch.float64, generator=g)
    if zero_decay_every:
        log_decay[..., ::zero_decay_every] = 0.0
    return q, k, v, log_decay


def naive_gated_retention(q, k, v, log_decay):
    """The paper's sum, one term at a time: o_n = sum_{m <= n} exp(sum_{j=m+1..n} log_decay_j) (q_n . k_m) v_m."""
    B, H, T, _ = q.shape
    out = torch.zeros(B, H, T, v.size(-1), dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for n in range(T):
                for m in range(n + 1):
                    decay = math.exp(sum(log_decay[b, h, j].item() for j in range(m + 1, n + 1)))
                    out[b, h, n] += decay * torch.dot(q[b, h, n], k[b, h, m]) * v[b, h, m]
    return out


shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(0, 9), st.integers(1, 4), st.integers(1, 4))


# ---- gated retention: three forms, one function ---------------------------------------------------------------

@given(shape=shapes, seed=st.integers(0, 2**16), zero_every=st.sampled_from([0, 1, 3]))
def test_gated_retention_parallel_equals_naive_loop(shape, seed, zero_every):
    q, k, v, g = inputs(*shape, seed=seed, zero_decay_every=zero_every)
    got, want = gated_retention(q, k, v, g), naive_gated_retention(q, k, v, g)
    assert got.shape == want.shape and got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=0, atol=TOL), report("parallel vs naive", got, want)


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_gated_retention_recurrent_equals_parallel(shape, seed):
    q, k, v, g = inputs(*shape, seed=seed)
    out, state = gated_retention_recurrent(q, k, v, g)
    want = gated_retention(q, k, v, g)
    assert torch.allclose(out, want, rtol=0, atol=TOL), report("recurrent vs parallel", out, want)
    B, H, T, Dk = q.shape
    assert state.shape == (B, H, Dk, v.size(-1))


@given(shape=shapes, seed=st.integers(0, 2**16), chunk=st.sampled_from(["1", "3", "T", ">T"]))
def test_gated_retention_chunkwise_equals_recurrent_for_any_chunk_size(shape, seed, chunk):
    q, k, v, g = inputs(*shape, seed=seed)
    T = q.size(2)
    chunk_size = {"1": 1, "3": 3, "T": max(T, 1), ">T": T + 2}[chunk]
    out, state = gated_retention_chunkwise(q, k, v, g, chunk_size)
    want_out, want_state = gated_retention_recurrent(q, k, v, g)
    assert torch.allclose(out, want_out, rtol=0, atol=TOL), report("chunkwise vs recurrent", out, want_out)
    assert torch.allclose(state, want_state, rtol=0, atol=TOL), report("chunkwise state", state, want_state)


@pytest.mark.parametrize("form", ["recurrent", "chunkwise"])
def test_an_empty_sequence_returns_a_new_state_equal_to_the_given_one(form):
    q, k, v, g = (t[:, :, :0] for t in inputs(2, 3, 5, 4, 3, seed=0))
    state = torch.randn(2, 3, 4, 3, dtype=torch.float64)
    fn = gated_retention_recurrent if form == "recurrent" else (
        lambda *a, state=None: gated_retention_chunkwise(*a, chunk_size=3, state=state))
    out, new = fn(q, k, v, g, state=state)
    assert out.shape == (2, 3, 0, 3)
    assert torch.equal(new, state) and new.data_ptr() != state.data_ptr()  # a caller may update either in place


@pytest.mark.parametrize("form", ["recurrent", "chunkwise"])
@pytest.mark.parametrize("split", [0, 1, 4, 7])
def test_gated_retention_state_continues_the_sequence(form, split):
    q, k, v, g = inputs(2, 3, 7, 4, 3, seed=split)
    fn = gated_retention_recurrent if form == "recurrent" else (
        lambda *a, state=None: gated_retention_chunkwise(*a, chunk_size=3, state=state))
    first, state = fn(q[:, :, :split], k[:, :, :split], v[:, :, :split], g[:, :, :split])
    second, state = fn(q[:, :, split:], k[:, :, split:], v[:, :, split:], g[:, :, split:], state=state)
    whole, whole_state = fn(q, k, v, g)
    got = torch.cat([first, second], dim=2)
    assert torch.allclose(got, whole, rtol=0, atol=TOL), report("two halves vs whole", got, whole)
    assert torch.allclose(state, whole_state, rtol=0, atol=TOL)


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_constant_log_decay_is_retention_with_gamma_powers(shape, seed):
    """log_decay = log gamma_h at every token: (Q K^T ⊙ D) V with D[n, m] = gamma_h^(n - m), n >= m."""
    q, k, v, _ = inputs(*shape, seed=seed)
    B, H, T, _ = q.shape
    gamma = torch.linspace(0.5, 0.99, H, dtype=torch.float64)
    n = torch.arange(T, dtype=torch.float64)
    D = (gamma[:, None, None] ** (n[:, None] - n[None, :])).tril()  # float exponents keep float64
    want = ((q @ k.transpose(-2, -1)) * D) @ v
    log_decay = gamma.log()[None, :, None].expand(B, H, T)
    got = gated_retention(q, k, v, log_decay)
    assert torch.allclose(got, want, rtol=0, atol=TOL), report("constant decay vs retention", got, want)


def test_zero_log_decay_is_causal_linear_attention():
    q, k, v, g = inputs(2, 2, 6, 3, 4)
    got = gated_retention(q, k, v, torch.zeros_like(g))
    want = ((q @ k.transpose(-2, -1)).tril()) @ v
    assert torch.allclose(got, want, rtol=0, atol=TOL), report("gamma = 1 vs linear attention", got, want)


@pytest.mark.parametrize("form", ["parallel", "recurrent", "chunkwise"])
@pytest.mark.parametrize("t", [0, 3, 6])
def test_gated_retention_is_causal_by_perturbation(form, t):
    """Changing q, k, v and the decay at position t leaves every output before t exactly unchanged."""
    fn = {"parallel": lambda *a: gated_retention(*a),
          "recurrent": lambda *a: gated_retention_recurrent(*a)[0],
          "chunkwise": lambda *a: gated_retention_chunkwise(*a, chunk_size=4)[0]}[form]
    q, k, v, g = inputs(1, 2, 7, 3, 3, seed=1)
    before = fn(q, k, v, g)
    q2, k2, v2, g2 = (x.clone() for x in (q, k, v, g))
    for x in (q2, k2, v2):
        x[:, :, t] += 10.0
    g2[:, :, t] = -5.0
    after = fn(q2, k2, v2, g2)
    assert torch.equal(after[:, :, :t], before[:, :, :t]), f"{form}: position {t} leaked into the past"
    assert not torch.allclose(after[:, :, t], before[:, :, t])


def test_gated_retention_gradients_match_between_forms():
    q, k, v, g = (x.requires_grad_() for x in inputs(1, 2, 7, 3, 2, seed=2))
    grads = []
    for fn in (lambda: gated_retention(q, k, v, g),
               lambda: gated_retention_chunkwise(q, k, v, g, chunk_size=3)[0]):
        grads.append(torch.autograd.grad(fn().square().sum(), (q, k, v, g)))
    for name, a, b in zip("qkvg", *grads):
        assert torch.allclose(a, b, rtol=0, atol=TOL), report(f"d/d{name}", a, b)


@pytest.mark.parametrize("fn", [gated_retention, gated_retention_recurrent,
                                lambda *a, **kw: gated_retention_chunkwise(*a, chunk_size=2, **kw)])
def test_gated_retention_rejects_bad_inputs(fn):
    q, k, v, g = inputs(1, 2, 5, 3, 4)
    with pytest.raises(ValueError, match="q, k"):
        fn(q, k[..., :2], v, g)
    with pytest.raises(ValueError, match="v:"):
        fn(q, k, v[:, :, :4], g)
    with pytest.raises(ValueError, match="log_decay"):
        fn(q, k, v, g[..., :4])
    bad = g.clone()
    bad[0, 1, 2] = 0.1
    with pytest.raises(ValueError, match="log_decay"):
        fn(q, k, v, bad)
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="log_decay"):
        fn(q, k, v, bad)


def test_recurrent_forms_reject_bad_state_and_chunk_size():
    q, k, v, g = inputs(1, 2, 5, 3, 4)
    with pytest.raises(ValueError, match="state"):
        gated_retention_recurrent(q, k, v, g, state=torch.zeros(1, 2, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="state"):
        gated_retention_chunkwise(q, k, v, g, 2, state=torch.zeros(1, 2, 4, 3, dtype=torch.float64))
    for chunk_size in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="chunk_size"):
            gated_retention_chunkwise(q, k, v, g, chunk_size)


# ---- sliding-window attention ------------------------------------------------------------------------------

@pytest.mark.parametrize("n_queries, n_keys, window", [(6, 6, 1), (6, 6, 3), (6, 6, 9), (1, 5, 3), (3, 7, 4)])
def test_sliding_window_mask_is_the_causal_band(n_queries, n_keys, window):
    mask = sliding_window_mask(n_queries, window, n_keys)
    for i in range(n_queries):
        position = i + n_keys - n_queries
        for j in range(n_keys):
            assert bool(mask[i, j]) == (position - window < j <= position), (i, j)


def model_config(**overrides):
    fields = dict(vocab_size=13, block_size=24, d_model=16, n_heads=2, n_self_layers=2, n_cross_layers=2,
                  window=3, chunk_size=3)
    return YOCOConfig(**{**fields, **overrides})


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    return YOCO(model_config(**overrides)).double().eval()


def tokens(B, T, seed=0, vocab=13):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("window", [1, 3, 20])
def test_sliding_window_attention_equals_a_loop_over_each_window(window):
    """Each query's softmax over exactly its last `window` positions, from the layer's own projections."""
    attn = SlidingWindowAttention(model_config(window=window)).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(window))
    B, T, C = x.shape
    q, k, v = (attn.split_heads(p(x)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    rows = []
    for n in range(T):
        keys = slice(max(0, n - window + 1), n + 1)
        w = torch.softmax(q[:, :, n:n + 1] @ k[:, :, keys].transpose(-2, -1) / math.sqrt(C // 2), dim=-1)
        rows.append(w @ v[:, :, keys])
    want = attn.out_proj(torch.cat(rows, dim=2).transpose(1, 2).reshape(B, T, C))
    got = attn(x)
    assert torch.allclose(got, want, rtol=0, atol=TOL), report("sliding window vs loop", got, want)


def test_gated_retention_layer_is_the_papers_gret_with_a_swish_gate():
    """gamma_t = sigmoid(x W_gamma)^(1/16) per head, q scaled by Dk^(-1/2), per-head RMSNorm (no affine, eps 1e-5),
    then (swish(x W_G) ⊙ o) W_O; the retention itself from the naive loop."""
    layer = GatedRetention(model_config()).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    B, T, C = x.shape
    q, k, v = (p(x).view(B, T, 2, 8).transpose(1, 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    gamma = torch.sigmoid(layer.gt_proj(x)).transpose(1, 2) ** (1 / 16)  # (B, H, T)
    o = naive_gated_retention(q / math.sqrt(8), k, v, gamma.log())
    o = o / torch.sqrt(o.square().mean(-1, keepdim=True) + 1e-5)
    gate = layer.g_proj(x)
    want = layer.out_proj(gate * torch.sigmoid(gate) * o.transpose(1, 2).reshape(B, T, C))
    got = layer(x)
    assert torch.allclose(got, want, rtol=0, atol=TOL), report("gRet layer vs oracle", got, want)


# ---- the YOCO model -----------------------------------------------------------------------------------------

KINDS = ["gated_retention", "sliding_window"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 2, 9])
def test_early_exit_prefill_equals_full_forward_at_the_last_position(kind, T):
    model, idx = build(self_attention=kind), tokens(2, T)
    logits, _ = model.prefill(idx)
    want = model(idx)[:, -1]
    assert logits.shape == (2, 13)
    assert torch.allclose(logits, want, rtol=0, atol=TOL), report("prefill vs forward", logits, want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prompt", [1, 4, 7])
def test_prefill_then_steps_equal_full_forward(kind, prompt):
    """Past the window (3) and across chunks (3): every step's logits are forward's at that position."""
    model, idx = build(self_attention=kind), tokens(2, 12, seed=prompt)
    full = model(idx)
    logits, cache = model.prefill(idx[:, :prompt])
    assert torch.allclose(logits, full[:, prompt - 1], rtol=0, atol=TOL)
    for t in range(prompt, idx.size(1)):
        logits, cache = model.step(idx[:, t:t + 1], cache)
        assert torch.allclose(logits, full[:, t], rtol=0, atol=TOL), report(f"step at {t}", logits, full[:, t])
    assert cache["pos"] == idx.size(1)


def test_gated_retention_model_does_not_depend_on_the_chunk_size():
    idx = tokens(2, 12)
    want = build(chunk_size=12)(idx)  # one chunk: the parallel form
    for chunk_size in (1, 5, 64):
        got = build(chunk_size=chunk_size)(idx)
        assert torch.allclose(got, want, rtol=0, atol=TOL), report(f"chunk {chunk_size} vs one chunk", got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_step_leaves_the_given_cache_unchanged(kind):
    model, idx = build(self_attention=kind), tokens(1, 6)
    _, cache = model.prefill(idx[:, :5])
    kept = {"k": cache["k"].clone(), "self": [{n: t.clone() for n, t in c.items()} for c in cache["self"]]}
    first, _ = model.step(idx[:, 5:6], cache)
    again, _ = model.step(idx[:, 5:6], cache)
    assert torch.equal(first, again) and cache["pos"] == 5 and torch.equal(cache["k"], kept["k"])
    for c, c_kept in zip(cache["self"], kept["self"]):
        assert c.keys() == c_kept.keys() and all(torch.equal(c[n], c_kept[n]) for n in c)


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_runs_only_the_last_position_through_the_cross_decoder(kind):
    model, idx = build(self_attention=kind), tokens(2, 9)
    seen = []
    for layer in model.cross_layers:
        layer.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    _, cache = model.prefill(idx)
    assert seen == [(2, 1, 16)] * 2, "the cross-decoder runs on the last prompt position only"
    assert cache["k"].shape == cache["v"].shape == (2, 2, 9, 8), "the global KV covers the whole prompt"


@pytest.mark.parametrize("kind", KINDS)
def test_cache_nbytes_does_not_grow_with_cross_depth(kind):
    idx = tokens(2, 10)
    sizes = {n: YOCO.cache_nbytes(build(self_attention=kind, n_cross_layers=n).prefill(idx)[1]) for n in (1, 2, 5)}
    assert len(set(sizes.values())) == 1, sizes
    deeper_self = YOCO.cache_nbytes(build(self_attention=kind, n_self_layers=3).prefill(idx)[1])
    assert deeper_self > sizes[1], "the self-decoder's state is counted"


@pytest.mark.parametrize("kind", KINDS)
def test_cache_nbytes_is_one_global_kv_plus_the_self_decoder_state(kind):
    """B = 2, d = 16, H = 2 heads of 8, 2 self layers, window 3, float64: the bytes, counted by hand."""
    model, idx = build(self_attention=kind), tokens(2, 12)
    _, cache = model.prefill(idx[:, :5])
    for T in range(5, 12):
        per_layer = 2 * 2 * 8 * 8 if kind == "gated_retention" else 2 * 2 * min(T, 3) * 16  # state, or k and v
        assert model.cache_nbytes(cache) == 8 * (2 * 2 * T * 16 + 2 * per_layer)
        _, cache = model.step(idx[:, T:T + 1], cache)


@pytest.mark.parametrize("window", [1, 3, 5])
def test_sliding_window_cache_stays_at_window_positions(window):
    model, idx = build(self_attention="sliding_window", window=window), tokens(2, 12)
    _, cache = model.prefill(idx[:, :2])
    for t in range(2, 12):
        for layer in cache["self"]:
            assert layer["k"].shape == layer["v"].shape == (2, 2, min(t, window), 8)
        _, cache = model.step(idx[:, t:t + 1], cache)
    assert cache["k"].shape == (2, 2, 12, 8), "the global KV keeps every position"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", [0, 4, 8])
def test_yoco_is_causal_by_perturbation(kind, t):
    model, idx = build(self_attention=kind), tokens(2, 9)
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 13
    before, after = model(idx), model(changed)
    assert torch.allclose(after[:, :t], before[:, :t], rtol=0, atol=1e-12), f"token {t} leaked into the past"
    assert not torch.allclose(after[:, t], before[:, t])


def test_sliding_window_longer_than_the_sequence_is_causal_attention():
    """window >= T: the self-decoder's attention is the core's causal MultiHeadAttention with the same weights."""
    model, idx = build(self_attention="sliding_window", window=24), tokens(2, 9)
    got = model(idx)
    for layer in model.self_layers:
        layer.mixer.forward = lambda x, cache=None, m=layer.mixer: MultiHeadAttention.forward(m, x, causal=True)
    want = model(idx)
    assert torch.allclose(got, want, rtol=0, atol=TOL), report("window >= T vs causal", got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_both_halves(kind):
    model = build(self_attention=kind)
    model(tokens(2, 9)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"
    assert any(n.startswith("self_layers.") for n, _ in model.named_parameters())
    assert any(n.startswith("cross_layers.") for n, _ in model.named_parameters())


def test_cross_layers_own_queries_and_share_one_key_value_projection():
    names = [n for n, _ in build().named_parameters()]
    assert [n for n in names if n.endswith(("k_proj.weight", "v_proj.weight")) and "self_layers" not in n] == \
        ["k_proj.weight", "v_proj.weight"]
    assert sum(n.startswith("cross_layers.") and n.endswith("mixer.q_proj.weight") for n in names) == 2


@pytest.mark.parametrize("overrides, field", [
    (dict(n_layers=5, n_self_layers=None, n_cross_layers=None), "n_layers"),
    (dict(n_layers=5), "n_layers"),
    (dict(n_self_layers=0), "n_self_layers"),
    (dict(n_cross_layers=-1), "n_cross_layers"),
    (dict(n_layers=3, n_self_layers=3, n_cross_layers=None), "n_cross_layers"),
    (dict(self_attention="dilated"), "self_attention"),
    (dict(window=0), "window"),
    (dict(window=2.5), "window"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(n_heads=3), "n_heads"),
])
def test_bad_configs_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        model_config(**overrides)


def test_layer_split_rule():
    assert (YOCOConfig(n_layers=6).n_self_layers, YOCOConfig(n_layers=6).n_cross_layers) == (3, 3)
    c = YOCOConfig(n_self_layers=2, n_cross_layers=5)
    assert (c.n_layers, c.n_self_layers, c.n_cross_layers) == (7, 2, 5)
    assert YOCOConfig(n_layers=5, n_self_layers=2).n_cross_layers == 3
    assert YOCOConfig(n_cross_layers=3).n_layers == 6
    assert YOCOConfig().n_layers == 4


def test_bad_decoding_inputs_raise_value_error():
    model, idx = build(), tokens(2, 24)
    with pytest.raises(ValueError, match="idx"):
        model.prefill(idx[:, :0])
    with pytest.raises(ValueError, match="idx"):
        model(idx[0])
    _, cache = model.prefill(idx[:, :23])
    with pytest.raises(ValueError, match="idx_t"):
        model.step(idx[:, :2], cache)
    _, cache = model.step(idx[:, 23:], cache)
    with pytest.raises(ValueError, match="block_size"):
        model.step(idx[:, 23:], cache)


@pytest.mark.parametrize("kind", ["gated_retention", "sliding_window"])
def test_generate_with_the_cache_equals_recomputing_and_slides_past_block_size(kind):
    torch.manual_seed(0)
    model = YOCO(YOCOConfig(vocab_size=30, block_size=12, n_layers=2, d_model=16, n_heads=2, self_attention=kind,
                            window=4, chunk_size=5)).double().eval()
    prompt = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(1))
    a = model.generate(prompt, 15, temperature=0, use_cache=True)
    b = model.generate(prompt, 15, temperature=0, use_cache=False)
    assert a.shape == (2, 20) and torch.equal(a, b)
    logits = model(prompt)
    assert torch.allclose(model(prompt[:, :-1], prompt[:, 1:])[1],
                          torch.nn.functional.cross_entropy(model(prompt[:, :-1]).reshape(-1, 30),
                                                            prompt[:, 1:].reshape(-1)), rtol=0, atol=1e-12)
    assert logits.shape == (2, 5, 30)


# ---- the recurrence, the shared-KV cross-decoder, the early-exit prefill: the graded checks ------------------

def test_graded_invariant_holds_for_the_library(graded_check):
    graded_check()


def test_shared_kv_cross_decoder_rejects_bad_n_queries_and_past_kv():
    model = build()
    x = torch.zeros(2, 5, 16, dtype=torch.float64)
    parts = (model.kv_norm, model.k_proj, model.v_proj, model.cross_layers, 2)
    for n_queries in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="n_queries"):
            shared_kv_cross_decoder(x, *parts, n_queries)
    for past_kv in ((torch.zeros(2, 2, 3, 8),), (torch.zeros(2, 1, 3, 8),) * 2, (torch.zeros(2, 2, 3, 4),) * 2):
        with pytest.raises(ValueError, match="past_kv"):
            shared_kv_cross_decoder(x, *parts, None, past_kv)
