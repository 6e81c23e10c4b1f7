"""The image VAE against diffusers' AutoencoderKLQwenImage (the Wan 2.1 VAE as Qwen-Image ships it).

Reference decode: z * std + mean on [B,16,1,h,w] (spec §6.2 process_out), `decode`, frame 0. Reference
encode: posterior mode of [B,3,1,H,W], frame 0, then (mu - mean) / std. mean/std come from diffusers'
config, so they are checked too.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models.anima.vae as vae_module
from models.anima.vae import UpsampleConv, load_vae, phase_kernels
from models.anima.weights import WeightsError
from tests.tiny_dit import make_dit_state_dict
from tests.tiny_vae import make_vae_state_dict, vae_file_shapes, write_vae_file

ROOT = Path(__file__).resolve().parents[1]
FP32_TOLERANCE = 1e-5  # relative L2 error against diffusers in fp32
# Tiled against untiled, 256x256 image in 192-pixel tiles. The fixture's random attention weights average
# over the whole image (real ones are far more local), so every tile boundary shows; seen: 43.9 dB, 0.053.
TILED_DECODE_MIN_PSNR_DB = 40.0  # images in [-1, 1]: PSNR = 10 log10(2^2 / MSE)
TILED_ENCODE_MAX_ERROR = 0.08  # relative L2 error of the latents


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def diffusers_vae(sd, dtype=torch.float32):
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with torch.device("meta"):
        # dim_mult as a list: diffusers 0.36 (upstream Wan2GP's pin) fails on its own tuple default
        ref = AutoencoderKLQwenImage(base_dim=sd["decoder.head.0.gamma"].shape[0], dim_mult=[1, 2, 4, 4])
    ref.load_state_dict({k: v.to(dtype) for k, v in convert_wan_vae_to_diffusers(sd).items()}, assign=True)
    return ref.eval().requires_grad_(False)


def latent_stats(ref):
    mean = torch.tensor(ref.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, 16, 1, 1, 1)
    return mean, std


@torch.no_grad()
def reference_decode(ref, latents):
    mean, std = latent_stats(ref)
    z = (latents.float()[:, :, None] * std + mean).to(ref.dtype)
    return ref.decode(z).sample[:, :, 0]


@torch.no_grad()
def reference_encode(ref, images):
    mean, std = latent_stats(ref)
    mu = ref.encode(images.to(ref.dtype)[:, :, None]).latent_dist.mode().float()
    return ((mu - mean) / std)[:, :, 0]


@pytest.fixture(scope="module")
def tiny_sd():
    return make_vae_state_dict(base_dim=8)


@pytest.fixture(scope="module")
def reference(tiny_sd):
    return diffusers_vae(tiny_sd)


@pytest.fixture(scope="module")
def vae(tiny_sd):
    return load_vae(tiny_sd)


def random_images(b, h, w, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def random_latents(b, h, w, seed=0):
    return torch.randn(b, 16, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def decode_case(reference):
    latents = random_latents(2, 5, 7)
    return latents, reference_decode(reference, latents)


@pytest.fixture(scope="module")
def encode_case(reference):
    images = random_images(2, 40, 56)
    return images, reference_encode(reference, images)


# 5000 elements: bands of 11 rows (the last one shorter) in the full-resolution layers
@pytest.mark.parametrize("band_elements", [vae_module.BAND_ELEMENTS, 5000], ids=["whole", "row-bands"])
def test_decode_matches_diffusers_fp32_on_odd_latent_sizes(vae, decode_case, monkeypatch, band_elements):
    monkeypatch.setattr(vae_module, "BAND_ELEMENTS", band_elements)
    latents, expected = decode_case
    images = vae.decode(latents[:, :, None])  # [B, 16, 1, h, w], as ComfyUI-style latents come
    assert images.shape == (2, 3, 40, 56) and images.dtype == torch.float32
    assert 0.05 < expected.std() and expected.abs().max() < 1  # well-scaled fixture: not flat, not clamped
    assert rel_err(images, expected) <= FP32_TOLERANCE


@pytest.mark.parametrize("band_elements", [vae_module.BAND_ELEMENTS, 5000], ids=["whole", "row-bands"])
def test_encode_matches_diffusers_fp32(vae, encode_case, monkeypatch, band_elements):
    monkeypatch.setattr(vae_module, "BAND_ELEMENTS", band_elements)
    images, expected = encode_case
    latents = vae.encode(images)
    assert latents.shape == (2, 16, 5, 7)
    assert rel_err(latents, expected) <= FP32_TOLERANCE


def test_real_width_96_matches_diffusers_fp32():
    sd = make_vae_state_dict(base_dim=96, seed=1)
    ours, ref = load_vae(sd), diffusers_vae(sd)
    assert ours.config.base_dim == 96
    latents = random_latents(1, 3, 5)
    assert rel_err(ours.decode(latents), reference_decode(ref, latents)) <= FP32_TOLERANCE
    images = random_images(1, 24, 40)
    assert rel_err(ours.encode(images), reference_encode(ref, images)) <= FP32_TOLERANCE


def test_bf16_error_is_that_of_diffusers_in_bf16(tiny_sd, reference):
    ours = load_vae(tiny_sd, dtype=torch.bfloat16)
    ref_bf16 = diffusers_vae(tiny_sd, torch.bfloat16)
    latents, images = random_latents(1, 4, 5, seed=2), random_images(1, 32, 40, seed=2)
    decoded = ours.decode(latents)
    assert decoded.dtype == torch.bfloat16
    exact = reference_decode(reference, latents)
    assert rel_err(decoded, exact) <= 2 * rel_err(reference_decode(ref_bf16, latents), exact) < 0.05
    exact = reference_encode(reference, images)
    assert rel_err(ours.encode(images), exact) <= 2 * rel_err(reference_encode(ref_bf16, images), exact) < 0.05


def test_upsample_conv_equals_nearest_upsample_then_conv():
    g = torch.Generator().manual_seed(3)
    x, weight, bias = torch.randn(2, 6, 5, 7, generator=g), torch.randn(4, 6, 3, 3, generator=g), torch.randn(4)
    conv = UpsampleConv(6, 4)
    conv.load_state_dict({"weight": phase_kernels(weight), "bias": bias})
    expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"), weight, bias, padding=1)
    assert rel_err(conv(x), expected) <= 1e-6


def upsample8(t):
    return t.repeat_interleave(8, -2).repeat_interleave(8, -1)


def downsample8(t):
    return F.avg_pool2d(t, 8)


@pytest.mark.parametrize("height,width,tile", [(40, 40, 16), (37, 23, 12), (9, 30, 8)])
@pytest.mark.parametrize("fn,in_scale,out_scale", [(upsample8, 1, 8), (downsample8, 8, 1)], ids=["up", "down"])
def test_tiling_reproduces_a_per_latent_function_exactly(height, width, tile, fn, in_scale, out_scale):
    # blend weights that sum to 1 everywhere give back fn(x) when fn has no spatial context
    x = torch.randn(1, 2, height * in_scale, width * in_scale)
    assert torch.allclose(vae_module._tiled(fn, x, tile, in_scale, out_scale), fn(x), atol=1e-6)


def budget_for_tile(pixels: int, base_dim: int = 8) -> float:
    """Free memory for which the automatic tile edge of an fp32 VAE is `pixels`."""
    peak = pixels * pixels * vae_module.PEAK_BYTES_PER_PIXEL_CHANNEL * base_dim * 4
    return peak / vae_module.MEMORY_BUDGET_FRACTION


def test_tile_edge_is_chosen_from_free_memory(vae, monkeypatch):
    monkeypatch.setattr(vae_module, "free_memory", lambda device: 1 << 40)
    assert vae._tile_latents(4096, 4096, None) is None
    monkeypatch.setattr(vae_module, "free_memory", lambda device: budget_for_tile(128))
    assert vae._tile_latents(120, 136, None) is None  # fits in one pass
    assert vae._tile_latents(192, 192, None) == 16
    monkeypatch.setattr(vae_module, "free_memory", lambda device: budget_for_tile(16))
    assert vae._tile_latents(192, 192, None) == vae_module.MIN_TILE_LATENTS


def test_tiled_decode_and_encode_stay_close_to_untiled(vae, monkeypatch):
    latents = random_latents(1, 32, 32, seed=4)
    untiled = vae.decode(latents)
    untiled_latents = vae.encode(untiled)
    monkeypatch.setattr(vae_module, "free_memory", lambda device: budget_for_tile(192))
    tiled = vae.decode(latents)  # automatic tiles of 192 pixels
    psnr = 10 * math.log10(4 / F.mse_loss(tiled, untiled).item())
    assert TILED_DECODE_MIN_PSNR_DB <= psnr < 100  # < 100: the tiles really were decoded apart
    assert rel_err(vae.encode(untiled, tile_size=192), untiled_latents) <= TILED_ENCODE_MAX_ERROR


MEMORY_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)  # single thread: fast on a busy machine, and memory does not depend on it
from models.anima.vae import load_vae

def status_kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

def peak_growth_kib(fn):
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak RSS, to the current RSS
    start = status_kib("VmRSS:")
    fn()
    return status_kib("VmHWM:") - start

vae, latents = load_vae(sys.argv[1]), torch.randn(1, 16, 128, 128)
# tiled first: memory it leaves cached in the allocator can only make the untiled peak look smaller
tiled = peak_growth_kib(lambda: vae.decode(latents, tile_size=256))
print(json.dumps({"tiled": tiled, "untiled": peak_growth_kib(lambda: vae.decode(latents))}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_tiling_lowers_peak_memory(tmp_path):
    # peak RSS of a fresh process (getrusage's ru_maxrss would include the forked parent's RSS)
    path = write_vae_file(tmp_path / "vae.safetensors", base_dim=8)
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(path)], cwd=ROOT, capture_output=True,
                            text=True, check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    peaks = json.loads(result.stdout)
    # one full-resolution activation of this 1024x1024 decode is 8 channels * 4 B * 1024^2 = 32 MiB
    assert peaks["untiled"] > 2 * 32 * 1024
    assert peaks["tiled"] < 0.5 * peaks["untiled"]


@pytest.mark.parametrize("call,match", [
    (lambda v: v.decode(torch.randn(1, 4, 8, 8)), r"\[B, 16, h, w\]"),
    (lambda v: v.decode(torch.randn(1, 16, 2, 8, 8)), "2 frames"),
    (lambda v: v.decode(torch.randn(16, 8, 8)), r"\[B, 16, h, w\]"),
    (lambda v: v.encode(torch.rand(1, 4, 16, 16)), r"RGB \[B, 3, H, W\]"),
    (lambda v: v.encode(torch.rand(1, 3, 42, 64)), "64x42 is not a multiple of 8.*64x40"),
    (lambda v: v.decode(torch.randn(1, 16, 8, 8), tile_size=32), "at least 64 pixels"),
])
def test_bad_inputs_raise_clear_value_errors(vae, call, match):
    with pytest.raises(ValueError, match=match):
        call(vae)


def test_loads_file_inferring_width_and_keeping_only_last_temporal_tap(tmp_path):
    sd = make_vae_state_dict(base_dim=16, seed=6)
    path = tmp_path / "vae.safetensors"
    from safetensors.torch import save_file

    save_file({f"first_stage_model.{k}": v for k, v in sd.items()}, str(path))
    loaded = load_vae(path)
    assert loaded.config.base_dim == 16
    params = dict(loaded.named_parameters())
    assert not any("time_conv" in k for k in params) and all(p.ndim <= 4 for p in params.values())
    kernel = sd["decoder.upsamples.0.residual.2.weight"]
    assert torch.equal(params["decoder.upsamples.0.residual.2.weight"], kernel[:, :, -1].float())
    def kept(key, shape):  # 5-D kernels keep one of 3 taps; upsampling kernels become 4 phases of 2x2
        if "time_conv" in key:
            return 0
        if key.endswith("resample.1.weight") and key.startswith("decoder"):
            return math.prod(shape) * 16 // 9
        return math.prod(shape) // (shape[2] if len(shape) == 5 else 1)

    assert sum(p.numel() for p in params.values()) == sum(kept(k, s) for k, s in vae_file_shapes(16).items())


def test_wrong_files_raise_weights_errors(tmp_path, tiny_sd):
    with pytest.raises(WeightsError, match="Anima DiT"):
        load_vae(make_dit_state_dict())
    missing = {k: v for k, v in tiny_sd.items() if k != "decoder.upsamples.3.time_conv.weight"}
    with pytest.raises(WeightsError, match=r"1 missing key\(s\): decoder.upsamples.3.time_conv.weight"):
        load_vae(missing)
    reshaped = dict(tiny_sd, **{"encoder.conv1.weight": torch.zeros(8, 3, 3, 3)})
    with pytest.raises(WeightsError, match=r"encoder.conv1.weight \(8, 3, 3, 3\) \(expected \(8, 3, 3, 3, 3\)\)"):
        load_vae(reshaped)
    wan22 = dict(tiny_sd, **{"decoder.upsamples.0.upsamples.0.residual.2.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="is a Wan 2.2 VAE"):
        load_vae(wan22)
    not_weights = tmp_path / "vae.safetensors"
    not_weights.write_text("hello")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_vae(not_weights)
