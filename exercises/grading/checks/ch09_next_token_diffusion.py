"""Chapter 09's graded checks: the cosine schedule, the DDIM sampler, the adaLN modulation and its zero init,
per-token timesteps in the forward process, the sigma-VAE sample, the fused adaLN row in Triton, the diffusion
head's training loss.

Each check tests what the paper (or the official code it follows) promises, in float64 (the Triton kernel in
float32 under the interpreter), against the learner's function (its first argument). Known-wrong solutions:
exercises/grading/mutants/ch09_next_token_diffusion.md.
"""

import math

import torch
import torch.nn as nn
from hypothesis import strategies as st

from exercises.grading.checking import Exercise, Violation, check
from exercises.grading.checks.common import (F64, Z, expect_close, expect_estimate, expect_tensor, max_diff,
                                             naive_layer_norm, seeds)
from kernels import triton
from nanomodels.diffusion import DiffusionHead, alpha_bar, cosine_schedule, q_sample, sampling_timesteps
from nanomodels.transformer import TransformerConfig

ABAR = alpha_bar(cosine_schedule(1000))


def _abar_oracle(tau: float) -> float:
    return math.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2


# ---- 9.1 the cosine schedule --------------------------------------------------------------------------------
# corner cases: T = 1 (one step: beta capped at 0.999); T = 2; T = 2000. Pinned: all three.

@check("betas (T,) float64 with beta_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999), "
       "abar(tau) = cos^2(((tau + 0.008) / 1.008) pi / 2)", T=st.integers(1, 2000),
       examples=[dict(T=1), dict(T=2), dict(T=2000)])
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
# corner cases: one sampling step (straight to abar = 1 at the end); 2, 3, 5, 10, 50 steps; x_T given or
# drawn. Drawn from the sampled step counts.

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
    expect_close(out, x0, 1e-10, f"{num_steps} steps: the result differs from x0",
                 "; after the step at t = 0 the next abar is 1, so the last step returns the predicted x0")


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
    expect_close(out, x, 1e-10, f"{num_steps} steps: the result differs from the DDIM update")


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
# corner cases: x of rank 1 (no leading axis) and 4; d = 2. Pinned: lead = [] with d = 2, lead = [3, 1, 2].

@check("modulate(x, shift, scale) = LN(x) (1 + scale) + shift, LN over the last axis without affine (eps 1e-6), "
       "x of rank 1 to 4", seed=seeds, lead=st.lists(st.integers(1, 3), max_size=3), d=st.integers(2, 9),
       examples=[dict(seed=0, lead=[], d=2), dict(seed=1, lead=[3, 1, 2], d=9)])
def modulate_is_layernorm_times_one_plus_scale_plus_shift(modulate, seed, lead, d):
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, d)  # ranks 1-4: a LayerNorm over shape[1:] instead of the last axis is seen from rank 3 on
    x, shift, scale = (torch.randn(shape, generator=g, dtype=F64) for _ in range(3))
    out = expect_tensor(modulate(x, shift, scale), shape, F64, "modulate")
    want = naive_layer_norm(x, eps=1e-6) * (1 + scale) + shift
    why = ""
    if max_diff(out, naive_layer_norm(x, eps=1e-6) * scale + shift) < 1e-10:
        why = ": yours multiplies by scale, not 1 + scale (a zero scale must keep LN(x))"
    expect_close(out, want, 1e-10, "differs from LN(x) (1 + scale) + shift", why)


@check("with shift = scale = 0 modulate is the plain LayerNorm of x (what a zero-initialized head starts with)",
       seed=seeds)
def zero_modulation_is_plain_layernorm(modulate, seed):
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed), dtype=F64) * 3 + 1
    zero = torch.zeros_like(x)
    expect_close(modulate(x, zero, zero), naive_layer_norm(x, eps=1e-6), 1e-10,
                 "with zero shift and scale the result differs from LN(x)")


# ---- 9.4 the zero-initialized adaLN modulation --------------------------------------------------------------
# corner cases: width 1 with one chunk; 16 wide in 3 chunks. Pinned: both in the shape check.

def _linear_of(module) -> nn.Linear:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        raise Violation(f"expected exactly one nn.Linear in the modulation, found {len(linears)}")
    return linears[0]


@check("adaln_modulation(width, chunks) outputs exactly 0 for any condition at init (weight and bias zero), "
       "shape (N, chunks * width)", width=st.integers(1, 16), chunks=st.integers(1, 3), seed=seeds,
       examples=[dict(width=1, chunks=1, seed=0), dict(width=16, chunks=3, seed=1)])
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


@check("every parameter tensor of the modulation is exactly 0 at init: the Linear's weight (chunks * width, "
       "width) and its bias (chunks * width,)", width=st.integers(1, 16), chunks=st.integers(1, 3))
def every_parameter_is_zero_at_init(adaln_modulation, width, chunks):
    module = adaln_modulation(width, chunks)
    lin = _linear_of(module)
    if lin.bias is None:
        raise Violation("the linear layer has no bias: the shifts and scales need one (zero at init)")
    for what, p, shape in (("weight", lin.weight, (chunks * width, width)), ("bias", lin.bias, (chunks * width,))):
        if tuple(p.shape) != shape:
            raise Violation(f"the Linear's {what} has shape {tuple(p.shape)}, expected {shape}")
    for name, p in module.named_parameters():
        if not torch.equal(p, torch.zeros_like(p)):
            raise Violation(f"parameter {name} is not zero at init (max |{name}| {p.abs().max().item():.3g})")


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
    expect_close(module(c), nn.functional.linear(nn.functional.silu(c), lin.weight, lin.bias), 1e-12,
                 "with nonzero weights the output differs from Linear(SiLU(c))")


# ---- 9.5 per-token timesteps --------------------------------------------------------------------------------
# corner cases: a schedule of T = 1 (every timestep 0); T = 7, 50, 1000. Drawn from the four.

@check("x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps row by row, for the (x_t, t, eps) it returns, and t in "
       "{0, ..., T-1} for a schedule of T = 1000, 50, 7 or 1 steps", seed=seeds, T=st.sampled_from([1000, 50, 7, 1]))
def noisy_latent_is_the_forward_process(q_sample, seed, T):
    abar = ABAR if T == 1000 else alpha_bar(cosine_schedule(T))
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    x_t, t, eps = q_sample(x0, abar, torch.Generator().manual_seed(seed + 1))
    t = expect_tensor(t, (64,), torch.long, "t")
    if not (0 <= int(t.min()) and int(t.max()) < T):
        raise Violation(f"with a schedule of T = {T} steps t ranges over [{int(t.min())}, {int(t.max())}]; it must "
                        f"lie in {{0, ..., {T - 1}}} (the length of alphas_cumprod)")
    a = abar[t][:, None]
    expect_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, 1e-12,
                 "x_t differs from sqrt(abar_t) x0 + sqrt(1 - abar_t) eps", output="your x_t")


@check("one timestep per row (per token), uniform on {0, ..., T-1}: 20000 rows draw t = 0 and T-1, (T-1)/2 on "
       "average within 6 standard errors, and many distinct values; eps is N(0, 1) within 6 standard errors")
def timesteps_are_per_token_and_uniform(q_sample):
    _, t, eps = q_sample(torch.zeros(20000, 2, dtype=F64), ABAR, torch.Generator().manual_seed(0))
    t = expect_tensor(t, (20000,), torch.long, "t")
    distinct = t.unique().numel()
    if distinct < 990:
        raise Violation(f"only {distinct} distinct timesteps over 20000 rows: each token draws its own t")
    # P(no 0 in 20000 uniform draws) = e^-20 = 2e-9; the mean's standard error is 288.7 / sqrt(20000) = 2.04
    if int(t.min()) != 0 or int(t.max()) != 999 or abs(t.double().mean().item() - 499.5) > Z * 2.04:
        raise Violation(f"t ranges over [{int(t.min())}, {int(t.max())}] with mean {t.double().mean().item():.1f}; "
                        "expected uniform on {0, ..., 999}")
    n = eps.numel()  # the standard errors of the mean and the variance of n normal draws: 1/sqrt(n), sqrt(2/n)
    if abs(eps.mean().item()) > Z / math.sqrt(n) or abs(eps.var().item() - 1) > Z * math.sqrt(2 / n):
        raise Violation(f"eps has mean {eps.mean().item():.3f} and variance {eps.var().item():.3f}, not N(0, 1)")


@check("every draw comes from the generator passed in: the same seed gives the same (x_t, t, eps)", seed=seeds)
def draws_come_from_the_generator(q_sample, seed):
    x0 = torch.randn(8, 2, dtype=F64)
    a, b = (q_sample(x0, ABAR, torch.Generator().manual_seed(seed)) for _ in range(2))
    if not all(torch.equal(u, v) for u, v in zip(a, b)):
        raise Violation("two calls with generators of the same seed gave different results")


# ---- 9.6 the sigma-VAE sample -------------------------------------------------------------------------------
# corner cases: both noise_std values; two different mu under one generator (the noise must not depend on mu).

# The two statistical checks draw B examples of L latents (any draw order gives the same law). Per example,
# s_b = mean over its latents of (z - mu)^2 = sigma_b^2 chi2_L / L, so E[s_b] = C^2 and Var[s_b] = C^4 (2 + 6/L);
# the mean over B examples has the standard error C^2 sqrt((2 + 6/L) / B): 1.3% at B = 20000, L = 4, and the
# check allows Z = 6 of them (7.9%; C instead of C/0.8 is 36% off). False rejection < 2e-9 per comparison.
SIGMA_B, SIGMA_L = 20000, 4


@check("E[(z - mu)^2] = (noise_std / 0.8)^2, whatever mu is (the scale is fixed, not learned): the mean over "
       f"{SIGMA_B} examples of {SIGMA_L} latents within {Z:g} standard errors",
       noise_std=st.sampled_from([0.75, 0.4]), seed=seeds, max_examples=6)
def sample_variance_is_the_fixed_scale(sigma_vae_sample, noise_std, seed):
    mu = torch.randn(SIGMA_B, 2, SIGMA_L // 2, dtype=F64, generator=torch.Generator().manual_seed(1)) * 5
    z = sigma_vae_sample(mu, noise_std, torch.Generator().manual_seed(seed))
    z = expect_tensor(z, tuple(mu.shape), F64, "sigma_vae_sample")
    var, want = (z - mu).pow(2).mean().item(), (noise_std / 0.8) ** 2
    se = want * math.sqrt((2 + 6 / SIGMA_L) / SIGMA_B)
    expect_estimate(var, want, se, f"noise_std = {noise_std}: E[(z - mu)^2]",
                    why=" = (noise_std / 0.8)^2" + (": that is noise_std^2, sigma must be scaled by noise_std / 0.8"
                                                    if abs(var / noise_std ** 2 - 1) < Z * se / want else ""))


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
       "scales vary, with E|sigma| = (C/0.8) sqrt(2/pi) (20000 examples of 64 latents, within 6 standard errors)",
       seed=seeds, max_examples=4)
def one_sigma_per_example(sigma_vae_sample, seed):
    B, L = 20000, 64
    mu = torch.zeros(B, 4, 4, 4, dtype=F64)
    z = sigma_vae_sample(mu, 0.75, torch.Generator().manual_seed(seed))
    z = expect_tensor(z, tuple(mu.shape), F64, "sigma_vae_sample")
    # r_b = sqrt(mean of z_b^2) = |sigma_b| sqrt(chi2_L / L): E[r_b] = (C/0.8) sqrt(2/pi) k_L with
    # k_L = E[sqrt(chi2_L / L)] = sqrt(2/L) Gamma((L+1)/2) / Gamma(L/2), and E[r_b^2] = (C/0.8)^2
    per_example = z.flatten(1).pow(2).mean(1).sqrt()
    k = math.sqrt(2 / L) * math.exp(math.lgamma((L + 1) / 2) - math.lgamma(L / 2))
    want = 0.75 / 0.8 * math.sqrt(2 / math.pi) * k
    se = math.sqrt((0.75 / 0.8) ** 2 - want ** 2) / math.sqrt(B)
    spread = per_example.std().item()  # 0.57 for a correct answer, about 0.08 for one fixed sigma
    if not spread > 0.3:
        raise Violation(f"per-example noise scales have spread {spread:.3f} (expected 0.57): draw one sigma per "
                        "example, shape (B, 1, 1, 1), from N(0, (C/0.8)^2)")
    expect_estimate(per_example.mean().item(), want, se, "the mean per-example noise scale E|sigma|",
                    why=": draw one sigma per example, shape (B, 1, 1, 1), from N(0, (C/0.8)^2)")


# ---- 9.7 the fused adaLN row in Triton ----------------------------------------------------------------------
# corner cases (fixed cases): a row length not a multiple of the block (37) and 100; small variances; a
# large eps; large means; one sequence per condition and several (rows_per_cond > 1).

def _run_kernel(graded, x, shift, scale, rows_per_cond, eps):
    """Launch the learner's forward kernel (one program per row) under the interpreter: (y, mean, rstd)."""
    kernel = getattr(graded, "__wrapped__", graded)  # the @triton.jit object behind the grader's guard
    rows, n = x.shape
    y = torch.full_like(x, math.nan)
    mean, rstd = torch.full((rows,), math.nan), torch.full((rows,), math.nan)
    try:
        kernel[(rows,)](x, shift, scale, y, mean, rstd, n, rows_per_cond, x.stride(0), shift.stride(0),
                        scale.stride(0), y.stride(0), eps, BLOCK=triton.next_power_of_2(n))
    except Exception as exc:  # the interpreter wraps what the kernel raised: show that instead
        if type(exc).__name__ == "InterpreterError" and exc.__cause__ is not None:
            raise exc.__cause__ from None
        raise
    return y, mean, rstd


def _conditions(rows: int, n: int, seed: int, extra: int = 4, gaps: tuple = (0, 0)):
    """shift, scale (rows, n) float32 at the start of a buffer whose next `extra` rows are NaN: reading a condition
    row that does not exist gives NaN, not another tensor's memory. gaps: NaN columns after each row of shift and
    of scale (rows n + gap apart, as chunks of one (B, chunks * n) modulation output are)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for gap in gaps:
        buf = torch.full((rows + extra, n + gap), math.nan)
        buf[:rows, :n] = (torch.randn(rows * n, generator=g) * 0.7).view(rows, n)
        out.append(buf[:rows, :n])
    return out


def _adaln_oracle(x, shift, scale, rows_per_cond, eps, *, ddof=0, eps_outside=False, cond_of=None, padded=0,
                  shift_first=False, one_plus=True, one_pass=False):
    """The row in float64 (the keywords give the classic mistakes, for the message): (y, mean, rstd)."""
    n = x.size(1)
    xd = x.double()
    mean = xd.mean(1, keepdim=True)
    centered = xd - mean
    if one_pass:  # E[x^2] - E[x]^2 in float32, as a one-pass kernel would
        xf = x.float()
        var = ((xf * xf).sum(1, keepdim=True) / n - (xf.sum(1, keepdim=True) / n) ** 2).double()
    else:
        var = (centered.pow(2).sum(1, keepdim=True) + padded * mean.pow(2)) / (n - ddof)
    rstd = 1 / (var.sqrt() + eps) if eps_outside else 1 / (var + eps).sqrt()
    rows = torch.arange(x.size(0))
    idx = cond_of(rows) if cond_of else rows // rows_per_cond
    if int(idx.max()) >= shift.size(0):
        return None
    sh, sc = shift.double()[idx], scale.double()[idx]
    w = 1 + sc if one_plus else sc
    y = (centered * rstd + sh) * w if shift_first else centered * rstd * w + sh
    return y, mean[:, 0], rstd[:, 0]


def _kernel_tolerance(x, scale, shift) -> float:
    """A few float32 roundings at the scale of the row: |x| / std(x) grows with the mean (the mean's own
    rounding), (1 + |scale|) and |shift| multiply it."""
    xd = x.double()
    spread = (xd.abs().amax(1) / (xd.std(1, correction=0) + 1e-12)).max().item() if x.size(1) > 1 else 1.0
    return 4e-6 * (1 + spread) * (1 + scale.double().abs().max().item()) + 1e-6 * shift.double().abs().max().item()


def _compare_row(graded, x, shift, scale, rows_per_cond, eps, what):
    y, mean, rstd = _run_kernel(graded, x, shift, scale, rows_per_cond, eps)
    want_y, want_mean, want_rstd = _adaln_oracle(x, shift, scale, rows_per_cond, eps)
    tol = _kernel_tolerance(x, scale, shift)
    diff = (y.double() - want_y).abs().nan_to_num(nan=math.inf).amax(1)
    if diff.max() > tol:
        r = int(diff.argmax())
        mistakes = {
            "it multiplies by scale, not 1 + scale": dict(one_plus=False),
            "its variance divides by N - 1; LayerNorm's is the biased one, sum / N": dict(ddof=1),
            "eps is added outside the square root: 1 / (sqrt(var) + eps), not 1 / sqrt(var + eps)":
                dict(eps_outside=True),
            "the shift is added before the scale multiplies: (x_hat + shift)(1 + scale)": dict(shift_first=True),
            "the padded lanes past n_cols enter the variance (each adds mean^2): zero them before squaring":
                dict(padded=triton.next_power_of_2(x.size(1)) - x.size(1)),
            "the variance is E[x^2] - E[x]^2 in one pass: in float32 it cancels when the mean is large compared "
            "with the spread; subtract the mean first": dict(one_pass=True),
            "row r reads condition row r % rows_per_cond; consecutive rows share one: r // rows_per_cond":
                dict(cond_of=lambda rows: rows % rows_per_cond),
            "row r reads condition row r (per token); rows_per_cond rows share one: r // rows_per_cond":
                dict(cond_of=lambda rows: rows),
        }
        why = ""
        for text, kw in mistakes.items():
            alt = _adaln_oracle(x, shift, scale, rows_per_cond, eps, **kw)
            if alt is not None and not torch.equal(alt[0], want_y) and \
                    (y.double() - alt[0]).abs().nan_to_num(nan=math.inf).max() <= 10 * tol:
                why = f": {text}"
                break
        if not why and y[r].isnan().any():
            why = ": NaN (a condition row that does not exist was read, or nothing was computed)"
        ratio = abs(want_mean[r].item()) * want_rstd[r].item()
        if not why and ratio > 50:
            why = (f": this row's mean is {ratio:.0f} times its standard deviation; a variance taken as "
                   "E[x^2] - E[x]^2 in float32 loses most of its digits there: subtract the mean first")
        raise Violation(f"{what}: row {r} of y differs from LN(x) (1 + scale) + shift by {diff[r].item():.3g} "
                        f"(float32 tolerance {tol:.2g}){why}")
    mean_tol = 4e-7 * (1 + x.double().abs().max().item())
    if not (mean.double() - want_mean).abs().nan_to_num(nan=math.inf).max() <= mean_tol:
        raise Violation(f"{what}: the stored mean differs from the row mean by "
                        f"{(mean.double() - want_mean).abs().max().item():.3g} (the backward reads it)")
    rel = ((rstd.double() - want_rstd) / want_rstd).abs().nan_to_num(nan=math.inf).max().item()
    if not rel <= 1e-5:
        raise Violation(f"{what}: the stored rstd differs from 1 / sqrt(var + eps) by a factor of {rel:.3g} "
                        "(the backward reads it)")


@check("the kernel (float32, under the interpreter) gives LN(x) (1 + scale) + shift, and stores mean and "
       "1 / sqrt(var + eps) per row, within float32 rounding of a float64 oracle, for rows not a multiple of "
       "the block, a row of one column, small variances and a large eps")
def kernel_row_matches_the_float64_oracle(kernel):
    for rows, n, std, eps, seed in ((4, 37, 1.0, 1e-6, 0), (3, 37, 1e-3, 1e-6, 4), (5, 100, 0.7, 0.5, 2),
                                    (2, 64, 2.0, 1e-6, 3), (3, 1, 1.0, 1e-6, 1)):
        x = torch.randn(rows, n, generator=torch.Generator().manual_seed(100 + seed)) * std
        shift, scale = _conditions(rows, n, seed)
        _compare_row(kernel, x, shift, scale, 1, eps,
                     f"{rows} rows of {n} columns (std {std:g}, eps {eps:g})")


@check("rows with a large mean compared with their spread (mean 1000 and -300, std 1) keep float32 precision: "
       "the variance is taken of the centered row, not as E[x^2] - E[x]^2")
def large_means_keep_the_precision(kernel):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 50, generator=g, dtype=F64) + torch.tensor([[1000.0], [-300.0], [0.0], [40.0]], dtype=F64)
    shift, scale = _conditions(4, 50, 8)
    _compare_row(kernel, x.float(), shift, scale, 1, 1e-6, "rows of 50 columns with means 1000, -300, "
                 "0, 40 and std 1")


@check("a condition shared by a sequence: row r of x reads shift and scale from condition row r // rows_per_cond "
       "(3 sequences of 4 tokens, 2 of 5, and one condition for all 6 rows), shift and scale rows strided apart")
def per_sequence_condition_broadcasts_over_tokens(kernel):
    for sequences, tokens, n, seed in ((3, 4, 37, 10), (2, 5, 16, 11), (1, 6, 20, 12)):
        x = torch.randn(sequences * tokens, n, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.3
        shift, scale = _conditions(sequences, n, seed + 1, gaps=(3, 5))  # rows n + 3 and n + 5 apart
        _compare_row(kernel, x, shift, scale, tokens, 1e-6,
                     f"{sequences} sequence(s) of {tokens} tokens, {n} columns, rows_per_cond = {tokens}, shift "
                     f"rows {n + 3} apart (stride_sh) and scale rows {n + 5} (stride_sc)")


# ---- 9.8 the diffusion head's training loss -----------------------------------------------------------------
# corner cases: outputs given or computed by the loss; batch_mul copies of one token adjacent. Fixed cases.

def _random_head(d, C, width, batch_mul, prediction, seed, depth=2):
    """A float64 head with every parameter drawn (the zero init would hide most mistakes: its output is 0)."""
    torch.manual_seed(seed)
    head = DiffusionHead(TransformerConfig(d_model=d, n_heads=1), latent_dim=C, width=width, depth=depth,
                         batch_mul=batch_mul, prediction=prediction).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.3)
    return head


def _loss_oracle(head, h, targets, outputs, seed, *, interleave=True, target_kind=None, from_clean=False,
                 reduction="mean"):
    """Written out row by row: token (b, l) copy k is row (b L + l) mul + k; q_sample draws from the seed."""
    B, L, C = targets.shape
    mul = head.batch_mul
    c = head(h) if outputs is None else outputs
    tokens = [(b, l) for b in range(B) for l in range(L)]
    x0 = torch.stack([targets[b, l] for b, l in tokens for _ in range(mul)])  # (B*L*mul, C)
    order = [(b, l) for b, l in tokens for _ in range(mul)] if interleave else [bl for _ in range(mul) for bl in tokens]
    cond = torch.stack([c[b, l] for b, l in order])
    x_t, t, eps = q_sample(x0, head.alphas_cumprod, torch.Generator().manual_seed(seed))
    a = head.alphas_cumprod.to(F64)[t][:, None]
    kind = target_kind or head.prediction
    target = {"eps": eps, "v": a.sqrt() * eps - (1 - a).sqrt() * x0, "x0": x0}[kind]
    err = (head.predict(x0 if from_clean else x_t, t, cond) - target) ** 2
    return err.mean() if reduction == "mean" else err.sum()


LOSS_CASES = [  # B, L, C, batch_mul, prediction, outputs given
    (2, 3, 2, 4, "eps", False), (1, 5, 3, 1, "v", False), (3, 2, 1, 3, "v", True), (2, 1, 4, 2, "eps", True)]


def _loss_inputs(B, L, C, mul, prediction, given, seed):
    d, width = 6, 8
    head = _random_head(d, C, width, mul, prediction, seed)
    g = torch.Generator().manual_seed(seed + 1)
    h = torch.randn(B, L, d, generator=g, dtype=F64)
    targets = torch.randn(B, L, C, generator=g, dtype=F64) * 1.5
    outputs = torch.randn(B, L, width, generator=g, dtype=F64) if given else None
    return head, h, targets, outputs


@check("the loss equals the written-out mean over B*L*batch_mul rows of (head.predict(x_t, t, c) - target)^2, "
       "exactly (float64, 1e-12): copies of one token adjacent, (x_t, t, eps) from one q_sample call with the "
       "generator, target eps or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, c = head(h) or the given outputs")
def loss_matches_the_written_out_oracle(diffusion_loss):
    for k, (B, L, C, mul, prediction, given) in enumerate(LOSS_CASES):
        head, h, targets, outputs = _loss_inputs(B, L, C, mul, prediction, given, seed=20 + k)
        got = diffusion_loss(head, h, targets, outputs, torch.Generator().manual_seed(5))
        got = expect_tensor(got, (), F64, "diffusion_loss")
        with torch.no_grad():
            want = _loss_oracle(head, h, targets, outputs, 5)
        what = (f"B = {B}, L = {L}, C = {C}, batch_mul = {mul}, prediction = {prediction!r}, outputs "
                + ("given" if given else "None"))
        if not abs(got.item() - want.item()) <= 1e-12 * max(1.0, abs(want.item())):
            mistakes = {
                "conditions repeated with repeat (whole batch after whole batch) while the targets are "
                "interleaved, or the other way round: row i of c must belong to row i of x0": dict(interleave=False),
                "the target is the clean latent x0, not the noise": dict(target_kind="x0"),
                "the target is eps, but this head predicts v": dict(target_kind="eps"),
                "the target is v, but this head predicts eps": dict(target_kind="v"),
                "the network sees the clean latent x0 instead of the noisy x_t": dict(from_clean=True),
                "the squared errors are summed, not averaged": dict(reduction="sum"),
            }
            why = ""
            with torch.no_grad():
                if given and abs(got.item() - _loss_oracle(head, h, targets, None, 5).item()) <= 1e-9:
                    why = ": the given outputs were ignored (head(h) computed again)"
                for text, kw in mistakes.items():
                    if why:
                        break
                    alt = _loss_oracle(head, h, targets, outputs, 5, **kw).item()
                    if alt != want.item() and abs(got.item() - alt) <= 1e-9 * max(1.0, abs(alt)):
                        why = f": {text}"
            raise Violation(f"{what}: loss {got.item():.12g}, the written-out loss is {want.item():.12g}{why}")


@check("the backbone's conditions are computed once per call (head(h) once, or not at all when outputs are given) "
       "and the network runs once on all B*L*batch_mul noisy rows")
def conditions_once_and_one_network_pass(diffusion_loss):
    for given in (False, True):
        head, h, targets, outputs = _loss_inputs(2, 3, 2, 4, "eps", given, seed=40)
        calls, rows = [], []
        head.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
        predict = head.predict

        def counted(x_t, t, c):
            rows.append(x_t.shape[0])
            return predict(x_t, t, c)
        head.predict = counted
        diffusion_loss(head, h, targets, outputs, torch.Generator().manual_seed(1))
        want_calls = [] if given else [tuple(h.shape)]
        if calls != want_calls:
            raise Violation(f"outputs {'given' if given else 'None'}: head(.) was called on inputs of shapes {calls}; "
                            f"expected {want_calls or 'no call (the conditions are given)'}")
        if rows != [2 * 3 * 4]:
            raise Violation(f"head.predict ran on batches of {rows} rows; expected one call on B * L * batch_mul = "
                            f"{2 * 3 * 4} rows")


@check("the gradient reaches the backbone: d loss / d h (and d loss / d outputs when given) equals the written-out "
       "loss's gradient (float64, 1e-10)")
def gradient_reaches_the_backbone_states(diffusion_loss):
    for k, given in enumerate((False, True)):
        head, h, targets, outputs = _loss_inputs(2, 2, 3, 3, "v", given, seed=50 + k)
        leaf = (outputs if given else h).clone().requires_grad_()
        args = (head, h, targets, leaf) if given else (head, leaf, targets, None)
        (got,) = torch.autograd.grad(diffusion_loss(*args, torch.Generator().manual_seed(2)), leaf,
                                     allow_unused=True)
        (want,) = torch.autograd.grad(_loss_oracle(*args, 2), leaf)
        name = "outputs" if given else "h"
        if got is None:
            raise Violation(f"d loss / d {name} is None: the conditions were detached from the graph (the "
                            "backbone would never learn)")
        expect_close(got, want, 1e-10 * max(1.0, want.abs().max().item()),
                     f"d loss / d {name} differs from the written-out loss's gradient", output=f"d loss / d {name}")


TOY_CHECK = dict(steps=200, batch=128, width=32, depth=1, lr=4e-3, noise=0.1)  # ~1 s of one CPU core


def bimodal_toy_experiment(diffusion_loss, cfg: dict = TOY_CHECK) -> list:
    """Train a conditioner + diffusion head (v-prediction) with `diffusion_loss` on y = +x or -x (probability 1/2
    each) plus N(0, noise^2), fixed seeds; then 400 DDIM samples (20 steps) at x = -1.5 and 1. Returns one dict per
    x: the share of samples within 0.3 of +-x (in_mode), the share of those at +x (positive), the mean sample."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    width = cfg["width"]
    backbone = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
    head = DiffusionHead(TransformerConfig(d_model=width, n_heads=1), latent_dim=1, width=width, depth=cfg["depth"],
                         prediction="v")
    opt = torch.optim.AdamW(list(backbone.parameters()) + list(head.parameters()), lr=cfg["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg["steps"])
    for _ in range(cfg["steps"]):
        n = cfg["batch"]
        x = (0.5 + 1.5 * torch.rand(n, 1, generator=gen)) * (torch.randint(0, 2, (n, 1), generator=gen) * 2 - 1)
        y = (torch.randint(0, 2, (n, 1), generator=gen) * 2 - 1) * x + cfg["noise"] * torch.randn(n, 1, generator=gen)
        loss = diffusion_loss(head, backbone(x).unsqueeze(1), y.unsqueeze(1), None, gen)
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and torch.isfinite(loss)):
            raise Violation(f"the loss is not a finite scalar tensor: {loss!r}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    rows = []
    with torch.no_grad():
        for xv in (-1.5, 1.0):
            c = head(backbone(torch.full((400, 1), xv)))
            ys = head.sample(c, 20, "ddim", generator=torch.Generator().manual_seed(2))[:, 0]
            pos, neg = (ys - xv).abs() < 0.3, (ys + xv).abs() < 0.3
            rows.append({"x": xv, "in_mode": (pos | neg).float().mean().item(),
                         "positive": pos.float().sum().item() / max(1, int((pos | neg).sum())),
                         "mean": ys.mean().item()})
    return rows


def toy_report(rows: list) -> str:
    return "; ".join(f"x = {r['x']}: {r['in_mode']:.0%} within 0.3 of +-x, {r['positive']:.0%} of those at +x, "
                     f"mean sample {r['mean']:.3f}" for r in rows)


@check("a short experiment: conditioner + diffusion head trained 200 steps with this loss on the bimodal toy "
       "(y = +x or -x, noise 0.1, v-prediction, one thread, fixed seeds) sample both modes at x = -1.5 and 1: "
       "at least 70% of 400 DDIM samples within 0.3 of +-x, 30% to 70% of those at +x")
def trains_a_head_that_samples_both_modes(diffusion_loss):
    rows = bimodal_toy_experiment(diffusion_loss)
    if not all(r["in_mode"] >= 0.7 and 0.3 <= r["positive"] <= 0.7 for r in rows):
        raise Violation("after training with your loss the samples do not show both modes; " + toy_report(rows))

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
    "9.4": Exercise(points=2, checks=[outputs_exactly_zero_at_init, every_parameter_is_zero_at_init,
                                      is_a_linear_of_silu],
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
    "9.7": Exercise(points=3, checks=[kernel_row_matches_the_float64_oracle, large_means_keep_the_precision,
                                      per_sequence_condition_broadcasts_over_tokens],
                    hint='One program holds one whole row in registers: a LayerNorm without affine over it, then the affine that the condition supplies; consecutive rows (the tokens of a sequence) can share one condition row.',
                    hints=('Two passes over the loaded row: first its mean, then the variance of the centered values, with the lanes past n_cols set to zero before they are squared. The variance is the biased one (divide by n_cols), and eps goes inside the square root. Load scale and shift from the condition row of this token, not from the row of x.',
                           "The mean is the row's sum over n_cols; center the row and zero its masked lanes with tl.where; rstd is one over the square root of (the mean of the squared centered values plus eps); the condition row is the integer quotient of the row index by rows_per_cond (shift rows are stride_sh apart, scale rows stride_sc); y is the centered row times rstd times (one plus scale), plus shift. Keep mean and rstd as float32 scalars: the lines after the region store them.")),
    "9.8": Exercise(points=4, checks=[loss_matches_the_written_out_oracle, conditions_once_and_one_network_pass,
                                      gradient_reaches_the_backbone_states, trains_a_head_that_samples_both_modes],
                    hint='The backbone runs once; every target then gets batch_mul noisy copies, each with its own timestep, and the head learns to predict the noise (or v) of each copy from the copy and its condition.',
                    hints=('Turn conditions and targets into rows and repeat both the same way, with the copies of one token next to each other, so that row i of the conditions belongs to row i of the targets; one q_sample call on the repeated targets draws everything, from the generator you are given.',
                           'The conditions are head(h) unless outputs is given; flatten them to (rows, width) and the targets to (rows, C), repeat_interleave both by batch_mul; q_sample gives (x_t, t, eps); the regression target is eps, or for v-prediction sqrt(abar_t) eps minus sqrt(1 - abar_t) x0; the loss is the mean squared error between head.predict on (x_t, t, conditions) and that target.')),
}
