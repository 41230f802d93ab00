"""Diffusion emulator: halo-exact tiling of the network, EDM pieces, sampler, checkpoints, the
emulator (determinism, decomposition independence) and the training loop (smoke, exact resume)."""
import re
import threading
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings, strategies as st

from emulators.diffusion import (CheckpointMismatch, DiffusionEmulator, NetworkConfig, Precond, UNetLite,
                                 edm_loss, heun_sample, load_checkpoint, save_checkpoint, sigma_schedule)
from emulators.diffusion.checkpoint import SHIPPED_SQG, WEIGHTS_DIR
from emulators.diffusion.edm import EDMConfig, coefficients
from emulators.diffusion.network import _trace
from emulators.registry import model_registry
from twin.domain import Grid, SerialDomain, pad_halo

torch.set_num_threads(1)
TINY = NetworkConfig(in_channels=5, out_channels=2, fold=2, channels=(8, 16), blocks=(1, 2), up_blocks=1, embed=16)


def random_net(config=TINY, dtype=torch.float64, seed=0):
    """A network with every weight random (the default init zeroes the head: output 0)."""
    net = UNetLite(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net.to(dtype).eval()


def periodic(x, h):
    return pad_halo(x, (h, h), (True, True))


# ---------------------------------------------------------------- network


@settings(max_examples=12, deadline=None)
@given(ny=st.integers(2, 10), nx=st.integers(2, 10), cuts=st.data(),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_tiled_evaluation_with_halos_equals_global(ny, nx, cuts, dtype):
    net = random_net(dtype=dtype)
    h, a = net.receptive_halo, net.alignment
    ny, nx = ny * a, nx * a
    g = torch.Generator().manual_seed(ny * 100 + nx)
    x = torch.randn(2, 5, ny, nx, generator=g, dtype=torch.float64).to(dtype)
    c_noise = torch.tensor([-1.0, 0.5], dtype=dtype)
    padded = periodic(x, h)
    with torch.no_grad():
        whole = net(padded, c_noise)
        ys = sorted({0, ny, *(a * k for k in cuts.draw(st.lists(st.integers(1, ny // a - 1), max_size=3)) if ny > a)})
        xs = sorted({0, nx, *(a * k for k in cuts.draw(st.lists(st.integers(1, nx // a - 1), max_size=3)) if nx > a)})
        tiled = torch.empty_like(whole)
        for y0, y1 in zip(ys[:-1], ys[1:]):
            for x0, x1 in zip(xs[:-1], xs[1:]):
                tiled[..., y0:y1, x0:x1] = net(padded[..., y0:y1 + 2 * h, x0:x1 + 2 * h], c_noise)
    assert float(whole.abs().max()) > 0.1
    atol = 1e-10 if dtype == torch.float64 else 1e-5 * float(whole.abs().max())
    torch.testing.assert_close(tiled, whole, atol=atol, rtol=0)


@settings(max_examples=10, deadline=None)
@given(fold=st.integers(1, 2), levels=st.integers(1, 3), blocks=st.integers(0, 2), up=st.integers(0, 2),
       ny=st.integers(1, 4), nx=st.integers(1, 4))
def test_wrapped_convolutions_equal_the_halo_evaluation(fold, levels, blocks, up, ny, nx):
    """On a whole doubly periodic field, `wrap` (circular 3x3 convolutions, no halo: the training and
    serial fast path) is the same function as the valid convolutions on the periodically padded input."""
    config = NetworkConfig(in_channels=5, out_channels=2, fold=fold, channels=(8, 12, 16)[:levels],
                           blocks=(blocks, 1, 2)[:levels], up_blocks=up, embed=16)
    net = random_net(config, seed=fold + 10 * levels)
    h, a = net.receptive_halo, net.alignment
    x = torch.randn(2, 5, ny * a, nx * a, generator=torch.Generator().manual_seed(ny + 7 * nx), dtype=torch.float64)
    c_noise = torch.tensor([-1.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        halo = net(periodic(x, h), c_noise)
        net.wrap = True
        wrapped = net(x, c_noise)
    assert net.input_halo == 0 and float(halo.abs().max()) > 0.1
    torch.testing.assert_close(wrapped, halo, atol=1e-10, rtol=0)


def test_receptive_halo_is_minimal_and_bounds_the_influence():
    net = random_net()
    h = net.receptive_halo
    assert h == 26 and net.alignment == 4 and _trace(TINY, h) is not None and _trace(TINY, h - TINY.fold) is None
    x = torch.randn(1, 5, 64, 64, dtype=torch.float64)
    bumped = x.clone()
    bumped[0, 1, 32, 32] += 1.0
    with torch.no_grad():
        diff = (net(periodic(bumped, h), torch.zeros(1)) - net(periodic(x, h), torch.zeros(1))).abs().amax((0, 1))
    rows, cols = torch.nonzero(diff > 0, as_tuple=True)
    # a pixel's own reach is up to h + alignment - 1 (pooling blocks); aligned tiles need only h
    reach = max(int((rows - 32).abs().max()), int((cols - 32).abs().max()))
    assert h < reach <= h + net.alignment - 1
    with pytest.raises(ValueError, match="multiples of 4"):
        net(periodic(x[..., :62, :], h), torch.zeros(1))


def test_bfloat16_autocast_keeps_float32_output_and_stays_close():
    """Training may autocast to bfloat16: norms and residuals stay float32, so the output is float32 and
    within bfloat16 rounding of the float32 evaluation; gradients reach every weight."""
    net = random_net(dtype=torch.float32)
    x = periodic(torch.randn(2, 5, 32, 32), net.receptive_halo)
    c = torch.tensor([0.3, -1.0])
    with torch.no_grad():
        full = net(x, c)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = net(x, c)
    assert half.dtype == torch.float32 and not torch.equal(half, full)
    assert float((half - full).norm() / full.norm()) < 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x, c).square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
               for p in net.parameters())


def test_network_is_small():
    net = UNetLite(NetworkConfig(in_channels=6, out_channels=2))
    assert sum(p.numel() for p in net.parameters()) < 2_000_000


# ---------------------------------------------------------------- EDM


def test_preconditioning_coefficients_and_schedule():
    c_skip, c_out, c_in, c_noise = coefficients(torch.tensor([0.5]), 0.5)
    assert torch.allclose(torch.cat([c_skip, c_out, c_in]), torch.tensor([0.5, 0.5 / 2**0.5, 1 / (0.5 * 2**0.5)]))
    assert torch.allclose(c_noise, torch.log(torch.tensor([0.5])) / 4)
    s = sigma_schedule(18, 0.002, 20.0, 7.0)
    assert len(s) == 19 and s[0] == pytest.approx(20.0) and s[17] == pytest.approx(0.002) and s[18] == 0.0
    assert all(a > b for a, b in zip(s[:-1], s[1:]))


def test_edm_loss_is_deterministic_for_a_generator():
    net = UNetLite(NetworkConfig(in_channels=3, out_channels=1, channels=(4, 8), blocks=(1, 1), embed=8))
    model, h = Precond(net, 1.0), net.receptive_halo
    y, cond = torch.randn(2, 1, 8, 8), periodic(torch.randn(2, 2, 8, 8), h)
    losses = [float(edm_loss(model, y, cond, periodic, EDMConfig(), torch.Generator().manual_seed(5)).detach())
              for _ in range(2)]
    assert losses[0] == losses[1] > 0


def gaussian_denoiser(mu, s):
    return lambda x, sigma: (s * s * x + sigma * sigma * mu) / (s * s + sigma * sigma)


def seeded_noise(seed, n=100_000):
    g = torch.Generator().manual_seed(seed)
    return lambda k: torch.randn(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("churn,steps,std_tol", [(0.0, 40, 0.015), (5.0, 40, 0.02), (0.0, 18, 0.04)])
def test_sampler_with_the_exact_denoiser_reproduces_a_gaussian(churn, steps, std_tol):
    """N(μ, s²) with D(x, σ) = (s² x + σ² μ)/(s² + σ²). The flow from N(0, σ_max²) (not N(μ, s² + σ_max²))
    ends at mean μ (1 − s/√(s² + σ_max²)); churn re-noises and pulls it to μ. 18 steps: a few % wider."""
    mu, s, smax = 1.5, 0.7, 20.0
    x = heun_sample(gaussian_denoiser(mu, s), seeded_noise(1), steps=steps, sigma_max=smax, churn=churn)
    flow_mean = mu * (1 - s / (s * s + smax * smax) ** 0.5)
    assert flow_mean - 0.01 < float(x.mean()) < (mu if churn else flow_mean) + 0.01
    assert float(x.std()) == pytest.approx(s, rel=std_tol)


def test_sampler_is_deterministic_for_fixed_noise():
    d = gaussian_denoiser(0.0, 1.0)
    a = heun_sample(d, seeded_noise(3, 50), steps=6, churn=3.0)
    b = heun_sample(d, seeded_noise(3, 50), steps=6, churn=3.0)
    c = heun_sample(d, seeded_noise(4, 50), steps=6, churn=3.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- checkpoints and the emulator


def write_checkpoint(path, shape=(32, 32), net_config=TINY, seed=0, **changes):
    net = random_net(net_config, torch.float32, seed)
    fields = dict(network_config=net_config, state_dict={k: v * 0.3 for k, v in net.state_dict().items()},
                  sigma_data=1.0, variables=(("a", "K", "field a"), ("b", "K", "field b")), grid_shape=shape,
                  periodic=(True, True), static=("cos_y",), dt_seconds=21600.0,
                  stats={"state_mean": (1.0, -1.0), "state_std": (10.0, 8.0), "inc_mean": (0.0, 0.1),
                         "inc_std": (2.0, 3.0)}, training={"note": "test"})
    fields.update(changes)
    return save_checkpoint(path, **fields)


def make_emulator(path, domain=None, dtype=torch.float64, **cfg):
    config = DiffusionEmulator.Config(checkpoint=str(path), steps=3, churn=1.0, **cfg)
    return DiffusionEmulator(config, domain or SerialDomain(DiffusionEmulator.global_grid(config)), dtype)


def test_checkpoint_round_trip(tmp_path):
    path = write_checkpoint(tmp_path / "c.pt")
    ck = load_checkpoint(path)
    assert ck.grid_shape == (32, 32) and ck.dt_seconds == 21600.0 and ck.static == ("cos_y",)
    assert ck.variables[1] == ("b", "K", "field b") and ck.stats["inc_std"] == (2.0, 3.0)
    net = ck.build_network()
    assert net.config == TINY
    ref = random_net(TINY, torch.float32)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(net.state_dict()[k], v * 0.3)
    assert model_registry["diffusion"] is DiffusionEmulator
    em = make_emulator(path)
    assert em.dt == 21600.0 and em.receptive_halo == 26 and [v.name for v in em.variables] == ["a", "b"]
    assert em.wrap and em.halo == 0  # one process, the whole periodic grid: wrapping convolutions, no halo


def test_checkpoint_mismatches_are_one_line_errors(tmp_path):
    bad = []
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    bad.append(tmp_path / "junk.pt")
    torch.save({"hello": 1}, tmp_path / "other.pt")
    bad.append(tmp_path / "other.pt")
    bad.append(tmp_path / "absent.pt")
    good = torch.load(write_checkpoint(tmp_path / "good.pt"), weights_only=True)
    for name, change in [("version", {"format_version": 99}), ("vars", {"variables": [["a", "K", "x"]]}),
                         ("arch", {"network": {**good["network"], "channels": [8, 24]}}),
                         ("keys", {"state_dict": {k: v for k, v in good["state_dict"].items() if "head" not in k}}),
                         ("archkey", {"network": {**good["network"], "attention": True}})]:
        torch.save({**good, **change}, tmp_path / f"{name}.pt")
        bad.append(tmp_path / f"{name}.pt")
    for path in bad:
        with pytest.raises(CheckpointMismatch) as e:
            make_emulator(path)
        assert str(e.value).startswith(str(path)) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(CheckpointMismatch, match="grid"):
        make_emulator(tmp_path / "good.pt", SerialDomain(Grid((16, 16), (True, True))))
    with pytest.raises(ValueError, match="single-step"):
        make_emulator(tmp_path / "good.pt", sampler="single_step")


def test_smoothing_order_round_trips_and_filters_each_step(tmp_path):
    """The checkpoint's Shapiro order is applied after every step; the case may override it; a bad order
    in a checkpoint is a one-line error."""
    from emulators.diffusion.smoothing import shapiro

    plain, smooth = write_checkpoint(tmp_path / "p.pt"), write_checkpoint(tmp_path / "s.pt", smoothing_order=8)
    assert load_checkpoint(plain).smoothing_order == 0 and load_checkpoint(smooth).smoothing_order == 8
    x = torch.randn(2, 2, 32, 32, dtype=torch.float64) * 5
    raw = make_emulator(plain).step(x, 0.0)
    expected = shapiro(raw, 8, (True, True), lambda z, h: pad_halo(z, (h, h), (True, True)))
    torch.testing.assert_close(make_emulator(smooth).step(x, 0.0), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(make_emulator(plain, smoothing_order=8).step(x, 0.0), expected, atol=1e-12, rtol=0)
    assert torch.equal(make_emulator(smooth, smoothing_order=0).step(x, 0.0), raw)
    with pytest.raises(ValueError, match="even"):
        make_emulator(plain, smoothing_order=3)
    good = torch.load(smooth, weights_only=True)
    torch.save({**good, "smoothing_order": 5}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointMismatch, match="smoothing_order"):
        make_emulator(tmp_path / "odd.pt")


def test_emulator_is_deterministic_and_members_differ(tmp_path):
    em = make_emulator(write_checkpoint(tmp_path / "c.pt"))
    x = torch.randn(3, 2, 32, 32, dtype=torch.float64) * 10
    a, b = em.step(x, 0.0), em.step(x, 0.0)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert not torch.equal(a, em.step(x, em.dt))
    assert not torch.equal(a, make_emulator(tmp_path / "c.pt", seed=9).step(x, 0.0))
    same = em.step(x[:1].expand(2, -1, -1, -1), 0.0)
    assert float((same[0] - same[1]).abs().max()) > 1e-3


class ThreadedTiles:
    """Tiles of one process run in lockstep threads: halo exchange, gather and scatter through a
    shared board, as an MPI decomposition would do them (for testing rank-count independence)."""

    def __init__(self, grid, row_cuts, col_cuts):
        self.grid = grid
        self.tiles = [(slice(y0, y1), slice(x0, x1)) for y0, y1 in zip(row_cuts[:-1], row_cuts[1:])
                      for x0, x1 in zip(col_cuts[:-1], col_cuts[1:])]
        self.barrier, self.board = threading.Barrier(len(self.tiles)), {}

    def domain(self, rank):
        return _Tile(self, rank)

    def run(self, work):
        """`work(domain)` on every tile in its own thread; returns {rank: result}, re-raising failures."""
        results, errors = {}, []

        def one(rank):
            try:
                results[rank] = work(self.domain(rank))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=one, args=(r,)) for r in range(len(self.tiles))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        return results


class _Tile:
    def __init__(self, group, rank):
        self.group, self.rank, self.size, self.grid = group, rank, len(group.tiles), group.grid
        self.local_slices = group.tiles[rank]
        self.local_shape = tuple(s.stop - s.start for s in self.local_slices)

    def _whole(self, x, tag=None):
        g = self.group
        g.board[self.rank] = (x, tag)
        g.barrier.wait()
        full = x.new_empty(x.shape[:-2] + self.grid.shape)
        for r, (ys, xs) in enumerate(g.tiles):
            full[..., ys, xs] = g.board[r][0]
        tags = {g.board[r][1] for r in range(self.size)}
        g.barrier.wait()
        assert len(tags) == 1, f"ranks exchanged different halo widths {tags}"  # MPI needs equal strips
        return full

    def exchange_halo(self, x, w):
        full = pad_halo(self._whole(x, w), (w, w), (True, True))
        ys, xs = self.local_slices
        return full[..., ys.start:ys.stop + 2 * w, xs.start:xs.stop + 2 * w]

    def gather(self, x):
        full = self._whole(x)
        return full if self.rank == 0 else None

    def scatter(self, x):
        g = self.group
        if self.rank == 0:
            g.board["scatter"] = x
        g.barrier.wait()
        out = g.board["scatter"][(..., *self.local_slices)].clone()
        g.barrier.wait()
        return out

    def allgather_object(self, obj):
        g = self.group
        g.board[("obj", self.rank)] = obj
        g.barrier.wait()
        out = [g.board[("obj", r)] for r in range(self.size)]
        g.barrier.wait()
        return out


@pytest.mark.parametrize("rows,cols", [((0, 14, 32), (0, 32)), ((0, 16, 32), (0, 12, 32)), ((0, 4, 32), (0, 32))])
def test_decomposed_step_equals_serial_step(tmp_path, rows, cols):
    """Unaligned tiles (alignment slack), aligned 2x2 tiles, and a tile thinner than the halo (and than
    the Shapiro filter's halo of 8)."""
    path = write_checkpoint(tmp_path / "c.pt", smoothing_order=16)
    grid = DiffusionEmulator.global_grid(DiffusionEmulator.Config(checkpoint=str(path)))
    x = torch.randn(2, 2, 32, 32, dtype=torch.float64) * 5
    serial = make_emulator(path).step(x, 3 * 21600.0)
    group = ThreadedTiles(grid, rows, cols)
    results = group.run(lambda dom: make_emulator(path, dom).step(x[(..., *dom.local_slices)], 3 * 21600.0))
    for r, (ys, xs) in enumerate(group.tiles):
        torch.testing.assert_close(results[r], serial[..., ys, xs], atol=1e-9, rtol=0)


def test_symmetric_members_conjugate_each_members_step(tmp_path):
    """symmetries: members steps member m as g⁻¹ f(g x) with g = SQG.symmetry(m mod 8): member 0 is the plain
    step, the others differ from it, each is keyed by its global member index (a member split reproduces
    the whole ensemble's step), and a checkpoint without a symmetric truth model, or a split grid, is refused."""
    from emulators.sqg import SQG

    path = write_checkpoint(tmp_path / "c.pt", training={"truth_model": "sqg"})
    x = torch.randn(10, 2, 32, 32, dtype=torch.float64) * 5
    plain, sym = make_emulator(path), make_emulator(path, symmetries="members")
    out = sym.step(x, 21600.0)
    for m in (0, 3, 9):
        g = lambda z: SQG.symmetry(m % 8, z)  # noqa: E731
        expect = g(plain.step(g(x[m:m + 1]), 21600.0, first_member=m))
        torch.testing.assert_close(out[m:m + 1], expect, atol=1e-12, rtol=0)
    assert (out[3] - plain.step(x, 21600.0)[3]).abs().max() > 1e-3
    torch.testing.assert_close(sym.step(x[4:], 21600.0, first_member=4), out[4:], atol=1e-12, rtol=0)
    mean2 = make_emulator(path, symmetries="members", symmetry_mean=2).step(x, 21600.0)
    for m in (1, 6):
        pair = [SQG.symmetry(i, x[m:m + 1]) for i in (m % 8, (m + 4) % 8)]
        draws = [SQG.symmetry(i, plain._sample(z, 1, m, variant)) for i, z, variant in
                 zip((m % 8, (m + 4) % 8), pair, (0, 1))]
        torch.testing.assert_close(mean2[m:m + 1], (draws[0] + draws[1]) / 2, atol=1e-12, rtol=0)
    for bad in (dict(symmetry_mean=3, symmetries="members"), dict(symmetry_mean=2)):
        with pytest.raises(ValueError, match="symmetry_mean"):
            make_emulator(path, **bad)
    with pytest.raises(ValueError, match="symmetries: members needs the symmetries"):
        make_emulator(write_checkpoint(tmp_path / "archive.pt"), symmetries="members")
    with pytest.raises(ValueError, match="symmetries"):
        make_emulator(path, symmetries="mirror")
    grid = DiffusionEmulator.global_grid(DiffusionEmulator.Config(checkpoint=str(path)))
    errors = ThreadedTiles(grid, (0, 16, 32), (0, 32)).run(lambda dom: _error(lambda: make_emulator(
        path, dom, symmetries="members")))
    assert all("whole fields on every rank" in e for e in errors.values())


def _error(make) -> str:
    try:
        make()
    except ValueError as e:
        return str(e)
    return ""


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("shape,axes_periodic", [((64, 64), (True, True)), ((32, 32), (True, True)),
                                                 ((12, 12), (True, True)), ((18, 10), (True, False))])
def test_mpi_step_equals_serial_step(tmp_path, shape, axes_periodic):
    """Under mpiexec: 64 x 64 splits into subdomains wider than the halo (26 + slack); on 32 x 32 the
    halo spans two subdomains, on 12 x 12 and 18 x 10 (uneven alignment slack, an open axis) it wraps
    round the grid more than once. Every split steps on its subdomains over multi-hop halo exchange and
    gives the serial step (with a Shapiro filter of order 16 after it: another multi-hop halo, of 8
    points, filtering along the periodic axes only); so does learned inpainting. Each rank writes the same checkpoint to its own
    folder."""
    from mpi4py import MPI

    from twin.mpi_domain import MPIDomain

    path = write_checkpoint(tmp_path / "c.pt", shape=shape, periodic=axes_periodic, smoothing_order=16)
    config = DiffusionEmulator.Config(checkpoint=str(path), steps=3, churn=1.0)
    grid = DiffusionEmulator.global_grid(config)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, *shape, generator=g, dtype=torch.float64)
    field = torch.randn(2, 2, *shape, generator=g, dtype=torch.float64)
    known = torch.rand(2, *shape, generator=g) < 0.3
    serial = make_emulator(path)
    dom = MPIDomain(grid, MPI.COMM_WORLD)
    em = DiffusionEmulator(config, dom, torch.float64)
    sl = (..., *dom.local_slices)
    torch.testing.assert_close(em.step(x[sl], 0.0), serial.step(x, 0.0)[sl], atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(em.inpainter(x[sl], 0.0)(field[sl], known[sl]),
                               serial.inpainter(x, 0.0)(field, known)[sl], atol=1e-9, rtol=1e-6)


# ---------------------------------------------------------------- training

TRAIN_CASE = """
name: tiny
truth: {kind: sqg, size: 32, dt: 1200.0}
data: {runs: 3, validation_runs: 1, seed: 5, spinup: 2h, step: 1h, samples: 5}
network: {channels: [8, 16], blocks: [1, 1], up_blocks: 1, embed: 16, static: [cos_y, sin_y]}
train: {iterations: 6, batch_size: 2, warmup: 2, checkpoint_every: 3, threads: 1, validation_pairs: 2}
"""


def train_case(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(TRAIN_CASE)
    return path


def test_training_smoke_run_writes_a_usable_checkpoint(tmp_path):
    from twin.train import train_from_case

    out = tmp_path / "out"
    ckpt = train_from_case(train_case(tmp_path), out=out, quiet=True)
    assert ckpt == out / "checkpoint.pt" and (out / "config.yaml").is_file() and (out / "loss.png").is_file()
    em = make_emulator(ckpt)
    assert em.dt == 3600.0 and em.grid.shape == (32, 32)
    assert [v.name for v in em.variables] == ["theta_bottom", "theta_top"]
    x = torch.randn(2, 2, 32, 32, dtype=torch.float64)
    assert torch.isfinite(em.step(x, 0.0)).all()


def interrupted_at(monkeypatch, state_file, run):
    """Run `run()` with training crashing right after it first writes `state_file`; then undo the crash."""
    import twin.trainstages as stages

    real_save = stages.atomic_save

    def crash(obj, path):
        real_save(obj, path)
        if Path(path).name == state_file:
            raise KeyboardInterrupt

    monkeypatch.setattr(stages, "atomic_save", crash)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(stages, "atomic_save", real_save)


def test_interrupted_training_resumes_exactly(tmp_path, monkeypatch):
    import twin.train as train

    straight = train.train_from_case(train_case(tmp_path), out=tmp_path / "a", quiet=True)
    interrupted_at(monkeypatch, "train_state.pt",
                   lambda: train.train_from_case(train_case(tmp_path), out=tmp_path / "b", quiet=True))
    assert not (tmp_path / "b" / "checkpoint.pt").exists()
    resumed = train.train_from_case(train_case(tmp_path), out=tmp_path / "b", quiet=True)
    a, b = load_checkpoint(straight).state_dict, load_checkpoint(resumed).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_symmetry_pairs_are_the_mapped_true_pairs():
    """train.symmetries: a pair (rollout) mapped by element e is (g_e x_t, g_e x_{t+Δ}) standardised, the
    identity changes nothing, and shifts still roll the mapped fields."""
    from emulators.sqg import SQG
    from twin.train import statistics
    from twin.trainpairs import TruthPairs

    gen = torch.Generator().manual_seed(0)
    data = torch.randn((2, 4, 2, 8, 8), generator=gen) * torch.tensor([3.0, 5.0]).view(1, 1, 2, 1, 1) + 1.0
    stats = statistics(data)
    static = torch.zeros((0, 10, 10))  # no static channels, on the window (grid + halo 1)
    plain = TruthPairs(data, stats, static, 1, 4)
    sym = TruthPairs(data, stats, static, 1, 4, (SQG.symmetry_count, SQG.symmetry))
    assert (plain.symmetry_count, sym.symmetry_count) == (0, 8)
    index, elements, shifts = torch.tensor([0, 4, 5]), torch.tensor([0, 3, 6]), torch.tensor([0, 2, 5])
    target, cond, _ = sym.batch(index, shifts, elements)
    for b, (i, e, k) in enumerate(zip(index.tolist(), elements.tolist(), shifts.tolist())):
        x0, x1 = (SQG.symmetry(e, data[i // 3, i % 3 + j]).roll(k, -1) for j in (0, 1))
        torch.testing.assert_close(target[b], ((x1 - x0 - plain.inc_mean) / plain.inc_std)[0])
        torch.testing.assert_close(cond[b], plain.condition(((x0 - plain.mean) / plain.std))[0])
    same = sym.batch(index, None, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(same[0], plain.batch(index)[0])
    assert not torch.allclose(sym.batch(index, None, torch.ones(3, dtype=torch.long))[0], same[0])
    start, truth, _ = sym.rollout(torch.tensor([1, 2]), 2, None, torch.tensor([5, 7]))
    ref_start, ref_truth, _ = plain.rollout(torch.tensor([1, 2]), 2)
    for b, e in enumerate((5, 7)):
        torch.testing.assert_close(start[b], SQG.symmetry(e, ref_start[b]))
        torch.testing.assert_close(truth[:, b], SQG.symmetry(e, ref_truth[:, b]))


def test_symmetry_augmented_training_is_reproducible_and_changes_the_weights(tmp_path, monkeypatch):
    import twin.train as train
    from emulators.sqg import SQG
    from twin.config import ConfigError

    path = train_case(tmp_path)
    quick = ("train.iterations=3", "augment.iterations=1", "augment.batch_size=2")
    sym = quick + ("train.symmetries=true",)
    a, b = (train.train_from_case(path, sym, out=tmp_path / d, quiet=True) for d in "ab")
    off = train.train_from_case(path, quick, out=tmp_path / "off", quiet=True)
    ka, kb, koff = (load_checkpoint(c) for c in (a, b, off))
    assert all(torch.equal(ka.state_dict[k], kb.state_dict[k]) for k in ka.state_dict)
    assert not all(torch.equal(ka.state_dict[k], koff.state_dict[k]) for k in ka.state_dict)
    assert ka.training["symmetries"] is True and "symmetries" not in koff.training
    with pytest.raises(ConfigError, match="different training set-up"):  # the digest tells them apart
        train.train_from_case(path, sym, out=tmp_path / "off", quiet=True)
    monkeypatch.delattr(SQG, "symmetry")
    with pytest.raises(ConfigError) as e:
        train.load_train_case(path, ("train.symmetries=true",))
    assert e.value.key == "train.symmetries" and "'sqg'" in str(e.value)


SINGLE_STEP = ("distill.iterations=2", "distill.batch_size=2", "distill.steps=4", "distill.checkpoint_every=2",
               "crps.iterations=2", "crps.unroll=[1, 2]", "crps.rollout_pairs=2", "crps.validation_states=2",
               "crps.checkpoint_every=2", "crps.smoothing_order=2")
FROM_BASE = ("train.iterations=0", "distill.iterations=0", "crps.iterations=0")


def test_fine_tuning_from_a_checkpoint_keeps_what_it_does_not_train(tmp_path):
    """init: the stages with iterations start from the checkpoint's networks and its statistics (other data:
    seed 9), the others keep its results; rerunning resumes to the same weights."""
    import twin.train as train

    path = train_case(tmp_path)
    base = load_checkpoint(train.train_from_case(path, SINGLE_STEP, out=tmp_path / "base", quiet=True))
    other = ("data.seed=9", f"init={tmp_path / 'base' / 'checkpoint.pt'}")
    crps = load_checkpoint(train.train_from_case(path, other + SINGLE_STEP + ("train.iterations=0",
                                                 "distill.iterations=0"), out=tmp_path / "crps", quiet=True))
    assert crps.stats == base.stats and crps.smoothing_order == 2
    assert all(torch.equal(crps.state_dict[k], base.state_dict[k]) for k in base.state_dict)
    a, b = crps.single_step["state_dict"], base.single_step["state_dict"]
    assert not all(torch.equal(a[k], b[k]) for k in a)
    assert crps.single_step["sigma_max"] == base.single_step["sigma_max"]
    assert crps.training["init"]["training"] == base.training and len(crps.training["init"]["sha256"]) == 16
    assert crps.single_step["training"]["init"] == base.single_step["training"]
    again = load_checkpoint(train.train_from_case(path, other + SINGLE_STEP + ("train.iterations=0",
                                                  "distill.iterations=0"), out=tmp_path / "crps", quiet=True))
    assert all(torch.equal(again.single_step["state_dict"][k], a[k]) for k in a)
    teacher = load_checkpoint(train.train_from_case(path, other + ("train.iterations=2",), out=tmp_path / "t",
                                                    quiet=True))
    assert not all(torch.equal(teacher.state_dict[k], base.state_dict[k]) for k in base.state_dict)
    kept, was = teacher.single_step, base.single_step
    assert all(torch.equal(kept["state_dict"][k], was["state_dict"][k]) for k in was["state_dict"])
    assert kept["training"] == was["training"] and teacher.smoothing_order == base.smoothing_order
    assert torch.isfinite(make_emulator(tmp_path / "crps" / "checkpoint.pt", sampler="single_step")
                          .step(torch.randn(2, 2, 32, 32, dtype=torch.float64), 0.0)).all()


def test_fine_tuning_errors_name_the_key(tmp_path):
    import twin.train as train
    from twin.config import ConfigError

    path = train_case(tmp_path)
    train.train_from_case(path, ("train.iterations=1",), out=tmp_path / "base", quiet=True)
    init = f"init={tmp_path / 'base' / 'checkpoint.pt'}"
    for overrides, key, said in [(("train.iterations=0",), "train.iterations", "init"),
                                 ((init,) + FROM_BASE, "init", "nothing to fine-tune"),
                                 ((f"init={tmp_path / 'none.pt'}",), "init", "none.pt"),
                                 ((init, "network.embed=32"), "network", "init checkpoint"),
                                 ((init, "data.step=2h"), "init", "step"),
                                 ((init,) + SINGLE_STEP + ("distill.iterations=0",), "crps.iterations",
                                  "no single-step")]:
        with pytest.raises(ConfigError) as e:
            train.train_from_case(path, overrides, out=tmp_path / "o", quiet=True)
        assert e.value.key == key and said in str(e.value), (overrides, str(e.value))
        assert not (tmp_path / "o").exists()  # refused before any data are generated


@pytest.mark.parametrize("precision, native, warns", [("bfloat16", False, True), ("bfloat16", True, False),
                                                     ("float32", False, False)])
def test_emulated_bfloat16_training_warns(tmp_path, monkeypatch, caplog, precision, native, warns):
    import twin.train as train

    monkeypatch.setattr(train, "native_bfloat16", lambda: native)
    path = train_case(tmp_path)
    with caplog.at_level("WARNING", logger="twin.train"):
        train.train_from_case(path, (f"train.precision={precision}", "train.iterations=1"), out=tmp_path / "o",
                              quiet=True)
    said = [r.getMessage() for r in caplog.records if r.name == "twin.train"]
    assert bool(said) == warns
    assert not warns or (str(path) in said[0] and "train.precision" in said[0] and "float32" in said[0])


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="the CPU flags come from Linux's /proc/cpuinfo")
def test_native_bfloat16_probe_matches_the_cpu_flags():
    from twin.train import native_bfloat16

    flags = Path("/proc/cpuinfo").read_text().split()
    assert native_bfloat16() == ("avx512_bf16" in flags or "amx_tile" in flags)


def test_training_case_errors_name_the_key(tmp_path):
    from twin.config import ConfigError
    from twin.train import load_train_case

    path = train_case(tmp_path)
    for override, key in [("data.step=1000s", "data.step"), ("data.spinup=soon", "data.spinup"),
                          ("train.bogus=1", "train.bogus"), ("network.static=[cos_z]", "network.static"),
                          ("data.validation_runs=3", "data.validation_runs"), ("truth.kind=nope", "truth.kind")]:
        with pytest.raises(ConfigError) as e:
            load_train_case(path, (override,))
        assert e.value.key == key, (override, str(e.value))


def test_shipped_training_case_and_weights_are_valid():
    from twin.train import load_train_case

    root = Path(__file__).parents[1]
    case, _ = load_train_case(root / "cases" / "sqg_train.yaml")
    assert case.truth[0] == "sqg"
    weights = WEIGHTS_DIR / SHIPPED_SQG
    ck = load_checkpoint(SHIPPED_SQG)  # the shipped weights are what this case trains
    assert ck.grid_shape == (64, 64) and weights.stat().st_size < 20e6
    assert ck.training["iterations"] == case.train.iterations
    assert ck.training["augment_iterations"] == case.augment.iterations
    assert ck.single_step["training"]["crps_iterations"] == case.crps.iterations
    assert ck.single_step["training"]["distill_iterations"] == case.distill.iterations
    assert ck.smoothing_order == case.crps.smoothing_order == 8
    # the record beside the weights names the case they were trained with, setting for setting
    record = yaml.safe_load(weights.with_suffix(".yaml").read_text(encoding="utf-8"))
    assert record["checkpoint"] == weights.name
    assert record["case"] == yaml.safe_load((root / "cases" / "sqg_train.yaml").read_text(encoding="utf-8"))


def test_twin_train_command(tmp_path, capsys):
    from twin.cli import main

    case = train_case(tmp_path)
    out = tmp_path / "cli"
    assert main(["train", str(case), "--set", "train.iterations=2", "--out", str(out), "--quiet"]) == 0
    assert (out / "checkpoint.pt").is_file() and str(out / "checkpoint.pt") in capsys.readouterr().out
    assert main(["train", str(case), "--set", "data.step=1000s", "--out", str(out), "--quiet"]) == 2
    assert "data.step" in capsys.readouterr().err


def test_cases_and_docs_name_the_shipped_weights():
    """A new weights version leaves no case or document pointing at a file that is no longer shipped."""
    root = Path(__file__).parents[1]
    texts = {f.name: f.read_text(encoding="utf-8")
             for f in (*root.glob("cases/*.yaml"), *root.glob("*.md"), *root.glob("docs/*.md"))}
    assert any(SHIPPED_SQG in text for text in texts.values())
    shipped = {p.name for p in WEIGHTS_DIR.glob("*.pt")}
    stale = {name for name, text in texts.items() if set(re.findall(r"checkpoint: (sqg_edm_v\d+\.pt)", text)) - shipped}
    assert not stale, f"cases naming weights that are not shipped: {stale}"
