"""ComfyUI's KSampler loops for a flow (CONST) model, re-written for parity tests from the formulas of
`comfy/samplers.py` (KSAMPLER), `comfy/k_diffusion/sampling.py` and `comfy/extra_samplers/uni_pc.py`,
in their shape: the model is called with a [B] sigma, the start latent is the CONST noise scaling of an
empty latent, the result gets the inverse noise scaling with the schedule's last sigma, per-step noise comes
from one CPU generator seeded seed + 1 for the whole batch, and the SDE solvers' Brownian tree is one
torchsde tree for the whole batch seeded with the seed. For one image this is what ComfyUI computes on
the CPU; the app's per-image seeding makes image i of a batch equal this for seed + i alone.
"""

import torch
import torchsde


def percent_to_sigma(percent, shift):
    t = 1.0 - percent
    return shift * t / (1 + (shift - 1) * t)


def offset_first(sigmas, shift):
    if len(sigmas) > 1 and sigmas[0] >= 1:
        sigmas = sigmas.clone()
        sigmas[0] = percent_to_sigma(1e-4, shift)
    return sigmas


def gaussian_noise(x, seed):
    generator = torch.Generator().manual_seed(seed + 1)  # default_noise_sampler on the CPU
    return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, generator=generator)


class BrownianTree:
    """BatchedBrownianTree + BrownianTreeNoiseSampler with cpu=True and one seed."""

    def __init__(self, x, sigma_min, sigma_max, seed):
        self.sign = 1 if sigma_min < sigma_max else -1
        low, high = (sigma_min, sigma_max) if self.sign == 1 else (sigma_max, sigma_min)
        self.tree = torchsde.BrownianTree(low.cpu(), torch.zeros_like(x).cpu(), high.cpu(), entropy=seed)

    def __call__(self, sigma, sigma_next):
        sign = 1 if sigma < sigma_next else -1
        low, high = (sigma, sigma_next) if sign == 1 else (sigma_next, sigma)
        w = self.tree(low.cpu().float(), high.cpu().float()).to(low.device, low.dtype) * (self.sign * sign)
        return w / (sigma_next - sigma).abs().sqrt()


def ksampler(loop, model, noise, sigmas, seed, shift=3.0):
    """KSAMPLER.sample for txt2img: returns the latents before `process_latent_out`."""
    sigmas = sigmas.clone()
    s0 = sigmas[0].view(1, *[1] * (noise.ndim - 1))
    x = s0 * noise + (1.0 - s0) * torch.zeros_like(noise)

    def model_b(x, sigma_b):
        return model(x, sigma_b)

    out = loop(model_b, x, sigmas, seed, shift)
    last = sigmas[-1].view(1, *[1] * (out.ndim - 1))
    return out / (1.0 - last)


def _t(sigma):
    return sigma.log().neg()


def heun(model, x, sigmas, seed, shift):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i] * (0 + 1)
        denoised = model(x, sigma_hat * s_in)
        d = (x - denoised) / sigma_hat
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in)
            d_2 = (x_2 - denoised_2) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def dpmpp_2m(model, x, sigmas, seed, shift):
    s_in = x.new_ones([x.shape[0]])
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised
        else:
            r = (t - _t(sigmas[i - 1])) / h
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * (
                (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old)
        old = denoised
    return x


def _sde_setup(x, sigmas, seed, shift):
    noise = BrownianTree(x, sigmas[sigmas > 0].min(), sigmas.max(), seed)
    return noise, offset_first(sigmas, shift)


def dpmpp_2m_sde(model, x, sigmas, seed, shift, eta=1.0):
    noise, sigmas = _sde_setup(x, sigmas, seed, shift)
    s_in = x.new_ones([x.shape[0]])
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = sigmas[i].logit().neg(), sigmas[i + 1].logit().neg()
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lam_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old is not None:
                x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / (h_last / h)) * (denoised - old)
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt()
        old, h_last = denoised, h
    return x


def dpmpp_3m_sde(model, x, sigmas, seed, shift, eta=1.0):
    noise, sigmas = _sde_setup(x, sigmas, seed, shift)
    s_in = x.new_ones([x.shape[0]])
    d_1 = d_2 = h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = sigmas[i].logit().neg(), sigmas[i + 1].logit().neg()
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lam_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * (phi_2 / h_eta - 0.5)) * d2
            elif h_1 is not None:
                x = x + (alpha_t * phi_2) * ((denoised - d_1) / (h_1 / h))
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt()
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
    return x


def res_multistep(model, x, sigmas, seed, shift):
    noise = gaussian_noise(x, seed)
    s_in = x.new_ones([x.shape[0]])
    phi1 = lambda t: torch.expm1(t) / t  # noqa: E731
    old_denoised = old_sigma_down = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = sigmas[i + 1], 0.0  # get_ancestral_step with eta 0
        if sigma_down == 0 or old_denoised is None:
            x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        else:
            t, t_old, t_next, t_prev = _t(sigmas[i]), _t(old_sigma_down), _t(sigma_down), _t(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            p1, p2 = phi1(-h), (phi1(-h) - 1.0) / -h
            b1 = torch.nan_to_num(p1 - p2 / c2, nan=0.0)
            b2 = torch.nan_to_num(p2 / c2, nan=0.0)
            x = h.neg().exp() * x + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * 1.0 * sigma_up
        old_denoised, old_sigma_down = denoised, sigma_down
    return x


def lcm(model, x, sigmas, seed, shift):
    noise = gaussian_noise(x, seed)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] > 0:
            s = sigmas[i + 1].view(1, *[1] * (x.ndim - 1))
            x = s * noise(sigmas[i], sigmas[i + 1]) + (1.0 - s) * x
    return x


# --- UniPC (bh1 / bh2), data prediction, multistep, lower order final -----------------------------------

def _lmc(s):
    return 0.5 * torch.log(1 / ((s * s) + 1))


def _std(s):
    return torch.sqrt(1.0 - torch.exp(2.0 * _lmc(s)))


def _lam(s):
    return _lmc(s) - 0.5 * torch.log(1.0 - torch.exp(2.0 * _lmc(s)))


def _expand(v, dims):
    return v[(...,) + (None,) * (dims - 1)]


def _unipc(model, x, sigmas, variant):
    timesteps = sigmas[:]  # as ComfyUI: the schedule itself is changed, which the KSampler sees
    if sigmas[-1] == 0:
        timesteps[-1] = 0.001
    x = x / torch.sqrt(1.0 + timesteps[0] ** 2.0)

    def model_fn(x, t):  # t: [B]
        sigma = t.view(t.shape[:1] + (1,) * (x.ndim - 1))
        latent = x * ((sigma**2 + 1.0) ** 0.5)
        eps = (latent - model(latent, t)) / sigma
        return (x - _expand(_std(t), x.dim()) * eps) / _expand(torch.exp(_lmc(t)), x.dim())

    def update(x, model_prev, t_prev, t, order, use_corrector):
        dims = x.dim()
        lam_0, lam_t = _lam(t_prev[-1]), _lam(t)
        m0 = model_prev[-1]
        sigma_0, sigma_t = _std(t_prev[-1]), _std(t)
        alpha_t = torch.exp(_lmc(t))
        h = lam_t - lam_0
        rks, d1s = [], []
        for i in range(1, order):
            rk = ((_lam(t_prev[-(i + 1)]) - lam_0) / h)[0]
            rks.append(rk)
            d1s.append((model_prev[-(i + 1)] - m0) / rk)
        rks.append(1.0)
        rks = torch.tensor(rks)
        hh = -h[0]
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if variant == "bh1" else torch.expm1(hh)
        rows, b, fact = [], [], 1
        for i in range(1, order + 1):
            rows.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        rows, b = torch.stack(rows), torch.tensor(b)
        if d1s:
            d1s = torch.stack(d1s, dim=1)
            rhos_p = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(rows[:-1, :-1], b[:-1])
            pred = torch.einsum("k,bk...->b...", rhos_p, d1s)
        else:
            d1s, pred = None, 0
        x_t_ = _expand(sigma_t / sigma_0, dims) * x - _expand(alpha_t * h_phi_1, dims) * m0
        x_t = x_t_ - _expand(alpha_t * b_h, dims) * pred
        model_t = None
        if use_corrector:
            rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(rows, b)
            model_t = model_fn(x_t, t)
            corr = torch.einsum("k,bk...->b...", rhos_c[:-1], d1s) if d1s is not None else 0
            x_t = x_t_ - _expand(alpha_t * b_h, dims) * (corr + rhos_c[-1] * (model_t - m0))
        return x_t, model_t

    steps, order = len(timesteps) - 1, min(3, len(timesteps) - 2)
    for step_index in range(steps):
        if step_index == 0:
            vec_t = timesteps[0].expand(x.shape[0])
            model_prev, t_prev = [model_fn(x, vec_t)], [vec_t]
        elif step_index < order:
            vec_t = timesteps[step_index].expand(x.shape[0])
            x, model_x = update(x, model_prev, t_prev, vec_t, step_index, True)
            model_prev.append(model_x)
            t_prev.append(vec_t)
        else:
            for step in range(step_index, step_index + 1 + int(step_index == steps - 1)):
                vec_t = timesteps[step].expand(x.shape[0])
                x, model_x = update(x, model_prev, t_prev, vec_t, min(order, steps + 1 - step), step != steps)
                for i in range(order - 1):
                    t_prev[i], model_prev[i] = t_prev[i + 1], model_prev[i + 1]
                t_prev[-1] = vec_t
                if step < steps:
                    model_prev[-1] = model_x
    return x / torch.exp(_lmc(timesteps[-1]))


def uni_pc(model, x, sigmas, seed, shift):
    return _unipc(model, x, sigmas, "bh1")


def uni_pc_bh2(model, x, sigmas, seed, shift):
    return _unipc(model, x, sigmas, "bh2")


LOOPS = {"heun": heun, "dpmpp_2m": dpmpp_2m, "dpmpp_2m_sde": dpmpp_2m_sde, "dpmpp_3m_sde": dpmpp_3m_sde,
         "res_multistep": res_multistep, "lcm": lcm, "uni_pc": uni_pc, "uni_pc_bh2": uni_pc_bh2}
