"""Time and memory to apply, switch and remove a rank-32 LoRA on the full-width Anima DiT.

The model is the real architecture (28 blocks, 2048 channels, the 6-layer LLM adapter; 2.0 B parameters)
in bf16, built directly in memory with random weights. The LoRA is a kohya-format file with rank 32 on
every self-attention, cross-attention and MLP projection of the 28 blocks (sd-scripts' default targets:
280 modules, 1.7 B of the model's parameters). Prints the wall time of each step, the RSS growth it
causes, and checks that removing the LoRA restores every weight bit for bit. CPU time (all threads) is
printed next to wall time because on a shared machine the wall time mostly measures the other load.

    python bench/lora.py [--rank 32] [--blocks 28]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.anima.anima_model import AdapterConfig, AnimaModel, DiTConfig  # noqa: E402
from models.anima.lora import LoraPatcher  # noqa: E402

GIB = 1024**3
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.output_proj",
           "cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.output_proj",
           "mlp.layer1", "mlp.layer2")


def build_model(blocks: int) -> AnimaModel:
    dit = DiTConfig(in_channels=16, out_channels=16, model_channels=2048, num_blocks=blocks, num_heads=16,
                    mlp_hidden=8192, crossattn_dim=1024, adaln_lora_dim=256, patch_spatial=2, patch_temporal=1,
                    rope_extrapolation_thw=(1.0, 4.0, 4.0))
    adapter = AdapterConfig(source_dim=1024, model_dim=1024, num_layers=6, num_heads=16, mlp_hidden=4096,
                            vocab_size=32128)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # so no fp32 copy of the model is ever allocated
    try:
        with torch.device("meta"):
            model = AnimaModel(dit, adapter)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to_empty(device="cpu").requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.uniform_(-0.02, 0.02, generator=generator)
    return model


def write_lora(model: AnimaModel, rank: int, path: Path) -> tuple[Path, int]:
    generator = torch.Generator().manual_seed(1)
    lora = {}
    for i, _ in enumerate(model.blocks):
        for target in TARGETS:
            out_f, in_f = model.get_submodule(f"blocks.{i}.{target}").weight.shape
            key = f"lora_unet_blocks_{i}_{target.replace('.', '_')}"
            lora[f"{key}.lora_down.weight"] = (torch.randn(rank, in_f, generator=generator) / in_f**0.5).bfloat16()
            lora[f"{key}.lora_up.weight"] = (torch.randn(out_f, rank, generator=generator) * 0.01).bfloat16()
            lora[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
    save_file(lora, str(path))
    return path, len(lora) // 3


def fingerprints(model: AnimaModel) -> dict[str, str]:
    """SHA-1 of every parameter's bytes (hashing reads the tensors in place: no copy of the model)."""
    return {name: hashlib.sha1(p.detach().view(torch.int16).numpy()).hexdigest()
            for name, p in model.named_parameters()}


class PeakRss:
    """Highest RSS seen while the block runs, sampled every 5 ms."""

    def __enter__(self):
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def step(label: str, fn) -> None:
    rss_before = psutil.Process().memory_info().rss
    with PeakRss() as peak:
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    rss_after = psutil.Process().memory_info().rss
    print(f"{label:<30} {seconds:6.2f} s wall {cpu_seconds:6.2f} s CPU   RSS {(rss_after - rss_before) / GIB:+6.2f} GiB "
          f"(peak {(peak.peak - rss_before) / GIB:+6.2f} GiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=28)
    args = parser.parse_args()

    start = time.perf_counter()
    model = build_model(args.blocks)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e9:.2f} B params bf16 ({params * 2 / GIB:.2f} GiB), built in "
          f"{time.perf_counter() - start:.1f} s; torch threads {torch.get_num_threads()}")
    original = fingerprints(model)

    with tempfile.TemporaryDirectory() as tmp:
        path, modules = write_lora(model, args.rank, Path(tmp) / "lora.safetensors")
        touched = sum(model.get_submodule(f"blocks.{i}.{t}").weight.numel()
                      for i in range(args.blocks) for t in TARGETS)
        print(f"LoRA: rank {args.rank}, {modules} modules, file {path.stat().st_size / 2**20:.0f} MiB; "
              f"touched weights {touched / 1e9:.2f} B params ({touched * 2 / GIB:.2f} GiB bf16)")
        patcher = LoraPatcher(model)
        step("apply (read file + merge)", lambda: patcher.set_loras([(path, 1.0)]))
        step("switch strength 1.0 -> 0.6", lambda: patcher.set_loras([(path, 0.6)]))
        step("remove (restore originals)", lambda: patcher.set_loras([]))
        step("apply again", lambda: patcher.set_loras([(path, 1.0)]))
        step("remove again", lambda: patcher.set_loras([]))

    restored = fingerprints(model) == original
    print(f"weights restored bit for bit: {restored}")


if __name__ == "__main__":
    main()
