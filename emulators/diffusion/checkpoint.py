"""The diffusion emulator's checkpoint file: what it holds, how it is written and checked.

A checkpoint is a `torch.save`d dict (loaded with `weights_only=True`, so a file cannot run code):
format tag and version, the EarthTwin version that wrote it, the network's architecture keys and
state_dict (EMA weights), EDM σ_d, the variables (names, units, long names), grid shape and
periodicity, static input channels, the emulator step Δ in seconds, per-variable standardisation
statistics of the state and of the Δ-increment, and free-form training metadata; optionally the
single-step sampler's network and a regression network for the increment's mean (then both diffusion
networks model the residual: `emulators.diffusion.regression`).
Any mismatch raises `CheckpointMismatch("PATH: what")` — one line, a user error (exit 2).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from emulators.diffusion.network import NetworkConfig, UNetLite
from emulators.diffusion.regression import Regression

FORMAT = "earthtwin-diffusion"
FORMAT_VERSION = 1
STATIC_CHANNELS = ("cos_y", "sin_y", "cos_x", "sin_x")
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
SHIPPED_SQG = "sqg_edm_v6.pt"  # the SQG emulator `twin train cases/sqg_train.yaml` trains
_STAT_KEYS = ("state_mean", "state_std", "inc_mean", "inc_std")


class CheckpointMismatch(ValueError):
    """A checkpoint that cannot serve here: missing, not a checkpoint, or the wrong shape/kind."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded, checked checkpoint (the network is built but not yet cast to a dtype)."""

    path: str
    network_config: NetworkConfig
    state_dict: dict[str, torch.Tensor]
    sigma_data: float
    variables: tuple[tuple[str, str, str], ...]  # (name, units, long_name)
    grid_shape: tuple[int, ...]
    periodic: tuple[bool, ...]
    static: tuple[str, ...]
    dt_seconds: float
    stats: dict[str, tuple[float, ...]]
    version: str
    training: dict
    single_step: dict | None = None  # {state_dict, sigma_min, sigma_max, training} of the consistency network
    smoothing_order: int = 0  # Shapiro filter after each step, as trained (0: none)
    # {network (architecture keys), state_dict, residual_std (per variable), training} of the mean's network
    regression: dict | None = None

    def build_regression(self) -> Regression | None:
        """The regression network of the increment's mean (None: the diffusion networks model it all)."""
        if self.regression is None:
            return None
        net = UNetLite(NetworkConfig.from_dict(dict(self.regression["network"])))
        net.load_state_dict(self.regression["state_dict"])
        return Regression(net.eval().requires_grad_(False), len(self.variables))

    def residual_std(self) -> tuple[float, ...]:
        """The std the diffusion networks' (standardised) target is scaled by: 1 without a regression."""
        return tuple(self.regression["residual_std"]) if self.regression else (1.0,) * len(self.variables)

    def build_network(self) -> UNetLite:
        """The EDM denoiser's network (the multi-step sampler's)."""
        return self._build(self.state_dict)

    def build_single_step_network(self) -> UNetLite:
        """The consistency network of the single-step sampler; `CheckpointMismatch` if none was trained."""
        if self.single_step is None:
            raise CheckpointMismatch(f"{self.path}: this checkpoint has no single-step sampler (train it with "
                                     "distill.iterations > 0, or use sampler: heun)")
        return self._build(self.single_step["state_dict"])

    def _build(self, state_dict: dict[str, torch.Tensor]) -> UNetLite:
        net = UNetLite(self.network_config)
        net.load_state_dict(state_dict)
        return net.eval().requires_grad_(False)


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint path as given (relative to the working directory), else a file of that name in
    the shipped weights folder `emulators/weights/`."""
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (WEIGHTS_DIR / p.name).exists():
        return WEIGHTS_DIR / p.name
    return p


def save_checkpoint(path: str | os.PathLike, *, network_config: NetworkConfig, state_dict: dict, sigma_data: float,
                    variables: tuple[tuple[str, str, str], ...], grid_shape: tuple[int, ...],
                    periodic: tuple[bool, ...], static: tuple[str, ...], dt_seconds: float,
                    stats: dict[str, tuple[float, ...]], training: dict | None = None,
                    single_step: dict | None = None, smoothing_order: int = 0, regression: dict | None = None) -> Path:
    """Write a checkpoint atomically (temporary file + rename); returns the path. `single_step`:
    {state_dict, sigma_min, sigma_max, training} of the consistency network, when one was trained;
    `regression`: {network (NetworkConfig), state_dict, residual_std, training} of the mean's network."""
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "earthtwin_version": _version(),
        "network": network_config.to_dict(),
        "state_dict": {k: v.detach().to("cpu", torch.float32).clone() for k, v in state_dict.items()},
        "sigma_data": float(sigma_data), "variables": [list(v) for v in variables],
        "grid_shape": [int(n) for n in grid_shape], "periodic": [bool(p) for p in periodic],
        "static": list(static), "dt_seconds": float(dt_seconds),
        "stats": {k: [float(v) for v in stats[k]] for k in _STAT_KEYS}, "training": dict(training or {}),
        "smoothing_order": int(smoothing_order),
    }
    if single_step is not None:
        payload["single_step"] = {
            "state_dict": {k: v.detach().to("cpu", torch.float32).clone() for k, v in single_step["state_dict"].items()},
            "sigma_min": float(single_step["sigma_min"]), "sigma_max": float(single_step["sigma_max"]),
            "training": dict(single_step.get("training", {}))}
    if regression is not None:
        payload["regression"] = {
            "network": regression["network"].to_dict(),
            "state_dict": {k: v.detach().to("cpu", torch.float32).clone() for k, v in regression["state_dict"].items()},
            "residual_std": [float(v) for v in regression["residual_std"]],
            "training": dict(regression.get("training", {}))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("earthtwin")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def _check(cond: bool, path: Path, message: str) -> None:
    if not cond:
        raise CheckpointMismatch(f"{path}: {message}")


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, size: int) -> Checkpoint:
    p = Path(path)
    try:
        raw: Any = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unpickler errors all mean: not a checkpoint we can read
        raise CheckpointMismatch(f"{p}: not an EarthTwin diffusion checkpoint ({type(e).__name__})") from None
    _check(isinstance(raw, dict) and raw.get("format") == FORMAT, p, "not an EarthTwin diffusion checkpoint")
    _check(raw.get("format_version") == FORMAT_VERSION, p,
           f"checkpoint format version {raw.get('format_version')!r}, this EarthTwin reads {FORMAT_VERSION}")
    needed = ("network", "state_dict", "sigma_data", "variables", "grid_shape", "periodic", "static",
              "dt_seconds", "stats")
    missing = [k for k in needed if k not in raw]
    _check(not missing, p, f"checkpoint lacks {', '.join(missing)}")
    try:
        net_cfg = NetworkConfig.from_dict(dict(raw["network"]))
    except (TypeError, ValueError) as e:
        raise CheckpointMismatch(f"{p}: unknown network architecture keys ({str(e).splitlines()[0]})") from None
    variables = tuple(tuple(str(s) for s in v) for v in raw["variables"])
    nvar = len(variables)
    _check(nvar > 0 and all(len(v) == 3 for v in variables), p, "malformed variables list")
    shape = tuple(int(n) for n in raw["grid_shape"])
    periodic = tuple(bool(b) for b in raw["periodic"])
    _check(len(shape) == 2 and len(periodic) == 2, p, f"grid {list(shape)} is not 2-D")
    static = tuple(str(s) for s in raw["static"])
    unknown = [s for s in static if s not in STATIC_CHANNELS]
    _check(not unknown, p, f"unknown static channels {unknown} (known: {', '.join(STATIC_CHANNELS)})")
    stats = {k: tuple(float(v) for v in raw["stats"].get(k, ())) for k in _STAT_KEYS}
    _check(all(len(v) == nvar for v in stats.values()), p, f"statistics do not match the {nvar} variables")
    _check(all(math.isfinite(v) for s in stats.values() for v in s) and min(stats["state_std"] + stats["inc_std"]) > 0,
           p, "statistics must be finite with positive standard deviations")
    _check(net_cfg.in_channels == 2 * nvar + len(static) and net_cfg.out_channels == nvar, p,
           f"network channels ({net_cfg.in_channels} in, {net_cfg.out_channels} out) do not fit {nvar} variables "
           f"and {len(static)} static channels")
    _check_weights(p, net_cfg, raw["state_dict"], "weights")
    single = raw.get("single_step")
    if single is not None:
        _check(isinstance(single, dict) and {"state_dict", "sigma_min", "sigma_max"} <= set(single), p,
               "malformed single-step sampler entry")
        _check(0 < float(single["sigma_min"]) < float(single["sigma_max"]), p,
               "single-step sampler needs 0 < sigma_min < sigma_max")
        _check_weights(p, net_cfg, single["state_dict"], "single-step weights")
        single = {**single, "sigma_min": float(single["sigma_min"]), "sigma_max": float(single["sigma_max"])}
    dt = float(raw["dt_seconds"])
    _check(math.isfinite(dt) and dt > 0, p, f"emulator step {dt} s must be positive")
    order = raw.get("smoothing_order", 0)
    _check(isinstance(order, int) and order >= 0 and order % 2 == 0, p,
           f"smoothing_order {order!r} must be an even integer >= 0")
    return Checkpoint(str(p), net_cfg, dict(raw["state_dict"]), float(raw["sigma_data"]), variables, shape, periodic,
                      static, dt, stats, str(raw.get("earthtwin_version", "unknown")), dict(raw.get("training", {})),
                      single, order, _check_regression(p, raw.get("regression"), net_cfg, nvar))


def _check_regression(p: Path, entry: Any, net_cfg: NetworkConfig, nvar: int) -> dict | None:
    """The regression entry, checked: its network reads the denoiser's condition over the same halo and
    alignment (so it tiles with it), its weights fit, its residual stds are positive."""
    if entry is None:
        return None
    _check(isinstance(entry, dict) and {"network", "state_dict", "residual_std"} <= set(entry), p,
           "malformed regression entry")
    try:
        cfg = NetworkConfig.from_dict(dict(entry["network"]))
    except (TypeError, ValueError) as e:
        raise CheckpointMismatch(f"{p}: unknown regression network keys ({str(e).splitlines()[0]})") from None
    a, b = UNetLite(cfg), UNetLite(net_cfg)
    _check((cfg.in_channels, cfg.out_channels) == (net_cfg.in_channels, net_cfg.out_channels)
           and (a.receptive_halo, a.alignment) == (b.receptive_halo, b.alignment), p,
           "the regression network's channels, halo or alignment differ from the denoiser's")
    _check_weights(p, cfg, entry["state_dict"], "regression weights")
    rstd = [float(v) for v in entry["residual_std"]]
    _check(len(rstd) == nvar and all(math.isfinite(v) and v > 0 for v in rstd), p,
           f"regression residual_std must be {nvar} positive numbers")
    return {**entry, "residual_std": tuple(rstd)}


def _check_weights(p: Path, net_cfg: NetworkConfig, state_dict: Any, what: str) -> None:
    """The state dict loads into the architecture exactly (no missing, unexpected or misshapen tensors)."""
    net = UNetLite(net_cfg)
    try:
        result = net.load_state_dict(state_dict, strict=False)
    except (RuntimeError, TypeError, AttributeError) as e:  # misshapen tensors, or not a mapping of tensors
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        detail = lines[0] if lines else "tensor shapes"
        raise CheckpointMismatch(f"{p}: {what} do not fit the architecture ({detail})") from None
    bad = [f"missing {k}" for k in result.missing_keys] + [f"unexpected {k}" for k in result.unexpected_keys]
    _check(not bad, p, f"{what} do not fit the architecture ({'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})")


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load and check a checkpoint (cached by path, mtime and size); `CheckpointMismatch` if unusable."""
    p = resolve(path)
    if not p.is_file():
        raise CheckpointMismatch(f"{path}: no such checkpoint file")
    st = p.stat()
    return _load_cached(str(p), st.st_mtime_ns, st.st_size)
