"""`wgp.py` on the command line, end to end on tiny real-format weights in a temporary --ckpts-dir.

Most runs call `wgp.main(argv)` in this process (the same code path as `python wgp.py`, minus the
interpreter start); the checks that need a real process (import side effects, Ctrl-C) use a subprocess.
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import wgp
from shared.images import read_image_metadata, read_image_settings

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--resolution", "64x64", "--steps", "2"]
NAME = re.compile(r"\d{4}-\d\d-\d\d-\d\dh\d\dm\d\ds_seed(\d+)_([\w-]+?)(?:_(\d+))?(?:-\d+)?\.png")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from tests.tiny_ckpts import write_tiny_ckpts

    folder = tmp_path_factory.mktemp("ckpts")
    write_tiny_ckpts(folder)
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run(capsys, *argv):
    """(exit code, stdout lines, stderr) of `wgp.py argv`."""
    code = wgp.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def gen(capsys, ckpts, out_dir, *argv):
    code, lines, err = run(capsys, "--ckpts-dir", ckpts, "--output-dir", out_dir, *argv)
    assert code == 0, err
    return [Path(line) for line in lines], err


def pixels(path):
    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def test_prompt_makes_one_png_with_a1111_and_json_metadata(capsys, ckpts, tmp_path):
    [path], err = gen(capsys, ckpts, tmp_path, "--prompt", "1girl, smile", "--seed", 42, "--negative-prompt",
                      "lowres", "--guidance", 3.5, *FAST)
    assert path.parent == tmp_path and NAME.fullmatch(path.name).groups() == ("42", "1girl-smile", None)
    with Image.open(path) as im:
        assert (im.format, im.size) == ("PNG", (64, 64))
    settings, parameters = read_image_metadata(path)
    assert parameters.splitlines()[:2] == ["1girl, smile", "Negative prompt: lowres"]
    for field in ("Steps: 2", "Sampler: er_sde", "Schedule type: Simple", "CFG scale: 3.5", "Shift: 3",
                  "Seed: 42", "Size: 64x64", "Model: anima-preview"):
        assert field in parameters
    assert settings["model_type"] == "anima_preview" and settings["seed"] == 42
    assert settings["negative_prompt"] == "lowres" and settings["num_inference_steps"] == 2
    assert "step" in err  # the tqdm progress bar


def test_process_runs_a_list_and_reports_unknown_keys(capsys, ckpts, tmp_path):
    tasks = [
        {"model_type": "anima_preview", "prompt": "first", "resolution": "64x64", "num_inference_steps": 2,
         "seed": 5, "batch_size": 2, "mystery": 1},
        {"model_type": "anima_preview", "prompt": "second", "resolution": "48x32", "num_inference_steps": 1,
         "seed": 9, "sample_solver": "euler", "guidance_scale": 1},
    ]
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    paths, err = gen(capsys, ckpts, tmp_path / "out", "--process", tmp_path / "tasks.json")
    names = [NAME.fullmatch(p.name).groups() for p in paths]
    assert names == [("5", "first", None), ("5", "first", "1"), ("9", "second", None)]
    assert [read_image_settings(p)["seed"] for p in paths] == [5, 6, 9]  # image i of a batch: seed + i
    with Image.open(paths[2]) as im:
        assert im.size == (48, 32)
    assert "task 1: ignored unknown setting(s): mystery" in err


def test_prompts_file_applies_inline_overrides(capsys, ckpts, tmp_path):
    (tmp_path / "prompts.txt").write_text(
        "# a comment\n\ncat girl --w 48 --h 32 --d 7 --s 1 --n lowres\n"
        "dog --d 8 --l 1\n"
    )
    paths, _ = gen(capsys, ckpts, tmp_path / "out", "--prompts-file", tmp_path / "prompts.txt", *FAST)
    first, second = (read_image_settings(p) for p in paths)
    assert (first["prompt"], first["resolution"], first["seed"], first["num_inference_steps"],
            first["negative_prompt"]) == ("cat girl", "48x32", 7, 1, "lowres")
    assert (second["prompt"], second["resolution"], second["seed"], second["guidance_scale"],
            second["num_inference_steps"]) == ("dog", "64x64", 8, 1.0, 2)
    with Image.open(paths[0]) as im:
        assert im.size == (48, 32)


def test_image_metadata_remakes_the_same_pixels(capsys, ckpts, tmp_path):
    """The JSON read back from an image (or the image itself, given to --process) re-makes its pixels:
    the same settings and seed give the same image, and the second image of a batch, which records its
    own seed, comes out the same when made alone."""
    batch = gen(capsys, ckpts, tmp_path / "a", "--prompt", "remake me", "--seed", 77, "--batch-size", 2, *FAST)[0]
    assert pixels(batch[0]) != pixels(batch[1])
    (tmp_path / "first.json").write_text(json.dumps(read_image_settings(batch[0])))
    [from_json] = gen(capsys, ckpts, tmp_path / "b", "--process", tmp_path / "first.json")[0]
    [from_image] = gen(capsys, ckpts, tmp_path / "c", "--process", batch[1])[0]
    assert pixels(from_json) == pixels(batch[0]) and pixels(from_image) == pixels(batch[1])


def _write_tiny_lora(path: Path) -> None:
    """A kohya-format LoRA on the tiny DiT's first query projection (64 wide), strong enough to show."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    key = "lora_unet_blocks_0_self_attn_q_proj"
    save_file({f"{key}.lora_down.weight": torch.randn(4, 64, generator=g).to(torch.bfloat16),
               f"{key}.lora_up.weight": torch.randn(64, 4, generator=g).to(torch.bfloat16),
               f"{key}.alpha": torch.tensor(4.0, dtype=torch.bfloat16)}, str(path))


def test_loras_are_applied_and_recorded_in_the_metadata(capsys, ckpts, tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    _write_tiny_lora(loras / "style.safetensors")
    task = {"model_type": "anima_preview", "prompt": "with lora", "seed": 4, "resolution": "64x64",
            "num_inference_steps": 2, "activated_loras": ["style.safetensors"], "loras_multipliers": "0.8"}
    (tmp_path / "lora.json").write_text(json.dumps(task))
    [with_lora] = gen(capsys, ckpts, tmp_path / "a", "--lora-dir", loras, "--process", tmp_path / "lora.json")[0]
    settings, parameters = read_image_metadata(with_lora)
    assert (settings["activated_loras"], settings["loras_multipliers"]) == (["style.safetensors"], "0.8")
    assert parameters.splitlines()[0] == "with lora <lora:style:0.8>"
    assert re.search(r'Lora hashes: "style: [0-9a-f]{12}"', parameters)
    [without] = gen(capsys, ckpts, tmp_path / "b", "--prompt", "with lora", "--seed", 4, *FAST)[0]
    [again] = gen(capsys, ckpts, tmp_path / "c", "--lora-dir", loras, "--process", with_lora)[0]
    assert pixels(with_lora) != pixels(without) and pixels(again) == pixels(with_lora)
    assert "LoRA 'missing' not found" in _bad(capsys, ckpts, tmp_path, "--lora-dir", loras, "--process",
                                              _json_file(tmp_path, dict(task, activated_loras=["missing"])))


def _json_file(folder: Path, data) -> Path:
    path = folder / "task.json"
    path.write_text(json.dumps(data))
    return path


def test_jpeg_output_carries_the_settings_too(capsys, ckpts, tmp_path):
    [path] = gen(capsys, ckpts, tmp_path, "--prompt", "x", "--seed", 3, "--image-format", "jpeg", *FAST)[0]
    assert path.suffix == ".jpg" and read_image_settings(path)["seed"] == 3


def test_dry_run_validates_without_loading_or_writing(capsys, ckpts, tmp_path):
    (tmp_path / "tasks.json").write_text(json.dumps([{"prompt": "a"}, {"prompt": "b", "model_type": "anima_preview"}]))
    code, lines, err = run(capsys, "--ckpts-dir", tmp_path / "empty", "--output-dir", tmp_path / "out",
                           "--process", tmp_path / "tasks.json", "--dry-run")
    assert code == 0 and len(lines) == 2 and all(" OK: anima_preview, 1024x1024, 30 steps" in l for l in lines)
    assert not (tmp_path / "out").exists()


def _bad(capsys, ckpts, tmp_path, *argv):
    code, lines, err = run(capsys, "--ckpts-dir", ckpts, "--output-dir", tmp_path / "out", *argv)
    assert code == 1 and lines == []
    assert "Traceback" not in err
    [line] = [l for l in err.splitlines() if l.startswith("error")]  # progress lines may come before it
    assert err.rstrip().endswith(line)
    return line


@pytest.mark.parametrize("argv, message", [
    (["--resolution", "1000x1000"], "multiples of 16"),
    (["--resolution", "100000x100000"], "too large"),
    (["--batch-size", "0"], "batch_size must be between 1 and"),
    (["--sampler", "magic"], "Unknown sampler 'magic'"),
    (["--model", "sdxl"], "Unknown model_type 'sdxl'"),
    (["--attention", "warp"], "Unknown attention mode 'warp'"),
    (["--dtype", "int4"], "invalid choice: 'int4'"),
])
def test_bad_arguments_exit_1_with_one_clear_line(capsys, ckpts, tmp_path, argv, message):
    assert message in _bad(capsys, ckpts, tmp_path, "--prompt", "x", *argv)


def test_bad_process_files_exit_1_with_one_clear_line(capsys, ckpts, tmp_path):
    (tmp_path / "notjson.json").write_text("prompt = 'cat'")
    (tmp_path / "unknown.json").write_text(json.dumps({"model_type": "flux", "prompt": "x"}))
    assert "is not valid JSON" in _bad(capsys, ckpts, tmp_path, "--process", tmp_path / "notjson.json")
    assert "Unknown model_type 'flux'" in _bad(capsys, ckpts, tmp_path, "--process", tmp_path / "unknown.json")
    assert "not found" in _bad(capsys, ckpts, tmp_path, "--process", tmp_path / "missing.json")


def test_missing_weights_offline_is_one_clear_line(capsys, tmp_path):
    line = _bad(capsys, tmp_path / "empty_ckpts", tmp_path, "--prompt", "x", *FAST)
    assert "anima-preview.safetensors" in line


def test_truncated_weights_are_one_clear_line(capsys, ckpts, tmp_path):
    broken = tmp_path / "ckpts"
    broken.mkdir()
    for f in ckpts.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.name == "anima-preview.safetensors" else data)
    line = _bad(capsys, broken, tmp_path, "--prompt", "x", *FAST)
    assert "anima-preview.safetensors" in line


def test_sigint_to_a_real_process_exits_130(ckpts, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "wgp.py"), "--ckpts-dir", str(ckpts), "--output-dir", str(tmp_path),
         "--prompt", "x", "--resolution", "64x64", "--steps", "1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    seen = ""
    while not re.search(r"\b[1-9]\d*/1000\b", seen):  # wait until steps are being made
        char = proc.stderr.read(1)
        assert char, f"wgp.py ended early: {seen}"
        seen += char
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130 and rest.strip().splitlines()[-1] == "Interrupted."
    assert list(tmp_path.iterdir()) == []


def test_import_has_no_side_effects(tmp_path):
    probe = ("import sys; import wgp; "
             "print(sorted(m for m in ('gradio', 'torch', 'models.anima.anima_handler') if m in sys.modules)); "
             "print(wgp.family_handlers)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True).stdout.splitlines()
    assert out == ["[]", "['models.anima.anima_handler']"]
    assert list(tmp_path.iterdir()) == []


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as done:
        wgp.main(["--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0
    for flag in ("--process", "--prompts-file", "--prompt", "--ckpts-dir", "--output-dir", "--lora-dir",
                 "--attention", "--profile", "--dtype", "--image-format", "--listen", "--server-port", "--dry-run",
                 "--model", "--seed", "--steps", "--guidance", "--resolution", "--batch-size", "--sampler",
                 "--no-offload", "--compile"):
        assert flag in text
