"""The BMI 2.0 adapter (twin/bmi.py): bmi-test compliance, time, variables, grids, observations."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from twin import Twin
from twin.bmi import TwinBmi

CASE = Path(__file__).parents[1] / "cases" / "bmi_lorenz96.yaml"
SHORT = ("truth.spinup_steps=100",)


@pytest.fixture
def bmi() -> TwinBmi:
    b = TwinBmi(overrides=SHORT)
    b.initialize(str(CASE))
    yield b
    b.finalize()


def test_bmi_tester_passes_every_stage(tmp_path):
    """`bmi-test twin.bmi:TwinBmi` (with gimli.units: units checked) exits 0."""
    pytest.importorskip("bmi_tester")
    from bmi_tester.api import WITH_GIMLI_UNITS

    assert WITH_GIMLI_UNITS, "gimli.units (<0.4, which bmi-tester imports) is needed for the units checks"
    shutil.copy(CASE, tmp_path / CASE.name)  # bmi-test copies the root dir's files next to the config
    exe = Path(sys.executable).with_name("bmi-test")
    proc = subprocess.run([str(exe), "twin.bmi:TwinBmi", "--config-file", CASE.name, "--root-dir", "."],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "All tests passed" in proc.stderr


def test_all_41_methods_are_implemented():
    assert not TwinBmi.__abstractmethods__


def test_names_units_types(bmi):
    out, inp = bmi.get_output_var_names(), bmi.get_input_var_names()
    assert out[:4] == ("X_analysis_mean", "X_analysis_spread", "X_analysis_ensemble", "X_ensemble")
    assert set(inp) == {"X_ensemble", "observation_count", "observation_value", "observation_error_std",
                        "observation_x", "observation_variable", "observation_id"}
    assert bmi.get_input_item_count() == len(inp) and bmi.get_output_item_count() == len(out)
    assert bmi.get_var_units("X_analysis_mean") == "1" and bmi.get_var_type("X_analysis_mean") == "float64"
    assert bmi.get_var_type("observation_id") == "int64"
    assert bmi.get_var_location("observation_count") == "none"
    assert bmi.get_var_nbytes("X_ensemble") == 7 * 40 * 8
    with pytest.raises(KeyError):
        bmi.get_var_units("nope")


def test_time_in_seconds(bmi):
    assert bmi.get_time_units() == "s" and bmi.get_start_time() == 0.0 == bmi.get_current_time()
    assert bmi.get_time_step() == pytest.approx(0.05 * 432000.0)
    assert bmi.get_end_time() == pytest.approx(50 * bmi.get_time_step())
    bmi.update()
    assert bmi.get_current_time() == pytest.approx(bmi.get_time_step()) and bmi.twin.cycle == 1
    bmi.update_until(3.5 * bmi.get_time_step())  # stops at the first cycle boundary at or after it
    assert bmi.twin.cycle == 4
    with pytest.raises(ValueError):
        bmi.update_until(0.0)


def test_grids(bmi):
    assert bmi.get_grid_type(0) == "uniform_rectilinear" and bmi.get_grid_rank(0) == 1
    assert list(bmi.get_grid_shape(0, np.empty(1, np.int32))) == [40]
    assert list(bmi.get_grid_shape(1, np.empty(2, np.int32))) == [7, 40]
    assert list(bmi.get_grid_spacing(1, np.empty(2))) == [1.0, 1.0]
    assert list(bmi.get_grid_origin(0, np.empty(1))) == [0.0]
    assert np.array_equal(bmi.get_grid_x(0, np.empty(40)), np.arange(40.0))
    assert bmi.get_grid_type(2) == "unstructured" and bmi.get_grid_node_count(2) == 40
    assert bmi.get_grid_edge_count(2) == 0 == bmi.get_grid_face_count(2)
    assert np.array_equal(bmi.get_grid_x(2, np.empty(40)), np.arange(40.0))  # the twin's own network
    with pytest.raises(ValueError):
        bmi.get_grid_y(0, np.empty(40))


def test_update_is_one_twin_cycle_and_pointers_stay_valid(bmi):
    twin = Twin.from_yaml(CASE, SHORT)
    ptr = bmi.get_value_ptr("X_analysis_mean")
    ens_ptr = bmi.get_value_ptr("X_analysis_ensemble")
    for _ in range(3):
        analysis = twin.assimilate()
        twin.forecast()
        bmi.update()
        assert np.array_equal(ptr, analysis.mean(0)[0].numpy())
        assert np.array_equal(ens_ptr, analysis[:, 0].reshape(-1).numpy())
        assert np.array_equal(bmi.get_value("X_analysis_spread", np.empty(40)), analysis.std(0)[0].numpy())
        members = twin.ensemble[:, 0].reshape(-1).numpy()
        assert np.array_equal(bmi.get_value("X_ensemble", np.empty(280)), members)
    assert ptr is bmi.get_value_ptr("X_analysis_mean")
    picked = bmi.get_value_at_indices("X_analysis_mean", np.empty(3), np.array([0, 5, 39]))
    assert np.array_equal(picked, ptr[[0, 5, 39]])


def test_host_sets_the_ensemble(bmi):
    ens = np.arange(280.0).reshape(7, 40) / 100.0
    bmi.set_value("X_ensemble", ens.reshape(-1))
    assert np.allclose(bmi.get_value("X_analysis_mean", np.empty(40)), ens.mean(0))  # before any update
    bmi.set_value_at_indices("X_ensemble", np.array([0]), np.array([5.0]))
    assert float(bmi.twin.ensemble[0, 0, 0]) == 5.0
    bmi.get_value_ptr("X_ensemble")[1] = -3.0  # written through the pointer: carried in at update
    ens[0, :2] = 5.0, -3.0
    bmi.update()
    bmi.twin.recorder.flush()
    assert np.allclose(bmi.twin.recorder.background_mean[-1][0].numpy(), ens.mean(0))
    with pytest.raises(ValueError):
        bmi.set_value("X_ensemble", np.zeros(3))
    with pytest.raises(ValueError):
        bmi.set_value("X_analysis_mean", np.zeros(40))


def test_host_observations_at_grid_points_equal_the_twins_own(bmi):
    """Relaying the twin's observations through set_value (points operator) changes nothing."""
    twin = Twin.from_yaml(CASE, SHORT)
    for _ in range(3):
        bmi.set_value("observation_count", np.array([-1]))  # the arrays show the twin's own again
        n = bmi.get_grid_node_count(2)
        for name in ("observation_value", "observation_error_std", "observation_x", "observation_id"):
            bmi.set_value(name, bmi.get_value(name, np.empty(n, bmi.get_var_type(name))))
        assert bmi._host_set
        expected = twin.assimilate()
        twin.forecast()
        bmi.update()
        assert np.array_equal(bmi.get_value_ptr("X_analysis_mean"), expected.mean(0)[0].numpy())


def test_host_observations_missing_and_invalid(bmi):
    bmi.set_value("observation_count", np.array([3]))
    assert bmi.get_grid_node_count(2) == 3 and bmi.get_var_nbytes("observation_value") == 24
    bmi.set_value("observation_x", np.array([0.5, 10.25, 39.5]))  # 39.5 lies between 39 and 0 (periodic)
    bmi.set_value("observation_value", np.array([1.0, np.nan, 2.0]))  # NaN: missing
    bmi.update()
    assert float(bmi.twin.recorder.series()["obs_count"][-1]) == 2
    assert np.isnan(bmi.get_value_ptr("observation_value")).all()  # values reset after each update
    assert bmi.get_value_ptr("observation_x")[1] == 10.25 and bmi.get_grid_node_count(2) == 3  # it persists
    bmi.set_value("observation_value", np.array([1.0, 1.0, 1.0]))
    bmi.set_value("observation_error_std", np.array([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="error_std"):
        bmi.update()
    with pytest.raises(ValueError, match="observation_count"):
        bmi.set_value("observation_value", np.zeros(5))
    bmi.set_value("observation_count", np.array([-1]))  # back to the twin's own observations
    assert bmi.get_grid_node_count(2) == 40 and np.isfinite(bmi.get_value_ptr("observation_value")).all()
    bmi.update()
    assert float(bmi.twin.recorder.series()["obs_count"][-1]) == 40


def test_no_host_observations_in_a_cycle_means_the_twins_own(bmi):
    bmi.set_value("observation_count", np.array([2]))
    bmi.set_value("observation_x", np.array([1.0, 2.0]))
    bmi.set_value("observation_value", np.array([1.0, 2.0]))
    bmi.update()
    bmi.update()  # nothing set: the twin's own 40 observations
    assert list(bmi.twin.recorder.series()["obs_count"]) == [2.0, 40.0]


def test_two_dimensional_model_with_two_variables(tmp_path):
    case = tmp_path / "flat.yaml"
    case.write_text(
        "name: flat\nmodel: {kind: persistence, shape: [4, 6], periodic: [false, true], variables: [u, v],"
        " units: K, dt: 600.0}\ntruth: {spinup_steps: 0}\nensemble: {size: 5}\n"
        "assimilation: {stages: [{method: enkf, variant: sqrt}]}\nrun: {cycles: 3}\n")
    b = TwinBmi()
    b.initialize(str(case))
    assert b.get_var_units("u_analysis_mean") == "K" == b.get_var_units("observation_value")
    assert b.get_grid_rank(0) == 2 and b.get_grid_rank(1) == 3 and b.get_grid_rank(2) == 2
    assert np.array_equal(b.get_grid_y(0, np.empty(4)), np.arange(4.0))
    assert b.get_grid_node_count(2) == 48 and b.get_time_step() == 600.0
    b.set_value("observation_count", np.array([1]))
    b.set_value("observation_y", np.array([1.5]))
    b.set_value("observation_x", np.array([5.5]))  # between x = 5 and x = 0 (periodic axis)
    b.set_value("observation_variable", np.array([1]))
    b.set_value("observation_value", np.array([10.0]))
    assert np.array_equal(b.get_grid_y(2, np.empty(1)), [1.5])

    def h(v: torch.Tensor) -> float:  # the observation operator by hand
        return float(v[1:3][:, [5, 0]].mean())

    prior = h(b.twin.ensemble[:, 1].mean(0))
    b.update()
    post = h(torch.from_numpy(b.get_value("v_analysis_mean", np.empty(24)).reshape(4, 6)))
    assert abs(10.0 - post) < abs(10.0 - prior)
    b.finalize()


@pytest.mark.mpi(min_size=2)
def test_each_rank_exposes_its_subdomain():
    """Under mpiexec -n 2: local shapes and origins; the gathered analysis equals the serial one."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    b, serial = TwinBmi(comm), TwinBmi(overrides=["domain.decomposition=serial"])
    b.initialize(str(CASE))
    serial.initialize(str(CASE))
    shape = b.get_grid_shape(0, np.empty(1, np.int32))
    origin = b.get_grid_origin(0, np.empty(1))
    assert int(shape[0]) == 40 // comm.size and origin[0] == comm.rank * 40 // comm.size
    rng = np.random.default_rng(5)  # the same stream on every rank: all ranks get all observations
    for cycle in range(3):
        if cycle:  # host observations between grid points (cycle 0: the twin's own)
            loc, y = rng.uniform(0, 40, 30), rng.normal(size=30)
            for bmi in (b, serial):
                bmi.set_value("observation_count", np.array([30]))
                bmi.set_value("observation_x", loc)
                bmi.set_value("observation_value", y)
        b.update()
        serial.update()
    parts = comm.allgather(b.get_value("X_analysis_mean", np.empty(int(shape[0]))))
    expected = serial.get_value_ptr("X_analysis_mean")
    assert np.allclose(np.concatenate(parts), expected, atol=1e-12, rtol=0)
    b.finalize()
    serial.finalize()
