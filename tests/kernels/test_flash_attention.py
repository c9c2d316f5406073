"""FlashAttention-2 forward and backward with the UniLM mask kinds (kernels/flash_attention.py), in the tiers
of tiers.py. The oracle is a loop over (batch, head, query) with the mask predicate written from its
definition, in float64."""

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import kernels
from kernels.flash_attention import (
    allowed_mask,
    flash_attention,
    flash_attention_backward,
    flash_attention_fn,
    flash_attention_forward,
    MAX_TOKEN_STRIDE,
    forward_block_sizes,
    reference_attention,
    tile_plan,
)
from kernels.softmax import softmax
from nanomodels.attention import attention, causal_mask, sdpa_attention
from tiers import SENTINEL, TOL, assert_close, given, needs_interpreter, randn, st

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MASKS = {  # every mask kind, and key padding on its own and combined, for (B=2, Tk=200)
    "none": {},
    "causal": {"causal": True},
    "prefix": {"prefix_len": [70, 130]},
    "key_lengths": {"key_lengths": [150, 99]},
    "prefix+key_lengths": {"prefix_len": [70, 5], "key_lengths": [0, 133]},
    "causal+key_lengths": {"causal": True, "key_lengths": [200, 64]},
}



# ------------------------------------------------------------------------------------------------ oracles

def triton_config(bm, bn, warps, stages):
    triton = pytest.importorskip("triton", reason="triton is not installed: no autotune configs to prune")
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def naive_masked_attention(q, k, v, visible):
    """Loop over (batch, head, query); `visible(b, i, j)` is the mask predicate written from its definition.
    Returns the output and the natural-log LSE (-inf and a zero output for a row with no visible key)."""
    B, H, Tq, D = q.shape
    out = torch.zeros(B, H, Tq, D, dtype=torch.float64)
    lse = torch.full((B, H, Tq), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                keys = [j for j in range(k.size(2)) if visible(b, i, j)]
                if not keys:
                    continue
                s = torch.stack([q[b, h, i] @ k[b, h, j] / math.sqrt(D) for j in keys])
                lse[b, h, i] = s.max() + torch.log(torch.exp(s - s.max()).sum())
                out[b, h, i] = sum(torch.exp(s[n] - lse[b, h, i]) * v[b, h, j] for n, j in enumerate(keys))
    return out, lse


def predicate(t_q, t_k, causal=False, prefix_len=None, key_lengths=None):
    """visible(b, i, j) from the docstring of kernels.flash_attention, one clause per rule."""
    def visible(b, i, j):
        pos = i + t_k - t_q  # the queries are the last Tq positions
        if key_lengths is not None and j >= key_lengths[b]:
            return False
        if prefix_len is not None:
            return j < prefix_len[b] or j <= pos
        return j <= pos if causal else True
    return visible



mask_args = st.sampled_from(["none", "causal", "prefix", "key_lengths", "prefix+key_lengths"])



def draw_mask(data, kind, batch, t_q, t_k):
    lengths = st.lists(st.integers(0, t_k), min_size=batch, max_size=batch)
    kw = {}
    if kind in ("causal",):
        kw["causal"] = True
    if "prefix" in kind:
        kw["prefix_len"] = data.draw(lengths)
    if "key_lengths" in kind:
        kw["key_lengths"] = data.draw(lengths)
    return kw


def attention_case(dtype, B=2, H=1, t_q=200, t_k=200, D=64, seed=0):
    q = randn(B, H, t_q, D, seed=seed, dtype=dtype)
    k = randn(B, H, t_k, D, seed=seed + 1, dtype=dtype)
    v = randn(B, H, t_k, D, seed=seed + 2, dtype=dtype)
    do = randn(B, H, t_q, D, seed=seed + 3, dtype=dtype)
    return q, k, v, do


def check_against_reference(q, k, v, do, mask, tol, what):
    """Forward (O, LSE) and backward (dQ, dK, dV) of the kernel vs the float64 reference and autograd."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = flash_attention(*leaves, return_lse=True, **mask)
    out.backward(do)
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference_attention(*ref, return_lse=True, **mask)
    ref_out.backward(do.double())
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert_close(out, ref_out, f"{what}: O", **tol)
    assert_close(lse, ref_lse, f"{what}: LSE", **tol)
    for name, x, r in zip(("dQ", "dK", "dV"), leaves, ref):
        assert_close(x.grad, r.grad, f"{what}: {name}", **tol)



class TestReference:
    @given(data=st.data(), kind=mask_args, t_q=st.integers(1, 9), extra=st.integers(0, 4), d=st.sampled_from([1, 4]),
           seed=st.integers(0, 10_000))
    def test_reference_attention_matches_the_naive_formula_for_every_mask_kind(self, data, kind, t_q, extra, d,
                                                                                seed):
        B, H, t_k = 2, 2, t_q + extra
        q, k, v = (randn(B, H, t, d, seed=seed + i, dtype=torch.float64) for i, t in enumerate((t_q, t_k, t_k)))
        kw = draw_mask(data, kind, B, t_q, t_k)
        out, lse = reference_attention(q, k, v, return_lse=True, **kw)
        expected, expected_lse = naive_masked_attention(q, k, v, predicate(t_q, t_k, **kw))
        assert_close(out, expected, f"reference output, {kw}", 1e-10)
        assert_close(lse, expected_lse, f"reference LSE, {kw}", 1e-10)

    def test_mask_kinds_reduce_to_each_other_at_the_edges(self):
        t = 9
        assert torch.equal(allowed_mask(t, t, causal=True)[0, 0], causal_mask(t))
        assert torch.equal(allowed_mask(t, t, prefix_len=0)[0, 0], causal_mask(t)), "prefix 0 = causal"
        assert allowed_mask(t, t, prefix_len=t).all(), "prefix = Tk: bidirectional"
        padded = allowed_mask(t, t, key_lengths=[4, 9], batch=2)
        assert not padded[0, :, :, 4:].any() and padded[0, :, :, :4].all() and padded[1].all()

    def test_tile_plan_of_causal_square_tiles_is_the_lower_triangle(self):
        plan = tile_plan(causal_mask(256), 64, 64)
        assert torch.equal(plan, 2 * torch.ones(4, 4, dtype=torch.long).tril(-1) + torch.eye(4, dtype=torch.long))

    def test_config_pruning_drops_what_spills_or_overflows_shared_memory_and_keeps_a_default(self):
        from kernels.flash_attention import DKDV_CONFIGS, FWD_CONFIGS, shared_memory_bound, usable_configs

        assert usable_configs("fwd", 90, 128, 2, 227 * 1024) == FWD_CONFIGS, "sm_90 keeps every fp16 config"
        assert usable_configs("fwd", 80, 64, 2, 163 * 1024) == FWD_CONFIGS, "sm_80 at D=64 keeps them too"
        assert usable_configs("fwd", 80, 128, 2, 163 * 1024) == [(64, 64, 4, 3), (64, 32, 4, 2)], \
            "sm_80 at D=128 keeps only the forward configs that do not spill there"
        assert (32, 128, 4, 2) not in usable_configs("dkdv", 86, 128, 2, 99 * 1024)
        fp32 = usable_configs("dkdv", 86, 64, 4, 99 * 1024)  # fp32 on a 99 KiB device
        assert fp32 == [c for c in DKDV_CONFIGS if shared_memory_bound("dkdv", c, 64, 4) <= 99 * 1024] == \
            [(32, 64, 4, 3)], fp32
        assert usable_configs("fwd", 80, 128, 4, 163 * 1024) == [(64, 32, 4, 2)], "fp32 D=128 on sm_80"
        tiny = usable_configs("dkdv", 80, 128, 4, 1024)  # nothing fits: the smallest non-spilling one remains
        assert tiny == [(32, 64, 4, 3)], tiny

    def test_the_autotune_pruner_asks_the_launch_device(self, monkeypatch):
        from types import SimpleNamespace

        from kernels import flash_attention as fa

        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device=None: SimpleNamespace(shared_memory_per_block_optin=163 * 1024))
        configs = [triton_config(*c) for c in fa.FWD_CONFIGS]
        prune = fa._pruner("fwd")["early_config_prune"]
        kept = prune(configs, {"Q": torch.zeros(1, 1, 1, 128)}, HEAD_DIM=128, MASK_KIND=0)
        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept] == \
            [(64, 32, 4, 2)], "fp32 at D=128 on an sm_80 device"

    @pytest.mark.parametrize("kernel, config, d, elem, measured", [
        ("fwd", (64, 64, 4, 3), 128, 4, 229376), ("fwd", (128, 64, 8, 2), 128, 2, 98304),
        ("dkdv", (32, 64, 4, 3), 128, 2, 82944), ("dkdv", (32, 64, 4, 3), 128, 4, 131584),
        ("dq", (64, 32, 4, 2), 128, 4, 131072), ("dq", (64, 32, 4, 2), 128, 2, 65536)])
    def test_shared_memory_bound_is_at_least_what_the_compiler_allocated(self, kernel, config, d, elem, measured):
        """`measured`: metadata.shared on sm_90 from `python -m kernels.aot`-style compiles (Triton 3.9)."""
        from kernels.flash_attention import shared_memory_bound

        assert measured <= shared_memory_bound(kernel, config, d, elem) <= 1.4 * measured

    BAD = {  # name: (change to valid arguments q, k, v of shape (2, 1, 10, 16), the message it must raise)
        "q not 4-D": (lambda q, k, v: dict(q=q[0]), "q: expected a tensor of shape \\(B, H, T, D\\)"),
        "k batch differs": (lambda q, k, v: dict(k=k[:1]), "k, v: expected shape"),
        "v length differs": (lambda q, k, v: dict(v=v[..., :2, :]), "k, v: expected shape"),
        "mixed dtypes": (lambda q, k, v: dict(q=q.half()), "q, k, v: one dtype"),
        "float64": (lambda q, k, v: dict(q=q.double(), k=k.double(), v=v.double()), "q, k, v: one dtype"),
        "two devices": (lambda q, k, v: dict(k=k.to("meta")), "q, k, v: must be on one device"),
        "D=8": (lambda q, k, v: dict(q=q[..., :8], k=k[..., :8], v=v[..., :8]), "head size D must be one of"),
        "D=48": (lambda q, k, v: {n: x.repeat(1, 1, 1, 3) for n, x in zip("qkv", (q, k, v))},
                 "head size D must be one of"),
        "prefix_len > Tk": (lambda q, k, v: dict(prefix_len=11), "prefix_len: every value must be in \\[0, Tk\\]"),
        "prefix_len < 0": (lambda q, k, v: dict(prefix_len=-1), "prefix_len: every value must be in \\[0, Tk\\]"),
        "prefix_len not (B,)": (lambda q, k, v: dict(prefix_len=[1, 2, 3]),
                                "prefix_len: expected an int or shape \\(B,\\)"),
        "prefix_len float": (lambda q, k, v: dict(prefix_len=2.5), "prefix_len: expected an int"),
        "key_lengths float": (lambda q, k, v: dict(key_lengths=torch.tensor([3.0, 4.0])),
                              "key_lengths: must hold integers"),
        "key_lengths > Tk": (lambda q, k, v: dict(key_lengths=[3, 11]),
                             "key_lengths: every value must be in \\[0, Tk\\]"),
        "causal and prefix": (lambda q, k, v: dict(causal=True, prefix_len=3), "causal, prefix_len: pick one"),
        "causal, Tq > Tk": (lambda q, k, v: dict(q=torch.cat([q, q], 2), causal=True),
                            "causal/prefix_len: need Tk >= Tq"),
    }

    @pytest.mark.parametrize("case", list(BAD))
    def test_bad_arguments_raise_before_any_launch(self, case):
        bad, match = self.BAD[case]
        q, k, v = (randn(2, 1, 10, 16, seed=i) for i in range(3))
        kw = {"q": q, "k": k, "v": v, **bad(q, k, v)}
        with pytest.raises(ValueError, match=match):
            flash_attention(**kw)

    def test_every_grid_axis_stays_within_cudas_limits_at_the_largest_shapes(self):
        """Arithmetic, no launch: B * H past 65,535 (B=4097, H=16 is 65,552) is split over batch ranges; T = 2^24
        tokens is 2^20 tiles on axis x; H past 65,535 alone raises ValueError (meta tensors: nothing is run)."""
        from kernels import GRID_MAX
        from kernels.flash_attention import batch_chunks, launch_grids
        for B, H, t in ((8, 16, 128 * 1024), (4097, 16, 256), (1, 65535, 16), (2, 8, 2**24)):
            grids = launch_grids(B, H, t, t)
            assert all(0 < g <= lim for _, grid in grids for g, lim in zip(grid, GRID_MAX)), grids
            assert sum(grid[1] for name, grid in grids if name.startswith("dq")) == B * H
        assert batch_chunks(4097, 16) == [(0, 4095), (4095, 4097)]
        q = torch.empty(1, 65536, 1, 16, device="meta")
        with pytest.raises(ValueError, match="q: H = 65536 heads"):
            flash_attention(q, q, q)

    def test_flash_attention_fn_rejects_an_arbitrary_mask_and_says_what_to_use(self):
        q = randn(1, 1, 4, 16)
        with pytest.raises(ValueError, match="nanomodels.attention.attention.*causal.*prefix_len.*key_lengths"):
            flash_attention_fn(q, q, q, torch.ones(4, 4, dtype=torch.bool))

    def test_cpu_tensors_without_the_interpreter_fall_back_to_the_reference_and_say_so(self, monkeypatch):
        monkeypatch.setattr(kernels, "INTERPRET", False)
        monkeypatch.setattr(kernels, "_warned", set())
        q, k, v = (randn(1, 2, 20, 16, seed=i) for i in range(3))
        with pytest.warns(UserWarning, match="using the PyTorch reference"):
            out = flash_attention(q, k, v, causal=True)
        assert_close(out, attention(q, k, v, causal=True), "fallback output", 1e-6)
        x = randn(3, 7)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once, not on every call
            assert_close(softmax(x), torch.softmax(x, -1), "fallback softmax", 1e-6)

    def test_kernels_import_and_fall_back_without_triton(self):
        code = ("import sys, warnings, torch; sys.modules['triton'] = None\n"
                "import kernels; from kernels.flash_attention import flash_attention; "
                "from kernels.softmax import softmax\n"
                "assert not kernels.HAS_TRITON\n"
                "with warnings.catch_warnings(record=True) as w:\n"
                "    warnings.simplefilter('always'); q = torch.randn(1, 1, 5, 16)\n"
                "    flash_attention(q, q, q, causal=True); softmax(q)\n"
                "assert len(w) == 1 and 'triton is not installed' in str(w[0].message), [str(x.message) for x in w]\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=REPO)
        assert out.returncode == 0, out.stderr[-2000:]


@needs_interpreter
class TestInterpreter:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("d", [32, 64])
    @pytest.mark.parametrize("mask", list(MASKS), ids=list(MASKS))
    def test_flash_attention_forward_and_backward_match_the_reference(self, mask, d, dtype):
        q, k, v, do = attention_case(dtype, D=d, seed=d)
        check_against_reference(q, k, v, do, MASKS[mask], TOL[dtype], f"{mask}, D={d}, {dtype}")

    def test_batches_past_the_grid_limit_are_launched_in_chunks(self, monkeypatch):
        """With grid axis y cut to 5 programs, B=3, H=2 runs as three launches of one batch (B * H = 6 > 5)."""
        import kernels.flash_attention as fa
        monkeypatch.setattr(fa, "GRID_MAX", (2**31 - 1, 5, 5))
        assert fa.batch_chunks(3, 2) == [(0, 2), (2, 3)] and fa.batch_chunks(3, 5) == [(0, 1), (1, 2), (2, 3)]
        q, k, v, do = attention_case(torch.float32, B=3, H=2, t_q=40, t_k=40, D=16, seed=7)
        check_against_reference(q, k, v, do, {"key_lengths": [40, 17, 3]},
                                TOL[torch.float32], "B * H = 6 over launches of at most 5")

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("d", [16, 128])
    @pytest.mark.parametrize("mask", ["causal", "prefix+key_lengths"])
    def test_the_smallest_and_largest_head_sizes(self, mask, d, dtype):
        q, k, v, do = attention_case(dtype, t_q=130, t_k=130, D=d, seed=d)
        kw = {key: [min(x, 130) for x in val] if isinstance(val, list) else val for key, val in MASKS[mask].items()}
        check_against_reference(q, k, v, do, kw, TOL[dtype], f"{mask}, D={d}, {dtype}")

    @pytest.mark.parametrize("mask", ["none", "causal", "prefix+key_lengths"])
    def test_queries_that_are_the_last_positions_of_a_longer_key_sequence(self, mask):
        q, k, v, do = attention_case(torch.float32, B=2, t_q=37, t_k=150, D=32, seed=7)
        kw = {key: [min(x, 150) for x in val] if isinstance(val, list) else val for key, val in MASKS[mask].items()}
        check_against_reference(q, k, v, do, kw, TOL[torch.float32], f"Tq=37 < Tk=150, {mask}")

    def test_strided_inputs_like_multi_head_attention_makes_them(self):
        B, T, H, D = 2, 100, 2, 32
        x = randn(B, T, 3 * H * D, seed=8)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in x.split(H * D, dim=-1))  # non-contiguous views
        do = randn(B, T, H, D, seed=9).transpose(1, 2)
        assert not q.is_contiguous() and not do.is_contiguous()
        check_against_reference(q, k, v, do, {"causal": True}, TOL[torch.float32], "strided q, k, v, dO")

    def test_a_row_with_no_visible_key_gives_zeros_not_nan(self):
        q, k, v, do = attention_case(torch.float32, D=32, seed=10)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = flash_attention(*leaves, key_lengths=[0, 200], return_lse=True)
        out.backward(do)
        assert (out[0] == 0).all() and torch.isneginf(lse[0]).all() and torch.isfinite(out).all()
        assert all(torch.isfinite(x.grad).all() and (x.grad[0] == 0).all() for x in leaves)

    def test_padding_keys_are_never_read(self):
        q, k, v, do = attention_case(torch.float32, D=32, seed=11)
        lengths = [77, 130]
        k_nan, v_nan = k.clone(), v.clone()
        for b, n in enumerate(lengths):
            k_nan[b, :, n:], v_nan[b, :, n:] = math.nan, math.nan  # a read would spread NaN through O and dQ
        out, lse = flash_attention(q, k_nan, v_nan, key_lengths=lengths, return_lse=True)
        ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), key_lengths=lengths, return_lse=True)
        assert_close(out, ref, "O with NaN padding keys", 1e-5)
        assert_close(lse, ref_lse, "LSE with NaN padding keys", 1e-5)
        kw = dict(key_lengths=lengths)
        dq, dk, dv = flash_attention_backward(q, k_nan, v_nan, out, lse, do, **kw)
        assert torch.isfinite(dq).all(), "dQ read a padding key"

    def test_attention_writes_nothing_outside_its_outputs(self):
        B, H, T, D = 2, 1, 200, 32
        q, k, v, do = attention_case(torch.float32, B=B, H=H, D=D, seed=12)
        mask = MASKS["prefix+key_lengths"]

        def guarded(*shape):
            buf = torch.full((B, H + 1, T + 7, D + 16)[:len(shape)], SENTINEL)
            view = buf[(slice(None),) + tuple(slice(0, n) for n in shape[1:])]
            return buf, view

        (o_buf, o), (l_buf, lse) = guarded(B, H, T, D), guarded(B, H, T)
        flash_attention_forward(q, k, v, out=o, lse=lse, **mask)
        grads = [guarded(B, H, T, D) for _ in range(3)]
        flash_attention_backward(q, k, v, o, lse, do, dq=grads[0][1], dk=grads[1][1], dv=grads[2][1], **mask)
        for name, (buf, view) in zip(("O", "LSE", "dQ", "dK", "dV"), [(o_buf, o), (l_buf, lse), *grads]):
            inside = torch.zeros_like(buf, dtype=torch.bool)
            inside[(slice(None),) + tuple(slice(0, n) for n in view.shape[1:])] = True
            written = int((buf[~inside] != SENTINEL).sum())
            assert written == 0, f"{name}: {written} guard-band elements overwritten (out-of-bounds store)"
            assert (view != SENTINEL).all(), f"{name}: part of the output was never written"
        ref = reference_attention(q.double(), k.double(), v.double(), **mask)
        assert_close(o, ref, "O written into a guarded view", 1e-5)

    @pytest.mark.parametrize("mask", list(MASKS), ids=list(MASKS))
    @pytest.mark.parametrize("t_q", [200, 37])
    def test_the_kernel_visits_exactly_the_tiles_the_mask_needs(self, mask, t_q):
        B, H, t_k = 2, 1, 200
        q, k, v, _ = attention_case(torch.float32, B=B, H=H, t_q=t_q, t_k=t_k, D=16, seed=13)
        counts = torch.full((B * H, math.ceil(t_q / 16), 2), -1, dtype=torch.int32)
        flash_attention_forward(q, k, v, tile_counts=counts, **MASKS[mask])
        bm, bn = forward_block_sizes()
        allowed = allowed_mask(t_q, t_k, batch=B, **MASKS[mask])
        for b in range(B):
            plan = tile_plan(allowed[b, 0], bm, bn)
            expected = torch.stack([(plan == 2).sum(1), (plan == 1).sum(1)], dim=1).int()
            got = counts[b * H, :plan.size(0)]
            assert torch.equal(got, expected), (f"{mask}, batch {b}: (unmasked, masked) tiles per query tile "
                                                f"{got.tolist()}, the mask needs {expected.tolist()}")

    def test_causal_skips_about_half_of_the_tiles(self):
        q, k, v, _ = attention_case(torch.float32, B=1, t_q=256, t_k=256, D=16, seed=14)
        visited = {}
        for name in ("none", "causal"):
            counts = torch.zeros((1, 16, 2), dtype=torch.int32)
            flash_attention_forward(q, k, v, tile_counts=counts, **MASKS[name])
            visited[name] = int(counts.sum())
        n = 256 // forward_block_sizes()[0]
        assert visited["none"] == n * n and visited["causal"] == n * (n + 1) // 2, visited

    def test_bfloat16_attention_is_computed_in_float32_under_the_interpreter(self):
        q, k, v, _ = attention_case(torch.bfloat16, B=1, t_q=64, t_k=64, D=32, seed=15)
        out = flash_attention(q, k, v, causal=True)
        assert out.dtype == torch.bfloat16
        assert_close(out, reference_attention(q.double(), k.double(), v.double(), causal=True), "bf16 O", 1e-2)

    def test_drop_in_attention_function_with_a_kv_cache_query(self):
        q, k, v, _ = attention_case(torch.float32, B=2, H=2, t_q=50, t_k=50, D=32, seed=16)
        for what, (tq, causal) in {"bidirectional": (50, False), "causal": (50, True),
                                   "one query against 50 cached keys": (1, True)}.items():
            expected = sdpa_attention(q[:, :, -tq:], k, v, causal=causal)
            assert_close(flash_attention_fn(q[:, :, -tq:], k, v, causal=causal), expected,
                         f"flash_attention_fn vs sdpa_attention, {what}", 1e-5)

    @pytest.mark.parametrize("where", ["head offset", "token offsets"])
    def test_offsets_beyond_two_to_the_31_elements_in_forward_and_backward(self, where):
        """q, k, v, dO are views into one huge buffer that is reserved, not touched (a few MB are written): the
        third head starts at element 2 (2^30 + 128) > 2^31, or token t sits at t (2^23 - 64) (past 2^31 from
        t = 257). Each stride fits in int32 (so Triton passes it as int32), and the token stride is one the
        kernel takes without a copy (< MAX_TOKEN_STRIDE); with an int32 product of an index and a stride the
        addresses wrap around: wrong values or a segfault."""
        B, H, T, D = 1, 3, 272, 16
        stride_h, stride_t = ((2**30 + 128, 64) if where == "head offset" else (128, MAX_TOKEN_STRIDE - 64))
        size = 64 + (H - 1) * stride_h + (T - 1) * stride_t + D
        try:
            buf = torch.empty(size, dtype=torch.float16)
        except RuntimeError as e:
            pytest.skip(f"cannot reserve {2 * size / 2**30:.1f} GiB of virtual memory here: {e}")
        small = attention_case(torch.float16, B=B, H=H, t_q=T, t_k=T, D=D, seed=30)
        views = []
        for i, x in enumerate(small):  # q, k, v, dO side by side: element offsets 0, 16, 32, 48 in each row
            view = buf.as_strided((B, H, T, D), (H * stride_h, stride_h, stride_t, 1), storage_offset=16 * i)
            view.copy_(x)
            views.append(view)
        q, k, v, do = views
        assert q.storage_offset() + (q.size(1) - 1) * q.stride(1) + (q.size(2) - 1) * q.stride(2) >= 2**31
        leaves = [x.requires_grad_() for x in (q, k, v)]
        out, lse = flash_attention(*leaves, causal=True, return_lse=True)
        out.backward(do)
        ref = [x.double().requires_grad_() for x in small[:3]]
        ref_out, ref_lse = reference_attention(*ref, causal=True, return_lse=True)
        ref_out.backward(small[3].double())
        assert_close(out, ref_out, f"O, {where} past 2^31", **TOL[torch.float16])
        assert_close(lse, ref_lse, f"LSE, {where} past 2^31", **TOL[torch.float16])
        for name, x, r in zip(("dQ", "dK", "dV"), leaves, ref):
            assert_close(x.grad, r.grad, f"{name}, {where} past 2^31", **TOL[torch.float16])

    @pytest.mark.parametrize("key_lengths", [None, [150, 40]], ids=["all keys", "key_lengths"])
    def test_merging_two_calls_by_their_lse_gives_the_dense_gradients(self, key_lengths):
        """Keys split in two halves, each half attended separately, the outputs merged by their LSE (as dilated
        attention and split-KV decoding do): the merged output and dQ, dK, dV equal those of dense attention.
        The gradient reaches q and k through the LSE too, so an LSE without gradient is off by O(0.1)."""
        q, k, v, do = attention_case(torch.float32, B=2, H=2, t_q=96, t_k=160, D=32, seed=31)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        halves = []
        for start, end in ((0, 80), (80, 160)):
            part_kw = {} if key_lengths is None else {"key_lengths": [min(max(n - start, 0), end - start)
                                                                      for n in key_lengths]}
            halves.append(flash_attention(leaves[0], leaves[1][:, :, start:end], leaves[2][:, :, start:end],
                                          return_lse=True, **part_kw))
        (o1, l1), (o2, l2) = halves
        lse = torch.logaddexp(l1, l2)
        out = torch.exp(l1 - lse)[..., None] * o1 + torch.exp(l2 - lse)[..., None] * o2
        (out * do).sum().backward()
        ref = [x.double().requires_grad_() for x in (q, k, v)]
        ref_out, ref_lse = reference_attention(*ref, return_lse=True, key_lengths=key_lengths)
        (ref_out * do.double()).sum().backward()
        assert_close(out, ref_out, "merged O", **TOL[torch.float32])
        assert_close(lse, ref_lse, "merged LSE", **TOL[torch.float32])
        for name, x, r in zip(("dQ", "dK", "dV"), leaves, ref):
            assert_close(x.grad, r.grad, f"{name} through the LSE merge", **TOL[torch.float32])

    def test_lse_alone_has_the_gradient_of_logsumexp(self):
        q, k, v, _ = attention_case(torch.float32, B=2, H=1, t_q=70, t_k=130, D=32, seed=32)
        weights = randn(2, 1, 70, seed=33)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        _, lse = flash_attention(*leaves, prefix_len=[20, 90], return_lse=True)
        (lse * weights).sum().backward()
        ref = [x.double().requires_grad_() for x in (q, k, v)]
        _, ref_lse = reference_attention(*ref, prefix_len=[20, 90], return_lse=True)
        (ref_lse * weights.double()).sum().backward()
        for name, x, r in zip(("dQ", "dK"), leaves, ref):
            assert_close(x.grad, r.grad, f"{name} of sum(w * LSE)", **TOL[torch.float32])
        assert_close(leaves[2].grad, torch.zeros_like(v), "dV of sum(w * LSE) (the LSE does not depend on V)", 0.0)

    @pytest.mark.parametrize("needs", ["q", "k", "v", "k, v"])
    def test_backward_runs_only_the_kernels_whose_gradients_are_needed(self, needs, monkeypatch):
        from kernels import flash_attention as fa

        launched = []
        for name in ("_dkdv", "_dq"):
            tuner = getattr(fa, name)
            monkeypatch.setattr(tuner, "run", lambda *a, _run=tuner.run, _name=name, **kw: (launched.append(_name),
                                                                                           _run(*a, **kw))[1])
        q, k, v, do = attention_case(torch.float32, B=1, t_q=64, t_k=64, D=16, seed=34)
        wanted = needs.split(", ")
        leaves = {n: x.clone().requires_grad_(n in wanted) for n, x in zip("qkv", (q, k, v))}
        flash_attention(leaves["q"], leaves["k"], leaves["v"], causal=True).backward(do)
        expected = (["_dkdv"] if {"k", "v"} & set(wanted) else []) + (["_dq"] if "q" in wanted else [])
        assert launched == expected, f"needs a gradient: {wanted}; kernels launched {launched}, expected {expected}"
        ref = {n: x.double().requires_grad_(n in wanted) for n, x in zip("qkv", (q, k, v))}
        reference_attention(ref["q"], ref["k"], ref["v"], causal=True).backward(do.double())
        for n in "qkv":
            if n in wanted:
                assert_close(leaves[n].grad, ref[n].grad, f"d{n.upper()} when only {wanted} need one", 1e-5, 1e-5)
            else:
                assert leaves[n].grad is None

    def test_decoding_token_by_token_uses_few_autotune_keys(self, monkeypatch):
        """generate() with a KV cache calls the kernel with Tq = 1 and Tk growing by one per token; the autotune
        key holds the lengths rounded up to powers of two, so 20 tokens give a handful of keys, not 20."""
        from kernels import flash_attention as fa
        from nanomodels.transformer import Transformer, TransformerConfig

        keys = set()
        tuner = fa._fwd
        run = tuner.run

        def recording_run(*args, **kw):
            named = {**dict(zip(tuner.arg_names, args)), **kw}
            keys.add(tuple(named[k] for k in tuner.keys))
            return run(*args, **kw)

        monkeypatch.setattr(tuner, "run", recording_run)
        torch.manual_seed(0)
        model = Transformer(TransformerConfig(vocab_size=32, block_size=64, n_layers=1, d_model=32, n_heads=2),
                           attention_fn=flash_attention_fn).float().eval()
        prompt = torch.randint(0, 32, (1, 5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model.generate(prompt, 20, temperature=0.0)
        lengths = {named_t_k for _, named_t_k, *_ in keys}
        assert len(keys) <= 4 and lengths <= {8, 16, 32}, f"{len(keys)} autotune keys over 20 tokens: {sorted(keys)}"

    def test_training_a_few_steps_through_the_kernel_gives_the_reference_losses(self):
        from nanomodels.transformer import Transformer, TransformerConfig

        config = TransformerConfig(vocab_size=32, block_size=32, n_layers=2, d_model=64, n_heads=2)
        idx = torch.randint(0, 32, (2, 33), generator=torch.Generator().manual_seed(0))
        losses = {}
        for name, fn in (("reference", attention), ("flash", flash_attention_fn)):
            torch.manual_seed(0)
            model = Transformer(config, attention_fn=fn).float()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            losses[name] = []
            for _ in range(3):
                _, loss = model(idx[:, :-1], idx[:, 1:])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses[name].append(loss.item())
        assert losses["flash"][-1] < losses["flash"][0], f"the loss did not go down: {losses['flash']}"
        assert_close(torch.tensor(losses["flash"]), torch.tensor(losses["reference"]), "losses over 3 AdamW steps",
                     1e-5, 1e-5)


@pytest.mark.gpu
class TestGPU:
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    @pytest.mark.parametrize("d", [64, 128])
    @pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
    def test_flash_attention_matches_sdpa(self, causal, d, dtype):
        q, k, v, do = attention_case(dtype, B=2, H=4, t_q=1000, t_k=1000, D=d, seed=20)
        q, k, v, do = (x.cuda() for x in (q, k, v, do))
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = flash_attention(*leaves, causal=causal)
        out.backward(do)
        ref = [x.float().requires_grad_() for x in (q, k, v)]
        ref_out = torch.nn.functional.scaled_dot_product_attention(*ref, is_causal=causal)
        ref_out.backward(do.float())
        tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=4e-3, rtol=4e-3)
        assert_close(out, ref_out, f"O vs SDPA ({dtype})", **tol)
        for name, x, r in zip(("dQ", "dK", "dV"), leaves, ref):
            assert_close(x.grad, r.grad, f"{name} vs SDPA autograd ({dtype})", **tol)

    @pytest.mark.parametrize("mask", list(MASKS), ids=list(MASKS))
    def test_every_mask_kind_on_the_gpu(self, mask):
        q, k, v, do = (x.cuda() for x in attention_case(torch.float16, D=64, seed=21))
        check_against_reference(q, k, v, do, MASKS[mask], dict(atol=4e-3, rtol=4e-3), f"GPU {mask}")
