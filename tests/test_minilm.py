"""MiniLM / MiniLMv2 (reference/09-beyond.md §5): the attention KL, value relations, relation heads, the v2
loss, the attention capture and the two distillation losses a trainer calls, against naive per-element loops.
float64."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nanomodels.attention import MultiHeadAttention, attention, sdpa_attention
from nanomodels.minilm import (AttentionRecord, attention_kl, attention_probs, capture_attention, logit_kl,
                               minilm_loss, minilm_v2_loss, relation, value_relation)
from nanomodels.transformer import Transformer, TransformerConfig


CHAPTER = "12"  # tests/conftest.py runs chapter 12's graded checks (exercises/grading/checks/ch12_minilm.py)


def test_graded_invariant_holds_for_the_library(graded_check):
    graded_check()


@pytest.mark.parametrize("name", ["kl_in_low_precision", "relation_is_stable", "value_relation_is_stable"])
def test_low_precision_tolerances_hold_for_the_library_over_many_draws(name):
    """The float32 / float16 checks compare with a rounding bound, not an exact value: the library passes them on
    100 draws each, beyond the grader's 25."""
    from exercises.grading.checks.common import library_checks

    (check,) = [c for c in library_checks(CHAPTER) if c.check.name == name]
    check(max_examples=100)


pytestmark = pytest.mark.usefixtures("float64_default")  # tests/conftest.py


def assert_close(actual, expected, what, atol=1e-10):
    diff = (actual - expected).abs()
    assert torch.allclose(actual, expected, atol=atol, rtol=0), \
        f"{what}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g}"


# ---- naive oracles: one element at a time, Python floats ---------------------------------------------------

def naive_kl(teacher, student, mask=None):
    """(1 / #(b, h, valid i)) Σ_{b, h, valid i} Σ_{k: t > 0} t (log t − log s)."""
    B, H, T, _ = teacher.shape
    total, rows = 0.0, 0
    for b in range(B):
        for h in range(H):
            for i in range(T):
                if mask is not None and not mask[b, i]:
                    continue
                rows += 1
                for k in range(T):
                    t, s = float(teacher[b, h, i, k]), float(student[b, h, i, k])
                    if t > 0:
                        total += t * (math.log(t) - math.log(s)) if s > 0 else math.inf
    return total / rows


def naive_softmax_rows(scores):
    """scores: list of lists -> row-wise softmax, as a tensor."""
    out = []
    for row in scores:
        m = max(row)
        e = [math.exp(x - m) for x in row]
        out.append([x / sum(e) for x in e])
    return torch.tensor(out)


def naive_relation(x, n_heads):
    """Relation head r of x (B, T, d): softmax_j(Σ_{c in head r} x[b, i, c] x[b, j, c] / √(d / n_heads))."""
    B, T, d = x.shape
    dr = d // n_heads
    out = torch.zeros(B, n_heads, T, T)
    for b in range(B):
        for r in range(n_heads):
            cols = range(r * dr, (r + 1) * dr)
            scores = [[sum(float(x[b, i, c] * x[b, j, c]) for c in cols) / math.sqrt(dr) for j in range(T)]
                      for i in range(T)]
            out[b, r] = naive_softmax_rows(scores)
    return out


def distributions(seed, B=2, H=3, T=5, density=1.0):
    """A teacher and a student (B, H, T, T): masked softmaxes over the same random key mask (shared zeros),
    a row with no visible key all zeros."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.rand(B, 1, T, T, generator=g) < density
    t = attention_probs(torch.randn(B, H, T, 4, generator=g), torch.randn(B, H, T, 4, generator=g), keys)
    s = attention_probs(torch.randn(B, H, T, 4, generator=g), torch.randn(B, H, T, 4, generator=g), keys)
    return t, s


def row_mask(seed, B, T, density=0.6):
    g = torch.Generator().manual_seed(seed + 7)
    mask = torch.rand(B, T, generator=g) < density
    mask[0, 0] = True  # at least one valid row
    return mask


# ---- attention_kl ------------------------------------------------------------------------------------------

@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, 6),
       density=st.floats(0.3, 1.0), masked=st.booleans())
def test_attention_kl_matches_naive_loop(seed, B, H, T, density, masked):
    t, s = distributions(seed, B, H, T, density)
    mask = row_mask(seed, B, T) if masked else None
    expected = torch.tensor(naive_kl(t, s, mask))
    assert_close(attention_kl(t, s, mask), expected, "attention_kl vs the per-element loop")


@given(seed=st.integers(0, 10_000), T=st.integers(2, 6), density=st.floats(0.3, 1.0))
def test_attention_kl_is_nonnegative_and_zero_iff_equal(seed, T, density):
    t, s = distributions(seed, T=T, density=density)
    assert attention_kl(t, t).item() == 0.0, "KL(p ‖ p) must be exactly 0"
    assert attention_kl(t, s).item() >= 0.0, "KL >= 0"
    assert attention_kl(s, t).item() >= 0.0, "KL >= 0"
    # one row of the student moved off the teacher's: KL > 0
    t, _ = distributions(seed, T=T)  # density 1: every row has T >= 2 visible keys
    moved = t.clone()
    moved[0, 0, 0, 0] += 0.1
    moved[0, 0, 0] /= moved[0, 0, 0].sum()
    assert attention_kl(t, moved).item() > 0.0, "KL(t ‖ s) > 0 when s differs from t in one row"


def test_attention_kl_direction_is_teacher_to_student_by_hand():
    # row 0: t = (1/2, 1/2), s = (1/4, 3/4)
    #   KL(t ‖ s) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.14384...
    #   KL(s ‖ t) = 1/4 ln(1/2) + 3/4 ln(3/2) = 3/4 ln 3 − ln 2 = 0.13081...
    t = torch.tensor([0.5, 0.5]).view(1, 1, 1, 2).expand(1, 1, 2, 2).clone()
    s = torch.tensor([0.25, 0.75]).view(1, 1, 1, 2).expand(1, 1, 2, 2).clone()
    assert_close(attention_kl(t, s), torch.tensor(0.5 * math.log(4 / 3)), "KL(t ‖ s) by hand", atol=1e-15)
    assert_close(attention_kl(s, t), torch.tensor(0.75 * math.log(3) - math.log(2)), "KL(s ‖ t) by hand",
                 atol=1e-15)
    # row 1: t = (1, 0), s = (1/2, 1/2): KL(t ‖ s) = ln 2 (0 log 0 = 0); KL(s ‖ t) = +inf (mass where t = 0)
    t[0, 0, 1], s[0, 0, 1] = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    assert_close(attention_kl(t, s), torch.tensor((0.5 * math.log(4 / 3) + math.log(2)) / 2), "two rows",
                 atol=1e-15)
    assert attention_kl(s, t).item() == math.inf


def test_zero_teacher_mass_adds_zero_and_no_nan_where_the_student_is_zero_too():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 2, 3, 6, 4, generator=g), torch.randn(2, 2, 3, 6, 4, generator=g)
    t = attention_probs(q[0], k[0], causal=True)
    s = attention_probs(q[1], k[1], causal=True).requires_grad_()
    assert ((t == 0) == (s == 0)).all() and (t == 0).any(), "the causal zeros coincide"
    loss = attention_kl(t, s)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all(), "0 log 0 = 0: finite loss, finite gradient"
    assert (s.grad[t == 0] == 0).all(), "no gradient where the teacher has no mass"
    assert_close(loss.detach(), torch.tensor(naive_kl(t, s.detach())), "vs the loop")


def test_student_zero_where_teacher_positive_gives_plus_inf():
    t = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).view(1, 1, 2, 2)
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    assert attention_kl(t, s).item() == math.inf, "KL(t ‖ s) = +inf when s = 0 where t > 0"


def test_masked_rows_are_ignored_whatever_their_content():
    t, s = distributions(5, B=2, H=2, T=5)
    mask = torch.tensor([[True, False, True, True, False], [False, True, True, False, False]])
    changed_t, changed_s = t.clone(), s.clone()
    rows = ~mask[:, None, :].expand(2, 2, 5)
    changed_t[rows] = torch.rand(int(rows.sum()), 5)  # anything, even where the student is 0 or NaN
    changed_s[rows] = 0.0
    changed_s[0, 0, 1, 0] = math.nan
    grads = []
    for tt, ss in ((t, s), (changed_t, changed_s)):
        ss = ss.clone().requires_grad_()
        loss = attention_kl(tt, ss, mask)
        loss.backward()
        grads.append((loss.detach(), ss.grad))
    assert torch.equal(grads[0][0], grads[1][0]), "loss changed with a masked row's content"
    assert torch.equal(grads[0][1], grads[1][1]), "gradient changed with a masked row's content"
    assert (grads[1][1][rows] == 0).all(), "a masked row gets no gradient"


def test_mean_is_over_every_batch_head_and_valid_row():
    # only row (b=1, i=2) is valid, in both heads: the mean is the mean of those two rows' KLs
    t, s = distributions(9, B=2, H=2, T=4)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 2] = True
    kl_row = (t * (t.log() - s.log())).sum(-1)  # density 1: no zero
    assert_close(attention_kl(t, s, mask), kl_row[1, :, 2].mean(), "mean over the valid rows")
    # a zero teacher row (no visible key) adds 0 but counts in the mean when the mask keeps it
    t0 = t.clone()
    t0[:, :, 0] = 0.0
    assert_close(attention_kl(t0, s), kl_row[:, :, 1:].sum() / (2 * 2 * 4), "zero rows count in the mean")


def test_all_rows_masked_is_a_value_error():
    t, s = distributions(0, B=2, T=3)
    with pytest.raises(ValueError, match="mask: selects no query row"):
        attention_kl(t, s, torch.zeros(2, 3, dtype=torch.bool))


def test_attention_kl_rejects_bad_shapes():
    t, s = distributions(0, B=2, H=2, T=3)
    with pytest.raises(ValueError, match=r"teacher and student: .*\(2, 2, 3, 3\) and \(2, 1, 3, 3\)"):
        attention_kl(t, s[:, :1])
    with pytest.raises(ValueError, match="teacher and student"):
        attention_kl(t[..., :2], s[..., :2])  # not T x T
    with pytest.raises(ValueError, match=r"teacher: expected a floating \(B, H, T, T\)"):
        attention_kl(t[0], s)
    with pytest.raises(ValueError, match=r"student: expected a floating"):
        attention_kl(t, s.long())
    with pytest.raises(ValueError, match=r"mask: expected a bool \(B, T\) = \(2, 3\)"):
        attention_kl(t, s, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask: expected a bool"):
        attention_kl(t, s, torch.ones(2, 3))


# ---- value_relation, relation ------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [2, 8, 24])
def test_value_relation_is_T_by_T_and_matches_the_loop(d):
    v = torch.randn(2, 3, 5, d)
    vr = value_relation(v)
    assert vr.shape == (2, 3, 5, 5)
    per_head = torch.stack([naive_relation(v[:, h], 1)[:, 0] for h in range(3)], dim=1)
    assert_close(vr, per_head, "value_relation vs the loop")


@pytest.mark.parametrize("d, n_heads", [(4, 1), (12, 3), (24, 6), (48, 6), (20, 4)])
def test_relations_are_T_by_T_whatever_the_width(d, n_heads):
    x = torch.randn(2, 5, d)
    r = relation(x, n_heads)
    assert r.shape == (2, n_heads, 5, 5), f"width {d}"
    assert_close(r.sum(-1), torch.ones(2, n_heads, 5), "rows sum to 1")
    assert_close(r, naive_relation(x, n_heads), "relation vs the loop")


def test_relation_heads_resplit_12_to_6_by_hand():
    # 12 attention heads of width 2, concatenated: d = 24. Relation head r of 6 covers columns 4r..4r+3,
    # i.e. attention heads 2r and 2r+1, scaled by 1/√4: logits (v_{2r} v_{2r}ᵀ + v_{2r+1} v_{2r+1}ᵀ) / 2
    heads = torch.randn(2, 12, 4, 2)  # (B, 12, T, 2)
    x = heads.transpose(1, 2).reshape(2, 4, 24)  # (B, T, 24)
    r = relation(x, 6)
    for b in range(2):
        for h in range(6):
            a, c = heads[b, 2 * h], heads[b, 2 * h + 1]
            scores = [[(float(a[i] @ a[j]) + float(c[i] @ c[j])) / 2.0 for j in range(4)] for i in range(4)]
            assert_close(r[b, h], naive_softmax_rows(scores), f"relation head {h} of 6, batch {b}")
    # with the model's own head count, a relation head is an attention head: MiniLM's value relation
    assert_close(relation(x, 12), value_relation(heads), "12 relation heads = the 12 heads' value relations")


def test_relation_rejects_heads_not_dividing_the_width():
    with pytest.raises(ValueError, match=r"n_heads: .*dividing d = 10, got 4"):
        relation(torch.randn(1, 3, 10), 4)
    with pytest.raises(ValueError, match="n_heads"):
        relation(torch.randn(1, 3, 10), 0)
    with pytest.raises(ValueError, match=r"x: expected a floating \(B, T, d\)"):
        relation(torch.randn(3, 10), 2)


# ---- minilm_v2_loss ----------------------------------------------------------------------------------------

def test_minilm_v2_loss_sums_the_three_relation_kls_with_different_widths():
    teacher = tuple(torch.randn(2, 5, 24) for _ in range(3))  # 12 attention heads of 2, say
    student = tuple(torch.randn(2, 5, 12) for _ in range(3))  # 6 of 2
    mask = row_mask(1, 2, 5)
    expected = sum(naive_kl(naive_relation(t, 6), naive_relation(s, 6), mask)
                   for t, s in zip(teacher, student))
    assert_close(minilm_v2_loss(teacher, student, 6, mask), torch.tensor(expected), "v2 loss vs the loop")
    assert minilm_v2_loss(teacher, teacher, 6).item() == 0.0, "0 when the relations are the teacher's"
    assert minilm_v2_loss(teacher, student, 3).item() > 0.0


def test_minilm_v2_loss_rejects_mismatches():
    t = tuple(torch.randn(2, 5, 24) for _ in range(3))
    with pytest.raises(ValueError, match=r"teacher_qkv and student_qkv: must share B and T.*\(2, 4"):
        minilm_v2_loss(t, tuple(torch.randn(2, 4, 12) for _ in range(3)), 6)
    with pytest.raises(ValueError, match=r"teacher_qkv and student_qkv: must share B and T.*\(3, 5\)"):
        minilm_v2_loss(t, tuple(torch.randn(3, 5, 12) for _ in range(3)), 6)
    with pytest.raises(ValueError, match=r"n_heads: .*dividing d_student = 10, got 6"):
        minilm_v2_loss(t, tuple(torch.randn(2, 5, 10) for _ in range(3)), 6)
    with pytest.raises(ValueError, match=r"n_heads: .*dividing d_teacher = 24, got 5"):
        minilm_v2_loss(t, tuple(torch.randn(2, 5, 10) for _ in range(3)), 5)
    with pytest.raises(ValueError, match=r"student_qkv: expected a \(q, k, v\) triple"):
        minilm_v2_loss(t, t[:2], 6)
    with pytest.raises(ValueError, match="teacher_qkv: q, k and v must share"):
        minilm_v2_loss((t[0], t[1], t[2][:, :4]), t, 6)


# ---- gradients reach only the student ----------------------------------------------------------------------

def test_gradients_reach_only_the_student():
    t, s = distributions(2)
    t, s = t.clone().requires_grad_(), s.clone().requires_grad_()
    attention_kl(t, s).backward()
    assert t.grad is None and s.grad.abs().sum() > 0, "attention_kl: teacher detached, student trained"
    tq = [torch.randn(2, 5, 24, requires_grad=True) for _ in range(3)]
    sq = [torch.randn(2, 5, 12, requires_grad=True) for _ in range(3)]
    minilm_v2_loss(tq, sq, 6).backward()
    assert all(x.grad is None for x in tq) and all(x.grad.abs().sum() > 0 for x in sq), "minilm_v2_loss"
    tl, sl = torch.randn(2, 5, 7, requires_grad=True), torch.randn(2, 5, 7, requires_grad=True)
    logit_kl(tl, sl, 2.0).backward()
    assert tl.grad is None and sl.grad.abs().sum() > 0, "logit_kl"


# ---- capture_attention: the hook on MultiHeadAttention -----------------------------------------------------

def model(seed, attention_fn=sdpa_attention, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=11, block_size=8, n_layers=3, d_model=16, n_heads=4)
    return Transformer(TransformerConfig(**{**cfg, **kw}), attention_fn=attention_fn).eval()


@pytest.mark.parametrize("attention_fn", [attention, sdpa_attention], ids=["reference", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padded", [False, True])
def test_capture_leaves_logits_bit_identical(attention_fn, dtype, padded):
    m = model(0, attention_fn).to(dtype)
    idx = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(1))
    allowed = torch.ones(2, 8, 8, dtype=torch.bool)
    allowed[1, :, 5:] = False  # sequence 1 is padded after 5 tokens
    kw = dict(allowed=allowed) if padded else {}
    plain = m(idx, **kw)[0]
    for layer in (0, -1):
        with capture_attention(m, layer) as rec:
            captured = m(idx, **kw)[0]
        assert torch.equal(captured, plain), f"logits changed under capture of layer {layer}"
        assert rec.q.dtype == dtype and rec.probs.shape == (2, 4, 8, 8)
    assert all(b.attn.tap is None for b in m.blocks), "no tap left after the context"


def test_capture_records_the_chosen_layers_heads():
    m = model(1)
    idx = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(2))
    seen = {}
    handle = m.blocks[1].attn.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    with capture_attention(m, 1) as rec:
        m(idx)
    handle.remove()
    x, attn = seen["x"], m.blocks[1].attn
    for name, proj, got in (("q", attn.q_proj, rec.x_q), ("k", attn.k_proj, rec.x_k),
                            ("v", attn.v_proj, rec.x_v)):
        full = proj(x)  # (B, T, d)
        assert torch.equal(got, full), f"x_{name} is the {name} projection of the layer's input"
        heads = getattr(rec, name)
        assert heads.shape == (2, 4, 6, 4)
        for h in range(4):
            assert torch.equal(heads[:, h], full[..., 4 * h:4 * h + 4]), f"{name} head {h}: columns 4h..4h+3"


@pytest.mark.parametrize("attention_fn", [attention, sdpa_attention], ids=["reference", "sdpa"])
def test_captured_probs_are_the_attention_weights(attention_fn):
    m = model(2, attention_fn)
    idx = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(3))
    allowed = torch.ones(2, 8, 8, dtype=torch.bool)
    allowed[1, :, 6:] = False
    allowed[1, 6:] = False  # padding queries see nothing: zero rows
    for kw in ({}, dict(allowed=allowed)):
        with capture_attention(m, -1) as rec:
            m(idx, **kw)
        mask = rec.allowed
        eye = torch.eye(8).expand(2, 4, 8, 8)  # attention(q, k, I) returns the weights themselves
        weights = attention(rec.q, rec.k, eye, mask, causal=True)
        assert_close(rec.probs, weights, "probs vs attention's weights", atol=1e-14)
        assert_close(rec.probs @ rec.v, attention_fn(rec.q, rec.k, rec.v, mask, causal=True), "probs @ v")
        sums = rec.probs.sum(-1)
        if kw:
            assert (sums[1, :, 6:] == 0).all(), "a query with no visible key has a zero row"
            sums = sums[:, :, :6]
        assert_close(sums, torch.ones_like(sums), "rows sum to 1")
        assert (rec.probs.triu(1) == 0).all(), "causal: no weight on the future"


def test_capture_removes_the_tap_after_an_error_and_rejects_bad_arguments():
    m = model(0)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(m, 0):
            raise RuntimeError("boom")
    assert m.blocks[0].attn.tap is None
    with pytest.raises(ValueError, match=r"layer: must be an integer in \[-3, 3\), got 3"):
        with capture_attention(m, 3):
            pass
    with capture_attention(m, 0):
        with pytest.raises(ValueError, match="layer: block -3 is already being captured"):
            with capture_attention(m, -3):
                pass
    with pytest.raises(ValueError, match="model: expected a Transformer"):
        with capture_attention(MultiHeadAttention(m.config), 0):
            pass
    other = model(0, attention_fn=lambda q, k, v, allowed=None, *, causal=False: attention(q, k, v, allowed))
    with pytest.raises(ValueError, match="layer: block 0's attention must be a MultiHeadAttention computing"):
        with capture_attention(other, 0):
            pass


# ---- minilm_loss, logit_kl ---------------------------------------------------------------------------------

def test_minilm_loss_is_l_at_plus_l_vr_and_trains_only_the_student():
    teacher = model(3, n_layers=3, d_model=32, n_heads=4)
    student = model(4, n_layers=2, d_model=16, n_heads=4)  # narrower and shallower, same head count
    idx = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = row_mask(3, 2, 7)
    with torch.no_grad(), capture_attention(teacher, -1) as t_rec:
        teacher(idx)
    with capture_attention(student, -1) as s_rec:
        student(idx)
    loss = minilm_loss(t_rec, s_rec, mask)
    expected = (naive_kl(t_rec.probs, s_rec.probs.detach(), mask)
                + naive_kl(value_relation(t_rec.v), value_relation(s_rec.v).detach(), mask))
    assert_close(loss.detach(), torch.tensor(expected), "L_AT + L_VR vs the loops")
    assert minilm_loss(t_rec, t_rec).item() == 0.0
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()), "the teacher gets no gradient"
    assert student.blocks[-1].attn.q_proj.weight.grad.abs().sum() > 0, "the student's last layer is trained"


def test_minilm_loss_rejects_unequal_head_counts_and_empty_records():
    t_rec, s_rec = AttentionRecord(), AttentionRecord()
    with pytest.raises(ValueError, match="teacher_rec: expected an AttentionRecord filled by a forward"):
        minilm_loss(t_rec, s_rec)
    t_rec(*torch.randn(3, 1, 4, 5, 2), None, True)
    s_rec(*torch.randn(3, 1, 2, 5, 4), None, True)
    with pytest.raises(ValueError, match=r"teacher_rec and student_rec: .*got 4 and 2"):
        minilm_loss(t_rec, s_rec)


def naive_logit_kl(t, s, tau):
    t, s = t.reshape(-1, t.size(-1)), s.reshape(-1, s.size(-1))
    total = 0.0
    for row_t, row_s in zip(t.tolist(), s.tolist()):
        pt = naive_softmax_rows([[x / tau for x in row_t]])[0].tolist()
        ps = naive_softmax_rows([[x / tau for x in row_s]])[0].tolist()
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps) if a > 0)
    return tau ** 2 * total / t.size(0)


@pytest.mark.parametrize("tau", [1.0, 2.5, 0.5])
def test_logit_kl_matches_the_loop(tau):
    t, s = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    assert_close(logit_kl(t, s, tau), torch.tensor(naive_logit_kl(t, s, tau)), f"logit_kl at tau {tau}")
    assert logit_kl(t, t, tau).item() == 0.0
    shifted = t + torch.randn(2, 3, 1)
    assert_close(logit_kl(t, shifted, tau), torch.tensor(0.0), "softmax ignores a per-row shift", atol=1e-14)


def test_logit_kl_zero_teacher_probability_adds_zero_and_bad_input_raises():
    t, s = torch.randn(4, 5), torch.randn(4, 5)
    t[:, 0] = -math.inf  # the teacher rules token 0 out
    assert_close(logit_kl(t, s), torch.tensor(naive_logit_kl(t, s, 1.0)), "a -inf teacher logit")
    with pytest.raises(ValueError, match=r"teacher_logits and student_logits: expected one shape"):
        logit_kl(t, s[:, :4])
    with pytest.raises(ValueError, match="temperature: must be a number > 0, got 0"):
        logit_kl(t, s, 0)
    with pytest.raises(ValueError, match="student_logits: expected a floating"):
        logit_kl(t, s.long())


# a correct chapter 12 written differently from the library: a per-row mean over the selected rows, einsum and a
# hand-written stable softmax, the triples unpacked, F.softmax over axis 3
ALTERNATIVE_12 = {
    "12.1": '''rows = mask[:, None, :].expand(B, H, T)  # (B, H, T) valid rows
t = teacher.detach()
keep = (t > 0) & rows[..., None]
safe_t = torch.where(keep, t, torch.ones_like(t))
safe_s = torch.where(keep, student, torch.ones_like(student))
terms = torch.where(keep, t * (safe_t.log() - safe_s.log()), torch.zeros_like(t))
return terms.sum(-1)[rows].mean()''',
    "12.2": '''dh = d // n_heads
heads = x.reshape(B, T, n_heads, dh).permute(0, 2, 1, 3)
scores = torch.einsum("bhid,bhjd->bhij", heads, heads) * dh ** -0.5
e = (scores - scores.amax(-1, keepdim=True)).exp()
return e / e.sum(-1, keepdim=True)''',
    "12.3": '''(tq, tk, tv), (sq, sk, sv) = teacher_qkv, student_qkv
loss = attention_kl(relation(tq, n_heads), relation(sq, n_heads), mask)
loss = loss + attention_kl(relation(tk, n_heads), relation(sk, n_heads), mask)
return loss + attention_kl(relation(tv, n_heads), relation(sv, n_heads), mask)''',
    "12.4": '''logits = torch.matmul(v, v.transpose(2, 3)) / math.sqrt(v.shape[3])
return torch.nn.functional.softmax(logits, dim=3)''',
}


@pytest.mark.slow
def test_a_correct_solution_written_differently_gets_full_marks(tmp_path):
    import json
    import textwrap

    from exercises.grading.grader import Source, format_report, grade
    from exercises.grading.registry import get_chapter
    from exercises.grading.stubs import scan

    chapter = get_chapter("12")
    text = chapter.student_file.read_text()
    for m in scan(chapter):
        stub = f"{m.indent}raise NotImplementedError({json.dumps(m.message)})"
        assert text.count(stub) == 1, m.id
        text = text.replace(stub, textwrap.indent(ALTERNATIVE_12[m.id], m.indent))
    (tmp_path / "alternative.py").write_text(text)
    report = grade(chapter, Source("file", str(tmp_path / "alternative.py")))
    assert report["full_marks"], format_report(report)
