"""Fuzzed observation files (CSV and netCDF): every file is either rejected with one line naming it,
or read and screened so that what is kept is finite, in the domain, unique and has positive errors,
with the rejection counts adding up. FUZZ_EXAMPLES=N runs a longer campaign (default 120 per target)."""
import os
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from assim.obsfiles import ObservationFileError, read_observations
from assim.qc import screen
from emulators.base import Variable
from twin import io
from twin.domain import Grid

GRID = Grid((40,), (False,))
VARS = (Variable("X", "1", "Lorenz-96 state variable"),)
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "120")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
NUMBER = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-10**6, 10**6),
                   st.sampled_from(["", "nan", "inf", "-inf", "abc", "1e999", "☃"]))


def check(path: Path) -> None:
    try:
        table = read_observations(path, GRID, VARS, time_unit_seconds=432000.0, default_error_std=1.0)
    except ObservationFileError as e:
        msg = str(e)
        assert msg.startswith(str(path)) and "\n" not in msg
        return
    kept, counts = screen(table, GRID)
    assert sum(counts.values()) - counts["kept"] == len(table) - len(kept) and counts["kept"] == len(kept)
    if len(kept):
        assert np.isfinite(kept.value).all() and np.isfinite(kept.locations).all()
        assert (kept.error_std > 0).all() and np.isfinite(kept.error_std).all()
        assert ((kept.locations >= 0) & (kept.locations <= 39)).all()
        keys = {(t, tuple(loc), v) for t, loc, v in zip(kept.time, kept.locations, kept.variable)}
        assert len(keys) == len(kept)


@FUZZ
@given(rows=st.lists(st.tuples(NUMBER, NUMBER, st.sampled_from(["X", "Y", "", "x"]), NUMBER, NUMBER), max_size=12),
       header=st.sampled_from(["time,x,variable,value,error", "time,x,variable,value", "t,x,variable,value,error",
                               "time,y,variable,value,error", "", "time,x,value,error"]),
       cut=st.integers(0, 400), duplicate=st.booleans())
def test_fuzzed_csv(tmp_path, rows, header, cut, duplicate):
    lines = [header] + [",".join(map(str, r)) for r in rows]
    if duplicate and rows:
        lines.append(lines[-1])
    text = "\n".join(lines) + "\n"
    path = tmp_path / "fuzz.csv"
    path.write_text(text[:cut] if cut < len(text) and cut % 3 == 0 else text, encoding="utf-8")
    check(path)


@FUZZ
@given(n=st.integers(0, 8), cut=st.floats(0, 1), flip=st.integers(0, 2000), nan_at=st.integers(0, 8),
       bad_error=st.sampled_from([1.0, 0.0, -1.0, float("nan")]), x_shift=st.sampled_from([0.0, 45.0, -3.0]))
def test_fuzzed_netcdf(tmp_path, n, cut, flip, nan_at, bad_error, x_shift):
    values = np.linspace(-2, 2, n)
    if nan_at < n:
        values[nan_at] = np.nan
    errors = np.full(n, 1.0)
    if n:
        errors[-1] = bad_error
    locs = (np.arange(n, dtype=float) * 3 + x_shift)[:, None]
    ds = io.observations_dataset(np.zeros(n), locs, 0, values, errors, np.arange(n), GRID, VARS,
                                 time_unit_seconds=432000.0)
    path = tmp_path / "fuzz.nc"
    io.write_netcdf_atomic(ds, path, compress=False)
    data = bytearray(path.read_bytes())
    if cut < 0.5:
        data = data[: int(len(data) * cut * 2)]
    elif flip < len(data):
        data[flip] ^= 0xFF
    path.write_bytes(bytes(data))
    check(path)
