"""The initial state from a CF netCDF file (`initial:`): the grid, the variables and the ensemble.

A run with `initial:` has no nature run: its grid, mask and variables come from the file (read by
`twin.cfgrid`), its observations from `observations.path`. The members are the field plus
Gaussian perturbations of std `spread` (drawn from the "init" streams keyed by member, variable
and global grid index, as the synthetic initial ensemble is, so any rank count draws the same
ensemble), or consecutive times of the file (`members_from: times`), or one file each
(`members_from: [a.nc, b.nc, ...]`), plus `spread` (default 0 there). Masked points — NaN or
`_FillValue` in any variable or member, or excluded by `mask_variable` — hold 0 in the state.
Problems raise `ConfigError(where, "initial.<key>", message)`.
"""
from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch
import xarray as xr

from emulators.base import GridData, Variable
from twin.cfgrid import (FieldError, FieldLayout, check_units, convert_units, find_layout, open_fields,
                         read_values, same_grid, time_index)
from twin.config import CaseConfig, ConfigError, InitialConfig
from twin.domain import Decomposition, Grid
from twin.random import Streams

T = TypeVar("T")


def _keyed(where: str, key: str, call: Callable[..., T], *args: object) -> T:
    """call(*args), a FieldError turned into ConfigError(where, key, ...)."""
    try:
        return call(*args)
    except FieldError as e:
        raise ConfigError(where, key, str(e)) from None


@dataclass(frozen=True)
class InitialData:
    """The grid (with its mask), the variables and the initial fields read from `initial:`."""

    grid: Grid
    variables: tuple[Variable, ...]
    fields: np.ndarray  # (K, variable, *grid) float64: K = 1 (perturbed) or one per member; 0 where masked
    spread: tuple[float, ...]  # perturbation std per variable

    @property
    def field(self) -> np.ndarray:
        """The unperturbed initial field (variable, *grid): the field, or the members' mean."""
        return self.fields.mean(0)

    def ensemble(self, streams: Streams, domain: Decomposition, members: int, dtype: torch.dtype) -> torch.Tensor:
        """This rank's initial members (member, variable, *local grid)."""
        local = (slice(None), slice(None), *domain.local_slices)
        base = torch.from_numpy(np.ascontiguousarray(self.fields[local])).to(dtype)
        ens = base.expand(members, *base.shape[1:]) if base.shape[0] == 1 else base
        if any(self.spread):
            noise = streams.field_normal("init", (0,), members, len(self.variables), domain.local_flat_indices(),
                                         domain.local_shape, dtype)
            std = torch.tensor(self.spread, dtype=dtype).view(1, -1, *([1] * self.grid.ndim))
            ens = ens + std * noise
        return self.fill(ens.clone(), domain)

    def fill(self, state: torch.Tensor, domain: Decomposition) -> torch.Tensor:
        """`state` (..., *local grid) with 0 at masked points."""
        if self.grid.mask is None:
            return state
        valid = self.grid.mask_tensor()[domain.local_slices]
        return torch.where(valid, state, torch.zeros((), dtype=state.dtype))

    def read_like(self, path: str) -> np.ndarray:
        """The variables of another CF file on this grid (variable, *grid), averaged over its time
        axis, in this run's units, 0 at masked points (a climatology); ValueError if it does not fit."""
        with _opened(path, ValueError) as ds:
            out = []
            for v in self.variables:
                try:
                    layout = find_layout(ds, v.name, path)
                    if not same_grid(layout.grid, self.grid):
                        raise FieldError(f"{path}: {v.name} is on another grid than the initial field")
                    values = read_values(ds, v.name, layout, slice(None) if layout.time_dim else None)
                    values = values.mean(0) if layout.time_dim else values
                    values = convert_units(values, _attr(ds[v.name], "units") or v.units, v.units,
                                           f"{path}: {v.name}")
                except FieldError as e:
                    raise ValueError(str(e)) from None
                valid = self.grid.mask if self.grid.mask is not None else np.ones(self.grid.shape, bool)
                if not np.isfinite(values[valid]).all():
                    raise ValueError(f"{path}: {v.name} is missing at valid points of the initial field")
                out.append(np.where(valid, values, 0.0))
        return np.stack(out)


@contextmanager
def _opened(path: str, error: Callable[[str], Exception]) -> Iterator[xr.Dataset]:
    """The dataset of `path`, closed afterwards; an unreadable file raises error(message)."""
    try:
        ds = open_fields(path)
    except FieldError as e:
        raise error(str(e)) from None
    try:
        yield ds
    finally:
        ds.close()


def _attr(da, key: str) -> str:
    return str(da.attrs.get(key, "")).strip()


def _spread(cfg: InitialConfig, n: int, default: float) -> tuple[float, ...]:
    if cfg.spread is None:
        return (default if cfg.members_from is None else 0.0,) * n
    return (float(cfg.spread),) * n if isinstance(cfg.spread, float) else tuple(cfg.spread)


def _check_keys(cfg: InitialConfig, members: int, where: str) -> None:
    """Key-level checks that need no file (ConfigError naming the key)."""
    n = len(cfg.variables)
    if not n or len(set(cfg.variables)) != n:
        raise ConfigError(where, "initial.variables", "needs distinct variable names")
    if cfg.units and len(cfg.units) != n:
        raise ConfigError(where, "initial.units", f"needs one entry per variable ({n}) or none")
    if isinstance(cfg.spread, tuple) and len(cfg.spread) != n:
        raise ConfigError(where, "initial.spread", f"needs one value per variable ({n}) or a single number")
    if isinstance(cfg.spread, (float, tuple)) and min(np.atleast_1d(cfg.spread)) < 0:
        raise ConfigError(where, "initial.spread", "must be >= 0")
    if isinstance(cfg.members_from, tuple) and len(cfg.members_from) != members:
        raise ConfigError(where, "initial.members_from", f"lists {len(cfg.members_from)} files for "
                          f"{members} members (ensemble.size)")
    if cfg.members_from is None and not any(_spread(cfg, n, 1.0)):
        raise ConfigError(where, "initial.spread", "all members would be equal: give a spread > 0 or members_from")


def load_initial(cfg: InitialConfig, members: int, init_spread: float, where: str,
                 start: str | None = None) -> InitialData:
    """Read the initial state. With `start` (run.start), a field valid at another time is logged as
    a warning: observation windows are counted from run.start."""
    layout, variables, fields, mask = _load(cfg, members, where, True, start)
    valid = np.isfinite(fields).all(axis=(0, 1))
    if mask is not None:
        valid &= mask
    if not valid.any():
        raise ConfigError(where, "initial.path", f"{cfg.path}: no valid point (every point is missing or masked)")
    grid = dataclasses.replace(layout.grid, mask=None if valid.all() else valid)
    return InitialData(grid, variables, np.where(valid, fields, 0.0), _spread(cfg, len(variables), init_spread))


def initial_grid(cfg: InitialConfig, members: int, where: str) -> Grid:
    """The grid of `initial:` (without its mask): the keys and files checked, no field read."""
    return _load(cfg, members, where, False, None)[0].grid


def _load(cfg: InitialConfig, members: int, where: str, values: bool,
          start: str | None) -> tuple[FieldLayout, tuple[Variable, ...], np.ndarray | None, np.ndarray | None]:
    """(layout, variables, fields (K, variable, *grid) with NaN where missing, valid points by
    mask_variable); fields are read only with `values`."""
    _check_keys(cfg, members, where)
    with _opened(cfg.path, lambda m: ConfigError(where, "initial.path", m)) as ds:
        layouts = [_keyed(where, f"initial.variables.{i}", find_layout, ds, name, cfg.path)
                   for i, name in enumerate(cfg.variables)]
        layout = layouts[0]
        for i, other in enumerate(layouts[1:], 1):
            if not same_grid(other.grid, layout.grid):
                raise ConfigError(where, f"initial.variables.{i}", f"{cfg.path}: {cfg.variables[i]} is on another "
                                  f"grid than {cfg.variables[0]}")
        variables = tuple(_variable(ds[name], cfg.units[i] if cfg.units else None, name)
                          for i, name in enumerate(cfg.variables))
        for i, (name, v) in enumerate(zip(cfg.variables, variables)):
            _keyed(where, f"initial.units.{i}" if cfg.units else f"initial.variables.{i}", check_units,
                   _attr(ds[name], "units") or v.units, v.units, f"{cfg.path}: {name}")
        first = _first_time(ds, cfg, layouts, where)
        if start is not None and first is not None:
            _check_start(ds, layout, cfg, first, start)
        if cfg.members_from == "times":
            available = 0 if layout.time_dim is None else ds.sizes[layout.time_dim] - first
            if available < members:
                raise ConfigError(where, "initial.members_from", f"{cfg.path}: {available} times of "
                                  f"{cfg.variables[0]} from the first member on, fewer than the {members} members")
        mask = _mask_variable(ds, cfg, layout, where)
        fields = None
        if values and not isinstance(cfg.members_from, tuple):
            index: int | slice | None = slice(first, first + members) if cfg.members_from == "times" else first
            fields = np.stack([_read(ds, name, lay, index, v, cfg.path) for name, lay, v in
                               zip(cfg.variables, layouts, variables)], axis=-1 - layout.grid.ndim)
            fields = fields if cfg.members_from == "times" else fields[None]
    if isinstance(cfg.members_from, tuple):
        members_ = [_member_file(cfg, path, i, layout.grid, variables, where, values)
                    for i, path in enumerate(cfg.members_from)]
        fields = np.stack(members_) if values else None
    return layout, variables, fields, mask


def _variable(da, units: str | None, name: str) -> Variable:
    std = _attr(da, "standard_name") or None
    return Variable(name, units or _attr(da, "units") or "1", _attr(da, "long_name") or name, std)


def _first_time(ds, cfg: InitialConfig, layouts: list[FieldLayout], where: str) -> int | None:
    """The time index of the (first) field; None for a variable without time axis."""
    if cfg.time is None:
        return 0 if layouts[0].time_dim is not None else None
    found = {_keyed(where, "initial.time", time_index, ds, lay, name, cfg.time, cfg.path)
             for name, lay in zip(cfg.variables, layouts)}
    if len(found) > 1:
        raise ConfigError(where, "initial.time", f"{cfg.path}: the variables have {cfg.time} at different positions")
    return found.pop()


def _check_start(ds, layout: FieldLayout, cfg: InitialConfig, first: int, start: str) -> None:
    """Warn when the (first) field is not valid at the run's start."""
    try:
        at_start = time_index(ds, layout, cfg.variables[0], start, cfg.path)
    except FieldError:
        at_start = None
    if at_start != first:
        logging.getLogger(__name__).warning(
            "%s: the initial field is not the one at run.start = %s; observation times are counted from "
            "run.start (set run.start or initial.time)", cfg.path, start)


def _read(ds, name: str, layout: FieldLayout, index: int | slice | None, v: Variable, path: str) -> np.ndarray:
    values = read_values(ds, name, layout, index)
    return convert_units(values, _attr(ds[name], "units") or v.units, v.units, f"{path}: {name}")


def _mask_variable(ds, cfg: InitialConfig, layout: FieldLayout, where: str) -> np.ndarray | None:
    """Valid points by `mask_variable` (nonzero or zero valid, per `mask_valid`), on the internal grid."""
    if cfg.mask_variable is None:
        return None
    lay = _keyed(where, "initial.mask_variable", find_layout, ds, cfg.mask_variable, cfg.path)
    if not same_grid(lay.grid, layout.grid):
        raise ConfigError(where, "initial.mask_variable", f"{cfg.path}: {cfg.mask_variable} is on another grid "
                          f"than {cfg.variables[0]}")
    m = read_values(ds, cfg.mask_variable, lay, None)
    flag = np.nan_to_num(m, nan=0.0) != 0
    return np.isfinite(m) & (flag if cfg.mask_valid == "nonzero" else ~flag)


def _member_file(cfg: InitialConfig, path: str, i: int, grid: Grid, variables: tuple[Variable, ...], where: str,
                 values: bool) -> np.ndarray | None:
    """One member's fields (variable, *grid) from its own file, at `initial.time` (or its first);
    with `values` False the file is only checked."""
    key = f"initial.members_from.{i}"
    out = []
    with _opened(path, lambda m: ConfigError(where, key, m)) as ds:
        for name, v in zip(cfg.variables, variables):
            lay = _keyed(where, key, find_layout, ds, name, path)
            if not same_grid(lay.grid, grid):
                raise ConfigError(where, key, f"{path}: {name} is on another grid than in {cfg.path}")
            t = None if cfg.time is None else _keyed(where, key, time_index, ds, lay, name, cfg.time, path)
            if values:
                out.append(_keyed(where, key, _read, ds, name, lay, t, v, path))
    return np.stack(out) if values else None


def data_model(cls: type, case: CaseConfig, domain: Decomposition, dtype: torch.dtype, initial: InitialData):
    """The forecast model on the grid of `initial:` (a ValueError from it is a ConfigError naming `model`)."""

    def local(fields: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(fields[(slice(None), *domain.local_slices)])).to(dtype)

    data = GridData(initial.variables, local(initial.field), lambda path: local(initial.read_like(path)))
    try:
        return cls(case.model.config, domain, dtype, data=data)
    except ValueError as e:
        raise ConfigError(f"case {case.name}", "model", str(e)) from None
