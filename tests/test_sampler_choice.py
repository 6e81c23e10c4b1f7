"""`generate()` with every sampler and scheduler of the registries on the tiny real-format model, and CFG
truncation."""

import pytest
import torch

from models.anima import sampling, schedulers
from tests.test_pipeline import DiTCalls, model, run  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("solver", list(sampling.SAMPLERS))
def test_every_sampler_makes_images_reproducible_at_any_batch_position(model, solver):
    batch = run(model, batch_size=2, seed=30, sample_solver=solver, sampling_steps=3)["x"]
    assert batch.dtype == torch.uint8 and batch.float().std() > 1.0  # pixels, not a flat image
    single = run(model, seed=31, sample_solver=solver, sampling_steps=3)["x"]
    assert torch.equal(batch[:, 1:2], single)  # image i of a batch is exactly seed + i made alone


def test_dit_calls_per_sampler(model):
    calls = {}
    for solver in ("euler", "heun", "uni_pc", "dpmpp_2m_sde"):
        with DiTCalls(model.transformer) as dit:
            run(model, sample_solver=solver, sampling_steps=4, guide_scale=1.0)
        calls[solver] = len(dit.batches)
    assert calls == {"euler": 4, "heun": 7, "uni_pc": 4, "dpmpp_2m_sde": 4}  # Heun: 2 per step, 1 for the last


@pytest.mark.parametrize("scheduler", list(schedulers.SCHEDULERS))
def test_every_scheduler_runs_and_reports_its_step_count(model, scheduler):
    calls = []
    out = run(model, scheduler=scheduler, sampling_steps=5, sample_solver="euler",
              callback=lambda *a, **k: calls.append(k))
    assert torch.isfinite(out["x"]).all()
    steps = len(schedulers.compute_sigmas(scheduler, 5)) - 1
    assert calls[0] == {"override_num_inference_steps": steps} and len(calls) == steps + 1


def test_scheduler_from_kwarg_or_upstream_custom_settings(model):
    simple = run(model, sample_solver="euler")["x"]
    karras = run(model, sample_solver="euler", scheduler="karras")["x"]
    assert not torch.allclose(simple, karras)
    assert torch.equal(run(model, sample_solver="euler", custom_settings={"scheduler": "karras"})["x"], karras)
    with pytest.raises(ValueError, match="Unknown scheduler 'bogus'"):
        run(model, scheduler="bogus")


def test_cfg_truncation_runs_the_negative_pass_only_in_the_first_steps(model):
    with DiTCalls(model.transformer) as dit:
        run(model, sample_solver="euler", sampling_steps=4, cfg_truncation=0.5)
    assert dit.batches == [2, 2, 1, 1]  # joint cond + uncond, then the positive prompt alone
    with DiTCalls(model.transformer) as dit:
        full = run(model, sample_solver="euler", sampling_steps=4)["x"]
    assert dit.batches == [2, 2, 2, 2]  # off by default
    assert torch.equal(run(model, sample_solver="euler", sampling_steps=4, cfg_truncation=1.0)["x"], full)
    none = run(model, sample_solver="euler", sampling_steps=4, cfg_truncation=0.0)["x"]
    assert torch.equal(none, run(model, sample_solver="euler", sampling_steps=4, guide_scale=1.0)["x"])
    with DiTCalls(model.transformer) as dit:
        via_settings = run(model, sample_solver="euler", sampling_steps=4, custom_settings={"cfg_truncation": 0.25})
    assert dit.batches == [2, 1, 1, 1] and via_settings is not None


def test_cfg_cutoff_rounds_to_whole_steps():
    sigmas = schedulers.compute_sigmas("simple", 30)
    assert sampling.cfg_cutoff_sigma(sigmas, 1.0) is None
    assert sampling.cfg_cutoff_sigma(sigmas, 0.5) == float(sigmas[15])
    assert sampling.cfg_cutoff_sigma(sigmas, 0.35) == float(sigmas[11])  # 10.5 steps: half up
    assert sampling.cfg_cutoff_sigma(sigmas, 0.0) == float(sigmas[0])
