"""DPM-Solver++(2M) on diffusers' time grid: the timesteps, the step orders and the convergence on a Gaussian whose
probability-flow ODE has a closed-form solution. float64 throughout."""

import math

import numpy as np
import pytest
import torch

from nanomodels.diffusion import (alpha_bar, cosine_schedule, dpm_solver_sample, dpm_solver_timesteps,
                                  sampling_timesteps)

ABAR = alpha_bar(cosine_schedule(1000))


def diffusers_linspace_timesteps(T, n):
    """diffusers' DPMSolverMultistepScheduler.set_timesteps, timestep_spacing="linspace", written with numpy."""
    return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64).tolist()


def diffusers_2m(eps_fn, x, abar, timesteps):
    """diffusers' multistep DPM-Solver++ (order 2, midpoint, final_sigmas_type="zero") one scalar at a time:
    sigmas appended with 0, first order at the first step and at the last (lower_order_final)."""
    sig = [math.sqrt((1 - abar[t].item()) / abar[t].item()) for t in timesteps] + [0.0]
    alpha_t = [1 / math.sqrt(s ** 2 + 1) for s in sig]
    sigma_t = [s * a for s, a in zip(sig, alpha_t)]
    lam = [math.log(a) - math.log(s) if s > 0 else math.inf for a, s in zip(alpha_t, sigma_t)]
    outputs = []
    for i, t in enumerate(timesteps):
        eps = eps_fn(x, torch.full((x.shape[0],), t, dtype=torch.long))
        outputs.append((x - sigma_t[i] * eps) / alpha_t[i])
        h = lam[i + 1] - lam[i]
        decay = 0.0 if math.isinf(h) else math.exp(-h)
        if i == 0 or i == len(timesteps) - 1:
            x = sigma_t[i + 1] / sigma_t[i] * x - alpha_t[i + 1] * (decay - 1) * outputs[-1]
        else:
            r0 = (lam[i] - lam[i - 1]) / h
            d0, d1 = outputs[-1], (outputs[-1] - outputs[-2]) / r0
            x = sigma_t[i + 1] / sigma_t[i] * x - alpha_t[i + 1] * (decay - 1) * d0 \
                - 0.5 * alpha_t[i + 1] * (decay - 1) * d1
    return x


def smooth_eps(x, t):
    return torch.tanh(x) * (t[:, None].double() / 1000) + 0.1 * x


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 14, 15, 50, 250, 999])
def test_timesteps_are_diffusers_linspace_grid(n):
    steps = dpm_solver_timesteps(1000, n)
    assert steps == diffusers_linspace_timesteps(1000, n), f"{n} steps: {steps[:5]} ... {steps[-3:]}"
    assert steps[0] == 999 and steps[-1] == round(999 / n) and len(set(steps)) == n


def test_endpoint_grid_is_sampling_timesteps_and_bad_grids_are_refused():
    assert dpm_solver_timesteps(1000, 7, grid="endpoint") == sampling_timesteps(1000, 7)
    with pytest.raises(ValueError, match="grid"):
        dpm_solver_timesteps(1000, 7, grid="karras")
    with pytest.raises(ValueError, match="num_steps"):
        dpm_solver_timesteps(1000, 1000)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 14, 15, 50])
def test_dpm_solver_matches_diffusers_multistep_rule(n):
    x_T = torch.randn(3, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = dpm_solver_sample(smooth_eps, x_T, ABAR, n)
    expected = diffusers_2m(smooth_eps, x_T, ABAR, diffusers_linspace_timesteps(1000, n))
    assert torch.allclose(out, expected, rtol=0, atol=1e-10), f"{n} steps: max |diff| {(out - expected).abs().max():.3e}"


def gaussian_errors(mu, s, steps, grid):
    """x0 ~ N(mu, s^2): eps_hat = sigma (x - alpha mu) / (alpha^2 s^2 + sigma^2) is exact, and the ODE keeps
    z = (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2): the exact sample from x_T is mu + s z."""
    a = ABAR[:, None]

    def eps_fn(x, t):
        return (1 - a[t]).sqrt() * (x - a[t].sqrt() * mu) / (a[t] * s ** 2 + 1 - a[t])

    x_T = torch.randn(256, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = mu + s * (x_T - a[-1].sqrt() * mu) / (a[-1] * s ** 2 + 1 - a[-1]).sqrt()
    return [(dpm_solver_sample(eps_fn, x_T, ABAR, n, grid=grid) - exact).abs().max().item() for n in steps]


def test_gaussian_error_falls_at_second_order_on_the_diffusers_grid():
    err = gaussian_errors(0.5, 1.0, (10, 20, 40), "diffusers")
    ratios = [a / b for a, b in zip(err, err[1:])]
    assert all(q >= 2 ** 1.8 for q in ratios), f"errors {err} at 10/20/40 steps: ratios {ratios}, want >= 2^1.8"


def test_diffusers_grid_beats_the_endpoint_grid_on_unit_variance_data():
    for mu, s in ((0.5, 1.0), (1.5, 0.5)):
        ours, endpoint = gaussian_errors(mu, s, (10, 50), "diffusers"), gaussian_errors(mu, s, (10, 50), "endpoint")
        assert all(a < b / 3 for a, b in zip(ours, endpoint)), f"N({mu}, {s}^2): diffusers {ours}, endpoint {endpoint}"
