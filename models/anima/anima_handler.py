"""Wan2GP family handler for Anima: what the host asks a model family (wan2gp_contract.md §1.2).

Files: the DiT is the model's `URLs` (defaults/anima*.json, one per checkpoint); `query_model_files` lists the text
encoder and the VAE, shared by every Anima checkpoint. Upstream Wan2GP downloads those into
`ckpts/split_files/<folder>/`, this app into `ckpts/` itself; `load_model` looks in both places (and in a
ComfyUI-style `../text_encoders`, `../vae` beside the DiT's folder). The tokenizers ship in
`models/anima/tokenizers/`, so nothing else is fetched.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .lora_tags import extract_lora_tags, find_lora_file
from .registry import (DEFAULT_SAMPLER, DEFAULT_SCHEDULER, DEFAULT_SHIFT, SAMPLER_ALIASES, SAMPLERS, SCHEDULERS,
                       SIZE_MULTIPLE, SPEED_MULTIPLIERS, STEP_CACHES, TEACACHE_COEFFICIENTS, menu_choices,
                       multiplier_choices)

FAMILY = "anima"
REPO_ID = "circlestone-labs/Anima"
TEXT_ENCODER_FILE = "qwen_3_06b_base.safetensors"
TEXT_ENCODER_FOLDER = "split_files/text_encoders"
VAE_FILE = "qwen_image_vae.safetensors"
VAE_FOLDER = "split_files/vae"
# The official ComfyUI template's negative prompt (anima_reference.md §4.3).
DEFAULT_NEGATIVE_PROMPT = "worst quality, low quality, score_1, score_2, score_3, blurry, jpeg artifacts, sepia"
SAMPLE_SOLVERS = [(s.label, s.name) for s in SAMPLERS.values()]
SCHEDULER_CHOICES = [(s.label, s.name) for s in SCHEDULERS.values()]
# Definitions superseded by a newer release of their line sit in a group of their own, so the family's own list
# (the model picker opens its first entry, by name) holds the current releases only.
EARLIER_VERSIONS_GROUP = "anima_earlier"
# Inside upstream Wan2GP the scheduler and CFG truncation are per-model "custom settings" (its generate() call has
# no keyword for them); `generate` reads them from `custom_settings`. CFG truncation there is the fraction of the
# steps that use CFG.
UPSTREAM_CUSTOM_SETTINGS = [
    {"id": "scheduler", "name": "Scheduler", "label": "Scheduler (sigma schedule)", "type": "dropdown",
     "choices": SCHEDULER_CHOICES, "default": DEFAULT_SCHEDULER},
    {"id": "cfg_truncation", "name": "CFG truncation", "label": "CFG on the first fraction of steps (1 = every step)",
     "type": "float", "min": 0.0, "max": 1.0, "inc": 0.05, "default": 1.0},
]
LICENSE = {
    "id": "circlestone-labs-non-commercial+nvidia-open-model",
    "name": "CircleStone Labs Non-Commercial License and NVIDIA Open Model License",
    "notice": ("Anima's weights are licensed by CircleStone Labs under the CircleStone Labs Non-Commercial License "
               "and, as a model derived from NVIDIA Cosmos-Predict2, under the NVIDIA Open Model License: use them "
               "for non-commercial purposes only (CircleStone Labs handles commercial licences). Read the terms "
               "before you accept them."),
    "urls": ["https://huggingface.co/circlestone-labs/Anima/blob/main/LICENSE.md",
             "https://www.nvidia.com/en-us/agreements/enterprise-software/nvidia-open-model-license/"],
}
# About 1 MP, as the model card recommends for the preview.
RESOLUTIONS = [
    ["1024x1024 (1:1)", "1024x1024"],
    ["896x1152 (7:9)", "896x1152"],
    ["1152x896 (9:7)", "1152x896"],
    ["832x1216 (2:3)", "832x1216"],
    ["1216x832 (3:2)", "1216x832"],
    ["768x1344 (4:7)", "768x1344"],
    ["1344x768 (7:4)", "1344x768"],
]
# Wan 2.1 latent -> RGB preview factors, one [r, g, b] row per latent channel (anima_reference.md §6.3).
RGB_FACTORS = [
    [-0.1299, -0.1692, 0.2932], [0.0671, 0.0406, 0.0442], [0.3568, 0.2548, 0.1747], [0.0372, 0.2344, 0.1420],
    [0.0313, 0.0189, -0.0328], [0.0296, -0.0956, -0.0665], [-0.3477, -0.4059, -0.2925], [0.0166, 0.1902, 0.1975],
    [-0.0412, 0.0267, -0.1364], [-0.1293, 0.0740, 0.1636], [0.0680, 0.3019, 0.1128], [0.0032, 0.0581, 0.0639],
    [-0.1251, 0.0927, 0.1699], [0.0060, -0.0633, 0.0005], [0.3477, 0.2275, 0.2950], [0.1984, 0.0913, 0.1861],
]
RGB_BIAS = [-0.1835, -0.0868, -0.3360]
# Image inputs (wan2gp_image_inputs.md §2): upstream Wan2GP's grey fill of outpainted margins (its 127.5 default
# as it stores it, 127) and the margins' quantum (8x VAE, 2x2 patches).
INPAINT_COLOR = "7F7F7F"
IMAGE_TO_IMAGE_CHOICES = [
    ("No Control Image", ""),
    ("Image to Image guided by Text Prompt", "GUV"),
    ("Image to Image Restricted to the Area of the Mask", "GVA"),
]
MASKED_DENOISING = "Masked Denoising : Inpainted area may reuse some content that has been masked"
DEFAULT_DENOISING_STRENGTH = 0.7
# The hires fix as upstream Wan2GP's per-model custom settings (generate() reads them from `custom_settings`);
# with the two above they are the five upstream shows (its CUSTOM_SETTINGS_MAX).
HIRES_CUSTOM_SETTINGS = [
    {"id": "hires_scale", "name": "Hires upscale", "label": "Hires Fix Upscale (1 = off; Lanczos, then denoised again)",
     "type": "float", "default": 1.0, "min": 1.0, "max": 4.0, "inc": 0.05},
    {"id": "hires_denoise", "name": "Hires denoise", "label": "Hires Fix Denoising Strength", "type": "float",
     "default": 0.5, "min": 0.0, "max": 1.0, "inc": 0.01},
    {"id": "hires_steps", "name": "Hires steps", "label": "Hires Fix Steps (0 = as many as the first pass)",
     "type": "int", "default": 0, "min": 0, "max": 100, "inc": 1},
]


def image_input_model_def() -> dict:
    """The model-definition keys that make upstream Wan2GP show Anima's image inputs: the "Image
    Inpainting" tab, the control image (img2img through the letters GUV / GVA), the image editor's mask,
    the Denoising Strength, Masking Strength and Expand / Shrink Mask sliders, outpainting in the
    inpainting tab (`generate` does the masked denoising; wgp resizes, pads and fills). The hires fix is
    among `UPSTREAM_CUSTOM_SETTINGS`."""
    return {
        "inpaint_support": True,
        "inpaint_video_prompt_type": "VAG",  # with G: the Denoising Strength slider works in the inpainting tab
        "image_video_prompt_type": "",  # no reference images
        "custom_denoising_strength": True,  # no "denoising starts at step k" notice: all the steps run (ComfyUI)
        "inpaint_color": INPAINT_COLOR,
        "video_guide_outpainting": [2],
        "outpainting_quantize_margins": SIZE_MULTIPLE,
        "model_modes": {"choices": [(MASKED_DENOISING, 0)], "default": 0, "label": "Inpainting Method",
                        "image_modes": [2]},
        # declaring a guide choice also makes the Denoising and Mask sliders render (their visibility rule)
        "guide_custom_choices_image": {"choices": [list(c) for c in IMAGE_TO_IMAGE_CHOICES], "letters_filter": "GUVA",
                                       "default": "", "label": "Image to Image", "show_label": False},
        "mask_preprocessing": {"selection": ["", "A"], "visible": False},
    }


def find_component(model_files: list[str], file_name: str, hub_folder: str) -> str:
    """Path of a component file: given among `model_files`, else beside the DiT (`model_files[0]`), in its
    `split_files/...` subfolder (upstream Wan2GP's download layout), or in a ComfyUI-style sibling folder.
    Raises ValueError saying where it looked and where to get the file."""
    for given in model_files:
        if Path(given).name == file_name:
            return given
    folder = Path(model_files[0]).parent
    candidates = [folder / file_name, folder / hub_folder / file_name,
                  folder.parent / Path(hub_folder).name / file_name]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise ValueError(f"Anima needs '{file_name}', which is not in {', '.join(str(c.parent) for c in candidates)}. "
                     f"Download it from https://huggingface.co/{REPO_ID}/blob/main/{hub_folder}/{file_name} "
                     f"into {folder}.")


def _host_save_quantized_model():
    """Upstream Wan2GP's `save_quantized_model` when this family runs inside it (wgp registers itself as
    the module `wgp`), else None."""
    host = sys.modules.get("wgp")
    return getattr(host, "save_quantized_model", None)


def _quantized_file_name(dit_file: str, quantize: str | None) -> str:
    """`anima-preview.safetensors` -> `anima-preview_int8.safetensors` (a `bf16` in the name is replaced),
    so the host's choice by `transformer_quantization` finds it by its `int8` / `fp8` token."""
    path = Path(dit_file)
    tag = quantize or "int8"
    stem = path.stem.replace("bf16", tag) if "bf16" in path.stem else f"{path.stem}_{tag}"
    return str(path.with_name(stem + ".safetensors"))


class family_handler:  # noqa: N801 (the name Wan2GP looks up)
    @staticmethod
    def query_supported_types() -> list[str]:
        return [FAMILY]

    @staticmethod
    def query_family_maps() -> tuple[dict, dict]:
        return {}, {}

    @staticmethod
    def query_model_family() -> str:
        return FAMILY

    @staticmethod
    def query_family_infos() -> dict[str, tuple[int, str]]:
        return {FAMILY: (1150, "Anima"), EARLIER_VERSIONS_GROUP: (1151, "Anima (earlier versions)")}

    @staticmethod
    def query_model_def(base_model_type: str, model_def: dict) -> dict:
        return {
            "image_outputs": True,
            "guidance_max_phases": 1,
            "flow_shift": True,
            "sample_solvers": list(SAMPLE_SOLVERS),
            "resolutions": [list(r) for r in RESOLUTIONS],
            "vae_block_size": SIZE_MULTIPLE,
            "image_batch_size_max": 16,
            "inference_steps": True,
            "profile_type": "image",
            "schedulers": list(SCHEDULER_CHOICES),
            "custom_settings": [dict(setting) for setting in UPSTREAM_CUSTOM_SETTINGS + HIRES_CUSTOM_SETTINGS],
            "license": dict(LICENSE),
            **image_input_model_def(),
        } | family_handler.step_cache_model_def()

    @staticmethod
    def step_cache_model_def() -> dict:
        """What makes upstream's "Steps Skipping" tab (and this app's "Step cache" section) offer the caches
        of `registry.STEP_CACHES`. Upstream accepts a First-Block Cache multiplier only from
        `first_block_cache_thresholds`: the speed multipliers, which `set_cache_parameters` maps."""
        return {
            "tea_cache": "tea" in STEP_CACHES,
            "first_block_cache": "first_block" in STEP_CACHES,
            "skip_steps_multiplier_choices": multiplier_choices(),
            "first_block_cache_thresholds": list(SPEED_MULTIPLIERS),
            "skip_steps_cache_choices": menu_choices(),  # this app's menu
        }

    @staticmethod
    def set_cache_parameters(cache_type: str, base_model_type: str, model_def: dict, inputs: dict,
                             skip_steps_cache) -> None:
        """Upstream Wan2GP, before a generation with a step cache: fills its `skip_steps_cache` object
        (which it then sets as `transformer.cache`, read by `generate`) with the threshold of the chosen speed
        multiplier, TeaCache's published coefficients, and the start as a percentage (so it counts the steps
        that actually run)."""
        kind = STEP_CACHES.get(cache_type)
        if kind is None:
            raise ValueError(f"Anima has no step cache '{cache_type}'; choose one of: {', '.join(STEP_CACHES)}.")
        skip_steps_cache.threshold = kind.threshold(float(skip_steps_cache.multiplier))
        if cache_type == "tea":
            skip_steps_cache.coefficients = list(TEACACHE_COEFFICIENTS)
        skip_steps_cache.start_step_perc = float(inputs.get("skip_steps_start_step_perc") or 0)

    @staticmethod
    def register_lora_cli_args(parser, lora_root: str) -> None:
        # Not `--lora-dir`: upstream Wan2GP already has that flag (for Wan), and so does this app.
        parser.add_argument("--lora-dir-anima", type=str, default=None,
                            help=f"Path to a directory that contains Anima LoRAs (default: {lora_root}/anima)")

    @staticmethod
    def get_lora_dir(base_model_type: str, args, lora_root: str) -> str:
        # getattr: a plugin family's flag is never registered upstream (plugins load after argument parsing)
        return getattr(args, "lora_dir_anima", None) or os.path.join(lora_root, FAMILY)

    @staticmethod
    def find_lora(name: str, lora_dir: str, allow_paths: bool = False) -> str:
        """This app's extension of the contract: the family's one rule from a LoRA name to its file (the
        rule `generate` applies to `<lora:...>` tags), so the host finds the same file. ValueError if none."""
        return str(find_lora_file(name, lora_dir, allow_paths=allow_paths))

    @staticmethod
    def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
        """This app's extension: (prompt without its `<lora:name:strength>` tags, [(name, strength)])."""
        return extract_lora_tags(prompt)

    @staticmethod
    def query_model_files(computeList, base_model_type: str, model_def: dict | None = None) -> list[dict]:
        return [{
            "repoId": REPO_ID,
            "sourceFolderList": [TEXT_ENCODER_FOLDER, VAE_FOLDER],
            "fileList": [[TEXT_ENCODER_FILE], [VAE_FILE]],
        }]

    @staticmethod
    def load_model(model_filename, model_type=None, base_model_type=None, model_def=None,
                   quantizeTransformer=False, text_encoder_quantization=None, dtype=None,  # noqa: N803 (Wan2GP)
                   VAE_dtype=None, mixed_precision_transformer=False, save_quantized=False,  # noqa: N803
                   submodel_no_list=None, text_encoder_filename=None, **kwargs):
        """(model_factory, {"transformer", "text_encoder", "vae"}). `model_filename` is the DiT file or a
        list starting with it (it may also hold the other two); dtype / VAE_dtype None: the dtype policy.

        Any quantized DiT or text-encoder file (ComfyUI fp8/int8/ConvRot, GGUF, mmgp's quanto int8) is read by
        this family's own loader, also inside upstream Wan2GP, rather than by mmgp with the host's registered
        quantization handlers: the same file then gives the same images in both hosts, formats the host's
        handlers lack still load (legacy scaled fp8, `_quantization_metadata`, GGUF text encoders), a broken
        file is one clear error, and nothing depends on which handlers and mmgp version the host has (in a
        CPU check with mmgp 3.7.12, its fp8 handler mis-scaled a ComfyUI fp8 file that ComfyUI's formula and
        this loader agree on; its int8, ConvRot and GGUF handlers matched this loader). The weights stay
        quantized in the form mmgp pins and streams (`quant.py`).
        quantizeTransformer: True (the host, for a definition with `auto_quantize`: int8) or one of "int8",
        "int8_convrot", "fp8": quantize the DiT's attention and MLP weights while loading.
        save_quantized: True (the host's `--save-quantized`): inside upstream Wan2GP its `save_quantized_model`
        writes, names and registers the file (mmgp's quanto int8, or ConvRot with `--convrot`, both read
        here); elsewhere `<dit>_int8.safetensors` is written beside the DiT. A path: write there. Our files
        use ComfyUI's `comfy_quant` layout (`save_anima_model`).
        Upstream Wan2GP always passes VAE_dtype, fp16 unless its "VAE precision" setting says 32: fp16 is
        taken as "no preference" (the family's policy: bf16 where the GPU has it natively, else fp32, since
        the Qwen-Image VAE can overflow in fp16); an explicit fp32 or bf16 is honoured."""
        import torch

        from .anima_main import model_factory  # torch + transformers: only when a model is loaded

        files = [str(f) for f in (model_filename if isinstance(model_filename, (list, tuple)) else [model_filename])]
        if text_encoder_filename:
            files.append(str(text_encoder_filename))
        quantize = "int8" if quantizeTransformer is True else quantizeTransformer or None
        host_save = _host_save_quantized_model() if save_quantized is True else None
        save_path = None
        if save_quantized and host_save is None:
            save_path = save_quantized if save_quantized is not True else _quantized_file_name(files[0], quantize)
            quantize = quantize or "int8"
        model = model_factory(
            files[0],
            find_component(files, TEXT_ENCODER_FILE, TEXT_ENCODER_FOLDER),
            find_component(files, VAE_FILE, VAE_FOLDER),
            dtype=dtype, vae_dtype=None if VAE_dtype == torch.float16 else VAE_dtype,
            low_memory=bool(kwargs.get("low_memory", False)), quantize=quantize, save_quantized=save_path,
        )
        if host_save is not None:
            host_save(model.transformer, model_type, files[0], model.dtypes.transformer, None)
        return model, {"transformer": model.transformer, "text_encoder": model.text_encoder, "vae": model.vae}

    @staticmethod
    def update_default_settings(base_model_type: str, model_def: dict, ui_defaults: dict) -> None:
        ui_defaults.update({
            "image_mode": 1,
            "resolution": "1024x1024",
            "batch_size": 1,
            "num_inference_steps": 30,
            "guidance_scale": 4.0,
            "flow_shift": DEFAULT_SHIFT,
            "sample_solver": DEFAULT_SAMPLER,
            "scheduler": DEFAULT_SCHEDULER,
            "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
            "denoising_strength": DEFAULT_DENOISING_STRENGTH,
            "masking_strength": 1.0,
            "model_mode": 0,
        })

    @staticmethod
    def fix_settings(base_model_type: str, settings_version: float, model_def: dict, ui_defaults: dict) -> None:
        """Image mode always (1 text / image to image, 2 inpainting); a sampler under an alias ("euler_a")
        becomes its listed name, one unknown to Anima (e.g. from another model's settings) the default, and so
        does an unknown scheduler. Inside upstream Wan2GP (its settings hold a `custom_settings` dict) the
        definition's scheduler and CFG truncation become the defaults of those custom settings, so e.g. Turbo
        opens with its own scheduler."""
        if ui_defaults.get("image_mode") not in (1, 2):
            ui_defaults["image_mode"] = 1
        solver = ui_defaults.get("sample_solver")
        solver = SAMPLER_ALIASES.get(solver, solver)
        ui_defaults["sample_solver"] = solver if solver in SAMPLERS else DEFAULT_SAMPLER
        if ui_defaults.get("scheduler", DEFAULT_SCHEDULER) not in SCHEDULERS:
            ui_defaults["scheduler"] = DEFAULT_SCHEDULER
        if "custom_settings" in ui_defaults:
            custom = dict(ui_defaults["custom_settings"] or {})
            custom.setdefault("scheduler", ui_defaults.get("scheduler", DEFAULT_SCHEDULER))
            custom.setdefault("cfg_truncation", float(ui_defaults.get("cfg_truncation_perc", 100.0)) / 100)
            ui_defaults["custom_settings"] = custom

    @staticmethod
    def validate_generative_settings(model_type: str, model_def: dict, inputs: dict) -> str | None:
        """A message for the user, or None when the settings can run."""
        width, _, height = str(inputs.get("resolution", "")).partition("x")
        if not (width.isdigit() and height.isdigit()):
            return f"Resolution '{inputs.get('resolution')}' must look like 1024x1024."
        if int(width) % SIZE_MULTIPLE or int(height) % SIZE_MULTIPLE:
            return (f"Anima needs a width and height that are multiples of {SIZE_MULTIPLE}; "
                    f"{width}x{height} is not (try {int(width) // 16 * 16}x{int(height) // 16 * 16}).")
        solver = inputs.get("sample_solver") or DEFAULT_SAMPLER
        if SAMPLER_ALIASES.get(solver, solver) not in SAMPLERS:
            return f"Anima has no sampler '{solver}'; choose one of: {', '.join(v for _, v in SAMPLE_SOLVERS)}."
        scheduler = inputs.get("scheduler") or (inputs.get("custom_settings") or {}).get("scheduler")
        if scheduler and scheduler not in SCHEDULERS:
            return f"Anima has no scheduler '{scheduler}'; choose one of: {', '.join(SCHEDULERS)}."
        if float(inputs.get("flow_shift", DEFAULT_SHIFT)) <= 0:
            return "Shift must be above 0 (Anima's default is 3)."
        if int(inputs.get("num_inference_steps", 1)) < 1:
            return "Anima needs at least 1 sampling step."
        return family_handler.validate_step_cache(inputs)

    @staticmethod
    def validate_step_cache(inputs: dict) -> str | None:
        cache_type = inputs.get("skip_steps_cache_type") or ""
        if not cache_type:
            return None
        if cache_type not in STEP_CACHES:
            return f"Anima has no step cache '{cache_type}'; choose one of: {', '.join(STEP_CACHES)}."
        kind, multiplier = STEP_CACHES[cache_type], inputs.get("skip_steps_multiplier")
        try:
            kind.threshold(float(multiplier))
        except (TypeError, ValueError):
            choices = ", ".join(f"{m:g}" for m in kind.thresholds)
            return f"{kind.label} has no speed multiplier {multiplier!r}: choose one of {choices}."
        return None

    @staticmethod
    def get_rgb_factors(base_model_type: str) -> tuple[list[list[float]], list[float]]:
        return [list(row) for row in RGB_FACTORS], list(RGB_BIAS)
