"""EDM (Karras et al. 2022): preconditioning, training loss and the stochastic Heun sampler.

The denoiser D(x, σ) = c_skip x + c_out F(c_in x, c_noise) with c_skip = σ_d²/(σ² + σ_d²),
c_out = σ σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²), c_noise = ¼ ln σ. Training draws
ln σ ~ N(P_mean, P_std²) and weights the squared error by (σ² + σ_d²)/(σ σ_d)². The sampler walks
σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, σ_N = 0, with Heun's second-order
correction and "churn" (γ = min(S_churn/N, √2 − 1) of fresh noise per step).

Everything here works on interior fields; the network sees halo-padded inputs through the `pad`
callable (periodic `pad_halo` in training, `domain.exchange_halo` in the emulator), so the same code
serves a global field and a subdomain. The sampler takes its noise from a callable (keyed streams at
inference) and never touches a global random generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

Pad = Callable[[torch.Tensor, int], torch.Tensor]
Denoiser = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class EDMConfig:
    sigma_data: float = field(default=1.0, metadata={"gt": 0, "help": "σ_d: std of the (standardised) target"})
    p_mean: float = field(default=-1.2, metadata={"help": "mean of ln σ in training"})
    p_std: float = field(default=1.2, metadata={"gt": 0, "help": "std of ln σ in training"})


def coefficients(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) for noise levels σ (any shape)."""
    s2, d2 = sigma.square(), sigma_data**2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1.0 / (s2 + d2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class Precond(nn.Module):
    """D(x, σ | cond): the EDM-preconditioned denoiser around a halo-consuming network F.

    `forward(x, sigma, cond, pad)`: x (B, C, *grid) the noisy state, sigma (B,), `pad(x, h)` returns
    the network's input window of x with a halo of h = `net.receptive_halo` (the window's interior
    may be larger than x where a subdomain needs alignment slack), cond (B, C_cond, ...) the condition
    on that same padded window. Returns D on the window's interior.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, pad: Pad) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = coefficients(sigma.to(x.dtype), self.sigma_data)
        view = (-1,) + (1,) * (x.dim() - 1)
        h = self.net.input_halo
        xp = pad(x, h)
        inner = xp[..., h:-h, h:-h] if h else xp
        f = self.net(torch.cat([xp * c_in.view(view), cond], dim=1), c_noise)
        return c_skip.view(view) * inner + c_out.view(view) * f


def edm_loss(model: Precond, target: torch.Tensor, cond: torch.Tensor, pad: Pad, config: EDMConfig,
             generator: torch.Generator) -> torch.Tensor:
    """The weighted denoising loss (mean over batch and pixels) of one batch.

    target (B, C, *grid) standardised; cond padded by the network halo; σ and noise from `generator`.
    """
    b = target.shape[0]
    ln_sigma = torch.randn(b, generator=generator, dtype=target.dtype) * config.p_std + config.p_mean
    sigma = ln_sigma.exp()
    noise = torch.randn(target.shape, generator=generator, dtype=target.dtype)
    view = (-1,) + (1,) * (target.dim() - 1)
    denoised = model(target + noise * sigma.view(view), sigma, cond, pad)
    weight = (sigma.square() + config.sigma_data**2) / (sigma * config.sigma_data).square()
    return (weight.view(view) * (denoised - target).square()).mean()


def sigma_schedule(steps: int, sigma_min: float = 0.002, sigma_max: float = 20.0, rho: float = 7.0) -> list[float]:
    """σ_0 > ... > σ_{N-1} = σ_min, then σ_N = 0 (N + 1 values)."""
    if steps < 1:
        raise ValueError("the sampler needs at least one step")
    if steps == 1:
        return [float(sigma_max), 0.0]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [float((a + i / (steps - 1) * (b - a)) ** rho) for i in range(steps)] + [0.0]


def heun_sample(denoise: Denoiser, noise: Callable[[int], torch.Tensor], steps: int = 18,
                sigma_min: float = 0.002, sigma_max: float = 20.0, rho: float = 7.0, churn: float = 0.0,
                s_noise: float = 1.0, churn_range: tuple[float, float] = (0.0, math.inf)) -> torch.Tensor:
    """Karras et al.'s Algorithm 2 (stochastic Heun) from x_0 = σ_0 · noise(0).

    `denoise(x, σ)` returns D(x; σ); `noise(k)` returns a fresh standard-normal tensor of the state's
    shape for sub-step k (k = 0: the initial draw; k = i + 1: the churn of step i, drawn only when
    γ_i > 0), so the caller decides how the numbers are keyed.
    """
    sigmas = sigma_schedule(steps, sigma_min, sigma_max, rho)
    x = noise(0) * sigmas[0]
    gamma_max = min(churn / steps, math.sqrt(2.0) - 1.0)
    for i in range(steps):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        gamma = gamma_max if churn_range[0] <= s_cur <= churn_range[1] else 0.0
        s_hat = s_cur * (1.0 + gamma)
        if gamma > 0:
            x = x + math.sqrt(s_hat**2 - s_cur**2) * s_noise * noise(i + 1)
        d = (x - denoise(x, s_hat)) / s_hat
        x_next = x + (s_next - s_hat) * d
        if s_next > 0:
            d2 = (x_next - denoise(x_next, s_next)) / s_next
            x_next = x + (s_next - s_hat) * 0.5 * (d + d2)
        x = x_next
    return x
