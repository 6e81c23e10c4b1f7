"""The GPU check of gpu_path.md, as one prepared run: stages that each record into one JSON file as they end.

On a CUDA machine (an H100/H200 takes about 8 minutes; a global budget skips what would overrun):
    env            torch, CUDA, GPU, capability, bf16 with and without emulation, the dtype policy, attention
    ckpts          identical random full-size weights in the real file formats (DiT 2048 x 28 blocks, Qwen3
                   1024 x 28 layers, VAE base 96), scaled so activations stay O(1)
    pipeline       the headline: s/image at 1024^2, 30 steps, CFG 4, batch 1, all models resident (no mmgp):
                   ours with euler (joint and split CFG) and er_sde, against diffusers' modular Anima pipeline
                   on the same weights (bf16, fp32 text encoder); text / DiT / VAE split, peak VRAM, ratios
    mmgp_p4/p1/p5  the app path through mmgp profiles 4, 1 and 5 at 512^2, 4 er_sde steps, live previews on:
                   load, profile, generate, default device after profiling, peak VRAM, the auto profile
    pipeline_mmgp  the headline generation through mmgp profile 3 with `unload_all()` after each image
    dit            one DiT forward (B=2, 4096 tokens, 512 context, bf16) against CosmosTransformer3DModel
    vae            decode at 1024^2 and 2048^2 against AutoencoderKLQwenImage (bf16), auto and 512 px tiles
    fp16           the fp16 DiT (fp32 residual) against bf16 on one generation: both finite, the difference
    lora           a rank-16 LoRA on every DiT projection: our merge route against upstream's mmgp route
    compile        one DiT block at 4096 tokens, eager against torch.compile: graphs, breaks, speed-up

    python bench/gpu.py [--out gpu.json] [--only pipeline,dit] [--budget 540]
    python bench/gpu.py --dry        # tiny sizes on the CPU (CI): every stage's code runs, no figure means much

Results go to `--out` (default `$OUT/gpu.json`, else `./gpu.json`), rewritten after every stage; a table
is printed at the end. Needs the test references (diffusers) and mmgp installed.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.pipeline import NEGATIVE, PROMPT, PhaseTimer, Sizes, diffusers_pipeline, write_checkpoints  # noqa: E402
from models.anima.anima_handler import family_handler  # noqa: E402
from models.anima.anima_main import choose_dtypes, default_device, model_factory  # noqa: E402
from shared import attention  # noqa: E402
from shared.images import latent_preview  # noqa: E402
from shared.offload import auto_profile, offload_pipe  # noqa: E402

CUDA = torch.cuda.is_available()
GB = 1 << 30
PACKAGES = ("torch", "transformers", "diffusers", "mmgp", "safetensors", "accelerate", "tokenizers")


@dataclass(frozen=True)
class Plan:
    sizes: Sizes
    small_side: int  # the mmgp stages' image
    small_steps: int
    side: int  # the headline image
    steps: int
    warmup_steps: int  # 0: no warm-up run
    timed_runs: int
    dit_latent: int  # latent edge of the DiT stage (128: 4096 tokens)
    vae_sides: tuple[int, ...]
    vae_tile: int
    lora_rank: int
    compile_backend: str
    budget_s: float
    repeats: int = 5  # timed calls per kernel-level measurement (best and median)


FULL = Plan(Sizes(), small_side=512, small_steps=4, side=1024, steps=30, warmup_steps=2, timed_runs=2,
            dit_latent=128, vae_sides=(1024, 2048), vae_tile=512, lora_rank=16, compile_backend="inductor",
            budget_s=540)
DRY = Plan(Sizes(blocks=2, te_layers=2, width=64, heads=4, text_dim=32, lora_dim=16, adapter_layers=2, vae_base=8,
                 te_heads=4, te_kv_heads=2, te_head_dim=8, te_mlp=64),
           small_side=64, small_steps=2, side=64, steps=2, warmup_steps=0, timed_runs=1, dit_latent=8,
           vae_sides=(64,), vae_tile=64, lora_rank=4, compile_backend="eager", budget_s=300, repeats=1)
# Seconds each stage takes on an H200 (what the budget check expects before starting one).
ESTIMATES = {"env": 5, "ckpts": 40, "pipeline": 100, "mmgp_p4": 30, "mmgp_p1": 30, "mmgp_p5": 30,
             "pipeline_mmgp": 45, "dit": 20, "vae": 30, "fp16": 30, "lora": 60, "compile": 90}


# ------------------------------------------------------------------------------------------- helpers


def device() -> torch.device:
    return default_device()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def reset_peak() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / GB, 3) if CUDA else None


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def best_and_median(fn: Callable[[], Any], runs: int) -> dict[str, float]:
    times = [timed(fn)[1] for _ in range(runs)]
    return {"best_s": round(min(times), 4), "median_s": round(statistics.median(times), 4)}


def relative_max_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.float(), ref.float()
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def needs(*what: str):
    """Marks a stage as needing "cuda" and/or the "ckpts" stage's files; it is skipped without them."""
    def mark(fn):
        fn.needs = what
        return fn
    return mark


def free_memory() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


class SyncedTimer(PhaseTimer):
    """bench/pipeline.py's phase timer with a device sync at each phase edge, so GPU time lands in its phase."""

    def _enter(self, phase):
        sync()
        super()._enter(phase)

    def _exit(self, phase):
        sync()
        super()._exit(phase)


class DecodeRecorder:
    """Wraps `model.vae.decode` to keep whether the decoded floats were finite (the returned pixels are
    uint8, where a NaN would no longer show)."""

    def __init__(self, model):
        self.finite: list[bool] = []
        decode = model.vae.decode

        def recording(*args, **kwargs):
            out = decode(*args, **kwargs)
            self.finite.append(bool(torch.isfinite(out).all()))
            return out

        model.vae.decode = recording


def pixel_stats(images: torch.Tensor) -> dict[str, float]:
    x = images.float()
    return {"mean": round(float(x.mean()), 2), "std": round(float(x.std()), 2)}


# ---------------------------------------------------------------------------------------------- bench


class Bench:
    def __init__(self, plan: Plan, out: Path, dry: bool):
        self.plan, self.out, self.dry = plan, out, dry
        self.folder = Path(tempfile.mkdtemp(prefix="anima_gpu_bench_"))
        self.files: tuple[Path, Path, Path] | None = None
        self.deadline = time.monotonic() + plan.budget_s
        self.results: dict[str, Any] = {"plan": {**asdict(plan), "dry": dry}, "stages": {}}

    # ------------------------------------------------------------------------------------ running

    def run(self, names: list[str]) -> None:
        for name in names:
            self.stage(name)
        self.print_table()

    def stage(self, name: str) -> None:
        fn = getattr(self, f"stage_{name}")
        needs = getattr(fn, "needs", ())
        record: dict[str, Any] = {}
        if "cuda" in needs and not CUDA:
            record = {"status": "skipped", "why": "needs CUDA"}
        elif "ckpts" in needs and self.files is None:
            record = {"status": "skipped", "why": "no checkpoints (the ckpts stage failed or did not run)"}
        elif not self.dry and time.monotonic() + ESTIMATES.get(name, 30) > self.deadline:
            record = {"status": "skipped", "why": "out of time budget"}
        else:
            start = time.perf_counter()
            try:
                record = {"status": "ok", **fn()}
            except Exception as e:  # a stage's failure is a result too; the next stage still runs
                record = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
                          "traceback": traceback.format_exc()[-4000:]}
            record["seconds"] = round(time.perf_counter() - start, 2)
            torch.set_default_device(None)  # mmgp leaves CUDA as the default device: keep stages independent
            free_memory()
        self.results["stages"][name] = record
        self.out.write_text(json.dumps(self.results, indent=2, default=str))
        why = record.get("why") or record.get("error")
        status = record["status"] + (f" ({why})" if record["status"] != "ok" else "")
        print(f"[gpu bench] {name}: {status}", flush=True)

    def print_table(self) -> None:
        print(f"\n{'stage':<15} {'status':<8} {'seconds':>8}  summary")
        for name, record in self.results["stages"].items():
            summary = record.get("summary") or record.get("why") or record.get("error", "")
            print(f"{name:<15} {record['status']:<8} {record.get('seconds', 0):>8.1f}  {str(summary)[:150]}")
        print(f"\nresults: {self.out}")

    def model(self, **kwargs):
        model, pipe = family_handler.load_model([str(f) for f in self.files], **kwargs)
        return model, pipe

    def generate(self, model, side: int, steps: int, **kwargs) -> dict:
        model._prompt_cache.clear()  # every run encodes its prompts, as diffusers' does
        out = model.generate(input_prompt=PROMPT, n_prompt=NEGATIVE, sampling_steps=steps, guide_scale=4.0,
                             width=side, height=side, seed=0, **{"sample_solver": "euler", **kwargs})
        sync()
        return out

    # ------------------------------------------------------------------------------------- stages

    def stage_env(self) -> dict:
        versions = {}
        for package in PACKAGES:
            try:
                versions[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                versions[package] = None
        info: dict[str, Any] = {"python": platform.python_version(), "versions": versions, "cuda": CUDA,
                                "torch_cuda": torch.version.cuda, "default_device": str(torch.get_default_device())}
        dev = device()
        if CUDA:
            props = torch.cuda.get_device_properties(dev)
            try:
                native = torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # older torch
                native = None
            info |= {"gpu": props.name, "capability": list(torch.cuda.get_device_capability(dev)),
                     "total_memory_gb": round(props.total_memory / GB, 1),
                     "free_memory_gb": round(torch.cuda.mem_get_info()[0] / GB, 1),
                     "bf16_supported": torch.cuda.is_bf16_supported(), "bf16_native": native}
        dtypes = choose_dtypes(dev)
        info["dtype_policy"] = {k: str(v) for k, v in asdict(dtypes).items()}
        info["attention_modes"] = list(attention.available_attention_modes())
        info["attention_auto_bf16"] = attention._resolve("auto", dev, torch.bfloat16, False)
        info["summary"] = (f"{info.get('gpu', 'CPU')} sm{''.join(map(str, info.get('capability', [])))} "
                           f"policy DiT {dtypes.transformer} VAE {dtypes.vae}, attention {info['attention_auto_bf16']}")
        return info

    def stage_ckpts(self) -> dict:
        files = write_checkpoints(self.folder, self.plan.sizes)
        self.files = files
        sizes = {f.name: round(f.stat().st_size / GB, 3) for f in files}
        return {"files_gb": sizes, "summary": ", ".join(f"{n} {s} GB" for n, s in sizes.items())}

    def _app_path(self, profile: float) -> dict:
        """The app's path: the handler loads, mmgp profiles, `generate` runs with live previews."""
        plan = self.plan
        (model, pipe), load_s = timed(lambda: self.model())
        record: dict[str, Any] = {"load_s": round(load_s, 2)}
        if CUDA:
            record["auto_profile"] = auto_profile(pipe)
        reset_peak()
        offloadobj, profile_s = timed(lambda: offload_pipe(pipe, profile, torch.bfloat16))
        record |= {"profile_s": round(profile_s, 2), "default_device_after_profile": str(torch.get_default_device())}
        factors, bias = family_handler.get_rgb_factors("anima")
        previews: list[str] = []

        def callback(step, latent=None, *args, **kwargs):
            if latent is not None:
                try:
                    latent_preview(latent.cpu(), factors, bias)
                    previews.append("ok")
                except Exception as e:
                    previews.append(f"{type(e).__name__}: {e}")

        recorder = DecodeRecorder(model)
        out, generate_s = timed(lambda: self.generate(model, plan.small_side, plan.small_steps,
                                                      sample_solver="er_sde", callback=callback,
                                                      offloadobj=offloadobj))
        record |= {"generate_s": round(generate_s, 2), "peak_vram_gb": peak_gb(), "previews": previews,
                   "decoded_finite": recorder.finite, **pixel_stats(out["x"])}
        if offloadobj is not None:
            offloadobj.unload_all()
            offloadobj.release()
        record["summary"] = (f"load {load_s:.1f}s profile {profile_s:.1f}s generate {generate_s:.1f}s "
                             f"peak {record['peak_vram_gb']} GB, previews {previews.count('ok')}/{len(previews)}, "
                             f"finite {all(recorder.finite)}")
        return record

    @needs("ckpts")
    def stage_mmgp_p4(self) -> dict:
        return self._app_path(4.0)

    @needs("ckpts")
    def stage_mmgp_p1(self) -> dict:
        return self._app_path(1.0)

    @needs("ckpts")
    def stage_mmgp_p5(self) -> dict:
        return self._app_path(5.0)

    def _ours_runs(self, model) -> dict:
        plan, record = self.plan, {}
        timer = SyncedTimer()
        timer.module("text encode", model.text_encoder)
        timer.module("text encode", model.transformer.llm_adapter)
        timer.module("DiT", model.transformer)
        timer.method("VAE", model.vae, "decode")
        for label, sampler, joint in (("euler_joint", "euler", True), ("er_sde_joint", "er_sde", True),
                                      ("euler_split", "euler", False)):
            if plan.warmup_steps:
                self.generate(model, plan.side, plan.warmup_steps, sample_solver=sampler, joint_pass=joint)
            splits = []
            reset_peak()
            for _ in range(plan.timed_runs):
                timer.seconds.clear()
                _, total = timed(lambda: self.generate(model, plan.side, plan.steps, sample_solver=sampler,
                                                       joint_pass=joint))
                splits.append(timer.split(total))
            best = min(splits, key=lambda s: s["total"])
            record[label] = {**{k: round(v, 3) for k, v in best.items()}, "peak_vram_gb": peak_gb()}
        return record

    @needs("ckpts")
    def stage_pipeline(self) -> dict:
        plan, dev = self.plan, device()
        model, pipe = self.model()
        offload_pipe(pipe, 0.0, torch.bfloat16, offload=False)  # the app's --no-offload: all on the GPU
        ours = self._ours_runs(model)
        ours["dtypes"] = {k: str(v) for k, v in asdict(model.dtypes).items()}
        del model, pipe
        free_memory()

        pipe, text_encoder, conditioner, transformer, vae = diffusers_pipeline(
            self.files, plan.sizes, device=str(dev), dtype=torch.bfloat16 if CUDA else torch.float32)
        timer = SyncedTimer()
        timer.module("text encode", text_encoder)
        timer.module("text encode", conditioner)
        timer.module("DiT", transformer)
        timer.method("VAE", vae, "decode")

        def run(steps):
            out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=plan.side, width=plan.side,
                       num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output="images",
                       output_type="pt")
            sync()
            return out

        if plan.warmup_steps:
            run(plan.warmup_steps)
        reset_peak()
        splits = []
        for _ in range(plan.timed_runs):
            timer.seconds.clear()
            _, total = timed(lambda: run(plan.steps))
            splits.append(timer.split(total))
        best = min(splits, key=lambda s: s["total"])
        reference = {**{k: round(v, 3) for k, v in best.items()}, "peak_vram_gb": peak_gb()}
        ratios = {label: round(ours[label]["total"] / reference["total"], 3)
                  for label in ("euler_joint", "er_sde_joint", "euler_split")}
        return {"ours": ours, "diffusers": reference, "ratio_ours_over_diffusers": ratios,
                "summary": (f"{plan.side}^2 {plan.steps} steps CFG 4: ours euler {ours['euler_joint']['total']:.2f}s "
                            f"(split CFG {ours['euler_split']['total']:.2f}s), diffusers {reference['total']:.2f}s, "
                            f"ratio {ratios['euler_joint']} (split {ratios['euler_split']})")}


    @needs("ckpts")
    def stage_pipeline_mmgp(self) -> dict:
        plan = self.plan
        model, pipe = self.model()
        offloadobj = offload_pipe(pipe, 3.0, torch.bfloat16)  # None on the CPU (--dry)

        def one_image():
            out = self.generate(model, plan.side, plan.steps, offloadobj=offloadobj)
            if offloadobj is not None:
                offloadobj.unload_all()  # as the app's Runtime does after every generation
            return out

        if plan.warmup_steps:
            self.generate(model, plan.side, plan.warmup_steps, offloadobj=offloadobj)
        if offloadobj is not None:
            offloadobj.unload_all()
        reset_peak()
        times = [timed(one_image)[1] for _ in range(plan.timed_runs)]
        if offloadobj is not None:
            offloadobj.release()
        return {"seconds_per_image": [round(t, 3) for t in times], "peak_vram_gb": peak_gb(),
                "summary": f"profile 3, unload after each: {min(times):.2f} s/image, peak {peak_gb()} GB"}


    @needs("ckpts")
    def stage_dit(self) -> dict:
        from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers
        from safetensors.torch import load_file

        from models.anima.anima_model import load_anima_model
        from tests.reference import cosmos_transformer_class

        plan, s, dev = self.plan, self.plan.sizes, device()
        dtype = torch.bfloat16 if CUDA else torch.float32
        ours = load_anima_model(self.files[0], dtype=dtype, device=dev)
        sd = {k: v for k, v in load_file(self.files[0]).items() if not k.startswith("net.llm_adapter.")}
        ref = cosmos_transformer_class()(
            in_channels=16, out_channels=16, num_attention_heads=s.heads, attention_head_dim=s.width // s.heads,
            num_layers=s.blocks, mlp_ratio=4.0, text_embed_dim=s.text_dim, adaln_lora_dim=s.lora_dim,
            max_size=(128, 240, 240), patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0), concat_padding_mask=True,
            extra_pos_embed_type=None)
        ref.load_state_dict(convert_cosmos_transformer_checkpoint_to_diffusers(sd))
        del sd
        for name, module in ref.named_modules():
            if name.endswith(("norm_q", "norm_k")):
                module.eps = 1e-6  # the checkpoint's q/k RMSNorm eps
        ref = ref.to(dev, dtype).eval()
        g = torch.Generator().manual_seed(0)
        edge = plan.dit_latent
        x = torch.randn(2, 16, 1, edge, edge, generator=g).to(dev, dtype)
        sigmas = torch.tensor([1.0, 0.5]).to(dev)
        context = torch.randn(2, 512, s.text_dim, generator=g).to(dev, dtype)
        padding_mask = torch.zeros(1, 1, edge, edge, device=dev, dtype=dtype)
        with torch.inference_mode():
            ours_out = ours(x, sigmas, context)
            ref_out = ref(x, sigmas, context, padding_mask=padding_mask, return_dict=False)[0]
            diff = relative_max_diff(ours_out, ref_out)
            reset_peak()
            ours_t = best_and_median(lambda: ours(x, sigmas, context), plan.repeats)
            ours_peak = peak_gb()
            reset_peak()
            ref_t = best_and_median(lambda: ref(x, sigmas, context, padding_mask=padding_mask, return_dict=False),
                                    plan.repeats)
            ref_peak = peak_gb()
        tokens = (edge // 2) ** 2
        return {"tokens": tokens, "relative_max_diff": diff, "ours": {**ours_t, "peak_vram_gb": ours_peak},
                "diffusers": {**ref_t, "peak_vram_gb": ref_peak},
                "ratio_best": round(ours_t["best_s"] / ref_t["best_s"], 3),
                "summary": (f"B=2 {tokens} tokens: ours {ours_t['best_s']:.4f}s diffusers {ref_t['best_s']:.4f}s "
                            f"(ratio {ours_t['best_s'] / ref_t['best_s']:.3f}), rel diff {diff:.2e}")}


    @needs("ckpts")
    def stage_vae(self) -> dict:
        from diffusers import AutoencoderKLQwenImage
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
        from safetensors.torch import load_file

        from models.anima.vae import LATENT_MEAN, LATENT_STD, SCALE, load_vae

        plan, dev = self.plan, device()
        dtype = torch.bfloat16 if CUDA else torch.float32
        ours = load_vae(self.files[2], dtype=dtype, device=dev)
        ref = AutoencoderKLQwenImage(base_dim=plan.sizes.vae_base, dim_mult=[1, 2, 4, 4])
        ref.load_state_dict(convert_wan_vae_to_diffusers({k: v.float() for k, v in load_file(self.files[2]).items()}))
        ref = ref.to(dev, dtype).eval()
        mean = torch.tensor(LATENT_MEAN, device=dev).view(1, 16, 1, 1, 1)
        std = torch.tensor(LATENT_STD, device=dev).view(1, 16, 1, 1, 1)
        record: dict[str, Any] = {}
        for side in plan.vae_sides:
            z = torch.randn(1, 16, side // SCALE, side // SCALE, generator=torch.Generator().manual_seed(side)).to(dev)
            case: dict[str, Any] = {"auto_tile_latents": ours._tile_latents(side, side, None)}
            with torch.inference_mode():
                reset_peak()
                image, case["ours_s"] = timed(lambda: ours.decode(z))
                case["ours_peak_vram_gb"] = peak_gb()
                _, case["ours_tiled_s"] = timed(lambda: ours.decode(z, tile_size=plan.vae_tile))
                try:
                    reset_peak()
                    ref_image, case["diffusers_s"] = timed(
                        lambda: ref.decode((z[:, :, None] * std + mean).to(dtype)).sample[:, :, 0])
                    case["diffusers_peak_vram_gb"] = peak_gb()
                    case["relative_max_diff"] = relative_max_diff(image, ref_image.clamp(-1, 1))
                except torch.cuda.OutOfMemoryError as e:
                    case["diffusers_error"] = str(e)[:300]
            record[f"{side}"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in case.items()}
            free_memory()
        record["summary"] = "; ".join(
            f"{side}^2 ours {c['ours_s']:.2f}s (tile {c['ours_tiled_s']:.2f}s) diffusers {c.get('diffusers_s', 'n/a')}"
            for side, c in ((side, record[str(side)]) for side in plan.vae_sides))
        return record


    @needs("ckpts")
    def stage_fp16(self) -> dict:
        plan, outputs, record = self.plan, {}, {}
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            model = model_factory(*self.files, dtype=dtype)
            pipe = {"transformer": model.transformer, "text_encoder": model.text_encoder, "vae": model.vae}
            offload_pipe(pipe, 0.0, dtype, offload=False)
            recorder = DecodeRecorder(model)
            outputs[name] = self.generate(model, plan.small_side, plan.small_steps)["x"]
            record[name] = {"decoded_finite": recorder.finite, **pixel_stats(outputs[name])}
            del model, pipe
            free_memory()
        record["max_pixel_diff"] = int((outputs["bf16"].int() - outputs["fp16"].int()).abs().max())
        record["summary"] = (f"finite bf16 {all(record['bf16']['decoded_finite'])} fp16 "
                             f"{all(record['fp16']['decoded_finite'])}, max pixel diff {record['max_pixel_diff']}")
        return record


    def _lora_file(self, dit) -> Path:
        """A random ComfyUI-format LoRA (rank `lora_rank`) on every attention and MLP projection of `dit`."""
        from safetensors.torch import save_file

        g, rank, sd = torch.Generator().manual_seed(5), self.plan.lora_rank, {}
        for name, module in dit.named_modules():
            if name.startswith("blocks.") and isinstance(module, torch.nn.Linear) and "adaln" not in name:
                out_features, in_features = module.weight.shape
                key = f"diffusion_model.{name}"
                sd[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=g) / in_features**0.5
                sd[f"{key}.lora_B.weight"] = 0.5 * torch.randn(out_features, rank, generator=g) / rank**0.5
        path = self.folder / "lora_all_projections.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(path))
        return path

    @needs("ckpts")
    def stage_lora(self) -> dict:
        from models.anima.anima_model import load_anima_model
        from models.anima.lora import LoraPatcher

        s, dev, strength = self.plan.sizes, device(), 0.8
        g = torch.Generator().manual_seed(1)
        edge = self.plan.dit_latent // 2
        x = torch.randn(1, 16, 1, edge, edge, generator=g).to(dev)
        t = torch.tensor([0.6], dtype=torch.float64).to(dev)  # float64 passes mmgp's argument casting unrounded
        context = torch.randn(1, 512, s.text_dim, generator=g).to(dev, torch.bfloat16)

        def forward(dit):
            with torch.inference_mode():
                return dit(x, t, context).float()

        ours = load_anima_model(self.files[0], dtype=torch.bfloat16)
        path = self._lora_file(ours)
        offloadobj = offload_pipe({"transformer": ours}, 4.0, torch.bfloat16)  # None on the CPU (--dry)
        unload = offloadobj.unload_all if offloadobj is not None else lambda: None
        base = forward(ours)
        unload()
        patcher = LoraPatcher(ours)
        warnings = patcher.set_loras([(path, strength)])
        merged = forward(ours)
        unload()
        patcher.set_loras([])
        restored = forward(ours)
        if offloadobj is not None:
            offloadobj.release()
        del ours, patcher
        free_memory()
        change = float((merged - base).norm())
        record = {"lora_change_rel": change / float(base.norm()), "our_warnings": warnings,
                  "ours_restored_exactly": bool(torch.equal(restored, base))}
        if not CUDA:
            record["summary"] = (f"our route only (upstream's needs CUDA): change {record['lora_change_rel']:.3f}, "
                                 f"restored {record['ours_restored_exactly']}")
            return record

        from mmgp import offload as mmgp_offload

        upstream = load_anima_model(self.files[0], dtype=torch.bfloat16)
        upstream._model_dtype = torch.bfloat16
        offloadobj = mmgp_offload.profile({"transformer": upstream}, profile_no=4, loras=["transformer"],
                                          coTenantsMap={}, quantizeTransformer=False,
                                          convertWeightsFloatTo=torch.bfloat16)
        mmgp_offload.load_loras_into_model(upstream, [str(path)], [strength], activate_all_loras=True,
                                           preprocess_sd=lambda sd: upstream.preprocess_loras("anima", sd))
        errors = list(getattr(upstream, "_loras_errors", None) or [])
        routed = forward(upstream)
        mmgp_offload.unload_loras_from_model(upstream)
        upstream_restored = forward(upstream)
        offloadobj.release()

        disagreement = float((routed - merged).norm()) / max(change, 1e-12)
        record |= {"routes_disagree_rel_to_change": disagreement,
                   "upstream_restored_exactly": bool(torch.equal(upstream_restored, base)),
                   "mmgp_errors": [str(e) for e in errors]}
        record["pass"] = (disagreement < 0.05 and record["ours_restored_exactly"] and not errors)
        record["summary"] = (f"routes disagree {disagreement:.3f} of the change, restored "
                             f"{record['ours_restored_exactly']}/{record['upstream_restored_exactly']}, "
                             f"mmgp errors {len(errors)}: "
                             f"{'PASS' if record['pass'] else 'FAIL'}")
        return record


    @needs("ckpts")
    def stage_compile(self) -> dict:
        from models.anima.anima_model import load_anima_model, rope_3d_table

        plan, s, dev = self.plan, self.plan.sizes, device()
        dtype = torch.bfloat16 if CUDA else torch.float32
        dit = load_anima_model(self.files[0], dtype=dtype, device=dev)
        block = dit.blocks[0]
        cfg, edge = dit.config, plan.dit_latent // 2
        g = torch.Generator().manual_seed(2)
        x = torch.randn(2, edge * edge, s.width, generator=g).to(dev, dtype)
        emb = torch.randn(2, 1, s.width, generator=g).to(dev, dtype)
        adaln_lora = 0.1 * torch.randn(2, 1, 3 * s.width, generator=g).to(dev, dtype)
        context = torch.randn(2, 512, s.text_dim, generator=g).to(dev, dtype)
        rope = rope_3d_table(cfg.head_dim, 1, edge, edge, cfg.rope_extrapolation_thw, dev)
        args = (x, emb, context, rope, adaln_lora)
        explained = torch._dynamo.explain(block)(*args)
        torch._dynamo.reset()
        with torch.inference_mode():
            eager = best_and_median(lambda: block(*args), 2 * plan.repeats)
            compiled = torch.compile(block, backend=plan.compile_backend)
            _, first_s = timed(lambda: compiled(*args))
            fast = best_and_median(lambda: compiled(*args), 2 * plan.repeats)
        speedup = eager["best_s"] / fast["best_s"]
        return {"tokens": edge * edge, "graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
                "break_reasons": [str(r.reason)[:200] for r in explained.break_reasons], "eager": eager,
                "compiled": fast, "first_call_s": round(first_s, 2), "speedup": round(speedup, 3),
                "backend": plan.compile_backend,
                "summary": (f"one block, {edge * edge} tokens: {explained.graph_count} graph(s), "
                            f"{explained.graph_break_count} breaks, speed-up {speedup:.2f}x ({plan.compile_backend})")}



STAGES = ("env", "ckpts", "pipeline", "mmgp_p4", "mmgp_p1", "mmgp_p5", "pipeline_mmgp", "dit", "vae", "fp16",
          "lora", "compile")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="tiny sizes on the CPU (for CI)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu.json")
    parser.add_argument("--only", help=f"comma-separated stages (default all: {','.join(STAGES)}); "
                                       "ckpts is added when a stage needs it")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default 540)")
    args = parser.parse_args(argv)
    plan = DRY if args.dry else FULL
    if args.budget:
        plan = replace(plan, budget_s=args.budget)
    names = list(STAGES) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    if "ckpts" not in names and any("ckpts" in getattr(getattr(Bench, f"stage_{n}"), "needs", ()) for n in names):
        names.insert(0, "ckpts")
    if not CUDA and not args.dry:
        print("[gpu bench] no CUDA here: stages that need it are skipped, the rest run at full size on the CPU "
              "(use --dry for a quick check)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Bench(plan, args.out, args.dry).run(names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
