"""`twin train CASE.yaml`: train a diffusion (EDM) emulator on truth runs of a reference model.

Data: `data.runs` truth runs of the case's `truth` model from different seeds, spun up `data.spinup`,
then sampled every emulator step Δ = `data.step` (`data.samples` snapshots per run); pairs
(x_t, x_{t+Δ}) are standardised per variable (state and increment statistics from the training runs);
the last `data.validation_runs` runs are held out. Training: Adam with linear warm-up and cosine decay,
an EMA of the weights (what the checkpoint ships), random periodic shifts along x as augmentation,
the EDM loss. Everything random comes from seeded `torch.Generator`s (never the global RNG), so a run is
reproducible and a resumed run continues exactly where the interrupted one stopped. The output folder
holds `train_state.pt` (resume point, written every `train.checkpoint_every` iterations), `data.pt`
(cached truth data), and at the end `checkpoint.pt` (the emulator's), `config.yaml`, `loss.png`.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from emulators.diffusion.checkpoint import STATIC_CHANNELS, save_checkpoint
from emulators.diffusion.edm import EDMConfig, Precond, edm_loss
from emulators.diffusion.emulator import static_fields
from emulators.diffusion.network import NetworkConfig, UNetLite, parameter_count
from emulators.registry import model_registry
from twin.config import ConfigError, apply_override, parse_dataclass, read_yaml
from twin.domain import SerialDomain, pad_halo
from twin.random import Streams

_UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def duration_seconds(value: float | str, file: str, key: str) -> float:
    """A duration: a number of seconds or a string with a unit ("1200s", "30min", "6h", "50d")."""
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)\s*(s|min|h|d)\s*", value)
        if not m:
            raise ConfigError(file, key, f"expected a duration like 1200s, 30min, 6h or 50d (got {value!r})")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not seconds > 0:
        raise ConfigError(file, key, f"must be a positive duration (got {value!r})")
    return seconds


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
    iterations: int = field(default=3500, metadata={"min": 1, "help": "optimiser steps"})
    batch_size: int = field(default=16, metadata={"min": 1, "help": "pairs per step"})
    lr: float = field(default=3e-4, metadata={"gt": 0, "help": "peak learning rate (Adam)"})
    warmup: int = field(default=200, metadata={"min": 0, "help": "linear warm-up iterations"})
    final_lr_fraction: float = field(default=0.1, metadata={"min": 0, "max": 1, "help": "cosine decay floor"})
    ema: float = field(default=0.999, metadata={"min": 0, "max": 1, "help": "EMA decay of the weights"})
    grad_clip: float = field(default=1.0, metadata={"gt": 0, "help": "gradient-norm clip"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, batches, σ and noise"})
    shift_x: bool = field(default=True, metadata={"help": "random periodic shifts along x (augmentation)"})
    checkpoint_every: int = field(default=250, metadata={"min": 1, "help": "iterations between resume points"})
    validation_pairs: int = field(default=64, metadata={"min": 1, "help": "held-out pairs in the validation loss"})
    threads: int = field(default=1, metadata={"min": 1, "help": "torch threads (1 where cores are shared)"})


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
    out: str = ""


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
    truth = body.pop("truth", None)
    if not isinstance(truth, dict) or not isinstance(truth.get("kind"), str):
        raise ConfigError(file, "truth.kind", "missing: the reference model, e.g. {kind: sqg, ...}")
    truth = dict(truth)
    kind = truth.pop("kind")
    if kind not in model_registry:
        raise ConfigError(file, "truth.kind", f"unknown model {kind!r} (one of: {', '.join(sorted(model_registry))})")
    cls = model_registry[kind]
    truth_cfg = parse_dataclass(cls.Config, truth, "truth", file)
    body["truth"] = None
    case = parse_dataclass(TrainCase, body, "", file)
    case = dataclasses.replace(case, truth=(kind, truth_cfg))
    for key, val in (("data.spinup", case.data.spinup), ("data.step", case.data.step)):
        duration_seconds(val, file, key)
    dt = float(truth_cfg.dt)
    step = duration_seconds(case.data.step, file, "data.step")
    if abs(step / dt - round(step / dt)) > 1e-9:
        raise ConfigError(file, "data.step", f"must be a multiple of the truth model's dt ({dt:g} s)")
    if case.data.validation_runs >= case.data.runs:
        raise ConfigError(file, "data.validation_runs", f"must be < data.runs ({case.data.runs})")
    bad = [s for s in case.network.static if s not in STATIC_CHANNELS]
    if bad:
        raise ConfigError(file, "network.static",
                          f"unknown static channels {bad} (known: {', '.join(STATIC_CHANNELS)})")
    if len(cls.global_grid(truth_cfg).shape) != 2 or not hasattr(cls, "initial_state"):
        raise ConfigError(file, "truth.kind", f"{kind!r}: training needs a 2-D model with initial_state")
    try:
        network_config(case, 2)
    except ValueError as e:
        raise ConfigError(file, "network", str(e)) from None
    return case, raw


def network_config(case: TrainCase, nvar: int) -> NetworkConfig:
    n = case.network
    return NetworkConfig(in_channels=2 * nvar + len(n.static), out_channels=nvar, fold=n.fold,
                         channels=tuple(n.channels), blocks=tuple(n.blocks), up_blocks=n.up_blocks, embed=n.embed)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- data


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


def _lr(t: TrainConfig, it: int) -> float:
    warm = min(1.0, (it + 1) / t.warmup) if t.warmup else 1.0
    f = t.final_lr_fraction
    return t.lr * warm * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * min(it / t.iterations, 1.0))))


def _periodic(x: torch.Tensor, h: int) -> torch.Tensor:
    return pad_halo(x, (h, h), (True, True))


class _Pairs:
    """Standardised pairs: condition x_t and target increment, drawn by a generator."""

    def __init__(self, data: torch.Tensor, stats: dict, static: torch.Tensor, halo: int) -> None:
        view = (1, 1, -1, 1, 1)
        mean, std = (torch.tensor(stats[k]).float().view(view) for k in ("state_mean", "state_std"))
        imean, istd = (torch.tensor(stats[k]).float().view(view) for k in ("inc_mean", "inc_std"))
        self.state = (data[:, :-1] - mean) / std
        self.inc = (data[:, 1:] - data[:, :-1] - imean) / istd
        self.count = self.state.shape[0] * self.state.shape[1]
        self.static, self.halo = static, halo

    def batch(self, index: torch.Tensor, shifts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        per = self.state.shape[1]
        cond, target = self.state[index // per, index % per], self.inc[index // per, index % per]
        if shifts is not None:
            cond = torch.stack([c.roll(int(s), -1) for c, s in zip(cond, shifts)])
            target = torch.stack([c.roll(int(s), -1) for c, s in zip(target, shifts)])
        b = cond.shape[0]
        cond = torch.cat([_periodic(cond, self.halo), self.static.expand(b, *self.static.shape)], dim=1)
        return target, cond


def _validation_loss(model: Precond, pairs: _Pairs, case: TrainCase) -> float:
    """EDM loss of `model` on fixed held-out pairs with fixed σ and noise (comparable across time)."""
    g = torch.Generator().manual_seed(case.train.seed + 7919)
    n = min(case.train.validation_pairs, pairs.count)
    index = torch.randperm(pairs.count, generator=g)[:n]
    total = 0.0
    with torch.no_grad():
        for chunk in index.split(16):
            target, cond = pairs.batch(chunk)
            total += float(edm_loss(model, target, cond, _periodic, case.edm, g)) * len(chunk)
    return total / n


def _plot_losses(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    its = [h["iteration"] for h in history]
    ax.plot(its, [h["loss"] for h in history], label="training (mean since last point)")
    ax.plot(its, [h["validation"] for h in history], label="validation (EMA weights)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("EDM loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_from_case(path: str | Path, overrides: tuple[str, ...] | list[str] = (), out: str | Path | None = None,
                    resume: bool = True, quiet: bool = False) -> Path:
    """Train the emulator a training case describes; returns the path of the final checkpoint.

    Resumes from `OUT/train_state.pt` when present and `resume` (the case must match it)."""
    from tqdm import tqdm

    case, raw = load_train_case(path, tuple(overrides))
    t = case.train
    torch.set_num_threads(t.threads)
    folder = Path(out or case.out or f"out/{case.name}")
    folder.mkdir(parents=True, exist_ok=True)
    kind, truth_cfg = case.truth
    cls = model_registry[kind]
    grid = cls.global_grid(truth_cfg)
    data_key = _digest({"truth": [kind, dataclasses.asdict(truth_cfg)], "data": dataclasses.asdict(case.data)})
    cache = folder / "data.pt"
    data = None
    if cache.is_file():
        blob = torch.load(cache, weights_only=True)
        data = blob["data"] if blob.get("digest") == data_key else None
    if data is None:
        data = make_truth_data(case, quiet)
        _atomic_save({"digest": data_key, "data": data}, cache)
    nval = case.data.validation_runs
    stats = statistics(data[:-nval])
    nvar = data.shape[2]
    net_cfg = network_config(case, nvar)
    with torch.random.fork_rng(devices=[]):  # deterministic initialisation, global RNG left untouched
        torch.manual_seed(t.seed)
        net = UNetLite(net_cfg)
    h = net.receptive_halo
    static = static_fields(case.network.static, grid.shape, (-h, grid.shape[0] + h), (-h, grid.shape[1] + h))
    train_pairs, val_pairs = _Pairs(data[:-nval], stats, static, h), _Pairs(data[-nval:], stats, static, h)
    model = Precond(net, case.edm.sigma_data)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=t.lr)
    gen = torch.Generator().manual_seed(t.seed + 1)
    run_key = _digest({"data": data_key, "network": dataclasses.asdict(case.network),
                       "edm": dataclasses.asdict(case.edm),
                       "train": {k: v for k, v in dataclasses.asdict(t).items()
                                 if k not in ("iterations", "checkpoint_every", "threads", "validation_pairs")}})
    state_file = folder / "train_state.pt"
    start, history, wall = 0, [], 0.0
    if resume and state_file.is_file():
        st = torch.load(state_file, weights_only=True)
        if st.get("digest") != run_key:
            raise ConfigError(str(path), "", f"{state_file} belongs to a different training set-up "
                              "(resume=False / --restart to start afresh, or another output folder)")
        net.load_state_dict(st["net"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        start, history, wall = int(st["iteration"]), list(st["history"]), float(st["wall"])
    shift = t.shift_x and not any(s.endswith("_x") for s in case.network.static)
    t0, running = time.perf_counter(), []
    bar = tqdm(total=t.iterations, initial=start, desc=f"train {case.name}", unit="it", disable=quiet)
    for it in range(start, t.iterations):
        for group in opt.param_groups:
            group["lr"] = _lr(t, it)
        index = torch.randint(train_pairs.count, (t.batch_size,), generator=gen)
        shifts = torch.randint(grid.shape[1], (t.batch_size,), generator=gen) if shift else None
        target, cond = train_pairs.batch(index, shifts)
        loss = edm_loss(model, target, cond, _periodic, case.edm, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip)
        opt.step()
        decay = min(t.ema, (1 + it) / (10 + it))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - decay)
        running.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{sum(running) / len(running):.3f}")
        done = it + 1
        if done % t.checkpoint_every == 0 or done == t.iterations:
            history.append({"iteration": done, "loss": sum(running) / len(running),
                            "validation": _validation_loss(ema, val_pairs, case)})
            running = []
            elapsed = wall + time.perf_counter() - t0
            _atomic_save({"digest": run_key, "iteration": done, "net": net.state_dict(), "ema": ema.state_dict(),
                          "opt": opt.state_dict(), "gen": gen.get_state(), "history": history, "wall": elapsed},
                         state_file)
    bar.close()
    wall += time.perf_counter() - t0
    if start >= t.iterations and not history:
        raise ConfigError(str(path), "train.iterations", "nothing to do")
    variables = tuple((v.name, v.units, v.long_name) for v in cls.variables)
    final = history[-1] if history else {}
    training = {"case": case.name, "iterations": t.iterations, "final_loss": final.get("loss"),
                "final_validation_loss": final.get("validation"), "wall_seconds": round(wall, 1),
                "parameters": parameter_count(net), "truth_model": kind, "seed": t.seed}
    ckpt = save_checkpoint(folder / "checkpoint.pt", network_config=net_cfg, state_dict=ema.net.state_dict(),
                           sigma_data=case.edm.sigma_data, variables=variables, grid_shape=grid.shape,
                           periodic=grid.periodic, static=case.network.static,
                           dt_seconds=duration_seconds(case.data.step, "", ""), stats=stats, training=training)
    info = {"checkpoint": ckpt.name, "case": raw, "network": net_cfg.to_dict(), "receptive_halo": h,
            "alignment": net.alignment, "dt_seconds": duration_seconds(case.data.step, "", ""), "stats": stats,
            "training": training, "history": history}
    (folder / "config.yaml").write_text(yaml.safe_dump(info, sort_keys=False), encoding="utf-8")
    if history:
        _plot_losses(history, folder / "loss.png")
    return ckpt
