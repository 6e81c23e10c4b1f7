"""Running generations: the weights are fetched and the model loaded once, then each validated `Task`
becomes one `model.generate(**kwargs)` call (Wan2GP's contract, built in `generate_kwargs` only) whose
images are checked (no NaN or infinity) and saved with metadata.

The CLI and the UI both drive this class, so both produce the same files for the same settings.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shared.files import DownloadError, fetch_model_files, is_prequantized, missing_model_files
from shared.image_inputs import PreparedInputs
from shared.image_inputs import prepare as prepare_image_inputs
from shared.images import a1111_parameters, check_output_dir, image_stem, save_image, tensor_to_pil
from shared.licenses import License, LicenseNotAccepted, LicenseStore, license_of
from shared.loras import TaskLora, lora_short_hash, task_loras
from shared.offload import PROFILE_NAMES, auto_profile, offload_pipe
from shared.settings import ModelRegistry, Task, parse_resolution

APP_VERSION = "AnimaGP"
RANDOM_SEED_MAX = 999_999_999  # Wan2GP's range for seed -1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO_PROFILE = -1.0  # chosen from the free VRAM and RAM when the model loads


class GenerationError(RuntimeError):
    """A generation went wrong in a way the user can act on (e.g. NaN values); nothing was saved."""


# Mistakes a user can fix (bad settings, missing or broken files): reported in one line, no traceback.
USER_ERRORS = (ValueError, OSError, DownloadError, GenerationError, LicenseNotAccepted)
NON_FINITE_HINT = ("likely causes: a LoRA strength far too high, fp16 overflowing on this GPU (try --dtype bf16 "
                   "or fp32), or a damaged checkpoint")


def requested_dtype(name: str, definition: dict[str, Any]) -> torch.dtype | None:
    """The dtype to load with: `--dtype`, else one the model definition forces, else None (`auto`: the
    family's own policy, e.g. fp32 on the CPU, bf16 on a GPU that has it)."""
    if name != "auto":
        return DTYPES[name]
    return DTYPES.get(definition.get("dtype"))


@dataclass(frozen=True)
class RuntimeOptions:
    ckpts_dir: Path
    output_dir: Path
    lora_dir: Path | None = None  # None: the handler's folder under `lora_root`
    lora_root: Path = Path("loras")
    dtype: str = "auto"
    profile: float = AUTO_PROFILE
    image_format: str = "png"
    low_memory: bool = False  # free the text encoder after encoding (model_factory's low_memory)
    local_lora_paths: frozenset[str] = frozenset()  # LoRA paths the local command line gave (may be anywhere)
    offload: bool = True  # False: with CUDA, every model is placed on the GPU (no mmgp)
    compile: bool = False  # torch.compile the transformer's blocks (CUDA only)
    quantize: str | None = None  # "int8", "int8_convrot", "fp8": such weights (a listed file, or quantized at load)
    save_quantized: Path | None = None  # write the loaded (quantized) DiT there, in ComfyUI's layout
    settings_dir: Path | None = None  # where accepted licences are remembered (None: this run only)
    accept_license: bool = False  # --accept-license: accept a model's licence when its weights are downloaded


@dataclass(frozen=True)
class StepInfo:
    step: int  # 1-based
    total: int
    elapsed: float  # seconds since denoising started
    eta: float | None  # seconds left, from the mean step time so far
    latent: Tensor | None  # [C, T, h, w] latents after this step (T = images of the batch)
    detail: str = ""  # what the model says of this step (Wan2GP's `denoising_extra`: the step cache's report)


@dataclass(frozen=True)
class SavedImage:
    path: Path
    seed: int
    settings: dict[str, Any]  # the settings that re-make exactly this image (its own seed, batch 1)
    parameters: str  # the A1111 text stored in the file


class _StepReporter:
    """Wan2GP's `callback(step_idx, latent, force_refresh, ...)` turned into StepInfo reports; latents with
    NaN or infinite values stop the run (`stop`) at that step instead of ending as a black image."""

    def __init__(self, total: int, on_step: Callable[[StepInfo], None] | None, stop: Callable[[], None]):
        self.total, self.on_step, self.stop = total, on_step, stop
        self.start = time.monotonic()
        self.non_finite_step: int | None = None

    def __call__(self, step_idx: int = -1, latent: Tensor | None = None, force_refresh: bool = True,
                 read_state: bool = False, override_num_inference_steps: int = -1, denoising_extra: str = "",
                 **_: Any) -> None:
        if override_num_inference_steps > 0:
            self.total, self.start = override_num_inference_steps, time.monotonic()
        if step_idx < 0:
            return  # start-of-loop reset, or a heartbeat from inside the transformer
        step = step_idx + 1
        if latent is not None and self.non_finite_step is None and not bool(torch.isfinite(latent).all()):
            self.non_finite_step = step
            self.stop()
        if self.on_step is None:
            return
        elapsed = time.monotonic() - self.start
        eta = elapsed / step * max(self.total - step, 0)
        self.on_step(StepInfo(step, self.total, elapsed, eta, latent, denoising_extra))


@dataclass
class _Loaded:
    model_type: str
    model: Any
    pipe: Any
    offload: Any  # mmgp's offload object on a GPU, else None
    weights: Path  # the DiT file it was loaded from (the metadata's "Model")


class Runtime:
    """Holds at most one loaded model; `generate` loads (and downloads) what a task needs first."""

    def __init__(self, registry: ModelRegistry, options: RuntimeOptions, *, log: Callable[[str], None] = print):
        self.registry, self.options, self.log = registry, options, log
        self.licenses = LicenseStore(options.settings_dir)
        self._save_to = options.save_quantized  # written at the first load only
        self._loaded: _Loaded | None = None
        self._lock = threading.Lock()
        self._abort_requested = False
        self.last_summary: str | None = None  # what the last generation's step cache skipped, if it had one

    # --------------------------------------------------------------------------------------- models

    def lora_dir(self, model_type: str) -> Path:
        if self.options.lora_dir is not None:
            return self.options.lora_dir
        entry = self.registry.entry(model_type)
        if hasattr(entry.handler, "get_lora_dir"):
            return Path(entry.handler.get_lora_dir(entry.base_model_type, self.options, str(self.options.lora_root)))
        return self.options.lora_root / entry.base_model_type

    def model_files(self, model_type: str) -> list[Path]:
        """Local paths of the model's weights (transformer first), downloading what is missing once its
        licence is accepted (LicenseNotAccepted otherwise); one DownloadError names everything that could not
        be had."""
        entry = self.registry.entry(model_type)
        return fetch_model_files(entry.handler, entry.base_model_type, entry.definition, self.options.ckpts_dir,
                                 self.options.quantize, before_download=lambda _: self._require_license(model_type))

    def missing_files(self, model_type: str) -> list[str]:
        """The weight files (URLs) of `model_type` that are not in the checkpoints folder yet."""
        entry = self.registry.entry(model_type)
        return missing_model_files(entry.handler, entry.base_model_type, entry.definition, self.options.ckpts_dir,
                                   self.options.quantize)

    # ------------------------------------------------------------------------------------- licences

    def license_to_accept(self, model_type: str) -> License | None:
        """The licence the user must still accept before `model_type`'s missing weights are downloaded (None
        when nothing is missing, it has none, it was accepted, or --accept-license was given)."""
        license = license_of(self.registry.entry(model_type).definition)
        if license is None or self.options.accept_license or self.licenses.accepted(license):
            return None
        return license if self.missing_files(model_type) else None

    def accept_license(self, license: License) -> None:
        self.licenses.accept(license)

    def _require_license(self, model_type: str) -> None:
        license = license_of(self.registry.entry(model_type).definition)
        if license is None or self.licenses.accepted(license):
            return
        if not self.options.accept_license:
            raise LicenseNotAccepted(license)
        self.log(f"{license.text()}\nAccepted with --accept-license (remembered; not asked again).")
        self.accept_license(license)

    def check(self, task: Task) -> list[str]:
        """Everything about `task` that can fail before generating: its LoRA files, its source image and
        mask, the output folder, a licence to accept before its weights are downloaded. Raises a USER_ERRORS
        exception that says what to fix; returns notices about the image inputs (what will be resized or
        dropped)."""
        self.loras(task)
        notices = list(self.image_inputs(task).notices)
        check_output_dir(self.options.output_dir)
        license = self.license_to_accept(task.model_type)
        if license is not None:
            raise LicenseNotAccepted(license)
        return notices

    def image_inputs(self, task: Task) -> PreparedInputs:
        """The task's source image and mask as `generate()` takes them (shared/image_inputs.py), outpainting
        margins rounded as the model's definition says (as upstream Wan2GP reads it)."""
        width, height = parse_resolution(task["resolution"], 1)
        definition = self.registry.entry(task.model_type).definition
        quantum = definition.get("outpainting_quantize_margins") or self.registry.schema["resolution"].rule(
            definition).multiple
        return prepare_image_inputs(task.values, width, height, int(quantum))

    def loras(self, task: Task) -> tuple[str, list[TaskLora]]:
        """(prompt without LoRA tags, the task's LoRA files)."""
        entry = self.registry.entry(task.model_type)
        return task_loras(task, entry.handler, self.lora_dir(task.model_type),
                          local_paths=self.options.local_lora_paths)

    def load(self, model_type: str) -> Any:
        """The model for `model_type`, loaded once; another model loaded before is released first."""
        if self._loaded and self._loaded.model_type == model_type:
            return self._loaded.model
        self.release()
        entry = self.registry.entry(model_type)
        paths = self.model_files(model_type)
        dtype = requested_dtype(self.options.dtype, entry.definition)
        quantize, save = self.options.quantize, self._save_to
        if is_prequantized(paths[0]):
            if save:
                raise ValueError(f"{paths[0].name} is already quantized: --save-quantized writes a quantized copy of "
                                 "a full-precision DiT (bf16), e.g. the model's official file or --dit FILE.")
            if quantize:
                self.log(f"{paths[0].name} is already quantized: it is used as it is (no --quantize {quantize}).")
                quantize = None
        self.log(f"Loading {entry.name}" + (f" (quantizing its DiT to {quantize or 'int8'})" if quantize or save
                                             else "") + "...")
        model, pipe = entry.handler.load_model(
            [str(p) for p in paths], model_type, entry.base_model_type, entry.definition, dtype=dtype,
            profile=self.options.profile, low_memory=self.options.low_memory, quantizeTransformer=quantize or False,
            save_quantized=str(save) if save else False,
        )
        if save:
            self._save_to = None
            self.log(f"Saved the quantized DiT to {save}.")
        # with CUDA, mmgp streams the modules to the GPU; fp32 leftovers become `dtype` (modules that carry
        # a `_model_dtype` keep theirs); without CUDA everything stays on the CPU
        offload = offload_pipe(pipe, self._profile(pipe), dtype or torch.bfloat16, offload=self.options.offload,
                               compile=self.options.compile)
        self._loaded = _Loaded(model_type, model, pipe, offload, paths[0])
        return model

    def _profile(self, pipe: Any) -> float:
        """The mmgp profile to use (`--profile`, or chosen from free memory for -1), said in the log."""
        if not torch.cuda.is_available():
            return self.options.profile
        if not self.options.offload:
            self.log("No offloading: every model is placed on the GPU.")
            return self.options.profile
        if self.options.profile != AUTO_PROFILE:
            return self.options.profile
        profile, why = auto_profile(pipe)
        self.log(f"Memory profile {profile:g} ({PROFILE_NAMES[profile]}), chosen from free memory: {why}. "
                 f"--profile N sets it.")
        return profile

    def release(self) -> None:
        if self._loaded is None:
            return
        if self._loaded.offload is not None:
            self._loaded.offload.release()
        self._loaded = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------ generating

    def abort(self) -> None:
        """Stop the running generation at its next step (safe to call from another thread)."""
        with self._lock:
            self._abort_requested = True
            if self._loaded is not None:
                self._loaded.model._interrupt = True

    def generate(self, task: Task, *, on_step: Callable[[StepInfo], None] | None = None,
                 on_status: Callable[[str], None] | None = None,
                 on_saved: Callable[[SavedImage], None] | None = None) -> list[SavedImage] | None:
        """Generate and save the images of one validated task (`on_saved` hears of each file as it is
        written); None if it was aborted. GenerationError when the result holds NaN or infinite values."""
        with self._lock:
            self._abort_requested = False
        self.last_summary = None
        model_type = task.model_type
        prompt, loras = self.loras(task)
        if on_status and not (self._loaded and self._loaded.model_type == model_type):
            on_status("Loading the model (missing weights are downloaded first: progress in the console)...")
        model = self.load(model_type)
        seed = task["seed"] if task["seed"] != -1 else random.randint(0, RANDOM_SEED_MAX)
        task = task.replace(seed=seed)
        with self._lock:
            if self._abort_requested:
                return None
            model._interrupt = False
        if on_status:
            on_status("Generating...")

        def stop() -> None:
            model._interrupt = True

        reporter = _StepReporter(task["num_inference_steps"], on_step, stop)
        try:  # the notices of the image inputs were shown when the task was checked
            out = model.generate(**self.generate_kwargs(task, prompt, loras, reporter))
        finally:
            if self._loaded.offload is not None:
                self._loaded.offload.unload_all()  # as wgp does: LoRAs are merged between generations
        if reporter.non_finite_step is not None:
            raise GenerationError(f"The sampler produced NaN or infinite values at step {reporter.non_finite_step} "
                                  f"of {reporter.total} (the image would be black), so it stopped and saved "
                                  f"nothing; {NON_FINITE_HINT}.")
        if out is None:  # aborted
            return None
        self.last_summary = out.get("step_cache") if isinstance(out, dict) else None
        if self.last_summary:
            self.log(self.last_summary)
        images = out["x"] if isinstance(out, dict) else out  # [3, B, H, W], uint8 or floats in [-1, 1]
        if images.is_floating_point() and not bool(torch.isfinite(images).all()):
            raise GenerationError(f"The decoded image holds NaN or infinite values, so nothing was saved; "
                                  f"{NON_FINITE_HINT}.")
        return self._save_all(images, task, prompt, loras, on_saved)

    def generate_kwargs(self, task: Task, prompt: str, loras: list[TaskLora], callback: Callable) -> dict[str, Any]:
        """Wan2GP's `generate()` keyword arguments for one task (wan2gp_contract.md §4.2): the schema's
        mapping of every setting, with the prompt's LoRA tags already turned into files and the source image
        and mask turned into tensors (read again here: a batch checks every task before the first runs, and
        holding all their tensors until then would cost memory)."""
        kwargs = task.schema.generate_kwargs(task.values)
        kwargs.update(
            input_prompt=prompt, loras=[(str(lora.path), lora.strength) for lora in loras],
            lora_dir=str(self.lora_dir(task.model_type)), callback=callback,
            model_type=self.registry.entry(task.model_type).base_model_type,
            VAE_tile_size=None, joint_pass=True, frame_num=1,
        )
        kwargs.update(self.image_inputs(task).kwargs)
        return kwargs

    def _save_all(self, images: Tensor, task: Task, prompt: str, loras: list[TaskLora],
                  on_saved: Callable[[SavedImage], None] | None) -> list[SavedImage]:
        """Save each image as it comes; `prompt` (without LoRA tags) names the files."""
        weights_name = Path(self._loaded.weights).stem
        lora_info = [(lora.name if lora.from_tag else lora.path.stem, lora.strength, lora_short_hash(lora.path))
                     for lora in loras]
        when = datetime.now()
        saved = []
        for i in range(images.shape[1]):
            # image i of a batch is a single run with seed + i, so that is what its metadata records
            own = task.replace(seed=task["seed"] + i, batch_size=1)
            settings = own.settings()
            for setting in task.schema:
                settings.update(setting.json_extras(own[setting.key]))
            parameters = a1111_parameters(settings, model_name=weights_name, loras=lora_info, version=APP_VERSION,
                                          schema=task.schema)
            path = save_image(tensor_to_pil(images[:, i]), self.options.output_dir,
                              stem=image_stem(when, task["seed"], prompt, i), fmt=self.options.image_format,
                              parameters=parameters, settings=settings)
            image = SavedImage(path, own["seed"], settings, parameters)
            saved.append(image)
            if on_saved is not None:
                on_saved(image)
        return saved
