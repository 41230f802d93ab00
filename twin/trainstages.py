"""The resumable optimisation stages of `twin train`: the regression network of the increment's mean,
the EDM teacher, consistency distillation and fair-CRPS fine-tuning of the single-step sampler.

Each stage is Adam with linear warm-up and cosine decay and an EMA of the weights (what ships), writes
`OUT/<stage>_state.pt` every `checkpoint_every` iterations (atomically) and resumes from it only when
its digest — data, settings and every earlier stage — matches. Everything random comes from seeded
`torch.Generator`s, so an interrupted stage continues exactly where it stopped.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from emulators.diffusion.consistency import (ConsistencyPrecond, ascending_sigmas, distillation_loss,
                                              one_step_sample, rollout_crps)
from emulators.diffusion.edm import Precond, edm_loss
from emulators.diffusion.regression import Regression
from emulators.diffusion.smoothing import shapiro
from twin.config import ConfigError
from twin.trainpairs import Pairs

if TYPE_CHECKING:
    from twin.train import AugmentConfig, RegressionConfig, TrainCase


def config_digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object (what a resume point must match)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _lr(peak: float, warmup: int, iterations: int, floor: float, it: int) -> float:
    """Linear warm-up, then cosine decay from `peak` to `floor` · peak at `iterations`."""
    warm = min(1.0, (it + 1) / warmup) if warmup else 1.0
    return peak * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(it / iterations, 1.0))))


def _validation_loss(model: Precond, pairs: Pairs, case: TrainCase) -> float:
    """EDM loss of `model` on fixed held-out pairs with fixed σ and noise (comparable across time)."""
    g = torch.Generator().manual_seed(case.train.seed + 7919)
    n = min(case.train.validation_pairs, pairs.count)
    index = torch.randperm(pairs.count, generator=g)[:n]
    total = 0.0
    with torch.no_grad():
        for chunk in index.split(16):
            target, cond, mask = pairs.batch(chunk)
            target = pairs.residual(target, cond, mask)
            total += float(edm_loss(pairs.net(model, mask), target, cond, pairs.pad, case.edm, g)) * len(chunk)
    return total / n


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass(frozen=True)
class _Stage:
    """One resumable optimisation stage: where it saves, what it must match, how long, how fast."""

    name: str
    state_file: Path
    digest: str
    iterations: int
    checkpoint_every: int
    lr: Callable[[int], float]
    ema: Callable[[int], float]
    grad_clip: float = 1.0
    bfloat16: bool = False  # autocast the training steps' network calls to bfloat16


def _run_stage(stage: _Stage, live: nn.Module, ema: nn.Module, loss_fn: Callable[[int], torch.Tensor],
               validate: Callable[[], float], gen: torch.Generator, resume: bool, case_file: str,
               quiet: bool) -> tuple[list[dict], float]:
    """Adam on `live` with an EMA copy in `ema`; resumes from, and writes, `stage.state_file`.
    Returns the history ({iteration, loss, validation} at each resume point) and the wall time."""
    from tqdm import tqdm

    opt = torch.optim.Adam(live.parameters(), lr=stage.lr(0))
    start, history, wall = 0, [], 0.0
    if resume and stage.state_file.is_file():
        st = torch.load(stage.state_file, weights_only=True)
        if st.get("digest") != stage.digest:
            raise ConfigError(case_file, "", f"{stage.state_file} belongs to a different training set-up "
                              "(resume=False / --restart to start afresh, or another output folder)")
        live.load_state_dict(st["net"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        start, history, wall = int(st["iteration"]), list(st["history"]), float(st["wall"])
    t0, running = time.perf_counter(), []
    bar = tqdm(total=stage.iterations, initial=start, desc=stage.name, unit="it", disable=quiet)
    for it in range(start, stage.iterations):
        for group in opt.param_groups:
            group["lr"] = stage.lr(it)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=stage.bfloat16):
            loss = loss_fn(it)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(live.parameters(), stage.grad_clip)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), live.parameters()):
                pe.lerp_(p, 1 - stage.ema(it))
        running.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{sum(running) / len(running):.4g}")
        done = it + 1
        if done % stage.checkpoint_every == 0 or done == stage.iterations:
            history.append({"iteration": done, "loss": sum(running) / len(running), "validation": validate()})
            running = []
            atomic_save({"digest": stage.digest, "iteration": done, "net": live.state_dict(),
                          "ema": ema.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                          "history": history, "wall": wall + time.perf_counter() - t0}, stage.state_file)
    bar.close()
    return history, wall + time.perf_counter() - t0


def _settings(config: Any) -> dict:
    """What a stage's result depends on among its settings (not its length or resume cadence); perturb: 0
    and smoothing_order: 0 are left out, so state files written before those settings existed still resume."""
    return {k: v for k, v in dataclasses.asdict(config).items()
            if k not in ("iterations", "checkpoint_every") and not (k in ("perturb", "smoothing_order") and v == 0)}


def _precision(case: TrainCase) -> dict:
    """The training precision in the teacher's digest, which every later stage's chains (absent for
    float32, the original set-up, so earlier state files still resume)."""
    return {} if case.train.precision == "float32" else {"precision": case.train.precision}


def _bf16(case: TrainCase) -> bool:
    return case.train.precision == "bfloat16"


def _shifting(case: TrainCase, pairs: Pairs) -> bool:
    """Random shifts along x: asked for, valid for the grid (periodic in x) and the static channels."""
    return case.train.shift_x and pairs.periodic_x and not any(s.endswith("_x") for s in case.network.static)


def _augmentation(case: TrainCase, pairs: Pairs, width: int
                  ) -> Callable[[int, torch.Generator], tuple[torch.Tensor | None, torch.Tensor | None]]:
    """draw(b, gen) -> per-pair (x shifts, symmetry elements) of a batch, None where off; the elements are
    drawn after the shifts and only with train.symmetries, so set-ups without them keep their streams."""
    shift = _shifting(case, pairs)
    count = pairs.symmetry_count if case.train.symmetries else 0

    def draw(b: int, gen: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        shifts = torch.randint(width, (b,), generator=gen) if shift else None
        return shifts, (torch.randint(count, (b,), generator=gen) if count else None)
    return draw


def _symmetries(case: TrainCase) -> dict:
    """train.symmetries in every stage's digest when on (absent when off: earlier state files resume)."""
    return {"symmetries": True} if case.train.symmetries else {}


def regression_stage(case: TrainCase, folder: Path, data_key: str, net: nn.Module, train_pairs: Pairs,
                     val_pairs: Pairs, width: int, resume: bool, file: str,
                     quiet: bool) -> tuple[Regression, list[dict], float, str]:
    """The regression network of the increment's mean: the mean square error (state-std units) of
    rollouts through the emulator's Shapiro filter — `iterations` of one step, then `rollout_iterations`
    of two steps (half the batch) — from starts perturbed as in the augment stage up to `perturb` (the
    target stays the truth). Returns the EMA network, history (validation: the mean square error of
    held-out 2-step rollouts), wall time and digest."""
    r = case.regression
    gen = torch.Generator().manual_seed(case.train.seed + 5)
    digest = config_digest({"data": data_key, "regression": _settings(r), "network": dataclasses.asdict(case.network),
                            "iterations": [r.iterations, r.rollout_iterations], **_precision(case),
                            **_symmetries(case)})
    variables = train_pairs.mean.shape[1]
    live = Regression(net, variables)
    ema = copy.deepcopy(live).requires_grad_(False)
    draw = _augmentation(case, train_pairs, width)
    perturb = dataclasses.replace(case.augment, noise=r.perturb)
    total = r.iterations + r.rollout_iterations

    def score(model: Regression, p: Pairs, start: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor | None
              ) -> torch.Tensor:
        x, loss = start, 0.0
        for k in range(len(truth)):
            cond = p.condition((x - p.mean) / p.std)
            inc = model(cond)[..., :p.shape[0], :p.shape[1]]
            out = shapiro(x + p.inc_mean + p.inc_std * inc, case.crps.smoothing_order, p.periodic, p.pad_grid)
            x = out if mask is None else torch.where(mask, out, x)
            err = ((x - truth[k]) / p.std).square()
            loss = loss + (err.mean() if mask is None else (err * mask).sum() / mask.sum().clamp_min(1)) / len(truth)
        return loss

    def loss(it: int) -> torch.Tensor:
        steps = 1 if it < r.iterations else 2
        b = r.batch_size if steps == 1 else max(1, r.batch_size // 2)
        index = torch.randint(train_pairs.rollout_count(steps), (b,), generator=gen)
        start, truth, mask = train_pairs.rollout(index, steps, *draw(b, gen))
        if r.perturb:
            eps = train_pairs.std * perturbation(start.shape, perturb, gen)
            start = start + (eps if mask is None else eps * mask)
        return score(live, train_pairs, start, truth, mask)

    def validate() -> float:
        g = torch.Generator().manual_seed(case.train.seed + 7919)
        n = min(case.crps.validation_states, val_pairs.rollout_count(2))
        start, truth, mask = val_pairs.rollout(torch.randperm(val_pairs.rollout_count(2), generator=g)[:n], 2)
        with torch.no_grad():
            return float(score(ema, val_pairs, start, truth, mask))

    stage = _Stage("regression", folder / "regression_state.pt", digest, total, r.checkpoint_every,
                   lambda it: _lr(r.lr, r.warmup, total, 0.1, it), lambda it: min(r.ema, (1 + it) / (10 + it)),
                   case.train.grad_clip, _bf16(case))
    history, wall = _run_stage(stage, live.net, ema.net, loss, validate, gen, resume, file, quiet)
    return ema, history, wall, digest


def residual_std(regression: Regression, pairs: Pairs, count: int, seed: int) -> torch.Tensor:
    """Per-variable std (V,) of the standardised increment minus the regression on up to `count` pairs:
    the scale of the diffusion networks' target."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(pairs.count, generator=g)[:min(count, pairs.count)]
    sums = torch.zeros(pairs.mean.shape[1], dtype=torch.float64)
    weight = torch.zeros_like(sums)
    with torch.no_grad():
        for chunk in index.split(16):
            target, cond, mask = pairs.batch(chunk)
            mean = regression(cond)[..., :pairs.shape[0], :pairs.shape[1]]
            err = (target - mean).square()
            m = torch.ones_like(err) if mask is None else mask.to(err.dtype)
            sums += (err * m).sum((0, 2, 3)).double()
            weight += m.sum((0, 2, 3)).double()
    return (sums / weight.clamp_min(1)).sqrt().float()


def teacher_stage(case: TrainCase, folder: Path, data_key: str, net: nn.Module, model: Precond, ema: Precond,
                   train_pairs: Pairs, val_pairs: Pairs, width: int, resume: bool, file: str,
                   quiet: bool) -> tuple[list[dict], float, str]:
    """The EDM denoiser (the multi-step sampler's network). Returns history, wall time, digest."""
    t = case.train
    gen = torch.Generator().manual_seed(t.seed + 1)
    digest = config_digest({"data": data_key, "network": dataclasses.asdict(case.network),
                      "edm": dataclasses.asdict(case.edm),
                      "train": {k: v for k, v in dataclasses.asdict(t).items()
                                if k not in ("iterations", "checkpoint_every", "threads", "validation_pairs",
                                             "precision", "symmetries")}, **_precision(case), **_symmetries(case)})
    draw = _augmentation(case, train_pairs, width)

    def loss(it: int) -> torch.Tensor:
        index = torch.randint(train_pairs.count, (t.batch_size,), generator=gen)
        target, cond, mask = train_pairs.batch(index, *draw(t.batch_size, gen))
        target = train_pairs.residual(target, cond, mask)
        return edm_loss(train_pairs.net(model, mask), target, cond, train_pairs.pad, case.edm, gen)

    stage = _Stage(f"train {case.name}", folder / "train_state.pt", digest, t.iterations, t.checkpoint_every,
                   lambda it: _lr(t.lr, t.warmup, t.iterations, t.final_lr_fraction, it),
                   lambda it: min(t.ema, (1 + it) / (10 + it)), t.grad_clip, _bf16(case))
    history, wall = _run_stage(stage, net, ema, loss, lambda: _validation_loss(ema, val_pairs, case), gen,
                               resume, file, quiet)
    return history, wall, digest


def perturbation(shape: tuple[int, ...], config: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Unit-scale perturbations (B, V, y, x) times a std drawn uniformly in [0, noise] per pair: half white,
    half smooth (white on cells of `coarsening` points, bicubically interpolated), plus an offset per
    pair and variable — the kinds of error an autoregressive rollout accumulates."""
    b, v, ny, nx = shape
    white = torch.randn(shape, generator=gen)
    coarse = torch.randn((b, v, -(-ny // config.coarsening), -(-nx // config.coarsening)), generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=(ny, nx), mode="bicubic", align_corners=False)
    smooth = smooth / smooth.flatten(2).std(2).clamp_min(1e-6)[..., None, None]
    offset = torch.randn((b, v, 1, 1), generator=gen) * config.offset
    scale = torch.rand((b, 1, 1, 1), generator=gen) * config.noise
    return scale * ((white + smooth) / math.sqrt(2) + offset)


def perturbed_batch(p: Pairs, index: torch.Tensor, transform: tuple[torch.Tensor | None, torch.Tensor | None],
                    config: AugmentConfig, gen: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`p.batch` (pairs `index`, (shifts, symmetry elements) `transform`) with the condition's state x_t
    perturbed to x_t + ε and the target increment x_{t+Δ} − x_t changed to x_{t+Δ} − (x_t + ε), all
    standardised (ε masked like the state); with a regression, the residual of that target."""
    target, cond, mask = p.batch(index, *transform)
    if not config.noise:
        return p.residual(target, cond, mask), cond, mask
    eps = perturbation(target.shape, config, gen)
    if mask is not None:
        eps = eps * mask
    h = p.halo  # the condition holds the standardised state at [h:h + ny, h:h + nx]
    state = cond[:, :target.shape[1], h:h + target.shape[-2], h:h + target.shape[-1]]
    cond = p.condition(state + eps)
    return p.residual(target - (p.std / p.inc_std) * eps, cond, mask), cond, mask


def augment_stage(case: TrainCase, folder: Path, teacher: Precond, teacher_key: str, train_pairs: Pairs,
                  val_pairs: Pairs, width: int, resume: bool, file: str,
                  quiet: bool) -> tuple[Precond, list[dict], float, str]:
    """Fine-tune the teacher on perturbed conditions x_t + ε whose target increment x_{t+Δ} − (x_t + ε)
    removes ε again (the training noise of Sanchez-Gonzalez et al. 2020): the denoiser learns to pull
    states that drifted off the attractor back, which is what keeps long free rollouts bounded.
    Returns the EMA denoiser, history (validation: the clean EDM loss), wall time and digest."""
    a = case.augment
    gen = torch.Generator().manual_seed(case.train.seed + 4)
    digest = config_digest({"teacher": teacher_key, "augment": _settings(a), "iterations": a.iterations,
                            **_symmetries(case)})
    live = copy.deepcopy(teacher).requires_grad_(True)
    ema = copy.deepcopy(teacher).requires_grad_(False)
    draw = _augmentation(case, train_pairs, width)
    p = train_pairs

    def loss(it: int) -> torch.Tensor:
        index = torch.randint(p.count, (a.batch_size,), generator=gen)
        target, cond, mask = perturbed_batch(p, index, draw(a.batch_size, gen), a, gen)
        return edm_loss(p.net(live, mask), target, cond, p.pad, case.edm, gen)

    stage = _Stage("augment", folder / "augment_state.pt", digest, a.iterations, a.checkpoint_every,
                   lambda it: _lr(a.lr, a.warmup, a.iterations, 0.1, it), lambda it: min(a.ema, (1 + it) / (10 + it)),
                   case.train.grad_clip, _bf16(case))
    history, wall = _run_stage(stage, live, ema, loss, lambda: _validation_loss(ema, val_pairs, case), gen,
                               resume, file, quiet)
    return ema, history, wall, digest


def distill_stage(case: TrainCase, folder: Path, teacher: Precond, teacher_key: str, train_pairs: Pairs,
                   val_pairs: Pairs, width: int, resume: bool, file: str,
                   quiet: bool) -> tuple[ConsistencyPrecond, list[dict], float, str]:
    """Consistency distillation of the teacher: the single-step sampler's network (EMA weights)."""
    d = case.distill
    gen = torch.Generator().manual_seed(case.train.seed + 2)
    digest = config_digest({"teacher": teacher_key, "distill": _settings(d), **_symmetries(case)})
    student = ConsistencyPrecond(copy.deepcopy(teacher.net).requires_grad_(True), teacher.sigma_data, d.sigma_min)
    ema = copy.deepcopy(student).requires_grad_(False)
    sigmas = ascending_sigmas(d.steps, d.sigma_min, d.sigma_max, d.rho)
    draw = _augmentation(case, train_pairs, width)
    perturb = dataclasses.replace(case.augment, noise=d.perturb)

    def loss(it: int) -> torch.Tensor:
        index = torch.randint(train_pairs.count, (d.batch_size,), generator=gen)
        target, cond, mask = perturbed_batch(train_pairs, index, draw(d.batch_size, gen), perturb, gen)
        return distillation_loss(train_pairs.net(student, mask), train_pairs.net(teacher, mask), target, cond,
                                 train_pairs.pad, sigmas, gen)

    def validate() -> float:
        g = torch.Generator().manual_seed(case.train.seed + 7919)
        index = torch.randperm(val_pairs.count, generator=g)[:min(case.train.validation_pairs, val_pairs.count)]
        total = 0.0
        with torch.no_grad():
            for chunk in index.split(16):
                target, cond, mask = val_pairs.batch(chunk)
                target = val_pairs.residual(target, cond, mask)
                total += float(distillation_loss(val_pairs.net(ema, mask), val_pairs.net(teacher, mask), target,
                                                 cond, val_pairs.pad, sigmas, g)) * len(chunk)
        return total / len(index)

    stage = _Stage("distill", folder / "distill_state.pt", digest, d.iterations, d.checkpoint_every,
                   lambda it: _lr(d.lr, d.warmup, d.iterations, 0.1, it), lambda it: min(d.ema, (1 + it) / (10 + it)),
                   bfloat16=_bf16(case))
    history, wall = _run_stage(stage, student.net, ema, loss, validate, gen, resume, file, quiet)
    return ema, history, wall, digest


def crps_stage(case: TrainCase, folder: Path, distilled: ConsistencyPrecond, sigma_max: float,
                distill_key: str, train_pairs: Pairs, val_pairs: Pairs, width: int, resume: bool, file: str,
                quiet: bool) -> tuple[ConsistencyPrecond, list[dict], float]:
    """Autoregressive fine-tuning of the single-step sampler (one-call samples f(σ_max z, σ_max)) with the
    fair CRPS over unrolled steps."""
    c = case.crps
    gen = torch.Generator().manual_seed(case.train.seed + 3)
    digest = config_digest({"distill": distill_key, "crps": _settings(c), "iterations": c.iterations,
                            **_symmetries(case)})
    live = copy.deepcopy(distilled).requires_grad_(True)
    ema = copy.deepcopy(distilled).requires_grad_(False)
    draw = _augmentation(case, train_pairs, width)
    p = train_pairs
    perturb = dataclasses.replace(case.augment, noise=c.perturb)

    def stepper(model: ConsistencyPrecond, mask: torch.Tensor | None
                ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """One emulator step of the M·B members; points outside `mask` (B, C, y, x) are held fixed."""
        keep = None if mask is None else mask.repeat(c.members, 1, 1, 1)
        run = p.net(model, keep)

        def step(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            cond = p.condition((x - p.mean) / p.std)
            out = x + p.inc_mean + p.inc_std * p.increment(cond, one_step_sample(run, z, sigma_max, cond, p.pad), keep)
            out = shapiro(out, c.smoothing_order, p.periodic, p.pad_grid)
            return out if keep is None else torch.where(keep, out, x)
        return step

    def loss(it: int) -> torch.Tensor:
        phase = min(it * len(c.unroll) // c.iterations, len(c.unroll) - 1)
        steps = c.unroll[phase]
        b = max(1, c.rollout_pairs // steps)
        index = torch.randint(p.rollout_count(steps), (b,), generator=gen)
        start, truth, mask = p.rollout(index, steps, *draw(b, gen))
        if c.perturb:  # off-attractor starts, scored against the truth: keeps the augment stage's pull-back
            eps = p.std * perturbation(start.shape, perturb, gen)
            start = start + (eps if mask is None else eps * mask)
        noise = lambda k: torch.randn((c.members * b, *start.shape[1:]), generator=gen)  # noqa: E731
        return rollout_crps(stepper(live, mask), start, truth, c.members, noise, p.std)

    def validate() -> float:
        g = torch.Generator().manual_seed(case.train.seed + 7919)
        n = min(c.validation_states, val_pairs.rollout_count(2))
        index = torch.randperm(val_pairs.rollout_count(2), generator=g)[:n]
        start, truth, mask = val_pairs.rollout(index, 2)
        noise = lambda k: torch.randn((c.members * n, *start.shape[1:]), generator=g)  # noqa: E731
        with torch.no_grad():
            return float(rollout_crps(stepper(ema, mask), start, truth, c.members, noise, p.std))

    stage = _Stage("crps", folder / "crps_state.pt", digest, c.iterations, c.checkpoint_every,
                   lambda it: _lr(c.lr, c.warmup, c.iterations, 0.1, it), lambda it: min(c.ema, (1 + it) / (10 + it)),
                   bfloat16=_bf16(case))
    history, wall = _run_stage(stage, live.net, ema, loss, validate, gen, resume, file, quiet)
    return ema, history, wall
