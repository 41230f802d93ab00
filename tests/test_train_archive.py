"""`twin train` on a CF archive: the synthetic multi-file 360_day archive of test_archive (two variables,
a land mask on sst, a gap between files) trains a tiny emulator end to end, resumes exactly, and
refuses bad cases with one line naming the key; the archive-backed pairs keep masked points out."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from test_archive import LAND, NX, TAU_H, config, make, series, write
from test_diffusion import interrupted_at, make_emulator

from emulators.diffusion.checkpoint import load_checkpoint
from twin.archive import open_archive
from twin.cli import main
from twin.trainpairs import ArchivePairs, lon_periodic

CASE = """
name: archive
data: {paths: ["part*.nc"], variables: [tas, sst], step: 6h, validation_fraction: 0.25}
network: {channels: [8, 16], blocks: [1, 1], up_blocks: 1, embed: 16, static: [cos_y, sin_y]}
train: {iterations: 4, batch_size: 2, warmup: 1, checkpoint_every: 2, threads: 1, validation_pairs: 2}
augment: {iterations: 2, batch_size: 2, checkpoint_every: 2}
distill: {iterations: 2, batch_size: 2, steps: 4, checkpoint_every: 2}
crps: {iterations: 2, unroll: [1, 2], rollout_pairs: 2, validation_states: 2, checkpoint_every: 2}
"""


def archive_case(tmp_path: Path, text: str = CASE) -> Path:
    make(tmp_path)
    path = tmp_path / "case.yaml"
    path.write_text(text)
    return path


def stats(arc) -> dict:
    return {k: v for k, v in arc.statistics().items() if k != "mask"}


def test_archive_training_end_to_end(tmp_path, capsys):
    case, out = archive_case(tmp_path), tmp_path / "out"
    assert main(["validate", str(case)]) == 0
    assert main(["train", str(case), "--out", str(out), "--quiet"]) == 0
    assert all((out / f).is_file() for f in ("train_state.pt", "augment_state.pt", "distill_state.pt", "crps_state.pt", "stats.pt",
                                             "checkpoint.pt", "config.yaml", "loss.png"))
    ck = load_checkpoint(out / "checkpoint.pt")
    with open_archive(config(), tmp_path, str(case)) as arc:
        meta = arc.metadata()
        assert ck.grid_shape == arc.grid_shape and ck.variables == arc.variables
        assert ck.dt_seconds == arc.step_seconds == TAU_H * 3600
        assert ck.stats == {k: tuple(v) for k, v in stats(arc).items()}
    assert ck.periodic == (False, True)  # lat-lon: x wraps (the longitudes cover 360°), y never
    assert ck.training["archive"] == meta and ck.training["archive"]["calendar"] == "360_day"
    assert ck.single_step is not None
    x = torch.from_numpy(np.nan_to_num(series()[:2], nan=280.0)).double()
    for sampler in ("heun", "single_step"):
        assert torch.isfinite(make_emulator(out / "checkpoint.pt", sampler=sampler).step(x, 0.0)).all()
    capsys.readouterr()
    assert main(["train", str(case), "--out", str(out), "--quiet"]) == 0  # every stage done: resumes to the end
    again = load_checkpoint(out / "checkpoint.pt")
    assert all(torch.equal(ck.state_dict[k], again.state_dict[k]) for k in ck.state_dict)


def test_interrupted_archive_training_resumes_exactly(tmp_path, monkeypatch):
    import twin.train as train

    case = archive_case(tmp_path, CASE.replace("distill: {iterations: 2", "distill: {iterations: 0")
                        .replace("crps: {iterations: 2", "crps: {iterations: 0"))
    straight = train.train_from_case(case, out=tmp_path / "a", quiet=True)
    interrupted_at(monkeypatch, "train_state.pt", lambda: train.train_from_case(case, out=tmp_path / "b", quiet=True))
    assert (tmp_path / "b" / "train_state.pt").is_file() and not (tmp_path / "b" / "checkpoint.pt").exists()
    resumed = train.train_from_case(case, out=tmp_path / "b", quiet=True)
    a, b = load_checkpoint(straight).state_dict, load_checkpoint(resumed).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_archive_cases_exit_2_with_one_line(tmp_path, capsys):
    case = archive_case(tmp_path)
    both = tmp_path / "both.yaml"
    both.write_text(CASE + "truth: {kind: sqg, size: 32, dt: 1200.0}\n")
    assert main(["train", str(both), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "truth" in err and "data.paths" in err and len(err.splitlines()) == 1
    assert main(["train", str(case), "--set", "data.paths=[nowhere*.nc]", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.paths.0" in err and "nowhere*.nc" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert main(["train", str(case), "--set", "data.runs=3", "--quiet"]) == 2
    assert "data.runs" in capsys.readouterr().err
    assert main(["train", str(case), "--set", "train.symmetries=true", "--quiet"]) == 2
    assert "train.symmetries" in capsys.readouterr().err


def test_archive_pairs_mask_points_and_unroll_only_consecutive_times(tmp_path):
    make(tmp_path)
    with open_archive(config(), tmp_path, "case.yaml") as arc:
        s, h = stats(arc), 3
        static = torch.zeros(0, arc.grid_shape[0] + 2 * h, arc.grid_shape[1] + 2 * h)
        pairs = ArchivePairs(arc, "train", s, static, h, 4, (False, True))
        target, cond, mask = pairs.batch(torch.arange(pairs.count))
        assert torch.isfinite(target).all() and torch.isfinite(cond).all()
        assert (~mask[:, 1, LAND]).all() and mask[:, 0].all() and (target[~mask] == 0).all()
        assert (cond[:, :, :h] == 0).all() and torch.equal(cond[:, :, h:-h, :h], cond[:, :, h:-h, -2 * h:-h])
        ks = np.concatenate([np.arange(0, 24), np.arange(30, 42)])
        for steps in (1, 2, 3):
            seq = ks[pairs._chain(steps)]
            assert len(seq) == pairs.rollout_count(steps) and (np.diff(seq, axis=1) == 1).all()
        start, truth, keep = pairs.rollout(torch.arange(pairs.rollout_count(2)), 2)
        assert truth.shape == (2, *start.shape) and torch.isfinite(truth).all() and not keep[:, 1, LAND].any()
        assert (truth[:, ~keep] == start[~keep]).all()  # masked points hold still: they score nothing


def test_regional_unaligned_archive_trains_on_the_emulators_window(tmp_path):
    """14 longitudes (not 360°, not a multiple of the network's alignment 4): open in x, no shifts, and
    training pads, grows and crops exactly as the emulator does."""
    data = series()
    write(tmp_path / "part0.nc", range(0, 24), data, nx=NX - 2)
    assert lon_periodic(np.arange(NX) * 22.5) and lon_periodic(np.arange(NX) * 22.5 - 180)
    case = tmp_path / "case.yaml"
    case.write_text(CASE)
    out = tmp_path / "out"
    assert main(["train", str(case), "--out", str(out), "--quiet"]) == 0
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck.periodic == (False, False) and ck.grid_shape == (8, NX - 2)
    em = make_emulator(out / "checkpoint.pt")
    x = torch.from_numpy(np.nan_to_num(data[:2, :, :, :NX - 2], nan=280.0)).double()
    assert torch.isfinite(em.step(x, 0.0)).all()
    with open_archive(config(validation_fraction=0.5), tmp_path, str(case)) as arc:
        assert not lon_periodic(arc.lon)
        width, read, keep, static = em._local
        pairs = ArchivePairs(arc, "train", stats(arc), static.float(), em.receptive_halo, em.alignment,
                             ck.periodic)
        z = torch.randn(2, 2, 8, NX - 2)
        torch.testing.assert_close(pairs.pad(z, em.receptive_halo), em.domain.exchange_halo(z, width)[(..., *read)])
        assert pairs.batch(torch.arange(2))[1].shape[-2:] == static.shape[-2:]
        assert not pairs.periodic_x and keep == (slice(0, 8), slice(0, NX - 2))
