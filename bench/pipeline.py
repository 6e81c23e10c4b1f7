"""Where a whole generation spends its time: ours vs diffusers' modular Anima pipeline, same weights.

A full-width Anima with few layers (DiT 2048 wide with `--blocks` blocks, the full 6-layer LLM adapter,
a Qwen3 1024 wide with `--te-layers` layers, the full Wan 2.1 VAE), random weights written in the real
file formats, fp32 on the CPU. Both pipelines generate one `--size`^2 image with the same prompts,
`--steps` steps and CFG 4 (cond and uncond in one batch). Ours runs `--sampler` with `--scheduler` (default
Euler + simple; any name of models/anima/sampling.py SAMPLERS and schedulers.py SCHEDULERS); diffusers'
pipeline is `AnimaAutoBlocks` with the same modules, always Euler with its own default schedule (a schedule
changes no cost; a sampler's own work, e.g. the Brownian tree of the DPM++ SDE samplers, shows in "other"
and a second-order sampler's extra model calls in "DiT"). Time is split by timing the module calls:
text encode = Qwen3 + LLM adapter, DiT = every transformer forward, VAE = the decode; "other" is the rest
(tokenizers, scheduler, noise, post-processing). Each pipeline first makes a warm-up run at 256^2; with
`--repeats` the two then alternate and each phase's best time is shown, the total being their sum (other
jobs share this CPU, so single runs are noisy).

    python bench/pipeline.py [--blocks 2] [--te-layers 4] [--steps 2] [--size 1024] [--repeats 1]
                             [--sampler euler] [--scheduler simple]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.anima.anima_main import model_factory  # noqa: E402
from models.anima.sampling import SAMPLERS, canonical_sampler  # noqa: E402
from models.anima.schedulers import SCHEDULERS, canonical_scheduler  # noqa: E402
from models.anima.text_encoder import TOKENIZER_DIR  # noqa: E402
from tests.reference import cosmos_transformer_class  # noqa: E402
from tests.tiny_dit import make_dit_state_dict  # noqa: E402
from tests.tiny_text_encoder import make_text_encoder_state_dict  # noqa: E402
from tests.tiny_vae import make_vae_state_dict  # noqa: E402

@dataclass(frozen=True)
class Sizes:
    """Model widths (the real Anima's by default) and depths of the benchmark's random checkpoints."""

    blocks: int = 28
    te_layers: int = 28
    width: int = 2048
    heads: int = 16
    text_dim: int = 1024
    lora_dim: int = 256
    adapter_layers: int = 6
    vae_base: int = 96
    te_heads: int = 16
    te_kv_heads: int = 8
    te_head_dim: int = 128
    te_mlp: int = 3072


REAL = Sizes()
WIDTH, TEXT_DIM, VAE_BASE = REAL.width, REAL.text_dim, REAL.vae_base
PROMPT = "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile, cherry blossoms"
NEGATIVE = "worst quality, low quality, score_1, score_2, score_3, blurry, jpeg artifacts, sepia"
PHASES = ("text encode", "DiT", "VAE", "other", "total")


class PhaseTimer:
    """Seconds spent inside given modules' forwards (or methods), per phase, outermost calls only."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self._depth = defaultdict(int)
        self._start = {}

    def _enter(self, phase):
        if self._depth[phase] == 0:
            self._start[phase] = time.perf_counter()
        self._depth[phase] += 1

    def _exit(self, phase):
        self._depth[phase] -= 1
        if self._depth[phase] == 0:
            self.seconds[phase] += time.perf_counter() - self._start[phase]

    def module(self, phase, module):
        module.register_forward_pre_hook(lambda *_: self._enter(phase))
        module.register_forward_hook(lambda *_: self._exit(phase))

    def method(self, phase, owner, name):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            self._enter(phase)
            try:
                return original(*args, **kwargs)
            finally:
                self._exit(phase)

        setattr(owner, name, timed)

    def split(self, total):
        parts = {p: self.seconds[p] for p in PHASES[:3]}
        return parts | {"other": total - sum(parts.values()), "total": total}


def write_checkpoints(folder: Path, sizes: Sizes) -> tuple[Path, Path, Path]:
    names = ("anima-preview.safetensors", "qwen_3_06b_base.safetensors", "qwen_image_vae.safetensors")
    files = tuple(folder / name for name in names)
    s = sizes
    save_file(make_dit_state_dict(model_channels=s.width, num_blocks=s.blocks, num_heads=s.heads,
                                  text_dim=s.text_dim, adapter_layers=s.adapter_layers, adapter_heads=s.heads,
                                  adaln_lora_dim=s.lora_dim), str(files[0]))
    save_file(make_text_encoder_state_dict(hidden=s.text_dim, layers=s.te_layers, heads=s.te_heads,
                                           kv_heads=s.te_kv_heads, head_dim=s.te_head_dim, intermediate=s.te_mlp),
              str(files[1]))
    save_file(make_vae_state_dict(base_dim=s.vae_base), str(files[2]))
    return files


def measure(generate, timer: PhaseTimer, size: int, steps: int) -> dict[str, float]:
    timer.seconds.clear()
    start = time.perf_counter()
    generate(size, steps, PROMPT)
    return timer.split(time.perf_counter() - start)


def ours_runner(files, sampler: str = "euler", scheduler: str = "simple"):
    """A function (size, steps) -> phase seconds, after a warm-up run."""
    model = model_factory(*files, device="cpu")
    timer = PhaseTimer()
    timer.module("text encode", model.text_encoder)
    timer.module("text encode", model.transformer.llm_adapter)
    timer.module("DiT", model.transformer)
    timer.method("VAE", model.vae, "decode")

    def generate(side, n_steps, prompt):
        model._prompt_cache.clear()  # every measured run encodes its prompts, as diffusers' does
        return model.generate(input_prompt=prompt, n_prompt=NEGATIVE, sampling_steps=n_steps, guide_scale=4.0,
                              sample_solver=sampler, scheduler=scheduler, width=side, height=side, seed=0,
                              joint_pass=True)

    generate(256, 1, "warm-up")
    return lambda size, steps: measure(generate, timer, size, steps)


def diffusers_pipeline(files, s: Sizes, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """diffusers' modular Anima pipeline (`AnimaAutoBlocks`) holding the same weights, converted by diffusers;
    conditioner, transformer and VAE in `dtype` on `device`, the text encoder in fp32 (as ours)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.loaders.single_file_utils import (
        convert_cosmos_transformer_checkpoint_to_diffusers,
        convert_wan_vae_to_diffusers,
    )
    from diffusers.models.condition_embedders.condition_embedder_anima import AnimaTextConditioner
    from diffusers.modular_pipelines.anima import AnimaAutoBlocks
    from safetensors.torch import load_file
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model, T5TokenizerFast

    dit_sd = {k: v.float() for k, v in load_file(files[0]).items()}
    adapter_prefix = "net.llm_adapter."
    conditioner = AnimaTextConditioner(source_dim=s.text_dim, target_dim=s.text_dim, model_dim=s.text_dim,
                                       num_layers=s.adapter_layers, num_attention_heads=s.heads)
    conditioner.load_state_dict({k.removeprefix(adapter_prefix): v for k, v in dit_sd.items()
                                 if k.startswith(adapter_prefix)})
    transformer = cosmos_transformer_class()(
        in_channels=16, out_channels=16, num_attention_heads=s.heads, attention_head_dim=s.width // s.heads,
        num_layers=s.blocks, mlp_ratio=4.0, text_embed_dim=s.text_dim, adaln_lora_dim=s.lora_dim,
        max_size=(128, 240, 240),
        patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0), concat_padding_mask=True, extra_pos_embed_type=None)
    transformer.load_state_dict(convert_cosmos_transformer_checkpoint_to_diffusers(
        {k: v for k, v in dit_sd.items() if not k.startswith(adapter_prefix)}))
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=151936, hidden_size=s.text_dim, intermediate_size=s.te_mlp, num_hidden_layers=s.te_layers,
        num_attention_heads=s.te_heads, num_key_value_heads=s.te_kv_heads, head_dim=s.te_head_dim, rms_norm_eps=1e-6,
        rope_theta=1e6, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False))
    text_encoder.load_state_dict({k.removeprefix("model."): v.float() for k, v in load_file(files[1]).items()})
    vae = AutoencoderKLQwenImage(base_dim=s.vae_base, dim_mult=[1, 2, 4, 4])
    vae.load_state_dict(convert_wan_vae_to_diffusers({k: v.float() for k, v in load_file(files[2]).items()}))
    text_encoder = text_encoder.to(device).eval()
    conditioner, transformer, vae = (m.to(device, dtype).eval() for m in (conditioner, transformer, vae))

    pipe = AnimaAutoBlocks().init_pipeline()
    pipe.update_components(
        text_encoder=text_encoder, tokenizer=Qwen2Tokenizer.from_pretrained(TOKENIZER_DIR / "qwen"),
        t5_tokenizer=T5TokenizerFast(tokenizer_file=str(TOKENIZER_DIR / "t5" / "tokenizer.json")),
        text_conditioner=conditioner, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), guider=ClassifierFreeGuidance(guidance_scale=4.0),
        image_processor=VaeImageProcessor(vae_scale_factor=8))
    return pipe, text_encoder, conditioner, transformer, vae


def diffusers_runner(files, sizes: Sizes):
    """A function (size, steps) -> phase seconds, after a warm-up run."""
    pipe, text_encoder, conditioner, transformer, vae = diffusers_pipeline(files, sizes)
    timer = PhaseTimer()
    timer.module("text encode", text_encoder)
    timer.module("text encode", conditioner)
    timer.module("DiT", transformer)
    timer.method("VAE", vae, "decode")

    def generate(side, n_steps, prompt):
        return pipe(prompt=prompt, negative_prompt=NEGATIVE, height=side, width=side, num_inference_steps=n_steps,
                    generator=torch.Generator().manual_seed(0), output="images", output_type="pt")

    generate(256, 1, "warm-up")
    return lambda size, steps: measure(generate, timer, size, steps)


def best_split(splits: list[dict[str, float]]) -> dict[str, float]:
    """Each phase's least-disturbed time over the repeats; the total is their sum."""
    best = {phase: min(split[phase] for split in splits) for phase in PHASES[:4]}
    return best | {"total": sum(best.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--te-layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternating; best time per phase")
    parser.add_argument("--sampler", default="euler", help=f"ours: one of {', '.join(SAMPLERS)}")
    parser.add_argument("--scheduler", default="simple", help=f"ours: one of {', '.join(SCHEDULERS)}")
    args = parser.parse_args()
    try:
        canonical_sampler(args.sampler), canonical_scheduler(args.scheduler)
    except ValueError as error:
        parser.error(str(error))

    sizes = Sizes(blocks=args.blocks, te_layers=args.te_layers)
    with tempfile.TemporaryDirectory() as folder:
        files = write_checkpoints(Path(folder), sizes)
        with torch.inference_mode():
            runners = ours_runner(files, args.sampler, args.scheduler), diffusers_runner(files, sizes)
            runs = [[run(args.size, args.steps) for run in runners] for _ in range(args.repeats)]
    ours, reference = (best_split([r[i] for r in runs]) for i in range(2))

    print(f"\n{args.size}x{args.size}, {args.steps} steps (ours {args.sampler} + {args.scheduler}, diffusers Euler), "
          f"CFG 4, DiT {args.blocks} blocks x {WIDTH}, "
          f"Qwen3 {args.te_layers} layers x {TEXT_DIM}, VAE base {VAE_BASE}, fp32, {torch.get_num_threads()} threads")
    print(f"{'phase':<12} {'ours (s)':>10} {'diffusers (s)':>14} {'ours/diffusers':>15}")
    for phase in PHASES:
        print(f"{phase:<12} {ours[phase]:>10.2f} {reference[phase]:>14.2f} {ours[phase] / reference[phase]:>15.2f}")
    print(f"DiT per step: ours {ours['DiT'] / args.steps:.2f} s, diffusers {reference['DiT'] / args.steps:.2f} s")


if __name__ == "__main__":
    main()
