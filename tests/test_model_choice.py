"""Choosing the weights, in the app: the official definitions (order, URLs, defaults, checksums), verified
downloads (the hub mocked), the licence, finetunes/ and --dit, --quantize / --save-quantized, the scheduler
and CFG truncation settings through a PNG, and weights found in upstream Wan2GP's and ComfyUI's layouts.
"""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import wgp
from models.anima import quant
from shared import files
from shared.cli_args import QUANTIZE_CHOICES
from shared.images import read_image_metadata
from shared.settings import ModelRegistry, SettingsError
from tests.tiny_ckpts import TEXT_ENCODER_FILE, VAE_FILE
from tests.tiny_dit import write_dit_file

ROOT = Path(__file__).resolve().parents[1]
HUB = "https://huggingface.co/circlestone-labs/Anima/resolve/main/split_files"
FAST = ["--resolution", "64x64", "--steps", "2"]
# The official DiTs of split_files/diffusion_models/, in the order the picker lists them (checkpoints.md §1.1):
# the current releases (the recommended Aesthetic v1.1 first), then the earlier versions, each group by name.
OFFICIAL = {
    "anima_aesthetic_v1_1": "anima-aesthetic-v1.1.safetensors",
    "anima": "anima-base-v1.0.safetensors",
    "anima_turbo_v1_1": "anima-turbo-v1.1.safetensors",
    "anima_aesthetic_v1_0": "anima-aesthetic-v1.0.safetensors",
    "anima_aesthetic_v1_0b": "anima-aesthetic-v1.0b.safetensors",
    "anima_preview": "anima-preview.safetensors",
    "anima_preview2": "anima-preview2.safetensors",
    "anima_preview3_base": "anima-preview3-base.safetensors",
    "anima_turbo_v1_0": "anima-turbo-v1.0.safetensors",
}
GGUF = "anima_turbo_v1_1_gguf_q8_0"
KNOWN_SHA256 = {  # checkpoints.md §1.1
    "anima-preview2.safetensors": "a21ff6807e31cbd2e6e7f24de07921b3190cd832819389f6b6b27e3a04e82f57",
    "anima-base-v1.0.safetensors": "bd43b7cffe1ed1153d9c41e7beb2f18cb1273eafbaa3af3edd6a173dc90a006e",
    "anima-aesthetic-v1.0.safetensors": "368aad0a7bdf33ed1571f4664466e0f25768ed8dc7d706697af46ab8c183bf41",
    "anima-aesthetic-v1.1.safetensors": "3c1868387a3a1ff504bbb87c33678321965ead381fcf87afbd0264daa600c082",
    "anima-turbo-v1.1.safetensors": "fba11953276b57edf59d1dc4f1857ac05aa079c56f982b4d7c20298d57d3f7eb",
    "anima-turbo-v1.1-Q8_0.gguf": "74d6c9251f34bc4152fda460dd7befaa9cec79946c270a378fee3d33048153bd",
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def registry():
    return wgp.load_registry()


def run(capsys, *argv):
    code = wgp.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


# --- the definitions -------------------------------------------------------------------------------


def test_every_official_dit_has_a_definition_listed_in_the_chosen_order(registry):
    assert [t for t in registry.model_types if t != GGUF] == list(OFFICIAL)
    assert registry.model_types.index(GGUF) == 3  # beside the Turbo v1.1 it quantizes
    assert registry.default_model_type == "anima_aesthetic_v1_1" and registry.architecture_model_type() == "anima"
    assert registry.warnings == [] and registry.skipped == {}
    names = [registry.entry(t).name for t in registry.model_types]
    assert len(set(names)) == len(names) and all(n.startswith("Anima ") for n in names)


def test_upstream_opens_the_recommended_model_first():
    """Upstream Wan2GP opens a family at its first model by name (the family label cut off): the current
    releases are their own family there, so that first model is the recommended Aesthetic v1.1."""
    definitions = {p.stem: json.loads(p.read_text())["model"] for p in (ROOT / "defaults").glob("anima*.json")}
    current = sorted((d["name"].removeprefix("Anima").strip(), t) for t, d in definitions.items() if "group" not in d)
    assert current[0][1] == "anima_aesthetic_v1_1"
    assert {d.get("group") for d in definitions.values()} == {None, "anima_earlier"}
    from models.anima.anima_handler import family_handler

    assert "anima_earlier" in family_handler.query_family_infos()


@pytest.mark.parametrize("model_type", [*OFFICIAL, GGUF])
def test_each_definition_resolves_its_url_and_has_the_cards_defaults(registry, model_type, tmp_path):
    entry = registry.entry(model_type)
    main, text_encoder, vae = files.model_sources(entry.handler, "anima", entry.definition, tmp_path)
    if model_type == GGUF:
        assert main == "https://huggingface.co/JoyFusionAI/gguf-anima/resolve/main/anima-turbo-v1.1-Q8_0.gguf"
    else:
        assert main == f"{HUB}/diffusion_models/{OFFICIAL[model_type]}"  # bf16 first, whatever else is listed
    assert (text_encoder, vae) == (f"{HUB}/text_encoders/{TEXT_ENCODER_FILE}", f"{HUB}/vae/{VAE_FILE}")
    settings = registry.factory_settings(model_type)
    turbo = "turbo" in model_type
    assert (settings["num_inference_steps"], settings["guidance_scale"]) == ((10, 1.0) if turbo else (30, 4.0))
    assert (settings["sample_solver"], settings["scheduler"]) == (
        ("euler", "sgm_uniform") if turbo else ("er_sde", "simple"))
    assert settings["cfg_truncation_perc"] == 100.0 and settings["resolution"] == "1024x1024"
    assert bool(entry.definition.get("no_negative_prompt")) == turbo and (settings["negative_prompt"] == "") == turbo
    if "aesthetic" in model_type:  # the card: no score_* tags for Aesthetic
        assert "score_" not in settings["prompt"] + settings["negative_prompt"]
    else:
        assert "score_7" in settings["prompt"]
    checks = files.file_checks(entry.definition)
    name = Path(main).name
    assert {n: c.sha256 for n, c in checks.items()} == ({name: KNOWN_SHA256[name]} if name in KNOWN_SHA256 else {})
    assert all(c.size in (None, 4_182_218_360, 2_239_471_744) for c in checks.values())
    for url in entry.definition["URLs"][1:]:  # quantized alternatives, named as upstream picks them
        assert files.is_prequantized(url) and "int8" in Path(url).name


def test_quantize_picks_the_listed_int8_file_and_a_file_on_disk_wins(registry, tmp_path):
    urls = registry.entry("anima_turbo_v1_1").definition["URLs"]
    assert files.choose_weights(urls, tmp_path) == urls[0]
    assert files.choose_weights(urls, tmp_path, "int8").endswith("anima-turbo-v1.1-int8convrot.safetensors")
    assert files.choose_weights(urls, tmp_path, "int8_convrot") == urls[1]
    assert files.choose_weights(urls, tmp_path, "fp8") == urls[0]  # none listed: the bf16 file, quantized at load
    (tmp_path / "anima-turbo-v1.1.safetensors").write_bytes(b"x")
    assert files.choose_weights(urls, tmp_path, "int8") == urls[0]  # already there: nothing to download
    assert QUANTIZE_CHOICES == quant.QUANTIZE_CHOICES


# --- files where other apps keep them --------------------------------------------------------------


@pytest.mark.parametrize("layout", ["upstream", "comfyui", "comfyui_legacy"])
def test_weights_are_found_in_upstream_and_comfyui_layouts(capsys, ckpts, tmp_path, layout):
    folders = {"upstream": ("", "split_files/text_encoders", "split_files/vae"),
               "comfyui": ("diffusion_models", "text_encoders", "vae"),
               "comfyui_legacy": ("unet", "clip", "vae")}[layout]
    root = tmp_path / "models"
    for folder, name in zip(folders, ("anima-preview.safetensors", TEXT_ENCODER_FILE, VAE_FILE)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(ckpts / name, root / folder / name)
    code, lines, err = run(capsys, "--model", "anima_preview", "--ckpts-dir", root, "--output-dir", tmp_path / "out",
                           "--prompt", "x", *FAST)
    assert code == 0, err
    assert len(lines) == 1 and "Downloading" not in err


# --- verified downloads (the hub mocked) -----------------------------------------------------------


def _fake_hub(monkeypatch, payloads):
    """hf_hub_download writes `payloads[file name]` into the staging folder, as the hub client does."""
    calls = []

    def download(repo_id, filename, revision=None, local_dir=None):
        calls.append(filename)
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        (target.parent.parent / ".cache").mkdir(exist_ok=True)  # the client's own records live beside
        target.write_bytes(payloads[Path(filename).name])
        return str(target)

    monkeypatch.setattr(files, "hf_hub_download", download)
    monkeypatch.setattr(files, "hub_unreachable_reason", lambda: None)
    return calls


def _definition(tmp_path, name, data, **check):
    return {"name": "T", "URLs": [f"{HUB}/diffusion_models/{name}"],
            "file_checks": {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), **check}}}


@pytest.mark.parametrize("check, reason", [({"size": 3}, "it is 4 bytes instead of 3"),
                                           ({"sha256": "0" * 64}, "its SHA-256 is")])
def test_a_download_that_is_not_the_expected_file_is_deleted_and_reported(monkeypatch, tmp_path, check, reason):
    from models.anima.anima_handler import family_handler

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for name in (TEXT_ENCODER_FILE, VAE_FILE):
        (ckpts / name).write_bytes(b"here")
    _fake_hub(monkeypatch, {"d.safetensors": b"good"})
    definition = _definition(tmp_path, "d.safetensors", b"good", **check)
    with pytest.raises(files.DownloadError, match="the downloads failed") as failed:
        files.fetch_model_files(family_handler, "anima", definition, ckpts)
    assert f"{HUB}/diffusion_models/d.safetensors" in str(failed.value)
    assert sorted(p.name for p in ckpts.iterdir()) == [TEXT_ENCODER_FILE, VAE_FILE]  # nothing kept, staging gone
    good = _definition(tmp_path, "d.safetensors", b"good")
    assert files.fetch_model_files(family_handler, "anima", good, ckpts)[0] == ckpts / "d.safetensors"
    assert (ckpts / "d.safetensors").read_bytes() == b"good" and not (ckpts / files.STAGING_FOLDER).exists()


def test_the_message_of_a_wrong_download_says_what_differs(monkeypatch, tmp_path, capsys):
    _fake_hub(monkeypatch, {"d.safetensors": b"evil"})
    hub_file = files.parse_hf_url(f"{HUB}/diffusion_models/d.safetensors")
    expected = hashlib.sha256(b"good").hexdigest()
    evil = hashlib.sha256(b"evil").hexdigest()
    with pytest.raises(files.DownloadError, match=rf"its SHA-256 is {evil[:12]}\.\.\. instead of {expected[:12]}\.\.\.\), "
                                                  "so it was deleted and not loaded"):
        files.download_hub_file(hub_file, tmp_path, files.FileCheck(sha256=expected))
    assert list(tmp_path.iterdir()) == []


# --- the licence -----------------------------------------------------------------------------------


@pytest.fixture
def tiny_hub(monkeypatch, ckpts):
    """The hub serves the tiny files under the official names."""
    payloads = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    return _fake_hub(monkeypatch, payloads)


def test_the_cli_shows_the_licence_once_and_downloads_only_after_it_is_accepted(capsys, tiny_hub, tmp_path,
                                                                                monkeypatch):
    argv = ["--model", "anima_preview", "--ckpts-dir", tmp_path / "ckpts", "--output-dir", tmp_path / "out",
            "--settings", tmp_path / "settings", "--prompt", "x", *FAST]
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    code, lines, err = run(capsys, *argv)
    assert code == 1 and lines == [] and tiny_hub == [] and "Traceback" not in err
    assert "Licence: CircleStone Labs Non-Commercial License and NVIDIA Open Model License" in err
    assert "https://huggingface.co/circlestone-labs/Anima/blob/main/LICENSE.md" in err
    assert err.strip().splitlines()[-1].startswith("error: The weights are under the") and "--accept-license" in err
    code, lines, err = run(capsys, *argv, "--accept-license")
    assert code == 0 and len(lines) == 1 and len(tiny_hub) == 3 and "Accepted with --accept-license" in err
    accepted = json.loads((tmp_path / "settings" / "accepted_licenses.json").read_text())
    assert list(accepted) == ["circlestone-labs-non-commercial+nvidia-open-model"]
    # remembered: another model's download under the same licence is not asked again
    code, lines, err = run(capsys, *argv[:-6], "--model", "anima_preview2", "--prompt", "x", *FAST)
    assert "Licence:" not in err and tiny_hub[-1].endswith("anima-preview2.safetensors")


def test_on_a_terminal_the_cli_asks(capsys, tiny_hub, tmp_path, monkeypatch):
    answers = iter(["no", "yes"])
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    argv = ["--model", "anima_preview", "--ckpts-dir", tmp_path / "ckpts", "--output-dir", tmp_path / "out",
            "--settings", tmp_path / "settings", "--prompt", "x", *FAST]
    assert run(capsys, *argv)[0] == 1 and tiny_hub == []
    code, lines, err = run(capsys, *argv)
    assert code == 0 and len(lines) == 1 and err.count("Licence:") == 1


def test_help_dry_run_and_files_already_there_never_ask(capsys, ckpts, tmp_path):
    code, lines, _ = run(capsys, "--model", "anima_preview", "--ckpts-dir", tmp_path / "empty", "--prompt", "x",
                         "--dry-run", "--settings", tmp_path / "s")
    assert code == 0 and lines[-1].startswith("note: its licence") and not (tmp_path / "s").exists()
    code, lines, err = run(capsys, "--model", "anima_preview", "--ckpts-dir", ckpts, "--output-dir", tmp_path / "o",
                           "--settings", tmp_path / "s", "--prompt", "x", *FAST)
    assert code == 0 and "Licence" not in err and not (tmp_path / "s" / "accepted_licenses.json").exists()


def test_the_ui_shows_the_licence_until_it_is_accepted(registry, tmp_path):
    import gradio as gr

    from shared.runtime import Runtime, RuntimeOptions
    from shared.settings import SettingsStore
    from shared.ui import WebApp, build_ui

    runtime = Runtime(registry, RuntimeOptions(ckpts_dir=tmp_path / "ckpts", output_dir=tmp_path / "out",
                                               settings_dir=tmp_path / "settings"))
    app = WebApp(registry, runtime, SettingsStore(tmp_path / "settings"))
    build_ui(app)
    box, text = app.license_view("anima")
    assert box["visible"] is True and "CircleStone Labs Non-Commercial License" in text and "LICENSE.md" in text
    values = app.controls.updates("anima", registry.factory_settings("anima"))
    with pytest.raises(gr.Error, match="I accept the licence"):
        app.on_generate("anima", *[v.get("value") if isinstance(v, dict) else v for v in values])
    assert app.on_accept_license("anima")[0]["visible"] is False
    assert app.license_view("anima_turbo_v1_1")[0]["visible"] is False  # one licence for the whole family
    assert (tmp_path / "settings" / "accepted_licenses.json").is_file()


def test_the_ui_greys_the_negative_prompt_out_where_it_is_unused(registry, tmp_path):
    from shared.runtime import Runtime, RuntimeOptions
    from shared.settings import SettingsStore
    from shared.ui import WebApp

    app = WebApp(registry, Runtime(registry, RuntimeOptions(ckpts_dir=tmp_path, output_dir=tmp_path)),
                 SettingsStore(tmp_path))
    assert app.negative_prompt_state("anima", 4.0)["interactive"] is True
    assert app.negative_prompt_state("anima", 1)["interactive"] is False
    assert app.negative_prompt_state("anima_turbo_v1_1", 1.0)["interactive"] is False
    # above CFG 1 generate() uses the negative prompt, Turbo's too: editable, with a word on Turbo's intent
    turbo = app.negative_prompt_state("anima_turbo_v1_1", 3.0)
    assert turbo["interactive"] is True and "made for CFG 1" in turbo["info"]


# --- scheduler and CFG truncation through a PNG ----------------------------------------------------


def test_scheduler_and_cfg_truncation_are_recorded_and_remake_the_image(capsys, ckpts, tmp_path):
    base = ["--model", "anima_preview", "--ckpts-dir", ckpts, "--seed", 7, "--negative-prompt", "bad", *FAST]
    code, [path], err = run(capsys, *base, "--output-dir", tmp_path / "a", "--prompt", "cat",
                            "--scheduler", "Karras", "--cfg-truncation", 50)
    assert code == 0, err
    settings, parameters = read_image_metadata(path)
    assert "Schedule type: karras" in parameters and "CFG truncation: 50" in parameters
    assert (settings["scheduler"], settings["cfg_truncation_perc"]) == ("karras", 50.0)
    code, [again], err = run(capsys, "--ckpts-dir", ckpts, "--output-dir", tmp_path / "b", "--process", path)
    assert code == 0, err
    with Image.open(path) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes()
    code, [plain], err = run(capsys, *base, "--output-dir", tmp_path / "c", "--prompt", "cat")
    _, parameters = read_image_metadata(plain)
    assert "Schedule type: simple" in parameters and "CFG truncation" not in parameters  # off: not written
    with Image.open(path) as a, Image.open(plain) as b:
        assert a.tobytes() != b.tobytes()


def test_the_settings_become_generate_keywords(registry, tmp_path):
    from shared.runtime import Runtime, RuntimeOptions
    from shared.settings import resolve_task

    runtime = Runtime(registry, RuntimeOptions(ckpts_dir=tmp_path, output_dir=tmp_path))
    task, _ = resolve_task(registry, {"prompt": "x", "scheduler": "Beta57", "cfg_truncation_perc": 80},
                           model_type="anima")
    kwargs = runtime.generate_kwargs(task, "x", [], lambda *a, **k: None)
    assert (kwargs["scheduler"], kwargs["cfg_truncation"]) == ("beta57", 0.8)
    with pytest.raises(SettingsError, match="scheduler 'warp' is not available: choose one of simple, sgm_uniform"):
        resolve_task(registry, {"prompt": "x", "scheduler": "warp"}, model_type="anima")
    with pytest.raises(SettingsError, match="cfg_truncation_perc must be between 0 and 100"):
        resolve_task(registry, {"prompt": "x", "cfg_truncation_perc": 120}, model_type="anima")


# --- any DiT: --dit and finetunes/ -----------------------------------------------------------------


def test_dit_flag_generates_with_any_anima_dit(capsys, ckpts, tmp_path):
    dit = write_dit_file(tmp_path / "my-finetune.safetensors", seed=5, prefix="model.diffusion_model.")
    common = ["--ckpts-dir", ckpts, "--prompt", "x", "--seed", 1, *FAST]
    code, [path], err = run(capsys, *common, "--output-dir", tmp_path / "a", "--dit", dit)
    assert code == 0, err
    settings, parameters = read_image_metadata(path)
    assert "Model: my-finetune" in parameters and settings["model_type"] == "anima"  # the base model's defaults
    assert "Loading Anima Base v1.0 with my-finetune.safetensors" in err
    code, [official], err = run(capsys, *common, "--output-dir", tmp_path / "b", "--model", "anima_preview")
    with Image.open(path) as a, Image.open(official) as b:
        assert a.tobytes() != b.tobytes()
    for bad, message in ((tmp_path / "nope.safetensors", "--dit: no such file or folder"),
                         (ckpts / VAE_FILE, "not the Anima DiT checkpoint"),
                         (tmp_path / "a", "the DiT must be")):
        if bad == tmp_path / "a":
            bad = next((tmp_path / "a").iterdir())  # a .png
        code, lines, err = run(capsys, *common, "--output-dir", tmp_path / "c", "--dit", bad)
        assert code == 1 and "Traceback" not in err, err
        assert message in err.strip().splitlines()[-1], err


def test_finetunes_override_or_add_definitions_and_bad_ones_are_warned_about(tmp_path, ckpts, capsys, monkeypatch):
    from models.anima.anima_handler import family_handler

    finetunes = tmp_path / "finetunes"
    finetunes.mkdir()
    dit = write_dit_file(tmp_path / "mine.safetensors", seed=3)
    (finetunes / "anima.json").write_text(json.dumps({"model": {"name": "My Base"}, "num_inference_steps": 12}))
    (finetunes / "my_anima.json").write_text(json.dumps({
        "model": {"name": "Anima Mine", "architecture": "anima", "description": "d", "URLs": [str(dit)]},
        "num_inference_steps": 3, "scheduler": "karras"}))
    (finetunes / "broken.json").write_text("{")
    (finetunes / "no_urls.json").write_text(json.dumps({"model": {"name": "N", "architecture": "anima"}}))
    (finetunes / "bad_settings.json").write_text(json.dumps(
        {"model": {"name": "B", "architecture": "anima", "URLs": "anima"}, "scheduler": "warp"}))
    (finetunes / "reuse.json").write_text(json.dumps(
        {"model": {"name": "Anima Reuse", "architecture": "anima", "URLs": "anima_turbo_v1_1"}}))
    registry = ModelRegistry([family_handler], [ROOT / "defaults"], finetunes_dirs=[finetunes])
    assert registry.entry("anima").name == "My Base" and registry.factory_settings("anima")["num_inference_steps"] == 12
    assert registry.entry("anima").definition["URLs"][0] == f"{HUB}/diffusion_models/anima-base-v1.0.safetensors"
    assert registry.entry("my_anima").definition["URLs"] == [str(dit)]
    assert registry.entry("reuse").definition["URLs"][0].endswith("anima-turbo-v1.1.safetensors")
    warnings = "\n".join(registry.warnings)
    assert len(registry.warnings) == 3 and "broken.json is not valid JSON" in warnings
    assert re.search(r"no_urls.json is ignored: its \"URLs\" must be a list", warnings)
    assert "bad_settings.json is ignored: its settings are invalid: scheduler 'warp' is not available" in warnings
    with pytest.raises(SettingsError, match="bad_settings' .*its settings are invalid"):
        registry.entry("bad_settings")
    # through the app: the finetune's own settings and weights
    monkeypatch.setattr(wgp, "FINETUNES_DIR", finetunes)
    code, [path], err = run(capsys, "--model", "my_anima", "--ckpts-dir", ckpts, "--output-dir", tmp_path / "o",
                            "--prompt", "x", "--resolution", "64x64")
    assert code == 0, err
    assert err.count("warning: Finetune definition") == 3
    settings, parameters = read_image_metadata(path)
    assert (settings["model_type"], settings["num_inference_steps"], settings["scheduler"]) == ("my_anima", 3, "karras")
    assert "Model: mine" in parameters


# --- --quantize and --save-quantized ---------------------------------------------------------------


def test_save_quantized_writes_a_file_that_loads_with_dit(capsys, ckpts, tmp_path):
    saved = tmp_path / "anima-int8.safetensors"
    common = ["--model", "anima_preview", "--ckpts-dir", ckpts]
    code, lines, err = run(capsys, *common, "--quantize", "int8", "--save-quantized", saved)
    assert code == 0 and lines == [] and saved.is_file(), err
    assert f"Saved the quantized DiT to {saved}" in err
    from safetensors import safe_open

    with safe_open(saved, "pt") as f:  # ComfyUI's per-layer layout
        assert f.get_tensor("net.blocks.0.self_attn.q_proj.weight").dtype == torch.int8
        assert json.loads(bytes(f.get_tensor("net.blocks.0.self_attn.q_proj.comfy_quant").tolist()))["format"] \
            == "int8_tensorwise"
    assert saved.stat().st_size < (ckpts / "anima-preview.safetensors").stat().st_size
    code, [from_file], err = run(capsys, *common, "--dit", saved, "--output-dir", tmp_path / "a", "--prompt", "x",
                                 "--seed", 2, *FAST)
    assert code == 0 and "already quantized" not in err, err
    code, [on_the_fly], err = run(capsys, *common, "--quantize", "int8", "--output-dir", tmp_path / "b",
                                  "--prompt", "x", "--seed", 2, *FAST)
    assert code == 0 and "quantizing its DiT to int8" in err, err
    with Image.open(from_file) as a, Image.open(on_the_fly) as b:
        assert a.tobytes() == b.tobytes()  # the saved file is exactly the model quantized at load
    code, _, err = run(capsys, *common, "--dit", saved, "--quantize", "fp8", "--output-dir", tmp_path / "c",
                       "--prompt", "x", *FAST)
    assert code == 0 and "is already quantized: it is used as it is" in err


@pytest.mark.parametrize("target, message", [("exists", "the file exists already"),
                                             ("x.bin", "must end in .safetensors"),
                                             ("nowhere/x.safetensors", "does not exist")])
def test_save_quantized_refuses_a_bad_target_before_loading(capsys, ckpts, tmp_path, target, message):
    path = tmp_path / ("x.safetensors" if target == "exists" else target)
    if target == "exists":
        path.write_bytes(b"keep")
    code, lines, err = run(capsys, "--ckpts-dir", ckpts, "--save-quantized", path)
    assert code == 1 and message in err and "Loading" not in err
    assert target != "exists" or path.read_bytes() == b"keep"


def test_a_diffusers_folder_is_taken_as_the_dit(tmp_path, ckpts):
    from models.anima.anima_handler import family_handler

    folder = tmp_path / "Anima-Base-v1.0-Diffusers"
    (folder / "transformer").mkdir(parents=True)
    registry = ModelRegistry([family_handler], [ROOT / "defaults"])
    registry.use_dit("anima", folder)
    entry = registry.entry("anima")
    assert files.fetch_model_files(entry.handler, "anima", entry.definition, ckpts) == [
        folder, ckpts / TEXT_ENCODER_FILE, ckpts / VAE_FILE]  # the loader reads the folder (test_checkpoint_formats)
