"""Model definitions from defaults/*.json, the settings merge order, validation, and persistence."""

import json
import os

import pytest

from shared.settings import (
    ModelRegistry, SettingsError, SettingsStore, Task, load_tasks_file, parse_resolution, resolve_task,
)
from shared.settings_schema import SETTINGS


class FakeHandler:
    """The Wan2GP handler methods the registry uses, with values the tests can recognise."""

    @staticmethod
    def query_supported_types():
        return ["fake"]

    @staticmethod
    def query_family_infos():
        return {"fakefam": (10, "Fake family")}

    @staticmethod
    def query_model_family():
        return "fakefam"

    @staticmethod
    def query_model_def(base_model_type, model_def):
        return {"sample_solvers": [("Euler", "euler"), ("ER-SDE", "er_sde")], "name": "handler name",
                "image_batch_size_max": 4}

    @staticmethod
    def update_default_settings(base_model_type, model_def, ui_defaults):
        ui_defaults.update({"num_inference_steps": 30, "sample_solver": "er_sde", "guidance_scale": 4.0,
                            "negative_prompt": "from handler"})

    @staticmethod
    def validate_generative_settings(model_type, model_def, inputs):
        return "prompt says no" if inputs["prompt"] == "forbidden" else None


def _write(folder, name, data):
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(data))


@pytest.fixture
def registry(tmp_path):
    defaults = tmp_path / "defaults"
    _write(defaults, "fake_b", {"model": {"name": "B model", "architecture": "fake"}, "num_inference_steps": 12,
                                "resolution": "64x64"})
    _write(defaults, "fake_a", {"model": {"name": "A model", "architecture": "fake", "image_batch_size_max": 2}})
    _write(defaults, "orphan", {"model": {"name": "O", "architecture": "nobody"}})
    _write(defaults, "hidden", {"model": {"name": "H", "architecture": "fake", "visible": False}})
    return ModelRegistry([FakeHandler], [defaults])


def test_registry_offers_handled_visible_models_and_says_why_others_are_missing(registry):
    assert registry.model_types == ["fake_a", "fake_b"]  # same family: ordered by name
    assert "no family handler supports architecture 'nobody'" in registry.skipped["orphan"]
    assert registry.entry("fake_b").name == "B model"  # JSON keys win over handler defaults
    assert registry.entry("fake_a").definition["image_batch_size_max"] == 2
    assert registry.rule("fake_a", "sample_solver").choices == (("Euler", "euler"), ("ER-SDE", "er_sde"))
    assert registry.rule("fake_a", "resolution").presets == ()  # the handler offers none
    assert registry.rule("fake_a", "batch_size").high == 2  # the definition's image_batch_size_max
    with pytest.raises(SettingsError, match=r"Unknown model_type 'orphan' \(no family handler.*available: fake_a, fake_b"):
        registry.entry("orphan")


def test_two_handlers_claiming_one_type_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="'fake' is supported by two family handlers"):
        ModelRegistry([FakeHandler, FakeHandler], [])


def test_factory_settings_layer_base_then_handler_then_json(registry):
    settings = registry.factory_settings("fake_b")
    assert set(SETTINGS.keys()) <= set(settings)
    assert settings["num_inference_steps"] == 12  # JSON over handler (30) over base
    assert settings["negative_prompt"] == "from handler"  # handler over base ("")
    assert settings["flow_shift"] == SETTINGS["flow_shift"].default
    assert settings["model_type"] == "fake_b"


def test_task_overrides_defaults_which_override_the_model(registry):
    settings, warnings = resolve_task(registry, {"model_type": "fake_b", "seed": 5, "colour": "red", "zzz": 1},
                                      defaults={"seed": 9, "num_inference_steps": 3})
    assert (settings["seed"], settings["num_inference_steps"], settings["resolution"]) == (5, 3, "64x64")
    assert warnings == ["task: ignored unknown setting(s): colour, zzz"]


def test_minimal_task_and_wan2gp_queue_wrapper_are_accepted(registry):
    settings, warnings = resolve_task(registry, {"id": 3, "params": {"model_type": "fake_a", "prompt": "hi"}})
    assert settings["prompt"] == "hi" and settings["sample_solver"] == "er_sde" and warnings == []
    settings, _ = resolve_task(registry, {"prompt": "x"}, model_type="fake_b")
    assert settings["model_type"] == "fake_b"


def test_values_are_cleaned_to_their_types(registry):
    settings, _ = resolve_task(registry, {
        "model_type": "fake_b", "num_inference_steps": "7", "guidance_scale": "3.5", "seed": 12.0,
        "resolution": " 128 x 64 ", "activated_loras": "one.safetensors", "loras_multipliers": [0.5]})
    assert settings["num_inference_steps"] == 7 and settings["guidance_scale"] == 3.5 and settings["seed"] == 12
    assert settings["resolution"] == "128x64"
    assert settings["activated_loras"] == ("one.safetensors",) and settings["loras_multipliers"] == "0.5"
    assert isinstance(settings, Task) and settings.settings()["activated_loras"] == ["one.safetensors"]


@pytest.mark.parametrize("change, message", [
    ({"resolution": "1001x1030"}, r"multiples of 16 \(nearest: 1008x1024\)"),
    ({"resolution": "100000x100000"}, "too large: each side must be at most 4096"),
    ({"resolution": "big"}, "resolution must look like '1024x1024'"),
    ({"batch_size": 0}, "batch_size must be between 1 and 4, got 0"),
    ({"batch_size": 5}, "batch_size must be between 1 and 4"),
    ({"sample_solver": "dpm_magic"}, "sample_solver 'dpm_magic' is not available: choose one of euler, er_sde"),
    ({"num_inference_steps": 2.5}, "num_inference_steps must be a whole number"),
    ({"num_inference_steps": True}, "num_inference_steps must be a whole number"),
    ({"guidance_scale": "lots"}, "guidance_scale must be a number"),
    ({"flow_shift": 0}, "flow_shift must be above 0"),
    ({"seed": -2}, "seed must be between -1 and"),
    ({"prompt": 3}, "prompt must be text"),
    ({"activated_loras": [1]}, "activated_loras must be a list of names"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
    ({"guidance_scale": "inf"}, "guidance_scale must be a finite number"),
    ({"num_inference_steps": "1e309"}, "num_inference_steps must be a finite number"),
    ({"guidance_scale": None}, "guidance_scale is empty"),
    ({"activated_loras": ["a"], "loras_multipliers": "inf"}, "loras_multipliers must be finite numbers"),
    ({"activated_loras": ["a"], "loras_multipliers": [float("nan")]}, "loras_multipliers must be finite"),
    ({"prompt": "cat\x00dog"}, "prompt contains a NUL character"),
    ({"seed": 2**32 - 1, "batch_size": 2}, "gives image 2 the seed 4294967296.*at most 4294967294"),
    ({"activated_loras": ["a"], "loras_multipliers": "1 2"}, "2 values for 1 activated LoRA"),
    ({"activated_loras": ["a"], "loras_multipliers": "strong"}, "loras_multipliers must be numbers"),
    ({"prompt": "forbidden"}, "prompt says no"),
    ({"model_type": "nope"}, "Unknown model_type 'nope'"),
])
def test_bad_values_give_one_clear_message(registry, change, message):
    with pytest.raises(SettingsError, match=message) as info:
        resolve_task(registry, {"model_type": "fake_b", **change}, where="task 2")
    assert str(info.value).startswith("task 2: ") and "\n" not in str(info.value)


def test_a_task_must_name_a_model_and_be_an_object(registry):
    with pytest.raises(SettingsError, match="settings must contain 'model_type'"):
        resolve_task(registry, {"prompt": "x"})
    with pytest.raises(SettingsError, match="a task must be a JSON object of settings, got list"):
        resolve_task(registry, [1, 2])


def test_batch_limit_comes_from_the_model_definition(registry):
    resolve_task(registry, {"model_type": "fake_b", "batch_size": 4})
    with pytest.raises(SettingsError, match="between 1 and 2"):
        resolve_task(registry, {"model_type": "fake_a", "batch_size": 3})


def test_multipliers_default_to_one_per_lora(registry):
    task, _ = resolve_task(registry, {"model_type": "fake_a", "activated_loras": ["a", "b", "c"],
                                      "loras_multipliers": "0.5"})
    assert task.lora_strengths() == [0.5, 1.0, 1.0]
    assert resolve_task(registry, {"model_type": "fake_a"})[0].lora_strengths() == []
    assert parse_resolution("832x1216") == (832, 1216)


def test_the_highest_seed_a_batch_writes_is_accepted_back(registry):
    """Image i of a batch records seed + i; the largest seed a valid batch can reach validates again."""
    last, _ = resolve_task(registry, {"model_type": "fake_b", "seed": 2**32 - 4, "batch_size": 4})
    image_4, _ = resolve_task(registry, {"model_type": "fake_b", "seed": last["seed"] + 3, "batch_size": 1})
    assert image_4["seed"] == 2**32 - 1


@pytest.mark.parametrize("written, expected", [
    ("Euler a", "euler_a"), ("euler_ancestral", "euler_a"), ("Euler Ancestral", "euler_a"),
    ("DPM++ 2M SDE", "dpmpp_2m_sde"), ("er-sde", "er_sde"), ("ER SDE", "er_sde"), ("euler", "euler"),
])
def test_sampler_names_of_a1111_forge_and_comfyui_map_to_the_family_ids(registry, written, expected):
    """One mapping for every source: Forge's 'Euler a' means the same in a JSON, an image and the UI."""
    registry.entry("fake_a").definition["sample_solvers"] = [
        ("Euler", "euler"), ("Euler ancestral", "euler_a"), ("ER-SDE (default)", "er_sde"),
        ("DPM++ 2M SDE", "dpmpp_2m_sde")]
    task, _ = resolve_task(registry, {"model_type": "fake_a", "sample_solver": written})
    assert task["sample_solver"] == expected


def test_tasks_file_accepts_an_object_or_a_list_and_rejects_non_json(tmp_path):
    (tmp_path / "one.json").write_text('{"prompt": "a"}')
    (tmp_path / "many.json").write_text('[{"prompt": "a"}, {"prompt": "b"}]')
    (tmp_path / "bad.json").write_text("prompt: a")
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a"}')
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    assert load_tasks_file(tmp_path / "one.json") == [{"prompt": "a"}]
    assert len(load_tasks_file(tmp_path / "many.json")) == 2
    with pytest.raises(SettingsError, match=r"bad.json is not valid JSON"):
        load_tasks_file(tmp_path / "bad.json")
    with pytest.raises(SettingsError, match="empty list"):
        load_tasks_file(tmp_path / "empty.json")
    with pytest.raises(SettingsError, match="Settings file not found"):
        load_tasks_file(tmp_path / "missing.json")
    assert load_tasks_file(tmp_path / "bom.json") == [{"prompt": "a"}]  # a Windows editor's byte-order mark
    with pytest.raises(SettingsError, match="nested too deeply"):
        load_tasks_file(tmp_path / "deep.json")


def test_store_keeps_last_used_settings_per_model_across_instances(tmp_path):
    store = SettingsStore(tmp_path / "settings")
    assert store.load("fake_a") is None and store.last_model_type() is None
    store.save("fake_a", {"prompt": "a", "seed": 1})
    store.save("fake_b", {"prompt": "b"})
    again = SettingsStore(tmp_path / "settings")
    assert again.load("fake_a") == {"prompt": "a", "seed": 1} and again.load("fake_b") == {"prompt": "b"}
    assert again.last_model_type() == "fake_b"
    (tmp_path / "settings" / "fake_a_settings.json").write_text("{broken")
    assert again.load("fake_a") is None  # a damaged file falls back to the model's defaults
    assert sorted(p.name for p in (tmp_path / "settings").iterdir()) == [
        "fake_a_settings.json", "fake_b_settings.json", "last_model.json"]


def test_settings_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        SettingsStore(tmp_path / "s").save("fake_a", {"prompt": "a"})
    finally:
        os.umask(old)
    assert (tmp_path / "s" / "fake_a_settings.json").stat().st_mode & 0o777 == 0o640
