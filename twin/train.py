"""`twin train CASE.yaml`: train a diffusion (EDM) emulator on truth runs of a reference model or on
a CF netCDF archive.

Data: `data.runs` truth runs of the case's `truth` model from different seeds, spun up `data.spinup`,
then sampled every emulator step Δ = `data.step` (`data.samples` snapshots per run); pairs
(x_t, x_{t+Δ}) are standardised per variable (state and increment statistics from the training runs);
the last `data.validation_runs` runs are held out. Training: Adam with linear warm-up and cosine decay,
an EMA of the weights (what the checkpoint ships), random periodic shifts along x and (with
`train.symmetries`) random elements of the truth model's exact symmetry group as augmentation, the EDM
loss. Everything random comes from seeded `torch.Generator`s (never the global RNG), so a run is
reproducible and a resumed run continues exactly where the interrupted one stopped. The output folder
holds `train_state.pt` (resume point, written every `train.checkpoint_every` iterations), `data.pt`
(cached truth data), and at the end `checkpoint.pt` (the emulator's), `config.yaml`, `loss.png`.

Archive: with `data: {paths: [...], variables: [...], step: 6h}` (no `truth:`) the pairs are read per
batch from the files (`twin.archive`, `twin.trainpairs`), the statistics cached in `stats.pt`; masked
points add nothing to the losses; the grid is lat-lon: x periodic (and shifted) only on a global grid.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import yaml

from emulators.diffusion.checkpoint import (STATIC_CHANNELS, Checkpoint, CheckpointMismatch, load_checkpoint,
                                            resolve, save_checkpoint)
from emulators.diffusion.consistency import ConsistencyPrecond
from emulators.diffusion.edm import EDMConfig, Precond
from emulators.diffusion.emulator import static_fields
from emulators.diffusion.network import NetworkConfig, UNetLite, parameter_count
from emulators.diffusion.regression import Regression
from emulators.diffusion.smoothing import shapiro_halo
from emulators.registry import model_registry
from twin.archive import SPLITS, Archive, ArchiveConfig, open_archive, parse_archive_config
from twin.config import ConfigError, apply_override, duration_seconds, parse_dataclass, read_yaml
from twin.domain import SerialDomain
from twin.random import Streams
from twin.trainpairs import ArchivePairs, Pairs, TruthPairs, lon_periodic
from twin.trainstages import (atomic_save, augment_stage, config_digest, crps_stage, distill_stage,
                              regression_stage, residual_std, teacher_stage)


@dataclass(frozen=True)
class DataConfig:
    runs: int = field(default=16, metadata={"min": 2, "help": "truth runs (seeds seed, seed+1, ...)"})
    validation_runs: int = field(default=2, metadata={"min": 1, "help": "the last runs, held out"})
    seed: int = field(default=1000, metadata={"help": "seed of the first truth run"})
    spinup: float | str = field(default="50d", metadata={"help": "spin-up discarded before sampling"})
    step: float | str = field(default="6h", metadata={"help": "emulator step Δ (a multiple of the truth dt)"})
    samples: int = field(default=300, metadata={"min": 2, "help": "snapshots per run, one every Δ"})
    perturbation: float = field(default=1.0, metadata={"gt": 0, "help": "initial noise std of the truth runs"})
    dtype: Literal["float32", "float64"] = field(default="float32", metadata={"help": "truth integration precision"})
    batch_runs: int = field(default=8, metadata={"min": 1, "help": "truth runs integrated together"})


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = field(default=3500, metadata={"min": 0, "help": "optimiser steps (0: only with init)"})
    batch_size: int = field(default=16, metadata={"min": 1, "help": "pairs per step"})
    lr: float = field(default=3e-4, metadata={"gt": 0, "help": "peak learning rate (Adam)"})
    warmup: int = field(default=200, metadata={"min": 0, "help": "linear warm-up iterations"})
    final_lr_fraction: float = field(default=0.1, metadata={"min": 0, "max": 1, "help": "cosine decay floor"})
    ema: float = field(default=0.999, metadata={"min": 0, "max": 1, "help": "EMA decay of the weights"})
    grad_clip: float = field(default=1.0, metadata={"gt": 0, "help": "gradient-norm clip"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, batches, σ and noise"})
    shift_x: bool = field(default=True, metadata={"help": "random periodic shifts along x (augmentation)"})
    symmetries: bool = field(default=False, metadata={
        "help": "map each pair by a random element of the truth model's exact symmetry group (augmentation; "
                "SQG: 8 mirrors and lid swaps, SQG.symmetry)"})
    checkpoint_every: int = field(default=250, metadata={"min": 1, "help": "iterations between resume points"})
    validation_pairs: int = field(default=64, metadata={"min": 1, "help": "held-out pairs in the validation loss"})
    threads: int = field(default=1, metadata={"min": 1, "help": "torch threads (1 where cores are shared)"})
    precision: Literal["float32", "bfloat16"] = field(default="float32", metadata={
        "help": "network arithmetic of every stage's training steps (bfloat16: autocast, float32 weights, "
                "norms and residuals; ~1.5x faster where the CPU has AVX512-BF16); validation and the "
                "shipped emulator run in float32"})


@dataclass(frozen=True)
class RegressionConfig:
    iterations: int = field(default=0, metadata={"min": 0, "help": "one-step iterations of the regression network "
                                                 "of the increment's mean (0 and rollout_iterations 0: none; the "
                                                 "diffusion networks then model the whole increment)"})
    rollout_iterations: int = field(default=0, metadata={"min": 0, "help": "then iterations unrolling 2 steps "
                                                         "(half the batch)"})
    channels: tuple[int, ...] = field(default=(), metadata={
        "help": "its channels per level (empty: network.channels; the other keys are network's)"})
    batch_size: int = field(default=16, metadata={"min": 2, "help": "one-step pairs per step"})
    perturb: float = field(default=0.0, metadata={"min": 0, "help": "largest std (state-std units) of a perturbation "
                                                  "of the starts, of the augment stage's kind; the target stays the "
                                                  "truth (0: none)"})
    lr: float = field(default=3e-4, metadata={"gt": 0, "help": "peak learning rate (Adam)"})
    warmup: int = field(default=200, metadata={"min": 0, "help": "linear warm-up iterations"})
    ema: float = field(default=0.999, metadata={"min": 0, "max": 1, "help": "EMA decay of the shipped weights"})
    residual_pairs: int = field(default=512, metadata={"min": 1, "help": "training pairs that measure the "
                                                       "residual's std"})
    checkpoint_every: int = field(default=250, metadata={"min": 1, "help": "iterations between resume points"})


@dataclass(frozen=True)
class AugmentConfig:
    iterations: int = field(default=0, metadata={"min": 0, "help": "fine-tuning steps of the teacher on perturbed conditions (0: none)"})
    noise: float = field(default=0.3, metadata={"min": 0, "help": "largest perturbation std (state-std units), "
                                                "drawn uniformly per pair; the target removes it again"})
    offset: float = field(default=0.3, metadata={"min": 0, "help": "std of a uniform offset per pair and variable "
                                                 "(state-std units), inside the perturbation"})
    coarsening: int = field(default=8, metadata={"min": 1, "help": "grid points per cell of the smooth half of the perturbation"})
    batch_size: int = field(default=16, metadata={"min": 1, "help": "pairs per step"})
    lr: float = field(default=1e-4, metadata={"gt": 0, "help": "peak learning rate (Adam)"})
    warmup: int = field(default=50, metadata={"min": 0, "help": "linear warm-up iterations"})
    ema: float = field(default=0.998, metadata={"min": 0, "max": 1, "help": "EMA decay of the shipped weights"})
    checkpoint_every: int = field(default=100, metadata={"min": 1, "help": "iterations between resume points"})


@dataclass(frozen=True)
class DistillConfig:
    iterations: int = field(default=0, metadata={"min": 0, "help": "consistency-distillation steps (0: no single-step sampler)"})
    batch_size: int = field(default=16, metadata={"min": 1, "help": "pairs per step"})
    perturb: float = field(default=0.0, metadata={"min": 0, "help": "largest std (state-std units) of perturbed "
                                                  "conditions, as in the augment stage, so the student also learns "
                                                  "the teacher off the attractor (0: clean pairs only)"})
    lr: float = field(default=1e-4, metadata={"gt": 0, "help": "peak learning rate (Adam)"})
    warmup: int = field(default=50, metadata={"min": 0, "help": "linear warm-up iterations"})
    steps: int = field(default=18, metadata={"min": 2, "help": "teacher discretisation N (Karras grid)"})
    sigma_min: float = field(default=0.002, metadata={"gt": 0, "help": "smallest noise level"})
    sigma_max: float = field(default=20.0, metadata={"gt": 0, "help": "noise level of the one-call sample"})
    rho: float = field(default=7.0, metadata={"gt": 0, "help": "Karras grid exponent"})
    ema: float = field(default=0.99, metadata={"min": 0, "max": 1, "help": "EMA decay of the shipped weights"})
    checkpoint_every: int = field(default=100, metadata={"min": 1, "help": "iterations between resume points"})


@dataclass(frozen=True)
class CRPSConfig:
    iterations: int = field(default=0, metadata={"min": 0, "help": "fine-tuning steps of the single-step sampler (0: none)"})
    members: int = field(default=2, metadata={"min": 2, "help": "members per initial state"})
    unroll: tuple[int, ...] = field(default=(1, 2, 4), metadata={
        "help": "rollout lengths in emulator steps, one equal share of the iterations each, in order"})
    rollout_pairs: int = field(default=8, metadata={"min": 1, "help": "initial states x rollout length per step"})
    perturb: float = field(default=0.0, metadata={"min": 0, "help": "largest std (state-std units) of a perturbation "
                                                  "of the rollout starts, of the augment stage's kind (0: none)"})
    lr: float = field(default=3e-5, metadata={"gt": 0, "help": "peak learning rate (Adam)"})
    warmup: int = field(default=20, metadata={"min": 0, "help": "linear warm-up iterations"})
    ema: float = field(default=0.99, metadata={"min": 0, "max": 1, "help": "EMA decay of the shipped weights"})
    checkpoint_every: int = field(default=100, metadata={"min": 1, "help": "iterations between resume points"})
    validation_states: int = field(default=16, metadata={"min": 1, "help": "held-out 2-step rollouts scored"})
    smoothing_order: int = field(default=0, metadata={"min": 0, "help": "Shapiro filter of this even order after "
                                 "each rollout step, along periodic axes; the checkpoint applies it after every "
                                 "step (0: none)"})


@dataclass(frozen=True)
class NetworkKeys:
    fold: int = field(default=2, metadata={"min": 1, "help": "pixel folding factor"})
    channels: tuple[int, ...] = field(default=(64, 128), metadata={"help": "channels per level"})
    blocks: tuple[int, ...] = field(default=(1, 2), metadata={"help": "residual blocks per level (down)"})
    up_blocks: int = field(default=1, metadata={"min": 0, "help": "residual blocks per level (up)"})
    embed: int = field(default=128, metadata={"min": 8, "help": "noise-embedding width"})
    static: tuple[str, ...] = field(default=("cos_y", "sin_y"), metadata={
        "help": f"static input channels ({', '.join(STATIC_CHANNELS)})"})


@dataclass(frozen=True)
class TrainCase:
    name: str
    truth: Any  # (kind, Config) of the reference model
    data: DataConfig = DataConfig()
    network: NetworkKeys = NetworkKeys()
    edm: EDMConfig = EDMConfig()
    train: TrainConfig = TrainConfig()
    regression: RegressionConfig = RegressionConfig()
    augment: AugmentConfig = AugmentConfig()
    distill: DistillConfig = DistillConfig()
    crps: CRPSConfig = CRPSConfig()
    out: str = ""
    init: str = field(default="", metadata={
        "help": "checkpoint to fine-tune (a path, or a file in emulators/weights): the teacher and single-step "
                "networks start from its weights, the data are standardised with its statistics, and a stage "
                "with 0 iterations keeps the checkpoint's result"})
    archive: ArchiveConfig | None = None  # set from `data:` when it names files (then truth is None)


def load_train_case(path: str | Path, overrides: tuple[str, ...] = ()) -> tuple[TrainCase, dict]:
    """Strictly parse a training case (with `--set` overrides); returns it and the raw mapping."""
    file = str(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(file, "", "a training case must be a YAML mapping")
    raw = copy.deepcopy(raw)
    for o in overrides:
        apply_override(raw, o, file)
    body = dict(raw)
    if "archive" in body:
        raise ConfigError(file, "archive", "unknown key (name an archive as data: {paths: [...], variables: [...]})")
    data = body.get("data")
    if isinstance(data, dict) and "paths" in data:
        if "truth" in body:
            raise ConfigError(file, "truth", "not used with an archive (data.paths): remove one of the two")
        archive = parse_archive_config(body.pop("data"), file)
        case = dataclasses.replace(parse_dataclass(TrainCase, {**body, "truth": None}, "", file), archive=archive)
    else:
        case = _parse_truth_case(body, file)
    bad = [s for s in case.network.static if s not in STATIC_CHANNELS]
    if bad:
        raise ConfigError(file, "network.static",
                          f"unknown static channels {bad} (known: {', '.join(STATIC_CHANNELS)})")
    if case.train.symmetries:
        if case.archive is not None:
            raise ConfigError(file, "train.symmetries", "an archive declares no exact symmetries")
        if not hasattr(model_registry[case.truth[0]], "symmetry"):
            raise ConfigError(file, "train.symmetries", f"the {case.truth[0]!r} model declares no exact symmetries")
    if not case.train.iterations and not case.init:
        raise ConfigError(file, "train.iterations",
                          "must be at least 1 (0 only when fine-tuning a checkpoint, init)")
    if case.init and not resolve(case.init).is_file():  # before any truth data are generated
        raise ConfigError(file, "init", f"{case.init}: no such checkpoint file (a path, or a file in "
                          "emulators/weights)")
    if case.init and not any((case.train.iterations, case.augment.iterations, case.distill.iterations,
                              case.crps.iterations)):
        raise ConfigError(file, "init", "nothing to fine-tune: every stage has 0 iterations")
    if case.init and (case.regression.iterations or case.regression.rollout_iterations):
        raise ConfigError(file, "regression.iterations", "not with init: a checkpoint's regression network is "
                          "kept as it is")
    if case.crps.iterations and not case.distill.iterations and not case.init:
        raise ConfigError(file, "crps.iterations", "CRPS fine-tuning needs the distilled sampler (distill.iterations > 0)")
    try:
        shapiro_halo(case.crps.smoothing_order)
    except ValueError as e:
        raise ConfigError(file, "crps.smoothing_order", str(e)) from None
    unroll = case.crps.unroll
    if case.archive is not None and (not unroll or min(unroll) < 1):
        raise ConfigError(file, "crps.unroll", f"rollout lengths must be at least 1 (got {list(unroll)})")
    if case.archive is None and (not unroll or min(unroll) < 1 or max(unroll) >= case.data.samples):
        raise ConfigError(file, "crps.unroll", f"rollout lengths must be between 1 and data.samples - 1 "
                          f"(got {list(unroll)})")
    try:
        network_config(case, 2)
    except ValueError as e:
        raise ConfigError(file, "network", str(e)) from None
    try:
        regression_config(case, 2)
    except ValueError as e:
        raise ConfigError(file, "regression.channels", str(e)) from None
    return case, raw


def _parse_truth_case(body: dict, file: str) -> TrainCase:
    """The case of a truth-run training set (`truth:` and `data:` runs), checked against the model."""
    truth = body.pop("truth", None)
    if not isinstance(truth, dict) or not isinstance(truth.get("kind"), str):
        raise ConfigError(file, "truth.kind", "missing: the reference model, e.g. {kind: sqg, ...} "
                          "(or an archive: data: {paths: [...], ...})")
    truth = dict(truth)
    kind = truth.pop("kind")
    if kind not in model_registry:
        raise ConfigError(file, "truth.kind", f"unknown model {kind!r} (one of: {', '.join(sorted(model_registry))})")
    cls = model_registry[kind]
    truth_cfg = parse_dataclass(cls.Config, truth, "truth", file)
    case = parse_dataclass(TrainCase, {**body, "truth": None}, "", file)
    case = dataclasses.replace(case, truth=(kind, truth_cfg))
    for key, val in (("data.spinup", case.data.spinup), ("data.step", case.data.step)):
        duration_seconds(val, file, key)
    dt = float(truth_cfg.dt)
    step = duration_seconds(case.data.step, file, "data.step")
    if abs(step / dt - round(step / dt)) > 1e-9:
        raise ConfigError(file, "data.step", f"must be a multiple of the truth model's dt ({dt:g} s)")
    if case.data.validation_runs >= case.data.runs:
        raise ConfigError(file, "data.validation_runs", f"must be < data.runs ({case.data.runs})")
    if len(cls.global_grid(truth_cfg).shape) != 2 or not hasattr(cls, "initial_state"):
        raise ConfigError(file, "truth.kind", f"{kind!r}: training needs a 2-D model with initial_state")
    return case


def network_config(case: TrainCase, nvar: int) -> NetworkConfig:
    n = case.network
    return NetworkConfig(in_channels=2 * nvar + len(n.static), out_channels=nvar, fold=n.fold,
                         channels=tuple(n.channels), blocks=tuple(n.blocks), up_blocks=n.up_blocks, embed=n.embed)


def regression_config(case: TrainCase, nvar: int) -> NetworkConfig:
    """The regression network's architecture: network's, with regression.channels when given (so its
    halo and alignment are the denoiser's)."""
    channels = case.regression.channels or case.network.channels
    if len(channels) != len(case.network.channels):
        raise ValueError(f"{list(channels)}: one width per level of network.channels ({len(case.network.channels)})")
    return dataclasses.replace(network_config(case, nvar), channels=tuple(channels))


def make_truth_data(case: TrainCase, quiet: bool = True) -> torch.Tensor:
    """Snapshots (runs, samples, variables, y, x) float32 of spun-up truth runs, one every Δ; run r
    starts from the model's `initial_state(perturbation · noise)`, noise keyed by seed data.seed + r."""
    from tqdm import tqdm

    kind, cfg = case.truth
    cls = model_registry[kind]
    d = case.data
    dtype = torch.float64 if d.dtype == "float64" else torch.float32
    model = cls(cfg, SerialDomain(cls.global_grid(cfg)), dtype)
    every = round(duration_seconds(d.step, "", "") / model.dt)
    spin = math.ceil(duration_seconds(d.spinup, "", "") / model.dt)
    advance = getattr(model, "integrate", None) or (lambda x, n: _loop(model, x, n))
    out = []
    bar = tqdm(total=d.runs * (spin + every * (d.samples - 1)), desc="truth runs", unit="step", disable=quiet,
               unit_scale=True)
    for first in range(0, d.runs, d.batch_runs):
        seeds = range(d.seed + first, d.seed + min(first + d.batch_runs, d.runs))
        x = torch.cat([model.initial_state(d.perturbation * _noise(s, model)) for s in seeds]).to(dtype)
        x = advance(x, spin)
        bar.update(len(seeds) * spin)
        snaps = [x.float()]
        for _ in range(d.samples - 1):
            x = advance(x, every)
            snaps.append(x.float())
            bar.update(len(seeds) * every)
        out.append(torch.stack(snaps, dim=1))
    bar.close()
    data = torch.cat(out)
    if not torch.isfinite(data).all():
        raise RuntimeError("the truth runs produced non-finite values")
    return data


def _noise(seed: int, model: Any) -> torch.Tensor:
    """Unit normals (1, variables, *grid) from the keyed truth stream of `seed`."""
    shape = model.grid.shape
    return Streams(seed).field_normal("truth", (0,), 1, len(model.variables), torch.arange(math.prod(shape)),
                                      shape, model.dtype)


def _loop(model: Any, x: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        x = model.step(x)
    return x


def statistics(train: torch.Tensor) -> dict[str, tuple[float, ...]]:
    """Per-variable mean/std of the state and of the Δ-increment over (runs, samples, y, x)."""
    inc = train[:, 1:] - train[:, :-1]
    dims = (0, 1, 3, 4)
    f = lambda t: tuple(float(v) for v in t.double())  # noqa: E731
    return {"state_mean": f(train.mean(dims)), "state_std": f(train.std(dims)),
            "inc_mean": f(inc.mean(dims)), "inc_std": f(inc.std(dims))}


# ---------------------------------------------------------------- training


def _plot_losses(histories: dict[str, list[dict]], path: Path) -> None:
    """One panel per training stage: training loss and validation score against iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"regression": "mean square error (state stds)", "teacher": "EDM loss", "augment": "EDM loss, perturbed conditions", "distill": "consistency-distillation loss", "crps": "fair CRPS (std units)"}
    stages = [k for k in labels if histories.get(k)]
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        history = histories[stage]
        its = [h["iteration"] for h in history]
        ax.plot(its, [h["loss"] for h in history], label="training (mean since last point)")
        ax.plot(its, [h["validation"] for h in history], label="validation (EMA weights)")
        ax.set_title(stage)
        ax.set_xlabel("iteration")
        ax.set_ylabel(labels[stage])
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass(frozen=True)
class _Source:
    """The training data as the stages and the checkpoint see it: truth runs or an archive."""

    key: str  # digest of the data, part of every stage's digest
    stats: dict[str, tuple[float, ...]]
    variables: tuple[tuple[str, str, str], ...]  # (name, units, long_name)
    grid_shape: tuple[int, int]
    periodic: tuple[bool, bool]  # the checkpoint's (y, x) periodicity
    dt_seconds: float
    # (stats, static, halo, alignment) -> training, validation pairs
    pairs: Callable[[dict, torch.Tensor, int, int], tuple[Pairs, Pairs]]
    training: dict  # what the checkpoint's training metadata records of the data


def _truth_source(case: TrainCase, folder: Path, quiet: bool) -> _Source:
    """Truth runs of the reference model (cached in `folder/data.pt`); the last runs are held out."""
    kind, truth_cfg = case.truth
    cls = model_registry[kind]
    grid = cls.global_grid(truth_cfg)
    data_key = config_digest({"truth": [kind, dataclasses.asdict(truth_cfg)], "data": dataclasses.asdict(case.data)})
    cache = folder / "data.pt"
    data = None
    if cache.is_file():
        blob = torch.load(cache, weights_only=True)
        data = blob["data"] if blob.get("digest") == data_key else None
    if data is None:
        data = make_truth_data(case, quiet)
        atomic_save({"digest": data_key, "data": data}, cache)
    nval = case.data.validation_runs
    stats = statistics(data[:-nval])
    variables = tuple((v.name, v.units, v.long_name) for v in cls.variables)
    symmetry = (cls.symmetry_count, cls.symmetry) if case.train.symmetries else None
    return _Source(data_key, stats, variables, tuple(grid.shape), tuple(grid.periodic),
                   duration_seconds(case.data.step, "", ""),
                   lambda st, static, h, a: (TruthPairs(data[:-nval], st, static, h, a, symmetry),
                                             TruthPairs(data[-nval:], st, static, h, a)),
                   {"truth_model": kind, **({"symmetries": True} if symmetry else {})})


def _archive_source(case: TrainCase, archive: Archive, folder: Path) -> _Source:
    """An open archive: lat-lon, x periodic only when the longitudes cover 360°; the statistics are
    cached in `folder/stats.pt` (one pass over the training split)."""
    meta = archive.metadata()
    key = config_digest({"archive": dataclasses.asdict(case.archive), "metadata": meta,
                   "times": [str(archive.times[0]), str(archive.times[-1]), len(archive.times)],
                   "pairs": [archive.pair_count(s) for s in SPLITS]})
    cache = folder / "stats.pt"
    stats = None
    if cache.is_file():
        blob = torch.load(cache, weights_only=True)
        stats = blob["stats"] if blob.get("digest") == key else None
    if stats is None:
        stats = {k: v for k, v in archive.statistics().items() if k != "mask"}
        atomic_save({"digest": key, "stats": stats}, cache)
    periodic = (False, lon_periodic(archive.lon))
    return _Source(key, stats, archive.variables, archive.grid_shape, periodic, archive.step_seconds,
                   lambda st, static, h, a: tuple(ArchivePairs(archive, s, st, static, h, a, periodic)
                                                  for s in SPLITS),
                   {"archive": meta})


def native_bfloat16() -> bool:
    """Whether this CPU does bfloat16 arithmetic natively (AVX512-BF16 or AMX): only then does
    `train.precision: bfloat16` pay (elsewhere torch emulates it, far slower than float32)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def train_from_case(path: str | Path, overrides: tuple[str, ...] | list[str] = (), out: str | Path | None = None,
                    resume: bool = True, quiet: bool = False) -> Path:
    """Train the emulator a training case describes; returns the path of the final checkpoint.

    Stages: the EDM teacher, then (when configured) consistency distillation and CRPS fine-tuning of
    the single-step sampler. Each resumes from its `OUT/*_state.pt` when present and `resume`."""
    case, raw = load_train_case(path, tuple(overrides))
    file = str(path)
    if case.train.precision == "bfloat16" and not native_bfloat16():
        logging.getLogger(__name__).warning(
            "%s: train.precision: bfloat16 on a CPU without native bfloat16 (AVX512-BF16 or AMX): autocast is "
            "emulated, 10-20x slower than float32 (benchmarks/train_precision.py); --set train.precision=float32 "
            "trains the same recipe (other last bits)", file)
    folder = Path(out or case.out or f"out/{case.name}")
    if case.archive is None:
        kind, truth_cfg = case.truth
        cls = model_registry[kind]
        init = _init_checkpoint(case, file, tuple(v.name for v in cls.variables),
                                tuple(cls.global_grid(truth_cfg).shape), duration_seconds(case.data.step, "", ""))
        folder.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(1)  # the truth model's small FFTs gain nothing from threads, and contend
        source = _truth_source(case, folder, quiet)
        torch.set_num_threads(case.train.threads)
        return _train(case, raw, file, folder, source, init, resume, quiet)
    torch.set_num_threads(case.train.threads)
    with open_archive(case.archive, Path(file).parent, file) as archive:
        init = _init_checkpoint(case, file, tuple(v[0] for v in archive.variables), tuple(archive.grid_shape),
                                archive.step_seconds)
        folder.mkdir(parents=True, exist_ok=True)
        return _train(case, raw, file, folder, _archive_source(case, archive, folder), init, resume, quiet)


def _init_checkpoint(case: TrainCase, file: str, variables: tuple[str, ...], grid_shape: tuple[int, ...],
                     dt_seconds: float) -> tuple[Checkpoint, str] | None:
    """The checkpoint `init` names and the digest of its file, checked against the case (network, EDM σ_d)
    and the data's variables, grid and step (before any data are generated); None without init."""
    if not case.init:
        return None
    net_cfg = network_config(case, len(variables))
    try:
        ck = load_checkpoint(case.init)
    except CheckpointMismatch as e:
        raise ConfigError(file, "init", str(e)) from None
    if ck.network_config.to_dict() != net_cfg.to_dict() or tuple(ck.static) != tuple(case.network.static):
        raise ConfigError(file, "network", f"differs from the init checkpoint's ({ck.path}: "
                          f"{ck.network_config.to_dict()}, static {list(ck.static)})")
    if ck.sigma_data != case.edm.sigma_data:
        raise ConfigError(file, "edm.sigma_data", f"{case.edm.sigma_data} differs from the init checkpoint's "
                          f"{ck.sigma_data}")
    for what, mine, theirs in (("variables", list(variables), [v[0] for v in ck.variables]),
                               ("grid", list(grid_shape), list(ck.grid_shape)),
                               ("step (s)", dt_seconds, ck.dt_seconds)):
        if mine != theirs:
            raise ConfigError(file, "init", f"{ck.path} was trained on another {what} ({theirs}; the data: {mine})")
    if not case.distill.iterations and case.crps.iterations and ck.single_step is None:
        raise ConfigError(file, "crps.iterations", f"{ck.path} has no single-step sampler to fine-tune "
                          "(distill.iterations > 0 distils one)")
    digest = hashlib.sha256(Path(ck.path).read_bytes()).hexdigest()[:16]
    return ck, digest


def _regression(case: TrainCase, file: str, folder: Path, init: tuple[Checkpoint, str] | None, net: UNetLite,
                data_key: str, train_pairs: Pairs, val_pairs: Pairs, width: int, resume: bool, quiet: bool,
                histories: dict, walls: dict) -> tuple[Regression, torch.Tensor, str, dict] | None:
    """The regression network of the increment's mean (trained here, or the init checkpoint's): (network,
    residual std (V,), its digest, its checkpoint entry); None when there is none."""
    r = case.regression
    if init is not None:
        ck = init[0]
        model = ck.build_regression()
        if model is None:
            return None
        model.net.wrap = net.wrap
        entry = {**ck.regression, "network": NetworkConfig.from_dict(dict(ck.regression["network"]))}
        return model, torch.tensor(ck.residual_std()), init[1], entry
    if not (r.iterations or r.rollout_iterations):
        return None
    cfg = regression_config(case, len(train_pairs.mean[0]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case.train.seed + 11)
        reg_net = UNetLite(cfg)
    reg_net.wrap = net.wrap
    model, histories["regression"], walls["regression"], key = regression_stage(
        case, folder, data_key, reg_net, train_pairs, val_pairs, width, resume, file, quiet)
    rstd = residual_std(model, train_pairs, r.residual_pairs, case.train.seed + 13)
    entry = {"network": cfg, "state_dict": model.net.state_dict(), "residual_std": rstd.tolist(),
             "training": {"iterations": r.iterations, "rollout_iterations": r.rollout_iterations,
                          "parameters": parameter_count(reg_net),
                          "final_validation": histories["regression"][-1]["validation"]}}
    return model, rstd, key, entry


def _train(case: TrainCase, raw: dict, file: str, folder: Path, source: _Source,
           init: tuple[Checkpoint, str] | None, resume: bool, quiet: bool) -> Path:
    """The stages on `source`'s pairs, then the checkpoint, `config.yaml` and `loss.png` in `folder`.
    With `init`, the networks start from the checkpoint's and a stage with 0 iterations keeps its result."""
    t = case.train
    net_cfg = network_config(case, len(source.variables))
    with torch.random.fork_rng(devices=[]):  # deterministic initialisation, global RNG left untouched
        torch.manual_seed(t.seed)
        net = UNetLite(net_cfg)
    stats, data_key = source.stats, source.key
    if init:  # fine-tuning: the weights know the checkpoint's standardisation
        net.load_state_dict(init[0].state_dict)
        stats, data_key = init[0].stats, config_digest({"data": source.key, "init": init[1]})
    a = net.alignment
    ny, nx = source.grid_shape
    gy, gx = (-(-n // a) * a for n in (ny, nx))
    # whole doubly periodic fields on an aligned grid: wrapping convolutions, no halo (same function, ~1.7x faster)
    net.wrap = net.can_wrap(source.grid_shape, source.periodic)
    h = net.input_halo
    # on the network's window, as the emulator's: the grid grown to multiples of the alignment, plus the halo
    static = static_fields(case.network.static, (ny, nx), (-h, gy + h), (-h, gx + h))
    train_pairs, val_pairs = source.pairs(stats, static, h, a)
    if case.crps.iterations:
        for pairs, steps, name in ((train_pairs, max(case.crps.unroll), "training"), (val_pairs, 2, "validation")):
            if not pairs.rollout_count(steps):
                raise ConfigError(file, "crps.unroll", f"the {name} data hold no {steps} consecutive steps to unroll")
    model = Precond(net, case.edm.sigma_data)
    ema = copy.deepcopy(model).requires_grad_(False)
    histories: dict[str, list[dict]] = {}
    walls: dict[str, float] = {}
    regression = _regression(case, file, folder, init, net, data_key, train_pairs, val_pairs, nx, resume, quiet,
                             histories, walls)
    if regression is not None:  # every later stage models the residual of this regression
        for pairs in (train_pairs, val_pairs):
            pairs.set_regression(regression[0], regression[1])
        data_key = config_digest({"data": data_key, "regression": regression[2]})
    key = data_key
    if t.iterations:
        histories["teacher"], walls["teacher"], key = teacher_stage(case, folder, data_key, net, model, ema,
                                                                     train_pairs, val_pairs, nx, resume, file, quiet)
        if not histories["teacher"]:
            raise ConfigError(file, "train.iterations", "nothing to do")
    if case.augment.iterations:
        ema, histories["augment"], walls["augment"], key = augment_stage(
            case, folder, ema, key, train_pairs, val_pairs, nx, resume, file, quiet)
    single, sigmas = None, (case.distill.sigma_min, case.distill.sigma_max)
    if case.distill.iterations:
        single, histories["distill"], walls["distill"], key = distill_stage(
            case, folder, ema, key, train_pairs, val_pairs, nx, resume, file, quiet)
    elif init and case.crps.iterations:  # fine-tune the checkpoint's single-step network, at its noise levels
        ck = init[0]
        sigmas = (ck.single_step["sigma_min"], ck.single_step["sigma_max"])
        single_net = ck.build_single_step_network()
        single_net.wrap = net.wrap
        single = ConsistencyPrecond(single_net, ck.sigma_data, sigmas[0])
    if single is not None and case.crps.iterations:
        single, histories["crps"], walls["crps"] = crps_stage(case, folder, single, sigmas[1], key, train_pairs,
                                                               val_pairs, nx, resume, file, quiet)
    denoiser_history = histories.get("augment") or histories.get("teacher")
    final = denoiser_history[-1] if denoiser_history else {  # the shipped denoiser's
        "loss": init[0].training.get("final_loss"), "validation": init[0].training.get("final_validation_loss")}
    training = {"case": case.name, "iterations": t.iterations, "augment_iterations": case.augment.iterations,
                "final_loss": final["loss"],
                "final_validation_loss": final["validation"], "wall_seconds": round(sum(walls.values()), 1),
                "stage_wall_seconds": {k: round(v, 1) for k, v in walls.items()},
                "parameters": parameter_count(net), **source.training, "seed": t.seed}
    smoothing_order = case.crps.smoothing_order
    single_step = None
    if single is not None:
        last = histories.get("crps") or histories["distill"]
        single_step = {"state_dict": single.net.state_dict(), "sigma_min": sigmas[0], "sigma_max": sigmas[1],
                       "training": {"distill_iterations": case.distill.iterations,
                                    "crps_iterations": case.crps.iterations, "final_validation": last[-1]["validation"]}}
    if init:
        ck = init[0]
        training["init"] = {"checkpoint": Path(ck.path).name, "sha256": init[1], "training": ck.training}
        if single is None and ck.single_step is not None:  # kept as it was
            single_step = ck.single_step
            smoothing_order = ck.smoothing_order
        elif single_step is not None and not case.distill.iterations:
            single_step["training"]["init"] = ck.single_step["training"]
    ckpt = save_checkpoint(folder / "checkpoint.pt", network_config=net_cfg, state_dict=ema.net.state_dict(),
                           sigma_data=case.edm.sigma_data, variables=source.variables, grid_shape=source.grid_shape,
                           periodic=source.periodic, static=case.network.static, dt_seconds=source.dt_seconds,
                           stats=stats, training=training, single_step=single_step, smoothing_order=smoothing_order,
                           regression=None if regression is None else regression[3])
    info = {"checkpoint": ckpt.name, "case": raw, "network": net_cfg.to_dict(), "receptive_halo": net.receptive_halo,
            "alignment": net.alignment, "dt_seconds": source.dt_seconds, "stats": stats,
            "training": training, "history": histories}
    (folder / "config.yaml").write_text(yaml.safe_dump(info, sort_keys=False), encoding="utf-8")
    _plot_losses(histories, folder / "loss.png")
    return ckpt
