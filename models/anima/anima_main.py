"""Anima text-to-image generation in Wan2GP's shape: `model_factory` loads the DiT, the text encoder and the
VAE, and its `generate(**kwargs)` is the one generation loop that the UI and the command line both call.

One image, as in ComfyUI (anima_reference.md §1, §5):
    prompt -> Qwen3 hidden states (+ T5 ids) -> LLM adapter -> context [1, >=512, D]
    noise [16, 1, H/8, W/8] from a CPU generator seeded `seed + i` for image i
    scheduler sigmas (shift) -> sampler; each step x0 = x - sigma * DiT(x, sigma, context), CFG on x0
    normalised latents -> VAE -> image [3, H, W] in [-1, 1] -> uint8 pixels, truncated as ComfyUI saves them

Devices: the models are loaded on the CPU. Without CUDA everything runs there; with CUDA the host hands
the module dict to mmgp (`offload.profile`), which moves weights to the GPU on demand, or places the
modules on the GPU itself, and `generate` puts its tensors on the execution device (`model_factory.device`).
Every tensor is made with an explicit device (noise, schedules and previews on the CPU on purpose): mmgp
leaves torch's default device on CUDA, so nothing may rely on it.
"""

from __future__ import annotations

import importlib
import math
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import image_inputs, sampling, step_cache
from .registry import DEFAULT_SAMPLER, DEFAULT_SCHEDULER, DEFAULT_SHIFT, SIZE_MULTIPLE
from .anima_model import load_anima_model, save_anima_model
from .lora import LoraPatcher
from .lora_tags import extract_lora_tags, find_lora_file
from .text_encoder import EncodedPrompt, PromptCache, load_text_encoder
from .vae import load_vae

LATENT_CHANNELS = 16
VAE_SCALE = 8
MAX_RANDOM_SEED = 999_999_999  # Wan2GP's range for seed -1

LoraRequest = Sequence[tuple[str | os.PathLike, float]]


@dataclass(frozen=True)
class ModelDtypes:
    transformer: torch.dtype
    vae: torch.dtype
    text_encoder: torch.dtype


def default_device() -> torch.device:
    """Where `generate` computes: the current CUDA device when there is one (mmgp streams the weights to
    it), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def has_native_bf16(device: torch.device) -> bool:
    """bf16 tensor cores (Ampere, sm80, and later). `torch.cuda.is_bf16_supported()` also counts the
    emulated bf16 of older GPUs, where it is slow and SDPA has no fused bf16 kernel."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def choose_dtypes(device: torch.device, transformer: torch.dtype | None = None, vae: torch.dtype | None = None,
                  text_encoder: torch.dtype | None = None) -> ModelDtypes:
    """The dtype policy; an explicit dtype overrides its default.

    CPU: float32 everywhere, as ComfyUI computes there (the same files, seed and settings give its results).
    GPU with native bf16 (sm80+): bf16 DiT and VAE. Other GPUs: fp16 DiT (it keeps its residual stream in
    fp32) and fp32 VAE (the Qwen-Image VAE overflows in fp16). The text encoder always computes in fp32, as
    in ComfyUI.
    """
    if device.type == "cpu":
        default = ModelDtypes(torch.float32, torch.float32, torch.float32)
    elif has_native_bf16(device):
        default = ModelDtypes(torch.bfloat16, torch.bfloat16, torch.float32)
    else:
        default = ModelDtypes(torch.float16, torch.float32, torch.float32)
    return ModelDtypes(transformer or default.transformer, vae or default.vae, text_encoder or default.text_encoder)


def check_image_size(width: int, height: int) -> None:
    """Width and height must be positive multiples of 16 (8x VAE, 2x2 patches); anything else is refused
    with the nearest valid size rather than silently resized."""
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE or width <= 0 or height <= 0:
        fix_w = max(SIZE_MULTIPLE, round(width / SIZE_MULTIPLE) * SIZE_MULTIPLE)
        fix_h = max(SIZE_MULTIPLE, round(height / SIZE_MULTIPLE) * SIZE_MULTIPLE)
        raise ValueError(f"Image size {width}x{height} is not supported: width and height must be multiples of "
                         f"{SIZE_MULTIPLE}, e.g. {fix_w}x{fix_h}.")


def vae_tile_pixels(vae_tile_size: int | Sequence | None) -> int | None:
    """Wan2GP's `VAE_tile_size` as the VAE's `tile_size` in pixels: an int (0: automatic), or a
    (use_tiling, size) pair; None lets the VAE choose from free memory."""
    if isinstance(vae_tile_size, Sequence):
        use_tiling, size = (list(vae_tile_size) + [0])[:2]
        return int(size) if use_tiling and size else None
    return int(vae_tile_size) if vae_tile_size else None


def comfyui_pixels(images: Tensor) -> Tensor:
    """Images in [-1, 1] as uint8 the way ComfyUI saves them: to [0, 1], then 255 * x truncated. Returning
    pixels rather than floats makes every host save these exact values (upstream Wan2GP rounds floats).
    NaN or infinite values (which uint8 would silently turn black) raise a ValueError instead."""
    if not bool(torch.isfinite(images).all()):
        raise ValueError("The decoded image holds NaN or infinite values, so it was not saved; likely causes: a "
                         "LoRA strength far too high, or fp16 overflowing on this GPU (try --dtype bf16 or fp32).")
    return (((images.float() + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def _exact(tensor: Tensor) -> Tensor:
    """`tensor` as float64 for a call that mmgp may hook: its hooks cast float32 arguments to the module's
    dtype (bf16 would round sigma to 3 digits, where ComfyUI keeps the timestep in fp32), while float64
    passes through and the DiT and the VAE take it back to float32 themselves, exactly."""
    return tensor.double()


def _warn_hires_scale(scale: float) -> None:
    if scale > image_inputs.HIRES_WARN_SCALE:
        print(f"Hires fix: an upscale of {scale:g}x in one pass; Anima degrades past about "
              f"{image_inputs.HIRES_WARN_SCALE:g}x per pass (beyond ~1.5 MP), use two passes of at most 1.5x.")


class _Interrupted(Exception):
    """Raised inside the sampling loop when `_interrupt` is set; `generate` returns None."""


class model_factory:  # noqa: N801 (Wan2GP's name for a family's model object)
    """Anima's DiT (with its LLM adapter), Qwen3 text encoder and Wan 2.1 VAE, and `generate`.

    Args:
        transformer_filename: the DiT checkpoint (`anima-preview.safetensors` or any Anima DiT).
        text_encoder_filename: `qwen_3_06b_base.safetensors`.
        vae_filename: `qwen_image_vae.safetensors`.
        dtype, vae_dtype, text_encoder_dtype: override the policy of `choose_dtypes` (None: the policy).
        device: execution device (None: `default_device()`).
        low_memory: on the CPU, free the text encoder after encoding (reloaded when a new prompt or a LoRA
            needs it). On CUDA, mmgp already evicts it from the GPU.
        quantize: "int8", "int8_convrot" or "fp8": quantize the DiT's attention and MLP weights while loading
            (`load_anima_model`); None keeps the file as it is (quantized files stay quantized anyway).
        save_quantized: a path: write the loaded DiT there in ComfyUI's `comfy_quant` layout
            (`save_anima_model`), e.g. after `quantize`, so the next start loads the small file.

    Attributes: `transformer`, `text_encoder` (None while freed), `vae`, `device`, `dtypes`, and
    `_interrupt`: set it to True to stop a running `generate` (the caller resets it before each run, as wgp
    does).
    """

    def __init__(self, transformer_filename: str | os.PathLike, text_encoder_filename: str | os.PathLike,
                 vae_filename: str | os.PathLike, *, dtype: torch.dtype | None = None,
                 vae_dtype: torch.dtype | None = None, text_encoder_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, low_memory: bool = False, quantize: str | None = None,
                 save_quantized: str | os.PathLike | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.dtypes = choose_dtypes(self.device, dtype, vae_dtype, text_encoder_dtype)
        self.text_encoder_filename = text_encoder_filename
        self.low_memory = low_memory
        self.transformer = load_anima_model(transformer_filename, dtype=self.dtypes.transformer, quantize=quantize)
        if save_quantized:
            save_anima_model(self.transformer, save_quantized)
        self.text_encoder = self._load_text_encoder()
        self.vae = load_vae(vae_filename, dtype=self.dtypes.vae)
        # For mmgp: keep each module's dtype (instead of converting fp32 weights to bf16), and load the VAE
        # before `decode` / `encode` run, not only before its submodules' forwards.
        self.transformer._model_dtype = self.dtypes.transformer
        self.vae._model_dtype = self.dtypes.vae
        self.vae._offload_hooks = ["decode", "encode"]
        self._interrupt = False
        self._prompt_cache = PromptCache()
        self._lora_patcher = None

    def _load_text_encoder(self):
        text_encoder = load_text_encoder(self.text_encoder_filename, dtype=self.dtypes.text_encoder)
        text_encoder._model_dtype = self.dtypes.text_encoder
        return text_encoder

    @torch.no_grad()
    def generate(self, input_prompt: str = "", n_prompt: str | None = None, sampling_steps: int = 30,
                 guide_scale: float = 4.0, shift: float = DEFAULT_SHIFT,
                 sample_solver: str = DEFAULT_SAMPLER, width: int = 1024, height: int = 1024,
                 seed: int | None = None, batch_size: int = 1, callback: Callable | None = None,
                 VAE_tile_size: int | Sequence | None = None, joint_pass: bool = True,  # noqa: N803 (Wan2GP)
                 loras: LoraRequest | None = None, lora_dir: str | os.PathLike | None = None,
                 offloadobj=None, scheduler: str | None = None, cfg_truncation: float | None = None,
                 custom_settings: dict | None = None, loras_slists: dict | None = None,
                 skip_steps_cache_type: str | None = None, skip_steps_multiplier: float | None = None,
                 skip_steps_start_step_perc: float | None = None,
                 input_frames: Tensor | None = None, input_masks: Tensor | None = None,
                 denoising_strength: float | None = 1.0, masking_strength: float | None = 1.0,
                 video_prompt_type: str | None = "", hires_scale: float | None = None,
                 hires_denoise: float | None = None, hires_steps: int | None = None,
                 hires_upscaler: str | None = None, **kwargs) -> dict[str, Tensor | int] | None:
        """Generate `batch_size` images; Wan2GP's keyword arguments (others are accepted and ignored).

        input_prompt / n_prompt: positive and negative prompt (ComfyUI weight syntax; `<lora:name:0.8>`
            tags in the positive prompt activate LoRAs from `lora_dir`). The negative is unused at CFG 1.
        sampling_steps, shift: the schedule; guide_scale: CFG on x0 (1 skips the negative pass).
        sample_solver: a name of `sampling.SAMPLERS` (ComfyUI's; "euler_a" is accepted).
        scheduler: a name of `registry.SCHEDULERS` (default "simple"); cfg_truncation: apply CFG only in
            that first fraction of the steps, the later ones run the positive prompt alone (default 1:
            every step). Both may also come in `custom_settings` (upstream Wan2GP's per-model settings).
        width, height: pixels, multiples of 16 (anything else raises ValueError).
        seed: image i uses seed + i for its start noise and seed + i + 1 for per-step noise (the Brownian
            tree of the DPM++ SDE samplers: seed + i), as ComfyUI for that image alone (None or negative:
            random). batch_size: number of images.
        callback: Wan2GP's progress callback: `callback(-1, None, True, override_num_inference_steps=N)`
            once with N the steps that will actually run (both passes of a hires fix), then
            `callback(i, x0, False)` after step i with the denoised latents [16, B, h, w].
        VAE_tile_size: decode tile edge in pixels (0 / None: chosen from free memory).
        joint_pass: run the positive and negative passes as one batch (faster, more memory).
        loras: [(file, strength)] to make active (with the prompt's tags); None and no tags leave the
            current LoRAs as they are. offloadobj: mmgp's offload object (wgp passes it); it unloads the
            models before LoRA weights change. loras_slists: upstream Wan2GP's per-step multipliers of the
            LoRAs it loaded through mmgp (applied with its own helpers when it has them).
        skip_steps_cache_type: "tea" (TeaCache) or "first_block" (First-Block Cache) skips DiT evaluations that
            would change little ("" : off); skip_steps_multiplier: its speed multiplier (1.5 .. 2.5);
            skip_steps_start_step_perc: no skipping in that first percentage of the steps (step_cache.py).
            None: upstream Wan2GP's settings in `transformer.cache`, if it set them.

        Image inputs (Wan2GP's kwargs; semantics in image_inputs.py, ComfyUI's):
        input_frames: the source image [3, 1, H, W] float in [-1, 1] (img2img; shared by the batch), of the
            output size. input_masks: [1, 1, H, W] in [0, 1], 1 = repaint (inpainting, outpainting); ignored
            with "U" in video_prompt_type, an all-zero mask is img2img.
        denoising_strength: ComfyUI's denoise d (1: from pure noise, 0: the source unchanged);
            masking_strength: the unmasked area is kept in the first ceil(steps * m) steps only.
        image_mode, outpainting_dims: accepted and ignored (the host has padded the canvas already).
        hires_scale: run a hires-fix pass (None or 1: none): the decoded images are upscaled with Lanczos by
            this factor (multiples of 16), then denoised as img2img at hires_denoise (default 0.5) for
            hires_steps steps (0 / None: sampling_steps). hires_upscaler: "lanczos". Any of these may also
            come in `custom_settings`.

        Returns {"x": images [3, B, H, W] uint8 on the CPU (`comfyui_pixels`), "seed": the first seed, and
        with a step cache "step_cache": what it skipped}, or None when `_interrupt` was set.
        """
        check_image_size(width, height)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {batch_size}).")
        solver = sampling.canonical_sampler(sample_solver or DEFAULT_SAMPLER)
        custom_settings = custom_settings or {}
        scheduler = scheduler or custom_settings.get("scheduler") or DEFAULT_SCHEDULER
        if cfg_truncation is None:
            cfg_truncation = float(custom_settings.get("cfg_truncation", 1.0))
        guide = image_inputs.image_guide(input_frames, input_masks, denoising_strength, masking_strength,
                                         video_prompt_type, width, height)
        hires = image_inputs.hires_pass(*(value if value is not None else custom_settings.get(key) for key, value in (
            ("hires_scale", hires_scale), ("hires_denoise", hires_denoise), ("hires_steps", hires_steps))),
            base_steps=sampling_steps, upscaler=hires_upscaler or custom_settings.get("hires_upscaler"))
        schedule = image_inputs.denoise_schedule(scheduler, sampling_steps, shift, solver,
                                                 guide.denoise if guide is not None else 1.0)
        hires_schedule = None
        if hires is not None:
            hires_schedule = image_inputs.denoise_schedule(scheduler, hires.steps, shift, solver, hires.denoise)
            _warn_hires_scale(hires.scale)
        if seed is None or seed < 0:
            seed = secrets.randbelow(MAX_RANDOM_SEED + 1)
        seeds = [seed + i for i in range(batch_size)]
        tile = vae_tile_pixels(VAE_tile_size)
        try:
            prompt = self._activate_loras(input_prompt, loras, lora_dir, offloadobj)
            prompts = [prompt] if math.isclose(guide_scale, 1.0) else [prompt, n_prompt or ""]
            encoded = [self._encode(p) for p in prompts]  # the text encoder first, then the adapter (in the DiT)
            self._release_text_encoder()
            cond, *uncond = [self._context(e) for e in encoded]
            if callback is not None:
                run_steps = schedule.steps + (hires_schedule.steps if hires_schedule is not None else 0)
                callback(-1, None, True, override_num_inference_steps=run_steps)
            cache_runs: list[step_cache.StepCacheRun] = []

            def run_pass(schedule: image_inputs.Schedule, source: image_inputs.SourceLatents | None, width: int,
                         height: int, first_step: int = 0) -> Tensor:
                sigmas = schedule.sigmas.to(self.device)
                # each pass its own cache state: the hires pass's DiT inputs have another size
                cache_run = self._step_cache_run(skip_steps_cache_type, skip_steps_multiplier,
                                                 skip_steps_start_step_perc)
                if cache_run is not None:
                    cache_runs.append(cache_run)
                denoise = self._denoiser(cond, uncond[0] if uncond else None, guide_scale, joint_pass,
                                         sampling.cfg_cutoff_sigma(sigmas, cfg_truncation), cache_run)
                lora_step = self._lora_step_setter(loras_slists, schedule.full_steps, schedule.first_step)
                return self._sample(solver, denoise, sigmas, seeds, width, height, shift, callback, lora_step,
                                    source=source, first_step=first_step, cache_run=cache_run)

            source = self._guide_source(guide, batch_size, schedule.steps, tile) if guide is not None else None
            latents = run_pass(schedule, source, width, height)
            # the VAE decodes image by image, so each image is decoded exactly as it would be alone
            images = self.vae.decode(_exact(latents), tile_size=tile)  # [B, 3, H, W]
            if hires is not None:
                hires_width, hires_height = hires.size(width, height)
                upscaled = image_inputs.upscale_pixels(comfyui_pixels(images), hires_width, hires_height)
                source = image_inputs.SourceLatents(self._encode_pixels(upscaled, tile))
                latents = run_pass(hires_schedule, source, hires_width, hires_height, first_step=schedule.steps)
                images = self.vae.decode(_exact(latents), tile_size=tile)
        except _Interrupted:
            return None
        return {"x": comfyui_pixels(images).transpose(0, 1).cpu(), "seed": seed} | self._step_cache_report(cache_runs)

    def _encode_pixels(self, pixels: Tensor, tile: int | None) -> Tensor:
        """Normalised latents [B, 16, 1, h, w] float32 on the execution device of images [B, 3, H, W] in
        [-1, 1] (the VAE's posterior mean, image by image)."""
        self._check_interrupt()
        return self.vae.encode(_exact(pixels.to(self.device)), tile_size=tile).float()[:, :, None]

    def _guide_source(self, guide: image_inputs.ImageGuide, batch_size: int, steps: int,
                      tile: int | None) -> image_inputs.SourceLatents | None:
        """The encoded source image, shared by the batch, with its latent mask kept for the first
        ceil(steps * masking) of the `steps` run; None when d = 1 without a mask (that run never reads it)."""
        if not guide.needs_latent:
            return None
        latents = self._encode_pixels(guide.pixels, tile)  # [1, 16, 1, h, w]
        mask = None if guide.mask is None else image_inputs.latent_mask(guide.mask, latents.shape).to(self.device)
        return image_inputs.SourceLatents(latents.expand(batch_size, *latents.shape[1:]), mask,
                                          image_inputs.masked_steps(steps, guide.masking))

    def _sample(self, solver: str, denoise: sampling.Denoiser, sigmas: Tensor, seeds: list[int], width: int,
                height: int, shift: float, callback: Callable | None,
                lora_step: Callable[[int], None] | None = None, source: image_inputs.SourceLatents | None = None,
                first_step: int = 0, cache_run: step_cache.StepCacheRun | None = None) -> Tensor:
        """Final normalised latents [B, 16, 1, h, w]: start noise from CPU generators seeded `seeds`,
        per-step noise from generators seeded `seeds + 1` and Brownian trees seeded `seeds` (ComfyUI's CPU
        convention), Wan2GP callbacks (step i reported as `first_step + i`). `lora_step(i)` runs before step
        i (upstream's per-step LoRA multipliers); `cache_run` hears of each step and its report goes with the
        step's callback. With a `source`, sampling starts from it noised to the first sigma and its mask is
        kept during its masked steps; with no sigma to run it is the result."""
        if len(sigmas) < 2:
            self._check_interrupt()
            return source.latents.clone()
        shape = (LATENT_CHANNELS, 1, height // VAE_SCALE, width // VAE_SCALE)
        start_noise = sampling.seeded_randn(seeds, shape).to(self.device)
        x = sampling.start_latents(start_noise, sigmas, None if source is None else source.latents)
        noise = sampling.seeded_noise_source([s + 1 for s in seeds], x)
        if cache_run is not None:
            cache_run.start(len(sigmas) - 1)
        steps_done = 0
        if source is not None and source.mask is not None:
            denoise = image_inputs.masked_denoiser(denoise, source.latents, start_noise, source.mask,
                                                   lambda: steps_done < source.masked_steps)
        if lora_step is not None:
            lora_step(0)

        def on_step(i: int, _x: Tensor, x0: Tensor) -> None:
            nonlocal steps_done
            steps_done = i + 1
            if callback is not None:
                extra = {} if cache_run is None else {"denoising_extra": cache_run.step_report(i)}
                callback(first_step + i, x0[:, :, 0].transpose(0, 1), False, **extra)  # [16, B, h, w]: images on frames
            if cache_run is not None:
                cache_run.begin_step(i + 1)
            if lora_step is not None and i + 1 < len(sigmas) - 1:
                lora_step(i + 1)

        latents = sampling.sample(solver, denoise, x, sigmas, noise=noise, callback=on_step, shift=shift,
                                  seeds=seeds)
        self._check_interrupt()
        return latents

    def _check_interrupt(self) -> None:
        if self._interrupt:
            raise _Interrupted

    def _denoiser(self, cond: Tensor, uncond: Tensor | None, guide_scale: float, joint_pass: bool,
                  cfg_cutoff: float | None = None,
                  cache_run: step_cache.StepCacheRun | None = None) -> sampling.Denoiser:
        """denoise(x, sigma) -> guided x0 for a batch x [B, 16, 1, h, w], with ComfyUI's arithmetic:
        x0 = x - v * sigma per pass, then x0_u + (x0_c - x0_u) * scale; at sigmas <= cfg_cutoff the
        positive pass alone.

        The DiT runs image by image (with its CFG pair batched), so image i of a batch computes exactly
        what it computes alone: a matrix product of another batch size may round differently. With a
        step cache, each image's cond and uncond passes have their own cache state."""
        def dit(x: Tensor, t: Tensor, context: Tensor, keys: tuple) -> Tensor:
            if cache_run is None:
                return self.transformer(x, t, context).float()  # v in fp32, as ComfyUI takes the model output
            return self.transformer(x, t, context, step_cache=cache_run.rows(keys)).float()

        def denoise_one(x: Tensor, t: Tensor, sigma: Tensor, guided: bool, image: int) -> Tensor:  # x [1, 16, 1, h, w]
            if not guided:
                return x - dit(x, t, cond, ((image, "cond"),)) * sigma
            if joint_pass and cond.shape == uncond.shape:
                # uncond first, as ComfyUI batches them
                v_u, v_c = dit(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]),
                               ((image, "uncond"), (image, "cond"))).chunk(2)
            else:  # contexts longer than 512 tokens cannot be zero-padded to match: padding changes attention
                v_c, v_u = dit(x, t, cond, ((image, "cond"),)), dit(x, t, uncond, ((image, "uncond"),))
            x0_c, x0_u = x - v_c * sigma, x - v_u * sigma
            return x0_u + (x0_c - x0_u) * guide_scale

        def denoise(x: Tensor, sigma: Tensor) -> Tensor:
            t = _exact(sigma.reshape(1))  # [1] sigma: the DiT's timestep
            guided = uncond is not None and (cfg_cutoff is None or float(sigma) > cfg_cutoff)
            outs = []
            for image, one in enumerate(x.split(1)):
                self._check_interrupt()
                outs.append(denoise_one(one, t, sigma, guided, image))
            return torch.cat(outs)

        return denoise

    # ------------------------------------------------------------------------------------- step cache

    def _step_cache_run(self, cache_type: str | None, multiplier: float | None,
                        start_step_perc: float | None) -> step_cache.StepCacheRun | None:
        """A fresh cache state for this generation: from the keyword arguments, or when they are None from
        upstream Wan2GP's `transformer.cache`; None when no cache is on."""
        if cache_type is None:
            settings = step_cache.host_cache_settings(getattr(self.transformer, "cache", None))
        else:
            settings = step_cache.cache_settings(cache_type, multiplier, start_step_perc)
        return None if settings is None else step_cache.StepCacheRun(settings)

    def _step_cache_report(self, cache_runs: list[step_cache.StepCacheRun]) -> dict[str, str]:
        """{"step_cache": the passes' summaries} (and upstream Wan2GP's counters, which it prints), or {}."""
        if not cache_runs:
            return {}
        host_cache = getattr(self.transformer, "cache", None)
        if host_cache is not None:
            host_cache.skipped_steps = sum(run.skipped_steps for run in cache_runs)
            host_cache.num_steps = sum(run.num_steps for run in cache_runs)
        summaries = [run.summary() for run in cache_runs]
        return {"step_cache": "; hires pass: ".join(summaries)}

    # ------------------------------------------------------------------------------------------- text

    def _encode(self, prompt: str) -> EncodedPrompt:
        """The prompt's tokens and Qwen3 hidden states (cached), from the text encoder alone."""
        patcher = self._lora_patcher
        te_loras = tuple(patcher.active_text_encoder) if patcher is not None else ()
        encoded = self._prompt_cache.encode(prompt, self._text_encoder_for_encoding,
                                            extra_key=(self.dtypes.text_encoder, te_loras), device=self.device)
        self._check_interrupt()
        return encoded

    def _context(self, encoded: EncodedPrompt) -> Tensor:
        """DiT context [1, max(512, Lt), D] in the DiT dtype, on the execution device (the LLM adapter)."""
        ids, weights = encoded.tokens.t5_tensors(self.device)
        hidden = encoded.qwen_hidden.to(self.device, self.dtypes.transformer)
        return self.transformer.preprocess_text_embeds(hidden, ids, weights)

    def _text_encoder_for_encoding(self):
        if self.text_encoder is None:
            self.text_encoder = self._load_text_encoder()
            self._lora_patcher = None  # it held no LoRA (see _release_text_encoder); rebuilt with the new encoder
        return self.text_encoder

    def _release_text_encoder(self) -> None:
        """Low-memory mode on the CPU: drop the text encoder once the prompts are encoded. Only while no
        LoRA is merged, so that LoRAs are always merged with the encoder present."""
        if not self.low_memory or self.device.type != "cpu" or self.text_encoder is None:
            return
        if self._lora_patcher is not None and self._lora_patcher.active:
            return
        self.text_encoder = self._lora_patcher = None

    # ------------------------------------------------------------------------------------------- LoRAs

    def _lora_step_setter(self, loras_slists: dict | None, steps: int,
                          first_step: int = 0) -> Callable[[int], None] | None:
        """Upstream Wan2GP's per-step LoRA multipliers (`loras_slists`, from settings such as "1.0,0.5"):
        its helper expands them for the `steps` of the full schedule, and mmgp's LoRA hooks then read the
        step number set here before each step (img2img runs the schedule's last steps: step i of the run is
        `first_step + i`, as upstream's families count it). None when the host did not load LoRAs through
        mmgp or lacks the helper (this app merges LoRAs itself, at constant strengths)."""
        if not loras_slists or not hasattr(self.transformer, "_loras_model_data"):
            return None
        try:  # upstream's module, only present when the family runs inside Wan2GP
            multipliers = importlib.import_module("shared.utils.loras_mutipliers")
            from mmgp import offload
        except ImportError:
            return None
        multipliers.update_loras_slists(self.transformer, loras_slists, steps)
        return lambda i: offload.set_step_no_for_lora(self.transformer, first_step + i)

    def _activate_loras(self, prompt: str, loras: LoraRequest | None, lora_dir: str | os.PathLike | None,
                        offloadobj=None) -> str:
        """Merges the `loras` kwarg plus the prompt's `<lora:...>` tags (before any text is encoded) and
        returns the prompt without its tags. With loras None and no tags the LoRA state is left alone."""
        prompt, tags = extract_lora_tags(prompt)
        if loras is None and not tags:
            return prompt
        wanted = [(str(path), float(strength)) for path, strength in (loras or [])]
        wanted += [(str(find_lora_file(name, lora_dir)), strength) for name, strength in tags]
        if wanted and self.text_encoder is None:
            self._text_encoder_for_encoding()
        if self._lora_patcher is None:
            if not wanted:
                return prompt
            self._lora_patcher = LoraPatcher(self.transformer, self.text_encoder)
        if offloadobj is not None and wanted != self._lora_patcher.active:
            offloadobj.unload_all()  # mmgp's GPU copies would hide weights patched in RAM
        for warning in self._lora_patcher.set_loras(wanted):
            print(f"LoRA warning: {warning}")
        return prompt
