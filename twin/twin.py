"""The Twin: composes a model, a domain, observation sources and assimilation stages.

It has no numerics of its own. Each cycle k: observations at t_k, the stages turn the prior
(background) ensemble into the analysis, the recorder scores it, the model forecasts `every` steps.
"""
from __future__ import annotations

import time as _time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import xarray as xr

from assim.observations import ObservationBatch
from assim.registry import stage_registry
from assim.stages import AnalysisContext
from assim.synthetic import SyntheticObserver
from emulators.registry import model_registry
from twin.config import CaseConfig, ConfigError, load_case
from twin.members import LayoutError, MemberSplitDomain, run_domain
from twin.initial import data_model, load_initial
from twin.nature import NatureRun
from twin.random import Streams
from twin.record import RunRecorder, partial_sums, scores_from_sums, state_weights
from twin.stations import StationMonitor

DTYPES = {"float64": torch.float64, "float32": torch.float32}
CHECKPOINT_FORMAT = 1
NATURE_AHEAD_CYCLES = 500  # the nature run is simulated this many cycles ahead of the filter ...
NATURE_AHEAD_ELEMENTS = 2**22  # ... or fewer, so that its states stay within ~32 MB (float64)


def _chunk_path(path: Path, index: int) -> Path:
    return path.with_name(f"{path.stem}-records-{index:05d}{path.suffix}")


class CheckpointError(Exception):
    """A checkpoint that cannot continue this case: one line naming the file."""


class Twin:
    """A digital twin built from a case: `Twin.from_yaml(path).run(cycles)`."""

    def __init__(self, case: CaseConfig, comm: object | None = None) -> None:
        torch.set_num_threads(case.run.threads)
        self.case = case
        self.dtype = DTYPES[case.run.dtype]
        model_cls = model_registry[case.model.kind]
        self.initial = None if case.initial is None else load_initial(  # real data: grid and members from a file
            case.initial, case.ensemble.size, case.ensemble.init_spread, f"case {case.name}", start=case.run.start)
        self.grid = model_cls.global_grid(case.model.config) if self.initial is None else self.initial.grid
        try:
            self.domain = run_domain(self.grid, case.domain.decomposition, case.domain.ranks_per_member,
                                     case.ensemble.size, comm)
        except LayoutError as e:
            raise ConfigError(f"case {case.name}", "domain.ranks_per_member", str(e)) from None
        # models and stages see the grid decomposition of this rank's member group (members split
        # over groups: `self.domain` is the run's view, `self.split` the member split, else None)
        self.split = self.domain if isinstance(self.domain, MemberSplitDomain) else None
        self.grid_domain = self.domain if self.split is None else self.split.sub
        self.model = (model_cls(case.model.config, self.grid_domain, self.dtype) if self.initial is None else
                      data_model(model_cls, case, self.grid_domain, self.dtype, self.initial))
        truth_spec = case.truth.model
        self.truth_model = (self.model if truth_spec is None else
                            model_registry[truth_spec.kind](truth_spec.config, self.grid_domain, self.dtype))
        self.stages = [stage_registry[s.method](s.config) for s in case.assimilation.stages]
        # a learned-inpainting stage needs each member's state before the last forecast step
        self._keep_previous = any(getattr(s, "needs_inpainter", False) for s in self.stages)
        if self._keep_previous and not hasattr(self.model, "inpainter"):
            raise ConfigError(f"case {case.name}", "assimilation.stages",
                              f"repaint needs a model with a learned prior (kind: diffusion), not {case.model.kind!r}")
        self.previous: tuple[torch.Tensor, float] | None = None
        self.ensemble_streams = Streams(case.ensemble.seed)
        self.observer = SyntheticObserver(
            self.grid, len(self.model.variables), case.observations.operator, case.observations.error_std,
            case.observations.fraction, Streams(case.observations.seed), self.dtype, self.grid_domain,
            self._observable(case))
        self.file_observations = None
        obs_cfg = case.observations
        if obs_cfg.path is not None:
            from twin.obsource import FileObservations

            cycle_length = obs_cfg.every * self.model.dt
            self.file_observations = FileObservations(
                obs_cfg.path, self.grid, self.grid_domain, self.model.variables, start=case.run.start,
                time_unit_seconds=self.model.time_unit_seconds, default_error_std=obs_cfg.error_std,
                half_width=obs_cfg.time_window or cycle_length / 2, gross_error_k=obs_cfg.gross_error_k,
                dtype=self.dtype, withhold=obs_cfg.withhold, seed=obs_cfg.seed, where=f"case {case.name}")
        weights, valid = state_weights(self.grid, len(self.model.variables))
        self.recorder = RunRecorder(members=case.ensemble.size, output_every=case.output.every,
                                    keep_members=case.output.members == "all", burn_in=case.run.burn_in,
                                    weights=weights, valid=valid)
        self.stations = StationMonitor.of(self.file_observations, self.recorder, self.grid, self.grid_domain,
                                          case.run.burn_in, keeps_records=self.domain.rank == 0)
        self.cycle = 0
        self.time = 0.0
        try:
            self.truth_steps_per_cycle
        except ValueError as e:
            raise ConfigError(f"case {case.name}", "observations.every", str(e)) from None
        self.nature: NatureRun | None = None  # no truth with `initial:`: truth-dependent metrics are null
        if self.initial is None:
            truth0 = self._spun_up_truth()
            self.nature = NatureRun(self.truth_model, self.observer, truth0, self.truth_steps_per_cycle,
                                    cycle_length=self.cycle_length)
            self.ensemble = self._initial_ensemble(truth0)
        else:
            self.ensemble = self.initial.ensemble(self.ensemble_streams, self.grid_domain, case.ensemble.size, self.dtype)
        self.loop_seconds = 0.0

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Iterable[str] = ()) -> "Twin":
        return cls(load_case(path, tuple(overrides)))

    # ------------------------------------------------------------ set-up

    def _observable(self, case: CaseConfig) -> torch.Tensor | None:
        """Flat (variable, *grid) mask of the state synthetic observations may sample, from
        `observations.variables` and `observations.region`; None when both are unset."""
        cfg = case.observations
        if cfg.variables is None and cfg.region is None:
            return None
        names = [v.name for v in self.model.variables]
        chosen = cfg.variables if cfg.variables is not None else names
        unknown = [v for v in chosen if v not in names]
        if unknown or not chosen:
            raise ConfigError(f"case {case.name}", "observations.variables",
                              f"unknown or no variables {unknown} (the model has: {', '.join(names)})")
        box = torch.ones(self.grid.shape, dtype=torch.bool)
        if cfg.region is not None:
            if len(cfg.region) != self.grid.ndim or any(
                    len(r) != 2 or not 0 <= r[0] < r[1] <= n for r, n in zip(cfg.region, self.grid.shape)):
                raise ConfigError(f"case {case.name}", "observations.region",
                                  f"need one [start, stop] per grid axis within the grid {list(self.grid.shape)} "
                                  f"(got {[list(r) for r in cfg.region]})")
            box = torch.zeros(self.grid.shape, dtype=torch.bool)
            box[tuple(slice(a, b) for a, b in cfg.region)] = True
        return torch.stack([box.reshape(-1) & (name in chosen) for name in names]).reshape(-1)

    def _local_normals(self, streams: Streams, purpose: str, keys: tuple[int, ...], members: int) -> torch.Tensor:
        return streams.field_normal(purpose, keys, members, len(self.model.variables),
                                    self.grid_domain.local_flat_indices(), self.grid_domain.local_shape, self.dtype)

    def _spun_up_truth(self) -> torch.Tensor:
        """Truth at cycle 0: the truth model's initial state from N(0, 1) noise (the model's
        `initial_state(noise)` if it has one, else the noise), spun up `truth.spinup_steps` steps."""
        noise = self._local_normals(Streams(self.case.truth.seed), "truth", (0,), 1)
        make = getattr(self.truth_model, "initial_state", None)
        x = (make(noise) if make is not None else noise).to(self.dtype)
        for i in range(self.case.truth.spinup_steps):
            x = self.truth_model.step(x, (i - self.case.truth.spinup_steps) * self.truth_model.dt)
        return x[0]

    def _initial_ensemble(self, truth0: torch.Tensor) -> torch.Tensor:
        """Members = truth + init_spread · N(0, 1), keyed by member and global grid index."""
        noise = self._local_normals(self.ensemble_streams, "init", (0,), self.case.ensemble.size)
        return truth0.unsqueeze(0) + self.case.ensemble.init_spread * noise

    # ------------------------------------------------------------ the cycle

    @property
    def steps_per_cycle(self) -> int:
        """Forecast-model steps per cycle (`observations.every`)."""
        return self.case.observations.every

    @property
    def cycle_length(self) -> float:
        """Model time between analyses."""
        return self.steps_per_cycle * self.model.dt

    @property
    def truth_steps_per_cycle(self) -> int:
        """Truth-model steps per cycle: the same time span at the truth model's own dt."""
        ratio = self.cycle_length / self.truth_model.dt
        if abs(ratio - round(ratio)) > 1e-6 * max(1.0, ratio):
            raise ValueError(f"the cycle ({self.cycle_length:g}) is not a whole number of truth-model steps "
                             f"({self.truth_model.dt:g})")
        return int(round(ratio))

    @property
    def truth(self) -> torch.Tensor | None:
        """The true state at the current cycle (synthetic-truth experiments; None on real data)."""
        return None if self.nature is None else self.nature.truth(self.cycle)

    def observe(self) -> ObservationBatch:
        """The observations of the current cycle: from the file, else synthetic from the truth."""
        if self.file_observations is not None:
            return self.file_observations.at(self.time)
        return self.nature.observations(self.cycle)

    def assimilate(self, obs: ObservationBatch | None = None) -> torch.Tensor:
        """Run the stages on the current (prior) ensemble; record and return the analysis."""
        if obs is None:
            obs = self.observe()
            if self.file_observations is not None:
                obs = self.file_observations.screen_background(obs, self.ensemble)
        prior = self.ensemble
        ens = prior
        inpainter = self.model.inpainter(*self.previous) if self.previous is not None else None
        ctx = AnalysisContext(self.grid, self.grid_domain, self.ensemble_streams, self.cycle, inpainter)
        for stage in self.stages:
            ens = stage(ens, obs, ctx)
        self.ensemble = ens
        if self.stations is not None:
            self.stations.record(self.cycle, self.time, prior, ens)
        if self.domain.size == 1:
            self.recorder.record(self.cycle, self.time, prior, ens, self.truth, obs)
        else:
            self._record_gathered(prior, ens, obs)
        return ens

    def _record_gathered(self, prior: torch.Tensor, ens: torch.Tensor, obs: ObservationBatch) -> None:
        """Under MPI the scores are partial sums reduced across ranks (one small all-reduce); the
        fields and observations are gathered to rank 0 at output cycles only."""
        dom = self.domain
        weights = state_weights(self.grid, len(self.model.variables), dom.local_slices)
        scores, rank_counts = scores_from_sums(dom.allreduce(partial_sums(prior, ens, self.truth, obs, *weights)))
        outputs = None
        if self.cycle % self.case.output.every == 0:
            prior_g, ens_g = dom.gather(prior), dom.gather(ens)
            truth_g = None if self.nature is None else dom.gather(self.truth)
            parts = dom.allgather_object((obs.ids.numpy(), obs.values.numpy(), obs.error_std.numpy()))
            if dom.rank == 0:
                outputs = (prior_g, ens_g, truth_g, self._global_observations(obs, parts))
        if dom.rank == 0:
            self.recorder.record_reduced(self.cycle, self.time, scores, rank_counts, outputs)

    def _global_observations(self, obs: ObservationBatch, parts: list) -> ObservationBatch:
        """All ranks' observations of this cycle as one batch on the global grid, ordered by id."""
        if self.file_observations is not None:
            return self.file_observations.global_batch(obs.time)
        ids, values, err = (torch.from_numpy(np.concatenate([p[i] for p in parts])) for i in range(3))
        order = torch.argsort(ids, stable=True)
        op = self.observer.global_operator(ids[order])
        return ObservationBatch(obs.time, values[order], err[order], ids[order], op)

    def forecast(self) -> torch.Tensor:
        """Advance the ensemble `observations.every` model steps to the next cycle (under a member
        split: this group's members, then all-gathered)."""
        split = self.split
        x = self.ensemble if split is None else self.ensemble[split.members]
        # a member-keyed model draws global members' numbers for this group's block
        keyed = {"first_member": split.members.start} if split is not None and getattr(
            self.model, "member_keyed", False) else {}
        for i in range(self.steps_per_cycle):
            t = self.time + i * self.model.dt
            if self._keep_previous and i == self.steps_per_cycle - 1:
                self.previous = (x, t)
            x = self.model.step(x, t, **keyed)
        if self.grid.mask is not None:  # models know nothing of the mask: masked points keep their fill
            x = torch.where(self.grid.mask_tensor()[self.domain.local_slices], x, x.new_zeros(()))
        if split is not None:
            x = split.allgather_members(x)
            if self._keep_previous:
                self.previous = (split.allgather_members(self.previous[0]), self.previous[1])
        self.ensemble = x
        if self.nature is not None:
            self.nature.release(self.cycle)
        self.cycle += 1
        self.time += self.steps_per_cycle * self.model.dt
        return self.ensemble

    def step(self, obs: ObservationBatch | None = None) -> torch.Tensor:
        """One cycle: assimilate then forecast."""
        self.assimilate(obs)
        return self.forecast()

    def run(self, cycles: int | None = None, progress: bool = False,
            checkpoint: Callable[["Twin"], None] | None = None, checkpoint_every: int = 0) -> dict:
        """Run `cycles` cycles (default: the case's remaining ones) and return the summary metrics.

        `checkpoint(twin)` is called every `checkpoint_every` cycles (its time is not counted in
        cycles_per_second, which measures the assimilate-and-forecast loop only).
        """
        n = self.case.run.cycles - self.cycle if cycles is None else cycles
        bar = None
        if progress and self.domain.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=n, desc=self.case.name, unit="cycle", leave=False, initial=0)
        first, end = self.cycle, self.cycle + n
        ahead = max(1, min(NATURE_AHEAD_CYCLES, NATURE_AHEAD_ELEMENTS // max(1, self.ensemble[0].numel())))
        start = _time.perf_counter()
        for _ in range(n):
            if self.nature is not None and (self.cycle - first) % ahead == 0:
                self.loop_seconds += _time.perf_counter() - start  # the nature run is not the filter's time
                self.nature.prepare(self.cycle, min(end, self.cycle + ahead), self.file_observations is None)
                start = _time.perf_counter()
            self.step()
            if bar is not None:
                bar.update()
            if checkpoint is not None and checkpoint_every and self.cycle % checkpoint_every == 0:
                self.loop_seconds += _time.perf_counter() - start
                checkpoint(self)
                start = _time.perf_counter()
        self.loop_seconds += _time.perf_counter() - start
        if bar is not None:
            bar.close()
        return self.summary()

    # ------------------------------------------------------------ checkpoints

    def checkpoint(self, path: str | Path) -> None:
        """Save everything needed to continue bit-identically (collective; rank 0 writes).

        The records since the previous checkpoint go to a numbered chunk file next to `path`, so
        each checkpoint costs what it adds, not the whole history.
        """
        ensemble = self.domain.gather(self.ensemble)
        truth = None if self.nature is None else self.domain.gather(self.truth)
        previous = None if self.previous is None else self.domain.gather(self.previous[0])
        if self.domain.rank != 0:
            return
        from twin.config import case_to_dict
        from twin.io import atomic_output

        path = Path(path)
        marks = getattr(self, "_checkpoint_marks", {"chunks": 0, "lengths": None, "path": path})
        if marks["path"] != path:
            marks = {"chunks": 0, "lengths": None, "path": path}
        with atomic_output(_chunk_path(path, marks["chunks"])) as tmp:
            torch.save(self.recorder.records_since(marks["lengths"]), tmp)
        marks = {"chunks": marks["chunks"] + 1, "lengths": self.recorder.lengths(), "path": path}
        state = {"format": CHECKPOINT_FORMAT, "config": case_to_dict(self.case), "cycle": self.cycle,
                 "time": self.time, "ensemble": ensemble, "truth": truth, "loop_seconds": self.loop_seconds,
                 "chunks": marks["chunks"], "rank_counts": self.recorder.rank_counts,
                 "previous": None if previous is None else (previous, self.previous[1])}
        with atomic_output(path) as tmp:
            torch.save(state, tmp)
        self._checkpoint_marks = marks

    def restore(self, path: str | Path) -> None:
        """Continue from a checkpoint of the same case; `CheckpointError` if it does not fit."""
        from twin.config import case_to_dict

        state, error = None, None
        if self.domain.rank == 0:
            try:
                state = torch.load(path, weights_only=False)
            except Exception as e:  # noqa: BLE001 - torch raises many types on corrupt files
                error = f"{path}: not a readable checkpoint ({type(e).__name__})"
            else:
                if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
                    error = f"{path}: not an EarthTwin checkpoint of format {CHECKPOINT_FORMAT}"
                elif state["config"] != case_to_dict(self.case):
                    error = f"{path}: written for a different configuration of case {self.case.name!r}"
        meta = None if state is None or error else (state["cycle"], state["time"], state["loop_seconds"],
                                                    state.get("previous") is not None)
        error, meta = self.domain.bcast_object((error, meta))
        if error:
            raise CheckpointError(error)
        self.cycle, self.time, self.loop_seconds, has_previous = meta
        if has_previous:
            previous = self.domain.scatter(None if state is None else state["previous"][0])
            self.previous = (previous, self.domain.bcast_object(None if state is None else state["previous"][1]))
        self.ensemble = self.domain.scatter(None if state is None else state["ensemble"])
        if self.nature is not None:
            truth = self.domain.scatter(None if state is None else state["truth"])
            self.nature = NatureRun(self.truth_model, self.observer, truth, self.truth_steps_per_cycle, self.cycle,
                                    cycle_length=self.cycle_length)
        if state is not None:
            path = Path(path)
            for i in range(state["chunks"]):
                try:
                    self.recorder.extend_records(torch.load(_chunk_path(path, i), weights_only=False))
                except Exception as e:  # noqa: BLE001
                    raise CheckpointError(f"{_chunk_path(path, i)}: unreadable checkpoint chunk ({type(e).__name__})") from None
            self.recorder.rank_counts = state["rank_counts"]
            self._checkpoint_marks = {"chunks": state["chunks"], "lengths": self.recorder.lengths(), "path": path}

    def summary(self) -> dict:
        """Metrics averaged after burn-in, the run's shape and its speed."""
        out = {
            "case": self.case.name,
            "method": self.case.method,
            "members": self.case.ensemble.size,
            "cycles": self.cycle,
            "burn_in": self.case.run.burn_in,
            **self.recorder.summary(),
            "cycles_per_second": self.cycle / self.loop_seconds if self.loop_seconds > 0 else None,
            "ranks": self.domain.size,
        }
        return out

    # ------------------------------------------------------------ user-facing state

    @property
    def state(self) -> xr.Dataset:
        """The current ensemble as an xarray Dataset (member, *grid) per variable (serial or rank 0)."""
        full = self.domain.gather(self.ensemble)
        if full is None:
            raise RuntimeError("Twin.state is available on rank 0 only")
        from twin.io import grid_coordinates, mask_fields

        arr = full.detach().cpu().numpy()
        coords = {"member": np.arange(arr.shape[0]), **grid_coordinates(self.grid)}
        data = {v.name: (("member",) + self.grid.dims, arr[:, i], {"units": v.units, "long_name": v.long_name})
                for i, v in enumerate(self.model.variables)}
        ds = xr.Dataset(data, coords=coords, attrs={"model_time": self.time, "cycle": self.cycle})
        return mask_fields(ds, self.grid)  # masked points are NaN
