"""The regression network of a residual emulator: the deterministic mean of the next increment.

CorrDiff's split (Mardani et al. 2024): a network R trained with the mean square error predicts the
standardised Δ-increment's conditional mean, and the diffusion model samples only the residual, scaled
by its per-variable std: increment = R(x) + residual_std · sample. Plain regression learns the mean far
faster than the generative stages do (SQG, v6's architecture: 12 h RMSE 0.91 K after 35 min against the
sampled ensemble mean's 1.43 K, BENCHMARKS.md), and the residual is small and near-Gaussian.

R is the same halo-local `UNetLite` as the denoiser, called with its noisy-state channels zero and
c_noise = 0, so it consumes the same padded condition and tiles and wraps the same way.
"""
from __future__ import annotations

import torch
from torch import nn


class Regression(nn.Module):
    """R(cond): the standardised increment's mean on the interior of the condition's padded window."""

    def __init__(self, net: nn.Module, variables: int) -> None:
        super().__init__()
        self.net = net
        self.variables = variables

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        b = cond.shape[0]
        zeros = cond.new_zeros((b, self.variables, *cond.shape[2:]))
        return self.net(torch.cat([zeros, cond], dim=1), cond.new_zeros(b))
