"""GraphedSampler, the diffusion head's per-token solver loop in a CUDA-graph-capturable form: on the CPU its static
loop (run eagerly) equals DiffusionHead.sample for the same noise in float64, a second call with new inputs gives
the new answer, and the loop makes no host synchronization (every static buffer is a tensor subclass that raises on
.item(), bool(), int(), .tolist(), .cpu(), nonzero, ...). `pytest -m gpu` captures the loop as a CUDA graph,
compares replays with the eager sampler and prints eager vs graphed sampling times of a batch of digits."""

import pytest
import torch

from nanomodels.latentlm import GraphedSampler, LatentLM
from nanomodels.transformer import TransformerConfig

STEPS = [1, 2, 3, 7]


def _latentlm(prediction="eps", dtype=torch.float64, device="cpu", std=0.05, seed=0):
    torch.manual_seed(seed)
    config = TransformerConfig(block_size=16, n_layers=2, d_model=32, n_heads=4)
    model = LatentLM(config, latent_dim=3, num_classes=10, head=dict(width=16, batch_mul=4, prediction=prediction))
    for p in model.model.head.parameters():  # away from the zero init, so that the head's output matters
        torch.nn.init.normal_(p, std=std)
    return model.to(device=device, dtype=dtype).eval()


def _inputs(head, N, guided, seed, dtype=torch.float64, device="cpu"):
    """cond (N or 2N, width) and the noise x_T (N, C) that DiffusionHead.sample draws from a generator seeded
    with `seed` (the same torch.randn call)."""
    g = torch.Generator(device=device).manual_seed(seed + 1000)
    cond = torch.randn(2 * N if guided else N, head.width, generator=g, dtype=dtype, device=device)
    noise = torch.randn(N, head.latent_dim, generator=torch.Generator(device=device).manual_seed(seed),
                        dtype=dtype, device=device)
    return cond, noise


def _reference(head, cond, seed, num_steps, solver, cfg):
    """DiffusionHead.sample, the existing sampler, whose x_T is the noise of _inputs(..., seed)."""
    N = cond.size(0) // 2 if cfg != 1.0 else cond.size(0)
    g = torch.Generator(device=cond.device).manual_seed(seed)
    return head.sample(cond[:N], num_steps, solver, c_uncond=cond[N:] if cfg != 1.0 else None, cfg_scale=cfg,
                       generator=g)


def _close(a, b, tol):
    err = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    assert err <= tol * scale, f"max |diff| {err:.3e} (largest |value| {scale:.3e}, tolerance {tol:g} relative)"


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("solver", ["ddim", "dpm"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_static_loop_equals_the_head_sampler(solver, cfg, num_steps, prediction):
    head = _latentlm(prediction).model.head
    cond, noise = _inputs(head, 5, cfg != 1.0, seed=num_steps)
    loop = GraphedSampler(head, (5, 3), num_steps, solver=solver, cfg=cfg)
    assert not loop.capture, "on the CPU the static loop must run eagerly"
    _close(loop(cond, noise), _reference(head, cond, num_steps, num_steps, solver, cfg), 1e-12)


@pytest.mark.parametrize("solver", ["ddim", "dpm"])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_second_call_with_new_inputs_gives_the_new_answer(solver, cfg):
    head = _latentlm().model.head
    loop = GraphedSampler(head, (4, 3), 5, solver=solver, cfg=cfg)
    (c1, n1), (c2, n2) = _inputs(head, 4, cfg != 1.0, seed=1), _inputs(head, 4, cfg != 1.0, seed=2)
    first = loop(c1, n1).clone()
    second = loop(c2, n2).clone()
    _close(first, _reference(head, c1, 1, 5, solver, cfg), 1e-12)
    _close(second, _reference(head, c2, 2, 5, solver, cfg), 1e-12)
    assert (first - second).abs().max() > 1e-3, "new inputs must change the answer"
    _close(loop(c2, n2), second, 0.0)  # the same inputs again: the same answer (nothing carried over)
    # only the noise changes, or only the condition: each reaches the output
    _close(loop(c2, n1), _reference(head, c2, 1, 5, solver, cfg), 1e-12)
    _close(loop(c1, n2), _reference(head, c1, 2, 5, solver, cfg), 1e-12)


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_sample_graphed_equals_sample(sampler, cfg_scale):
    model = _latentlm("v")
    labels = torch.tensor([1, 4, 7, 10])  # 10: the null class
    kw = dict(num_steps=4, sampler=sampler, cfg_scale=cfg_scale)
    a = model.sample(labels, 6, generator=torch.Generator().manual_seed(3), **kw)
    b = model.sample_graphed(labels, 6, generator=torch.Generator().manual_seed(3), **kw)
    assert a.shape == b.shape == (4, 6, 3)
    _close(b, a, 1e-12)


class HostSync(RuntimeError):
    pass


class NoHostSync(torch.Tensor):
    """A tensor whose results stay NoHostSync and which raises on every operation that reads a value on the host
    (on CUDA each of these waits for the device, and inside a graph capture each is an error)."""

    BANNED = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__format__",
              "__repr__", "nonzero", "masked_select", "unique", "unique_consecutive", "argwhere"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in cls.BANNED:
            raise HostSync(f"{name}: reads a tensor value on the host")
        return super().__torch_function__(func, types, args, kwargs or {})


def _guarded(loop):
    for name in ("cond", "noise", "out", "t", "coef"):
        setattr(loop, name, getattr(loop, name).as_subclass(NoHostSync))
    return loop


@pytest.mark.parametrize("solver", ["ddim", "dpm"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_static_step_makes_no_host_sync(solver, cfg, prediction):
    head = _latentlm(prediction).model.head
    loop = _guarded(GraphedSampler(head, (3, 3), 4, solver=solver, cfg=cfg))
    cond, noise = _inputs(head, 3, cfg != 1.0, seed=0)
    seen = []
    eps = head.eps
    head.eps = lambda x, t, c: seen.append(type(x) is NoHostSync and type(t) is NoHostSync) or eps(x, t, c)
    out = loop(cond, noise)  # raises HostSync on any host read inside the loop
    assert seen == [True] * 4, "the head must see the guarded tensors at every step"
    assert type(out) is NoHostSync
    _close(out.as_subclass(torch.Tensor), _reference(_latentlm(prediction).model.head, cond, 0, 4, solver, cfg),
           1e-12)


def test_the_host_sync_guard_catches_syncs():
    head = _latentlm().model.head
    cond, noise = _inputs(head, 3, False, seed=0)
    syncs = {  # each a plausible way to sync inside a sampling loop
        "item": lambda e: e * e.abs().max().item(),
        "branch": lambda e: e.clamp(-1, 1) if (e.abs() > 1).any() else e,
        "int": lambda e: e[: int(e.new_ones(()).sum())],
        "tolist": lambda e: e + torch.tensor(e[0].tolist(), dtype=e.dtype),
        "nonzero": lambda e: e.index_fill(0, (e[:, 0] > 0).nonzero()[:, 0], 0.0),
    }
    for name, sync in syncs.items():
        loop = _guarded(GraphedSampler(head, (3, 3), 3, solver="dpm"))
        inner = loop._eps
        loop._eps = lambda x, t: sync(inner(x, t))  # noqa: B023
        with pytest.raises(HostSync):
            loop(cond, noise)
        loop._eps = inner


def test_arguments_are_checked():
    head = _latentlm().model.head
    with pytest.raises(ValueError, match="solver"):
        GraphedSampler(head, (2, 3), 4, solver="euler")
    with pytest.raises(ValueError, match="batch_shape"):
        GraphedSampler(head, (2, 4), 4)
    with pytest.raises(ValueError, match="num_steps"):
        GraphedSampler(head, (2, 3), 0)
    with pytest.raises(ValueError, match="CUDA"):
        GraphedSampler(head, (2, 3), 4, capture=True)
    loop = GraphedSampler(head, (2, 3), 4, cfg=2.0)
    with pytest.raises(ValueError, match="expected"):
        loop(torch.zeros(2, 16, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64))  # needs (4, 16)


# ---- on a CUDA device (`pytest -m gpu`) -----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("solver", ["ddim", "dpm"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_captured_graph_replays_the_eager_loop(solver, cfg):
    head = _latentlm("v", dtype=torch.float32, device="cuda").model.head
    loop = GraphedSampler(head, (64, 3), 20, solver=solver, cfg=cfg)
    eager = GraphedSampler(head, (64, 3), 20, solver=solver, cfg=cfg, capture=False)
    assert loop.capture
    for seed in (1, 2, 3):  # the first call captures; the next ones replay with new inputs
        cond, noise = _inputs(head, 64, cfg != 1.0, seed, dtype=torch.float32, device="cuda")
        got = loop(cond, noise).clone()
        _close(got, eager(cond, noise), 1e-4)
        _close(got, _reference(head, cond, seed, 20, solver, cfg), 1e-4)
    assert loop.graph is not None


@pytest.mark.gpu
def test_time_eager_vs_graphed_sampling_of_digits():
    from nanomodels.bench_latentlm import benchmark_cuda_graph_sampling

    result = benchmark_cuda_graph_sampling("cuda", repeats=3)
    print(result)
    assert result["max_abs_diff"] < 1e-3 * max(1.0, result["max_abs"]), result
    assert result["eager_ms"] > 0 and result["graphed_ms"] > 0
