"""Loading a full-size Anima DiT file: peak RAM and time, against the file's size and read time.

Writes a random-weight file in the real format (28 blocks, 2048 wide, adapter 6 x 1024, bf16, ~4.2 GB)
into a temporary folder, then in fresh processes (so nothing else is in their memory): reads the file
once, and loads it with `load_anima_model` in bf16 and touches every weight. Goal: peak RSS <= 1.1x the
file size. The temporary folder is deleted at the end.

    python bench/load_dit.py
"""

from __future__ import annotations

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
READ_CHUNK = 64 << 20
PAGE_BYTES = 4096


def write_file(path: str) -> dict:
    from tests.tiny_dit import write_dit_file

    start = time.perf_counter()
    write_dit_file(path, **FULL_SIZE)
    return {"write_s": time.perf_counter() - start}


def read_file(path: str) -> dict:
    buffer = bytearray(READ_CHUNK)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    return {"read_s": time.perf_counter() - start}


def load_file(path: str) -> dict:
    import resource

    import psutil
    import torch

    from models.anima.anima_model import load_anima_model

    baseline_rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    model = load_anima_model(path, dtype=torch.bfloat16)
    load_s = time.perf_counter() - start
    # read one byte of every page of every weight, so the whole file is really in memory (as after a first
    # forward pass) without timing any arithmetic
    touched = sum(int(t.reshape(-1).view(torch.uint8)[::PAGE_BYTES].sum()) for t in model.state_dict().values())
    touch_s = time.perf_counter() - start - load_s
    return {"baseline_rss": baseline_rss, "load_s": load_s, "touch_s": touch_s, "touched": touched,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "parameters": sum(p.numel() for p in model.parameters())}


STEPS = {"write": write_file, "read": read_file, "load": load_file}


def run_step(step: str, path: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, step, str(path)], capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        raise SystemExit(f"step '{step}' failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="anima-load-bench-"))
    try:
        path = folder / "anima-preview.safetensors"
        wrote = run_step("write", path)
        size = path.stat().st_size
        read = run_step("read", path)
        load = run_step("load", path)
    finally:
        shutil.rmtree(folder)
    gb = 1e9
    print(f"file: {size / gb:.2f} GB, {load['parameters'] / 1e9:.3f} B parameters "
          f"(written in {wrote['write_s']:.0f} s)")
    print(f"read the file once:          {read['read_s']:6.2f} s  "
          f"({size / gb / read['read_s']:.2f} GB/s, page cache warm)")
    print(f"load_anima_model (bf16):     {load['load_s']:6.2f} s  (tensors stay views of the memory-mapped file)")
    print(f"load + fault in every page:  {load['load_s'] + load['touch_s']:6.2f} s  "
          f"= {(load['load_s'] + load['touch_s']) / read['read_s']:.2f}x the read time")
    print(f"peak RSS: {load['peak_rss'] / gb:.2f} GB = {load['peak_rss'] / size:.3f}x the file size "
          f"(of which {load['baseline_rss'] / gb:.2f} GB is python + torch before loading; "
          f"growth {(load['peak_rss'] - load['baseline_rss']) / size:.3f}x the file size)")


if __name__ == "__main__":
    if len(sys.argv) == 3:
        sys.path.insert(0, str(REPO))
        print(json.dumps(STEPS[sys.argv[1]](sys.argv[2])))
    else:
        main()
