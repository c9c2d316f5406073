"""Distillation as a task (nanomodels/distill.py): the three terms against an oracle that reads the q/k/v
projections through forward hooks (not the attention tap), zero for a student equal to its teacher, gradients
only to the student, a student run that learns from a teacher run, and every bad option named. float64 where exact."""

import math

import pytest
import torch

from nanomodels.distill import (DistillTask, default_teacher_layer, distill_loss, distill_terms)
from nanomodels.train import TrainConfig, build_model, fit, lr_at, run, train

TEXT = "the quick brown fox jumps over the lazy dog. " * 200


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def model(n_layers=2, d_model=16, n_heads=2, vocab=11, block=8, seed=0):
    torch.manual_seed(seed)
    return build_model(TrainConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, block_size=block), vocab)


def batch(B=2, T=6, vocab=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


# ---- the oracle: projections read by forward hooks, softmaxes and KLs as loops --------------------------------

def projections(m, layer, inputs):
    """(q, k, v), each (B, T, d), the outputs of block `layer`'s q/k/v projections, and the logits."""
    seen = {}
    attn = m.blocks[layer].attn
    hooks = [getattr(attn, f"{n}_proj").register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o))
             for n in "qkv"]
    with torch.no_grad():
        logits, _ = m(inputs)
    for h in hooks:
        h.remove()
    return (seen["q"], seen["k"], seen["v"]), logits


def rows(a, b, n_heads, causal):
    """softmax_j(a_h[i] · b_h[j] / √dh) per head h, over j <= i when causal, as nested lists [B][H][T][T]."""
    B, T, d = a.shape
    dh = d // n_heads
    out = []
    for bi in range(B):
        heads = []
        for h in range(n_heads):
            cols = range(h * dh, (h + 1) * dh)
            mat = []
            for i in range(T):
                keys = range(i + 1) if causal else range(T)
                s = {j: sum(float(a[bi, i, c] * b[bi, j, c]) for c in cols) / math.sqrt(dh) for j in keys}
                m = max(s.values())
                z = sum(math.exp(x - m) for x in s.values())
                mat.append([math.exp(s[j] - m) / z if j in s else 0.0 for j in range(T)])
            heads.append(mat)
        out.append(heads)
    return out


def kl(t, s):
    """Mean over b, h, i of Σ_j t log(t / s), 0 log 0 = 0."""
    total, n = 0.0, 0
    for tb, sb in zip(t, s):
        for th, sh in zip(tb, sb):
            for tr, sr in zip(th, sh):
                total += sum(p * math.log(p / q) for p, q in zip(tr, sr) if p > 0)
                n += 1
    return total / n


def oracle(kind, teacher, student, inputs, layer, heads):
    (tq, tk, tv), t_logits = projections(teacher, layer, inputs)
    (sq, sk, sv), s_logits = projections(student, -1, inputs)
    if kind == "logits":
        pt, ps = torch.softmax(t_logits, -1), torch.softmax(s_logits, -1)
        return float((pt * (pt.log() - ps.log())).sum(-1).mean())
    if kind == "minilm":
        h = teacher.config.n_heads
        return (kl(rows(tq, tk, h, True), rows(sq, sk, h, True))
                + kl(rows(tv, tv, h, False), rows(sv, sv, h, False)))
    return sum(kl(rows(t, t, heads, False), rows(s, s, heads, False)) for t, s in ((tq, sq), (tk, sk), (tv, sv)))


@pytest.mark.parametrize("kind, student_heads, teacher_layer, relation_heads, layer, heads", [
    ("logits", 2, -1, 0, -1, 0),
    ("minilm", 2, -1, 0, -1, 0),
    ("minilmv2", 4, -1, 0, 2, 2),   # default layer of 3 is 3 * 3 // 4 = 2 (the last); relation heads = teacher's 2
    ("minilmv2", 1, 0, 4, 0, 4),    # teacher layer 0, 4 relation heads of width 6 (teacher) and 2 (student)
])
def test_terms_match_the_hook_oracle(float64, kind, student_heads, teacher_layer, relation_heads, layer, heads):
    teacher = model(n_layers=3, d_model=24, n_heads=2, seed=0).eval()
    student = model(n_layers=2, d_model=8 if kind != "minilm" else 16, n_heads=student_heads, seed=1).eval()
    inputs, targets = batch()
    lm, term = distill_terms(kind, teacher, student, (inputs, targets), teacher_layer=teacher_layer,
                             relation_heads=relation_heads)
    expected = oracle(kind, teacher, student, inputs, layer, heads)
    assert abs(term.item() - expected) < 1e-10, f"{kind}: term {term.item()!r} vs oracle {expected!r}"
    assert torch.equal(lm, student(inputs, targets)[1]), "the LM part is the student's own loss"
    total = distill_loss(kind, teacher, student, (inputs, targets), weight=0.25, teacher_layer=teacher_layer,
                         relation_heads=relation_heads)
    assert abs(total.item() - (lm.item() + 0.25 * expected)) < 1e-10


@pytest.mark.parametrize("kind", ["logits", "minilm", "minilmv2"])
def test_a_student_equal_to_its_teacher_has_zero_term(float64, kind):
    teacher = model(n_layers=4, d_model=16, n_heads=2, seed=0)  # default layer 3 * 4 // 4 = 3, the last
    student = model(n_layers=4, d_model=16, n_heads=2, seed=5)
    student.load_state_dict(teacher.state_dict())
    _, term = distill_terms(kind, teacher, student, batch())
    assert abs(term.item()) < 1e-12, f"{kind}: a copy of the teacher gets {term.item()!r}"


def test_default_teacher_layer_is_three_quarters_up():
    assert [default_teacher_layer(n) for n in (1, 2, 4, 6, 12, 24)] == [0, 1, 3, 4, 9, 18]


@pytest.mark.parametrize("kind", ["logits", "minilm", "minilmv2"])
def test_gradients_reach_only_the_student_and_the_teacher_stays_in_eval(float64, kind):
    teacher = model(n_layers=3, d_model=16, n_heads=2, seed=0).train()
    student = model(n_layers=2, d_model=16, n_heads=2, seed=1)
    _, term = distill_terms(kind, teacher, student, batch())
    term.backward()
    assert not teacher.training, "the teacher runs in eval mode"
    assert all(p.grad is None for p in teacher.parameters()), "a teacher parameter got a gradient"
    grads = [p.grad for n, p in student.named_parameters() if ".blocks." in f".{n}" or n.startswith("blocks")]
    assert grads and all(g is not None for g in grads[:4]), "the student's first block got no gradient"
    assert any(float(g.abs().max()) > 0 for g in grads if g is not None)


# ---- the task: a student run from a teacher run ------------------------------------------------------------

def tiny(tmp_path, cls=TrainConfig, **overrides):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    options = dict(name="t", out_dir=str(tmp_path / "runs"), data=str(corpus), tokenizer="char", n_layers=2,
                   d_model=32, n_heads=2, block_size=16, batch_size=4, steps=20, warmup=3, eval_interval=10,
                   eval_iters=2, sample_tokens=5, progress=False, threads=1)
    options.update(overrides)
    return cls(**options)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    train(tiny(tmp, name="teacher", n_layers=3, d_model=48, steps=30))
    return tmp


def student(teacher_run, **overrides):
    options = {"name": "student", "distill_from": str(teacher_run / "runs" / "teacher"), **overrides}
    return tiny(teacher_run, TrainConfig, **options)


@pytest.mark.parametrize("kind, heads", [("logits", 2), ("minilm", 2), ("minilmv2", 4)])
def test_student_trains_20_steps_and_the_distillation_term_falls(teacher_run, kind, heads):
    cfg = student(teacher_run, distill=kind, n_heads=heads)
    task = DistillTask(cfg, torch.device("cpu"))
    task.setup(None)
    before = {n: p.clone() for n, p in task.teacher.named_parameters()}
    terms = []
    fit(task.model, task, cfg.steps, optimizer=task.optimizer, lr=lambda s: lr_at(s, cfg),
        on_step=lambda done, loss: terms.append(task.last_term.item()))
    assert len(terms) == 20
    first, last = sum(terms[:5]) / 5, sum(terms[-5:]) / 5
    assert last < 0.8 * first, f"{kind}: the distillation term went {first:.4f} -> {last:.4f}"
    assert all(torch.equal(p, before[n]) for n, p in task.teacher.named_parameters()), "the teacher changed"
    assert not task.teacher.training and not any(p.requires_grad for p in task.teacher.parameters())
    assert task.tok.to_dict() == task.teacher_tok.to_dict(), "the student uses the teacher's tokenizer"


def test_a_distill_run_writes_its_teacher_into_the_metrics(teacher_run):
    cfg = student(teacher_run, name="run", distill="minilm", steps=10)
    metrics = run(cfg, DistillTask(cfg, torch.device("cpu")))
    assert metrics["distill"] == "minilm" and metrics["teacher_params"] > metrics["params"]
    assert math.isfinite(metrics["teacher_val_loss"])
    assert all("distill_loss" in h for h in metrics["history"])


@pytest.mark.parametrize("overrides, option", [
    (dict(distill="attention"), "--distill"),
    (dict(distill_weight=-1.0), "--distill_weight"),
    (dict(relation_heads=-2), "--relation_heads"),
    (dict(teacher_layer=-3), "--teacher_layer"),
])
def test_bad_options_are_refused_at_construction(teacher_run, overrides, option):
    with pytest.raises(ValueError, match=option):
        student(teacher_run, **overrides)


@pytest.mark.parametrize("overrides, option", [
    (dict(distill_from=""), "--distill_from"),
    (dict(block_size=32), "--block_size"),
    (dict(tokenizer="bpe", vocab_size=300), "--tokenizer/--vocab_size"),
    (dict(distill="minilm", n_heads=4), "--n_heads.*MiniLMv2"),
    (dict(distill="minilmv2", relation_heads=5), "--relation_heads"),
    (dict(distill="minilmv2", teacher_layer=3), "--teacher_layer"),
    (dict(distill="minilm", attention="dilated", segment_lengths=(8, 16), dilation_rates=(1, 2)), "--attention"),
])
def test_options_that_contradict_the_teacher_are_refused(teacher_run, overrides, option):
    cfg = student(teacher_run, **overrides)
    with pytest.raises(ValueError, match=option.replace("/", ".")):
        DistillTask(cfg, torch.device("cpu"))


def test_the_command_line_distills_a_student_from_a_teacher_run(teacher_run, tmp_path, capsys):
    from test_cli import TINY, cli_args

    from nanomodels.__main__ import main
    from nanomodels.checkpoint import load_checkpoint
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    options = {**TINY, "name": "student", "out_dir": tmp_path, "data": corpus, "steps": 10, "eval_interval": 5}
    teacher_dir = teacher_run / "runs" / "teacher"
    teacher_cfg = load_checkpoint(teacher_dir / "ckpt.pt")["config"]
    options.update({k: teacher_cfg[k] for k in ("tokenizer", "vocab_size", "block_size", "n_heads")})
    assert main(["train", *cli_args(**options), "--distill_from", str(teacher_dir), "--distill", "minilm"]) == 0
    history = load_checkpoint(tmp_path / "student" / "ckpt.pt")["history"]
    assert all("distill_loss" in h for h in history), history
    assert "distilling --distill minilm" in capsys.readouterr().out
