"""`twin export CHECKPOINT`: the diffusion emulator as TorchScript for Fortran hosts (FTorch).

Two modules can be exported from one checkpoint, both on the checkpoint's GLOBAL grid, periodic
padding (zeros on open axes) and static channels inside, dtype float32 unless asked otherwise:

- `what="step"`: `forward(state, noise) -> next_state`, one emulator step of Δ = `dt_seconds`.
  state, next_state: (member, variable, y, x) in the variables' physical units (SQG: K);
  noise: (steps + 1, member, variable, y, x) standard normals, noise[k] being the sampler's draw
  k (k = 0: the initial draw x_0 = σ_max · noise[0]; k = i + 1: the churn of step i, read only
  when γ_i > 0, so with churn 0 only noise[0] is read). Standardisation in, de-standardisation
  out. Given the same noise it equals `DiffusionEmulator.step` (Heun sampler, same settings).
- `what="denoiser"`: `forward(x, sigma, cond) -> D(x; σ | cond)`, the EDM-preconditioned denoiser.
  x: (batch, variable, y, x) noisy standardised increment; sigma: (batch,) noise levels in
  standardised units; cond: (batch, variable, y, x) the standardised state (state − mean) / std.

The network is traced (its shapes are fixed by the grid) and the sampler around it is scripted.
Tensor layout, units, dtype and the noise convention are in the module's `metadata` attribute (a
JSON string) and in a sidecar `OUT.json` (e.g. `model.pt.json`). Files are written atomically.
A checkpoint that cannot serve raises `CheckpointMismatch` (one line naming the path); a bad
export request raises `ExportError`. Both are user errors (exit 2 in the CLI).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from emulators.diffusion.checkpoint import Checkpoint, load_checkpoint
from emulators.diffusion.edm import sigma_schedule
from emulators.diffusion.emulator import DiffusionEmulator, static_fields

__all__ = ["ExportError", "export_checkpoint", "build_module"]
WHATS = ("step", "denoiser")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
_SAMPLER = DiffusionEmulator.Config()  # the emulator's defaults: Heun, 18 steps, no churn


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence tracer warnings and torch's TorchScript deprecation notices (FTorch needs TorchScript)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"`torch\.jit", category=DeprecationWarning)
        yield


class ExportError(ValueError):
    """An export request that cannot be honoured (unknown kind or dtype, bad sampler settings, bad OUT)."""


class _Core(nn.Module):
    """What both exported modules share: periodic padding and the preconditioned denoiser."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype) -> None:
        super().__init__()
        net = ckpt.build_network().to(dtype)
        h, a = net.receptive_halo, net.alignment
        (ny, nx), (py, px) = ckpt.grid_shape, ckpt.periodic
        hy, hx = -(-ny // a) * a - ny, -(-nx // a) * a - nx  # slack up to the next aligned size
        self.h, self.ny, self.nx, self.sigma_data = h, ny, nx, float(ckpt.sigma_data)
        self.register_buffer("iy", self._window(ny, hy, h, py))
        self.register_buffer("ix", self._window(nx, hx, h, px))
        self.open_y, self.open_x = not py, not px
        self.register_buffer("static", static_fields(ckpt.static, (ny, nx), (-h, ny + hy + h), (-h, nx + hx + h),
                                                     dtype))
        stats = {k: torch.tensor(v, dtype=dtype).view(-1, 1, 1) for k, v in ckpt.stats.items()}
        for name in ("state_mean", "state_std", "inc_mean", "inc_std"):
            self.register_buffer(name, stats[name])
        example = torch.zeros(1, ckpt.network_config.in_channels, len(self.iy), len(self.ix), dtype=dtype)
        with _quiet():  # the network's shape check is a constant for this grid
            self.net = torch.jit.trace(net, (example, torch.ones(1, dtype=dtype)), check_trace=False)

    @staticmethod
    def _window(n: int, slack: int, h: int, periodic: bool) -> torch.Tensor:
        """Source index of each window point: periodic wrap, or n (an appended zero) on an open axis."""
        idx = torch.arange(-h, n + slack + h)
        return idx.remainder(n) if periodic else torch.where((idx >= 0) & (idx < n), idx, torch.full_like(idx, n))

    def pad(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, ny, nx) → the network's window (B, C, ny + slack + 2h, nx + slack + 2h)."""
        if self.open_y:
            z = torch.cat([z, torch.zeros_like(z[:, :, :1])], dim=2)
        if self.open_x:
            z = torch.cat([z, torch.zeros_like(z[:, :, :, :1])], dim=3)
        return z.index_select(2, self.iy).index_select(3, self.ix)

    def condition(self, standardised: torch.Tensor) -> torch.Tensor:
        """The network's condition on the window: padded standardised state + static channels."""
        static = self.static.expand(standardised.size(0), -1, -1, -1)
        return torch.cat([self.pad(standardised), static], dim=1)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """EDM D(x; σ) on the grid, cond on the window (the arithmetic of `edm.Precond`, op for op)."""
        sigma = sigma.to(x.dtype)
        s2 = sigma.square()
        d2 = self.sigma_data ** 2
        c_skip = (s2 + d2).reciprocal() * d2
        c_out = sigma * self.sigma_data / (s2 + d2).sqrt()
        c_in = (s2 + d2).sqrt().reciprocal() * 1.0
        c_noise = sigma.log() / 4
        h = self.h
        xp = self.pad(x)
        inner = xp[:, :, h:-h, h:-h]
        f = self.net(torch.cat([xp * c_in.view(-1, 1, 1, 1), cond], dim=1), c_noise)
        out = c_skip.view(-1, 1, 1, 1) * inner + c_out.view(-1, 1, 1, 1) * f
        return out[:, :, : self.ny, : self.nx]

    def check(self, x: torch.Tensor, name: str) -> None:
        if x.dim() != 4 or x.size(1) != self.state_mean.size(0) or x.size(2) != self.ny or x.size(3) != self.nx:
            raise ValueError(f"{name}: expected shape (member, {self.state_mean.size(0)}, {self.ny}, {self.nx}), "
                             f"got {list(x.shape)}")


class DenoiserModule(_Core):
    """forward(x, sigma, cond) → D(x; σ | cond): standardised units, (batch, variable, y, x)."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, metadata: str) -> None:
        super().__init__(ckpt, dtype)
        self.metadata = metadata

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self.check(x, "x")
        self.check(cond, "cond")
        x = x.to(self.state_mean.dtype).contiguous()
        return self.denoise(x, sigma, self.condition(cond.to(x.dtype).contiguous()))


class StepModule(_Core):
    """forward(state, noise) → next_state: one emulator step, physical units, (member, variable, y, x)."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, metadata: str, steps: int, sigma_min: float,
                 sigma_max: float, rho: float, churn: float) -> None:
        super().__init__(ckpt, dtype)
        self.metadata = metadata
        sig = sigma_schedule(steps, sigma_min, sigma_max, rho)
        gamma_max = min(churn / steps, math.sqrt(2.0) - 1.0)
        hat = [s * (1.0 + gamma_max) for s in sig[:-1]]
        # Python floats, precomputed exactly as `edm.heun_sample` computes them (churn_range is all σ)
        self.steps, self.sigma0 = steps, sig[0]
        self.s_hat, self.s_next = hat, sig[1:]
        self.kick = [math.sqrt(sh**2 - s**2) * 1.0 if gamma_max > 0 else 0.0 for sh, s in zip(hat, sig)]
        self.full = [sn - sh for sn, sh in zip(sig[1:], hat)]
        self.half = [(sn - sh) * 0.5 for sn, sh in zip(sig[1:], hat)]

    def forward(self, state: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        self.check(state, "state")
        if noise.dim() != 5 or noise.size(0) != self.steps + 1 or noise.shape[1:] != state.shape:
            raise ValueError(f"noise: expected shape ({self.steps + 1}, {', '.join([str(n) for n in state.shape])})"
                             f", got {list(noise.shape)}")
        x0 = state.to(self.state_mean.dtype).contiguous()  # a Fortran-ordered view computes the same
        noise = noise.to(x0.dtype).contiguous()
        cond = self.condition((x0 - self.state_mean) / self.state_std)
        members = x0.size(0)
        x = noise[0] * self.sigma0
        for i in range(self.steps):
            s_hat, s_next = self.s_hat[i], self.s_next[i]
            if self.kick[i] > 0:
                x = x + self.kick[i] * noise[i + 1]
            s = torch.full([members], s_hat, dtype=x.dtype, device=x.device)
            d = (x - self.denoise(x, s, cond)) / s_hat
            x_next = x + self.full[i] * d
            if s_next > 0:
                s = torch.full([members], s_next, dtype=x.dtype, device=x.device)
                d2 = (x_next - self.denoise(x_next, s, cond)) / s_next
                x_next = x + self.half[i] * (d + d2)
            x = x_next
        return (x0 + self.inc_mean + self.inc_std * x).to(state.dtype)


def _metadata(ckpt: Checkpoint, what: str, dtype: str, sampler: dict) -> dict:
    ny, nx = ckpt.grid_shape
    nvar = len(ckpt.variables)
    grid = {"dims": ["y", "x"], "shape": [ny, nx], "periodic": list(ckpt.periodic),
            "y": "row index j = 0..ny-1 (static channels use cos/sin(2π j / ny))"}
    layout = ("C order (row-major), torch dims (member, variable, y, x): the same memory as a Fortran "
              "array dimensioned (x, y, variable, member); x varies fastest")
    meta: dict = {
        "format": "earthtwin-torchscript", "format_version": 1, "what": what, "dtype": dtype,
        "checkpoint": str(ckpt.path), "checkpoint_earthtwin_version": ckpt.version,
        "variables": [{"name": n, "units": u, "long_name": ln} for n, u, ln in ckpt.variables],
        "grid": grid, "layout": layout, "dt_seconds": ckpt.dt_seconds, "time_units": "s",
        "standardisation": {k: list(v) for k, v in ckpt.stats.items()}, "sigma_data": ckpt.sigma_data,
    }
    if what == "step":
        steps = sampler["steps"]
        used = [0] + ([k + 1 for k in range(steps)] if sampler["churn"] > 0 else [])
        meta["inputs"] = [
            {"name": "state", "shape": ["member", nvar, ny, nx], "units": [u for _, u, _ in ckpt.variables]},
            {"name": "noise", "shape": [steps + 1, "member", nvar, ny, nx], "units": "1",
             "distribution": "independent standard normal",
             "convention": "noise[0]: initial draw x0 = sigma_max * noise[0]; noise[i+1]: churn of Heun step i "
                           "(read only when churn > 0)", "indices_read": used}]
        meta["outputs"] = [{"name": "next_state", "shape": ["member", nvar, ny, nx],
                            "units": [u for _, u, _ in ckpt.variables],
                            "valid_time": f"input time + {ckpt.dt_seconds:g} s"}]
        meta["sampler"] = {"kind": "heun", **sampler, "network_calls": 2 * steps - 1}
    else:
        meta["inputs"] = [
            {"name": "x", "shape": ["batch", nvar, ny, nx], "units": "1 (standardised increment + noise)"},
            {"name": "sigma", "shape": ["batch"], "units": "1 (standardised)"},
            {"name": "cond", "shape": ["batch", nvar, ny, nx], "units": "1: (state - state_mean) / state_std"}]
        meta["outputs"] = [{"name": "denoised", "shape": ["batch", nvar, ny, nx],
                            "units": "1 (standardised increment)"}]
    return meta


def build_module(checkpoint_path: str | os.PathLike, *, what: str = "step", dtype: str = "float32",
                 steps: int = _SAMPLER.steps, sigma_min: float = _SAMPLER.sigma_min,
                 sigma_max: float = _SAMPLER.sigma_max, rho: float = _SAMPLER.rho,
                 churn: float = _SAMPLER.churn) -> tuple[torch.jit.ScriptModule, dict]:
    """The scripted module and its metadata (not written); see `export_checkpoint`."""
    if what not in WHATS:
        raise ExportError(f"export: what must be one of {', '.join(WHATS)}, not {what!r}")
    if dtype not in DTYPES:
        raise ExportError(f"export: dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if steps < 1 or not (0 < sigma_min < sigma_max) or rho <= 0 or churn < 0:
        raise ExportError("export: need steps >= 1, 0 < sigma_min < sigma_max, rho > 0, churn >= 0")
    ckpt = load_checkpoint(checkpoint_path)
    sampler = {"steps": int(steps), "sigma_min": float(sigma_min), "sigma_max": float(sigma_max),
               "rho": float(rho), "churn": float(churn)}
    meta = _metadata(ckpt, what, dtype, sampler)
    text = json.dumps(meta, indent=1)
    with torch.no_grad(), _quiet():
        if what == "step":
            module: nn.Module = StepModule(ckpt, DTYPES[dtype], text, **sampler)
        else:
            module = DenoiserModule(ckpt, DTYPES[dtype], text)
        return torch.jit.script(module.eval()), meta


def export_checkpoint(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike, *, what: str = "step",
                      dtype: str = "float32", steps: int = _SAMPLER.steps, sigma_min: float = _SAMPLER.sigma_min,
                      sigma_max: float = _SAMPLER.sigma_max, rho: float = _SAMPLER.rho,
                      churn: float = _SAMPLER.churn) -> Path:
    """Write CHECKPOINT as TorchScript to `out_path` (+ sidecar `out_path.json`); returns `out_path`.

    Atomic: both files go to temporary names in the target folder first and are renamed only when
    complete (the .json before the .pt, so a .pt always has its sidecar); a failure leaves neither.
    """
    out = Path(out_path)
    if out.is_dir():
        raise ExportError(f"{out}: is a folder (give a file name such as {out / 'model.pt'})")
    module, meta = build_module(checkpoint_path, what=what, dtype=dtype, steps=steps, sigma_min=sigma_min,
                                sigma_max=sigma_max, rho=rho, churn=churn)
    side = out.with_name(out.name + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_pt = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp_js = side.with_name(f".{side.name}.{os.getpid()}.tmp")
    try:
        with _quiet():
            torch.jit.save(module, str(tmp_pt))
        tmp_js.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp_js, side)
        os.replace(tmp_pt, out)
    finally:
        for t in (tmp_pt, tmp_js):
            t.unlink(missing_ok=True)
    return out
