"""Noise schedule and samplers for Anima, as pure functions (ComfyUI's semantics, which are the reference).

Time convention (flow matching; ComfyUI's `CONST` prediction with `ModelSamplingDiscreteFlow`):
  * sigma in [0, 1] is the noise level: 1 is pure noise, 0 is data.
  * x_sigma = (1 - sigma) * x0 + sigma * eps. The DiT receives sigma itself as its timestep (not
    1000 * sigma) and predicts the velocity v = eps - x0, so the denoised estimate is x0 = x - sigma * v.
  * Sigmas are shifted towards noise by the one shift formula of this project,
        sigma = time_snr_shift(shift, t) = shift * t / (1 + (shift - 1) * t),
    where t in [0, 1] is the unshifted time (Anima uses shift 3).

Every sampler follows k-diffusion: `sampler(denoise, x, sigmas, noise, callback)` where
  * `denoise(x, sigma) -> x0` is the guided denoised prediction (x: [B, C, T, H, W] float32, sigma: a
    0-dim float32 tensor on x's device),
  * `sigmas` is a decreasing float32 schedule ending in 0 (length steps + 1),
  * `noise()` returns fresh standard normal noise shaped like x (stochastic samplers only),
  * `callback(i, x, x0)` runs after step i with the new x and that step's denoised estimate.
Each step calls `denoise` once. The arithmetic follows ComfyUI's `comfy/k_diffusion/sampling.py` operation
by operation, so float32 CPU runs reproduce its results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
NoiseSource = Callable[[], Tensor]
StepCallback = Callable[[int, Tensor, Tensor], None]

DEFAULT_SHIFT = 3.0  # ComfyUI's sampling_settings for Anima
NUM_TRAIN_TIMESTEPS = 1000
# ComfyUI's SDE solvers work in log-SNR, which is infinite at sigma = 1, so they start slightly below it.
FIRST_SIGMA_PERCENT = 1e-4
ER_SDE_INTEGRATION_POINTS = 200

SAMPLERS = ("er_sde", "euler", "euler_ancestral", "dpmpp_2m_sde")
SAMPLER_ALIASES = {"euler_a": "euler_ancestral"}


# ----------------------------------------------------------------------------------------------- schedule


def time_snr_shift(shift: float, t: Tensor | float) -> Tensor | float:
    """The shift formula (see the module docstring); t is the unshifted time in [0, 1]."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sigma_table(shift: float = DEFAULT_SHIFT) -> Tensor:
    """The 1000 training sigmas, ascending: sigma_i = time_snr_shift(shift, (i + 1) / 1000), float32."""
    t = torch.arange(1, NUM_TRAIN_TIMESTEPS + 1, device="cpu") / NUM_TRAIN_TIMESTEPS  # [1000] float32
    return time_snr_shift(shift, t)


def simple_schedule(steps: int, shift: float = DEFAULT_SHIFT) -> Tensor:
    """ComfyUI's `simple` scheduler: `steps` evenly strided entries of the table from the top, then 0.

    The sigmas are quantized to the 1/1000 training grid (unlike diffusers' linspace). Returns [steps + 1].
    """
    if steps < 1:
        raise ValueError(f"The number of steps must be at least 1 (got {steps}).")
    table = sigma_table(shift)
    stride = len(table) / steps
    sigmas = [float(table[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.tensor(sigmas + [0.0], dtype=torch.float32, device="cpu")


def percent_to_sigma(percent: float, shift: float = DEFAULT_SHIFT) -> float:
    """Sigma after `percent` of the denoising process (ComfyUI's `percent_to_sigma` for flow models)."""
    if percent <= 0.0:
        return 1.0
    if percent >= 1.0:
        return 0.0
    return time_snr_shift(shift, 1.0 - percent)


def offset_first_sigma(sigmas: Tensor, shift: float = DEFAULT_SHIFT) -> Tensor:
    """Replaces a first sigma of 1 (infinite log-SNR) by percent_to_sigma(1e-4), as ComfyUI's SDE solvers do."""
    if len(sigmas) <= 1 or sigmas[0] < 1:
        return sigmas
    sigmas = sigmas.clone()
    sigmas[0] = percent_to_sigma(FIRST_SIGMA_PERCENT, shift)
    return sigmas


def half_log_snr(sigma: Tensor) -> Tensor:
    """log(alpha / sigma) with alpha = 1 - sigma; +inf at sigma = 0."""
    return sigma.logit().neg()


# ------------------------------------------------------------------------------------------------- noise


def seeded_randn(seeds: Sequence[int], shape: Sequence[int]) -> Tensor:
    """[len(seeds), *shape] float32 CPU noise, row i drawn from its own CPU generator seeded seeds[i].

    Row i therefore equals `torch.randn(shape, generator=torch.manual_seed(seeds[i]))`, whatever the batch.
    """
    rows = [torch.randn(tuple(shape), generator=_cpu_generator(seed), device="cpu") for seed in seeds]
    return torch.stack(rows)


def _cpu_generator(seed: int) -> torch.Generator:
    # explicit CPU: mmgp leaves torch's default device on CUDA, where a CPU generator would be refused
    return torch.Generator(device="cpu").manual_seed(seed)


def seeded_noise_source(seeds: Sequence[int], like: Tensor) -> NoiseSource:
    """Per-step noise for stochastic samplers: one CPU generator per image, moved to `like`'s device.
    On CUDA the rows are stacked into pinned memory and copied without blocking, so drawing never waits
    for the GPU (the caching host allocator keeps each buffer alive until its copy is done)."""
    generators = [_cpu_generator(seed) for seed in seeds]
    shape = tuple(like.shape[1:])
    pinned = like.device.type == "cuda"

    def draw() -> Tensor:
        rows = [torch.randn(shape, generator=g, device="cpu") for g in generators]
        out = torch.empty((len(rows), *shape), device="cpu", pin_memory=pinned)
        return torch.stack(rows, out=out).to(device=like.device, dtype=like.dtype, non_blocking=pinned)

    return draw


# ---------------------------------------------------------------------------------------------- samplers


def _ends_at_zero(sigmas: Tensor) -> list[bool]:
    """Per step, whether it ends at sigma 0: read to the host once, since comparing a CUDA tensor inside
    the loop would wait for the GPU at every step."""
    return (sigmas[1:] == 0).tolist()


def _report(callback: StepCallback | None, i: int, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback(i, x, denoised)


@torch.no_grad()
def sample_euler(
    denoise: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Euler on the probability-flow ODE: x <- x + (sigma_next - sigma) * (x - x0) / sigma. Deterministic:
    `noise` is never drawn (it is in the signature so every sampler is called alike)."""
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = denoise(x, sigma)
        d = (x - denoised) / sigma
        x = x + d * (sigmas[i + 1] - sigma)
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoise: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource,
    callback: StepCallback | None = None, *, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """Euler ancestral for flow models (ComfyUI's `sample_euler_ancestral_RF`).

    Steps deterministically down to sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta), then
    rescales and adds fresh noise so that the marginal at sigma_next is matched again.
    """
    to_zero = _ends_at_zero(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if to_zero[i]:
            x = denoised
        else:
            sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
            alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
            renoise = (sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2) ** 0.5
            ratio = sigma_down / sigma
            x = ratio * x + (1 - ratio) * denoised
            if eta > 0:
                x = (alpha_next / alpha_down) * x + noise() * s_noise * renoise
        _report(callback, i, x, denoised)
    return x


def _er_sde_noise_scaler(lam: Tensor) -> Tensor:
    return lam * ((lam**0.3).exp() + 10.0)


@torch.no_grad()
def sample_er_sde(
    denoise: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource,
    callback: StepCallback | None = None, *, shift: float = DEFAULT_SHIFT, s_noise: float = 1.0,
    max_stage: int = 3,
) -> Tensor:
    """VP ER-SDE-Solver-3 (arXiv 2309.06169) as ComfyUI's `sample_er_sde` runs it for flow models.

    Works in lambda = sigma / alpha (alpha = 1 - sigma) with the noise scaler s(l) = l * (exp(l^0.3) + 10);
    stages 2 and 3 use the last one and two denoised estimates, and their integrals of 1 / s are taken
    with a 200-point rectangle rule. A first sigma of 1 is replaced by percent_to_sigma(1e-4, shift), so
    the first model call sees that sigma.
    """
    sigmas = offset_first_sigma(sigmas, shift)
    lambdas = half_log_snr(sigmas).neg().exp()  # sigma / alpha; 0 at sigma = 0
    points = torch.arange(0, float(ER_SDE_INTEGRATION_POINTS), dtype=torch.float32, device=x.device)
    old_denoised = old_denoised_d = None
    to_zero = _ends_at_zero(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        stage = min(max_stage, i + 1)
        if to_zero[i]:
            x = denoised
        else:
            lam_s, lam_t = lambdas[i], lambdas[i + 1]
            alpha_s, alpha_t = sigmas[i] / lam_s, sigmas[i + 1] / lam_t
            r = _er_sde_noise_scaler(lam_t) / _er_sde_noise_scaler(lam_s)
            x = alpha_t / alpha_s * r * x + alpha_t * (1 - r) * denoised
            if stage >= 2:
                dt = lam_t - lam_s
                step = -dt / ER_SDE_INTEGRATION_POINTS
                lam_points = lam_t + points * step
                scaled_points = _er_sde_noise_scaler(lam_points)
                integral = torch.sum(1 / scaled_points) * step
                denoised_d = (denoised - old_denoised) / (lam_s - lambdas[i - 1])
                x = x + alpha_t * (dt + integral * _er_sde_noise_scaler(lam_t)) * denoised_d
                if stage >= 3:
                    integral_u = torch.sum((lam_points - lam_s) / scaled_points) * step
                    denoised_u = (denoised_d - old_denoised_d) / ((lam_s - lambdas[i - 2]) / 2)
                    x = x + alpha_t * ((dt**2) / 2 + integral_u * _er_sde_noise_scaler(lam_t)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                noise_std = (lam_t**2 - lam_s**2 * r**2).sqrt().nan_to_num(nan=0.0)
                x = x + alpha_t * noise() * s_noise * noise_std
        old_denoised = denoised
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoise: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSource,
    callback: StepCallback | None = None, *, shift: float = DEFAULT_SHIFT, eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2M) SDE with ComfyUI's defaults (midpoint correction, eta 1, s_noise 1).

    ComfyUI draws this sampler's noise from a torchsde Brownian tree seeded with the seed (built on the
    CPU for `dpmpp_2m_sde`, on the GPU for `dpmpp_2m_sde_gpu`). Its increments over the disjoint step
    intervals, divided by sqrt(interval), are independent standard normals, which is what `noise()`
    provides here from per-image CPU generators: the same process, not the same samples.
    """
    sigmas = offset_first_sigma(sigmas, shift)
    old_denoised, h, h_last = None, None, None
    to_zero = _ends_at_zero(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if to_zero[i]:
            x = denoised
        else:
            lambda_s, lambda_t = half_log_snr(sigma), half_log_snr(sigma_next)
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigma_next * lambda_t.exp()
            x = sigma_next / sigma * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                x = x + noise() * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
        _report(callback, i, x, denoised)
    return x


def canonical_sampler(name: str) -> str:
    """The sampler's canonical name ("euler_a" -> "euler_ancestral"); ValueError naming the choices."""
    name = SAMPLER_ALIASES.get(name, name)
    if name not in SAMPLERS:
        choices = ", ".join(SAMPLERS + tuple(SAMPLER_ALIASES))
        raise ValueError(f"Unknown sampler '{name}': choose one of {choices}.")
    return name


def sample(
    sampler: str, denoise: Denoiser, x: Tensor, sigmas: Tensor, *, noise: NoiseSource,
    callback: StepCallback | None = None, shift: float = DEFAULT_SHIFT,
) -> Tensor:
    """Runs the named sampler (see `SAMPLERS`); `shift` is the schedule's shift, which the SDE solvers
    need for their first-sigma substitution."""
    name = canonical_sampler(sampler)
    if name == "euler":
        return sample_euler(denoise, x, sigmas, callback=callback)
    if name == "euler_ancestral":
        return sample_euler_ancestral(denoise, x, sigmas, noise, callback)
    if name == "er_sde":
        return sample_er_sde(denoise, x, sigmas, noise, callback, shift=shift)
    return sample_dpmpp_2m_sde(denoise, x, sigmas, noise, callback, shift=shift)
