"""Verification at stations: observation, background and analysis at every named station, every cycle.

With observations from a file that names stations (CSV column `station`, netCDF `cf_role:
timeseries_id`), each cycle interpolates the background (prior) mean and the analysis mean to every
station observation of the cycle's window — assimilated, withheld (`observations.withhold`: read
but never assimilated) or rejected by the gross-error check — and keeps them in the run recorder
(so checkpoints carry them). The run writes `stations.nc`, a CF discrete sampling geometry
(`featureType: timeSeries`, indexed ragged array: dimension `station` with id, location, altitude,
the `withheld` flag and per-station statistics; dimension `obs` with every observation and its
O-B and O-A, its own `time` and the `cycle` it was matched to, every cycle whatever `output.every`),
and a `stations` block in summary.json. Stations are those with an observation that passed the file
screen. Statistics use the cycles after `run.burn_in` and pool the observed variables;
`qc_rejected` counts the whole run.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import xarray as xr

from twin import io
from twin.domain import Decomposition, Grid

if TYPE_CHECKING:
    from twin.obsource import FileObservations
    from twin.record import RunRecorder

STATUS = ("assimilated", "withheld", "rejected")  # flag values 0, 1, 2 of stations.nc `status`


def _rms(x: np.ndarray) -> float | None:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else None


class StationMonitor:
    """Interpolates the background and analysis means to the station observations of each cycle."""

    def __init__(self, source: FileObservations, recorder: RunRecorder, grid: Grid, domain: Decomposition,
                 burn_in: int, keeps_records: bool) -> None:
        self.source, self.recorder, self.grid, self.domain, self.burn_in = source, recorder, grid, domain, burn_in
        self.keeps_records = keeps_records  # this rank records (the run's rank 0)
        table = source.table
        self.named = table.station != ""  # rows that belong to a station
        ids, first = np.unique(table.station[self.named].astype(str), return_index=True)
        self.ids = [str(s) for s in ids]  # sorted
        self.first_rows = np.flatnonzero(self.named)[first]  # each station's location and altitude

    @classmethod
    def of(cls, source: FileObservations | None, recorder: RunRecorder, grid: Grid, domain: Decomposition,
           burn_in: int, keeps_records: bool) -> "StationMonitor | None":
        """A monitor when the run's observation file names stations, else None. `domain`: the grid
        decomposition the ensemble is split by; `keeps_records`: whether this rank records."""
        if source is None or not (source.table.station != "").any():
            return None
        return cls(source, recorder, grid, domain, burn_in, keeps_records)

    def record(self, cycle: int, time: float, prior: torch.Tensor, analysis: torch.Tensor) -> None:
        """Keep H(background mean) and H(analysis mean) at this cycle's station observations
        (collective over the grid decomposition: each rank interpolates its own, the recording rank
        keeps them all). `prior`, `analysis`: every member on this rank's subdomain."""
        src = self.source
        rows = src.window_rows[self.named[src.window_rows]]
        op = src.table.batch(rows, time, self.grid, self.domain, prior.dtype).operator
        part = (rows[op.index.numpy()], op(prior.mean(0)).double().numpy(), op(analysis.mean(0)).double().numpy())
        parts = self.domain.allgather_object(part) if self.domain.size > 1 else [part]
        if not self.keeps_records:
            return
        r, b, a = (np.concatenate([p[i] for p in parts]) for i in range(3))
        order = np.argsort(r, kind="stable")
        r, b, a = r[order], b[order], a[order]
        status = np.where(src.withheld[r], 1, np.where(np.isin(r, src.rows), 0, 2)).astype(np.int8)
        self.recorder.stations.append({"cycle": cycle, "rows": r, "background": b, "analysis": a, "status": status})

    def _columns(self) -> dict[str, np.ndarray]:
        """Every recorded station observation (dimension obs), in cycle order."""
        recs = self.recorder.stations

        def cat(key: str, dtype: type) -> np.ndarray:
            return np.concatenate([np.asarray(r[key], dtype=dtype) for r in recs]) if recs else np.zeros(0, dtype)

        rows = cat("rows", np.int64)
        return {"rows": rows, "background": cat("background", np.float64), "analysis": cat("analysis", np.float64),
                "status": cat("status", np.int8),
                "cycle": np.repeat([r["cycle"] for r in recs], [len(r["rows"]) for r in recs]).astype(np.int64),
                "station": np.searchsorted(self.ids, self.source.table.station[rows].astype(str)).astype(np.int32)}

    def _scored(self, c: dict[str, np.ndarray]) -> np.ndarray:
        """Observations that enter the statistics: assimilated or withheld, after burn-in."""
        return (c["cycle"] >= self.burn_in) & (c["status"] != 2)

    def summary(self) -> dict:
        """The summary.json `stations` block: counts and RMS O-B / O-A of assimilated and withheld
        observations after burn-in (null where there are none)."""
        c = self._columns()
        y = self.source.table.value[c["rows"]]
        used, held = self._scored(c) & (c["status"] == 0), self._scored(c) & (c["status"] == 1)
        return {"stations": len(self.ids), "withheld_stations": sorted(self.source.withheld_stations),
                "obs": int(used.sum()), "omb_rms": _rms((y - c["background"])[used]),
                "oma_rms": _rms((y - c["analysis"])[used]), "withheld_obs": int(held.sum()),
                "withheld_rmse_background": _rms((y - c["background"])[held]),
                "withheld_rmse_analysis": _rms((y - c["analysis"])[held]),
                "qc_rejected": int(self._qc_rejected(c).sum())}

    def _qc_rejected(self, c: dict[str, np.ndarray]) -> np.ndarray:
        """Per station: observations screened out of the file plus gross errors (whole run)."""
        gross = np.bincount(c["station"][c["status"] == 2], minlength=len(self.ids))
        by_name = dict(zip(*np.unique(self.source.rejected_stations.astype(str), return_counts=True)))
        return gross + np.array([by_name.get(s, 0) for s in self.ids], dtype=np.int64)

    def dataset(self, variables: Sequence[io.VariableLike], *, time_unit_seconds: float, start: str,
                attrs: dict) -> xr.Dataset:
        """stations.nc: a CF timeSeries (indexed ragged array) of the recorded station observations."""
        c, table, n = self._columns(), self.source.table, len(self.ids)
        rows = c["rows"]
        y = table.value[rows]
        omb, oma = y - c["background"], y - c["analysis"]
        units = {"units": variables[0].units} if len({v.units for v in variables}) == 1 else {}
        flags = {"flag_values": np.arange(len(STATUS), dtype=np.int8), "flag_meanings": " ".join(STATUS)}
        extra = {
            "station_index": (("obs",), c["station"], {"long_name": "station of the observation",
                                                      "instance_dimension": "station"}),
            "cycle": (("obs",), c["cycle"], {"long_name": "analysis cycle index"}),
            "background": (("obs",), c["background"], {"long_name": "background (prior) mean at the station",
                                                       **units}),
            "analysis": (("obs",), c["analysis"], {"long_name": "analysis mean at the station", **units}),
            "omb": (("obs",), omb, {"long_name": "observation minus background mean", **units}),
            "oma": (("obs",), oma, {"long_name": "observation minus analysis mean", **units}),
            "status": (("obs",), c["status"], {"long_name": "use of the observation", **flags}),
        }
        ds = io.observations_dataset(table.time[rows], table.locations[rows], table.variable[rows], y,
                                     table.error_std[rows], table.ids[rows], self.grid, variables,
                                     time_unit_seconds=time_unit_seconds, start=start, attrs=attrs, extra=extra)
        for a, dim in enumerate(io.location_dims(self.grid)):  # instance variables: one location per station
            attrs_a = {**ds[dim].attrs, "long_name": ds[dim].attrs["long_name"].replace("observation", "station")}
            ds = ds.drop_vars(dim)
            ds[dim] = xr.Variable("station", table.locations[self.first_rows, a], attrs_a)
            ds[dim].encoding["_FillValue"] = None
        ds["station_id"] = xr.Variable("station", np.array(self.ids, dtype=object),
                                       {"long_name": "station identifier", "cf_role": "timeseries_id"})
        ds["altitude"] = xr.Variable("station", table.height[self.first_rows], {
            "long_name": "station altitude", "standard_name": "altitude", "units": "m", "positive": "up", "axis": "Z"})
        withheld = np.array([s in self.source.withheld_stations for s in self.ids], dtype=np.int8)
        ds["withheld"] = xr.Variable("station", withheld, {
            "long_name": "station withheld from the assimilation (verification only)",
            "flag_values": np.array([0, 1], dtype=np.int8), "flag_meanings": "assimilated withheld"})
        scored = self._scored(c)
        count = np.bincount(c["station"][scored], minlength=n)

        def per_station(x: np.ndarray) -> np.ndarray:
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.bincount(c["station"][scored], weights=x[scored], minlength=n) / count

        stats = {"count": (count, "observations after burn-in (assimilated or withheld)", {"units": "1"}),
                 "omb_mean": (per_station(omb), "mean observation minus background", units),
                 "omb_rms": (np.sqrt(per_station(omb ** 2)), "RMS observation minus background", units),
                 "oma_mean": (per_station(oma), "mean observation minus analysis", units),
                 "oma_rms": (np.sqrt(per_station(oma ** 2)), "RMS observation minus analysis", units)}
        stats["qc_rejected"] = (self._qc_rejected(c), "observations rejected by quality control (whole run)",
                                {"units": "1"})
        for name, (values, long_name, extra_attrs) in stats.items():
            ds[name] = xr.Variable("station", values, {"long_name": long_name, **extra_attrs})
        ds.attrs.update(title="EarthTwin station verification", featureType="timeSeries",
                        burn_in=self.burn_in)
        return ds
