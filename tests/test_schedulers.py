"""Every scheduler's sigmas against its defining formula, written here in float64 from ComfyUI's
definitions (comfy/samplers.py, k-diffusion's get_sigmas_*, RES4LYF's beta57 = beta(0.5, 0.7)), on the
model's sigma range: table_i = shift * t / (1 + (shift - 1) * t), t = (i + 1) / 1000."""

import math

import numpy as np
import pytest
import torch
from scipy.special import betainc

from models.anima import schedulers

STEPS = [1, 4, 13, 30]
SHIFTS = [1.0, 3.0, 6.5]


def shifted(shift, t):
    return shift * t / (1 + (shift - 1) * t)


def table(shift):
    return [shifted(shift, (i + 1) / 1000) for i in range(1000)]


def beta_quantile(q, a, b):
    """Inverse of the regularized incomplete beta function, by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if betainc(a, b, mid) < q else (lo, mid)
    return (lo + hi) / 2


def expected_beta(steps, shift, a, b):
    sigmas, last = [], None
    for k in range(steps):
        index = int(np.rint(beta_quantile(1 - k / steps, a, b) * 999))
        if index != last:
            sigmas.append(table(shift)[index])
        last = index
    return sigmas + [0.0]


def expected_linear_quadratic(steps, shift):
    if steps == 1:
        return [1.0, 0.0]
    tau, linear = 0.025, steps // 2
    # t rises linearly to tau at step `linear`, then along the quadratic with t(linear) = tau, the same
    # slope there, and t(steps) = 1; sigma = 1 - t.
    rows = [[linear**2, linear, 1], [2 * linear, 1, 0], [steps**2, steps, 1]]
    a, b, c = np.linalg.solve(np.array(rows, dtype=float), np.array([tau, tau / linear, 1.0]))
    t = [i * tau / linear for i in range(linear)] + [a * i**2 + b * i + c for i in range(linear, steps + 1)]
    return [1 - v for v in t]


def expected(name, steps, shift):
    sig = table(shift)
    s_min, s_max = sig[0], sig[-1]
    if name == "simple":
        return [sig[999 - int(i * 1000 / steps)] for i in range(steps)] + [0.0]
    if name == "sgm_uniform":
        ts = np.linspace(s_max, s_min, steps + 1)[:-1]  # the model's timestep of a sigma is the sigma
        return [shifted(shift, t) for t in ts] + [0.0]
    if name == "normal":
        return [shifted(shift, t) for t in np.linspace(s_max, s_min, steps)] + [0.0]
    if name == "karras":
        lo, hi = s_min ** (1 / 7), s_max ** (1 / 7)
        return [(hi + r * (lo - hi)) ** 7 for r in np.linspace(0, 1, steps)] + [0.0]
    if name == "exponential":
        return [math.exp(v) for v in np.linspace(math.log(s_max), math.log(s_min), steps)] + [0.0]
    if name == "ddim_uniform":
        return [sig[i] for i in range(1, 1000, 1000 // steps)][::-1] + [0.0]
    if name == "beta":
        return expected_beta(steps, shift, 0.6, 0.6)
    if name == "beta57":
        return expected_beta(steps, shift, 0.5, 0.7)
    if name == "linear_quadratic":
        return expected_linear_quadratic(steps, shift)
    if name == "kl_optimal":
        f = [i / max(steps - 1, 1) for i in range(steps)]
        return [math.tan((1 - v) * math.atan(s_max) + v * math.atan(s_min)) for v in f] + [0.0]
    raise AssertionError(name)


def test_the_registry_has_comfyuis_schedulers_and_beta57():
    assert list(schedulers.SCHEDULERS) == ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta",
                                           "normal", "linear_quadratic", "kl_optimal", "beta57"]
    assert schedulers.DEFAULT_SCHEDULER == "simple"


@pytest.mark.parametrize("name", list(schedulers.SCHEDULERS))
@pytest.mark.parametrize("shift", SHIFTS)
def test_schedule_follows_its_formula(name, shift):
    for steps in STEPS:
        sigmas = schedulers.compute_sigmas(name, steps, shift)
        want = torch.tensor(expected(name, steps, shift), dtype=torch.float64)
        assert sigmas.dtype == torch.float32 and sigmas.shape == want.shape, (steps, sigmas.shape, want.shape)
        assert torch.allclose(sigmas.double(), want, rtol=4e-6, atol=1e-7), (steps, sigmas, want)
        assert sigmas[-1] == 0 and torch.all(sigmas[1:] <= sigmas[:-1])


def test_comfyuis_step_count_quirks():
    assert len(schedulers.compute_sigmas("ddim_uniform", 30)) == 32  # 31 steps for 30
    assert float(schedulers.compute_sigmas("ddim_uniform", 30)[0]) < 1
    assert len(schedulers.compute_sigmas("beta", 200)) < 201  # repeated table entries are merged


def test_uni_pc_drops_the_penultimate_sigma_of_one_step_more():
    for name in ("simple", "karras", "beta57"):
        longer = schedulers.compute_sigmas(name, 9, 3.0)
        assert torch.equal(schedulers.compute_sigmas(name, 8, 3.0, "uni_pc"), torch.cat([longer[:-2], longer[-1:]]))
        assert torch.equal(schedulers.compute_sigmas(name, 8, 3.0, "euler"), schedulers.compute_sigmas(name, 8, 3.0))


def test_unknown_scheduler_and_zero_steps_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown scheduler 'align_your_steps'.*beta57"):
        schedulers.compute_sigmas("align_your_steps", 10)
    with pytest.raises(ValueError, match="at least 1"):
        schedulers.compute_sigmas("karras", 0)
