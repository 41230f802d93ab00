"""twin.archive: a synthetic multi-file CF archive (360_day calendar, latitude descending, coordinates
with unusual names found by their CF attributes) checked against the numbers written into it."""
from __future__ import annotations

import tempfile
from pathlib import Path

import cftime
import netCDF4
import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from twin.archive import Archive, ArchiveConfig, open_archive, parse_archive_config
from twin.config import ConfigError

NY, NX, TAU_H = 8, 16, 6
LAT = np.linspace(-78.75, 78.75, NY)  # south to north; files store it north to south
LON = np.arange(NX) * 22.5
FILES = (range(0, 12), range(12, 24), range(30, 42))  # lattice indices: files 1-2 contiguous, then a gap
LAND = np.zeros((NY, NX), bool)
LAND[[1, 5, 6], [2, 9, 15]] = True


def series(n: int = 48) -> np.ndarray:
    """(time, variable, y, x) float32 rows south to north; sst NaN on LAND and at one point of time 15."""
    rng = np.random.default_rng(0)
    k = np.arange(n)[:, None, None]
    tas = 15 + 10 * np.cos(np.deg2rad(LAT))[None, :, None] + 0.5 * k + rng.normal(size=(n, NY, NX))
    sst = 280 + np.sin(0.3 * k) + rng.normal(size=(n, NY, NX))
    sst[:, LAND] = np.nan
    sst[15, 2, 3] = np.nan
    return np.stack([tas, sst], axis=1).astype(np.float32)


def write(path: Path, ks: list[int] | range, data: np.ndarray, calendar: str = "360_day", nx: int = NX,
          alt_units: bool = False) -> Path:
    """One file of lattice times `ks`; odd files may use other time units (same instants)."""
    with netCDF4.Dataset(path, "w") as ds:
        ds.createDimension("t", None)
        ds.createDimension("j", NY)
        ds.createDimension("i", nx)
        ds.createDimension("lev", 1)
        ds.createDimension("nv", 2)
        zeit = ds.createVariable("zeit", "f8", ("t",))
        zeit.setncatts({"standard_name": "time", "axis": "T", "calendar": calendar})
        hours = np.asarray(ks, float) * TAU_H
        if alt_units:
            zeit.units, zeit[:] = "days since 2001-02-26 12:00:00", (hours + 12) / 24
        else:
            zeit.units, zeit[:] = "hours since 2001-02-27 00:00:00", hours
        ds.createVariable("zeit_bnds", "f8", ("t", "nv"))[:] = np.zeros((len(hours), 2))
        breite = ds.createVariable("breite", "f8", ("j",))
        breite.units, breite[:] = "degrees_north", LAT[::-1]
        laenge = ds.createVariable("laenge", "f8", ("i",))
        laenge.setncatts({"standard_name": "longitude", "units": "degrees_east"})
        laenge[:] = np.arange(nx) * 22.5
        tas = ds.createVariable("tas", "f4", ("t", "j", "i"))
        tas.setncatts({"units": "degC", "long_name": "near-surface air temperature"})
        sst = ds.createVariable("sst", "f4", ("t", "lev", "j", "i"), fill_value=np.float32(-999))
        sst.units = "K"
        block = data[list(ks)][:, :, ::-1, :nx]
        tas[:] = block[:, 0]
        sst[:] = np.ma.masked_invalid(block[:, 1])[:, None]
    return path


def make(tmp: Path, calendar: str = "360_day") -> np.ndarray:
    data = series()
    for n, ks in enumerate(FILES):
        write(tmp / f"part{n}.nc", ks, data, calendar, alt_units=n == 1)
    return data


def config(**kw: object) -> ArchiveConfig:
    raw = {"paths": ["part*.nc"], "variables": ["tas", "sst"], "step": "6h", "validation_fraction": 0.25}
    raw.update(kw)
    return parse_archive_config(raw, "case.yaml")


def lattice() -> np.ndarray:
    return np.concatenate([np.asarray(r) for r in FILES])


def expected_pairs(ks: np.ndarray, m: int, fraction: float) -> dict[str, set[tuple[int, int]]]:
    """Pairs of lattice indices both present; the last `fraction` of the times held out."""
    ks = np.sort(ks)
    have = set(ks.tolist())
    pairs = [(k, k + m) for k in ks.tolist() if k + m in have]
    boundary = ks[len(ks) - int(np.ceil(fraction * len(ks)))]
    return {"train": {p for p in pairs if p[1] < boundary},
            "validation": {p for p in pairs if p[0] >= boundary}}


def lattice_pairs(arc: Archive, split: str, ks: np.ndarray) -> set[tuple[int, int]]:
    return {(int(ks[i]), int(ks[j])) for i, j in arc.pair_index(split)}


@pytest.mark.parametrize("calendar", ["360_day", "noleap", "standard"])
@pytest.mark.parametrize("step, m", [("6h", 1), ("12h", 2)])
def test_pairs_skip_gaps_and_cross_contiguous_files(tmp_path: Path, calendar: str, step: str, m: int) -> None:
    make(tmp_path, calendar)
    with open_archive(config(step=step), tmp_path, "case.yaml") as arc:
        assert arc.calendar == calendar and arc.time_step_seconds == TAU_H * 3600
        want = expected_pairs(lattice(), m, 0.25)
        for split in ("train", "validation"):
            assert lattice_pairs(arc, split, lattice()) == want[split]
            assert arc.pair_count(split) == len(want[split])
        assert (11, 11 + m) in want["train"]  # across the contiguous files part0 and part1
        assert (arc.pair_count("train"), arc.pair_count("validation")) == {1: (25, 8), 2: (23, 7)}[m]


def test_axes_found_by_attributes_and_metadata(tmp_path: Path) -> None:
    make(tmp_path)
    with open_archive(config(), tmp_path, "case.yaml") as arc:
        assert arc.grid_shape == (NY, NX)
        np.testing.assert_allclose(arc.lat, LAT)
        np.testing.assert_allclose(arc.lon, LON)
        assert arc.variables == (("tas", "degC", "near-surface air temperature"), ("sst", "K", "sst"))
        assert all(isinstance(t, cftime.Datetime360Day) for t in arc.times)
        assert str(arc.times[12]) == "2001-02-30 00:00:00"  # 2001-02-27 + 3 days: 360_day has Feb 30
        meta = arc.metadata()
        assert meta["grid"]["shape"] == [NY, NX] and meta["calendar"] == "360_day"
        assert meta["step_seconds"] == 21600 and meta["variables"][1] == ["sst", "K", "sst"]


def test_pairs_equal_values_written(tmp_path: Path) -> None:
    data = make(tmp_path)
    ks = lattice()
    with open_archive(config(step="12h"), tmp_path, "case.yaml") as arc:
        for split in ("train", "validation"):
            index = torch.randperm(arc.pair_count(split), generator=torch.Generator().manual_seed(1))[:9]
            x0, x1 = arc.pairs(index, split)
            assert x0.dtype == torch.float32 and x0.shape == (len(index), 2, NY, NX)
            p = arc.pair_index(split)[index.numpy()]
            np.testing.assert_array_equal(x0.numpy(), data[ks[p[:, 0]]])
            np.testing.assert_array_equal(x1.numpy(), data[ks[p[:, 1]]])


def test_statistics_equal_numpy_over_training_split(tmp_path: Path) -> None:
    data = make(tmp_path).astype(np.float64)
    ks = lattice()
    with open_archive(config(), tmp_path, "case.yaml") as arc:
        stats = arc.statistics()
        p = ks[arc.pair_index("train")]
    state, inc = data[np.unique(p)], data[p[:, 1]] - data[p[:, 0]]
    for name, x in (("state", state), ("inc", inc)):
        np.testing.assert_allclose(stats[f"{name}_mean"], np.nanmean(x, axis=(0, 2, 3)), rtol=1e-9, atol=1e-6)
        np.testing.assert_allclose(stats[f"{name}_std"], np.nanstd(x, axis=(0, 2, 3), ddof=1), rtol=1e-5)
    assert stats["mask"].dtype == torch.bool and torch.equal(stats["mask"], torch.from_numpy(~LAND))


def test_validation_split_is_disjoint_and_later(tmp_path: Path) -> None:
    make(tmp_path)
    with open_archive(config(validation_fraction=0.3), tmp_path, "case.yaml") as arc:
        train, val = arc.pair_index("train"), arc.pair_index("validation")
        assert not set(train.ravel().tolist()) & set(val.ravel().tolist())
        assert train.max() < val.min()
        assert max(arc.times[train.ravel()]) < min(arc.times[val.ravel()])


def test_time_slice_restricts_times(tmp_path: Path) -> None:
    make(tmp_path)
    cfg = config(time_slice={"start": "2001-02-28", "end": "2001-02-30 18:00"})
    with open_archive(cfg, tmp_path, "case.yaml") as arc:
        assert str(arc.times[0]) == "2001-02-28 00:00:00" and str(arc.times[-1]) == "2001-02-30 18:00:00"
        assert len(arc.times) == 12
    with pytest.raises(ConfigError, match="keeps 0 of the archive's 36 times") as e:
        open_archive(config(time_slice={"start": "2003-01-01"}), tmp_path, "case.yaml")
    assert e.value.key == "data.time_slice"
    with pytest.raises(ConfigError, match="not a noleap date") as e:
        make(tmp_path, "noleap")
        open_archive(cfg, tmp_path, "case.yaml")
    assert e.value.key == "data.time_slice.end"


def test_unquoted_yaml_dates_are_read_as_the_text_meant() -> None:
    cfg = config(time_slice=yaml.safe_load("{start: 2001-02-28, end: 2001-03-01 18:00:00}"))
    assert (cfg.time_slice.start, cfg.time_slice.end) == ("2001-02-28", "2001-03-01 18:00:00")


def test_step_not_a_multiple_is_refused(tmp_path: Path) -> None:
    make(tmp_path)
    with pytest.raises(ConfigError, match="whole multiple") as e:
        open_archive(config(step="9h"), tmp_path, "case.yaml")
    assert e.value.key == "data.step" and e.value.file == "case.yaml"


def test_missing_variable_is_named(tmp_path: Path) -> None:
    make(tmp_path)
    with pytest.raises(ConfigError, match="'psl'") as e:
        open_archive(config(variables=["tas", "psl"]), tmp_path, "case.yaml")
    assert e.value.key == "data.variables.1" and "part0.nc" in e.value.message


def test_file_on_another_grid_is_refused(tmp_path: Path) -> None:
    data = make(tmp_path)
    write(tmp_path / "part3.nc", range(42, 50), np.pad(data, ((0, 8), (0, 0), (0, 0), (0, 0))), nx=NX - 1)
    with pytest.raises(ConfigError, match="part3.nc: grid") as e:
        open_archive(config(), tmp_path, "case.yaml")
    assert e.value.key == "data.paths" and "\n" not in str(e.value)


def test_overlapping_files_and_missing_files_are_refused(tmp_path: Path) -> None:
    data = make(tmp_path)
    write(tmp_path / "part3.nc", range(20, 26), data)
    with pytest.raises(ConfigError, match="is in both"):
        open_archive(config(), tmp_path, "case.yaml")
    with pytest.raises(ConfigError, match="no such file") as e:
        open_archive(config(paths=["part*.nc", "other/*.nc"]), tmp_path, "case.yaml")
    assert e.value.key == "data.paths.1"


@pytest.mark.parametrize("raw, key", [
    ({"paths": ["a.nc"], "variables": ["x"], "stride": 2}, "data.stride"),
    ({"paths": ["a.nc"]}, "data.variables"),
    ({"paths": [], "variables": ["x"]}, "data.paths"),
    ({"paths": ["a.nc"], "variables": ["x", "x"]}, "data.variables"),
    ({"paths": ["a.nc"], "variables": ["x"], "step": "6 parsecs"}, "data.step"),
    ({"paths": ["a.nc"], "variables": ["x"], "validation_fraction": 0}, "data.validation_fraction"),
    ({"paths": ["a.nc"], "variables": ["x"], "time_slice": {"start": "May"}}, "data.time_slice.start"),
    ({"paths": ["a.nc"], "variables": ["x"], "time_slice": {"start": "2001-02-02", "end": "2001-01-01"}},
     "data.time_slice"),
])
def test_bad_config_names_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_archive_config(raw, "case.yaml")
    assert e.value.key == key


@settings(max_examples=12, deadline=None)
@given(present=st.lists(st.booleans(), min_size=16, max_size=16),
       cuts=st.sets(st.integers(1, 15), max_size=4), m=st.sampled_from([1, 2]))
def test_any_split_into_files_gives_the_same_pairs(present: list[bool], cuts: set[int], m: int) -> None:
    data = series(16)
    ks = np.flatnonzero(present)
    bounds = [0, *sorted(cuts), 16]
    with tempfile.TemporaryDirectory() as tmp:
        parts = [[k for k in ks if lo <= k < hi] for lo, hi in zip(bounds, bounds[1:])]
        for n, part in enumerate(p for p in parts if p):
            write(Path(tmp) / f"part{n}.nc", part, data, alt_units=n % 2 == 1)
        cfg = config(step=f"{TAU_H * m}h")
        gaps = np.diff(ks)
        want = expected_pairs(ks, m, 0.25) if len(ks) else {}
        if len(ks) < 2 or m % gaps.min() or (gaps % gaps.min()).any() or not all(want.values()):
            with pytest.raises(ConfigError):
                open_archive(cfg, tmp, "case.yaml")
            return
        with open_archive(cfg, tmp, "case.yaml") as arc:
            assert lattice_pairs(arc, "train", ks) == want["train"]
            assert lattice_pairs(arc, "validation", ks) == want["validation"]
            x0, x1 = arc.pairs(torch.arange(arc.pair_count("train")), "train")
            p = ks[arc.pair_index("train")]
            np.testing.assert_array_equal(x0.numpy(), data[p[:, 0]])
            np.testing.assert_array_equal(x1.numpy(), data[p[:, 1]])


@pytest.mark.parametrize("layout", ["transposed", "curvilinear"])
def test_other_layouts_read_the_same_values(tmp_path: Path, layout: str) -> None:
    """(time, x, y) order with 1-D coordinates, or (time, y, x) with 2-D latitude/longitude on index
    axes; one long file, so far-apart times are read as a list rather than one range."""
    data = series()
    with netCDF4.Dataset(tmp_path / "one.nc", "w") as ds:
        for name, size in (("time", None), ("a", NY), ("b", NX)):
            ds.createDimension(name, size)
        t = ds.createVariable("when", "i4", ("time",))
        t.units, t.calendar, t[:] = "hours since 1990-01-01", "standard", np.arange(48) * TAU_H
        if layout == "transposed":
            ds.renameDimension("a", "y")
            ds.renameDimension("b", "x")
            ds.createVariable("p", "f8", ("y",)).setncatts({"axis": "Y", "units": "degree"})
            ds["p"][:] = LAT[::-1]
            ds.createVariable("q", "f8", ("x",)).standard_name = "longitude"
            ds["q"][:] = LON
            for n, name in enumerate(("tas", "sst")):
                ds.createVariable(name, "f4", ("time", "x", "y"))[:] = data[:, n, ::-1].transpose(0, 2, 1)
        else:
            ds.createVariable("row", "f8", ("a",)).setncatts({"axis": "Y", "units": "m"})
            lat2, lon2 = np.meshgrid(LAT[::-1], LON, indexing="ij")
            for name, std, values in (("g", "latitude", lat2), ("h", "longitude", lon2)):
                ds.createVariable(name, "f8", ("a", "b")).standard_name = std
                ds[name][:] = values
            for n, name in enumerate(("tas", "sst")):
                ds.createVariable(name, "f4", ("time", "a", "b"))[:] = data[:, n, ::-1]
    with open_archive(config(paths=["one.nc"]), tmp_path, "case.yaml") as arc:
        np.testing.assert_allclose(arc.lat if arc.lat.ndim == 1 else arc.lat[:, 0], LAT)
        pick = np.flatnonzero(np.isin(arc.pair_index("train")[:, 0], [0, 30]))
        x0, x1 = arc.pairs(torch.from_numpy(pick), "train")
        np.testing.assert_array_equal(x0.numpy(), data[[0, 30]])
        np.testing.assert_array_equal(x1.numpy(), data[[1, 31]])
