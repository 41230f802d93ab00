"""Training pairs from a user's CF netCDF archive (the data side of training on real data).

`open_archive` scans a multi-file archive (glob patterns), finds the time, latitude and longitude axes
from CF attributes (standard_name, axis, units; never from names), decodes any CF calendar with cftime
and puts every time on one lattice t0 + k·τ (τ: the archive's time step). A pair (x_t, x_{t+Δ}) exists
only where both times are in the archive, so gaps between or inside files never make false pairs, and
contiguous files do make cross-file pairs. The last `validation_fraction` of the times is held out as
one contiguous block; pairs that straddle the boundary belong to neither split. Fields are read lazily,
per batch, through a small cache of open files; rows run south to north whatever the files' order.
Every problem raises `ConfigError(file, key, msg)` with a one-line message naming the path or variable.
"""
from __future__ import annotations

import datetime
import glob
import hashlib
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cftime
import netCDF4
import numpy as np
import torch

from twin.config import ConfigError, duration_seconds, parse_dataclass

SPLITS = ("train", "validation")
_OPEN_FILES = 16
_CHUNK_VALUES = 1 << 23  # about what the streaming passes read at once (float32 values)
_CALENDARS = {"gregorian": "standard", "365_day": "noleap", "366_day": "all_leap"}
_DEGREES = {"latitude": {"degrees_north", "degree_north", "degrees_n", "degree_n"},
            "longitude": {"degrees_east", "degree_east", "degrees_e", "degree_e"}}
_DATE = re.compile(r"\s*(\d{1,4})-(\d{1,2})-(\d{1,2})(?:[T ](\d{1,2}):(\d{2})(?::(\d{2}))?)?\s*")


@dataclass(frozen=True)
class TimeSlice:
    """The part of the archive's time axis used (both ends inclusive), dates in the archive's calendar."""

    start: str | None = field(default=None, metadata={"help": "first time used, YYYY-MM-DD[ HH:MM[:SS]]"})
    end: str | None = field(default=None, metadata={"help": "last time used (inclusive), same form"})


@dataclass(frozen=True)
class ArchiveConfig:
    paths: tuple[str, ...] = field(metadata={
        "help": "netCDF files or glob patterns; relative ones are resolved against the case file's folder"})
    variables: tuple[str, ...] = field(metadata={"help": "variables of the archive, in state order"})
    step: float | str = field(default="6h", metadata={"help": "emulator step Δ, a multiple of the archive's"})
    validation_fraction: float = field(default=0.1, metadata={
        "gt": 0, "max": 0.5, "help": "last fraction of the times, held out as one block"})
    time_slice: TimeSlice | None = field(default=None, metadata={"help": "{start, end} of the times used"})


def parse_archive_config(data: Any, file: str, key: str = "data") -> ArchiveConfig:
    """Strictly parse a `data:` section that names an archive (checks what needs no file)."""
    if isinstance(data, dict) and isinstance(data.get("time_slice"), dict):
        data = {**data, "time_slice": {k: _date_text(v) for k, v in data["time_slice"].items()}}
    cfg = parse_dataclass(ArchiveConfig, data, key, file)
    for name in ("paths", "variables"):
        if not getattr(cfg, name):
            raise ConfigError(file, f"{key}.{name}", "must not be empty")
    dup = sorted({v for v in cfg.variables if cfg.variables.count(v) > 1})
    if dup:
        raise ConfigError(file, f"{key}.variables", f"repeated: {', '.join(dup)}")
    _step_seconds(cfg, file, key)
    if cfg.time_slice is not None:
        start, end = (_date_fields(getattr(cfg.time_slice, e), file, f"{key}.time_slice.{e}")
                      for e in ("start", "end"))
        if start is not None and end is not None and start > end:
            raise ConfigError(file, f"{key}.time_slice", "start is after end")
    return cfg


def _step_seconds(cfg: ArchiveConfig, file: str, key: str) -> float:
    return duration_seconds(cfg.step, file, f"{key}.step")


def _date_text(value: Any) -> Any:
    """YAML reads an unquoted 2000-01-31 (06:00:00) as a date (time): back to the text that was meant."""
    if isinstance(value, datetime.datetime):
        return value.replace(tzinfo=None).isoformat(sep=" ")
    return value.isoformat() if isinstance(value, datetime.date) else value


def _date_fields(text: str | None, file: str, key: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    m = _DATE.fullmatch(text)
    if not m:
        raise ConfigError(file, key, f"expected a date like 2000-01-31 or 2000-01-31 06:00 (got {text!r})")
    return tuple(int(g or 0) for g in m.groups())


# ---------------------------------------------------------------- scanning one file


@dataclass(frozen=True)
class _Field:
    """How to read one variable of one file as (time, y, x), rows south to north."""

    name: str
    dims: tuple[str, ...]
    axes: tuple[str, str, str]  # (time, y, x) dimension names
    flip_y: bool

    def read(self, ds: netCDF4.Dataset, times: slice | np.ndarray) -> np.ndarray:
        key = tuple(times if d == self.axes[0] else slice(None) if d in self.axes else 0 for d in self.dims)
        arr = np.ma.filled(np.ma.asarray(ds.variables[self.name][key]).astype(np.float32), np.nan)
        kept = [d for d in self.dims if d in self.axes]
        arr = arr.transpose([kept.index(a) for a in self.axes])
        return arr[:, ::-1] if self.flip_y else arr


@dataclass(frozen=True)
class _Scan:
    path: str
    dates: np.ndarray  # cftime objects, file order
    calendar: str
    lat: np.ndarray
    lon: np.ndarray
    fields: tuple[_Field, ...]
    attrs: tuple[tuple[str, str, str], ...]  # (name, units, long_name)


def _attr(var: Any, name: str) -> str:
    return str(getattr(var, name, "")).strip()


def _only(found: list[str], what: str, path: str, file: str, key: str) -> str:
    if len(found) != 1:
        why = f"several {what} variables ({', '.join(found)})" if found else f"no {what} variable"
        raise ConfigError(file, key, f"{path}: {why} (looked for CF standard_name, axis and units)")
    return found[0]


def _is_coord(var: Any, kind: str) -> bool:
    units = _attr(var, "units").lower()
    axis = {"latitude": "Y", "longitude": "X"}[kind]
    return (_attr(var, "standard_name") == kind or units in _DEGREES[kind]
            or (_attr(var, "axis") == axis and units.startswith("degree")))


def _scan(path: str, cfg: ArchiveConfig, file: str, key: str) -> _Scan:
    """Axes, calendar, dates and read recipes of one file (opened and closed here)."""
    try:
        ds = netCDF4.Dataset(path, "r")
    except OSError as e:
        raise ConfigError(file, f"{key}.paths", f"{path}: not a readable netCDF file ({e})") from None
    with ds:
        vs = ds.variables
        for i, name in enumerate(cfg.variables):
            if name not in vs:
                raise ConfigError(file, f"{key}.variables.{i}", f"{path}: no variable {name!r}")
            if vs[name].dtype.kind not in "fiu":
                raise ConfigError(file, f"{key}.variables.{i}", f"{path}: {name!r} is not numeric")
        ones = {n: v for n, v in vs.items() if v.ndim == 1}
        marked = [n for n, v in ones.items()
                  if _attr(v, "standard_name") == "time" or _attr(v, "axis") == "T"]
        since = [n for n, v in ones.items() if " since " in _attr(v, "units")]
        tname = _only(marked or since, "time", path, file, key)
        tdim = vs[tname].dimensions[0]
        first = vs[cfg.variables[0]]
        sizes = {d: len(ds.dimensions[d]) for d in first.dimensions}
        space = tuple(d for d in first.dimensions if d != tdim and sizes[d] > 1)
        if tdim not in first.dimensions or len(space) != 2:
            raise ConfigError(file, f"{key}.variables.0", f"{path}: {cfg.variables[0]!r} has dimensions "
                              f"{first.dimensions}; expected time ({tdim}) and two spatial dimensions")
        near = [n for n, v in vs.items() if 1 <= v.ndim <= 2 and set(v.dimensions) <= set(space)]
        lat = vs[_only([n for n in near if _is_coord(vs[n], "latitude")], "latitude", path, file, key)]
        lon = vs[_only([n for n in near if _is_coord(vs[n], "longitude")], "longitude", path, file, key)]
        if lat.ndim == 1 and lon.ndim == 1 and {lat.dimensions[0], lon.dimensions[0]} == set(space):
            ydim, xdim = lat.dimensions[0], lon.dimensions[0]
        elif lat.ndim == 2 and lat.dimensions == lon.dimensions:
            ydim, xdim = lat.dimensions
        else:
            raise ConfigError(file, f"{key}.paths", f"{path}: latitude {lat.dimensions} and longitude "
                              f"{lon.dimensions} do not span the grid {space}")
        la, lo = (np.ma.filled(np.ma.asarray(c[:]).astype(np.float64), np.nan) for c in (lat, lon))
        flip = bool(np.nanmean(la[-1]) < np.nanmean(la[0]))
        if flip:
            la, lo = la[::-1], (lo[::-1] if lo.ndim == 2 else lo)
        fields, attrs = [], []
        for i, name in enumerate(cfg.variables):
            v = vs[name]
            extra = [d for d in v.dimensions if d not in (tdim, ydim, xdim) and len(ds.dimensions[d]) != 1]
            if not {tdim, ydim, xdim} <= set(v.dimensions) or extra:
                raise ConfigError(file, f"{key}.variables.{i}", f"{path}: {name!r} has dimensions "
                                  f"{v.dimensions}; expected ({tdim}, {ydim}, {xdim}) and size-1 others")
            fields.append(_Field(name, v.dimensions, (tdim, ydim, xdim), flip))
            attrs.append((name, _attr(v, "units"), _attr(v, "long_name") or name))
        tv = vs[tname]
        calendar = _attr(tv, "calendar").lower() or "standard"
        calendar = _CALENDARS.get(calendar, calendar)
        try:
            values = np.ma.asarray(tv[:])
            if np.ma.is_masked(values):
                raise ValueError("missing time values")
            dates = np.asarray(cftime.num2date(values.filled(), _attr(tv, "units"), calendar,
                                               only_use_cftime_datetimes=True)).reshape(-1)
        except (ValueError, TypeError) as e:
            raise ConfigError(file, f"{key}.paths", f"{path}: cannot decode time {tname!r} ({e})") from None
    return _Scan(path, dates, calendar, la, lo, tuple(fields), tuple(attrs))


# ---------------------------------------------------------------- the archive


def _expand(cfg: ArchiveConfig, base_dir: str | Path, file: str, key: str) -> list[str]:
    out: list[str] = []
    for i, pattern in enumerate(cfg.paths):
        full = os.path.join(base_dir, os.path.expanduser(pattern))
        found = sorted(glob.glob(full))
        if not found:
            raise ConfigError(file, f"{key}.paths.{i}", f"{full}: no such file")
        out += [p for p in found if p not in out]
    return out


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=0, atol=1e-6, equal_nan=True))


def open_archive(cfg: ArchiveConfig, base_dir: str | Path, file: str, key: str = "data") -> "Archive":
    """Scan and check the archive `cfg` names; `file` and `key` locate the case's section in errors."""
    step = _step_seconds(cfg, file, key)
    scans = [_scan(p, cfg, file, key) for p in _expand(cfg, base_dir, file, key)]
    ref = scans[0]
    for s in scans[1:]:
        if s.calendar != ref.calendar:
            raise ConfigError(file, f"{key}.paths", f"{s.path}: calendar {s.calendar} differs from "
                              f"{ref.calendar} of {ref.path}")
        if not (_same(s.lat, ref.lat) and _same(s.lon, ref.lon)):
            raise ConfigError(file, f"{key}.paths", f"{s.path}: grid {s.lat.shape}/{s.lon.shape} differs "
                              f"from that of {ref.path}")
        for i, (a, b) in enumerate(zip(s.attrs, ref.attrs)):
            if a[1] != b[1]:
                raise ConfigError(file, f"{key}.variables.{i}", f"{s.path}: {a[0]!r} has units {a[1]!r}, "
                                  f"{ref.path} has {b[1]!r}")
    dates = np.concatenate([s.dates for s in scans])
    origin = min(dates)
    units = f"seconds since {origin.strftime('%Y-%m-%d %H:%M:%S')}"
    seconds = np.asarray(cftime.date2num(dates, units, ref.calendar), dtype=np.float64).reshape(-1)
    owner = np.concatenate([np.full(len(s.dates), f) for f, s in enumerate(scans)])
    local = np.concatenate([np.arange(len(s.dates)) for s in scans])
    order = np.argsort(seconds, kind="stable")
    seconds, dates, owner, local = seconds[order], dates[order], owner[order], local[order]
    if len(seconds) < 2:
        raise ConfigError(file, f"{key}.paths", f"{ref.path}: the archive needs at least two times")
    gaps = np.diff(seconds)
    if (gaps == 0).any():
        i = int(np.argmax(gaps == 0))
        raise ConfigError(file, f"{key}.paths", f"time {dates[i]} is in both {scans[owner[i]].path} and "
                          f"{scans[owner[i + 1]].path}")
    tau = float(gaps.min())
    lattice = (seconds - seconds[0]) / tau
    off = np.abs(lattice - np.round(lattice)) > 1e-6
    if off.any():
        i = int(np.argmax(off))
        raise ConfigError(file, f"{key}.paths", f"{scans[owner[i]].path}: time {dates[i]} is off the "
                          f"archive's regular {tau:g} s time step")
    if abs(step / tau - round(step / tau)) > 1e-6:
        raise ConfigError(file, f"{key}.step", f"{cfg.step} ({step:g} s) is not a whole multiple of the "
                          f"archive's time step ({tau:g} s)")
    keep = np.ones(len(dates), bool)
    if cfg.time_slice is not None:
        for end in ("start", "end"):
            parts = _date_fields(getattr(cfg.time_slice, end), file, f"{key}.time_slice.{end}")
            if parts is None:
                continue
            try:
                date = cftime.datetime(*parts, calendar=ref.calendar)
            except ValueError as e:
                where = f"{key}.time_slice.{end}"
                raise ConfigError(file, where, f"not a {ref.calendar} date ({e})") from None
            bound = float(cftime.date2num(date, units, ref.calendar))
            keep &= seconds >= bound if end == "start" else seconds <= bound
        if keep.sum() < 2:
            raise ConfigError(file, f"{key}.time_slice", f"keeps {keep.sum()} of the archive's {len(keep)} times")
    pairs = _split_pairs(np.round(lattice[keep]).astype(np.int64), round(step / tau), cfg, file, key)
    return Archive(scans, dates[keep], owner[keep], local[keep], pairs, tau, step, file, key)


def _split_pairs(k: np.ndarray, m: int, cfg: ArchiveConfig, file: str, key: str) -> dict[str, np.ndarray]:
    """Index pairs (i, j) with k[j] = k[i] + m, split at the first of the last `validation_fraction` times."""
    nxt = np.searchsorted(k, k + m)
    ok = nxt < len(k)
    ok[ok] = k[nxt[ok]] == k[ok] + m
    pairs = np.stack([np.flatnonzero(ok), nxt[ok]], axis=1)
    if not len(pairs):
        raise ConfigError(file, f"{key}.step", f"no two of the archive's {len(k)} times are {cfg.step} apart")
    boundary = k[len(k) - math.ceil(cfg.validation_fraction * len(k))]
    split = {"train": pairs[k[pairs[:, 1]] < boundary], "validation": pairs[k[pairs[:, 0]] >= boundary]}
    for name, chosen in split.items():
        if not len(chosen):
            raise ConfigError(file, f"{key}.validation_fraction", f"leaves no {name} pairs (of {len(pairs)} "
                              f"pairs {cfg.step} apart among {len(k)} times)")
    return split


class Archive:
    """A checked archive: grid, variables, calendar, times and lazily read (x_t, x_{t+Δ}) pairs."""

    def __init__(self, scans: list[_Scan], dates: np.ndarray, owner: np.ndarray, local: np.ndarray,
                 pairs: dict[str, np.ndarray], tau: float, step: float, file: str, key: str) -> None:
        ref = scans[0]
        self.variables: tuple[tuple[str, str, str], ...] = ref.attrs
        self.lat, self.lon = ref.lat, ref.lon
        self.grid_shape: tuple[int, int] = (ref.lat.shape[0], ref.lon.shape[-1])
        self.calendar = ref.calendar
        self.times = dates
        self.time_step_seconds, self.step_seconds = tau, step
        self._scans, self._owner, self._local, self._pairs = scans, owner, local, pairs
        self._file, self._key = file, key
        self._handles: OrderedDict[int, netCDF4.Dataset] = OrderedDict()

    def pair_count(self, split: str) -> int:
        return len(self.pair_index(split))

    def pair_index(self, split: str) -> np.ndarray:
        """(pairs, 2) indices into `times` of (x_t, x_{t+Δ}) for `split` ("train" or "validation")."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
        return self._pairs[split]

    def pairs(self, index: torch.Tensor, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs `index` of `split` as float32 (B, variables, ny, nx) tensors; NaN where the files mask."""
        p = self.pair_index(split)[np.asarray(index, dtype=np.int64).reshape(-1)]
        x = self.read(p.reshape(-1)).reshape(len(p), 2, len(self.variables), *self.grid_shape)
        x_t, x_next = (torch.from_numpy(np.ascontiguousarray(x[:, i])) for i in (0, 1))
        return x_t, x_next

    def read(self, index: np.ndarray) -> np.ndarray:
        """Fields (len(index), variables, ny, nx) float32 at `times[index]`, NaN where the files mask."""
        uniq, inverse = np.unique(np.asarray(index, dtype=np.int64), return_inverse=True)
        out = np.empty((len(uniq), len(self.variables), *self.grid_shape), np.float32)
        files = self._owner[uniq]
        for f in np.unique(files):
            rows = np.flatnonzero(files == f)
            out[rows] = self._read_file(int(f), self._local[uniq[rows]])
        return out[inverse.reshape(-1)]

    def _read_file(self, f: int, local: np.ndarray) -> np.ndarray:
        """Times `local` of file `f`: one contiguous read when they are close together, else a list."""
        order = np.argsort(local)
        srt = local[order]
        ranged = srt[-1] - srt[0] < 2 * len(srt) + 8
        where = slice(srt[0], srt[-1] + 1) if ranged else srt
        ds = self._handle(f)
        out = np.empty((len(local), len(self.variables), *self.grid_shape), np.float32)
        for v, fld in enumerate(self._scans[f].fields):
            block = fld.read(ds, where)
            out[order, v] = block[srt - srt[0]] if ranged else block
        return out

    def _handle(self, f: int) -> netCDF4.Dataset:
        """An open handle to file `f`; the least recently used is closed past `_OPEN_FILES`."""
        if f in self._handles:
            self._handles.move_to_end(f)
        else:
            self._handles[f] = netCDF4.Dataset(self._scans[f].path, "r")
            if len(self._handles) > _OPEN_FILES:
                self._handles.popitem(last=False)[1].close()
        return self._handles[f]

    def close(self) -> None:
        while self._handles:
            self._handles.popitem()[1].close()

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def statistics(self) -> dict[str, Any]:
        """Per-variable mean/std of the state (every time of a training pair) and of the Δ-increment
        (every training pair), as twin.train.statistics, in one streaming pass with NaN excluded; plus
        `mask`, a (ny, nx) bool tensor of the points valid in every variable and time of the first file."""
        nvar = len(self.variables)
        chunk = max(1, _CHUNK_VALUES // (2 * nvar * math.prod(self.grid_shape)))
        state, inc = _Moments(nvar), _Moments(nvar)
        pairs = self._pairs["train"]
        seen = np.zeros(len(self.times), bool)
        for c in range(0, len(pairs), chunk):
            p = pairs[c:c + chunk]
            ids = np.unique(p)
            x = self.read(ids)
            pos = np.searchsorted(ids, p)
            inc.add(x[pos[:, 1]] - x[pos[:, 0]])
            state.add(x[~seen[ids]])
            seen[ids] = True
        stats: dict[str, Any] = {}
        for name, mom in (("state", state), ("inc", inc)):
            mean, std = mom.result()
            bad = np.flatnonzero(~(std > 0))
            if len(bad):
                i = int(bad[0])
                raise ConfigError(self._file, f"{self._key}.variables.{i}", f"{self.variables[i][0]!r} has "
                                  f"no spread in its {name} over the training split")
            stats[f"{name}_mean"], stats[f"{name}_std"] = tuple(map(float, mean)), tuple(map(float, std))
        first = self._scans[int(self._owner[0])]
        mask = np.ones(self.grid_shape, bool)
        ds = self._handle(int(self._owner[0]))
        for c in range(0, len(first.dates), chunk):
            for fld in first.fields:
                mask &= np.isfinite(fld.read(ds, slice(c, c + chunk))).all(axis=0)
        stats["mask"] = torch.from_numpy(mask)
        return stats

    def metadata(self) -> dict[str, Any]:
        """What a checkpoint records so that a twin can refuse a case on another grid, calendar or step."""
        coords = np.round(self.lat, 6).tobytes() + np.round(self.lon, 6).tobytes()
        span = lambda a: [float(np.nanmin(a)), float(np.nanmax(a))]  # noqa: E731
        return {"grid": {"shape": list(self.grid_shape), "lat_range": span(self.lat),
                         "lon_range": span(self.lon), "rows": "south_to_north",
                         "digest": hashlib.sha256(coords).hexdigest()[:16]},
                "variables": [list(v) for v in self.variables], "calendar": self.calendar,
                "step_seconds": self.step_seconds, "archive_step_seconds": self.time_step_seconds}


class _Moments:
    """Streaming per-variable count, mean and sum of squared deviations (Chan et al.), NaN skipped."""

    def __init__(self, nvar: int) -> None:
        self.n, self.mean, self.m2 = np.zeros(nvar), np.zeros(nvar), np.zeros(nvar)

    def add(self, x: np.ndarray) -> None:
        x = np.moveaxis(x, 1, 0).reshape(len(self.n), -1).astype(np.float64)
        ok = np.isfinite(x)
        n = ok.sum(axis=1).astype(np.float64)
        mean = np.where(ok, x, 0).sum(axis=1) / np.maximum(n, 1)
        m2 = np.where(ok, (x - mean[:, None]) ** 2, 0).sum(axis=1)
        total = np.maximum(self.n + n, 1)
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.n * n / total
        self.n = self.n + n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and sample standard deviation (n - 1, as torch.std); NaN where fewer than two values."""
        std = np.sqrt(self.m2 / np.where(self.n > 1, self.n - 1, np.nan))
        return self.mean, std
