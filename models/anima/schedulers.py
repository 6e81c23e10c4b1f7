"""Sigma schedules by name: ComfyUI's schedulers (`comfy/samplers.py`, `SCHEDULER_HANDLERS`) plus RES4LYF's
`beta57`, with ComfyUI's arithmetic.

Every schedule is built on the model's sigma range, as ComfyUI builds it for Anima
(`ModelSamplingDiscreteFlow` with multiplier 1): the 1000-entry table
`sigma_i = time_snr_shift(shift, (i + 1) / 1000)` of `sampling.sigma_table`, so
sigma_max = table[-1] = 1 and sigma_min = table[0] (0.002994 at shift 3). The model's timestep of a sigma
is the sigma itself, and the sigma of a timestep t is time_snr_shift(shift, t), the project's one shift
formula. A schedule is a decreasing float32 CPU tensor that ends in 0; most have steps + 1 entries, but
`ddim_uniform` and `beta` keep ComfyUI's quirks (one extra step, merged duplicate steps).

Adding a scheduler: one function `(steps, shift) -> sigmas` here and one line in `registry.SCHEDULERS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from .registry import DEFAULT_SCHEDULER, DEFAULT_SHIFT, SAMPLERS, SCHEDULERS, canonical_sampler, canonical_scheduler
from .sampling import sigma_table, simple_schedule, time_snr_shift  # simple_schedule: named by the registry

ScheduleFn = Callable[[int, float], Tensor]

KARRAS_RHO = 7.0
LINEAR_QUADRATIC_THRESHOLD = 0.025


def _with_zero(sigmas: list[float] | Tensor) -> Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _range(shift: float) -> tuple[Tensor, Tensor, Tensor]:
    """(table, sigma_min, sigma_max) of the model, as float32 tensors."""
    table = sigma_table(shift)
    return table, table[0], table[-1]


def normal_schedule(steps: int, shift: float = DEFAULT_SHIFT, *, sgm: bool = False) -> Tensor:
    """ComfyUI's `normal` (and with sgm=True `sgm_uniform`): timesteps evenly spaced from the model's
    timestep of sigma_max to that of sigma_min, each mapped back through the shift. For a flow model the
    end timestep is sigma_min itself, so it is shifted twice, as in ComfyUI."""
    _, sigma_min, sigma_max = _range(shift)
    if sgm:
        timesteps = torch.linspace(sigma_max, sigma_min, steps + 1)[:-1]
        return _with_zero(time_snr_shift(shift, timesteps))
    if math.isclose(float(time_snr_shift(shift, sigma_min)), 0, abs_tol=1e-5):
        return time_snr_shift(shift, torch.linspace(sigma_max, sigma_min, steps + 1))  # already ends near 0
    return _with_zero(time_snr_shift(shift, torch.linspace(sigma_max, sigma_min, steps)))


def karras_schedule(steps: int, shift: float = DEFAULT_SHIFT) -> Tensor:
    """Karras et al. (2022): sigma^(1/rho) evenly spaced from sigma_max to sigma_min, rho 7."""
    _, sigma_min, sigma_max = _range(shift)
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = float(sigma_min) ** (1 / KARRAS_RHO), float(sigma_max) ** (1 / KARRAS_RHO)
    return _with_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** KARRAS_RHO)


def exponential_schedule(steps: int, shift: float = DEFAULT_SHIFT) -> Tensor:
    """log(sigma) evenly spaced from sigma_max to sigma_min."""
    _, sigma_min, sigma_max = _range(shift)
    return _with_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp())


def ddim_uniform_schedule(steps: int, shift: float = DEFAULT_SHIFT) -> Tensor:
    """ComfyUI's `ddim_uniform`: every (1000 // steps)-th table entry from entry 1 upwards, highest first,
    then 0. The top entry is below 1 and there can be one step more than asked (31 for 30)."""
    table = sigma_table(shift)
    ends_at_zero = math.isclose(float(table[1]), 0, abs_tol=1e-5)  # only for shifts near 0
    stride = max(len(table) // (steps + 1 if ends_at_zero else steps), 1)
    sigmas = [float(table[i]) for i in range(1, len(table), stride)]
    return torch.tensor(sigmas[::-1] + ([] if ends_at_zero else [0.0]), dtype=torch.float32)


def beta_schedule(steps: int, shift: float = DEFAULT_SHIFT, *, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """Beta-distribution spacing (arXiv 2407.12173): table entries at the rounded Beta(alpha, beta)
    quantiles of 1 - linspace(0, 1, steps, endpoint=False); repeated entries are merged, so there may be
    fewer steps than asked."""
    import numpy as np
    from scipy.stats import beta as beta_distribution  # scipy comes with torchsde

    table = sigma_table(shift)
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
    indices = np.rint(beta_distribution.ppf(quantiles, alpha, beta) * (len(table) - 1))
    sigmas, last = [], None
    for index in indices:
        if index != last:
            sigmas.append(float(table[int(index)]))
        last = index
    return _with_zero(sigmas)


def linear_quadratic_schedule(steps: int, shift: float = DEFAULT_SHIFT) -> Tensor:
    """Mochi's schedule in ComfyUI: t rises linearly to 0.025 over the first half of the steps, then
    quadratically to 1; sigma = (1 - t) * sigma_max. It ignores the shift (sigma_max is 1 at any shift)."""
    _, _, sigma_max = _range(shift)
    if steps == 1:
        return torch.tensor([1.0, 0.0]) * sigma_max
    linear_steps = steps // 2
    threshold = LINEAR_QUADRATIC_THRESHOLD
    linear = [i * threshold / linear_steps for i in range(linear_steps)]
    step_diff = linear_steps - threshold * steps
    quadratic_steps = steps - linear_steps
    quadratic_coef = step_diff / (linear_steps * quadratic_steps**2)
    linear_coef = threshold / linear_steps - 2 * step_diff / quadratic_steps**2
    const = quadratic_coef * linear_steps**2
    quadratic = [quadratic_coef * i**2 + linear_coef * i + const for i in range(linear_steps, steps)]
    return torch.tensor([1.0 - t for t in linear + quadratic + [1.0]], dtype=torch.float32) * sigma_max


def kl_optimal_schedule(steps: int, shift: float = DEFAULT_SHIFT) -> Tensor:
    """AYS' KL-optimal schedule: atan(sigma) evenly spaced from sigma_max to sigma_min. (ComfyUI's divides
    0 by 0 for one step; here one step is just sigma_max.)"""
    _, sigma_min, sigma_max = _range(shift)
    fractions = torch.arange(steps, dtype=torch.float32).div_(max(steps - 1, 1))
    sigmas = fractions.new_zeros(steps + 1)
    sigmas[:-1] = (fractions * math.atan(sigma_min) + (1 - fractions) * math.atan(sigma_max)).tan_()
    return sigmas


def compute_sigmas(scheduler: str, steps: int, shift: float = DEFAULT_SHIFT, sampler: str | None = None) -> Tensor:
    """The sigmas `sampler` runs for `steps` steps of `scheduler`, as ComfyUI's KSampler computes them:
    for the samplers that drop the penultimate sigma (uni_pc) the schedule is made for steps + 1 first."""
    if steps < 1:
        raise ValueError(f"The number of steps must be at least 1 (got {steps}).")
    schedule = _SCHEDULE_FUNCTIONS[canonical_scheduler(scheduler)]
    if sampler is not None and SAMPLERS[canonical_sampler(sampler)].drops_penultimate_sigma:
        sigmas = schedule(steps + 1, shift)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return schedule(steps, shift)


# Each registry entry's implementation with its options, resolved once (a misspelt name fails at import).
_SCHEDULE_FUNCTIONS: dict[str, ScheduleFn] = {
    name: partial(globals()[s.function], **dict(s.options)) for name, s in SCHEDULERS.items()}
