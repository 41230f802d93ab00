"""Station verification under MPI (pytest-mpi, 2 ranks): grid split and member split record the same
station background, analysis and status as the serial run, including stations on the tile edge."""
from pathlib import Path

import numpy as np
import pytest

from twin import Twin

pytestmark = pytest.mark.mpi(min_size=2)
CASES = Path(__file__).parents[1] / "cases"


def station_csv(path: Path, cycles: int) -> Path:
    """Six stations of a 40-point Lorenz-96 ring (two straddle the tiles' edge at 19.5 and 39.5)."""
    rows = ["time,x,variable,value,error,station"]
    for c in range(cycles):
        rows += [f"{0.05 * c:.2f},{x},X,{np.sin(x + c):.3f},1.0,P{k}"
                 for k, x in enumerate((2.0, 7.25, 13.0, 19.5, 28.0, 39.5))]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("layout", [["domain.ranks_per_member=2"], ["domain.ranks_per_member=1"]])
def test_station_records_equal_serial(tmp_path, layout):
    overrides = ["run.cycles=10", "run.burn_in=0", "truth.spinup_steps=100", "observations.withhold=[P1, P3]",
                 f"observations.path={station_csv(tmp_path / 's.csv', 10)}"]
    parallel = Twin.from_yaml(CASES / "lorenz96_letkf.yaml", overrides + layout)
    serial = Twin.from_yaml(CASES / "lorenz96_letkf.yaml", overrides + ["domain.decomposition=serial"])
    assert parallel.domain.size >= 2
    parallel.run(), serial.run()
    if parallel.domain.rank != 0:
        assert parallel.recorder.stations == []
        return
    mine, ref = parallel.recorder.stations, serial.recorder.stations
    assert len(mine) == len(ref) == 10
    for a, b in zip(mine, ref):
        assert a["cycle"] == b["cycle"]
        np.testing.assert_array_equal(a["rows"], b["rows"])
        np.testing.assert_array_equal(a["status"], b["status"])
        np.testing.assert_allclose(a["background"], b["background"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(a["analysis"], b["analysis"], rtol=0, atol=1e-12)
    assert parallel.stations.summary()["withheld_obs"] == 20
