"""`twin export`: TorchScript modules reloaded in a fresh process equal the Python emulator."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emulators.diffusion import CheckpointMismatch, DiffusionEmulator, NetworkConfig, Precond, UNetLite
from emulators.diffusion.checkpoint import SHIPPED_SQG, WEIGHTS_DIR, load_checkpoint, save_checkpoint
from emulators.diffusion.consistency import ConsistencyPrecond
from emulators.diffusion.emulator import static_fields
from twin.domain import SerialDomain, pad_halo
from twin.export import DTYPES, ExportError, build_module, export_checkpoint

torch.set_num_threads(1)
TINY = NetworkConfig(in_channels=6, out_channels=2, fold=2, channels=(8, 16), blocks=(1, 2), up_blocks=1, embed=16)
SHIPPED = WEIGHTS_DIR / SHIPPED_SQG
TOL = 1e-6  # max |difference| in the fields' own units (K); float32 throughout

# Runs in a fresh interpreter without EarthTwin on the path: only torch and the .pt files.
RUNNER = """
import sys, torch
torch.set_num_threads(1)
jobs = torch.load(sys.argv[1])
out = {}
for name, job in jobs.items():
    m = torch.jit.load(job["model"])
    args = job["args"]
    first, second = m(*args), m(*args)  # the second call runs the profiled, optimised graph
    out[name] = {"first": first, "second": second, "metadata": m.metadata, "grad": first.requires_grad}
torch.save(out, sys.argv[2])
"""


def random_weights(seed: int) -> dict[str, torch.Tensor]:
    """TINY's state dict with every weight random (the default init zeroes the head, so the output would be 0)."""
    net = UNetLite(TINY)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.state_dict()


def tiny_checkpoint(path: Path, shape: tuple[int, int] = (32, 32), periodic: tuple[bool, bool] = (True, True),
                    single_step: bool = False, smoothing_order: int = 0) -> Path:
    """A checkpoint with random weights; with `single_step`, also a random consistency network."""
    single = {"state_dict": random_weights(1), "sigma_min": 0.002, "sigma_max": 20.0} if single_step else None
    return save_checkpoint(path, network_config=TINY, state_dict=random_weights(0), sigma_data=1.0,
                           variables=(("a", "K", "field a"), ("b", "K", "field b")), grid_shape=shape,
                           periodic=periodic, static=("cos_y", "sin_y"), dt_seconds=21600.0,
                           stats={"state_mean": (1.0, -1.0), "state_std": (10.0, 8.0), "inc_mean": (0.0, 0.1),
                                  "inc_std": (2.0, 3.0)}, single_step=single, smoothing_order=smoothing_order)


def emulator(path: Path, dtype: torch.dtype = torch.float32, **sampler) -> DiffusionEmulator:
    config = DiffusionEmulator.Config(checkpoint=str(path), seed=7, **sampler)
    return DiffusionEmulator(config, SerialDomain(DiffusionEmulator.global_grid(config)), dtype)


def step_case(path: Path, members: int, dtype: torch.dtype = torch.float32,
              **sampler) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """((state, noise), DiffusionEmulator.step(state)) with the emulator's own noise for that step."""
    emu = emulator(path, dtype, **sampler)
    ny, nx = emu.grid.shape
    state = (torch.randn(members, 2, ny, nx, generator=torch.Generator().manual_seed(1)) * 12.0).to(dtype)
    key = 4
    draw = emu._noise_fn(key, members, emu.domain)  # the very numbers `step` draws at t = key · Δ
    draws = 1 if emu.config.sampler == "single_step" else emu.config.steps + 1
    noise = torch.stack([draw(k) for k in range(draws)])
    return (state, noise), emu.step(state, key * emu.dt)


def denoiser_case(path: Path, consistency: bool = False) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """((x, sigma, cond), D) with D from `edm.Precond` (or f from `ConsistencyPrecond`) on a periodically
    padded window."""
    ck = load_checkpoint(path)
    if consistency:
        model = ConsistencyPrecond(ck.build_single_step_network(), ck.sigma_data, ck.single_step["sigma_min"])
    else:
        model = Precond(ck.build_network(), ck.sigma_data)
    h, (ny, nx) = model.net.receptive_halo, ck.grid_shape
    g = torch.Generator().manual_seed(2)
    x, cond = torch.randn(2, 2, ny, nx, generator=g), torch.randn(2, 2, ny, nx, generator=g)
    sigma = torch.tensor([0.05, 3.0])
    static = static_fields(ck.static, ck.grid_shape, (-h, ny + h), (-h, nx + h))
    window = torch.cat([pad_halo(cond, (h, h), ck.periodic), static.expand(2, -1, -1, -1)], 1)
    with torch.no_grad():
        ref = model(x, sigma, window, lambda z, w: pad_halo(z, (w, w), ck.periodic))
    return (x, sigma, cond), ref


def run_fresh(tmp_path: Path, jobs: dict) -> dict:
    torch.save(jobs, tmp_path / "jobs.pt")
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "jobs.pt"), str(tmp_path / "out.pt")],
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(tmp_path / "out.pt")


def test_round_trip_in_a_fresh_process(tmp_path):
    tiny = tiny_checkpoint(tmp_path / "tiny.pt", single_step=True, smoothing_order=8)
    cases = {"tiny_step_churn": (tiny, dict(steps=6, churn=2.0), 3),
             "shipped_step": (SHIPPED, {}, 2)}  # the shipped checkpoint with the emulator's defaults (18 steps)
    jobs, refs = {}, {}
    for name, (ck, sampler, members) in cases.items():
        args, refs[name] = step_case(ck, members, **sampler)
        model = export_checkpoint(ck, tmp_path / f"{name}.pt", what="step", **sampler)
        jobs[name] = {"model": str(model), "args": args}
    for what in ("denoiser", "consistency"):
        args, refs[f"tiny_{what}"] = denoiser_case(tiny, consistency=what == "consistency")
        jobs[f"tiny_{what}"] = {"model": str(export_checkpoint(tiny, tmp_path / f"{what}.pt", what=what)),
                                "args": args}
    out = run_fresh(tmp_path, jobs)
    for name, ref in refs.items():
        for call in ("first", "second"):
            got = out[name][call]
            assert got.dtype == torch.float32 and got.shape == ref.shape and not out[name]["grad"]
            diff = (got - ref).abs().max().item()
            assert diff <= TOL, f"{name} ({call} call): max |diff| {diff:.3g} > {TOL}"
        assert json.loads(out[name]["metadata"])["what"] == name.split("_")[1]
    moved = (refs["shipped_step"] - jobs["shipped_step"]["args"][0]).abs().max().item()
    assert moved > 0.1  # the step did something (a zero network would make every comparison trivial)


def test_sidecar_states_layout_units_and_noise(tmp_path):
    out = export_checkpoint(SHIPPED, tmp_path / "sub" / "model.pt")
    meta = json.loads((tmp_path / "sub" / "model.pt.json").read_text())
    assert out == tmp_path / "sub" / "model.pt" and meta["dtype"] == "float32" and meta["dt_seconds"] == 21600.0
    assert meta["inputs"][0]["shape"] == ["member", 2, 64, 64] and meta["inputs"][0]["units"] == ["K", "K"]
    assert meta["inputs"][1]["shape"] == [19, "member", 2, 64, 64] and meta["inputs"][1]["indices_read"] == [0]
    assert meta["sampler"] == {"kind": "heun", "steps": 18, "sigma_min": 0.002, "sigma_max": 20.0, "rho": 7.0,
                               "churn": 0.0, "network_calls": 35}
    assert "Fortran array dimensioned (x, y, variable, member)" in meta["layout"]
    assert meta["smoothing_order"] == load_checkpoint(SHIPPED).smoothing_order == 8
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["model.pt", "model.pt.json"]


def test_unaligned_open_grid_and_float64_match_the_emulator(tmp_path):
    """Bit for bit, the Shapiro filter included (along y only: x is open)."""
    ck = tiny_checkpoint(tmp_path / "odd.pt", shape=(30, 26), periodic=(True, False), smoothing_order=6)
    (state, noise), ref = step_case(ck, 2, steps=3, churn=1.0)
    module, _ = build_module(ck, steps=3, churn=1.0)
    assert torch.equal(module(state, noise), ref)
    fortran = [t.permute(*reversed(range(t.dim()))).contiguous().permute(*reversed(range(t.dim())))
               for t in (state, noise)]  # FTorch's view of Fortran arrays (x, y, variable, member[, k])
    assert not fortran[0].is_contiguous() and torch.equal(module(*fortran), ref)
    config = DiffusionEmulator.Config(checkpoint=str(ck), steps=3, churn=1.0, seed=7)
    emu = DiffusionEmulator(config, SerialDomain(DiffusionEmulator.global_grid(config)), torch.float64)
    module64, _ = build_module(ck, steps=3, churn=1.0, dtype="float64")
    assert torch.equal(module64(state.double(), noise.double()), emu.step(state.double(), 4 * emu.dt))


def test_wrong_input_shapes_are_refused(tmp_path):
    module, _ = build_module(tiny_checkpoint(tmp_path / "t.pt"), steps=2)
    with pytest.raises(torch.jit.Error, match="noise: expected shape"):
        module(torch.zeros(1, 2, 32, 32), torch.zeros(2, 1, 2, 32, 32))
    with pytest.raises(torch.jit.Error, match="state: expected shape"):
        module(torch.zeros(1, 2, 32, 31), torch.zeros(3, 1, 2, 32, 31))


@pytest.mark.parametrize("kind", ["garbage", "not_a_dict", "missing_keys", "wrong_weights", "absent"])
def test_bad_checkpoints_raise_one_line_naming_the_path(tmp_path, kind):
    bad = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        bad.write_bytes(b"\x00not a torch file" * 10)
    elif kind == "not_a_dict":
        torch.save([1, 2, 3], bad)
    elif kind == "missing_keys":
        raw = torch.load(tiny_checkpoint(tmp_path / "ok.pt"), weights_only=True)
        del raw["stats"], raw["state_dict"]
        torch.save(raw, bad)
    elif kind == "wrong_weights":
        raw = torch.load(tiny_checkpoint(tmp_path / "ok.pt"), weights_only=True)
        raw["network"]["channels"] = [8, 32]
        torch.save(raw, bad)
    out = tmp_path / "out" / "model.pt"
    with pytest.raises(CheckpointMismatch) as err:
        export_checkpoint(bad, out)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_export_is_atomic(tmp_path, monkeypatch):
    ck = tiny_checkpoint(tmp_path / "t.pt")
    out = export_checkpoint(ck, tmp_path / "model.pt", steps=2)
    before = out.read_bytes(), (tmp_path / "model.pt.json").read_text()

    def broken_save(module, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch.jit, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(ck, out, steps=5)
    assert (out.read_bytes(), (tmp_path / "model.pt.json").read_text()) == before  # the old export is intact
    with pytest.raises(OSError):
        export_checkpoint(ck, tmp_path / "new.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.pt.json", "t.pt"]  # no partial file


def test_bad_requests_are_export_errors(tmp_path):
    ck = tiny_checkpoint(tmp_path / "t.pt")
    for kwargs in ({"what": "sampler"}, {"dtype": "float16"}, {"steps": 0}, {"sigma_min": 30.0},
                   {"sampler": "ddim"}, {"sampler": "single_step", "churn": 0.0}):
        with pytest.raises(ExportError):
            export_checkpoint(ck, tmp_path / "m.pt", **kwargs)
    with pytest.raises(ExportError, match="is a folder"):
        export_checkpoint(ck, tmp_path)
    assert not (tmp_path / "m.pt").exists()


def test_cli_export(tmp_path, capsys):
    from twin.cli import main

    assert main(["export", str(tiny_checkpoint(tmp_path / "t.pt")), "--out", str(tmp_path / "m.pt")]) == 0
    assert (tmp_path / "m.pt").is_file() and (tmp_path / "m.pt.json").is_file()
    (tmp_path / "bad.pt").write_text("nope")
    assert main(["export", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "n.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.pt" in err[0] and not (tmp_path / "n.pt").exists()


@pytest.mark.parametrize("shape, periodic", [((32, 32), (True, True)), ((30, 26), (True, False))])
@pytest.mark.filterwarnings(r"ignore:`torch\.jit:DeprecationWarning")
def test_single_step_round_trip_in_a_fresh_process(tmp_path, shape, periodic):
    ck = tiny_checkpoint(tmp_path / "ss.pt", shape, periodic, single_step=True, smoothing_order=4)
    jobs, refs = {}, {}
    for dtype in DTYPES:
        args, refs[dtype] = step_case(ck, 3, DTYPES[dtype], sampler="single_step")
        model = export_checkpoint(ck, tmp_path / f"{dtype}.pt", sampler="single_step", dtype=dtype)
        jobs[dtype] = {"model": str(model), "args": args}
    out = run_fresh(tmp_path, jobs)
    for name, ref in refs.items():
        for call in ("first", "second"):
            got = out[name][call]
            assert got.dtype == ref.dtype and got.shape == ref.shape and not out[name]["grad"]
            diff = (got - ref).abs().max().item()
            assert diff <= TOL, f"{name} ({call} call): max |diff| {diff:.3g} > {TOL}"
    assert json.loads(out["float64"]["metadata"])["sampler"]["kind"] == "single_step"
    state, noise = jobs["float32"]["args"]
    assert (refs["float32"] - state).abs().max().item() > 0.1  # the step did something
    fortran = [t.permute(*reversed(range(t.dim()))).contiguous().permute(*reversed(range(t.dim())))
               for t in (state, noise)]  # FTorch's view of Fortran arrays (x, y, variable, member, 1)
    module = torch.jit.load(jobs["float32"]["model"])
    assert not fortran[0].is_contiguous() and torch.equal(module(*fortran), module(state, noise))


@pytest.mark.filterwarnings(r"ignore:`torch\.jit:DeprecationWarning")
def test_single_step_keeps_the_host_interface(tmp_path):
    from twin.cli import main

    ck = tiny_checkpoint(tmp_path / "ss.pt", single_step=True)
    assert main(["export", str(ck), "--out", str(tmp_path / "m.pt"), "--sampler", "single_step"]) == 0
    meta = json.loads((tmp_path / "m.pt.json").read_text())
    heun = build_module(ck, steps=2)[1]
    assert meta["what"] == "step" and meta["inputs"][0] == heun["inputs"][0] and meta["outputs"] == heun["outputs"]
    assert meta["sampler"] == {"kind": "single_step", "sigma_min": 0.002, "sigma_max": 20.0, "network_calls": 1}
    assert meta["inputs"][1]["shape"] == [1, "member", 2, 32, 32] and meta["inputs"][1]["indices_read"] == [0]
    module = torch.jit.load(str(tmp_path / "m.pt"))
    with pytest.raises(torch.jit.Error, match=r"noise: expected shape \(1, 1, 2, 32, 32\)"):
        module(torch.zeros(1, 2, 32, 32), torch.zeros(19, 1, 2, 32, 32))


def test_single_step_errors_are_one_line(tmp_path, capsys):
    from twin.cli import main

    plain = tiny_checkpoint(tmp_path / "plain.pt")
    out = tmp_path / "out" / "m.pt"
    for extra in (["--sampler", "single_step"], ["--what", "consistency"]):
        assert main(["export", str(plain), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(plain) in err[0] and "single-step" in err[0]
    ss = tiny_checkpoint(tmp_path / "ss.pt", single_step=True)
    assert main(["export", str(ss), "--out", str(out), "--sampler", "single_step", "--steps", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "steps" in err[0] and "single_step" in err[0]
    assert not out.parent.exists()
