"""Schedule values against anima_reference.md §5.3, and every sampler on data whose exact flow is known."""

import math

import pytest
import torch

from models.anima import registry, sampling

# anima_reference.md §5.3: table indices and sigmas of ComfyUI's `simple` schedule, 30 steps, shift 3.
SPEC_INDICES_30 = [999, 966, 933, 899, 866, 833, 799, 766, 733, 699, 666, 633, 599, 566, 533, 499, 466, 433,
                   399, 366, 333, 299, 266, 233, 199, 166, 133, 99, 66, 33]
SPEC_SIGMAS_30 = [1.0, 0.98875, 0.97699, 0.96429, 0.95135, 0.93778, 0.92308, 0.90805, 0.89222, 0.875, 0.85733,
                  0.83862, 0.81818, 0.79709, 0.77466, 0.75, 0.72441, 0.697, 0.66667, 0.63495, 0.60072, 0.5625,
                  0.52216, 0.4782, 0.42857, 0.37556, 0.31703, 0.25, 0.17725, 0.09551, 0.0]


def shifted(shift, t):
    return shift * t / (1 + (shift - 1) * t)


def test_simple_schedule_30_steps_equals_spec():
    sigmas = sampling.simple_schedule(30, 3.0)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (31,)
    assert torch.allclose(sigmas, torch.tensor(SPEC_SIGMAS_30), atol=5e-6, rtol=0)
    expected = [shifted(3.0, (i + 1) / 1000) for i in SPEC_INDICES_30] + [0.0]
    assert torch.allclose(sigmas.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-7, rtol=0)


@pytest.mark.parametrize("steps,shift", [(1, 3.0), (8, 3.0), (20, 1.0), (50, 5.0), (1000, 3.0)])
def test_simple_schedule_other_steps_follow_the_formula(steps, shift):
    indices = [999 - int(i * 1000 / steps) for i in range(steps)]
    expected = torch.tensor([shifted(shift, (i + 1) / 1000) for i in indices] + [0.0], dtype=torch.float64)
    sigmas = sampling.simple_schedule(steps, shift)
    assert torch.allclose(sigmas.double(), expected, atol=2e-7, rtol=0)  # float32 rounding of t and sigma
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert torch.all(sigmas[1:] <= sigmas[:-1])


def test_sigma_table_ends_and_identity_shift():
    table = sampling.sigma_table(3.0)
    assert table.shape == (1000,) and table[-1] == 1.0
    assert abs(float(table[0]) - 0.002994) < 1e-6  # spec §5.1: sigma_min = 0.002994
    t = torch.arange(1, 1001) / 1000
    assert torch.equal(sampling.sigma_table(1.0), t)


def test_simple_schedule_rejects_zero_steps():
    with pytest.raises(ValueError, match="at least 1"):
        sampling.simple_schedule(0)


# --- analytic data -------------------------------------------------------------------------------------
# Data x0 ~ N(mu, s^2) elementwise. Then x_sigma ~ N((1 - sigma) mu, v(sigma)), v = (1 - sigma)^2 s^2 + sigma^2,
# the exact denoiser is E[x0 | x] = mu + (1 - sigma) s^2 / v * (x - (1 - sigma) mu), and the exact flow keeps
# the standardized value (x - (1 - sigma) mu) / sqrt(v) constant, so it maps eps at sigma 1 to mu + s * eps.

MU, S = 0.7, 0.5


def gaussian_denoiser(mu, s, sigmas_seen=None):
    def denoise(x, sigma):
        if sigmas_seen is not None:
            sigmas_seen.append(float(sigma))
        var = (1 - sigma) ** 2 * s**2 + sigma**2
        return mu + (1 - sigma) * s**2 / var * (x - (1 - sigma) * mu)

    return denoise


def make_start(n=1, size=64):
    return sampling.seeded_randn(range(n), (4, 1, size, size))  # sigma = 1: pure noise


def test_euler_converges_to_the_exact_flow_at_first_order():
    x = make_start()
    errors = {}
    for steps in (100, 300, 1000):
        out = sampling.sample_euler(gaussian_denoiser(MU, S), x, sampling.simple_schedule(steps))
        errors[steps] = (out - (MU + S * x)).abs().max().item()
    assert 2.5 < errors[100] / errors[300] < 3.5
    assert errors[1000] < 0.01


def test_euler_is_exact_for_point_data():
    # With one data point the flow is linear in sigma, so each Euler step lands exactly on it.
    x = make_start()
    sigmas = sampling.simple_schedule(10)
    seen = []
    sampling.sample_euler(gaussian_denoiser(MU, 0.0), x, sigmas, callback=lambda i, xi, d: seen.append((i, xi)))
    assert [i for i, _ in seen] == list(range(10))
    for i, xi in seen:
        s_next = float(sigmas[i + 1])
        assert torch.allclose(xi, (1 - s_next) * MU + s_next * x, atol=1e-5)


# The *_gpu samplers equal their CPU-tree twins on the CPU (tests/test_sampler_parity.py).
STOCHASTIC = [name for name, spec in sampling.SAMPLERS.items()
              if spec.noise not in (registry.NO_NOISE, registry.DEVICE_BROWNIAN_NOISE)]
DETERMINISTIC = [name for name, spec in sampling.SAMPLERS.items() if spec.noise == registry.NO_NOISE]


def run_sampler(name, denoise, x, sigmas, seeds=(11, 12)):
    seeds = list(seeds)[: x.shape[0]]
    noise = sampling.seeded_noise_source([s + 1 for s in seeds], x)
    return sampling.sample(name, denoise, x, sigmas, noise=noise, seeds=seeds)


def test_registry_lists_comfyui_samplers_and_noise_kinds():
    assert list(sampling.SAMPLERS)[0] == "er_sde"
    assert {"euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "res_multistep",
            "uni_pc", "uni_pc_bh2", "lcm", "er_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde_gpu"} == set(sampling.SAMPLERS)
    brownian = {n for n, s in sampling.SAMPLERS.items() if s.noise == registry.BROWNIAN_NOISE}
    on_device = {n for n, s in sampling.SAMPLERS.items() if s.noise == registry.DEVICE_BROWNIAN_NOISE}
    assert brownian == {"dpmpp_2m_sde", "dpmpp_3m_sde"} and on_device == {n + "_gpu" for n in brownian}
    assert set(STOCHASTIC) == brownian | {"euler_ancestral", "er_sde", "lcm"}


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_keep_the_exact_marginals_for_point_data(name):
    # For point data every step of these solvers is an exact Gaussian transition: after step i,
    # x = (1 - sigma_next) mu + sigma_next z with z standard normal.
    x = make_start(n=2, size=64)
    sigmas = sampling.simple_schedule(12)
    stats = []

    def record(i, xi, denoised):
        s_next = float(sigmas[i + 1])
        if s_next > 0:
            z = (xi - (1 - s_next) * MU) / s_next
            stats.append((z.mean().item(), z.std().item()))
        else:
            stats.append(xi)

    noise = sampling.seeded_noise_source([11, 12], x)
    sampling.sample(name, gaussian_denoiser(MU, 0.0), x, sigmas, noise=noise, callback=record, seeds=[11, 12])
    for mean, std in stats[:-1]:  # 32768 samples: standard errors 0.0055 and 0.004
        assert abs(mean) < 0.02 and abs(std - 1) < 0.015
    assert torch.allclose(stats[-1], torch.full_like(x, MU))


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_follow_the_exact_flow_of_point_data(name):
    # One data point: the flow is x = (1 - sigma) mu + sigma z, linear in sigma, and every solver here is
    # exact on it. UniPC (ComfyUI's) stops at sigma 0.001 and returns x / (1 - 0.001) there. In float64,
    # since UniPC's VP view loses digits in float32 near sigma 0 (as ComfyUI's does).
    x = make_start(n=2, size=16).double()
    sigmas = sampling.simple_schedule(9).double()
    out = run_sampler(name, gaussian_denoiser(MU, 0.0), x, sigmas)
    last = sampling.UNI_PC_FINAL_SIGMA if name.startswith("uni_pc") else 0.0
    expected = ((1 - last) * MU + last * x) / (1 - last)
    assert torch.allclose(out, expected, atol=1e-12, rtol=0)


# Second order, as integrators of the flow ODE on Gaussian data: steps uniform in log(sigma) from 1 down to
# 0.05 (not to 0: the last step to 0 is first order for every solver), error against the exact flow.
@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2), ("res_multistep", 2),
                                        ("uni_pc", 2), ("uni_pc_bh2", 2)])
def test_ode_samplers_converge_at_their_order(name, order):
    end = 0.05
    x = make_start(size=4).double()
    v_end = (1 - end) ** 2 * S**2 + end**2
    exact = (1 - end) * MU + v_end**0.5 * x
    errors = []
    for steps in (128, 256):
        sigmas = torch.linspace(0, -math.log(end), steps + 1, dtype=torch.float64).neg().exp()
        out = getattr(sampling, sampling.SAMPLERS[name].function)(gaussian_denoiser(MU, S), x, sigmas, None, None)
        errors.append((out - exact).abs().max().item())
    assert 0.85 * 2**order < errors[0] / errors[1] < 1.15 * 2 ** (order + 0.2)


# ER-SDE is third order and converges in far fewer steps than the first/second order solvers.
@pytest.mark.parametrize("name,steps", [("euler_ancestral", 1000), ("er_sde", 100), ("dpmpp_2m_sde", 200),
                                        ("dpmpp_3m_sde", 100)])
def test_stochastic_samplers_reach_the_data_distribution(name, steps):
    x = make_start(n=2, size=48)
    out = run_sampler(name, gaussian_denoiser(MU, S), x, sampling.simple_schedule(steps), seeds=[5, 6])
    assert abs(out.mean().item() - MU) < 0.01
    assert abs(out.std().item() - S) < 0.01


def test_lcm_follows_its_gaussian_recursion():
    # LCM jumps to E[x0 | x] and re-noises, so on Gaussian data it shrinks the variance; with
    # k = (1 - sigma) s^2 / v(sigma), Var x_{i+1} = sigma_{i+1}^2 + (1 - sigma_{i+1})^2 k_i^2 Var x_i and the
    # output variance is k_last^2 Var x_last; the mean stays mu.
    sigmas = sampling.simple_schedule(8)
    out = run_sampler("lcm", gaussian_denoiser(MU, S), make_start(n=2, size=128), sigmas)
    var = 1.0
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        k = (1 - sigma) * S**2 / ((1 - sigma) ** 2 * S**2 + sigma**2)
        var = sigma_next**2 + (1 - sigma_next) ** 2 * k**2 * var if sigma_next > 0 else k**2 * var
    assert abs(out.mean().item() - MU) < 0.005
    assert abs(out.std().item() - var**0.5) < 0.005


def test_er_sde_starts_at_percent_to_sigma():
    expected_first = shifted(3.0, 1 - 1e-4)  # ComfyUI: percent_to_sigma(1e-4) for a CONST model
    assert sampling.percent_to_sigma(1e-4, 3.0) == pytest.approx(expected_first, abs=1e-15)
    offset = {name for name, spec in sampling.SAMPLERS.items() if spec.log_snr}
    assert offset == {"er_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde_gpu"}
    for name in ["euler_a", *sampling.SAMPLERS]:
        if name.startswith("uni_pc") or name == "heun":
            continue  # more than one call per step
        first = expected_first if name in offset else 1.0
        seen = []
        x = make_start(size=8)
        sigmas = sampling.simple_schedule(4, 3.0)
        sampling.sample(name, gaussian_denoiser(MU, S, seen), x, sigmas, noise=sampling.seeded_noise_source([0], x),
                        seeds=[0])
        assert seen[0] == pytest.approx(first, abs=1e-7)
        assert seen[1:] == pytest.approx([float(s) for s in sigmas[1:-1]], abs=0)
    shift2 = sampling.offset_first_sigma(sampling.simple_schedule(4, 2.0), 2.0)
    assert float(shift2[0]) == pytest.approx(shifted(2.0, 1 - 1e-4), abs=1e-7)


def test_er_sde_matches_its_closed_form_first_step():
    # Stage 1 of ER-SDE: x' = (alpha_t / alpha_s) * r * x + alpha_t * (1 - r) * x0 + alpha_t * std * n,
    # with lambda = sigma / (1 - sigma), r = s(lambda_t) / s(lambda_s), std^2 = lambda_t^2 - lambda_s^2 r^2.
    x = make_start(size=8)
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    sigmas = torch.tensor([0.5, 0.25, 0.0])
    got = []
    sampling.sample_er_sde(lambda xi, s: torch.full_like(xi, MU), x, sigmas, lambda s, s_next: n,
                           lambda i, xi, d: got.append(xi))
    lam_s, lam_t = 0.5 / 0.5, 0.25 / 0.75
    scaler = lambda lam: lam * (math.exp(lam**0.3) + 10)
    r = scaler(lam_t) / scaler(lam_s)
    expected = 0.75 / 0.5 * r * x + 0.75 * (1 - r) * MU + 0.75 * math.sqrt(lam_t**2 - lam_s**2 * r**2) * n
    assert torch.allclose(got[0], expected, atol=1e-6)
    assert torch.equal(got[1], torch.full_like(x, MU))


def test_seeded_noise_is_per_image():
    batch = sampling.seeded_randn([7, 8], (3, 5))
    assert torch.equal(batch[1], torch.randn((3, 5), generator=torch.manual_seed(8)))
    like = torch.zeros(2, 3, 5)
    pair, single = sampling.seeded_noise_source([7, 8], like), sampling.seeded_noise_source([8], like[:1])
    for _ in range(3):
        assert torch.equal(pair()[1], single()[0])


def test_unknown_sampler_is_a_clear_error():
    assert sampling.canonical_sampler("euler_a") == "euler_ancestral"
    with pytest.raises(ValueError, match="Unknown sampler 'unipc'.*er_sde"):
        sampling.canonical_sampler("unipc")
