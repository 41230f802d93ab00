"""`method: repaint`: fill every unobserved point of the analysis from a learned prior.

The stage after a filter that updates only the observed points (EnSF with `unobserved: keep`): the
observed points keep the filter's analysis, everything else — unobserved points of an observed
variable and variables with no observation at all — comes from the learned inpainter the twin hands
in through `AnalysisContext.inpainter` (for the diffusion emulator: RePaint-style sampling of the last
forecast step with the observed part held fixed). With no inpainter yet (the first cycle, before any
forecast step) the ensemble passes through unchanged. Observations must sit on grid points
(identity/subset/arctan operators).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from assim.observations import ObservationBatch
from assim.obsspace import observed_points
from assim.registry import register_stage
from assim.stages import AnalysisContext


@register_stage("repaint")
class Repaint:
    """Learned inpainting of the unobserved points, the observed ones held fixed."""

    needs_inpainter = True

    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config: "Repaint.Config") -> None:
        self.config = config

    def __call__(self, ens: torch.Tensor, obs: ObservationBatch, ctx: AnalysisContext) -> torch.Tensor:
        if ctx.inpainter is None:
            return ens
        return ctx.inpainter(ens, observed_mask(obs, ctx, ens.shape[1]))


def observed_mask(obs: ObservationBatch, ctx: AnalysisContext, n_variables: int) -> torch.Tensor:
    """(variable, *local grid) bool: True at the grid points some rank's observations sample."""
    known = observed_points(obs, ctx.domain, n_variables, ctx.grid.size)
    return known[:, ctx.domain.local_flat_indices()].reshape(n_variables, *ctx.domain.local_shape)
