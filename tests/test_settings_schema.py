"""The settings schema: every setting has a CLI flag, a UI control, a validation rule and a metadata entry,
the UI's ranges and choices are validation's, and a new setting is one declaration (a fake group of the
shapes the coming features need goes through every consumer untouched)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from shared.cli_args import build_parser, generation_overrides, prompt_file_options
from shared.images import a1111_parameters, parse_a1111_parameters
from shared.prompts_file import parse_prompt_line
from shared.runtime import Runtime, RuntimeOptions
from shared.settings import ModelRegistry, SettingsError, resolve_task
from shared.settings_schema import SETTINGS, UI_KINDS, Setting, SettingGroup

ROOT = Path(__file__).resolve().parents[1]
MODEL = "anima_preview"

# Shapes of the settings the next issues add: a choice of numbers (step caches), a percentage, a file with
# its hash in the JSON (image inputs), a patterned text (outpainting), and a generate() kwarg for each.
FAKE_GROUP = SettingGroup("Fake feature", (
    Setting(key="fake_multiplier", type="float", default=1.5, label="Cache multiplier",
            choices=(("x1.5", 1.5), ("x2", 2.0), ("x2.5", 2.5)), cli="--fake-multiplier", a1111="Fake multiplier",
            ui="dropdown", kwarg="fake_multiplier"),
    Setting(key="fake_start_perc", type="float", default=0.0, label="Start (%)", low=0, high=100,
            cli="--fake-start", prompt_options=("fp",), a1111="Fake start", kwarg="fake_start"),
    Setting(key="fake_guide", type="file", default=None, label="Guide image", cli="--fake-guide", ui="image",
            kwarg=lambda path: {"fake_guide_path": path}),
    Setting(key="fake_outpaint", type="text", default="0 0 0 0", label="Outpainting (%)",
            pattern=r"\s*\d+(\s+\d+){3}\s*", pattern_help="four percentages 'top bottom left right'",
            cli="--fake-outpaint", ui="textbox", kwarg="fake_outpaint"),
))
FAKE_SCHEMA = SETTINGS.with_group(FAKE_GROUP)


def registry_for(schema=SETTINGS) -> ModelRegistry:
    import wgp

    handlers = [__import__(path, fromlist=["family_handler"]).family_handler for path in wgp.family_handlers]
    return ModelRegistry(handlers, [ROOT / "defaults"], schema=schema)


@pytest.fixture(scope="module")
def registry():
    return registry_for()


PATTERNED_EXAMPLES = {"video_guide_outpainting": "0 0 25 25", "video_prompt_type": "VAG"}


def sample_value(setting: Setting, rule, tmp_path: Path):
    """A valid value other than the default, from the setting's own rule."""
    if rule.choices:
        return rule.choices[-1][1]
    if setting.type == "file":  # a real image (a source image, a mask)
        path = tmp_path / f"{setting.key}.png"
        from PIL import Image

        Image.new("RGB", (64, 48), "white").save(path)
        return str(path)
    if setting.pattern:
        return PATTERNED_EXAMPLES.get(setting.key, setting.default)
    return {
        "text": "a, b: c", "resolution": "64x48", "names": ("style",), "numbers": "0.5",
        "file": str(tmp_path / "guide.png"),
    }.get(setting.type, rule.low + 1 if rule.low is not None else 7)


def test_every_setting_has_a_flag_a_control_a_rule_and_a_metadata_entry(registry, tmp_path):
    parser = build_parser(tmp_path)
    flags = {option for action in parser._actions for option in action.option_strings}
    entry = registry.entry(MODEL)
    for setting in SETTINGS:
        assert setting.cli in flags, setting.key
        assert setting.ui in UI_KINDS, setting.key
        rule = setting.rule(entry.definition)
        assert setting.clean(registry.factory_settings(MODEL)[setting.key], rule) is not None or setting.type == "file"
    values = {"prompt": "1girl", "activated_loras": ["style"], "loras_multipliers": "0.5"}
    values |= {s.key: sample_value(s, s.rule(entry.definition), tmp_path) for s in SETTINGS
               if s.key not in values}
    task, _ = resolve_task(registry, dict(values, model_type=MODEL))
    assert set(task.settings()) == {"model_type", *SETTINGS.keys()}  # the JSON holds every setting
    text = a1111_parameters(task.settings(), model_name="m")
    back, warnings = parse_a1111_parameters(text)
    assert warnings == []
    written = {s.a1111: task[s.key] for s in SETTINGS if s.a1111 and s.a1111_applies(task.settings())}
    for label, value in written.items():  # every label written reads back (a shared one into one of its settings)
        assert any(back.get(s.key) == value for s in SETTINGS if s.a1111 == label), label


def test_cli_flags_land_in_the_settings_raw_and_validation_types_them(registry, tmp_path):
    argv = ["--steps", "12", "--guidance", "4.5", "--lora", "a", "--lora", "b", "--lora-multipliers", "0.5 1",
            "--sampler", "Euler a", "--seed", "3"]
    overrides = generation_overrides(build_parser(tmp_path).parse_args(argv))
    task, _ = resolve_task(registry, overrides, model_type=MODEL)
    assert (task["num_inference_steps"], task["guidance_scale"], task["activated_loras"], task["sample_solver"],
            task["seed"]) == (12, 4.5, ("a", "b"), "euler_ancestral", 3)


def test_the_ui_shows_validations_ranges_and_choices_and_never_clamps(registry, tmp_path):
    from shared.settings import SettingsStore
    from shared.ui import SettingControls, WebApp, build_ui

    runtime = Runtime(registry, RuntimeOptions(ckpts_dir=tmp_path, output_dir=tmp_path))
    app = WebApp(registry, runtime, SettingsStore(tmp_path / "settings"))
    build_ui(app)
    controls: SettingControls = app.controls
    definition = registry.entry(MODEL).definition
    for setting in SETTINGS:
        rule = setting.rule(definition)
        if setting.ui == "strengths":
            assert len(controls.strengths) >= 1
            continue
        component = controls.components[setting.key]
        if setting.ui == "number":
            # no Gradio bounds (they would refuse with a message naming no field); the range shown is the rule's
            assert (component.minimum, component.maximum, component.info) == (None, None, rule.range_text())
    updates = controls.updates(MODEL, registry.factory_settings(MODEL))
    by_key = dict(zip([s.key for s in controls.settings if s.ui != "strengths"], updates))
    assert [tuple(c) for c in by_key["sample_solver"]["choices"]] == list(registry.rule(MODEL, "sample_solver").choices)
    assert by_key["batch_size"]["info"] == "between 1 and 16" == registry.rule(MODEL, "batch_size").range_text()
    assert by_key["num_inference_steps"]["info"] == "between 1 and 1000"
    for key in ("num_inference_steps", "guidance_scale", "batch_size"):  # the bounds the UI states are accepted
        rule = registry.rule(MODEL, key)
        resolve_task(registry, {key: rule.high, "model_type": MODEL})
        with pytest.raises(SettingsError, match=f"{key} must be between"):
            resolve_task(registry, {key: rule.high + 1, "model_type": MODEL})


def test_prompt_file_options_come_from_the_schema_and_match_the_readme():
    assert prompt_file_options() == "--n --w --h --s --l --g --fs --d"
    readme = (ROOT / "README.md").read_text()
    assert f"inline overrides ({prompt_file_options()})" in " ".join(readme.replace("`", "").split())


def test_a_new_setting_is_one_declaration(tmp_path):
    """The fake group reaches validation, the CLI, prompt files, the metadata, the UI and generate()."""
    registry = registry_for(FAKE_SCHEMA)
    guide = tmp_path / "guide.png"
    guide.write_bytes(b"pixels")
    args = build_parser(tmp_path, FAKE_SCHEMA).parse_args(
        ["--fake-multiplier", "2", "--fake-guide", str(guide), "--fake-outpaint", "10 0 5 5"])
    task, warnings = resolve_task(registry, generation_overrides(args, FAKE_SCHEMA), model_type=MODEL)
    assert (task["fake_multiplier"], task["fake_start_perc"], task["fake_guide"], task["fake_outpaint"]) == (
        2.0, 0.0, str(guide), "10 0 5 5") and warnings == []
    assert parse_prompt_line("cat --fp 25", schema=FAKE_SCHEMA) == ("cat", {"fake_start_perc": 25.0})
    for bad, message in (({"fake_multiplier": 3}, "fake_multiplier 3 is not available: choose one of 1.5, 2.0, 2.5"),
                         ({"fake_start_perc": 101}, "fake_start_perc must be between 0 and 100"),
                         ({"fake_guide": str(tmp_path / "nope.png")}, "fake_guide: no such file"),
                         ({"fake_outpaint": "10 0"}, "fake_outpaint must be four percentages")):
        with pytest.raises(SettingsError, match=message):
            resolve_task(registry, dict(bad, model_type=MODEL))

    runtime = Runtime(registry, RuntimeOptions(ckpts_dir=tmp_path, output_dir=tmp_path))
    kwargs = runtime.generate_kwargs(task, task["prompt"], [], callback=None)
    assert (kwargs["fake_multiplier"], kwargs["fake_start"], kwargs["fake_guide_path"], kwargs["fake_outpaint"]) == (
        2.0, 0.0, str(guide), "10 0 5 5")
    assert (kwargs["sampling_steps"], kwargs["width"], kwargs["height"]) == (30, 1024, 1024)

    text = a1111_parameters(task.settings(), model_name="m", schema=FAKE_SCHEMA)
    assert "Fake multiplier: 2, Fake start: 0, Model: m" in text
    assert parse_a1111_parameters(text, FAKE_SCHEMA)[0]["fake_multiplier"] == 2.0
    extras = FAKE_SCHEMA["fake_guide"].json_extras(task["fake_guide"])
    assert extras == {"fake_guide_sha256": hashlib.sha256(b"pixels").hexdigest()}
    again, warnings = resolve_task(registry, task.settings() | extras)  # the hash key reads back quietly
    assert again == task and warnings == []

    from shared.settings import SettingsStore
    from shared.ui import WebApp, build_ui

    app = WebApp(registry, runtime, SettingsStore(tmp_path / "settings"))
    build_ui(app)
    assert {"fake_multiplier", "fake_start_perc", "fake_guide", "fake_outpaint"} <= set(app.controls.components)
    assert app.controls.to_settings(_ui_values(app.controls, task.settings()))["fake_outpaint"] == "10 0 5 5"


def _ui_values(controls, settings):
    """The raw values the controls would send for `settings` (strength boxes: one per LoRA)."""
    values = []
    for s in controls.settings:
        if s.ui == "strengths":
            values += [1.0] * len(controls.strengths)
        else:
            values.append(settings[s.key])
    return values
