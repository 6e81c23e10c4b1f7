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
from tests.tiny_ckpts import write_tiny_lora

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


MODEL = ["--model", "anima_preview"]  # the model of the tiny checkpoint folder (not the default one)


def run(capsys, *argv):
    """(exit code, stdout lines, stderr) of `wgp.py --model anima_preview argv` (`--model` unless argv has one)."""
    argv = [str(a) for a in argv]
    code = wgp.main(argv if "--model" in argv or "--help" in argv else MODEL + argv)
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
    for field in ("Steps: 2", "Sampler: er_sde", "Schedule type: simple", "CFG scale: 3.5", "Shift: 3",
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
    assert [read_image_settings(p)[0]["seed"] for p in paths] == [5, 6, 9]  # image i of a batch: seed + i
    with Image.open(paths[2]) as im:
        assert im.size == (48, 32)
    assert "task 1: ignored unknown setting(s): mystery" in err


def test_prompts_file_applies_inline_overrides(capsys, ckpts, tmp_path):
    (tmp_path / "prompts.txt").write_text(
        "# a comment\n\ncat girl --w 48 --h 32 --d 7 --s 1 --n lowres\n"
        "dog --d 8 --l 1\n"
    )
    paths, _ = gen(capsys, ckpts, tmp_path / "out", "--prompts-file", tmp_path / "prompts.txt", *FAST)
    first, second = (read_image_settings(p)[0] for p in paths)
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
    (tmp_path / "first.json").write_text(json.dumps(read_image_settings(batch[0])[0]))
    [from_json] = gen(capsys, ckpts, tmp_path / "b", "--process", tmp_path / "first.json")[0]
    [from_image] = gen(capsys, ckpts, tmp_path / "c", "--process", batch[1])[0]
    assert pixels(from_json) == pixels(batch[0]) and pixels(from_image) == pixels(batch[1])


def test_loras_are_applied_and_recorded_in_the_metadata(capsys, ckpts, tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    write_tiny_lora(loras / "style.safetensors")
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
    assert path.suffix == ".jpg" and read_image_settings(path)[0]["seed"] == 3


def test_dry_run_validates_without_loading_or_writing(capsys, ckpts, tmp_path):
    (tmp_path / "tasks.json").write_text(json.dumps([{"prompt": "a"}, {"prompt": "b", "model_type": "anima_preview"}]))
    code, lines, err = run(capsys, "--ckpts-dir", tmp_path / "empty", "--output-dir", tmp_path / "out",
                           "--process", tmp_path / "tasks.json", "--dry-run")
    assert code == 0 and len(lines) == 4 and all(" OK: anima_preview, 1024x1024, 30 steps" in l for l in lines[:2])
    assert lines[2] == (f"note: anima_preview will first download anima-preview.safetensors, qwen_3_06b_base."
                        f"safetensors, qwen_image_vae.safetensors into {tmp_path / 'empty'}")
    assert lines[3] == ("note: its licence (CircleStone Labs Non-Commercial License and NVIDIA Open Model License) "
                        "will be shown and must be accepted first (or pass --accept-license)")
    assert not (tmp_path / "out").exists() and not (tmp_path / "empty").exists()


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
    (["--sampler", "magic"], "sample_solver 'magic' is not available"),
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


def test_missing_weights_offline_are_named_all_at_once(capsys, tmp_path):
    code, lines, err = run(capsys, "--ckpts-dir", tmp_path / "empty", "--output-dir", tmp_path / "out",
                           "--prompt", "x", *FAST)
    assert code == 1 and lines == [] and "Traceback" not in err
    message = err[err.index("error: "):].splitlines()
    assert message[0].startswith("error: 3 weight files are missing and cannot be downloaded")
    assert [line.split("  ->  ")[1] for line in message[1:]] == [
        str(tmp_path / "empty" / name) for name in
        ("anima-preview.safetensors", "qwen_3_06b_base.safetensors", "qwen_image_vae.safetensors")]


def test_truncated_weights_are_one_clear_line(capsys, ckpts, tmp_path):
    broken = tmp_path / "ckpts"
    broken.mkdir()
    for f in ckpts.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.name == "anima-preview.safetensors" else data)
    line = _bad(capsys, broken, tmp_path, "--prompt", "x", *FAST)
    assert "anima-preview.safetensors" in line


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_a_real_process_exits_130_and_leaves_no_file(ckpts, tmp_path, sig):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "wgp.py"), *MODEL, "--ckpts-dir", str(ckpts), "--output-dir", str(tmp_path),
         "--prompt", "x", "--resolution", "64x64", "--steps", "1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    seen = ""
    while not re.search(r"\b[1-9]\d*/1000\b", seen):  # wait until steps are being made
        char = proc.stderr.read(1)
        assert char, f"wgp.py ended early: {seen}"
        seen += char
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130 and rest.strip().splitlines()[-1] == "Interrupted."
    assert list(tmp_path.iterdir()) == []


def test_a_batch_checks_every_task_first_then_runs_the_good_ones(ckpts, tmp_path):
    """A real process on a list of five tasks: the two with bad LoRA names fail before anything is generated
    (one would leave the LoRA folder), the one whose LoRA strength overflows stops at its first NaN step and
    saves nothing, the other two are saved (with the umask's permissions, each path printed), and the exit
    code says that some failed. A prompt's <lora:...> tag gets its hash in the metadata."""
    loras = tmp_path / "loras"
    loras.mkdir()
    write_tiny_lora(loras / "style.safetensors")
    write_tiny_lora(tmp_path / "outside.safetensors")
    base = {"model_type": "anima_preview", "resolution": "64x64", "num_inference_steps": 2, "seed": 1}
    tasks = [dict(base, prompt="good one"),
             dict(base, prompt="leaves the folder", activated_loras=["../outside"]),
             dict(base, prompt="missing lora", activated_loras=["nope"]),
             dict(base, prompt="overflow", activated_loras=["style"], loras_multipliers="1e38"),
             dict(base, prompt="tagged <lora:style:0.5>")]
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    result = subprocess.run(
        [sys.executable, str(ROOT / "wgp.py"), "--ckpts-dir", str(ckpts), "--output-dir", str(tmp_path / "out"),
         "--lora-dir", str(loras), "--process", str(tmp_path / "tasks.json")],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=loras,
        preexec_fn=lambda: os.umask(0o027), timeout=300,
    )
    err = result.stderr
    assert result.returncode == 1 and "Traceback" not in err, err
    where = f"{tmp_path / 'tasks.json'} task"
    assert f"error: {where} 2: LoRA '../outside': a LoRA name must stay inside the LoRA folder" in err
    assert f"error: {where} 3: LoRA 'nope' not found in the LoRA folder" in err
    assert err.index(f"{where} 3: LoRA 'nope'") < err.index("[4/5]")  # reported before any generation
    assert re.search(rf"error: {re.escape(where)} 4: The sampler produced NaN or infinite values at step 1 ", err)
    assert err.rstrip().endswith(f"error: 3 of 5 tasks failed ({where} 2, {where} 3, {where} 4); the others ran.")
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert [NAME.fullmatch(p.name).group(2) for p in paths] == ["good-one", "tagged"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)
    assert all(p.stat().st_mode & 0o777 == 0o640 for p in paths)
    parameters = read_image_metadata(paths[1])[1]
    assert parameters.splitlines()[0] == "tagged <lora:style:0.5>"
    assert re.search(r'Lora hashes: "style: [0-9a-f]{12}"', parameters)


def test_the_output_folder_is_checked_before_generating(capsys, ckpts, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    line = _bad(capsys, ckpts, tmp_path, "--output-dir", tmp_path / "file" / "out", "--prompt", "x", *FAST)
    assert line == f"error: The output folder {tmp_path / 'file' / 'out'} lies under {tmp_path / 'file'}, " \
                   "which is a file: choose a folder with --output-dir."
    from shared import images

    monkeypatch.setattr(images.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1 << 20}))
    line = _bad(capsys, ckpts, tmp_path, "--output-dir", tmp_path / "out", "--prompt", "x", *FAST)
    assert "is full (1 MiB free)" in line and not (tmp_path / "out").exists()


def test_a_failed_save_names_the_image_and_leaves_no_temporary_file(capsys, ckpts, tmp_path, monkeypatch):
    import errno

    from shared import images

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(images, "_encode", disk_full)
    line = _bad(capsys, ckpts, tmp_path, "--output-dir", tmp_path / "out", "--prompt", "x", "--seed", 5, *FAST)
    assert re.fullmatch(rf"error: Cannot save [\w-]+_seed5_x\.png in {re.escape(str(tmp_path / 'out'))}: "
                        r"No space left on device\.", line)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(images, "_encode", interrupted)
    code, lines, err = run(capsys, "--ckpts-dir", ckpts, "--output-dir", tmp_path / "out", "--prompt", "x", *FAST)
    assert code == 130 and list((tmp_path / "out").iterdir()) == []


def test_low_memory_frees_the_text_encoder_after_encoding(ckpts, tmp_path):
    args = wgp.parse_args(["--ckpts-dir", str(ckpts), "--output-dir", str(tmp_path), "--low-memory"])
    registry = wgp.load_registry()
    runtime = wgp.make_runtime(args, registry)
    from shared.settings import resolve_task

    task, _ = resolve_task(registry, {"prompt": "x", "resolution": "64x64", "num_inference_steps": 1},
                           model_type="anima_preview")
    assert len(runtime.generate(task)) == 1
    model = runtime.load("anima_preview")
    assert model.low_memory and model.text_encoder is None


def test_an_a1111_image_from_forge_is_read_with_its_names_and_unreadable_values_are_named(capsys, tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "cat\nSteps: many, Sampler: Euler a, Schedule type: Simple, CFG scale: 5, "
                                "Seed: 9, Size: 64x64, Model: x")
    Image.new("RGB", (8, 8)).save(tmp_path / "forge.png", pnginfo=info)
    code, lines, err = run(capsys, "--ckpts-dir", tmp_path, "--output-dir", tmp_path / "out", "--process",
                           tmp_path / "forge.png", "--dry-run")
    assert code == 0
    assert lines[0] == "task 1/1 OK: anima_preview, 64x64, 30 steps, CFG 5, euler_ancestral, seed 9, batch 1: 'cat'"
    assert "the image's 'Steps: many' cannot be read; the model's default num_inference_steps is used" in err


@pytest.mark.parametrize("name, content, message", [
    ("deep.json", "[" * 50_000 + "]" * 50_000, "is nested too deeply"),
    ("nul.json", json.dumps({"model_type": "anima_preview", "prompt": "a\u0000b"}), "prompt contains a NUL"),
    ("nan.json", '{"model_type": "anima_preview", "guidance_scale": NaN}', "guidance_scale must be a finite number"),
])
def test_hostile_settings_files_are_one_clear_line(capsys, ckpts, tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    assert message in _bad(capsys, ckpts, tmp_path, "--process", tmp_path / name, "--dry-run")


def test_a_bom_settings_file_runs_and_a_ckpts_dir_that_is_a_file_is_refused(capsys, ckpts, tmp_path):
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "x"}).encode())
    code, lines, _ = run(capsys, "--ckpts-dir", ckpts, "--process", tmp_path / "bom.json", "--dry-run")
    assert code == 0 and lines[0].startswith("task 1/1 OK")
    (tmp_path / "weights").write_text("not a folder")
    line = _bad(capsys, tmp_path / "weights", tmp_path, "--process", tmp_path / "bom.json", "--dry-run")
    assert "is not a folder" in line and (tmp_path / "weights").read_text() == "not a folder"


def test_help_is_quick_and_names_the_app_folders(tmp_path):
    """--help imports neither torch, gradio nor transformers (the family's torch-free registries list the
    models, samplers and schedulers), and the default folders are the app's, from any folder."""
    probe = ("import sys, wgp\ntry:\n    wgp.main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('gradio', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout
    assert out.splitlines()[-1] == "[]"
    text = " ".join(out.split())
    from models.anima.registry import SAMPLERS, SCHEDULERS

    assert f"--sampler NAME sampler (ComfyUI's names): {', '.join(SAMPLERS)}" in text
    assert f"--scheduler NAME sigma schedule (ComfyUI's names): {', '.join(SCHEDULERS)}" in text
    assert "model type (default: the first): anima_aesthetic_v1_1, anima, anima_turbo_v1_1," in text
    assert f"(default: {ROOT / 'ckpts'})" in text and f"(default: {ROOT / 'outputs'})" in text
    assert "inline --n --w --h --s --l --g --fs --d overrides" in text


def test_a_busy_port_is_one_line_naming_the_flag(tmp_path):
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        result = subprocess.run([sys.executable, str(ROOT / "wgp.py"), "--server-port", str(port)],
                                capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"error: Port {port} is in use (is AnimaGP already running?): choose another with --server-port N."]


@pytest.mark.parametrize("argv, env, message", [
    (["--server-port", "99999"], {}, "argument --server-port: must be a port number from 1 to 65535, got '99999'"),
    ([], {"SERVER_PORT": "abc"},
     "The environment variable SERVER_PORT must be a port number from 1 to 65535, got 'abc'"),
])
def test_bad_ports_are_one_line_before_anything_loads(argv, env, message, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "wgp.py"), *argv], capture_output=True, text=True,
                            env=dict(os.environ, **env), cwd=tmp_path, timeout=60)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [f"error: {message}" + (
        " (see --help)" if argv else " (or pass --server-port).")]


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
                 "--model", "--seed", "--steps", "--guidance", "--resolution", "--batch-size", "--sampler", "--lora",
                 "--lora-multipliers", "--low-memory", "--no-offload", "--compile"):
        assert flag in text


def test_a_nan_image_is_an_error_and_nothing_is_saved(ckpts, tmp_path):
    """An overflow that only shows after decoding (e.g. an fp16 VAE on a GPU) is caught before saving."""
    import torch

    from shared.runtime import GenerationError
    from shared.settings import resolve_task

    registry = wgp.load_registry()
    runtime = wgp.make_runtime(wgp.parse_args(["--ckpts-dir", str(ckpts), "--output-dir", str(tmp_path)]), registry)
    model = runtime.load("anima_preview")
    model.generate = lambda **kwargs: {"x": torch.full((3, 1, 64, 64), float("nan")), "seed": kwargs["seed"]}
    task, _ = resolve_task(registry, {"prompt": "x", "resolution": "64x64"}, model_type="anima_preview")
    with pytest.raises(GenerationError, match="decoded image holds NaN or infinite values, so nothing was saved"):
        runtime.generate(task)
    assert list(tmp_path.iterdir()) == []


def test_dry_run_checks_lora_files_and_exits_1_for_a_task_that_would_fail(capsys, tmp_path):
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "broken.safetensors").write_bytes(b"not safetensors")
    tasks = [{"prompt": "a"}, {"prompt": "b", "activated_loras": ["nope"]}, {"prompt": "c <lora:broken:1>"}]
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    code, lines, err = run(capsys, "--ckpts-dir", tmp_path, "--lora-dir", tmp_path / "loras", "--process",
                           tmp_path / "tasks.json", "--dry-run")
    assert code == 1 and [line.split(" OK")[0] for line in lines if " OK" in line] == ["task 1/3"]
    assert f"error: {tmp_path / 'tasks.json'} task 2: LoRA 'nope' not found" in err
    assert f"error: {tmp_path / 'tasks.json'} task 3: LoRA 'broken' is not a readable safetensors file." in err
    assert err.rstrip().endswith("error: 2 of 3 tasks failed "
                                 f"({tmp_path / 'tasks.json'} task 2, {tmp_path / 'tasks.json'} task 3).")
