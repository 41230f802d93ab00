"""The single-step sampler: a consistency model distilled from the EDM teacher, then CRPS-tuned.

Consistency function (Song et al. 2023, EDM parametrisation) around the same halo-local network:
f(x, σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, ¼ ln σ) with c_skip = σ_d²/((σ − σ_min)² + σ_d²),
c_out = (σ − σ_min) σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²), so f(x, σ_min) = x exactly. One call
f(σ_max z, σ_max), z ~ N(0, I), is a sample. (Swift uses the TrigFlow form x_t = cos t x_0 + sin t z;
with σ = σ_d tan t both describe the same probability-flow ODE; the EDM form lets the student start
from the teacher's weights unchanged.)

Distillation: on the teacher's Karras grid σ_min = s_1 < ... < s_N = σ_max, draw n, noise the target
to x = y + s_{n+1} z, take one Heun step of the teacher's probability-flow ODE to x̂ at s_n, and pull
f_θ(x, s_{n+1}) towards the stop-gradient f_θ(x̂, s_n) with a pseudo-Huber distance weighted by
1/(s_{n+1} − s_n) (improved consistency training's choices, μ = 0 target).

Fine-tuning (Swift): generate M ≥ 2 members by the one-call sampler, unroll K emulator steps with
gradients through the whole rollout, and minimise the fair CRPS against the truth at every step.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from emulators.diffusion.edm import Pad, Precond, sigma_schedule


class ConsistencyPrecond(nn.Module):
    """f(x, σ | cond) = c_skip x + c_out F(...): same call signature as `Precond`."""

    def __init__(self, net: nn.Module, sigma_data: float = 1.0, sigma_min: float = 0.002) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, pad: Pad) -> torch.Tensor:
        s = sigma.to(x.dtype)
        d2 = self.sigma_data**2
        c_skip = d2 / ((s - self.sigma_min).square() + d2)
        c_out = (s - self.sigma_min) * self.sigma_data / (s.square() + d2).sqrt()
        c_in = 1.0 / (s.square() + d2).sqrt()
        view = (-1,) + (1,) * (x.dim() - 1)
        h = self.net.input_halo
        xp = pad(x, h)
        inner = xp[..., h:-h, h:-h] if h else xp
        f = self.net(torch.cat([xp * c_in.view(view), cond], dim=1), s.log() / 4)
        return c_skip.view(view) * inner + c_out.view(view) * f


def one_step_sample(model: nn.Module, noise: torch.Tensor, sigma_max: float, cond: torch.Tensor,
                    pad: Pad) -> torch.Tensor:
    """f(σ_max · noise, σ_max | cond): one network call per member."""
    sigma = torch.full((noise.shape[0],), float(sigma_max), dtype=noise.dtype)
    return model(noise * sigma_max, sigma, cond, pad)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """√(‖a − b‖² + c²) − c per sample (B,), c = 0.00054 √dim (Song & Dhariwal 2023)."""
    diff = (a - b).flatten(1)
    c = 0.00054 * math.sqrt(diff.shape[1])
    return ((diff.square().sum(1) + c * c).sqrt() - c)


def distillation_loss(student: ConsistencyPrecond, teacher: Precond, target: torch.Tensor, cond: torch.Tensor,
                      pad: Pad, sigmas: list[float], generator: torch.Generator) -> torch.Tensor:
    """Consistency-distillation loss of one batch; `sigmas` ascending (s_1 = σ_min ... s_N = σ_max)."""
    b = target.shape[0]
    dtype = target.dtype
    n = torch.randint(0, len(sigmas) - 1, (b,), generator=generator)
    grid = torch.tensor(sigmas, dtype=dtype)
    s_lo, s_hi = grid[n], grid[n + 1]
    view = (-1,) + (1,) * (target.dim() - 1)
    x = target + torch.randn(target.shape, generator=generator, dtype=dtype) * s_hi.view(view)
    with torch.no_grad():
        d = (x - teacher(x, s_hi, cond, pad)) / s_hi.view(view)
        x_hat = x + (s_lo - s_hi).view(view) * d
        d2 = (x_hat - teacher(x_hat, s_lo, cond, pad)) / s_lo.view(view)
        x_hat = x + (s_lo - s_hi).view(view) * 0.5 * (d + d2)
        anchor = student(x_hat, s_lo, cond, pad)
    weight = 1.0 / (s_hi - s_lo)
    return (weight * pseudo_huber(student(x, s_hi, cond, pad), anchor)).mean() / weight.mean()


def ascending_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float) -> list[float]:
    """The teacher's Karras grid (without the final 0), smallest first."""
    return sigma_schedule(steps, sigma_min, sigma_max, rho)[:-1][::-1]


def fair_crps_loss(members: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Fair CRPS (M, B, ...) vs (B, ...), mean over everything but the members:
    (1/M) Σ_i |x_i − y| − 1/(2 M (M − 1)) Σ_{i≠j} |x_i − x_j|."""
    m = members.shape[0]
    skill = (members - truth).abs().mean(0)
    pair = (members[:, None] - members[None, :]).abs().sum((0, 1)) / (2 * m * (m - 1))
    return (skill - pair).mean()


def rollout_crps(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], start: torch.Tensor,
                 truth: torch.Tensor, members: int, noise: Callable[[int], torch.Tensor],
                 scale: torch.Tensor) -> torch.Tensor:
    """Mean fair CRPS over K unrolled steps: start (B, C, ...) true states, truth (K, B, C, ...),
    `step(x, z)` advances states x (M·B, C, ...) with standard normals z, `noise(k)` draws z for step k,
    scores on states divided by `scale` (per-variable std, broadcastable)."""
    x = start.repeat(members, *([1] * (start.dim() - 1)))
    b = start.shape[0]
    total = start.new_zeros(())
    for k in range(truth.shape[0]):
        x = step(x, noise(k))
        total = total + fair_crps_loss((x / scale).view(members, b, *x.shape[1:]), truth[k] / scale)
    return total / truth.shape[0]
