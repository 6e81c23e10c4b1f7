"""The samplers against ComfyUI's loops (tests/comfy_loops.py, written from ComfyUI's formulas), bit for bit
in float32 on the CPU, and the Brownian-tree noise: ComfyUI's tree, reproducible, per image."""

import pytest
import torch
import torchsde

from models.anima import sampling, schedulers
from tests import comfy_loops

SHAPE = (16, 1, 6, 8)  # one image's latent [C, T, h, w]
# torchsde warns when float32 sigmas read back as doubles fall a hair outside the tree; ComfyUI does the same.
pytestmark = pytest.mark.filterwarnings("ignore:Should have t")


def toy_denoiser(x, sigma):
    """A smooth nonlinear x0(x, sigma), the same for a 0-dim sigma and ComfyUI's [B] sigma."""
    s = sigma.reshape(-1, *[1] * (x.ndim - 1)) if sigma.ndim else sigma
    return 0.8 * torch.tanh(x * (1.3 - s)) + 0.1 * x * s + 0.05 * torch.roll(x, 1, dims=-1)


def ours(name, sigmas, seed, batch_seeds=None):
    seeds = batch_seeds or [seed]
    noise = sampling.seeded_randn(seeds, SHAPE)
    x = sampling.start_latents(noise, sigmas)
    source = sampling.seeded_noise_source([s + 1 for s in seeds], x)
    return sampling.sample(name, toy_denoiser, x, sigmas, noise=source, seeds=seeds, shift=3.0)


def comfy(name, sigmas, seed):
    noise = torch.randn((1, *SHAPE), generator=torch.manual_seed(seed))
    return comfy_loops.ksampler(comfy_loops.LOOPS[name], toy_denoiser, noise, sigmas, seed)


@pytest.mark.parametrize("name", sorted(comfy_loops.LOOPS))
@pytest.mark.parametrize("scheduler,steps", [("simple", 9), ("karras", 6), ("beta57", 7), ("ddim_uniform", 5)])
def test_sampler_equals_comfyui_bit_for_bit(name, scheduler, steps):
    sigmas = schedulers.compute_sigmas(scheduler, steps, 3.0, name)
    assert torch.equal(ours(name, sigmas, seed=42), comfy(name, sigmas, seed=42))


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "lcm", "uni_pc"])
def test_batch_image_i_is_the_seed_plus_i_image_alone(name):
    sigmas = schedulers.compute_sigmas("simple", 6, 3.0, name)
    batch = ours(name, sigmas, seed=None, batch_seeds=[5, 6, 7])
    for i, seed in enumerate([5, 6, 7]):
        assert torch.equal(batch[i:i + 1], comfy(name, sigmas, seed))


def test_gpu_noise_variants_equal_the_cpu_tree_on_the_cpu():
    sigmas = schedulers.compute_sigmas("simple", 6)
    for name in ("dpmpp_2m_sde", "dpmpp_3m_sde"):
        assert torch.equal(ours(name + "_gpu", sigmas, seed=3), ours(name, sigmas, seed=3))


def test_brownian_noise_is_comfyuis_tree_reproducible_and_per_image():
    sigmas = sampling.offset_first_sigma(schedulers.compute_sigmas("simple", 8))
    like = torch.zeros(2, *SHAPE)
    draws = [sampling.brownian_noise_sampler([10, 11], like, schedulers.compute_sigmas("simple", 8))
             for _ in range(2)]
    alone = sampling.brownian_noise_sampler([11], like[:1], schedulers.compute_sigmas("simple", 8))
    full = schedulers.compute_sigmas("simple", 8)
    reference = comfy_loops.BrownianTree(like[:1], full[full > 0].min(), full.max(), seed=11)
    for sigma, sigma_next in zip(sigmas[:-2], sigmas[1:-1]):
        first, second = draws[0](sigma, sigma_next), draws[1](sigma, sigma_next)
        assert torch.equal(first, second)  # reproducible across runs
        assert torch.equal(first[1:], alone(sigma, sigma_next))  # image 1 = seed 11 alone
        assert torch.equal(first[1:], reference(sigma, sigma_next))  # ComfyUI's tree for seed 11
        assert not torch.equal(first[0], first[1])


def test_brownian_increments_are_independent_standard_normals():
    like = torch.zeros(1, 16, 1, 32, 32)
    sigmas = torch.tensor([1.0, 0.7, 0.4, 0.1, 0.0])
    draw = sampling.brownian_noise_sampler([123], like, sigmas)
    a, b = draw(sigmas[0], sigmas[1]).flatten(), draw(sigmas[1], sigmas[2]).flatten()
    for n in (a, b):  # 16384 samples: standard errors 0.008 (mean, correlation) and 0.0055 (std)
        assert abs(n.mean().item()) < 0.035 and abs(n.std().item() - 1) < 0.025
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.035
    # the tree is additive: the increment over the union is the sum of the increments
    whole = draw(sigmas[0], sigmas[2]) * (sigmas[0] - sigmas[2]).sqrt()
    parts = draw(sigmas[0], sigmas[1]) * (sigmas[0] - sigmas[1]).sqrt() + draw(sigmas[1], sigmas[2]) * (
        sigmas[1] - sigmas[2]).sqrt()
    assert torch.allclose(whole, parts, atol=1e-4)


def test_brownian_samplers_need_seeds():
    x = torch.zeros(1, *SHAPE)
    with pytest.raises(ValueError, match="one seed per image"):
        sampling.sample("dpmpp_2m_sde", toy_denoiser, x, schedulers.compute_sigmas("simple", 3),
                        noise=sampling.seeded_noise_source([1], x))


def test_torchsde_version_is_the_pinned_one():
    assert torchsde.__version__ == "0.2.6"  # ComfyUI's trees depend on torchsde's algorithm
