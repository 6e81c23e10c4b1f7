"""The samplers, schedulers and step caches Anima offers, by name: the one registry of each.

Torch-free on purpose: the handler (imported by every host at start-up) and the app's `--help` list these
names without importing torch. Each entry names its implementation, a function of `sampling.py` or
`schedulers.py`; those modules resolve the names once when they are imported, so a misspelt function
fails at import, not at generation time.

Adding a sampler is one function in `sampling.py` and one line in `SAMPLERS`; a scheduler, one function in
`schedulers.py` and one line in `SCHEDULERS`. The step caches' rules live in `step_cache.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_SHIFT = 3.0  # ComfyUI's sampling_settings for Anima
DEFAULT_SAMPLER = "er_sde"  # the model card's
DEFAULT_SCHEDULER = "simple"
SIZE_MULTIPLE = 16  # image sides: 8x VAE downsampling, then 2x2 DiT patches

NO_NOISE, GAUSSIAN_NOISE, BROWNIAN_NOISE, DEVICE_BROWNIAN_NOISE = "none", "gaussian", "brownian", "device_brownian"


@dataclass(frozen=True)
class Sampler:
    name: str  # ComfyUI's name: settings, command line, metadata
    label: str  # for menus (A1111's spelling where A1111 has the sampler)
    function: str  # the `sampling.py` function: (denoise, x, sigmas, noise, callback) -> final latents
    noise: str = NO_NOISE  # NO_NOISE, GAUSSIAN_NOISE (per-step CPU normals), BROWNIAN_NOISE (a torchsde tree on
    # the CPU) or DEVICE_BROWNIAN_NOISE (on the latents' device: ComfyUI's *_gpu samplers)
    log_snr: bool = False  # works in log-SNR, so a first sigma of 1 becomes percent_to_sigma(1e-4)
    drops_penultimate_sigma: bool = False  # ComfyUI schedules steps + 1 and drops the penultimate sigma


@dataclass(frozen=True)
class Scheduler:
    name: str  # ComfyUI's name, used in settings and metadata
    label: str  # for menus; A1111's "Schedule type" spelling where A1111 has the schedule
    function: str  # the `schedulers.py` function: (steps, shift, **options) -> sigmas
    options: tuple[tuple[str, float | bool], ...] = ()  # keyword arguments of `function`


# Menu order: the model card's three first (er_sde is its default), then the rest.
SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("er_sde", "ER-SDE (default)", "sample_er_sde", GAUSSIAN_NOISE, log_snr=True),
    Sampler("euler_ancestral", "Euler a", "sample_euler_ancestral", GAUSSIAN_NOISE),
    Sampler("dpmpp_2m_sde", "DPM++ 2M SDE", "sample_dpmpp_2m_sde", BROWNIAN_NOISE, log_snr=True),
    Sampler("euler", "Euler", "sample_euler"),
    Sampler("heun", "Heun", "sample_heun"),
    Sampler("dpmpp_2m", "DPM++ 2M", "sample_dpmpp_2m"),
    Sampler("dpmpp_3m_sde", "DPM++ 3M SDE", "sample_dpmpp_3m_sde", BROWNIAN_NOISE, log_snr=True),
    Sampler("dpmpp_2m_sde_gpu", "DPM++ 2M SDE (GPU noise)", "sample_dpmpp_2m_sde", DEVICE_BROWNIAN_NOISE,
            log_snr=True),
    Sampler("dpmpp_3m_sde_gpu", "DPM++ 3M SDE (GPU noise)", "sample_dpmpp_3m_sde", DEVICE_BROWNIAN_NOISE,
            log_snr=True),
    Sampler("res_multistep", "RES multistep", "sample_res_multistep"),
    Sampler("uni_pc", "UniPC", "sample_uni_pc", drops_penultimate_sigma=True),
    Sampler("uni_pc_bh2", "UniPC BH2", "sample_uni_pc_bh2", drops_penultimate_sigma=True),
    Sampler("lcm", "LCM", "sample_lcm", GAUSSIAN_NOISE),
)}
SAMPLER_ALIASES = {"euler_a": "euler_ancestral"}

SCHEDULERS: dict[str, Scheduler] = {s.name: s for s in (
    Scheduler("simple", "Simple", "simple_schedule"),
    Scheduler("sgm_uniform", "SGM Uniform", "normal_schedule", (("sgm", True),)),
    Scheduler("karras", "Karras", "karras_schedule"),
    Scheduler("exponential", "Exponential", "exponential_schedule"),
    Scheduler("ddim_uniform", "DDIM", "ddim_uniform_schedule"),
    Scheduler("beta", "Beta", "beta_schedule"),
    Scheduler("normal", "Normal", "normal_schedule"),
    Scheduler("linear_quadratic", "Linear Quadratic", "linear_quadratic_schedule"),
    Scheduler("kl_optimal", "KL Optimal", "kl_optimal_schedule"),
    Scheduler("beta57", "Beta57", "beta_schedule", (("alpha", 0.5), ("beta", 0.7))),  # RES4LYF
)}


def canonical_sampler(name: str) -> str:
    """The sampler's canonical name ("euler_a" -> "euler_ancestral"); ValueError naming the choices."""
    name = SAMPLER_ALIASES.get(name, name)
    if name not in SAMPLERS:
        choices = ", ".join([*SAMPLERS, *SAMPLER_ALIASES])
        raise ValueError(f"Unknown sampler '{name}': choose one of {choices}.")
    return name


def canonical_scheduler(name: str) -> str:
    """`name` when it is a scheduler; ValueError naming the choices otherwise."""
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler '{name}': choose one of {', '.join(SCHEDULERS)}.")
    return name


# ---------------------------------------------------------------------------------------------- step caches

# Published for Anima (checkpoints.md §4), highest power first: p(d) = 16.44 d^4 - 21.14 d^3 + ... + 0.0863.
TEACACHE_COEFFICIENTS = (16.440769544691957, -21.14123745515793, 13.006701290921894, -1.6731977662609427,
                         0.08632681059623949)
# Wan2GP's "Skip Steps Cache Global Acceleration" choices (its default is 1.75).
SPEED_MULTIPLIERS = (1.5, 1.75, 2.0, 2.25, 2.5)
DEFAULT_MULTIPLIER = 1.75


@dataclass(frozen=True)
class StepCacheKind:
    name: str  # Wan2GP's skip_steps_cache_type
    label: str  # for menus and reports
    # speed multiplier -> threshold of the skip rule
    thresholds: Mapping[float, float]
    head_blocks: int  # blocks that always run before the decision (0: TeaCache, 1: First-Block Cache)
    # the reference is the previous evaluation's signature (TeaCache) or the last full one's (FBC)
    reference_every_call: bool

    def threshold(self, multiplier: float) -> float:
        """The threshold for a speed multiplier; ValueError naming the choices."""
        for speed, threshold in self.thresholds.items():
            if abs(float(multiplier) - speed) < 1e-9:
                return threshold
        choices = ", ".join(f"{m:g}" for m in self.thresholds)
        raise ValueError(f"{self.label} has no speed multiplier {multiplier!r}: choose one of {choices}.")


# TeaCache: the published guidance is 0.05 (stays close to the uncached image) to 0.20 (Forge: 72% of the
# passes skipped at 32 steps), 0.15 the community default; x1.5 .. x2.5 map linearly onto 0.05 .. 0.15.
# First-Block Cache: upstream Wan2GP's map from these multipliers to thresholds (its MiniMax H3 FBC).
# Both want calibrating on real Anima weights (bench/cache.py measures what each gives).
STEP_CACHES: dict[str, StepCacheKind] = {k.name: k for k in (
    StepCacheKind("tea", "TeaCache", dict(zip(SPEED_MULTIPLIERS, (0.05, 0.075, 0.10, 0.125, 0.15))),
                  head_blocks=0, reference_every_call=True),
    StepCacheKind("first_block", "First-Block Cache", dict(zip(SPEED_MULTIPLIERS, (0.06, 0.08, 0.10, 0.12, 0.14))),
                  head_blocks=1, reference_every_call=False),
)}
OFF_LABEL = "Off"


def menu_choices() -> list[tuple[str, str]]:
    """[(label, skip_steps_cache_type)] for the cache menu, "Off" first."""
    return [(OFF_LABEL, ""), *((kind.label, kind.name) for kind in STEP_CACHES.values())]


def multiplier_choices() -> list[tuple[str, float]]:
    return [(f"x{m:g} (about {m:g} times faster)", m) for m in SPEED_MULTIPLIERS]
