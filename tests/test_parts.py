"""Every part of chapters 02-08 by name, from the command line: each trains (20 steps, the loss finite and
falling), resumes exactly (10 + --resume 10 == 20 straight), and samples from the rebuilt model; each name
builds the very model the chapters build; bad names and impossible combinations fail with a sentence."""

from functools import partial

import pytest
import torch
from test_cli import TINY, assert_same_weights, cli_args

from nanomodels.__main__ import main
from nanomodels.bitlinear import BitLinear
from nanomodels.checkpoint import load_checkpoint
from nanomodels.deepnet import deepnet
from nanomodels.dilated import longnet
from nanomodels.moe import MoE
from nanomodels.parts import build_lm, check_parts
from nanomodels.retnet import retnet_lm
from nanomodels.subln import magneto
from nanomodels.train import TrainConfig, load_model
from nanomodels.transformer import PostNorm, Transformer, TransformerConfig

TEXT = "the quick brown fox jumps over the lazy dog. " * 200
OPTIONS = {  # one run per idea that is a decoder part, and a module the rebuilt model must hold
    "post": ({"residual": "post"}, "PostNorm"),
    "deepnorm": ({"residual": "deepnorm"}, "DeepNorm"),
    "subln": ({"residual": "subln"}, "SubLNAttention"),
    "dilated": ({"attention": "dilated", "segment_lengths": "4 8 16", "dilation_rates": "1 2 4"}, "DilatedAttention"),
    "moe": ({"ffn": "moe", "experts": 4, "top_k": 2, "capacity_factor": 1.5, "aux_weight": 0.05}, "LinearRouter"),
    "xmoe": ({"ffn": "moe", "experts": 4, "router": "xmoe"}, "XMoERouter"),
    "bitlinear": ({"linear": "bitlinear"}, "BitLinear"),
    "retention": ({"attention": "retention"}, "MultiScaleRetention"),
    "yoco": ({"arch": "yoco"}, "GatedRetention"),
    "yoco-window": ({"arch": "yoco", "self_attention": "sliding_window", "window": 8}, "SlidingWindowAttention"),
}


def args(out_dir, corpus, **options) -> list:
    """A `train` command line; list-valued options ('4 8 16') become several words."""
    words = ["train"]
    for k, v in {"name": "t", "out_dir": out_dir, "data": corpus, "steps": 20, "eval_interval": 5, **TINY,
                 **options}.items():
        words += [f"--{k}", *str(v).split()] if isinstance(v, str) and " " in v else cli_args(**{k: v})
    return words


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("parts") / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_part_trains_resumes_exactly_and_samples_from_the_command_line(name, corpus, tmp_path, capsys):
    options, module = OPTIONS[name]
    assert main(args(tmp_path / "straight", corpus, **options)) == 0
    assert main(args(tmp_path / "cut", corpus, stop_at=10, **options)) == 0
    assert main(args(tmp_path / "cut", corpus, resume=True, **options)) == 0
    straight = load_checkpoint(tmp_path / "straight" / "t" / "ckpt.pt")
    resumed = load_checkpoint(tmp_path / "cut" / "t" / "ckpt.pt")
    assert_same_weights(straight["model"], resumed["model"], f"--{name}: stopped at 10 + resumed vs 20 straight")
    val = [h["val_loss"] for h in straight["history"]]
    assert all(torch.isfinite(torch.tensor(val))), f"--{name}: validation losses {val}"
    assert val[-1] < val[0] - 0.1, f"--{name}: the validation loss did not fall: {val}"
    if "ffn" in options:
        aux = [h["aux_loss"] for h in straight["history"]]
        assert all(a > 0 for a in aux), f"--{name}: the aux loss is not logged: {aux}"
    model, _, _ = load_model(tmp_path / "straight" / "t")  # `sample` rebuilds the model from the run's config
    assert module in {type(m).__name__ for m in model.modules()}, f"--{name}: the rebuilt model has no {module}"
    capsys.readouterr()
    assert main(["sample", "--out_dir", str(tmp_path / "straight"), "--name", "t", "--prompt", "the ", "--tokens",
                 "12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the ") and len(out.rstrip("\n")) == 4 + 12, out  # char tokens: one per character


def config(**kw):
    return TransformerConfig(**{"vocab_size": 40, "block_size": 16, "n_layers": 2, "d_model": 32, "n_heads": 2,
                                **kw})


def same_model(a: torch.nn.Module, b: torch.nn.Module, what: str) -> None:
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()], f"{what}: other modules"
    assert_same_weights(a.state_dict(), b.state_dict(), what)


@pytest.mark.parametrize("name,theirs", [
    ("pre", lambda c: Transformer(c)),
    ("post", lambda c: Transformer(c, residual=PostNorm, final_norm=None)),
    ("deepnorm", deepnet),
    ("subln", magneto),
    ("dilated", lambda c: Transformer(c, attention=longnet((4, 8), (1, 2)))),
    ("moe", lambda c: Transformer(c, ffn=partial(MoE, num_experts=4, k=2, router="xmoe", aux_weight=0.1))),
    ("bitlinear", None),
    ("retention", lambda c: retnet_lm(c)),
])
def test_each_name_builds_the_model_its_chapter_builds(name, theirs):
    from nanomodels.bitlinear import BitNetResidual

    kw = {"pre": {}, "post": {"residual": "post"}, "deepnorm": {"residual": "deepnorm"},
          "subln": {"residual": "subln"}, "dilated": dict(attention="dilated", segment_lengths=(4, 8),
                                                         dilation_rates=(1, 2)),
          "moe": dict(ffn="moe", experts=4, top_k=2, router="xmoe", aux_weight=0.1),
          "bitlinear": {"linear": "bitlinear"}, "retention": {"attention": "retention"}}[name]
    if theirs is None:  # chapter 08's build
        theirs = lambda c: Transformer(c, linear=BitLinear, residual=BitNetResidual)  # noqa: E731
    torch.manual_seed(0)
    ours = build_lm(config(), **kw)
    torch.manual_seed(0)
    same_model(ours, theirs(config()), f"build_lm({kw})")


@pytest.mark.parametrize("options,message", [
    ({"residual": "postln"}, "--residual: must be one of pre, post, deepnorm, subln, got 'postln'"),
    ({"attention": "linear"}, "--attention: must be one of softmax, dilated, retention, got 'linear'"),
    ({"attention": "retention", "residual": "deepnorm"}, "--attention: retention has its own projections"),
    ({"ffn": "moe", "router": "hash"}, "--router: must be one of linear, xmoe, got 'hash'"),
    ({"linear": "ternary"}, "--linear: must be one of dense, bitlinear, got 'ternary'"),
    ({"residual": "subln", "ffn": "moe"}, "--residual: subln brings its own attention and feed-forward parts"),
    ({"residual": "subln", "attention": "dilated"}, "combines only with --attention softmax and --ffn mlp"),
    ({"linear": "bitlinear", "residual": "deepnorm"}, "--linear: bitlinear normalizes inside each BitLinear"),
    ({"attention": "dilated", "segment_lengths": (4, 6), "dilation_rates": (1, 4)},
     "--dilation_rates: r must divide its segment length w, got w=6, r=4"),
    ({"attention": "dilated", "segment_lengths": (4, 8), "dilation_rates": (1,)},
     "--segment_lengths, --dilation_rates: need the same number"),
    ({"ffn": "moe", "experts": 0}, "--experts: must be a positive integer, got 0"),
    ({"ffn": "moe", "experts": 1, "top_k": 2}, "--top_k: must be 1 or 2 and at most --experts (1), got 2"),
    ({"ffn": "moe", "capacity_factor": 0.0}, "--capacity_factor: must be > 0, got 0.0"),
    ({"ffn": "moe", "aux_weight": -1.0}, "--aux_weight: must be >= 0, got -1.0"),
    ({"arch": "yoco", "ffn": "moe"}, "--arch: yoco builds its own decoder; --ffn apply to --arch transformer"),
    ({"arch": "yoco", "n_layers": 3}, "--n_layers: an odd n_layers (3) has no L/2 + L/2 split"),
    ({"arch": "yoco", "window": 0}, "--window: must be"),
    ({"norm": "post", "residual": "deepnorm"}, "--norm: deprecated, and it contradicts --residual deepnorm"),
])
def test_bad_names_and_impossible_combinations_say_why(options, message):
    with pytest.raises(ValueError) as err:
        TrainConfig(**options)
    assert message in str(err.value), str(err.value)


def test_the_check_names_the_argument_as_python_spells_it():
    with pytest.raises(ValueError, match="^residual: must be one of pre, post, deepnorm, subln"):
        check_parts(residual="x")
    with pytest.raises(ValueError, match="^ffn: must be one of mlp, moe, got 'MoE'"):
        build_lm(config(), ffn="MoE")


def test_the_deprecated_norm_option_still_works_and_says_so(capsys):
    cfg = TrainConfig(norm="post")
    assert cfg.residual == "post" and cfg.norm == ""
    assert "--norm is deprecated: use --residual post" in capsys.readouterr().err
    assert TrainConfig(norm="pre", residual="pre").residual == "pre"
