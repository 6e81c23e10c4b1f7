"""Step-skipping caches (models/anima/step_cache.py): the published TeaCache rule and First-Block Cache's on
hand-checked metric sequences, the steps that always run, separate cond/uncond and per-image state, the
DiT forward with rows skipped, and `generate()` with the cache off, at threshold 0, per model call (heun),
with LoRAs, and through upstream Wan2GP's `transformer.cache` / `set_cache_parameters`."""

from types import SimpleNamespace

import pytest
import torch

from models.anima import registry, step_cache
from models.anima.anima_handler import family_handler
from models.anima.step_cache import StepCacheRun, StepCacheSettings
from tests.tiny_ckpts import DIT_FILE, write_tiny_lora

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, NEGATIVE = "a cat sitting on a red sofa", "worst quality, blurry"
SIZE = dict(width=64, height=48)


@pytest.fixture(scope="module")
def model(ckpts):
    return family_handler.load_model([str(ckpts / DIT_FILE)])[0]


@pytest.fixture
def host_cache(model):
    """Upstream Wan2GP's way: an attribute bag on `transformer.cache`, removed afterwards."""
    yield lambda **kw: setattr(model.transformer, "cache", SimpleNamespace(**kw))
    model.transformer.cache = None


def run(model, **kw):
    return model.generate(**(dict(input_prompt=PROMPT, n_prompt=NEGATIVE, sampling_steps=8, seed=7, **SIZE) | kw))


# ------------------------------------------------------------------------------------------ the rules


def decisions(settings, num_steps, changes_per_step, key="k"):
    """The run's decisions ('F' full, 'S' skipped) for one key whose signature changes by the given relative
    amounts (None: the first call); after each full evaluation a residual is cached, as run_blocks does."""
    cache = StepCacheRun(settings)
    cache.start(num_steps)
    signature, reference_for_fbc, out = torch.ones(64, dtype=torch.float64), None, []
    for step, change in enumerate(changes_per_step):
        cache.begin_step(step)
        if change is not None:
            base = signature if settings.kind == "tea" else reference_for_fbc
            signature = base * (1 + change)
        skip = cache.decide(key, signature)
        if not skip:
            cache.states[key].residual = torch.zeros(64)
            reference_for_fbc = signature
        out.append("S" if skip else "F")
    return "".join(out), cache


def test_teacache_follows_the_published_rule_on_a_recorded_sequence():
    # p(d) = 16.4408 d^4 - 21.1412 d^3 + 13.0067 d^2 - 1.67320 d + 0.0863268, by hand:
    # p(0.08) = 0.0255630, p(0) = 0.0863268, p(0.1) = 0.0295769, p(0.5) = 0.886306
    assert step_cache.polynomial(registry.TEACACHE_COEFFICIENTS, 0.08) == pytest.approx(0.0255630, abs=1e-6)
    assert step_cache.polynomial(registry.TEACACHE_COEFFICIENTS, 0.5) == pytest.approx(0.886306, abs=1e-5)
    settings = StepCacheSettings("tea", threshold=0.15)
    changes = [None, 0.08, 0.08, 0.08, 0.08, 0.5, 0.08, 0.0, 0.1, 0.08]
    # step 0: nothing cached -> full. 1-3: sums 0.0256, 0.0511, 0.0767 < 0.15 -> skip; 4: sum 0.102 < 0.15
    # but 3 skips in a row -> full (sum restarts); 5: 0.886 -> full; 6: 0.0256, 7: 0.112, 8: 0.141 -> skip;
    # 9: the last step -> full.
    got, cache = decisions(settings, 10, changes)
    assert got == "FSSSFFSSSF"
    assert cache.skipped_steps == 6 and cache.evaluations == (6, 10)
    # at 0.1 the sum reaches 0.102 at step 4 without the cap, and p(0.5) never skips
    assert decisions(StepCacheSettings("tea", threshold=0.1), 10, changes)[0] == "FSSSFFSFSF"


def test_first_block_cache_compares_with_the_last_full_evaluation():
    settings = StepCacheSettings("first_block", threshold=0.1)
    # changes relative to the last full evaluation: 0.05, 0.09 skip; 0.12 runs (new reference); 0.01 skips;
    # 0.2 runs; the last step runs whatever it measures
    got, _ = decisions(settings, 7, [None, 0.05, 0.09, 0.12, 0.01, 0.2, 0.0])
    assert got == "FSSFSFF"


@pytest.mark.parametrize("kind", ["tea", "first_block"])
def test_threshold_zero_skips_nothing(kind):
    got, cache = decisions(StepCacheSettings(kind, threshold=0.0), 6, [None, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert got == "FFFFFF" and cache.skipped_steps == 0


@pytest.mark.parametrize("kind", ["tea", "first_block"])
def test_first_steps_last_step_and_the_skip_cap_always_run_in_full(kind):
    unchanged = [None] + [0.0] * 11
    settings = StepCacheSettings(kind, threshold=1e9)
    assert decisions(settings, 12, unchanged)[0] == "FSSSFSSSFSSF"
    # start at 25%: steps 0-2 run in full
    assert decisions(StepCacheSettings(kind, 1e9, start_step_perc=25), 12, unchanged)[0] == "FFFSSSFSSSFF"
    assert decisions(StepCacheSettings(kind, 1e9, max_consecutive_skips=1), 6, unchanged[:6])[0] == "FSFSFF"


def test_cond_and_uncond_keep_separate_state():
    cache = StepCacheRun(StepCacheSettings("tea", threshold=0.2))  # uncond: sums p(0) = 0.0863, 0.173 skip
    cache.start(4)
    still, moving = torch.ones(8), torch.ones(8)
    got = []
    for step in range(3):
        cache.begin_step(step)
        moving = moving * 2  # relative change 1: p(1) = 6.72 -> never skips
        skips = {"uncond": cache.decide((0, "uncond"), still), "cond": cache.decide((0, "cond"), moving)}
        for branch, skip in skips.items():
            if not skip:
                cache.states[(0, branch)].residual = torch.zeros(8)
        got.append((skips["uncond"], skips["cond"]))
    assert got == [(False, False), (True, False), (True, False)]
    assert cache.skipped_steps == 0 and cache.evaluations == (2, 6)  # no step had every pass skipped
    assert cache.step_report(1) == "TeaCache: 1/2 passes skipped (0/2 skipped)"


def test_settings_from_wan2gp_keys_and_clear_errors():
    settings = step_cache.cache_settings("tea", 2.0, 20)
    assert (settings.threshold, settings.start_step_perc, settings.multiplier) == (0.10, 20.0, 2.0)
    assert step_cache.cache_settings("first_block", 1.5).threshold == 0.06  # upstream's map
    assert step_cache.cache_settings("", 2.0) is None and step_cache.cache_settings(None) is None
    with pytest.raises(ValueError, match="Unknown step cache 'mag'"):
        step_cache.cache_settings("mag")
    with pytest.raises(ValueError, match="TeaCache has no speed multiplier 3.0: choose one of 1.5, 1.75"):
        step_cache.cache_settings("tea", 3.0)


# --------------------------------------------------------------------------------------- the DiT forward


@pytest.mark.parametrize("kind", ["tea", "first_block"])
def test_dit_rows_skip_or_run_independently(model, kind):
    dit = model.transformer
    g = torch.Generator().manual_seed(0)
    x, moved = torch.randn(2, 16, 1, 6, 8, generator=g), torch.randn(2, 16, 1, 6, 8, generator=g) * 3
    t, context = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.randn(2, 512, 32, generator=g)
    keys = ((0, "uncond"), (0, "cond"))
    cache = StepCacheRun(StepCacheSettings(kind, threshold=0.3))
    cache.start(4)
    first = dit(x, t, context, step_cache=cache.rows(keys))
    assert torch.equal(first, dit(x, t, context))  # nothing cached yet: exactly the uncached forward
    cache.begin_step(1)
    x2 = torch.cat([x[:1], moved[1:]])  # uncond unchanged (skips), cond moved a lot (runs)
    second = dit(x2, t, context, step_cache=cache.rows(keys))
    assert cache.counts[1].skipped == 1
    torch.testing.assert_close(second[:1], first[:1], rtol=0, atol=1e-5)  # the cached residual, same input
    torch.testing.assert_close(second[1:], dit(x2[1:], t[1:], context[1:]), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------- generate()


def test_cache_off_equals_no_cache_exactly(model):
    plain = run(model)
    assert set(plain) == {"x", "seed"}
    assert torch.equal(run(model, skip_steps_cache_type="")["x"], plain["x"])
    assert torch.equal(run(model, skip_steps_cache_type="", skip_steps_multiplier=2.5)["x"], plain["x"])


@pytest.mark.parametrize("kind", ["tea", "first_block"])
@pytest.mark.parametrize("sampler", ["er_sde", "heun"])
def test_threshold_zero_is_bit_identical_to_no_cache(model, host_cache, kind, sampler):
    plain = run(model, sample_solver=sampler)["x"]
    host_cache(cache_type=kind, threshold=0.0, multiplier=1.5)
    out = run(model, sample_solver=sampler)
    assert torch.equal(out["x"], plain)
    assert out["step_cache"].startswith(f"{registry.STEP_CACHES[kind].label} skipped 0 of 8 steps")


def test_a_cache_skips_reports_each_step_and_resets_per_generation(model):
    reports = []
    kw = dict(skip_steps_cache_type="tea", skip_steps_multiplier=2.5, sampling_steps=12,
              callback=lambda i, latent, force, **k: reports.append((i, k.get("denoising_extra"))))
    out = run(model, **kw)
    steps = [r for r in reports if r[0] >= 0]
    assert [i for i, _ in steps] == list(range(12)) and all(text.startswith("TeaCache: ") for _, text in steps)
    skipped = [i for i, text in steps if text.startswith("TeaCache: skipped")]
    assert skipped and 0 not in skipped and 11 not in skipped
    assert out["step_cache"].startswith(f"TeaCache skipped {len(skipped)} of 12 steps")
    assert steps[-1][1].endswith(f"({len(skipped)}/12 skipped)")
    assert not torch.equal(out["x"], run(model, sampling_steps=12)["x"])
    again = run(model, **kw)  # a fresh state: the same decisions and the same image
    assert torch.equal(again["x"], out["x"]) and again["step_cache"] == out["step_cache"]


def test_each_image_of_a_batch_has_its_own_cache(model):
    kw = dict(skip_steps_cache_type="tea", skip_steps_multiplier=2.5, sampling_steps=10)
    batch = run(model, batch_size=2, **kw)
    alone = run(model, seed=8, **kw)
    assert " skipped 0 " not in alone["step_cache"]
    assert torch.equal(batch["x"][:, 1], alone["x"][:, 0])


@pytest.mark.parametrize("kind", ["tea", "first_block"])
def test_a_cache_does_not_depend_on_the_default_device(model, kind):
    # mmgp leaves torch's default device on CUDA; "meta" stands in for it
    kw = dict(skip_steps_cache_type=kind, skip_steps_multiplier=2.5, sampling_steps=12, batch_size=2)
    expected = run(model, **kw)
    assert not expected["step_cache"].endswith("(0 of 48 DiT passes)")
    torch.set_default_device("meta")
    try:
        model._prompt_cache.clear()
        got = run(model, **kw)
    finally:
        torch.set_default_device(None)
    assert torch.equal(got["x"], expected["x"]) and got["step_cache"] == expected["step_cache"]


def test_heun_decides_per_model_call(model):
    out = run(model, sample_solver="heun", skip_steps_cache_type="tea", skip_steps_multiplier=2.5)
    # heun: 2 calls per step but 1 in the last, each with a cond and an uncond pass
    assert out["step_cache"].endswith(f"of {(2 * 7 + 1) * 2} DiT passes)")


def test_cache_with_cfg_truncation_and_a_lora(model, tmp_path):
    lora = write_tiny_lora(tmp_path / "style.safetensors")
    kw = dict(loras=[(lora, 1.0)], cfg_truncation=0.5)
    plain = run(model, **kw)["x"]
    out = run(model, skip_steps_cache_type="first_block", skip_steps_multiplier=1.5, **kw)
    # 4 guided steps with two passes, then 4 with the positive pass alone
    assert out["step_cache"].endswith("of 12 DiT passes)")
    model.transformer.cache = SimpleNamespace(cache_type="first_block", threshold=0.0)
    try:
        assert torch.equal(run(model, **kw)["x"], plain)
    finally:
        model.transformer.cache = None
        model._activate_loras("", [], None)  # the module's model goes on without the LoRA


# ---------------------------------------------------------------------------- upstream Wan2GP's wiring


def test_model_def_offers_the_caches_upstream_reads():
    definition = family_handler.query_model_def("anima", {})
    assert definition["tea_cache"] is True and definition["first_block_cache"] is True
    assert [m for _, m in definition["skip_steps_multiplier_choices"]] == [1.5, 1.75, 2.0, 2.25, 2.5]
    # upstream checks a First-Block Cache multiplier against this list
    assert definition["first_block_cache_thresholds"] == [1.5, 1.75, 2.0, 2.25, 2.5]
    assert [v for _, v in definition["skip_steps_cache_choices"]] == ["", "tea", "first_block"]


def test_set_cache_parameters_fills_upstreams_cache_object(model, host_cache):
    cache = SimpleNamespace(cache_type="tea", multiplier=2.0, start_step=6)
    family_handler.set_cache_parameters("tea", "anima", {}, {"skip_steps_start_step_perc": 20}, cache)
    assert cache.threshold == 0.10 and cache.start_step_perc == 20.0
    assert tuple(cache.coefficients) == registry.TEACACHE_COEFFICIENTS
    fbc = SimpleNamespace(cache_type="first_block", multiplier=2.5)
    family_handler.set_cache_parameters("first_block", "anima", {}, {}, fbc)
    assert fbc.threshold == 0.14 and not hasattr(fbc, "coefficients")
    with pytest.raises(ValueError, match="Anima has no step cache 'mag'"):
        family_handler.set_cache_parameters("mag", "anima", {}, {}, SimpleNamespace(multiplier=2.0))

    # what wgp then does: transformer.cache = that object, counters reset; generate reads it, fills them
    host_cache(**vars(cache), skipped_steps=0, num_steps=8)
    upstream = run(model)
    assert (model.transformer.cache.skipped_steps, model.transformer.cache.num_steps) == (
        int(upstream["step_cache"].split()[2]), 8)
    model.transformer.cache = None
    ours = run(model, skip_steps_cache_type="tea", skip_steps_multiplier=2.0, skip_steps_start_step_perc=20)
    assert torch.equal(upstream["x"], ours["x"]) and upstream["step_cache"] == ours["step_cache"]


def test_validation_names_the_bad_cache_setting():
    base = {"resolution": "1024x1024", "num_inference_steps": 30}
    check = family_handler.validate_generative_settings
    assert check("anima", {}, base | {"skip_steps_cache_type": "tea", "skip_steps_multiplier": 2.0}) is None
    assert check("anima", {}, base | {"skip_steps_cache_type": "", "skip_steps_multiplier": 9}) is None
    assert "no speed multiplier 1.6" in check("anima", {}, base | {"skip_steps_cache_type": "first_block",
                                                                    "skip_steps_multiplier": 1.6})
    assert "no step cache 'mag'" in check("anima", {}, base | {"skip_steps_cache_type": "mag"})
