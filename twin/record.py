"""Per-cycle aggregation: metrics every cycle, ensembles and observations at output cycles.

The loop only appends references (no tensor work per cycle); scores are computed in batches of
cycles by `flush()`, when the buffer reaches `buffer_elements` or the writer asks. So a small
problem pays a few vectorised calls per hundreds of cycles, and a large one flushes every cycle.
On grids with area weights or a mask (`state_weights`) every grid mean is a weighted mean and
masked points are left out of the rank histogram; other grids are scored exactly as before.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from assim import metrics
from assim.observations import ObservationBatch
from twin.domain import Grid

METRICS = ("rmse_analysis", "rmse_forecast", "spread_analysis", "spread_forecast", "crps_analysis",
           "omb_mean", "omb_rms", "oma_mean", "oma_rms", "obs_count")


def state_weights(grid: Grid, n_variables: int,
                  slices: tuple[slice, ...] | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weights, valid) of the state (variable, *grid) or of its block `slices`: the grid's metric
    weights (`Grid.point_weights`) shared out over the variables, so that they sum to 1 over the
    whole state, and the mask; (None, None) when every point weighs the same."""
    w = grid.point_weights()
    if w is None:
        return None, None
    slices = slices or tuple(slice(None) for _ in grid.shape)
    w = (w[slices] / n_variables).expand(n_variables, *w[slices].shape).contiguous()
    valid = None if grid.mask is None else grid.mask_tensor()[slices].expand_as(w).contiguous()
    return w, valid


def _np(values: torch.Tensor) -> np.ndarray:
    """Per-cycle scores leave torch as one float64 array per scored batch (no per-cycle objects)."""
    return values.detach().double().numpy().copy()


@dataclass
class _Pending:
    cycle: int
    time: float
    prior: torch.Tensor
    analysis: torch.Tensor
    truth: torch.Tensor | None
    obs: ObservationBatch | None


@dataclass
class RunRecorder:
    """Collects what a run writes. `output_every` thins the stored fields, never the metrics."""

    members: int
    output_every: int = 1
    keep_members: bool = True
    burn_in: int = 0
    buffer_elements: int = 2**20
    times: list[float] = field(default_factory=list)
    cycles: list[int] = field(default_factory=list)
    per_cycle: dict[str, list[np.ndarray]] = field(default_factory=lambda: {k: [] for k in METRICS})
    out_cycles: list[int] = field(default_factory=list)
    analysis: list[torch.Tensor] = field(default_factory=list)
    analysis_spread: list[torch.Tensor] = field(default_factory=list)
    background_mean: list[torch.Tensor] = field(default_factory=list)
    background_spread: list[torch.Tensor] = field(default_factory=list)
    truth: list[torch.Tensor] = field(default_factory=list)
    observations: list[dict[str, torch.Tensor | float]] = field(default_factory=list)
    stations: list[dict[str, np.ndarray | float]] = field(default_factory=list)  # twin.stations, every cycle
    rank_counts: torch.Tensor | None = None
    weights: torch.Tensor | None = None  # (variable, *grid) from `state_weights`; None: equal weights
    valid: torch.Tensor | None = None  # (variable, *grid) the mask; None: every point counts
    _pending: list[_Pending] = field(default_factory=list)
    _pending_elements: int = 0

    def record(self, cycle: int, time: float, prior: torch.Tensor, analysis: torch.Tensor,
               truth: torch.Tensor | None, obs: ObservationBatch | None) -> None:
        """Keep one analysis (prior and analysis ensembles, truth, observations) for scoring."""
        self._pending.append(_Pending(cycle, time, prior, analysis, truth, obs))
        self._pending_elements += 2 * prior.numel()
        if self._pending_elements >= self.buffer_elements:
            self.flush()

    def flush(self) -> None:
        """Score the pending cycles in groups that share truth availability and observation operator."""
        pending, self._pending, self._pending_elements = self._pending, [], 0
        start = 0
        while start < len(pending):
            stop = start + 1
            while stop < len(pending) and self._same_group(pending[start], pending[stop]):
                stop += 1
            self._score(pending[start:stop])
            start = stop

    @staticmethod
    def _same_group(a: _Pending, b: _Pending) -> bool:
        if (a.truth is None) != (b.truth is None) or (a.obs is None) != (b.obs is None):
            return False
        return a.obs is None or (a.obs.operator is b.obs.operator and a.obs.size == b.obs.size)

    def _score(self, group: list[_Pending]) -> None:
        prior = torch.stack([p.prior for p in group])  # (cycle, member, variable, *grid)
        analysis = torch.stack([p.analysis for p in group])
        c, m = prior.shape[:2]
        prior_f, ana_f = prior.reshape(c, m, -1), analysis.reshape(c, m, -1)
        prior_mean, ana_mean = prior.mean(1), analysis.mean(1)
        w = None if self.weights is None else self.weights.reshape(-1)
        pc = self.per_cycle
        pc["spread_analysis"].append(_np(metrics.spread(ana_f, w, member_dim=1, dims=-1)))
        pc["spread_forecast"].append(_np(metrics.spread(prior_f, w, member_dim=1, dims=-1)))
        nan = torch.full((c,), float("nan"), dtype=prior.dtype)
        if group[0].truth is not None:
            truth = torch.stack([p.truth for p in group])
            truth_f = truth.reshape(c, -1)
            pc["rmse_analysis"].append(_np(metrics.rmse(ana_mean.reshape(c, -1), truth_f, w, dims=-1)))
            pc["rmse_forecast"].append(_np(metrics.rmse(prior_mean.reshape(c, -1), truth_f, w, dims=-1)))
            pc["crps_analysis"].append(_np(metrics.crps_fair(ana_f, truth_f, w, member_dim=1, dims=-1)))
            after = torch.tensor([p.cycle >= self.burn_in for p in group])
            if bool(after.any()):
                keep = slice(None) if self.valid is None else self.valid.reshape(-1)
                ranks = metrics.truth_rank(ana_f[after][..., keep], truth_f[after][..., keep], member_dim=1)
                counts = metrics.rank_histogram(ranks, self.members)
                self.rank_counts = counts if self.rank_counts is None else self.rank_counts + counts
        else:
            truth = None
            for k in ("rmse_analysis", "rmse_forecast", "crps_analysis"):
                pc[k].append(_np(nan))
        first = group[0].obs
        if first is not None and first.size:
            values = torch.stack([p.obs.values for p in group])
            omb = values - first.operator(prior_mean)
            oma = values - first.operator(ana_mean)
            pc["omb_mean"].append(_np(omb.mean(-1)))
            pc["omb_rms"].append(_np(omb.square().mean(-1).sqrt()))
            pc["oma_mean"].append(_np(oma.mean(-1)))
            pc["oma_rms"].append(_np(oma.square().mean(-1).sqrt()))
            pc["obs_count"].append(_np(torch.full((c,), float(first.size), dtype=prior.dtype)))
        else:
            for k in ("omb_mean", "omb_rms", "oma_mean", "oma_rms"):
                pc[k].append(_np(nan))
            pc["obs_count"].append(_np(torch.zeros(c, dtype=prior.dtype)))
        for i, p in enumerate(group):
            self.times.append(p.time)
            self.cycles.append(p.cycle)
            if p.cycle % self.output_every == 0:
                has_obs = p.obs is not None and p.obs.size
                self._store_outputs(p, ana_mean[i], prior_mean[i], None if truth is None else truth[i],
                                    omb[i] if has_obs else None, oma[i] if has_obs else None)

    def _store_outputs(self, p: _Pending, ana_mean: torch.Tensor, prior_mean: torch.Tensor,
                       truth: torch.Tensor | None, omb: torch.Tensor | None, oma: torch.Tensor | None) -> None:
        """Keep one output cycle; rows of batch tensors are cloned (a view keeps the whole batch)."""
        self.out_cycles.append(p.cycle)
        self.analysis.append(p.analysis if self.keep_members else ana_mean.clone())
        if not self.keep_members:
            spread = p.analysis.std(dim=0)
            self.analysis_spread.append(spread if self.valid is None else spread.masked_fill(~self.valid, float("nan")))
        self.background_mean.append(prior_mean.clone())
        self.background_spread.append(p.prior.std(dim=0))
        if truth is not None:
            self.truth.append(truth.clone())
        if omb is not None:
            self.observations.append({
                "time": p.time, "ids": p.obs.ids, "values": p.obs.values, "error_std": p.obs.error_std,
                "locations": p.obs.locations, "variable": p.obs.operator.variable, "omb": omb.clone(),
                "oma": oma.clone(),
            })

    def record_reduced(self, cycle: int, time: float, scores: dict[str, float], rank_counts: torch.Tensor | None,
                       outputs: tuple | None) -> None:
        """Record a cycle scored elsewhere (under MPI: partial sums reduced across ranks, see
        `partial_sums`); `outputs` = (prior, analysis, truth, obs) gathered, at output cycles only."""
        self.flush()
        for k in METRICS:
            self.per_cycle[k].append(np.array([scores[k]], dtype=np.float64))
        if rank_counts is not None and cycle >= self.burn_in:
            self.rank_counts = rank_counts if self.rank_counts is None else self.rank_counts + rank_counts
        self.times.append(time)
        self.cycles.append(cycle)
        if outputs is not None:
            prior, analysis, truth, obs = outputs
            p = _Pending(cycle, time, prior, analysis, truth, obs)
            prior_mean, ana_mean = prior.mean(0), analysis.mean(0)
            has_obs = obs is not None and obs.size
            self._store_outputs(p, ana_mean, prior_mean, truth,
                                obs.values - obs.operator(prior_mean) if has_obs else None,
                                obs.values - obs.operator(ana_mean) if has_obs else None)

    _STATE = ("times", "cycles", "per_cycle", "out_cycles", "analysis", "analysis_spread", "background_mean",
              "background_spread", "truth", "observations", "stations", "rank_counts")

    def lengths(self) -> dict[str, int]:
        """How much of each append-only record exists (marks a checkpoint's position)."""
        self.flush()
        out = {k: len(getattr(self, k)) for k in self._STATE if k not in ("per_cycle", "rank_counts")}
        out.update({f"per_cycle.{k}": len(v) for k, v in self.per_cycle.items()})
        return out

    def records_since(self, lengths: dict[str, int] | None) -> dict:
        """The records appended since `lengths` (all of them for None): one checkpoint chunk."""
        self.flush()
        start = lengths or {}
        chunk = {k: getattr(self, k)[start.get(k, 0):] for k in self._STATE if k not in ("per_cycle", "rank_counts")}
        chunk["per_cycle"] = {k: v[start.get(f"per_cycle.{k}", 0):] for k, v in self.per_cycle.items()}
        return chunk

    def extend_records(self, chunk: dict) -> None:
        """Append a checkpoint chunk (the inverse of `records_since`)."""
        for k, v in chunk.items():
            if k == "per_cycle":
                for m, values in v.items():
                    self.per_cycle[m].extend(values)
            else:
                getattr(self, k).extend(v)

    def series(self) -> dict[str, np.ndarray]:
        """Per-cycle metrics as numpy arrays (dim: cycle)."""
        self.flush()
        return {k: np.concatenate(v) if v else np.zeros(0) for k, v in self.per_cycle.items()}

    def summary(self) -> dict[str, float | None]:
        """Averages over cycles after burn-in of the per-cycle values; null where not computable."""
        out: dict[str, float | None] = {}
        for k, v in self.series().items():
            tail = v[self.burn_in:]
            out[k] = float(np.mean(tail)) if tail.size and np.all(np.isfinite(tail)) else None
        return out


def partial_sums(prior: torch.Tensor, analysis: torch.Tensor, truth: torch.Tensor | None,
                 obs: ObservationBatch | None, weights: torch.Tensor | None = None,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's share of one cycle's scores as sums (float64), to be all-reduced:
    [n_points, Σ var_a, Σ var_f, Σ err²_a, Σ err²_f, Σ crps, n_obs, Σ omb, Σ omb², Σ oma, Σ oma²,
    rank counts...]. Truth-free runs put NaN in the error sums. With this rank's block of
    `state_weights` the sums are weighted and n_points is the block's share of the total weight."""
    prior_mean, ana_mean = prior.mean(0), analysis.mean(0)

    def total(x: torch.Tensor) -> float:
        return float(x.sum() if weights is None else (x * weights).sum())

    n = float(prior[0].numel()) if weights is None else float(weights.sum())
    out = [n, total(analysis.var(0)), total(prior.var(0))]
    if truth is not None:
        crps = float(metrics.crps_fair(analysis, truth)) * n if weights is None else \
            float(metrics.crps_fair(analysis, truth, weights))
        out += [total((ana_mean - truth).square()), total((prior_mean - truth).square()), crps]
        keep = slice(None) if valid is None else valid
        ranks = metrics.rank_histogram(metrics.truth_rank(analysis, truth)[keep], analysis.shape[0]).double()
    else:
        out += [float("nan")] * 3
        ranks = torch.zeros(analysis.shape[0] + 1, dtype=torch.float64)
    if obs is not None and obs.size:
        omb, oma = obs.values - obs.operator(prior_mean), obs.values - obs.operator(ana_mean)
        out += [float(obs.size), float(omb.sum()), float(omb.square().sum()), float(oma.sum()), float(oma.square().sum())]
    else:
        out += [0.0] * 5
    return torch.cat([torch.tensor(out, dtype=torch.float64), ranks])


def scores_from_sums(total: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """The per-cycle metrics (as the batched scoring defines them) from all-reduced `partial_sums`."""
    n, var_a, var_f, sq_a, sq_f, crps, n_obs, omb, omb2, oma, oma2 = total[:11].tolist()
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = {"spread_analysis": np.sqrt(var_a / n), "spread_forecast": np.sqrt(var_f / n),
                  "rmse_analysis": np.sqrt(sq_a / n), "rmse_forecast": np.sqrt(sq_f / n), "crps_analysis": crps / n,
                  "obs_count": n_obs,
                  "omb_mean": omb / n_obs if n_obs else np.nan, "omb_rms": np.sqrt(omb2 / n_obs) if n_obs else np.nan,
                  "oma_mean": oma / n_obs if n_obs else np.nan, "oma_rms": np.sqrt(oma2 / n_obs) if n_obs else np.nan}
    return {k: float(v) for k, v in scores.items()}, total[11:].round().long()
