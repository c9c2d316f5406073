"""Next-token diffusion (LatentLM): the schedule, DDIM and DPM-Solver++(2M) against literal transcriptions and
the oracle denoiser, the adaLN diffusion head, the sigma-VAE, and the procedural digits. float64 throughout."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomodels.data import procedural_digits
from nanomodels.diffusion import (DiffusionHead, alpha_bar, cosine_schedule, ddim_sample, dpm_solver_sample,
                                  dpm_solver_timesteps, q_sample, sampling_timesteps)
from nanomodels.sigma_vae import (PlainVAE, SigmaVAE, gaussian_kl, latents_to_sequence, sequence_to_latents,
                                  sigma_vae_sample)
from nanomodels.transformer import TransformerConfig

SAMPLERS = {"ddim": ddim_sample, "dpm": dpm_solver_sample}
ABAR = alpha_bar(cosine_schedule(1000))
CHAPTER = "09"  # tests/conftest.py runs its graded checks (exercises/grading/checks/ch09_*) as `graded_check`


def test_graded_invariant_holds_for_the_library(graded_check):
    graded_check()


def _diff(a, b) -> str:
    d = (a - b).abs()
    return f"max |diff| {d.max().item():.3e}, mean {d.mean().item():.3e}"


# ---- naive oracles: the equations, written out one scalar at a time -----------------------------------------

def oracle_dpmpp_2m(eps_fn, x, abar, steps):
    """DPM-Solver++(2M), Lu et al. 2022 Alg. 2, with alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t)."""
    def alpha(t):
        return math.sqrt(abar[t].item())

    def sigma(t):
        return math.sqrt(1 - abar[t].item())

    def lam(t):
        return math.log(alpha(t) / sigma(t))

    history = []  # the data predictions x0_0, x0_1, ...
    for i, t in enumerate(steps):
        history.append((x - sigma(t) * eps_fn(x, torch.full((x.shape[0],), t, dtype=torch.long))) / alpha(t))
        if i == len(steps) - 1:
            return history[-1]
        s = steps[i + 1]
        h = lam(s) - lam(t)
        if i == 0:
            D = history[-1]
        else:
            h_last = lam(t) - lam(steps[i - 1])
            r = h_last / h
            D = (1 + 1 / (2 * r)) * history[-1] - 1 / (2 * r) * history[-2]
        x = sigma(s) / sigma(t) * x - alpha(s) * (math.exp(-h) - 1) * D
    return x


def oracle_denoiser(x0, abar):
    """eps_hat = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t): the perfect denoiser for one known x0."""
    return lambda x_t, t: (x_t - abar[t][:, None].sqrt() * x0) / (1 - abar[t][:, None]).sqrt()


def smooth_eps(x, t):
    """A deterministic, non-trivial eps_fn: depends on x nonlinearly and on t."""
    return torch.tanh(x) * (0.5 + t[:, None].double() / 1000) + 0.1 * x.roll(1, dims=-1)


def test_alphas_cumprod_strictly_decreases_from_one_to_zero():
    betas = cosine_schedule(1000)
    a = alpha_bar(betas)
    assert torch.equal(a, torch.cumprod(1 - betas, 0))
    assert (a[1:] < a[:-1]).all(), "abar_t must be strictly decreasing"
    assert a[0] > 0.9999, f"abar_0 = {a[0].item()} should be ~1"
    assert a[-1] < 1e-6, f"abar_(T-1) = {a[-1].item()} should be ~0"
    assert betas.max() <= 0.999 and betas[-1] == 0.999, "beta is capped at 0.999 (the last step hits the cap)"


def test_forward_process_keeps_unit_variance_and_forgets_x0():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(200_000, 1, generator=g, dtype=torch.float64)
    for t in (0, 250, 500, 999):
        x_t, _, _ = q_sample(x0, ABAR[t:t + 1].expand(1), generator=g)  # a one-step schedule at abar_t
        assert abs(x_t.var().item() - 1) < 0.02, f"Var(x_t) = {x_t.var().item():.4f} at t={t}, expected 1"
    corr = torch.corrcoef(torch.cat([x0, x_t], 1).T)[0, 1].item()
    assert abs(corr) < 0.01, f"x_(T-1) should be independent of x0, correlation {corr:.4f}"


def test_sampling_timesteps_run_from_T_minus_1_down_to_0():
    assert sampling_timesteps(1000, 1) == [999]
    assert sampling_timesteps(1000, 2) == [999, 0]
    for n in (5, 50, 1000):
        steps = sampling_timesteps(1000, n)
        assert len(steps) == n and steps[0] == 999 and steps[-1] == 0
        assert all(a > b for a, b in zip(steps, steps[1:])), f"timesteps must strictly decrease: {steps}"


# ---- samplers -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("num_steps", [1, 2, 5, 50])
@settings(deadline=None, max_examples=5)
@given(batch=st.integers(1, 4), dim=st.integers(1, 6), seed=st.integers(0, 2 ** 16))
def test_oracle_denoiser_recovers_x0_exactly(sampler, num_steps, batch, dim, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, dim, generator=g, dtype=torch.float64) * 2
    x_T = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    out = SAMPLERS[sampler](oracle_denoiser(x0, ABAR), x_T, ABAR, num_steps)
    assert torch.allclose(out, x0, rtol=0, atol=1e-10), f"{sampler} must return x0: {_diff(out, x0)}"


@pytest.mark.parametrize("grid", ["diffusers", "endpoint"])
@pytest.mark.parametrize("num_steps", [1, 2, 3, 10, 50])
def test_dpm_solver_matches_the_papers_algorithm(num_steps, grid):
    x_T = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = dpm_solver_sample(smooth_eps, x_T, ABAR, num_steps, grid=grid)
    expected = oracle_dpmpp_2m(smooth_eps, x_T, ABAR, dpm_solver_timesteps(1000, num_steps, grid))
    assert torch.allclose(out, expected, rtol=0, atol=1e-10), f"DPM-Solver++(2M) != Alg. 2: {_diff(out, expected)}"


def test_dpm_solver_second_order_beats_ddim_on_a_gaussian():
    """For x0 ~ N(0, s^2) the exact eps is x_t sqrt(1-a) / (a s^2 + 1 - a), and the probability-flow ODE keeps
    x_t / sqrt(a s^2 + 1 - a) constant: the exact sample is known in closed form."""
    s = 3.0
    a = ABAR[:, None]
    eps_fn = lambda x, t: x * (1 - a[t]).sqrt() / (a[t] * s ** 2 + 1 - a[t])  # noqa: E731
    x_T = torch.randn(64, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = x_T * s / (a[-1] * s ** 2 + 1 - a[-1]).sqrt()
    err = {name: (f(eps_fn, x_T, ABAR, 50) - exact).abs().max().item() for name, f in SAMPLERS.items()}
    assert err["dpm"] < err["ddim"] / 3, f"50 steps: DPM-Solver++(2M) error {err['dpm']:.3e}, DDIM {err['ddim']:.3e}"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_call_eps_fn_once_per_step_with_long_timesteps_per_row(sampler):
    calls = []

    def eps_fn(x, t):
        calls.append(t.clone())
        return torch.zeros_like(x)
    SAMPLERS[sampler](eps_fn, torch.randn(4, 2, dtype=torch.float64), ABAR, 7)
    assert len(calls) == 7, f"{len(calls)} calls for 7 steps"
    expected = sampling_timesteps(1000, 7) if sampler == "ddim" else dpm_solver_timesteps(1000, 7)
    for t, step in zip(calls, expected):
        assert t.dtype == torch.long and t.shape == (4,) and (t == step).all()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_reject_bad_arguments(sampler):
    f = SAMPLERS[sampler]
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="num_steps"):
        f(smooth_eps, x, ABAR, 0)
    with pytest.raises(ValueError, match="num_steps"):
        f(smooth_eps, x, ABAR, 1001)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        f(smooth_eps, x, ABAR[None], 5)
    with pytest.raises(ValueError, match="num_steps"):
        cosine_schedule(0)


# ---- the head -----------------------------------------------------------------------------------------------

def _head(**kw):
    torch.manual_seed(0)
    return DiffusionHead(TransformerConfig(d_model=16, n_heads=2), latent_dim=3, width=8, **kw).double()


def test_head_outputs_exactly_zero_at_init_so_the_first_loss_is_one():
    head = _head()
    g = torch.Generator().manual_seed(5)
    out = head.predict(torch.randn(64, 3, generator=g, dtype=torch.float64), torch.randint(0, 1000, (64,)),
                       torch.randn(64, 8, generator=g, dtype=torch.float64))
    assert torch.equal(out, torch.zeros_like(out)), "zero-initialized modulation and final layer must give 0"
    for block in head.blocks:
        x, c = torch.randn(7, 8, dtype=torch.float64), torch.randn(7, 8, dtype=torch.float64)
        assert torch.equal(block(x, c), x), "each adaLN block is the identity at init (gate = 0)"
    h = torch.randn(8, 32, 16, generator=g, dtype=torch.float64)
    loss = head.loss(h, torch.randn(8, 32, 3, generator=g, dtype=torch.float64), generator=g).item()
    assert abs(loss - 1) < 0.05, f"initial loss {loss:.4f}, expected E[eps^2] = 1"


def test_loss_is_the_mse_of_eps_over_batch_mul_noisy_copies():
    head = _head(batch_mul=3)
    for p in head.parameters():  # leave zero init so the prediction is not trivially 0
        torch.nn.init.normal_(p, std=0.3)
    g = torch.Generator().manual_seed(6)
    h, x0 = torch.randn(2, 4, 16, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, generator=g,
                                                                                 dtype=torch.float64)
    seen = []
    head.x_embed.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    loss = head.loss(h, x0, generator=torch.Generator().manual_seed(7))
    assert seen == [2 * 4 * 3], f"the head must see B * L * batch_mul = 24 rows, saw {seen}"
    rows = x0.reshape(-1, 3).repeat_interleave(3, 0)  # each target repeated batch_mul times, adjacent
    x_t, t, eps = q_sample(rows, head.alphas_cumprod, torch.Generator().manual_seed(7))
    c = head(h).reshape(-1, 8).repeat_interleave(3, 0)
    expected = ((head.predict(x_t, t, c) - eps) ** 2).mean()
    assert torch.allclose(loss, expected, rtol=0, atol=1e-12), f"loss: {_diff(loss, expected)}"


def test_v_prediction_converts_back_to_eps():
    head = _head(prediction="v")
    g = torch.Generator().manual_seed(9)
    x0, eps = torch.randn(50, 3, generator=g, dtype=torch.float64), torch.randn(50, 3, generator=g,
                                                                               dtype=torch.float64)
    t = torch.randint(0, 1000, (50,), generator=g)
    a = head.alphas_cumprod.double()[t][:, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    head.predict = lambda x, tt, c: a.sqrt() * eps - (1 - a).sqrt() * x0  # the true v
    out = head.eps(x_t, t, None)
    assert torch.allclose(out, eps, rtol=0, atol=1e-6), f"eps from v: {_diff(out, eps)}"


def test_guidance_scale_one_is_conditional_and_zero_is_unconditional():
    head = _head()
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    g = torch.Generator().manual_seed(10)
    c, c_u = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g,
                                                                             dtype=torch.float64)
    run = lambda cond, **kw: head.sample(cond, 5, generator=torch.Generator().manual_seed(0), **kw)  # noqa: E731
    assert torch.allclose(run(c, c_uncond=c_u, cfg_scale=1.0), run(c), rtol=0, atol=1e-10)
    assert torch.allclose(run(c, c_uncond=c_u, cfg_scale=0.0), run(c_u), rtol=0, atol=1e-10)
    assert not torch.allclose(run(c, c_uncond=c_u, cfg_scale=3.0), run(c), atol=1e-3)


def test_head_rejects_bad_configuration():
    config = TransformerConfig(d_model=16, n_heads=2)
    with pytest.raises(ValueError, match="prediction"):
        DiffusionHead(config, latent_dim=3, prediction="x0")
    with pytest.raises(ValueError, match="batch_mul"):
        DiffusionHead(config, latent_dim=3, batch_mul=0)
    with pytest.raises(ValueError, match="width"):
        DiffusionHead(config, latent_dim=3, width=7)
    with pytest.raises(ValueError, match="targets"):
        _head().loss(torch.zeros(2, 4, 16, dtype=torch.float64), torch.zeros(2, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="sampler"):
        _head().sample(torch.zeros(2, 8, dtype=torch.float64), sampler="euler")


# ---- sigma-VAE ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("noise_std", [0.75, 0.3])
def test_sigma_vae_sample_variance_is_the_fixed_scale_whatever_the_encoder(noise_std):
    x = procedural_digits(16, seed=1)[0].double()
    variances = []
    for seed, gain in ((0, 1.0), (1, 10.0)):  # two very different encoders
        torch.manual_seed(seed)
        vae = SigmaVAE(latent_dim=4, noise_std=noise_std).double()
        for p in vae.encoder.parameters():
            p.data.mul_(gain)
        mu = vae.encode(x)
        z = torch.stack([sigma_vae_sample(mu, noise_std, torch.Generator().manual_seed(s)) for s in range(400)])
        variances.append((z - mu).pow(2).mean().item())
    target = (noise_std / 0.8) ** 2
    for v in variances:
        assert abs(v / target - 1) < 0.05, f"E[(z - mu)^2] = {v:.4f}, expected (C/0.8)^2 = {target:.4f}"


def test_sigma_vae_loss_is_reconstruction_plus_weighted_mu_squared():
    torch.manual_seed(0)
    vae = SigmaVAE(latent_dim=4, kl_weight=0.01).double()
    x = procedural_digits(8, seed=2)[0].double()
    total, recon, kl = vae.loss(x, torch.Generator().manual_seed(3))
    mu = vae.encode(x)
    z = sigma_vae_sample(mu, 0.75, torch.Generator().manual_seed(3))
    assert torch.allclose(recon, ((vae.decode(z) - x) ** 2).mean(), rtol=0, atol=1e-12)
    assert torch.allclose(kl, (mu ** 2).mean(), rtol=0, atol=1e-12)
    assert torch.allclose(total, recon + 0.01 * kl, rtol=0, atol=1e-12)


def test_plain_vae_kl_is_the_gaussian_kl():
    g = torch.Generator().manual_seed(12)
    mu, logvar = torch.randn(6, 4, 2, 2, generator=g, dtype=torch.float64), torch.randn(6, 4, 2, 2, generator=g,
                                                                                       dtype=torch.float64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)).flatten(1)
    out = gaussian_kl(mu, logvar)
    assert torch.allclose(out, expected.sum(1).mean(), rtol=0, atol=1e-10)
    vae = PlainVAE(latent_dim=4).double()
    assert vae.encode(procedural_digits(3)[0].double()).shape == (3, 4, 4, 4)


def test_latent_patches_round_trip_in_raster_order():
    z = torch.arange(2 * 3 * 16, dtype=torch.float64).reshape(2, 3, 4, 4)
    seq = latents_to_sequence(z)
    assert seq.shape == (2, 16, 3) and torch.equal(seq[1, 5], z[1, :, 1, 1])
    assert torch.equal(sequence_to_latents(seq), z)


def test_vaes_reject_images_of_the_wrong_shape():
    with pytest.raises(ValueError, match="x"):
        SigmaVAE().encode(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="noise_std"):
        SigmaVAE(noise_std=-1.0)


# ---- procedural digits --------------------------------------------------------------------------------------

def test_procedural_digits_are_deterministic_images_in_unit_range():
    x, y = procedural_digits(300, seed=3)
    x2, y2 = procedural_digits(300, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2), "same seed, same data"
    assert not torch.equal(x, procedural_digits(300, seed=4)[0]), "another seed, other data"
    assert x.shape == (300, 1, 16, 16) and x.dtype == torch.float32 and y.shape == (300,)
    assert 0 <= x.min() and x.max() <= 1 and set(y.tolist()) == set(range(10))
    assert (x.flatten(1).amax(1) == 1).all(), "every image has ink"


def test_procedural_digit_labels_match_their_images():
    """A nearest-class-mean classifier fit on one seed labels another seed's images: labels mean something."""
    x, y = procedural_digits(2000, seed=5)
    means = torch.stack([x[y == k].flatten(1).mean(0) for k in range(10)])
    xt, yt = procedural_digits(500, seed=6)
    pred = torch.cdist(xt.flatten(1), means).argmin(1)
    acc = (pred == yt).float().mean().item()
    assert acc > 0.8, f"nearest-mean accuracy {acc:.3f}"


def test_procedural_digits_reject_bad_arguments():
    with pytest.raises(ValueError, match="n"):
        procedural_digits(0)
    with pytest.raises(ValueError, match="size"):
        procedural_digits(4, size=4)
