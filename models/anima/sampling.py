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
  * `sigmas` is a decreasing float32 schedule ending in 0 (usually steps + 1 entries; see schedulers.py),
  * `noise(sigma, sigma_next)` returns standard normal noise shaped like x for the step from sigma to
    sigma_next (stochastic samplers only; k-diffusion's `noise_sampler`),
  * `callback(i, x, x0)` runs after step i with the new x and that step's denoised estimate.
`registry.SAMPLERS` is the one registry (ComfyUI's names) and `sample()` the entry point: it makes each sampler's
noise and first-sigma adjustment as ComfyUI does. The arithmetic follows ComfyUI's
`comfy/k_diffusion/sampling.py` and `comfy/extra_samplers/uni_pc.py` operation by operation, so float32 CPU
runs reproduce its results.

Noise, per image i of a batch with start-noise seed s_i (= seed + i), as ComfyUI makes it for that image
alone on the CPU: per-step normal noise from a CPU generator seeded s_i + 1 (`default_noise_sampler`), and
for the DPM++ SDE solvers a torchsde Brownian tree built on the CPU with entropy s_i.
"""

from __future__ import annotations

import math
import warnings

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .registry import BROWNIAN_NOISE, DEFAULT_SHIFT, DEVICE_BROWNIAN_NOISE, GAUSSIAN_NOISE, SAMPLERS, canonical_sampler

Denoiser = Callable[[Tensor, Tensor], Tensor]
NoiseSource = Callable[[], Tensor]
NoiseSampler = Callable[[Tensor, Tensor], Tensor]  # (sigma, sigma_next) -> noise shaped like x
StepCallback = Callable[[int, Tensor, Tensor], None]

NUM_TRAIN_TIMESTEPS = 1000
# ComfyUI's SDE solvers work in log-SNR, which is infinite at sigma = 1, so they start slightly below it.
FIRST_SIGMA_PERCENT = 1e-4
ER_SDE_INTEGRATION_POINTS = 200

UNI_PC_FINAL_SIGMA = 0.001  # ComfyUI's UniPC stops here instead of at 0


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


def brownian_noise_sampler(seeds: Sequence[int], like: Tensor, sigmas: Tensor, *, cpu: bool = True) -> NoiseSampler:
    """ComfyUI's `BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed, cpu)`, one tree per image.

    Image i's tree is a torchsde `BrownianTree` built from zeros shaped like one image, with entropy
    seeds[i], over [smallest positive sigma, largest sigma] of `sigmas` (the schedule before any first-sigma
    offset), on the CPU (ComfyUI's `dpmpp_2m_sde`: the same numbers on every machine) or with cpu=False on
    `like`'s device (`dpmpp_2m_sde_gpu`: faster, and the GPU's random numbers): ComfyUI's tree for that
    image generated alone with seed seeds[i]. A call returns the tree's increment from sigma to sigma_next
    divided by sqrt(|sigma_next - sigma|), float32 on `like`'s device: standard normal per element,
    independent over disjoint intervals. The trees are built on the first call, so a schedule that never
    needs noise needs neither them nor torchsde. On the CPU a call costs about as much as a few hundred
    elementwise passes over the latents (torchsde walks the tree), as in ComfyUI.
    """
    trees = []

    def draw(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        if not trees:
            torchsde = _import_torchsde()
            t0, t1 = sigmas[sigmas > 0].min().detach(), sigmas.max().detach()
            w0 = torch.zeros((1, *like.shape[1:]), dtype=like.dtype, device=like.device)
            if cpu:
                t0, t1, w0 = t0.cpu(), t1.cpu(), w0.cpu()
            trees.extend(torchsde.BrownianTree(t0, w0, t1, entropy=seed) for seed in seeds)
        low, high, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
        query = (low.detach().cpu().float(), high.detach().cpu().float()) if cpu else (low, high)
        with warnings.catch_warnings():  # float32 ends of the range read back as doubles a hair outside it
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w = torch.cat([tree(*query) for tree in trees])
        w = w.to(device=low.device, dtype=low.dtype) * sign
        return w / (sigma_next - sigma).abs().sqrt()

    return draw


def _import_torchsde():
    try:
        import torchsde
    except ImportError:
        raise ImportError("The DPM++ SDE samplers draw ComfyUI's Brownian-tree noise, which needs the torchsde "
                          "package: pip install torchsde==0.2.6") from None
    return torchsde


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
    denoise: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler,
    callback: StepCallback | None = None, *, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """Euler ancestral for flow models (ComfyUI's `sample_euler_ancestral_RF`).

    Steps deterministically down to sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta), then
    rescales and adds fresh noise so that the marginal at sigma_next is matched again.
    """
    zero_next = _ends_at_zero(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if zero_next[i]:
            x = denoised
        else:
            sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
            alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
            renoise = (sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2) ** 0.5
            ratio = sigma_down / sigma
            x = ratio * x + (1 - ratio) * denoised
            if eta > 0:
                x = (alpha_next / alpha_down) * x + noise(sigma, sigma_next) * s_noise * renoise
        _report(callback, i, x, denoised)
    return x


def _er_sde_noise_scaler(lam: Tensor) -> Tensor:
    return lam * ((lam**0.3).exp() + 10.0)


@torch.no_grad()
def sample_er_sde(
    denoise: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler,
    callback: StepCallback | None = None, *, s_noise: float = 1.0, max_stage: int = 3,
) -> Tensor:
    """VP ER-SDE-Solver-3 (arXiv 2309.06169) as ComfyUI's `sample_er_sde` runs it for flow models.

    Works in lambda = sigma / alpha (alpha = 1 - sigma) with the noise scaler s(l) = l * (exp(l^0.3) + 10);
    stages 2 and 3 use the last one and two denoised estimates, and their integrals of 1 / s are taken
    with a 200-point rectangle rule. `sigmas` must start below 1 (`sample` offsets a first sigma of 1).
    """
    lambdas = half_log_snr(sigmas).neg().exp()  # sigma / alpha; 0 at sigma = 0
    points = torch.arange(0, float(ER_SDE_INTEGRATION_POINTS), dtype=torch.float32, device=x.device)
    old_denoised = old_denoised_d = None
    zero_next = _ends_at_zero(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        stage = min(max_stage, i + 1)
        if zero_next[i]:
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
                x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * noise_std
        old_denoised = denoised
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def _sde_exponential_step(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor,
                          eta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The DPM++ SDE samplers' first-order step in the flow model's log-SNR: (x after it, h, h * (eta + 1),
    alpha_t), the last three for their higher-order corrections."""
    lambda_s, lambda_t = half_log_snr(sigma), half_log_snr(sigma_next)
    h = lambda_t - lambda_s
    h_eta = h * (eta + 1)
    alpha_t = sigma_next * lambda_t.exp()
    x = sigma_next / sigma * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
    return x, h, h_eta, alpha_t


def _sde_add_noise(x: Tensor, noise: NoiseSampler, sigma: Tensor, sigma_next: Tensor, h: Tensor, eta: float,
                   s_noise: float) -> Tensor:
    """The DPM++ SDE samplers' noise for a step of log-SNR length h."""
    if eta > 0 and s_noise > 0:
        x = x + noise(sigma, sigma_next) * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise
    return x


def sample_dpmpp_2m_sde(
    denoise: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler,
    callback: StepCallback | None = None, *, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2M) SDE with ComfyUI's defaults (midpoint correction, eta 1, s_noise 1), in the flow
    model's log-SNR. `sigmas` must start below 1; ComfyUI's noise is `brownian_noise_sampler`'s."""
    old_denoised, h, h_last = None, None, None
    zero_next = _ends_at_zero(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if zero_next[i]:
            x = denoised
        else:
            x, h, h_eta, alpha_t = _sde_exponential_step(x, denoised, sigma, sigma_next, eta)
            if old_denoised is not None:
                r = h_last / h
                x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            x = _sde_add_noise(x, noise, sigma, sigma_next, h, eta, s_noise)
        old_denoised, h_last = denoised, h
        _report(callback, i, x, denoised)
    return x


def _neg_log(sigma: Tensor) -> Tensor:
    return sigma.log().neg()


@torch.no_grad()
def sample_heun(
    denoise: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without
    churn): an Euler step, then the average of its slope and the slope at its end; two model calls per
    step, one for the last step (which is Euler)."""
    zero_next = _ends_at_zero(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if zero_next[i]:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoise(x_2, sigma_next)) / sigma_next
            x = x + (d + d_2) / 2 * dt
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) in t = -log(sigma), as ComfyUI runs it for every model type: the first and last
    steps are first order, the others extrapolate the denoised estimate from the previous one."""
    zero_next = _ends_at_zero(sigmas)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        t, t_next = _neg_log(sigmas[i]), _neg_log(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or zero_next[i]:
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised
        else:
            r = (t - _neg_log(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoise: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler,
    callback: StepCallback | None = None, *, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(3M) SDE in the flow model's log-SNR (ComfyUI's defaults, eta 1): third-order multistep
    with the exponential integrator's phi_2 and phi_3, lower order for the first two steps. `sigmas` must
    start below 1; ComfyUI's noise is `brownian_noise_sampler`'s."""
    zero_next = _ends_at_zero(sigmas)
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if zero_next[i]:
            x = denoised
        else:
            x, h, h_eta, alpha_t = _sde_exponential_step(x, denoised, sigma, sigma_next, eta)
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + (alpha_t * phi_2) * d
            x = _sde_add_noise(x, noise, sigma, sigma_next, h, eta, s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        _report(callback, i, x, denoised)
    return x


def _phi_1(t: Tensor) -> Tensor:
    return torch.expm1(t) / t


@torch.no_grad()
def sample_res_multistep(
    denoise: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """RES second-order multistep (arXiv 2308.02157) in t = -log(sigma), ComfyUI's `res_multistep` (eta 0,
    deterministic): Euler for the first and last steps, otherwise the exponential integrator with
    coefficients b1 = phi_1 - phi_2 / c2 and b2 = phi_2 / c2 on this and the previous denoised estimate."""
    zero_next = _ends_at_zero(sigmas)
    old_denoised = old_sigma = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if zero_next[i] or old_denoised is None:
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        else:
            t, t_old = _neg_log(sigma), _neg_log(old_sigma)
            t_next, t_prev = _neg_log(sigma_next), _neg_log(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi_1, phi_2 = _phi_1(-h), (_phi_1(-h) - 1.0) / -h
            b1 = torch.nan_to_num(phi_1 - phi_2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi_2 / c2, nan=0.0)
            x = h.neg().exp() * x + h * (b1 * denoised + b2 * old_denoised)
        old_denoised, old_sigma = denoised, sigma_next
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_lcm(
    denoise: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler,
    callback: StepCallback | None = None,
) -> Tensor:
    """Latent-consistency sampling: jump to the denoised estimate, then noise it afresh to the next sigma,
    x = sigma_next * n + (1 - sigma_next) * x0."""
    zero_next = _ends_at_zero(sigmas)
    for i in range(len(sigmas) - 1):
        sigma_next = sigmas[i + 1]
        denoised = denoise(x, sigmas[i])
        x = denoised
        if not zero_next[i]:
            x = sigma_next * noise(sigmas[i], sigma_next) + (1.0 - sigma_next) * x
        _report(callback, i, x, denoised)
    return x


# UniPC runs in ComfyUI on a variance-preserving view of the sigmas (`SigmaConvert`): alpha = 1 / sqrt(1 +
# sigma^2), std = sigma * alpha, lambda = log(alpha / std) = -log(sigma); its x is the latent times alpha.

def _vp_log_alpha(sigma: Tensor) -> Tensor:
    return 0.5 * torch.log(1 / ((sigma * sigma) + 1))


def _vp_alpha(sigma: Tensor) -> Tensor:
    return torch.exp(_vp_log_alpha(sigma))


def _vp_std(sigma: Tensor) -> Tensor:
    return torch.sqrt(1.0 - torch.exp(2.0 * _vp_log_alpha(sigma)))


def _vp_lambda(sigma: Tensor) -> Tensor:
    log_alpha = _vp_log_alpha(sigma)
    return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))


class _UniPC:
    """UniPC (arXiv 2302.04867) with data prediction and B(h) = h ("bh1") or expm1(h) ("bh2"), multistep
    of order min(3, steps - 1) with lower orders at the start and the end, as `comfy/extra_samplers/uni_pc.py`
    runs it."""

    def __init__(self, denoise: Denoiser, variant: str):
        self.denoise, self.variant = denoise, variant

    def data_prediction(self, x: Tensor, sigma: Tensor) -> Tensor:
        """x0 from the VP-scaled x, through the noise prediction as ComfyUI computes it."""
        latent = x * ((sigma**2 + 1.0) ** 0.5)
        eps = (latent - self.denoise(latent, sigma)) / sigma
        return (x - _vp_std(sigma) * eps) / _vp_alpha(sigma)

    def update(self, x: Tensor, model_prev: list[Tensor], t_prev: list[Tensor], t: Tensor, order: int,
               use_corrector: bool) -> tuple[Tensor, Tensor | None]:
        """One predictor(-corrector) step from t_prev[-1] to t; returns x at t and x0 at t (corrector only)."""
        lambda_prev_0, lambda_t = _vp_lambda(t_prev[-1]), _vp_lambda(t)
        model_prev_0 = model_prev[-1]
        sigma_prev_0, sigma_t = _vp_std(t_prev[-1]), _vp_std(t)
        alpha_t = torch.exp(_vp_log_alpha(t))
        h = lambda_t - lambda_prev_0
        rks, d1s = [], []
        for i in range(1, order):
            rk = (_vp_lambda(t_prev[-(i + 1)]) - lambda_prev_0) / h
            rks.append(rk)
            d1s.append((model_prev[-(i + 1)] - model_prev_0) / rk)
        rks.append(1.0)
        rks = torch.tensor(rks, device=x.device)

        hh = -h
        h_phi_1 = torch.expm1(hh)  # h * phi_1(h) = e^h - 1
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.variant == "bh1" else torch.expm1(hh)
        powers, b, factorial = [], [], 1
        for i in range(1, order + 1):
            powers.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        r_matrix, b = torch.stack(powers), torch.tensor(b, device=x.device)

        if d1s:
            d1s = torch.stack(d1s, dim=1)  # [B, K, ...]
            rhos_p = (torch.tensor([0.5], device=x.device) if order == 2
                      else torch.linalg.solve(r_matrix[:-1, :-1], b[:-1]))
            predicted = torch.einsum("k,bk...->b...", rhos_p, d1s)
        else:
            d1s, predicted = None, 0
        x_t_ = sigma_t / sigma_prev_0 * x - alpha_t * h_phi_1 * model_prev_0
        x_t = x_t_ - alpha_t * b_h * predicted
        if not use_corrector:
            return x_t, None
        rhos_c = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(r_matrix, b)
        model_t = self.data_prediction(x_t, t)
        corrected = torch.einsum("k,bk...->b...", rhos_c[:-1], d1s) if d1s is not None else 0
        return x_t_ - alpha_t * b_h * (corrected + rhos_c[-1] * (model_t - model_prev_0)), model_t

    def sample(self, x: Tensor, timesteps: Tensor, callback: StepCallback | None) -> Tensor:
        steps = len(timesteps) - 1
        order = min(3, len(timesteps) - 2)
        model_prev: list[Tensor] = []
        t_prev: list[Tensor] = []
        for step_index in range(steps):
            if step_index == 0:
                model_prev, t_prev = [self.data_prediction(x, timesteps[0])], [timesteps[0]]
            elif step_index < order:
                t = timesteps[step_index]
                x, model_x = self.update(x, model_prev, t_prev, t, step_index, use_corrector=True)
                model_prev.append(model_x)
                t_prev.append(t)
            else:  # the last step_index also takes the final step, without a corrector
                for step in range(step_index, step_index + 1 + (step_index == steps - 1)):
                    t = timesteps[step]
                    x, model_x = self.update(x, model_prev, t_prev, t, min(order, steps + 1 - step),
                                             use_corrector=step != steps)
                    model_prev, t_prev = model_prev[1:] + model_prev[-1:], t_prev[1:] + [t]
                    if step < steps:
                        model_prev[-1] = model_x
            if callback is not None:
                callback(step_index, x / _vp_alpha(t_prev[-1]), model_prev[-1])
        return x


def _sample_unipc(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None,
                  variant: str) -> Tensor:
    """ComfyUI's `sample_unipc` and what its KSampler does around it. UniPC's log-SNR is infinite at sigma
    0, so a schedule ending at 0 stops at 0.001 instead, and the result is the flow model's inverse noise
    scaling there, x / (1 - 0.001), as ComfyUI's KSampler applies it with the last sigma that
    `sample_unipc` wrote into the schedule. Any other schedule returns x at its last sigma."""
    ends_at_zero = sigmas[-1:].tolist() == [0.0]
    timesteps = sigmas.clone()
    if ends_at_zero:
        timesteps[-1] = UNI_PC_FINAL_SIGMA
    x = x / torch.sqrt(1.0 + timesteps[0] ** 2.0)
    x = _UniPC(denoise, variant).sample(x, timesteps, callback) / _vp_alpha(timesteps[-1])
    return x / (1.0 - timesteps[-1]) if ends_at_zero else x


@torch.no_grad()
def sample_uni_pc(
    denoise: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """UniPC, variant bh1 (ComfyUI's `uni_pc`); see `_UniPC` and `_sample_unipc`."""
    return _sample_unipc(denoise, x, sigmas, callback, "bh1")


@torch.no_grad()
def sample_uni_pc_bh2(
    denoise: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """UniPC, variant bh2 (ComfyUI's `uni_pc_bh2`)."""
    return _sample_unipc(denoise, x, sigmas, callback, "bh2")


def sample(
    sampler: str, denoise: Denoiser, x: Tensor, sigmas: Tensor, *, noise: NoiseSource,
    callback: StepCallback | None = None, shift: float = DEFAULT_SHIFT, seeds: Sequence[int] | None = None,
) -> Tensor:
    """Runs the named sampler (see `SAMPLERS`) from x at sigmas[0] down the schedule.

    noise: per-step normal noise for the samplers that draw it (`seeded_noise_source`, seeded seed + 1
    for ComfyUI's images). seeds: each image's seed, for the Brownian trees of the DPM++ SDE samplers.
    shift: the schedule's shift, for the log-SNR solvers' first-sigma offset.
    """
    spec = SAMPLERS[canonical_sampler(sampler)]
    noise_sampler = None
    if spec.noise in (BROWNIAN_NOISE, DEVICE_BROWNIAN_NOISE):
        if seeds is None or len(seeds) != x.shape[0]:
            raise ValueError(f"The {spec.name} sampler needs one seed per image for its Brownian-tree noise.")
        noise_sampler = brownian_noise_sampler(seeds, x, sigmas, cpu=spec.noise == BROWNIAN_NOISE)
    elif spec.noise == GAUSSIAN_NOISE:
        noise_sampler = lambda sigma, sigma_next: noise()  # noqa: E731
    if spec.log_snr:
        sigmas = offset_first_sigma(sigmas, shift)
    return _SAMPLE_FUNCTIONS[spec.name](denoise, x, sigmas, noise_sampler, callback)


def start_latents(noise: Tensor, sigmas: Tensor, latent: Tensor | None = None) -> Tensor:
    """The latents sampling starts from: ComfyUI's flow noise scaling sigma0 * noise + (1 - sigma0) * latent
    of the source latent (img2img), or of an empty latent, sigmas[0] * noise (the noise itself when the
    schedule starts at 1)."""
    if latent is None:
        return sigmas[0] * noise
    return sigmas[0] * noise + (1.0 - sigmas[0]) * latent


def cfg_cutoff_sigma(sigmas: Tensor, cfg_truncation: float) -> float | None:
    """The sigma at and below which guidance stops, for CFG applied in the first `cfg_truncation` fraction of
    the steps (rounded half up to whole steps); None when that is every step (1 or more)."""
    steps = len(sigmas) - 1
    guided_steps = min(steps, max(0, math.floor(cfg_truncation * steps + 0.5)))
    return None if guided_steps >= steps else float(sigmas[guided_steps])


# Each registry entry's implementation, resolved once (a misspelt function name fails here, at import).
_SAMPLE_FUNCTIONS: dict[str, Callable[..., Tensor]] = {name: globals()[s.function] for name, s in SAMPLERS.items()}
