"""BMI 2.0 adapter (bmipy): embed a twin in a host code; `bmi-test twin.bmi:TwinBmi` checks it.

`initialize(case.yaml)` builds the `Twin` (`TwinBmi(comm)`: on an MPI communicator, each rank's
instance exposing its own subdomain); `update()` is one cycle: assimilate, then forecast to the next
cycle; time is in seconds since the start. Arrays are flattened 1-D, C order. V is each model
variable's CF standard name where the model gives one, else its name (Lorenz-96: "X").

Outputs: `V_analysis_mean`, `V_analysis_spread` (std over members, N - 1), `V_analysis_ensemble`
(member, *grid), all of the last analysis, valid at current_time - time_step (before the first
update: the initial ensemble); `V_ensemble` (member, *grid), the ensemble at the current time (the
next prior; also an input). Grids 0 (local model grid) and 1 (member x local grid) are
`uniform_rectilinear`.

Observations for the next cycle, point values interpolated n-linearly (grid 2: `unstructured`, nodes
only; bmi-tester rejects BMI's "points" type): `observation_value`, `observation_error_std`,
`observation_<dim>` per grid axis, `observation_variable` (model variable index), `observation_id`.
They mirror the twin's own observations until the host sets one. `observation_count` = n resizes
and resets them (NaN values and locations, the case's error_std, variable 0, ids 0..n-1); -1 hands
them back to the twin. Host arrays persist across cycles except the values, reset to NaN after each
update; NaN values are missing. A cycle in which the host set none uses the twin's own. Under MPI,
give every rank all observations, or each rank those whose lower interpolation corner it owns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from bmipy import Bmi

from assim.observations import ObservationBatch
from assim.points import PointsOperator, grid_origin
from twin.config import load_case
from twin.twin import Twin

STATE, ENSEMBLE, OBS, SCALAR = 0, 1, 2, 3
COUNT, VALUE, ERROR, VARIABLE, IDS = ("observation_count", "observation_value", "observation_error_std",
                                      "observation_variable", "observation_id")


@dataclass(frozen=True)
class _Var:
    kind: str  # mean | spread | analysis_ensemble | ensemble | obs | count
    units: str
    grid: int
    dtype: str
    index: int = 0  # model variable index (state kinds)
    input: bool = False
    output: bool = True


def _axis_units(grid, axis: int) -> str:
    if tuple(grid.dims) == ("lat", "lon") and hasattr(grid, "origin"):
        return ("degrees_north", "degrees_east")[axis]
    return grid.units


class TwinBmi(Bmi):
    """The twin behind the Basic Model Interface 2.0 (see the module docstring for the variables)."""

    def __init__(self, comm: object | None = None, overrides: Iterable[str] = ()) -> None:
        self._comm = comm
        self._overrides = tuple(overrides)
        self.twin: Twin | None = None
        self._vars: dict[str, _Var] = {}

    # ------------------------------------------------------------ control

    def initialize(self, config_file: str) -> None:
        """Build the twin from a case YAML (`Twin(case, comm)`); nothing is written to disk."""
        tw = self.twin = Twin(load_case(config_file, self._overrides), self._comm)
        grid = tw.grid
        self._local = tuple(tw.domain.local_shape)
        self._start = tuple(s.start or 0 for s in tw.domain.local_slices)
        self._members = tw.ensemble.shape[0]
        self._np_dtype = np.dtype(str(tw.dtype).replace("torch.", ""))
        ftype = self._np_dtype.name
        names = [v.standard_name or v.name for v in tw.model.variables]
        if len(set(names)) < len(names):
            names = [v.name for v in tw.model.variables]
        self._vars = {}
        for i, (name, v) in enumerate(zip(names, tw.model.variables)):
            self._vars[f"{name}_analysis_mean"] = _Var("mean", v.units, STATE, ftype, i)
            self._vars[f"{name}_analysis_spread"] = _Var("spread", v.units, STATE, ftype, i)
            self._vars[f"{name}_analysis_ensemble"] = _Var("analysis_ensemble", v.units, ENSEMBLE, ftype, i)
            self._vars[f"{name}_ensemble"] = _Var("ensemble", v.units, ENSEMBLE, ftype, i, input=True)
        self._obs_axes = {f"observation_{d}": a for a, d in enumerate(grid.dims)}
        self._vars[COUNT] = _Var("count", "1", SCALAR, "int64", input=True, output=False)
        units = {VALUE: "1", ERROR: "1", VARIABLE: "1", IDS: "1"}
        if len(set(v.units for v in tw.model.variables)) == 1:  # one unit for every variable: say it
            units[VALUE] = units[ERROR] = tw.model.variables[0].units
        units.update({n: _axis_units(grid, a) for n, a in self._obs_axes.items()})
        for name in (VALUE, ERROR, *self._obs_axes, VARIABLE, IDS):
            dtype = "int64" if name in (VARIABLE, IDS) else "float64"
            self._vars[name] = _Var("obs", units[name], OBS, dtype, input=True)
        self._analysis = tw.ensemble
        self._analysis_cycle: int | None = None
        self._bufs: dict[str, np.ndarray] = {}
        for name, var in self._vars.items():
            if var.kind in ("mean", "spread"):
                self._bufs[name] = np.empty(math.prod(self._local), self._np_dtype)
        self._live: set[str] = set()  # ensemble variables a host asked for: kept up to date
        self._count = np.zeros(1, np.int64)
        self._obs: dict[str, np.ndarray] = {}
        self._resize(0)
        self._op_cache: tuple[bytes, PointsOperator] | None = None
        self._host_owned = False  # observation arrays: the twin's own (mirrored) or the host's
        self._host_set = False  # the host set an observation input since the last update
        self._filled: int | None = None  # cycle whose twin observations the arrays mirror (lazily)
        self._refresh()

    def update(self) -> None:
        """One cycle: assimilate (the host's observations, else the twin's own), then forecast."""
        tw = self._require()
        self._sync_ensemble()
        self._analysis = tw.assimilate(self._host_batch() if self._host_set else None)
        self._analysis_cycle = tw.cycle
        tw.forecast()
        if self._host_owned:
            self._obs[VALUE][:] = np.nan
        self._host_set = False
        self._refresh()

    def update_until(self, time: float) -> None:
        """Run cycles until the current time reaches `time` (the first cycle boundary at or after it)."""
        step = self.get_time_step()
        if time < self.get_current_time() - 1e-6 * step:
            raise ValueError(f"update_until: {time} s is before the current time {self.get_current_time()} s")
        while self.get_current_time() < time - 1e-6 * step:
            self.update()

    def finalize(self) -> None:
        self.twin = None
        self._bufs, self._obs = {}, {}

    # ------------------------------------------------------------ info and time

    def get_component_name(self) -> str:
        return "EarthTwin"

    def get_input_item_count(self) -> int:
        return len(self.get_input_var_names())

    def get_output_item_count(self) -> int:
        return len(self.get_output_var_names())

    get_input_var_name_count = get_input_item_count  # BMI 1 names, which bmi-tester still probes
    get_output_var_name_count = get_output_item_count

    def get_input_var_names(self) -> tuple[str, ...]:
        return tuple(n for n, v in self._vars.items() if v.input)

    def get_output_var_names(self) -> tuple[str, ...]:
        return tuple(n for n, v in self._vars.items() if v.output)

    def get_start_time(self) -> float:
        return 0.0

    def get_current_time(self) -> float:
        return float(self._require().cycle * self.get_time_step())  # = twin.time in s, without drift

    def get_end_time(self) -> float:
        return float(self._require().case.run.cycles * self.get_time_step())

    def get_time_step(self) -> float:
        tw = self._require()
        return float(tw.steps_per_cycle * tw.model.dt * tw.model.time_unit_seconds)

    def get_time_units(self) -> str:
        return "s"

    # ------------------------------------------------------------ variable info

    def _var(self, name: str) -> _Var:
        try:
            return self._vars[name]
        except KeyError:
            raise KeyError(f"{name!r}: not a variable of this twin (see get_output_var_names)") from None

    def get_var_type(self, name: str) -> str:
        return self._var(name).dtype

    def get_var_units(self, name: str) -> str:
        return self._var(name).units

    def get_var_itemsize(self, name: str) -> int:
        return np.dtype(self._var(name).dtype).itemsize

    def get_var_nbytes(self, name: str) -> int:
        return self.get_var_itemsize(name) * self.get_grid_size(self._var(name).grid)

    def get_var_location(self, name: str) -> str:
        return "none" if self._var(name).grid == SCALAR else "node"

    def get_var_grid(self, name: str) -> int:
        return self._var(name).grid

    # ------------------------------------------------------------ getters and setters

    def get_value_ptr(self, name: str) -> np.ndarray:
        """The variable's persistent buffer, updated in place after each update (observation arrays
        are reallocated when `observation_count` changes)."""
        var = self._var(name)
        if var.kind in ("obs", "count"):
            self._mirror()
            return self._count if var.kind == "count" else self._obs[name]
        if var.kind in ("ensemble", "analysis_ensemble") and name not in self._live:
            self._bufs[name] = np.empty(self._members * math.prod(self._local), self._np_dtype)
            self._live.add(name)
            self._copy_out(name)
        return self._bufs[name]

    def get_value(self, name: str, dest: np.ndarray) -> np.ndarray:
        dest[:] = self.get_value_ptr(name)
        return dest

    def get_value_at_indices(self, name: str, dest: np.ndarray, inds: np.ndarray) -> np.ndarray:
        dest[:] = self.get_value_ptr(name)[np.asarray(inds)]
        return dest

    def set_value(self, name: str, src: np.ndarray) -> None:
        self._set(name, np.asarray(src).reshape(-1), None)

    def set_value_at_indices(self, name: str, inds: np.ndarray, src: np.ndarray) -> None:
        self._set(name, np.asarray(src).reshape(-1), np.asarray(inds).reshape(-1))

    def _set(self, name: str, src: np.ndarray, inds: np.ndarray | None) -> None:
        var = self._var(name)
        if not var.input:
            raise ValueError(f"{name}: an output variable; it cannot be set")
        if var.kind == "count":
            n = int(src[0])
            if n == -1:  # hand the arrays back: they show (and update uses) the twin's own observations
                self._host_owned = self._host_set = False
                self._mirror()
                return
            if n < 0:
                raise ValueError(f"{COUNT}: must be >= 0 (or -1: the twin's own observations), got {n}")
            self._resize(n)
            self._obs[VALUE][:] = np.nan
            self._obs[ERROR][:] = self._require().case.observations.error_std
            self._obs[VARIABLE][:] = 0
            self._obs[IDS][:] = np.arange(n)
            for axis in self._obs_axes:
                self._obs[axis][:] = np.nan
            self._host_owned = self._host_set = True
            return
        buf = self.get_value_ptr(name)
        expected = buf.size if inds is None else inds.size
        if src.size != expected:
            hint = f" (set {COUNT} first)" if var.kind == "obs" else ""
            raise ValueError(f"{name}: got {src.size} values, expected {expected}{hint}")
        if inds is None:
            buf[:] = src
        else:
            buf[inds] = src
        if var.kind == "obs":
            self._host_owned = self._host_set = True
            return
        self._sync_ensemble()
        if self._analysis_cycle is None:  # no analysis yet: the outputs describe the ensemble set
            self._analysis = self._require().ensemble
            self._refresh()

    # ------------------------------------------------------------ grids

    def get_grid_type(self, grid: int) -> str:
        return {STATE: "uniform_rectilinear", ENSEMBLE: "uniform_rectilinear", OBS: "unstructured",
                SCALAR: "scalar"}[self._grid(grid)]

    def _grid(self, grid: int) -> int:
        if grid not in (STATE, ENSEMBLE, OBS, SCALAR):
            raise KeyError(f"grid {grid}: no such grid (0 model, 1 ensemble, 2 observations, 3 scalar)")
        return grid

    def _shape(self, grid: int) -> tuple[int, ...]:
        if grid == OBS:
            self._mirror()
        return {STATE: self._local, ENSEMBLE: (self._members, *self._local), OBS: (int(self._count[0]),),
                SCALAR: ()}[self._grid(grid)]

    def get_grid_rank(self, grid: int) -> int:
        if grid == OBS:
            return self._require().grid.ndim
        return len(self._shape(grid))

    def get_grid_size(self, grid: int) -> int:
        return math.prod(self._shape(grid))

    def get_grid_shape(self, grid: int, shape: np.ndarray) -> np.ndarray:
        shape[:] = self._shape(self._structured(grid))
        return shape

    def get_grid_spacing(self, grid: int, spacing: np.ndarray) -> np.ndarray:
        h = tuple(self._require().grid.spacing)
        spacing[:] = {STATE: h, ENSEMBLE: (1.0, *h)}[self._structured(grid)]
        return spacing

    def get_grid_origin(self, grid: int, origin: np.ndarray) -> np.ndarray:
        g = self._require().grid
        local = tuple(o + s * h for o, s, h in zip(grid_origin(g), self._start, g.spacing))
        origin[:] = {STATE: local, ENSEMBLE: (0.0, *local)}[self._structured(grid)]
        return origin

    def _structured(self, grid: int) -> int:
        if self._grid(grid) not in (STATE, ENSEMBLE):
            raise ValueError(f"grid {grid} is {self.get_grid_type(grid)}: no shape, spacing or origin")
        return grid

    def _coordinate(self, grid: int, axis_from_end: int, dest: np.ndarray) -> np.ndarray:
        rank = self.get_grid_rank(grid)
        if axis_from_end > rank:
            raise ValueError(f"grid {grid} has rank {rank}: no coordinate {'xyz'[axis_from_end - 1]}")
        axis = rank - axis_from_end
        if self._grid(grid) == OBS:
            dest[:] = self.get_value_ptr(list(self._obs_axes)[axis])
            return dest
        spacing = self.get_grid_spacing(grid, np.empty(rank))
        origin = self.get_grid_origin(grid, np.empty(rank))
        dest[:] = origin[axis] + np.arange(self._shape(grid)[axis]) * spacing[axis]
        return dest

    def get_grid_x(self, grid: int, x: np.ndarray) -> np.ndarray:
        return self._coordinate(grid, 1, x)

    def get_grid_y(self, grid: int, y: np.ndarray) -> np.ndarray:
        return self._coordinate(grid, 2, y)

    def get_grid_z(self, grid: int, z: np.ndarray) -> np.ndarray:
        return self._coordinate(grid, 3, z)

    def get_grid_node_count(self, grid: int) -> int:
        return self.get_grid_size(grid)

    def _point_cloud(self, grid: int, dest: np.ndarray | None = None):
        if self._grid(grid) != OBS:
            raise ValueError(f"grid {grid} is {self.get_grid_type(grid)}: no edges or faces")
        return 0 if dest is None else dest  # a point cloud: no edges, no faces

    def get_grid_edge_count(self, grid: int) -> int:
        return self._point_cloud(grid)

    def get_grid_edge_nodes(self, grid: int, edge_nodes: np.ndarray) -> np.ndarray:
        return self._point_cloud(grid, edge_nodes)

    get_grid_face_count = get_grid_edge_count
    get_grid_face_edges = get_grid_face_nodes = get_grid_nodes_per_face = get_grid_edge_nodes

    # ------------------------------------------------------------ internals

    def _require(self) -> Twin:
        if self.twin is None:
            raise RuntimeError("TwinBmi: call initialize(config_file) first")
        return self.twin

    def _resize(self, n: int) -> None:
        """Observation arrays of length n (reallocated only when n changes)."""
        if self._obs and n == int(self._count[0]):
            return
        self._count[0] = n
        for name, var in self._vars.items():
            if var.kind == "obs":
                self._obs[name] = np.full(n, np.nan) if var.dtype == "float64" else np.zeros(n, np.int64)

    def _mirror(self) -> None:
        """Unless the host owns them, fill the observation arrays with the twin's own observations
        of the current cycle (once a cycle)."""
        tw = self._require()
        if self._host_owned or self._filled == tw.cycle:
            return
        batch = tw.observe()
        self._resize(batch.size)
        self._obs[VALUE][:] = batch.values.detach().cpu().numpy()
        self._obs[ERROR][:] = batch.error_std.detach().cpu().numpy()
        self._obs[IDS][:] = batch.ids.cpu().numpy()
        variable = torch.as_tensor(getattr(batch.operator, "variable", 0))
        self._obs[VARIABLE][:] = variable.expand(batch.size).cpu().numpy()
        loc = batch.locations.detach().cpu().numpy().reshape(batch.size, -1)
        for name, axis in self._obs_axes.items():
            self._obs[name][:] = loc[:, axis]
        self._filled = tw.cycle

    def _host_batch(self) -> ObservationBatch:
        """The host's observations as a batch with the `points` operator (NaN values skipped)."""
        tw = self._require()
        o = self._obs
        keep = np.isfinite(o[VALUE])
        loc = np.stack([o[name] for name in self._obs_axes], -1)[keep]
        err, var, ids = o[ERROR][keep], o[VARIABLE][keep], o[IDS][keep]
        if not np.isfinite(loc).all():
            raise ValueError("observation locations: NaN or infinite where a value is set")
        if not (np.isfinite(err).all() and (err > 0).all()):
            raise ValueError(f"{ERROR}: must be finite and > 0 where a value is set")
        if ((var < 0) | (var >= len(tw.model.variables))).any():
            raise ValueError(f"{VARIABLE}: must be in 0..{len(tw.model.variables) - 1}")
        key = loc.tobytes() + var.tobytes()
        if self._op_cache is None or self._op_cache[0] != key:  # a fixed network reuses its operator
            self._op_cache = (key, PointsOperator(tw.grid, loc, var, tw.domain))
        op = self._op_cache[1]
        idx = op.index.numpy()
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a[idx])).to(tw.dtype)  # noqa: E731
        return ObservationBatch(tw.time, as_t(o[VALUE][keep]), as_t(err), torch.from_numpy(ids[idx]), op)

    def _copy_out(self, name: str) -> None:
        var = self._vars[name]
        source = self._analysis if var.kind == "analysis_ensemble" else self._require().ensemble
        np.copyto(self._bufs[name], source[:, var.index].detach().cpu().numpy().reshape(-1))

    def _refresh(self) -> None:
        """Bring the output buffers up to date (in place, so pointers stay valid)."""
        mean, spread = self._analysis.mean(0), self._analysis.std(0)
        for name, var in self._vars.items():
            if var.kind in ("mean", "spread"):
                field = mean if var.kind == "mean" else spread
                np.copyto(self._bufs[name], field[var.index].detach().cpu().numpy().reshape(-1))
        for name in self._live:
            self._copy_out(name)

    def _sync_ensemble(self) -> None:
        """Carry what a host wrote into `V_ensemble` buffers (set_value or a pointer) into the twin."""
        tw = self._require()
        live = [n for n in self._live if self._vars[n].kind == "ensemble"]
        if not live:
            return
        ens = tw.ensemble.clone()  # never in place: the recorder holds the old tensor
        for name in live:
            buf = torch.from_numpy(self._bufs[name]).reshape(self._members, *self._local)
            ens[:, self._vars[name].index] = buf.to(ens)
        tw.ensemble = ens
