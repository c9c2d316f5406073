"""Property tests for nanomodels.transformer: config validation, parts, causality, KV cache, sampling."""

import pytest
import torch

from nanomodels.attention import attention, sdpa_attention

import torch.nn as nn

from nanomodels.attention import MultiHeadAttention
from nanomodels.encoder_decoder import EncoderDecoder
from nanomodels.transformer import (IGNORE_INDEX, LMHead, PostNorm, PreNorm,
                                    Transformer, TransformerConfig, init_branches_, layer_norm, sample_next_token)


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


def test_final_norm_is_an_explicit_choice():
    assert isinstance(Transformer(tiny()).final_norm, torch.nn.LayerNorm)
    assert isinstance(Transformer(tiny(), residual=PostNorm, final_norm=None).final_norm, torch.nn.Identity)
    assert isinstance(Transformer(tiny(), residual=PostNorm, final_norm=layer_norm).final_norm, torch.nn.LayerNorm)


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


@pytest.mark.parametrize("residual,final_norm", [(PreNorm, layer_norm), (PostNorm, None)])
def test_reference_and_sdpa_attention_give_same_model_output(residual, final_norm):
    idx = torch.randint(0, 37, (2, 12))
    ref, _ = model64(attention_fn=attention, residual=residual, final_norm=final_norm)(idx)
    fast, _ = model64(attention_fn=sdpa_attention, residual=residual, final_norm=final_norm)(idx)
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
    with pytest.raises(ValueError, match=r"inputs: expected a batch of sequences, \(B, T\) token ids"):
        m(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"idx: expected token ids of shape \(B, T\)"):
        m(torch.zeros(1, 4, 2, dtype=torch.long))


def test_explicit_positions_equal_default_positions():
    m = model64()
    idx = torch.randint(0, 37, (1, 6))
    assert torch.equal(m(idx)[0], m(idx, positions=torch.arange(6))[0])


def test_head_is_tied_to_token_embedding():
    m = Transformer(tiny())
    assert m.head.proj.weight is m.embed.wte.weight
    untied = Transformer(tiny(tie_weights=False))
    assert untied.head.proj.weight is not untied.embed.wte.weight


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


# ---- the seeded numbers of every chapter's model are unchanged by the parts refactor --------------------------

def _regression_builders():
    from nanomodels.deepnet import deepnet, deepnorm_init_
    from nanomodels.subln import magneto

    def cfg(**kw):
        return TransformerConfig(**{**dict(vocab_size=37, block_size=24, n_layers=3, d_model=32, n_heads=4, d_ff=48),
                                    **kw})
    return {
        "gpt": lambda: Transformer(cfg()),
        "post_ln": lambda: Transformer(cfg(), residual=PostNorm, final_norm=None),
        "post_ln_xavier": lambda: deepnorm_init_(Transformer(cfg(), residual=PostNorm, final_norm=None), 1.0),
        "pre_ln_xavier": lambda: deepnorm_init_(Transformer(cfg(), residual=PreNorm), 1.0),
        "deepnet": lambda: deepnet(cfg()),
        "magneto": lambda: magneto(cfg()),
        "untied_nobias": lambda: Transformer(cfg(tie_weights=False, bias=False)),
    }


@pytest.mark.parametrize("name", list(_regression_builders()))
def test_seeded_logits_losses_and_samples_are_unchanged_by_the_parts_refactor(name):
    """tests/data/core_regression.pt was written by main at 459edc2 (before the core took parts as
    part(config, ...)): float64 logits (causal, seq2seq mask, explicit positions), the loss, 3 AdamW steps and a
    top-k sample, all from torch.manual_seed(1234). Equal to 1e-12 (SDPA's CPU kernel and the thread count may
    reorder float reductions; the parameters themselves are bit-identical)."""
    from nanomodels.masks import seq2seq_mask
    ref = torch.load("tests/data/core_regression.pt")
    want = ref["models"][name]
    idx, targets, positions = ref["idx"], ref["targets"], ref["positions"]
    torch.manual_seed(1234)
    model = _regression_builders()[name]().double().eval()
    with torch.no_grad():
        got = dict(zip(("logits", "loss", "s2s", "pos"), (*model(idx, targets),
                                                          model(idx, allowed=seq2seq_mask(8, 12), causal=False)[0],
                                                          model(idx, positions=positions)[0])))
    for key, value in got.items():
        diff = (value - want[key]).abs().max().item()
        assert diff < 1e-12, f"{name}: {key} changed by {diff:.3g}"
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        _, step_loss = model(idx, targets)
        opt.zero_grad()
        step_loss.backward()
        opt.step()
        losses.append(step_loss.item())
    # thread count changes the order of float reductions in the backward: equal to 1e-12, not bit for bit
    diff = (torch.tensor(losses, dtype=torch.float64) - want["losses"]).abs().max().item()
    assert diff < 1e-12, f"{name}: training changed, max loss difference {diff:.3g}"
    model.eval()
    torch.manual_seed(0)
    gen = model.generate(idx[:, :4], 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(gen, want["gen"]), f"{name}: sampling changed"


# ---- parts: every constructor is part(config, ...) -------------------------------------------------------------

def test_every_part_is_built_from_the_config():
    cfg = tiny()
    seen = []

    def spy(part):
        def build(config, **kw):
            seen.append((part.__name__, config is cfg))
            return part(config, **kw)
        return build
    Transformer(cfg, attention=spy(MultiHeadAttention), ffn=spy(__import__("nanomodels.transformer").transformer.MLP),
                residual=spy(PreNorm), final_norm=spy(layer_norm), head=spy(LMHead))
    names = {n for n, _ in seen}
    assert names == {"MultiHeadAttention", "MLP", "PreNorm", "layer_norm", "LMHead"}
    assert all(same for _, same in seen), "a part was built from something other than the model's config"


def test_head_linear_is_chosen_independently_of_the_body_linear():
    class Marked(nn.Linear):
        pass
    m = Transformer(tiny(), linear=Marked)
    assert isinstance(m.blocks[0].attn.q_proj, Marked) and isinstance(m.blocks[0].ffn.fc1, Marked)
    assert type(m.head.proj) is nn.Linear, "the head keeps nn.Linear unless head_linear says otherwise"
    m2 = Transformer(tiny(), head_linear=Marked)
    assert type(m2.blocks[0].attn.q_proj) is nn.Linear and isinstance(m2.head.proj, Marked)
    assert m2.head.proj.weight is not m2.embed.wte.weight, "only a plain nn.Linear head is tied to the embedding"


class _AuxFFN(nn.Module):
    """A feed-forward part with an auxiliary loss: the mean square of its input, weighted 0.25."""

    def __init__(self, config, *, linear=nn.Linear):
        super().__init__()
        self.fc = linear(config.d_model, config.d_model)
        self.aux_weight = 0.25
        self.aux_loss = None

    def forward(self, x):
        self.aux_loss = x.square().mean()
        return self.fc(x)


def test_aux_losses_are_added_to_the_loss_with_their_weight():
    torch.manual_seed(0)
    m = Transformer(tiny(), ffn=_AuxFFN).double()
    idx, targets = torch.randint(0, 37, (2, 8)), torch.randint(0, 37, (2, 8))
    logits, loss = m(idx, targets)
    aux = m.aux_losses()
    assert sorted(aux) == ["blocks.0.ffn", "blocks.1.ffn"]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 37), targets.reshape(-1))
    expected = ce + 0.25 * (aux["blocks.0.ffn"] + aux["blocks.1.ffn"])
    assert torch.allclose(loss, expected, atol=1e-12), f"loss {loss.item()} vs CE + 0.25 aux {expected.item()}"
    loss.backward()
    assert m.embed.wte.weight.grad is not None


def test_head_owns_its_loss():
    class ZeroLossHead(LMHead):
        def loss(self, h, targets, outputs=None):
            return h.sum() * 0.0
    m = Transformer(tiny(), head=ZeroLossHead)
    _, loss = m(torch.randint(0, 37, (1, 4)), torch.randint(0, 37, (1, 4)))
    assert loss.item() == 0.0
    assert IGNORE_INDEX == -100


def test_segment_embeddings_change_the_output_only_when_configured():
    torch.manual_seed(0)
    m = Transformer(tiny(n_segments=2)).double().eval()
    idx = torch.randint(0, 37, (1, 6))
    seg = torch.tensor([[0, 0, 0, 1, 1, 1]])
    with_seg, _ = m(idx, segments=seg)
    expected = m.embed.wte(idx) + m.embed.wpe(torch.arange(6)) + m.embed.wse(seg)
    assert torch.equal(m.embed(idx, torch.arange(6), seg), expected)
    assert not torch.allclose(with_seg, m(idx)[0])
    with pytest.raises(ValueError, match="segments: this model has no segment embeddings"):
        model64()(idx, segments=seg)
    with pytest.raises(ValueError, match="segments: expected shape"):
        m(idx, segments=torch.tensor([[0, 0, 0, 1, 1, 2]]))
    with pytest.raises(ValueError, match="n_segments: must be an integer >= 0"):
        tiny(n_segments=-1)


def test_init_branches_touches_only_the_named_matrices_with_xavier_normal():
    torch.manual_seed(0)
    m = Transformer(tiny(n_layers=1, d_model=64, n_heads=4, d_ff=256, vocab_size=50))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    init_branches_(m, 0.5, qk_gain=2.0)
    for n, p in m.named_parameters():
        changed = not torch.equal(p, before[n])
        leaf = n.split(".")[-2] if n.endswith(".weight") else ""
        assert changed == (leaf in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")), n
    fc1 = m.blocks[0].ffn.fc1.weight
    want = 0.5 * (2 / (64 + 256)) ** 0.5
    assert abs(fc1.std().item() / want - 1) < 0.05, "fc1: xavier normal std with gain 0.5"
    q = m.blocks[0].attn.q_proj.weight
    assert abs(q.std().item() / (2.0 * (2 / 128) ** 0.5) - 1) < 0.08, "q_proj: xavier normal with qk_gain"


# ---- the encoder-decoder assembly -------------------------------------------------------------------------------

def encdec64(seed=0, **kw):
    torch.manual_seed(seed)
    return EncoderDecoder(tiny(), encoder_layers=2, attention_fn=attention, **kw).double().eval()


def test_encoder_decoder_decoder_is_causal_and_sees_the_whole_source():
    m = encdec64()
    src, tgt = torch.randint(0, 37, (2, 9)), torch.randint(0, 37, (2, 6))
    base, _ = m(src, tgt)
    other_tgt = tgt.clone()
    other_tgt[:, 4:] = (other_tgt[:, 4:] + 1) % 37
    assert torch.allclose(m(src, other_tgt)[0][:, :4], base[:, :4], atol=1e-12), "decoder saw the future"
    other_src = src.clone()
    other_src[:, -1] = (other_src[:, -1] + 1) % 37
    assert not torch.allclose(m(other_src, tgt)[0][:, 0], base[:, 0]), "target 0 must see the last source token"


def test_encoder_decoder_padded_source_tokens_are_invisible():
    m = encdec64()
    src, tgt = torch.randint(0, 37, (1, 9)), torch.randint(0, 37, (1, 5))
    keep = torch.tensor([[True] * 6 + [False] * 3])
    base, _ = m(src, tgt, src_keep=keep)
    other = src.clone()
    other[:, 6:] = (other[:, 6:] + 5) % 37
    assert torch.allclose(m(other, tgt, src_keep=keep)[0], base, atol=1e-12)
    short, _ = m(src[:, :6], tgt)
    assert torch.allclose(short, base, atol=1e-12), "padding must equal a shorter source"


def test_encoder_decoder_cached_greedy_decoding_equals_recompute():
    m = encdec64()
    src = torch.randint(0, 37, (3, 7))
    out = m.generate(src, bos=1, max_new_tokens=6)
    seq = torch.full((3, 1), 1)
    for _ in range(6):
        logits, _ = m(src, seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_encoder_decoder_deepnet_and_magneto_use_the_enc_dec_rows():
    from nanomodels.deepnet import DeepNorm, deepnet_encoder_decoder, deepnorm_constants
    from nanomodels.subln import SubLNAttention, magneto_encoder_decoder, subln_gamma
    cfg = tiny(n_layers=3, d_model=64, d_ff=256)
    torch.manual_seed(0)
    dn = deepnet_encoder_decoder(cfg, encoder_layers=6)
    c = deepnorm_constants(6, 3)
    assert isinstance(dn.encoder[0].attn_residual, DeepNorm) and dn.encoder[0].attn_residual.alpha == c["encoder"][0]
    assert dn.decoder[0].cross_residual.alpha == c["decoder"][0]
    assert isinstance(dn.final_norm, nn.Identity)
    for stack, beta in ((dn.encoder, c["encoder"][1]), (dn.decoder, c["decoder"][1])):
        w = stack[0].ffn.fc1.weight
        assert abs(w.std().item() / (beta * (2 / (64 + 256)) ** 0.5) - 1) < 0.05
    torch.manual_seed(0)
    mg = magneto_encoder_decoder(cfg, encoder_layers=6)
    g = subln_gamma(6, 3)
    assert isinstance(mg.decoder[0].attn, SubLNAttention) and not isinstance(mg.decoder[0].cross_attn, SubLNAttention)
    for stack, gamma in ((mg.encoder, g["encoder"]), (mg.decoder, g["decoder"])):
        w = stack[0].ffn.fc1.weight
        assert abs(w.std().item() / (gamma * (2 / (64 + 256)) ** 0.5) - 1) < 0.05
    src, tgt = torch.randint(0, 37, (2, 5)), torch.randint(0, 37, (2, 4))
    for model in (dn, mg):
        _, loss = model(src, tgt, tgt)
        assert torch.isfinite(loss)


def test_encoder_decoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="encoder_layers: must be a positive integer"):
        EncoderDecoder(tiny(), encoder_layers=0)
    m = encdec64()
    with pytest.raises(ValueError, match="src_keep: expected a boolean tensor"):
        m(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), src_keep=torch.ones(1, 4))
