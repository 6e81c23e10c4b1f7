"""Image inputs of `generate()` (models/anima/image_inputs.py): img2img with ComfyUI's denoise, masked denoising
as ComfyUI's KSamplerX0Inpaint, Wan2GP's masking_strength and the hires-fix pass. The sampling pieces are
checked against ComfyUI's KSampler written from its formulas (bit for bit in float32), the whole pipeline on
tiny real-format checkpoints."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.anima import image_inputs, sampling, schedulers
from models.anima.anima_handler import family_handler
from tests import comfy_loops
from tests.test_sampler_parity import toy_denoiser
from tests.tiny_ckpts import DIT_FILE

pytestmark = [pytest.mark.filterwarnings("ignore:Should have t"), pytest.mark.usefixtures("one_thread")]
PROMPT, NEGATIVE = "a cat sitting on a red sofa", "worst quality"
WIDTH, HEIGHT = 64, 48  # latents 8 x 6


@pytest.fixture(scope="module")
def model(ckpts):
    return family_handler.load_model([str(ckpts / DIT_FILE)])[0]


def source_image(width=WIDTH, height=HEIGHT, seed=3):
    """A random 8-bit image as Wan2GP passes it: [3, 1, H, W] float in [-1, 1]."""
    pixels = torch.randint(0, 256, (3, 1, height, width), generator=torch.Generator().manual_seed(seed))
    return pixels.float() / 255.0 * 2.0 - 1.0


def right_half_mask(width=WIDTH, height=HEIGHT):
    """Repaint x >= 32: aligned to the 8-pixel latent cells, so the latent mask is exactly 0 or 1."""
    mask = torch.zeros(1, 1, height, width)
    mask[..., width // 2:] = 1.0
    return mask


def run(model, **kw):
    args = dict(input_prompt=PROMPT, n_prompt=NEGATIVE, sampling_steps=4, seed=7, width=WIDTH, height=HEIGHT,
                guide_scale=3.0) | kw
    return model.generate(**args)


class Recorder:
    """Records the callback's step reports and the latents the VAE is asked to decode."""

    def __init__(self, model, monkeypatch):
        self.steps, self.totals, self.decoded = [], [], []
        decode = model.vae.decode

        def recording_decode(latents, **kw):
            self.decoded.append(latents.float().clone())
            return decode(latents, **kw)

        monkeypatch.setattr(model.vae, "decode", recording_decode)

    def __call__(self, step, latent=None, force=False, override_num_inference_steps=-1, **kw):
        if override_num_inference_steps >= 0:
            self.totals.append(override_num_inference_steps)
        if step >= 0:
            self.steps.append(step)


def source_latents(model, pixels):
    return model.vae.encode(pixels.transpose(0, 1).double()).float()[:, :, None]  # [1, 16, 1, h, w]


# ------------------------------------------------------------------------------------ ComfyUI's KSampler


def comfy_sigmas(scheduler, steps, denoise, sampler, shift=3.0):
    """KSampler.set_steps."""
    if denoise > 0.9999:
        return schedulers.compute_sigmas(scheduler, steps, shift, sampler)
    return schedulers.compute_sigmas(scheduler, int(steps / denoise), shift, sampler)[-(steps + 1):]


def comfy_reshape_mask(mask, shape):
    """comfy.utils.reshape_mask for a 5-D latent, from SetLatentNoiseMask's [B, 1, H, W]."""
    mask = mask.reshape((1, 1, -1, mask.shape[-2], mask.shape[-1]))
    mask = F.interpolate(mask, size=shape[2:], mode="trilinear")
    return mask.repeat((1, shape[1], 1, 1, 1))


def comfy_ksampler(loop, model, noise, sigmas, seed, latent, denoise_mask=None, shift=3.0):
    """KSAMPLER.sample with a latent image and KSamplerX0Inpaint around the model; the latents before
    process_latent_out."""
    def model_k(x, sigma):
        if denoise_mask is not None:
            latent_mask = 1.0 - denoise_mask
            s = sigma.reshape([sigma.shape[0]] + [1] * (noise.ndim - 1))
            x = x * denoise_mask + (s * noise + (1.0 - s) * latent) * latent_mask
        out = model(x, sigma)
        if denoise_mask is not None:
            out = out * denoise_mask + latent * latent_mask
        return out

    x = sigmas[0] * noise + (1.0 - sigmas[0]) * latent
    out = loop(model_k, x, sigmas, seed, shift)
    return out / (1.0 - sigmas[-1])


def ours(name, schedule, seed, latent, pixel_mask=None):
    shape = tuple(latent.shape[1:])
    noise = sampling.seeded_randn([seed], shape)
    x = sampling.start_latents(noise, schedule.sigmas, latent)
    denoise = toy_denoiser
    if pixel_mask is not None:
        mask = image_inputs.latent_mask(pixel_mask, latent.shape)
        denoise = image_inputs.masked_denoiser(toy_denoiser, latent, noise, mask, lambda: True)
    source = sampling.seeded_noise_source([seed + 1], x)
    return sampling.sample(name, denoise, x, schedule.sigmas, noise=source, seeds=[seed], shift=3.0)


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m_sde", "uni_pc", "lcm"])
@pytest.mark.parametrize("steps,denoise", [(6, 0.6), (5, 1.0), (4, 0.35)])
@pytest.mark.parametrize("masked", [False, True])
def test_img2img_and_inpainting_equal_comfyuis_ksampler_bit_for_bit(name, steps, denoise, masked):
    latent = torch.randn(1, 16, 1, 6, 8, generator=torch.Generator().manual_seed(1))
    pixel_mask = torch.zeros(1, 1, 48, 64)
    pixel_mask[..., 10:37, 21:50] = 1.0  # edges off the 8-pixel grid: a soft latent mask
    schedule = image_inputs.denoise_schedule("simple", steps, 3.0, name, denoise)
    expected_sigmas = comfy_sigmas("simple", steps, denoise, name)
    assert torch.equal(schedule.sigmas, expected_sigmas)
    noise = torch.randn(latent.size(), generator=torch.manual_seed(42))
    mask = comfy_reshape_mask(pixel_mask, latent.shape) if masked else None
    expected = comfy_ksampler(comfy_loops.LOOPS[name], toy_denoiser, noise, expected_sigmas, 42, latent, mask)
    assert torch.equal(ours(name, schedule, 42, latent, pixel_mask if masked else None), expected)


@pytest.mark.parametrize("steps,denoise,full_steps,first_sigma", [
    (30, 0.6, 50, 1.8 / 2.2),  # simple schedule of 50 steps, entry 20: table[599] = shift(0.6)
    (4, 0.5, 8, 0.75),  # table[499] = shift(0.5)
    (10, 0.3, 33, 3 * 0.304 / (1 + 2 * 0.304)),  # int(10 / 0.3) = 33; entry 23: table[999 - 696]
    (5, 1.0, 5, 1.0),
    (7, 0.99995, 7, 1.0),  # above 0.9999 ComfyUI runs the whole schedule
])
def test_denoise_picks_the_last_steps_of_a_longer_schedule(steps, denoise, full_steps, first_sigma):
    schedule = image_inputs.denoise_schedule("simple", steps, 3.0, "er_sde", denoise)
    assert schedule.steps == steps and schedule.full_steps == full_steps
    assert schedule.first_step == full_steps - steps
    assert schedule.sigmas[0].item() == pytest.approx(first_sigma, abs=1e-6) and schedule.sigmas[-1] == 0


def test_denoise_zero_runs_no_step():
    assert image_inputs.denoise_schedule("simple", 8, 3.0, "euler", 0.0).steps == 0


def test_the_latent_mask_is_resized_as_comfyui_resizes_it():
    mask = torch.zeros(1, 1, 16, 24)
    mask[..., 12:] = 1.0  # an edge in the middle of latent column 1 (pixels 8..15)
    grid = image_inputs.latent_mask(mask, (1, 16, 1, 2, 3))
    assert grid.shape == (1, 16, 1, 2, 3)
    # column j samples pixel 8j + 3.5, between pixels 8j + 3 and 8j + 4: no rounding, the edge stays soft
    assert grid[0, 0, 0, 0].tolist() == [0.0, 0.5, 1.0]
    assert torch.equal(grid[:, :1, 0], F.interpolate(mask, size=(2, 3), mode="bilinear"))
    assert image_inputs.masked_steps(30, 0.5) == 15 and image_inputs.masked_steps(7, 0.3) == 3


# -------------------------------------------------------------------------------------- generate()


def test_denoise_one_without_a_mask_is_text_to_image(model):
    expected = run(model)["x"]
    assert torch.equal(run(model, input_frames=source_image(), denoising_strength=1.0)["x"], expected)


def test_img2img_runs_the_steps_it_reports_from_the_noised_source(model, monkeypatch):
    calls = []
    forward = model.transformer.forward
    monkeypatch.setattr(model.transformer, "forward",
                        lambda x, t, c, **kw: calls.append((x, t)) or forward(x, t, c, **kw))
    recorder = Recorder(model, monkeypatch)
    pixels = source_image()
    out = run(model, input_frames=pixels, denoising_strength=0.5, sample_solver="euler", callback=recorder)
    assert recorder.totals == [4] and recorder.steps == [0, 1, 2, 3]
    assert len(calls) == 4  # one CFG pair per step
    x, t = calls[0]
    sigma = image_inputs.denoise_schedule("simple", 4, 3.0, "euler", 0.5).sigmas[0]
    assert t[0].item() == pytest.approx(sigma.item()) and sigma.item() == pytest.approx(0.75)
    noise = sampling.seeded_randn([7], (16, 1, HEIGHT // 8, WIDTH // 8))
    assert torch.equal(x[:1], sigma * noise + (1.0 - sigma) * source_latents(model, pixels))
    assert out["x"].shape == (3, 1, HEIGHT, WIDTH)


def test_denoise_zero_decodes_the_source(model, monkeypatch):
    recorder = Recorder(model, monkeypatch)
    pixels = source_image()
    run(model, input_frames=pixels, denoising_strength=0.0, callback=recorder)
    assert recorder.totals == [0] and recorder.steps == []
    assert torch.equal(recorder.decoded[0], source_latents(model, pixels))


@pytest.mark.parametrize("solver", ["er_sde", "euler_a", "dpmpp_2m_sde"])
def test_outside_a_hard_mask_the_final_latent_is_the_source(model, monkeypatch, solver):
    recorder = Recorder(model, monkeypatch)
    pixels = source_image()
    run(model, input_frames=pixels, input_masks=right_half_mask(), denoising_strength=0.8, sample_solver=solver,
        callback=recorder)
    final, source = recorder.decoded[0], source_latents(model, pixels)
    assert torch.equal(final[..., :4], source[..., :4])  # latent columns 0-3 = pixels 0-31: kept
    assert (final[..., 4:] - source[..., 4:]).abs().mean() > 0.1  # the masked half was repainted


def test_masking_strength_keeps_the_unmasked_area_for_its_first_steps_only(model, monkeypatch):
    calls = []
    forward = model.transformer.forward
    monkeypatch.setattr(model.transformer, "forward",
                        lambda x, t, c, **kw: calls.append(x[:1].clone()) or forward(x, t, c, **kw))
    pixels, steps = source_image(), 6
    run(model, input_frames=pixels, input_masks=right_half_mask(), denoising_strength=1.0, masking_strength=0.5,
        sampling_steps=steps, sample_solver="euler")
    schedule = image_inputs.denoise_schedule("simple", steps, 3.0, "euler")
    noise = sampling.seeded_randn([7], (16, 1, HEIGHT // 8, WIDTH // 8))
    source = source_latents(model, pixels)
    pinned = [torch.equal(x[..., :4], (s * noise + (1.0 - s) * source)[..., :4])
              for x, s in zip(calls, schedule.sigmas)]
    assert pinned == [True] * 3 + [False] * 3  # ceil(6 * 0.5) steps


def test_masking_strength_zero_is_plain_img2img(model):
    pixels = source_image()
    plain = run(model, input_frames=pixels, denoising_strength=0.7)["x"]
    assert torch.equal(run(model, input_frames=pixels, input_masks=right_half_mask(), denoising_strength=0.7,
                           masking_strength=0.0)["x"], plain)


def test_an_empty_mask_or_the_identity_letter_is_img2img(model):
    pixels = source_image()
    plain = run(model, input_frames=pixels, denoising_strength=0.7)["x"]
    empty = torch.zeros(1, 1, HEIGHT, WIDTH)
    assert torch.equal(run(model, input_frames=pixels, input_masks=empty, denoising_strength=0.7)["x"], plain)
    assert torch.equal(run(model, input_frames=pixels, input_masks=right_half_mask(), denoising_strength=0.7,
                           video_prompt_type="GUV")["x"], plain)


def test_batch_image_i_equals_seed_plus_i_alone_with_a_mask(model):
    settings = dict(input_frames=source_image(), input_masks=right_half_mask(), denoising_strength=0.6,
                    sample_solver="euler_a")
    batch = run(model, batch_size=2, **settings)["x"]
    assert torch.equal(batch[:, 1:], run(model, seed=8, **settings)["x"])
    assert not torch.equal(batch[:, 0], batch[:, 1])


def test_hires_equals_img2img_on_the_upscaled_first_image(model, monkeypatch):
    recorder = Recorder(model, monkeypatch)
    hires = run(model, batch_size=2, hires_scale=1.5, hires_denoise=0.6, hires_steps=3, callback=recorder)["x"]
    assert hires.shape == (3, 2, 80, 96)  # 72 rounds half up to 80
    assert recorder.totals == [4 + 3] and recorder.steps == list(range(7))
    for i in range(2):
        first = run(model, seed=7 + i)["x"]  # [3, 1, 48, 64] uint8
        upscaled = Image.fromarray(first[:, 0].permute(1, 2, 0).numpy()).resize((96, 80), Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(np.asarray(upscaled).copy()).permute(2, 0, 1)[:, None]
        again = run(model, seed=7 + i, width=96, height=80, sampling_steps=3, denoising_strength=0.6,
                    input_frames=pixels.float() / 255.0 * 2.0 - 1.0)["x"]
        assert torch.equal(hires[:, i:i + 1], again)


def test_hires_sizes_are_multiples_of_16_and_past_1_5x_warns(model, capsys):
    assert image_inputs.hires_size(1024, 1024, 1.5) == (1536, 1536)
    assert image_inputs.hires_size(832, 1216, 1.3) == (1088, 1584)  # 1081.6 -> 1088, 1580.8 -> 1584
    run(model, sampling_steps=1, hires_scale=1.5, hires_steps=1)
    assert "degrades" not in capsys.readouterr().out
    run(model, sampling_steps=1, hires_scale=2.0, hires_steps=1)
    assert "Anima degrades past about 1.5x" in capsys.readouterr().out


def test_hires_settings_may_come_in_custom_settings(model):
    expected = run(model, sampling_steps=2, hires_scale=1.25, hires_denoise=0.4)["x"]
    got = run(model, sampling_steps=2, custom_settings={"hires_scale": 1.25, "hires_denoise": 0.4})["x"]
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kwargs,message", [
    (dict(denoising_strength=1.5), "denoising_strength must be between 0 and 1"),
    (dict(denoising_strength=float("nan")), "denoising_strength must be between 0 and 1"),
    (dict(masking_strength=-0.1), "masking_strength must be between 0 and 1"),
    (dict(input_frames=source_image(32, 32)), "input_frames is 32x32 but the image is 64x48"),
    (dict(input_frames=torch.zeros(3, 2, HEIGHT, WIDTH)), r"one image \[3, 1, H, W\]"),
    (dict(input_frames=source_image() * 2), r"pixels in \[-1, 1\]"),
    (dict(input_frames=source_image(), input_masks=torch.ones(1, 1, 8, 8)), "input_masks is 8x8"),
    (dict(input_frames=source_image(), input_masks=right_half_mask() * 2), r"values in \[0, 1\]"),
    (dict(hires_scale=0.5), "hires_scale must be above 1 and at most 4"),
    (dict(hires_scale=1.5, hires_denoise=2), "hires_denoise must be between 0 and 1"),
    (dict(hires_scale=1.5, hires_upscaler="latent"), "Unknown hires upscaler 'latent'"),
])
def test_bad_image_inputs_are_clear_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(model, **kwargs)


def test_image_inputs_do_not_depend_on_the_default_device(model):
    settings = dict(input_frames=source_image(), input_masks=right_half_mask(), denoising_strength=0.6,
                    sampling_steps=2, hires_scale=1.25, hires_steps=1, batch_size=2)
    expected = run(model, **settings)["x"]
    torch.set_default_device("meta")
    try:
        got = run(model, **settings)["x"]
    finally:
        torch.set_default_device(None)
    assert torch.equal(got, expected)


def test_masked_steps_round_up():
    assert [image_inputs.masked_steps(4, m) for m in (0.0, 0.1, 0.25, 0.26, 1.0)] == [0, 1, 1, 2, 4]
    assert image_inputs.masked_steps(3, 1 / 3) == math.ceil(3 * (1 / 3))


def test_img2img_keeps_upstreams_lora_steps_on_the_full_schedule(model, monkeypatch):
    import sys
    import types

    updates, steps = [], []
    helpers = types.SimpleNamespace(update_loras_slists=lambda trans, slists, n: updates.append(n))
    mmgp_offload = types.SimpleNamespace(set_step_no_for_lora=lambda trans, i: steps.append(i))
    monkeypatch.setitem(sys.modules, "shared.utils.loras_mutipliers", helpers)
    monkeypatch.setitem(sys.modules, "mmgp", types.SimpleNamespace(offload=mmgp_offload))
    monkeypatch.setitem(sys.modules, "mmgp.offload", mmgp_offload)
    monkeypatch.setattr(model.transformer, "_loras_model_data", {}, raising=False)
    run(model, sampling_steps=4, input_frames=source_image(), denoising_strength=0.5, loras_slists={"phase1": []},
        hires_scale=1.25, hires_steps=2, hires_denoise=0.5)
    # 4 steps of an 8-step schedule (steps 4-7), then the hires pass: 2 steps of a 4-step schedule (2-3)
    assert updates == [8, 4] and steps == [4, 5, 6, 7, 2, 3]


def test_the_model_definition_shows_upstreams_image_inputs():
    model_def = family_handler.query_model_def("anima", {})
    assert model_def["inpaint_support"] is True and model_def["inpaint_video_prompt_type"] == "VAG"
    assert model_def["video_guide_outpainting"] == [2] and model_def["outpainting_quantize_margins"] == 16
    assert model_def["model_modes"]["image_modes"] == [2] and model_def["model_modes"]["default"] == 0
    # a guide choice makes upstream render the Denoising / Mask sliders; its letters are the two img2img modes
    choices = model_def["guide_custom_choices_image"]
    assert [letters for _, letters in choices["choices"]] == ["", "GUV", "GVA"] and choices["letters_filter"] == "GUVA"
    assert model_def["inpaint_color"] == "7F7F7F" and model_def["custom_denoising_strength"] is True
    hires = {s["id"]: s for s in model_def["custom_settings"]}  # upstream's custom slots, read by generate()
    # upstream shows at most five (its CUSTOM_SETTINGS_MAX): the scheduler, CFG truncation and the hires fix
    assert list(hires) == ["scheduler", "cfg_truncation", "hires_scale", "hires_denoise", "hires_steps"]
    assert hires["hires_scale"]["default"] == 1.0
    hires = {key: hires[key] for key in ("hires_scale", "hires_denoise", "hires_steps")}
    assert all({"min", "max", "inc"} <= set(s) for s in hires.values())  # upstream renders them as sliders
    settings = {"image_mode": 2, "sample_solver": "euler"}
    family_handler.fix_settings("anima", 2.74, model_def, settings)
    assert settings["image_mode"] == 2  # the inpainting tab is kept
    settings = {"image_mode": 0}
    family_handler.fix_settings("anima", 2.74, model_def, settings)
    assert settings["image_mode"] == 1
