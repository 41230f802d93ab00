"""The assimilation-stage protocol shared by every filter and the blending stage."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

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


class Stage(Protocol):
    """One assimilation stage: returns the analysis ensemble (member, variable, *grid)."""

    def __call__(self, ens: torch.Tensor, obs: ObservationBatch, ctx: AnalysisContext) -> torch.Tensor: ...
