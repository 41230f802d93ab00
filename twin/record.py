"""Per-cycle aggregation: metrics every cycle, ensembles and observations at output cycles.

Values stay torch tensors during the loop (no host synchronisation per cycle) and are stacked
into numpy arrays once, when the writer asks for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from assim import metrics
from assim.observations import ObservationBatch

METRICS = ("rmse_analysis", "rmse_forecast", "spread_analysis", "spread_forecast", "crps_analysis",
           "omb_mean", "omb_rms", "oma_mean", "oma_rms", "obs_count")


@dataclass
class RunRecorder:
    """Collects what a run writes. `output_every` thins the stored fields, never the metrics."""

    members: int
    output_every: int = 1
    keep_members: bool = True
    times: list[float] = field(default_factory=list)
    cycles: list[int] = field(default_factory=list)
    per_cycle: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {k: [] for k in METRICS})
    out_cycles: list[int] = field(default_factory=list)
    analysis: list[torch.Tensor] = field(default_factory=list)
    analysis_spread: list[torch.Tensor] = field(default_factory=list)
    background_mean: list[torch.Tensor] = field(default_factory=list)
    background_spread: list[torch.Tensor] = field(default_factory=list)
    truth: list[torch.Tensor] = field(default_factory=list)
    observations: list[dict[str, torch.Tensor | float]] = field(default_factory=list)
    rank_counts: torch.Tensor | None = None
    burn_in: int = 0

    def record(self, cycle: int, time: float, prior: torch.Tensor, analysis: torch.Tensor,
               truth: torch.Tensor | None, obs: ObservationBatch | None) -> None:
        """Score one analysis (prior and analysis ensembles, truth, observations)."""
        prior_mean = prior.mean(dim=0)
        ana_mean = analysis.mean(dim=0)
        nan = torch.tensor(float("nan"), dtype=prior.dtype)
        pc = self.per_cycle
        pc["spread_analysis"].append(metrics.spread(analysis))
        pc["spread_forecast"].append(metrics.spread(prior))
        if truth is not None:
            pc["rmse_analysis"].append(metrics.rmse(ana_mean, truth))
            pc["rmse_forecast"].append(metrics.rmse(prior_mean, truth))
            pc["crps_analysis"].append(metrics.crps_fair(analysis, truth))
            if cycle >= self.burn_in:
                counts = metrics.rank_histogram(metrics.truth_rank(analysis, truth), self.members)
                self.rank_counts = counts if self.rank_counts is None else self.rank_counts + counts
        else:
            for k in ("rmse_analysis", "rmse_forecast", "crps_analysis"):
                pc[k].append(nan)
        if obs is not None and obs.size:
            omb = obs.values - obs.operator(prior_mean)
            oma = obs.values - obs.operator(ana_mean)
            pc["omb_mean"].append(omb.mean())
            pc["omb_rms"].append(omb.square().mean().sqrt())
            pc["oma_mean"].append(oma.mean())
            pc["oma_rms"].append(oma.square().mean().sqrt())
            pc["obs_count"].append(torch.tensor(float(obs.size), dtype=prior.dtype))
        else:
            for k in ("omb_mean", "omb_rms", "oma_mean", "oma_rms"):
                pc[k].append(nan)
            pc["obs_count"].append(torch.zeros((), dtype=prior.dtype))
        self.times.append(time)
        self.cycles.append(cycle)
        if cycle % self.output_every == 0:
            self.out_cycles.append(cycle)
            self.analysis.append(analysis.clone() if self.keep_members else ana_mean)
            if not self.keep_members:
                self.analysis_spread.append(analysis.std(dim=0))
            self.background_mean.append(prior_mean)
            self.background_spread.append(prior.std(dim=0))
            if truth is not None:
                self.truth.append(truth.clone())
            if obs is not None and obs.size:
                self.observations.append({
                    "time": time, "ids": obs.ids, "values": obs.values, "error_std": obs.error_std,
                    "locations": obs.locations, "omb": omb, "oma": oma,
                })

    def series(self) -> dict[str, np.ndarray]:
        """Per-cycle metrics as numpy arrays (dim: cycle)."""
        return {k: torch.stack(v).double().numpy() if v else np.zeros(0) for k, v in self.per_cycle.items()}

    def summary(self) -> dict[str, float | None]:
        """Averages over cycles after burn-in of the per-cycle values; null where not computable."""
        out: dict[str, float | None] = {}
        for k, v in self.series().items():
            tail = v[self.burn_in:]
            out[k] = float(np.mean(tail)) if tail.size and np.all(np.isfinite(tail)) else None
        return out
