"""Chapter 09's graded checks: the cosine schedule, the DDIM sampler, the adaLN modulation and its zero init,
per-token timesteps in the forward process, the sigma-VAE sample.

Each check tests what the paper (or the official code it follows) promises, in float64, against the learner's
function (its first argument). Known-wrong solutions: exercises/mutants/ch09_next_token_diffusion.py.
"""

import math

import torch
import torch.nn as nn
from hypothesis import strategies as st

from exercises.checking import Exercise, Violation, check
from exercises.checks.common import F64, expect_tensor, naive_layer_norm, seeds
from nanomodels.diffusion import alpha_bar, cosine_schedule, sampling_timesteps

ABAR = alpha_bar(cosine_schedule(1000))


def _abar_oracle(tau: float) -> float:
    return math.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2


# ---- 9.1 the cosine schedule --------------------------------------------------------------------------------

@check("betas (T,) float64 with beta_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999), "
       "abar(tau) = cos^2(((tau + 0.008) / 1.008) pi / 2)", T=st.integers(1, 2000))
def betas_follow_the_formula(cosine_schedule, T):
    betas = expect_tensor(cosine_schedule(T), (T,), F64, f"cosine_schedule({T})")
    want = torch.tensor([min(1 - _abar_oracle((t + 1) / T) / _abar_oracle(t / T), 0.999) for t in range(T)],
                        dtype=F64)
    diff = (betas - want).abs()
    if not diff.max() < 1e-12:
        t = int(diff.argmax())
        raise Violation(f"T = {T}: beta_{t} = {betas[t].item():.10g}, the formula gives {want[t].item():.10g} "
                        f"(max |diff| {diff.max().item():.3g})")


@check("with T = 1000, abar_t = prod(1 - beta) strictly decreases from ~1 (abar_0 > 0.9999) to ~0 "
       "(abar_999 < 1e-6, not exactly 0: beta is capped at 0.999)")
def alphas_cumprod_from_one_to_zero(cosine_schedule):
    a = torch.cumprod(1 - cosine_schedule(1000), 0)
    if not (a[1:] < a[:-1]).all():
        raise Violation("abar_t is not strictly decreasing")
    if not (a[0] > 0.9999 and 0 < a[-1] < 1e-6):
        raise Violation(f"abar_0 = {a[0].item():.6g}, abar_999 = {a[-1].item():.3g}; expected abar_0 > 0.9999 and "
                        "0 < abar_999 < 1e-6 (a beta of 1 would make it exactly 0: cap at 0.999)")


# ---- 9.2 the DDIM sampler -----------------------------------------------------------------------------------

def _oracle_eps(x0):
    return lambda x_t, t: (x_t - ABAR[t][:, None].sqrt() * x0) / (1 - ABAR[t][:, None]).sqrt()


def _smooth_eps(x, t):
    return torch.tanh(x) * (0.5 + t[:, None].to(F64) / 1000) + 0.1 * x.roll(1, dims=-1)


@check("with the oracle denoiser eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) the sampler returns x0 "
       "exactly (1e-10) for 1, 2, 5 and 50 steps: abar = 1 after the last step", seed=seeds,
       num_steps=st.sampled_from([1, 2, 5, 50]))
def oracle_denoiser_returns_x0(ddim_sample, seed, num_steps):
    g = torch.Generator().manual_seed(seed)
    x0, x_T = torch.randn(3, 4, generator=g, dtype=F64) * 2, torch.randn(3, 4, generator=g, dtype=F64)
    out = expect_tensor(ddim_sample(_oracle_eps(x0), x_T, ABAR, num_steps), (3, 4), F64, "ddim_sample")
    diff = (out - x0).abs().max().item()
    if not diff < 1e-10:
        raise Violation(f"{num_steps} steps: the result differs from x0 by {diff:.3g}; after the step at t = 0 "
                        "the next abar is 1, so the last step returns the predicted x0")


@check("each step is x_s = sqrt(a_s) x0_hat + sqrt(1 - a_s) eps with x0_hat = (x_t - sqrt(1 - a_t) eps) / "
       "sqrt(a_t), over the timesteps T-1 .. 0 evenly spaced (for an eps_fn that is not the oracle)",
       num_steps=st.sampled_from([1, 2, 3, 10]))
def each_step_is_the_ddim_update(ddim_sample, num_steps):
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    out = expect_tensor(ddim_sample(_smooth_eps, x.clone(), ABAR, num_steps), (2, 5), F64, "ddim_sample")
    steps = sampling_timesteps(1000, num_steps)
    for i, t in enumerate(steps):
        eps = _smooth_eps(x, torch.full((2,), t, dtype=torch.long))
        a_t, a_s = ABAR[t].item(), ABAR[steps[i + 1]].item() if i + 1 < len(steps) else 1.0
        x = math.sqrt(a_s) * (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t) + math.sqrt(1 - a_s) * eps
    diff = (out - x).abs().max().item()
    if not diff < 1e-10:
        raise Violation(f"{num_steps} steps: the result differs from the DDIM update by {diff:.3g}")


@check("eps_fn is called once per step, with t a LongTensor of shape (batch,) holding that step's timestep")
def calls_eps_fn_per_step_with_long_timesteps(ddim_sample):
    calls = []

    def eps_fn(x, t):
        calls.append(t)
        return torch.zeros_like(x)
    ddim_sample(eps_fn, torch.zeros(4, 2, dtype=F64), ABAR, 5)
    want = sampling_timesteps(1000, 5)
    got = [t.tolist() if isinstance(t, torch.Tensor) else t for t in calls]
    if len(calls) != 5 or not all(isinstance(t, torch.Tensor) and t.dtype == torch.long and t.shape == (4,)
                                  and (t == s).all() for t, s in zip(calls, want)):
        raise Violation(f"eps_fn saw t = {got}; expected {len(want)} calls with LongTensors of shape (4,) "
                        f"holding {want}")


# ---- 9.3 the adaLN modulation -------------------------------------------------------------------------------

@check("modulate(x, shift, scale) = LN(x) (1 + scale) + shift, LN over the last axis without affine (eps 1e-6)",
       seed=seeds, rows=st.integers(1, 4), d=st.integers(2, 9))
def modulate_is_layernorm_times_one_plus_scale_plus_shift(modulate, seed, rows, d):
    g = torch.Generator().manual_seed(seed)
    x, shift, scale = (torch.randn(rows, d, generator=g, dtype=F64) for _ in range(3))
    out = expect_tensor(modulate(x, shift, scale), (rows, d), F64, "modulate")
    want = naive_layer_norm(x, eps=1e-6) * (1 + scale) + shift
    diff = (out - want).abs().max().item()
    if not diff < 1e-10:
        why = ""
        if (out - (naive_layer_norm(x, eps=1e-6) * scale + shift)).abs().max() < 1e-10:
            why = ": yours multiplies by scale, not 1 + scale (a zero scale must keep LN(x))"
        raise Violation(f"differs from LN(x) (1 + scale) + shift by {diff:.3g}{why}")


@check("with shift = scale = 0 modulate is the plain LayerNorm of x (what a zero-initialized head starts with)",
       seed=seeds)
def zero_modulation_is_plain_layernorm(modulate, seed):
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed), dtype=F64) * 3 + 1
    zero = torch.zeros_like(x)
    diff = (modulate(x, zero, zero) - naive_layer_norm(x, eps=1e-6)).abs().max().item()
    if not diff < 1e-10:
        raise Violation(f"with zero shift and scale the result differs from LN(x) by {diff:.3g}")


# ---- 9.4 the zero-initialized adaLN modulation --------------------------------------------------------------

def _linear_of(module) -> nn.Linear:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        raise Violation(f"expected exactly one nn.Linear in the modulation, found {len(linears)}")
    return linears[0]


@check("adaln_modulation(width, chunks) outputs exactly 0 for any condition at init (weight and bias zero), "
       "shape (N, chunks * width)", width=st.integers(1, 16), chunks=st.integers(1, 3), seed=seeds)
def outputs_exactly_zero_at_init(adaln_modulation, width, chunks, seed):
    torch.manual_seed(seed)
    module = adaln_modulation(width, chunks).to(F64)
    c = torch.randn(5, width, generator=torch.Generator().manual_seed(seed), dtype=F64) * 3
    out = expect_tensor(module(c), (5, chunks * width), F64, "the modulation")
    if not torch.equal(out, torch.zeros_like(out)):
        lin = _linear_of(module)
        raise Violation(f"at init the output is not 0 (max |out| {out.abs().max().item():.3g}; weight zero: "
                        f"{bool((lin.weight == 0).all())}, bias zero: {bool((lin.bias == 0).all())}): every shift, "
                        "scale and gate must start at 0")


@check("the modulation is Linear(SiLU(c)): SiLU on the condition first, then one trainable linear layer")
def is_a_linear_of_silu(adaln_modulation):
    module = adaln_modulation(4, 3).to(F64)
    lin = _linear_of(module)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=F64))
        lin.bias.copy_(torch.randn(lin.bias.shape, generator=g, dtype=F64))
    if not (lin.weight.requires_grad and lin.bias is not None and lin.bias.requires_grad):
        raise Violation("the linear layer's weight and bias must be trainable parameters")
    c = torch.randn(6, 4, generator=g, dtype=F64)
    diff = (module(c) - nn.functional.linear(nn.functional.silu(c), lin.weight, lin.bias)).abs().max().item()
    if not diff < 1e-12:
        raise Violation(f"with nonzero weights the output differs from Linear(SiLU(c)) by {diff:.3g}")


# ---- 9.5 per-token timesteps --------------------------------------------------------------------------------

@check("x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps row by row, for the (x_t, t, eps) it returns", seed=seeds)
def noisy_latent_is_the_forward_process(q_sample, seed):
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    x_t, t, eps = q_sample(x0, ABAR, torch.Generator().manual_seed(seed + 1))
    t = expect_tensor(t, (64,), torch.long, "t")
    a = ABAR[t][:, None]
    diff = (x_t - (a.sqrt() * x0 + (1 - a).sqrt() * eps)).abs().max().item()
    if not diff < 1e-12:
        raise Violation(f"x_t differs from sqrt(abar_t) x0 + sqrt(1 - abar_t) eps by {diff:.3g}")


@check("one timestep per row (per token), uniform on {0, ..., T-1}: 20000 rows draw t = 0 and T-1, about "
       "(T-1)/2 on average, and many distinct values")
def timesteps_are_per_token_and_uniform(q_sample):
    _, t, eps = q_sample(torch.zeros(20000, 2, dtype=F64), ABAR, torch.Generator().manual_seed(0))
    t = expect_tensor(t, (20000,), torch.long, "t")
    distinct = t.unique().numel()
    if distinct < 990:
        raise Violation(f"only {distinct} distinct timesteps over 20000 rows: each token draws its own t")
    if int(t.min()) != 0 or int(t.max()) != 999 or abs(t.double().mean().item() - 499.5) > 10:
        raise Violation(f"t ranges over [{int(t.min())}, {int(t.max())}] with mean {t.double().mean().item():.1f}; "
                        "expected uniform on {0, ..., 999}")
    if abs(eps.mean().item()) > 0.03 or abs(eps.var().item() - 1) > 0.03:
        raise Violation(f"eps has mean {eps.mean().item():.3f} and variance {eps.var().item():.3f}, not N(0, 1)")


@check("every draw comes from the generator passed in: the same seed gives the same (x_t, t, eps)", seed=seeds)
def draws_come_from_the_generator(q_sample, seed):
    x0 = torch.randn(8, 2, dtype=F64)
    a, b = (q_sample(x0, ABAR, torch.Generator().manual_seed(seed)) for _ in range(2))
    if not all(torch.equal(u, v) for u, v in zip(a, b)):
        raise Violation("two calls with generators of the same seed gave different results")


# ---- 9.6 the sigma-VAE sample -------------------------------------------------------------------------------

@check("E[(z - mu)^2] = (noise_std / 0.8)^2 within 5%, whatever mu is (the scale is fixed, not learned)",
       noise_std=st.sampled_from([0.75, 0.4]))
def sample_variance_is_the_fixed_scale(sigma_vae_sample, noise_std):
    mu = torch.randn(4000, 8, dtype=F64, generator=torch.Generator().manual_seed(1)) * 5
    z = sigma_vae_sample(mu, noise_std, torch.Generator().manual_seed(2))
    z = expect_tensor(z, tuple(mu.shape), F64, "sigma_vae_sample")
    var, want = (z - mu).pow(2).mean().item(), (noise_std / 0.8) ** 2
    if abs(var / want - 1) > 0.05:
        raise Violation(f"noise_std = {noise_std}: E[(z - mu)^2] = {var:.4f}, expected (C / 0.8)^2 = {want:.4f}")


@check("the noise z - mu does not depend on mu: two different mu with the same generator give the same z - mu")
def noise_is_independent_of_mu(sigma_vae_sample):
    g = torch.Generator().manual_seed(3)
    mu1, mu2 = torch.randn(50, 4, 2, 2, generator=g, dtype=F64), torch.randn(50, 4, 2, 2, generator=g, dtype=F64) * 9
    d1 = sigma_vae_sample(mu1, 0.75, torch.Generator().manual_seed(4)) - mu1
    d2 = sigma_vae_sample(mu2, 0.75, torch.Generator().manual_seed(4)) - mu2
    if not torch.allclose(d1, d2, rtol=0, atol=1e-10):
        raise Violation(f"z - mu changed with mu by up to {(d1 - d2).abs().max().item():.3g}: sigma is drawn, not "
                        "computed from the encoder's output")


@check("sigma is one N(0, (C/0.8)^2) draw per example (dim 0), shared by all its latents: per-example noise "
       "scales vary, with E|sigma| = (C/0.8) sqrt(2/pi)")
def one_sigma_per_example(sigma_vae_sample):
    mu = torch.zeros(3000, 4, 4, 4, dtype=F64)
    z = sigma_vae_sample(mu, 0.75, torch.Generator().manual_seed(5))
    per_example = z.flatten(1).std(1)  # ~ |sigma_b|
    want = 0.75 / 0.8 * math.sqrt(2 / math.pi)
    if per_example.std().item() < 0.3 or abs(per_example.mean().item() / want - 1) > 0.05:
        raise Violation(f"per-example noise scales have mean {per_example.mean().item():.3f} (expected "
                        f"{want:.3f}) and spread {per_example.std().item():.3f} (expected > 0.3): draw one "
                        "sigma per example, shape (B, 1, 1, 1)")


EXERCISES = {
    "9.1": Exercise(points=2, checks=[betas_follow_the_formula, alphas_cumprod_from_one_to_zero],
                    hint='The improved-DDPM cosine schedule defines the cumulative product alpha-bar as a squared cosine of the normalized time, and each beta as the ratio of two neighbours.',
                    hints=('Evaluate alpha-bar at t / T and (t + 1) / T with the small offset 0.008; cap beta at 0.999; float64 throughout.',
                           'alpha-bar(tau) = cos^2(((tau + 0.008) / 1.008) pi / 2); beta_t = min(1 - alpha-bar((t + 1) / T) / alpha-bar(t / T), 0.999).')),
    "9.2": Exercise(points=4, checks=[oracle_denoiser_returns_x0, each_step_is_the_ddim_update,
                                      calls_eps_fn_per_step_with_long_timesteps],
                    hint='Deterministic DDIM: at every step predict x0 from the noise estimate, then move to the next, less noisy timestep along the same noise.',
                    hints=('Visit num_steps timesteps from T - 1 down to 0; call the noise model with a LongTensor of timesteps per example; after the last step alpha-bar is 1.',
                           "From the predicted noise recover x0 using alpha-bar of the current step, then mix x0 and the predicted noise with the square roots of the next step's alpha-bar and one minus it (the final step returns x0 itself).")),
    "9.3": Exercise(points=2, checks=[modulate_is_layernorm_times_one_plus_scale_plus_shift,
                                      zero_modulation_is_plain_layernorm],
                    hint='adaLN: a LayerNorm without its own affine parameters, then a scale and a shift that come from the condition.',
                    hints=('The scale enters as (1 + scale), so that a zero modulation leaves the plain LayerNorm.',
                           'Normalize over the last dimension with eps 1e-6 and no affine weights, multiply by one plus the scale, add the shift.')),
    "9.4": Exercise(points=2, checks=[outputs_exactly_zero_at_init, is_a_linear_of_silu],
                    hint='The modulation network maps the condition to all shifts, scales and gates at once, and starts at exactly zero.',
                    hints=('A SiLU followed by one linear layer producing chunks times width outputs; its weight and bias set to zero.',
                           'Zero initialization makes every adaLN block the identity on its branch at the start: each gate is 0.')),
    "9.5": Exercise(points=3, checks=[noisy_latent_is_the_forward_process, timesteps_are_per_token_and_uniform,
                                      draws_come_from_the_generator],
                    hint='LatentLM draws an independent timestep for every token, not one for the whole sequence.',
                    hints=('Draw all timesteps and the noise from the generator you are given; index alpha-bar per token.',
                           'x_t = sqrt(alpha-bar_t) x0 + sqrt(1 - alpha-bar_t) noise, with t drawn uniformly per token.')),
    "9.6": Exercise(points=3, checks=[sample_variance_is_the_fixed_scale, noise_is_independent_of_mu,
                                      one_sigma_per_example],
                    hint='The sigma-VAE does not learn a variance: the encoder gives the mean, the noise scale is drawn per example.',
                    hints=("One sigma per example (broadcast over the other dimensions), scaled by noise_std / 0.8; fresh noise of the latent's shape; everything from the generator.",
                           'z = mu + sigma * noise, with sigma a standard normal draw per example times noise_std / 0.8.')),
}
