"""The assimilation-stage protocol shared by every filter and the blending stage."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from assim.inpainting import Inpainter
from assim.observations import ObservationBatch
from twin.domain import Decomposition, Grid
from twin.random import Streams


@dataclass(frozen=True)
class AnalysisContext:
    """What a stage may use besides the ensemble and observations."""

    grid: Grid
    domain: Decomposition
    streams: Streams
    cycle: int
    inpainter: Inpainter | None = None  # a learned prior's fill of unobserved points (e.g. the emulator's)

    @property
    def valid(self) -> torch.Tensor | None:
        """This rank's grid points that belong to the state (bool, flat, local C order); None: all.

        Masked points (`Grid.mask`) hold a fill value that a stage must neither update nor use.
        """
        if self.grid.mask is None:
            return None
        return self.grid.mask_tensor().reshape(-1)[self.domain.local_flat_indices()]


def keep_masked(prior: torch.Tensor, analysis: torch.Tensor, ctx: AnalysisContext) -> torch.Tensor:
    """The analysis with the prior's values at masked points (no increments there)."""
    valid = ctx.valid
    if valid is None:
        return analysis
    return torch.where(valid.view(ctx.domain.local_shape), analysis, prior)


class Stage(Protocol):
    """One assimilation stage: returns the analysis ensemble (member, variable, *grid), with masked
    points (`AnalysisContext.valid`) unchanged."""

    def __call__(self, ens: torch.Tensor, obs: ObservationBatch, ctx: AnalysisContext) -> torch.Tensor: ...
