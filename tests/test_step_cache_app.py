"""The step cache in the app: its three Wan2GP settings (validation against the family's choices, CLI flags,
A1111 and JSON metadata), the per-step report in the progress bar and the UI status, and the run summary."""

import re
from pathlib import Path

import pytest
import torch

import wgp
from models.anima.anima_handler import family_handler
from shared.images import a1111_parameters, parse_a1111_parameters, read_image_metadata
from shared.jobs import Job, Progress, Snapshot
from shared.runtime import StepInfo, _StepReporter
from shared.settings import ModelRegistry, SettingsError, resolve_task
from shared.ui import status_html

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "anima_preview", "--resolution", "64x64", "--steps", "8", "--seed", "3"]


@pytest.fixture(scope="module")
def registry():
    return ModelRegistry([family_handler], [ROOT / "defaults"])


def cache_values(registry, **settings):
    task, _ = resolve_task(registry, {"model_type": "anima_preview", **settings})
    return task["skip_steps_cache_type"], task["skip_steps_multiplier"], task["skip_steps_start_step_perc"]


def test_settings_take_the_familys_caches_under_any_spelling(registry):
    assert cache_values(registry) == ("", 1.75, 0)  # Wan2GP's defaults: off
    assert cache_values(registry, skip_steps_cache_type="TeaCache", skip_steps_multiplier="2")[:2] == ("tea", 2.0)
    assert cache_values(registry, skip_steps_cache_type="First-Block Cache")[0] == "first_block"
    assert cache_values(registry, skip_steps_cache_type="off", skip_steps_start_step_perc=20) == ("", 1.75, 20)
    assert cache_values(registry, skip_steps_cache_type="none")[0] == ""  # how users often write "off"
    task, _ = resolve_task(registry, {"model_type": "anima_preview", "skip_steps_cache_type": "first_block",
                                      "skip_steps_multiplier": 2.5, "skip_steps_start_step_perc": 10})
    kwargs = task.schema.generate_kwargs(task.values)
    assert (kwargs["skip_steps_cache_type"], kwargs["skip_steps_multiplier"], kwargs["skip_steps_start_step_perc"]) \
        == ("first_block", 2.5, 10)


@pytest.mark.parametrize("change, message", [
    ({"skip_steps_cache_type": "mag"}, "skip_steps_cache_type 'mag' is not available: choose one of Off, tea, "
                                       "first_block"),
    ({"skip_steps_multiplier": 3}, "skip_steps_multiplier 3 is not available: choose one of 1.5, 1.75, 2.0"),
    ({"skip_steps_start_step_perc": 101}, "skip_steps_start_step_perc must be between 0 and 100"),
])
def test_bad_cache_settings_give_one_clear_message(registry, change, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        resolve_task(registry, {"model_type": "anima_preview", **change})


def test_a1111_text_records_the_cache_only_when_it_is_on(registry):
    off, _ = resolve_task(registry, {"model_type": "anima_preview", "prompt": "x"})
    assert "Step cache" not in a1111_parameters(off.settings(), model_name="m", schema=off.schema)
    on, _ = resolve_task(registry, {"model_type": "anima_preview", "prompt": "x", "skip_steps_cache_type": "tea",
                                    "skip_steps_multiplier": 2.5, "skip_steps_start_step_perc": 20})
    text = a1111_parameters(on.settings(), model_name="m", schema=on.schema)
    assert "Step cache: tea, Step cache speed: 2.5, Step cache start: 20" in text
    parsed, warnings = parse_a1111_parameters(text, on.schema)
    assert (parsed["skip_steps_cache_type"], float(parsed["skip_steps_multiplier"]),
            int(parsed["skip_steps_start_step_perc"])) == ("tea", 2.5, 20) and not warnings


def test_cli_flags_run_a_cache_report_its_steps_and_record_it(capsys, ckpts, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = wgp.main(["--ckpts-dir", str(ckpts), "--output-dir", str(tmp_path), "--prompt", "1girl", *FAST,
                     "--step-cache", "tea", "--step-cache-speed", "2.5", "--step-cache-start", "10"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = re.search(r"TeaCache skipped (\d+) of 8 steps \((\d+) of 16 DiT passes\)", err)
    assert summary and int(summary.group(1)) > 0, err
    assert "TeaCache: " in err  # the progress bar's step report
    # the summary is a line of its own above the bar, not glued to it
    assert any(line.split("\r")[-1].startswith("TeaCache skipped") for line in err.splitlines()), err
    settings, parameters = read_image_metadata(Path(out.splitlines()[0]))
    assert (settings["skip_steps_cache_type"], settings["skip_steps_multiplier"],
            settings["skip_steps_start_step_perc"]) == ("tea", 2.5, 10)
    assert "Step cache: tea, Step cache speed: 2.5, Step cache start: 10" in parameters

    code = wgp.main(["--ckpts-dir", str(ckpts), "--output-dir", str(tmp_path), "--prompt", "1girl", *FAST,
                     "--step-cache", "mag"])
    assert code != 0 and "skip_steps_cache_type 'mag' is not available" in capsys.readouterr().err


def test_the_step_report_reaches_step_info_and_the_ui_status():
    infos = []
    reporter = _StepReporter(8, infos.append, stop=lambda: None)
    reporter(-1, None, True, override_num_inference_steps=8)
    reporter(2, torch.zeros(16, 1, 2, 2), False, denoising_extra="TeaCache: skipped (1/3 skipped)")
    assert infos[0].detail == "TeaCache: skipped (1/3 skipped)" and infos[0].step == 3
    job = Job(1, {"prompt": "a cat"}, status="running")
    html = status_html(Snapshot(progress=Progress(job, "Generating...", infos[0])))
    assert "Step 3/8 · TeaCache: skipped (1/3 skipped)" in html
    plain = StepInfo(3, 8, 1.0, 1.0, None)
    assert "Step 3/8</span>" in status_html(Snapshot(progress=Progress(job, "Generating...", plain)))


def test_the_run_summary_ends_the_jobs_message():
    import time

    from shared.jobs import JobQueue
    from shared.runtime import SavedImage

    class CachedRuntime:
        last_summary = None

        def generate(self, settings, on_step=None, on_status=None):
            self.last_summary = "TeaCache skipped 9 of 30 steps (18 of 60 DiT passes)"
            return [SavedImage(Path("image.png"), 5, {}, "")]

    queue = JobQueue(CachedRuntime(), log=lambda text: None)
    queue.submit({"model_type": "anima_preview"})
    deadline = time.monotonic() + 60
    while queue.snapshot().last is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert queue.snapshot().last.message == "seed 5 · TeaCache skipped 9 of 30 steps (18 of 60 DiT passes)"
