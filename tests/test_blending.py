"""Dynamic-radius blending: brute-force reference, the REFERENCES properties, the stage, lat-lon grids."""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from assim.blending import (Blend, BlendParams, blend, dynamic_radii, load_terrain, network_scale,
                            terrain_roughness)
from assim.geo import KM_PER_DEGREE, GeoGrid, great_circle_km
from assim.observations import ObservationBatch
from assim.operators import ArctanOperator, SubsetOperator
from assim.registry import stage_registry
from assim.stages import AnalysisContext
from twin.domain import Grid, SerialDomain
from twin.random import Streams

f64 = torch.float64
HYP = settings(max_examples=30, deadline=None)


# ------------------------------------------------------------ numpy references

def np_distance(a: np.ndarray, b: np.ndarray, lengths=None, periodic=None) -> np.ndarray:
    diff = np.abs(a[:, None, :] - b[None, :, :])
    for ax in range(diff.shape[-1]):
        if periodic is not None and periodic[ax]:
            d = np.mod(diff[..., ax], lengths[ax])
            diff[..., ax] = np.minimum(d, lengths[ax] - d)
    return np.sqrt((diff**2).sum(-1))


def ref_radii(dist_oo: np.ndarray, misfit: np.ndarray, prm: BlendParams, rough=None) -> np.ndarray:
    p = dist_oo.shape[0]
    if p == 1:
        return np.full(misfit.shape, prm.r_max)
    d = dist_oo + np.diag(np.full(p, np.inf))
    d = d.min(1)
    dbar = max(np.median(d), prm.r_min)
    d = np.maximum(d, prm.r_min)
    r = prm.c * dbar * (d / dbar) ** prm.a
    if rough is not None:
        r = r / (1 + rough / prm.tau_s)
    r = r / (1 + np.abs(misfit) / prm.tau_m)
    return np.clip(r, prm.r_min, prm.r_max)


def ref_blend(b: np.ndarray, dist_go: np.ndarray, misfit: np.ndarray, radii: np.ndarray):
    """b (G,), dist (G, p), misfit (p,), radii (p,) -> analysis, mask (the formula, literally)."""
    w = np.exp(-dist_go**2 / (2 * radii**2))
    total = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        conv = np.where(total > 0, (w @ misfit) / total, 0.0)
    return b + w.max(1) * conv, w.max(1)


def periodic_problem(seed: int, p: int, shape=(18, 24), spacing=(1.0, 1.5), members: int = 2):
    rng = np.random.default_rng(seed)
    grid = Grid(shape, (True, True), spacing)
    b = torch.as_tensor(rng.standard_normal((members,) + shape))
    locs = torch.as_tensor(rng.uniform(0, 1, (p, 2)) * np.array(grid.lengths))  # anywhere, not grid points
    y = torch.as_tensor(rng.standard_normal(p) * 2)
    bx = torch.as_tensor(rng.standard_normal((members, p)))
    return grid, b, locs, y, bx


params_st = st.builds(lambda r_min, ratio, c, a, tau: BlendParams(r_min, r_min * ratio, c, a, math.inf, tau),
                      st.floats(0.3, 2.0), st.floats(1.0, 8.0), st.floats(0.3, 3.0), st.floats(0.0, 1.5),
                      st.one_of(st.just(math.inf), st.floats(0.2, 5.0)))


# ------------------------------------------------------------ the formula

@HYP
@given(st.integers(0, 10**6), st.integers(1, 25), params_st)
def test_matches_brute_force_reference(seed: int, p: int, prm: BlendParams) -> None:
    grid, b, locs, y, bx = periodic_problem(seed, p)
    res = blend(b, grid, locs, y, bx, prm)
    pts = grid.coordinates().numpy()
    d_go = np_distance(pts, locs.numpy(), grid.lengths, grid.periodic)
    d_oo = np_distance(locs.numpy(), locs.numpy(), grid.lengths, grid.periodic)
    for n in range(b.shape[0]):
        misfit = (y - bx[n]).numpy()
        r = ref_radii(d_oo, misfit, prm)
        np.testing.assert_allclose(res.radii[n].numpy(), r, rtol=1e-12)
        a, w = ref_blend(b[n].reshape(-1).numpy(), d_go, misfit, r)
        np.testing.assert_allclose(res.analysis[n].reshape(-1).numpy(), a, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(res.mask[n].reshape(-1).numpy(), w, rtol=1e-10, atol=1e-14)


@HYP
@given(st.integers(0, 10**6), st.integers(2, 20), params_st)
def test_observation_reproduced_up_to_other_weights(seed: int, p: int, prm: BlendParams) -> None:
    """At a grid-point station x_k: |a(x_k) − y_k| <= Σ_{j≠k} w_j(x_k) |m_j − m_k| (an exact bound)."""
    rng = np.random.default_rng(seed)
    grid = Grid((20, 20), (True, True))
    b = torch.as_tensor(rng.standard_normal(grid.shape))
    flat = torch.as_tensor(rng.choice(grid.size, p, replace=False))
    locs = grid.coordinates()[flat]
    y = torch.as_tensor(rng.standard_normal(p) * 3)
    bx = b.reshape(-1)[flat]
    res = blend(b, grid, locs, y, bx, prm)
    m, r = (y - bx).numpy(), res.radii.numpy()
    w = np.exp(-np_distance(locs.numpy(), locs.numpy(), grid.lengths, grid.periodic) ** 2 / (2 * r**2))
    np.fill_diagonal(w, 0.0)
    bound = (w * np.abs(m[None, :] - m[:, None])).sum(1)
    err = np.abs(res.analysis.reshape(-1)[flat].numpy() - y.numpy())
    assert (err <= bound + 1e-12).all()
    assert (res.mask.reshape(-1)[flat] == 1.0).all()


@HYP
@given(st.integers(0, 10**6), st.integers(1, 12), st.floats(0.0, 1.0))
def test_isolated_observation_and_far_field(seed: int, p: int, where: float) -> None:
    """Cluster in [0, 60), one station beyond 10 r_max: it is reproduced; > 6 r_max from all, a = b."""
    rng = np.random.default_rng(seed)
    grid = Grid((400,), (False,))
    prm = BlendParams(1.0, 5.0)
    iso = 160.0 + where * 100.0
    locs = torch.as_tensor(np.concatenate([rng.uniform(0, 60, p), [iso]])[:, None])
    b = torch.as_tensor(rng.standard_normal(grid.shape))
    y = torch.as_tensor(rng.standard_normal(p + 1) * 5)
    bx = torch.as_tensor(rng.standard_normal(p + 1))
    x = grid.coordinates()[:, 0]
    # evaluated at x_k itself (off the grid), where the background is b(x_k)
    at_iso = blend(bx[-1:], torch.tensor([[iso]], dtype=f64), locs, y, bx, prm).analysis
    assert float(at_iso[0]) == pytest.approx(float(y[-1]), abs=1e-12)
    res = blend(b, grid, locs, y, bx, prm)
    far = (x[:, None] - locs[:, 0][None]).abs().amin(1) > 6 * prm.r_max
    assert far.any()
    bound = math.exp(-18.0) * float((y - bx).abs().max()) * (1 + 1e-9)  # exp(-d²/2r²) at d = 6 r, rounding
    assert float((res.analysis - b)[far].abs().max()) <= bound


@HYP
@given(st.integers(0, 10**6), st.integers(1, 30), params_st)
def test_increment_is_mask_times_convex_combination(seed: int, p: int, prm: BlendParams) -> None:
    grid, b, locs, y, bx = periodic_problem(seed, p)
    res = blend(b, grid, locs, y, bx, prm)
    inc = res.analysis - b
    m = y - bx  # (N, p)
    lo = m.amin(-1).view(-1, 1, 1).clamp_max(0)
    hi = m.amax(-1).view(-1, 1, 1).clamp_min(0)
    assert ((res.mask >= 0) & (res.mask <= 1)).all()
    assert (inc <= res.mask * m.amax(-1).view(-1, 1, 1) + 1e-12).all()
    assert (inc >= res.mask * m.amin(-1).view(-1, 1, 1) - 1e-12).all()
    assert ((inc >= lo - 1e-12) & (inc <= hi + 1e-12)).all()  # never beyond the largest misfit


@HYP
@given(st.integers(0, 10**6), st.integers(2, 15).flatmap(
    lambda p: st.tuples(st.just(p), st.permutations(list(range(p))))), params_st)
def test_independent_of_observation_order(seed: int, pp: tuple, prm: BlendParams) -> None:
    p, perm = pp
    grid, b, locs, y, bx = periodic_problem(seed, p)
    perm = torch.tensor(perm)
    one = blend(b, grid, locs, y, bx, prm)
    two = blend(b, grid, locs[perm], y[perm], bx[:, perm], prm)
    torch.testing.assert_close(two.analysis, one.analysis, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(two.radii, one.radii[:, perm], rtol=1e-13, atol=0.0)


def test_chunking_does_not_change_the_result() -> None:
    grid, b, locs, y, bx = periodic_problem(3, 17)
    prm = BlendParams(0.5, 6.0)
    whole = blend(b, grid, locs, y, bx, prm)
    small = blend(b, grid, locs, y, bx, prm, chunk_elements=50)
    torch.testing.assert_close(small.analysis, whole.analysis, rtol=1e-14, atol=1e-14)


# ------------------------------------------------------------ the radius

@HYP
@given(st.integers(2, 12), st.sampled_from([8, 16, 24, 48]), st.floats(0.3, 2.0), st.floats(0.0, 1.5),
       st.floats(1.0, 40.0))
def test_radius_doubles_when_a_regular_network_thins(h: int, n: int, c: float, a: float,
                                                     r_max: float) -> None:
    grid = Grid((n * h * 2,), (True,))
    prm = BlendParams(1.0, r_max, c, a)
    dense = torch.arange(0, grid.shape[0], h, dtype=f64)[:, None]
    sparse = dense[::2]
    r1 = dynamic_radii(dense, torch.zeros(len(dense), dtype=f64), prm, grid.distance)
    r2 = dynamic_radii(sparse, torch.zeros(len(sparse), dtype=f64), prm, grid.distance)
    clip = lambda v: min(max(v, prm.r_min), prm.r_max)  # noqa: E731
    torch.testing.assert_close(r1, torch.full_like(r1, clip(c * h)), rtol=1e-13, atol=0.0)
    torch.testing.assert_close(r2, torch.full_like(r2, clip(2 * c * h)), rtol=1e-13, atol=0.0)
    assert r2.min() >= r1.max()


def test_isolated_station_reaches_further() -> None:
    locs = torch.tensor([[0.0], [2.0], [4.0], [6.0], [30.0]], dtype=f64)
    r = dynamic_radii(locs, torch.zeros(5, dtype=f64), BlendParams(0.5, 100.0, a=0.5))
    assert r[-1] > r[0] and float(r[-1]) == pytest.approx(2.0 * math.sqrt(24.0 / 2.0))


@HYP
@given(st.integers(0, 10**6), st.integers(2, 15), st.floats(0.1, 10.0))
def test_radius_shrinks_with_terrain_roughness_and_misfit(seed: int, p: int, tau: float) -> None:
    rng = np.random.default_rng(seed)
    grid = Grid((30, 30), (True, True))
    locs = torch.as_tensor(rng.uniform(0, 30, (p, 2)))
    terrain = torch.as_tensor(rng.standard_normal(grid.size))
    pts = grid.coordinates()
    prm = BlendParams(0.2, 50.0, 1.0, 0.5, tau_s=tau, tau_m=tau)
    zero = torch.zeros(p, dtype=f64)
    prev = dynamic_radii(locs, zero, prm, grid.distance)
    base = prev
    _, dbar = network_scale(locs, prm.r_min, grid.distance)
    # a station whose window c·d̄ holds fewer than two grid points has no roughness to shrink by
    rough = terrain_roughness(terrain, pts, locs, prm.c * dbar, grid.distance) > 0
    for scale in (0.5, 1.0, 2.0, 4.0):
        r = dynamic_radii(locs, zero, prm, grid.distance, (scale * terrain, pts))
        assert (r <= prev + 1e-12).all()
        assert ((r < base) | (base <= prm.r_min))[rough].all() and torch.equal(r[~rough], base[~rough])
        prev = r
    d_oo = np_distance(locs.numpy(), locs.numpy(), grid.lengths, grid.periodic)
    prev = base
    for m in (0.5, 1.0, 3.0):
        r = dynamic_radii(locs, torch.full((p,), -m, dtype=f64), prm, grid.distance)
        np.testing.assert_allclose(r.numpy(), ref_radii(d_oo, np.full(p, m), prm), rtol=1e-12)
        assert (r <= prev).all() and (r < base).any()
        prev = r


@HYP
@given(st.integers(0, 10**6), st.integers(1, 10), st.floats(0.5, 8.0))
def test_roughness_is_local_std(seed: int, p: int, radius: float) -> None:
    rng = np.random.default_rng(seed)
    grid = Grid((16, 16), (True, True))
    terrain = torch.as_tensor(rng.uniform(0, 3000, grid.size))
    locs = torch.as_tensor(rng.uniform(0, 16, (p, 2)))
    s = terrain_roughness(terrain, grid.coordinates(), locs, radius, grid.distance)
    d = np_distance(grid.coordinates().numpy(), locs.numpy(), grid.lengths, grid.periodic)
    for k in range(p):
        inside = terrain.numpy()[d[:, k] <= radius]
        assert float(s[k]) == pytest.approx(inside.std() if inside.size else 0.0, rel=1e-9, abs=1e-9)


@HYP
@given(st.integers(0, 10**6), st.integers(2, 20), st.integers(1, 3), params_st)
def test_colocated_stations_give_finite_radii(seed: int, p: int, sites: int, prm: BlendParams) -> None:
    rng = np.random.default_rng(seed)
    grid = Grid((16, 16), (True, True))
    pool = rng.uniform(0, 16, (sites, 2))
    locs = torch.as_tensor(pool[rng.integers(0, sites, p)])
    y = torch.as_tensor(rng.standard_normal(p))
    res = blend(torch.zeros(grid.shape, dtype=f64), grid, locs, y, torch.zeros(p, dtype=f64), prm)
    assert torch.isfinite(res.radii).all() and (res.radii >= prm.r_min).all()
    assert (res.radii <= prm.r_max).all()
    assert torch.isfinite(res.analysis).all() and torch.isfinite(res.mask).all()


@HYP
@given(st.floats(-50, 50), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_single_station_gets_r_max(misfit: float, u: float, v: float) -> None:
    grid = Grid((20, 20), (True, True))
    prm = BlendParams(1.0, 6.0, tau_m=0.5, tau_s=0.1)
    loc = torch.tensor([[20 * u, 20 * v]], dtype=f64)
    terrain = torch.as_tensor(np.random.default_rng(1).standard_normal(grid.shape))
    res = blend(torch.zeros(grid.shape, dtype=f64), grid, loc, torch.tensor([misfit], dtype=f64),
                torch.zeros(1, dtype=f64), prm, terrain=terrain)
    assert res.radii.tolist() == [6.0]
    d = grid.distance(grid.coordinates(), loc)[:, 0]
    expected = misfit * torch.exp(-d**2 / 72.0)
    torch.testing.assert_close(res.analysis.reshape(-1), expected, rtol=1e-12, atol=1e-12)


def test_no_observations_leaves_background() -> None:
    grid = Grid((5, 6), (True, True))
    b = torch.randn(2, 5, 6, dtype=f64)
    none = torch.zeros(0, dtype=f64)
    res = blend(b, grid, none.view(0, 2), none, none.view(1, 0), BlendParams(1.0, 2.0))
    assert torch.equal(res.analysis, b) and (res.mask == 0).all()


# ------------------------------------------------------------ the stage

def stage_problem(seed: int, variables=(0, 1), n_obs: int = 14, members: int = 5):
    rng = np.random.default_rng(seed)
    grid = Grid((12, 16), (True, True))
    ens = torch.as_tensor(rng.standard_normal((members, 2) + grid.shape))
    pool = np.concatenate([v * grid.size + np.arange(grid.size) for v in variables])
    idx = torch.as_tensor(np.sort(rng.choice(pool, n_obs, replace=False)))
    sigma = torch.as_tensor(rng.uniform(0.2, 1.0, n_obs))
    y = torch.as_tensor(rng.standard_normal(n_obs) * 2)
    return grid, ens, idx, y, sigma


def run_stage(cfg: Blend.Config, grid, ens, op, y, sigma, domain=None, terrain=None):
    obs = ObservationBatch(0.0, y, sigma, op.flat_index, op)
    stage = Blend(cfg, terrain=terrain)
    return stage(ens, obs, AnalysisContext(grid, domain or SerialDomain(grid), Streams(0), 0)), stage


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10**6))
def test_stage_members_blend_each_variable_with_its_own_observations(seed: int) -> None:
    grid, ens, idx, y, sigma = stage_problem(seed)
    op = SubsetOperator(grid, idx)
    out, stage = run_stage(Blend.Config(), grid, ens, op, y, sigma)
    for v in (0, 1):
        sel = op.variable == v
        prm = BlendParams(1.0, 4.0, tau_m=2 * float(sigma[sel].median()))  # defaults: 1 spacing, 16/4
        ref = blend(ens[:, v], grid, op.locations[sel], y[sel], op.select(ens)[:, sel], prm)
        torch.testing.assert_close(out[:, v], ref.analysis, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stage.diagnostics[v][0], ref.radii)


def test_stage_leaves_unobserved_variables_alone_and_mean_mode_keeps_anomalies() -> None:
    grid, ens, idx, y, sigma = stage_problem(5, variables=(1,))
    op = SubsetOperator(grid, idx)
    out, _ = run_stage(Blend.Config(), grid, ens, op, y, sigma)
    assert torch.equal(out[:, 0], ens[:, 0]) and not torch.allclose(out[:, 1], ens[:, 1])
    single, _ = run_stage(Blend.Config(), grid, ens.float(), op, y.float(), sigma.float())
    assert single.dtype == torch.float32 and torch.allclose(single.double(), out, atol=1e-5)
    out, _ = run_stage(Blend.Config(apply_to="mean", r_max=5.0, tau_m=1.0), grid, ens, op, y, sigma)
    torch.testing.assert_close(out - out.mean(0), ens - ens.mean(0), rtol=0, atol=1e-12)
    mean = ens.mean(0)
    ref = blend(mean[1], grid, op.locations, y, op.select(mean[None])[0], BlendParams(1.0, 5.0, tau_m=1.0))
    torch.testing.assert_close(out.mean(0)[1], ref.analysis, rtol=1e-12, atol=1e-12)


def test_stage_inverts_arctan_and_refuses_unknown_operators() -> None:
    grid, ens, idx, y, sigma = stage_problem(7)
    y = torch.atan(y)
    y[0] = 1.6  # only noise takes arctan observations past pi/2: dropped
    out, stage = run_stage(Blend.Config(tau_m=1.0), grid, ens, ArctanOperator(grid, idx), y, sigma)
    keep = torch.arange(len(y)) != 0
    subset = SubsetOperator(grid, idx[keep])
    ref, _ = run_stage(Blend.Config(tau_m=1.0), grid, ens, subset, torch.tan(y[keep]), sigma[keep])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)

    class Squared(SubsetOperator):
        def __call__(self, state):
            return self.select(state) ** 2

    with pytest.raises(ValueError, match="Squared"):
        run_stage(Blend.Config(), grid, ens, Squared(grid, idx), y, sigma)


def test_stage_config_parses_and_terrain_file(tmp_path) -> None:
    import xarray as xr

    from twin.config import ConfigError, parse_dataclass

    assert stage_registry["blend"] is Blend
    cfg = parse_dataclass(Blend.Config, {"c": 2, "apply_to": "mean", "terrain": "x.nc"}, "", "case.yaml")
    assert cfg.c == 2.0 and cfg.apply_to == "mean"
    with pytest.raises(ConfigError):
        parse_dataclass(Blend.Config, {"apply_to": "everything"}, "", "case.yaml")
    for bad in ({"r_min": -1.0}, {"r_min": 3.0, "r_max": 2.0}, {"a": -0.5}):
        with pytest.raises(ValueError):
            Blend(Blend.Config(**bad))
    grid, ens, idx, y, sigma = stage_problem(11)
    orog = np.random.default_rng(0).uniform(0, 2000, grid.shape)
    path = tmp_path / "orog.nc"
    xr.Dataset({"orog": (("x", "y"), orog.T, {"standard_name": "surface_altitude"}),
                "other": ((), 1.0)}).to_netcdf(path)
    assert torch.equal(load_terrain(str(path), grid), torch.as_tensor(orog))
    op = SubsetOperator(grid, idx)
    _, flat = run_stage(Blend.Config(r_max=8.0, tau_m=100.0), grid, ens, op, y, sigma)
    _, rough = run_stage(Blend.Config(r_max=8.0, tau_m=100.0, terrain=str(path)), grid, ens, op, y, sigma)
    for v in (0, 1):
        assert (rough.diagnostics[v][0] <= flat.diagnostics[v][0] + 1e-12).all()
        assert (rough.diagnostics[v][0] < flat.diagnostics[v][0]).any()


class ThreadDomain(SerialDomain):
    """Two 'ranks' as threads: rows split in two, collectives through a shared barrier."""

    def __init__(self, grid: Grid, rank: int, shared: dict) -> None:
        super().__init__(grid)
        self.rank, self.size, self.shared = rank, 2, shared
        half = grid.shape[0] // 2
        rows = slice(0, half) if rank == 0 else slice(half, grid.shape[0])
        self.local_slices = (rows, slice(0, grid.shape[1]))

    @property
    def local_shape(self):
        return tuple(s.stop - s.start for s in self.local_slices)

    def local_flat_indices(self) -> torch.Tensor:
        return torch.arange(self.grid.size).reshape(self.grid.shape)[self.local_slices].reshape(-1)

    def _exchange(self, obj):
        self.shared["slots"][self.rank] = obj
        self.shared["barrier"].wait(timeout=60)
        out = list(self.shared["slots"])
        self.shared["barrier"].wait(timeout=60)
        return out

    def allgather_object(self, obj):
        return self._exchange(obj)

    def allreduce(self, x):
        return sum(self._exchange(x))


@pytest.mark.parametrize("split_observations", [False, True])
def test_stage_under_a_two_rank_decomposition_equals_serial(split_observations: bool) -> None:
    grid, ens, idx, y, sigma = stage_problem(13, n_obs=20)
    serial, _ = run_stage(Blend.Config(r_max=5.0), grid, ens, SubsetOperator(grid, idx), y, sigma)
    shared = {"slots": [None, None], "barrier": threading.Barrier(2)}

    def rank(r: int) -> torch.Tensor:
        dom = ThreadDomain(grid, r, shared)
        local = ens[(slice(None), slice(None)) + dom.local_slices]
        mine = torch.ones(len(idx), dtype=torch.bool)
        if split_observations:  # each rank holds the observations in its own rows
            mine = torch.isin(idx % grid.size, dom.local_flat_indices())
        op = SubsetOperator(grid, idx[mine])
        return run_stage(Blend.Config(r_max=5.0), grid, local, op, y[mine], sigma[mine], domain=dom)[0]

    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(rank, (0, 1)))
    torch.testing.assert_close(torch.cat(parts, dim=2), serial, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------ latitude-longitude grids

def test_great_circle_known_distances() -> None:
    r = 6371.0
    assert float(great_circle_km(0, 0, 0, 90)) == pytest.approx(math.pi / 2 * r)
    assert float(great_circle_km(10, 20, -10, -160)) == pytest.approx(math.pi * r)  # antipodes
    assert float(great_circle_km(-90, 0, 90, 123)) == pytest.approx(math.pi * r)
    assert float(great_circle_km(0, 179.5, 0, -179.5)) == pytest.approx(KM_PER_DEGREE)  # across the dateline
    assert float(great_circle_km(90, 0, 90, 77)) == pytest.approx(0.0, abs=1e-9)  # the pole is one point
    assert float(great_circle_km(89, 0, 89, 180)) == pytest.approx(2 * KM_PER_DEGREE)  # over the pole


GEO = GeoGrid.regular(73, 144, lon0=-180.0)  # 2.5 degrees, the seam at the dateline


def geo_single(lat: float, lon: float, misfit: float, r: float = 900.0) -> torch.Tensor:
    prm = BlendParams(100.0, r)
    res = blend(torch.zeros(GEO.shape, dtype=f64), GEO, torch.tensor([[lat, lon]], dtype=f64),
                torch.tensor([misfit], dtype=f64), torch.zeros(1, dtype=f64), prm)
    assert res.radii.tolist() == [r]
    return res.analysis


def neighbour_bound_ok(a: torch.Tensor, b: torch.Tensor, d_km: torch.Tensor, misfit: float, r: float) -> bool:
    """|inc(x) − inc(x')| <= |m| sup|w'| d(x, x') = |m| d / (r sqrt(e)) for one Gaussian station."""
    return bool(((a - b).abs() <= abs(misfit) * d_km / (r * math.sqrt(math.e)) + 1e-9).all())


@HYP
@given(st.floats(-80, 80), st.floats(-0.5, 0.5), st.floats(0.5, 5.0))
def test_blend_is_continuous_across_the_dateline(lat: float, off: float, misfit: float) -> None:
    lon = 179.9 + off if off < 0 else -179.9 + off  # within half a degree of the dateline
    a = geo_single(lat, lon, misfit)
    lats = torch.as_tensor(GEO.axis_values(0))
    east = torch.stack([lats, torch.full_like(lats, -180.0)], -1)
    west = torch.stack([lats, torch.full_like(lats, 177.5)], -1)
    d = great_circle_km(east[:, 0], east[:, 1], west[:, 0], west[:, 1])
    assert neighbour_bound_ok(a[:, 0], a[:, -1], d, misfit, 900.0)  # the seam pair
    row = int(round((lat + 90) / 2.5))
    assert float(a[row, 0].abs() + a[row, -1].abs()) > 0.5 * misfit  # the station does reach both sides


@HYP
@given(st.lists(st.tuples(st.floats(-85, 85), st.floats(-180, 180), st.floats(-3, 3)),
                min_size=1, max_size=6), st.integers(1, 143))
def test_lat_lon_blend_commutes_with_longitude_rotation(stations: list, shift: int) -> None:
    """Rotating the network by k grid columns rolls the field by k columns, the seam included."""
    loc = torch.tensor([[s[0], s[1]] for s in stations], dtype=f64)
    y = torch.tensor([s[2] for s in stations], dtype=f64)
    prm = BlendParams(100.0, 1500.0)
    zero = torch.zeros(GEO.shape, dtype=f64)
    one = blend(zero, GEO, loc, y, torch.zeros_like(y), prm)
    moved = loc.clone()
    moved[:, 1] = torch.remainder(moved[:, 1] + 2.5 * shift + 180.0, 360.0) - 180.0
    two = blend(zero, GEO, moved, y, torch.zeros_like(y), prm)
    torch.testing.assert_close(two.radii, one.radii, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(two.analysis, torch.roll(one.analysis, shift, dims=1), rtol=1e-9, atol=1e-9)


@HYP
@given(st.floats(86.0, 90.0), st.floats(-180, 180), st.floats(0.5, 5.0))
def test_blend_around_the_pole(lat: float, lon: float, misfit: float) -> None:
    a = geo_single(lat, lon, misfit)
    pole = a[-1]
    torch.testing.assert_close(pole, pole[:1].expand_as(pole), rtol=1e-9, atol=1e-12)  # one point, one value
    ring = a[-3]  # latitude 85: its opposite side is reached over the pole
    coords = torch.as_tensor(GEO.axis_values(1))
    d = great_circle_km(torch.full_like(coords, 85.0), coords, lat, lon)
    torch.testing.assert_close(ring, misfit * torch.exp(-d**2 / (2 * 900.0**2)), rtol=1e-9, atol=1e-12)
    opposite = int(torch.argmax(((coords - lon + 180) % 360 - 180).abs()))
    over_pole = (95.0 - lat + 1.25) * KM_PER_DEGREE  # an upper bound of the distance over the pole
    assert float(ring[opposite]) >= misfit * math.exp(-over_pole**2 / (2 * 900.0**2))
    step = great_circle_km(85.0, 0.0, 85.0, 2.5)
    assert neighbour_bound_ok(ring, torch.roll(ring, 1), torch.full_like(ring, float(step)), misfit, 900.0)


def test_pole_row_observed_everywhere_gives_finite_radii() -> None:
    lons = torch.as_tensor(GEO.axis_values(1))
    locs = torch.stack([torch.full_like(lons, 90.0), lons], -1)  # 144 co-located stations
    y = torch.linspace(-1, 1, len(lons), dtype=f64)
    res = blend(torch.zeros(GEO.shape, dtype=f64), GEO, locs, y, torch.zeros_like(y),
                BlendParams(GEO.resolution, 0.25 * max(GEO.lengths)))
    assert torch.isfinite(res.radii).all() and (res.radii >= GEO.resolution - 1e-9).all()
    assert torch.isfinite(res.analysis).all()


def test_stage_on_a_geographic_grid_uses_km_defaults() -> None:
    grid = GeoGrid.regular(19, 36)
    rng = np.random.default_rng(2)
    ens = torch.as_tensor(rng.standard_normal((3, 1) + grid.shape))
    idx = torch.as_tensor(np.sort(rng.choice(grid.size, 1, replace=False)))
    out, stage = run_stage(Blend.Config(), grid, ens, SubsetOperator(grid, idx), torch.ones(1, dtype=f64),
                           torch.ones(1, dtype=f64))
    radii = stage.diagnostics[0][0]  # a single station gets r_max: a quarter of the equator
    torch.testing.assert_close(radii, torch.full((3, 1), 90.0 * KM_PER_DEGREE, dtype=f64))
    assert grid.resolution == pytest.approx(10 * KM_PER_DEGREE)
    assert torch.isfinite(out).all()
