"""Quantized DiT files against bf16: file size, RAM, and the time of one 1024x1024 forward on the CPU.

Writes a full-size random-weight Anima DiT (28 blocks, 2048 wide, adapter 6 x 1024) as the official bf16
file, then from it: ComfyUI-layout fp8 (float8_e4m3fn) and int8 (rowwise) files made by this app's own
`load_anima_model(quantize=...)` + `save_anima_model`, and GGUF Q8_0 / Q4_K files in city96's layout (random
valid blocks: the gguf package cannot quantize K-quants, and the weights are random anyway). Then, in a
fresh process per file: load it (computing in fp32, the CPU policy), fault in every stored page (as a first
full forward would), and run one 1024x1024 forward (4096 tokens) through the first `--blocks` blocks
(default 4: a 28-block fp32 forward takes minutes on 2 cores; its time scales with the block count; the
fastest of `--repeat` runs), with RAM measured as the peak RSS (VmHWM, reset before the forward).
Ratios are to the bf16 file in the same run.

    flock /tmp/bigmem.lock python bench/quantized.py [--blocks N] [--repeat N] [--keep DIR] [--tiny]

Needs ~10 GB of disk and ~10 GB of RAM: hold the lock (other jobs share the machine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL_SIZE = dict(model_channels=2048, num_blocks=28, num_heads=16, text_dim=1024, adapter_layers=6,
                 adapter_heads=16, adaln_lora_dim=256)
FORMATS = {"bf16": "safetensors", "fp8": "safetensors", "int8": "safetensors", "Q8_0": "gguf", "Q4_K": "gguf"}
PAGE_BYTES = 4096


TINY = dict(model_channels=256, num_blocks=2, num_heads=4, text_dim=256, adapter_layers=1, adapter_heads=4,
            adaln_lora_dim=32)


def write_bf16(path: str, sizes: str) -> dict:
    from tests.tiny_dit import write_dit_file

    start = time.perf_counter()
    write_dit_file(path, **json.loads(sizes))
    return {"write_s": time.perf_counter() - start}


def write_quantized(how: str, source: str, path: str) -> dict:
    import torch

    from models.anima.anima_model import load_anima_model, save_anima_model

    start = time.perf_counter()
    save_anima_model(load_anima_model(source, dtype=torch.bfloat16, quantize=how), path)
    return {"write_s": time.perf_counter() - start}


def write_gguf(type_name: str, source: str, path: str) -> dict:
    """city96's layout: names without `net.`, 1-D and small tensors F32, rows that fit the blocks in the
    file's type, others F16; random blocks whose fp16 scales keep the weights O(1/sqrt(in))."""
    import gguf
    import numpy as np
    import torch

    from models.anima.weights import open_state_dict

    start = time.perf_counter()
    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    scale_offsets = {"Q8_0": (0,), "Q4_K": (0, 2)}[type_name]
    magnitude = {"Q8_0": 1 / 64, "Q4_K": 1 / 150}[type_name]
    sd = {k.removeprefix("net."): v for k, v in open_state_dict(source, what="bench").items()}

    def kind(t):
        if t.dim() == 1 or t.numel() <= 1024:
            return gguf.GGMLQuantizationType.F32
        return qtype if t.shape[-1] % block_values == 0 else gguf.GGMLQuantizationType.F16

    def encoded(t, qt, rng):
        if qt == gguf.GGMLQuantizationType.F32:
            return t.float().numpy()
        if qt == gguf.GGMLQuantizationType.F16:
            return t.to(torch.float16).numpy()
        rows, blocks = t.shape[0], t.shape[1] // block_values
        raw = rng.integers(0, 256, size=(rows, blocks, block_bytes), dtype=np.uint8)
        for offset in scale_offsets:
            d = np.full((rows, blocks), magnitude / t.shape[1] ** 0.5, np.float16)
            raw[..., offset:offset + 2] = d.view(np.uint8).reshape(rows, blocks, 2)
        return raw.reshape(rows, -1)

    writer = gguf.GGUFWriter(path, "cosmos")
    for name, t in sd.items():
        qt = kind(t)
        nbytes = t.numel() * 4 if qt == gguf.GGMLQuantizationType.F32 else (
            t.numel() * 2 if qt == gguf.GGMLQuantizationType.F16 else t.numel() // block_values * block_bytes)
        shape = list(t.shape) if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else [
            t.shape[0], t.shape[1] // block_values * block_bytes]
        dtype = np.float32 if qt == gguf.GGMLQuantizationType.F32 else (
            np.float16 if qt == gguf.GGMLQuantizationType.F16 else np.uint8)
        writer.add_tensor_info(name, shape, np.dtype(dtype), nbytes, raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for t in sd.values():
        writer.write_tensor_data(encoded(t, kind(t), rng))
    writer.close()
    return {"write_s": time.perf_counter() - start}


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(path: str, blocks: str, repeat: str) -> dict:
    import torch

    from models.anima.anima_model import load_anima_model
    from models.anima.quant import QuantizedWeight

    torch.set_grad_enabled(False)
    baseline = _rss("VmRSS")
    start = time.perf_counter()
    model = load_anima_model(path, dtype=torch.float32)
    load_s = time.perf_counter() - start
    for t in model.state_dict().values():  # fault in every stored page, as a first full forward would
        for stored in ([s for _, s in t.get_quantized_subtensors()] if isinstance(t, QuantizedWeight) else [t]):
            int(stored.reshape(-1).view(torch.uint8)[::PAGE_BYTES].sum())
    load_peak, resident = _rss("VmHWM"), _rss("VmRSS")
    all_blocks = model.blocks
    model.blocks = all_blocks[: int(blocks)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 128, 128, generator=g)  # a 1024x1024 latent
    context = torch.randn(1, 512, model.config.crossattn_dim, generator=g)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times = []
    for _ in range(int(repeat)):  # the fastest of a few: other jobs share the machine
        start = time.perf_counter()
        model(x, torch.tensor([0.5]), context)
        times.append(time.perf_counter() - start)
    forward_s = min(times)
    return {"load_s": load_s, "baseline_rss": baseline, "load_peak_rss": load_peak, "resident_rss": resident,
            "forward_peak_rss": _rss("VmHWM"), "forward_s": forward_s}


STEPS = {"write_bf16": write_bf16, "write_quantized": write_quantized, "write_gguf": write_gguf,
         "measure": measure}


def run_step(step: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, step, *args], capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        raise SystemExit(f"step '{step} {' '.join(args)}' failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4, help="blocks run in the timed forward (of 28)")
    parser.add_argument("--keep", type=Path, help="write the files into (and reuse them from) this folder")
    parser.add_argument("--repeat", type=int, default=2, help="forwards per file; the fastest is reported")
    parser.add_argument("--tiny", action="store_true", help="a 256-wide 2-block DiT: a quick check of this script")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="anima-quant-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        paths = {name: folder / f"anima-{name}.{ext}" for name, ext in FORMATS.items()}
        for name, path in paths.items():
            if path.exists():
                continue
            if name == "bf16":
                run_step("write_bf16", str(path), json.dumps(TINY if args.tiny else FULL_SIZE))
            elif path.suffix == ".gguf":
                run_step("write_gguf", name, str(paths["bf16"]), str(path))
            else:
                run_step("write_quantized", name, str(paths["bf16"]), str(path))
        results = {name: run_step("measure", str(path), str(args.blocks), str(args.repeat))
                   | {"size": path.stat().st_size} for name, path in paths.items()}
    finally:
        if args.keep is None:
            shutil.rmtree(folder)
    base, gb = results["bf16"], 1e9
    print(f"{'Tiny' if args.tiny else 'Full-size'} Anima DiT, random weights; CPU, fp32 compute; forward = one "
          f"1024x1024 step through {args.blocks} blocks. Ratios to the bf16 file.")
    print(f"python + torch before loading: {base['baseline_rss'] / gb:.2f} GB RSS")
    print(f"{'file':6} {'size GB':>14} {'load peak RSS GB':>18} {'resident GB':>15} {'forward peak GB':>17} "
          f"{'forward s':>14} {'load s':>7}")
    for name, r in results.items():
        def cell(key: str, scale: float = gb) -> str:
            return f"{r[key] / scale:6.2f} ({r[key] / base[key]:.2f}x)"
        print(f"{name:6} {cell('size'):>14} {cell('load_peak_rss'):>18} {cell('resident_rss'):>15} "
              f"{cell('forward_peak_rss'):>17} {cell('forward_s', 1):>14} {r['load_s']:7.1f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in STEPS:
        sys.path.insert(0, str(REPO))
        print(json.dumps(STEPS[sys.argv[1]](*sys.argv[2:])))
    else:
        main()
