"""`twin export CHECKPOINT`: the diffusion emulator as TorchScript for Fortran hosts (FTorch).

Three modules can be exported from one checkpoint, all on the checkpoint's GLOBAL grid, periodic
padding (zeros on open axes) and static channels inside, dtype float32 unless asked otherwise:

- `what="step"`: `forward(state, noise) -> next_state`, one emulator step of Δ = `dt_seconds`.
  state, next_state: (member, variable, y, x) in the variables' physical units (SQG: K);
  noise: (draws, member, variable, y, x) standard normals. Standardisation in, de-standardisation
  out. Given the same noise it equals `DiffusionEmulator.step` with the same sampler settings.
  `sampler="heun"`: draws = steps + 1, noise[k] being the sampler's draw k (k = 0: the initial draw
  x_0 = σ_max · noise[0]; k = i + 1: the churn of step i, read only when γ_i > 0, so with churn 0
  only noise[0] is read); 2 · steps − 1 network calls.
  `sampler="single_step"`: draws = 1, the increment is the consistency function
  f(σ_max · noise[0], σ_max | state) (σ_min, σ_max from the checkpoint); one network call.
  Either way the new state then goes through the checkpoint's Shapiro filter (`smoothing_order`,
  periodic axes only; metadata `smoothing_order`), as the emulator's step does by default.
- `what="denoiser"`: `forward(x, sigma, cond) -> D(x; σ | cond)`, the EDM-preconditioned denoiser.
  x: (batch, variable, y, x) noisy standardised increment; sigma: (batch,) noise levels in
  standardised units; cond: (batch, variable, y, x) the standardised state (state − mean) / std.
- `what="consistency"`: `forward(x, sigma, cond) -> f(x; σ | cond)`, the single-step sampler's
  consistency function, inputs as for the denoiser.

The network is traced (its shapes are fixed by the grid) and the sampler around it is scripted.
Tensor layout, units, dtype and the noise convention are in the module's `metadata` attribute (a
JSON string) and in a sidecar `OUT.json` (e.g. `model.pt.json`). Files are written atomically.
A checkpoint that cannot serve (e.g. has no single-step network for `single_step`) raises
`CheckpointMismatch` (one line naming the path); a bad export request raises `ExportError`.
Both are user errors (exit 2 in the CLI).
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
from emulators.diffusion.emulator import SAMPLERS, DiffusionEmulator, static_fields
from emulators.diffusion.smoothing import shapiro_halo, shapiro_wrapped

__all__ = ["ExportError", "export_checkpoint", "build_module"]
WHATS = ("step", "denoiser", "consistency")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
HEUN_OPTIONS = ("steps", "sigma_min", "sigma_max", "rho", "churn")
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
    """What every exported module shares: periodic padding, static channels, statistics and one network.

    `net` is the EDM denoiser's network (evaluate with `denoise`) or the consistency network (evaluate
    with `consistency`; `sigma_min` is its σ_min, where f(x, σ_min) = x).
    """

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, net: nn.Module, sigma_min: float = 0.0) -> None:
        super().__init__()
        net = net.to(dtype)
        a = net.alignment
        (ny, nx), (py, px) = ckpt.grid_shape, ckpt.periodic
        hy, hx = -(-ny // a) * a - ny, -(-nx // a) * a - nx  # slack up to the next aligned size
        net.wrap = net.can_wrap(ckpt.grid_shape, ckpt.periodic)  # as the serial emulator: no halo
        h = net.input_halo
        self.h, self.ny, self.nx = h, ny, nx
        self.sigma_data, self.sigma_min = float(ckpt.sigma_data), float(sigma_min)
        self.register_buffer("iy", self._window(ny, hy, h, py))
        self.register_buffer("ix", self._window(nx, hx, h, px))
        self.open_y, self.open_x = not py, not px
        self.smoothing_passes = shapiro_halo(ckpt.smoothing_order)
        self.smoothing_axes = [axis for axis, on in ((2, py), (3, px)) if on]
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
        return self.precondition(x, cond, c_skip, c_out, c_in, sigma.log() / 4)

    def consistency(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Consistency f(x; σ) on the grid, cond on the window (`ConsistencyPrecond`'s arithmetic, op for op)."""
        s = sigma.to(x.dtype)
        d2 = self.sigma_data ** 2
        c_skip = ((s - self.sigma_min).square() + d2).reciprocal() * d2
        c_out = (s - self.sigma_min) * self.sigma_data / (s.square() + d2).sqrt()
        c_in = (s.square() + d2).sqrt().reciprocal() * 1.0
        return self.precondition(x, cond, c_skip, c_out, c_in, s.log() / 4)

    def precondition(self, x: torch.Tensor, cond: torch.Tensor, c_skip: torch.Tensor, c_out: torch.Tensor,
                     c_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        """c_skip x + c_out F(c_in x, c_noise | cond) on the grid; coefficients (batch,)."""
        h = self.h
        xp = self.pad(x)
        inner = xp.narrow(2, h, xp.size(2) - 2 * h).narrow(3, h, xp.size(3) - 2 * h)
        f = self.net(torch.cat([xp * c_in.view(-1, 1, 1, 1), cond], dim=1), c_noise)
        out = c_skip.view(-1, 1, 1, 1) * inner + c_out.view(-1, 1, 1, 1) * f
        return out[:, :, : self.ny, : self.nx]

    def smooth(self, x: torch.Tensor) -> torch.Tensor:
        """The checkpoint's Shapiro filter on the global grid (as the emulator's step applies it)."""
        return shapiro_wrapped(x, self.smoothing_passes, self.smoothing_axes)

    def check(self, x: torch.Tensor, name: str) -> None:
        """x is (member or batch, variable, ny, nx)."""
        if x.dim() != 4 or x.size(1) != self.state_mean.size(0) or x.size(2) != self.ny or x.size(3) != self.nx:
            raise ValueError(f"{name}: expected shape (member, {self.state_mean.size(0)}, {self.ny}, {self.nx}), "
                             f"got {list(x.shape)}")

    def check_noise(self, noise: torch.Tensor, state: torch.Tensor, draws: int) -> None:
        """noise is (draws, *state.shape)."""
        if noise.dim() != 5 or noise.size(0) != draws or noise.shape[1:] != state.shape:
            raise ValueError(f"noise: expected shape ({draws}, {', '.join([str(n) for n in state.shape])})"
                             f", got {list(noise.shape)}")


class DenoiserModule(_Core):
    """forward(x, sigma, cond) → D(x; σ | cond): standardised units, (batch, variable, y, x)."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, net: nn.Module, metadata: str,
                 sigma_min: float = 0.0) -> None:
        super().__init__(ckpt, dtype, net, sigma_min)
        self.metadata = metadata

    def inputs(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked x in the module's dtype and the condition on the window."""
        self.check(x, "x")
        self.check(cond, "cond")
        x = x.to(self.state_mean.dtype).contiguous()
        return x, self.condition(cond.to(x.dtype).contiguous())

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x, window = self.inputs(x, cond)
        return self.denoise(x, sigma, window)


class ConsistencyModule(DenoiserModule):
    """forward(x, sigma, cond) → f(x; σ | cond), the consistency function: as `DenoiserModule`."""

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x, window = self.inputs(x, cond)
        return self.consistency(x, sigma, window)


class StepModule(_Core):
    """forward(state, noise) → next_state by the Heun sampler, physical units, (member, variable, y, x)."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, net: nn.Module, metadata: str, steps: int,
                 sigma_min: float, sigma_max: float, rho: float, churn: float) -> None:
        super().__init__(ckpt, dtype, net)
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
        self.check_noise(noise, state, self.steps + 1)
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
        return self.smooth(x0 + self.inc_mean + self.inc_std * x).to(state.dtype)


class SingleStepModule(_Core):
    """forward(state, noise) → next_state by one consistency call; noise (1, member, variable, y, x)."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, net: nn.Module, metadata: str, sigma_min: float,
                 sigma_max: float) -> None:
        super().__init__(ckpt, dtype, net, sigma_min)
        self.metadata = metadata
        self.sigma_max = float(sigma_max)

    def forward(self, state: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        self.check(state, "state")
        self.check_noise(noise, state, 1)
        x0 = state.to(self.state_mean.dtype).contiguous()  # a Fortran-ordered view computes the same
        noise = noise.to(x0.dtype).contiguous()
        cond = self.condition((x0 - self.state_mean) / self.state_std)
        s = torch.full([x0.size(0)], self.sigma_max, dtype=x0.dtype, device=x0.device)
        inc = self.consistency(noise[0] * self.sigma_max, s, cond)
        return self.smooth(x0 + self.inc_mean + self.inc_std * inc).to(state.dtype)


def _metadata(ckpt: Checkpoint, what: str, dtype: str, sampler: dict | None) -> dict:
    """The module's self-description; `sampler` is the step module's settings (None for the others)."""
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
        if sampler["kind"] == "single_step":
            draws, used = 1, [0]
            convention = ("noise[0]: the one draw; increment = f(sigma_max * noise[0], sigma_max | state), one "
                          "call of the consistency network")
        else:
            draws = sampler["steps"] + 1
            used = [0] + ([k + 1 for k in range(sampler["steps"])] if sampler["churn"] > 0 else [])
            convention = ("noise[0]: initial draw x0 = sigma_max * noise[0]; noise[i+1]: churn of Heun step i "
                          "(read only when churn > 0)")
        meta["inputs"] = [
            {"name": "state", "shape": ["member", nvar, ny, nx], "units": [u for _, u, _ in ckpt.variables]},
            {"name": "noise", "shape": [draws, "member", nvar, ny, nx], "units": "1",
             "distribution": "independent standard normal", "convention": convention, "indices_read": used}]
        meta["outputs"] = [{"name": "next_state", "shape": ["member", nvar, ny, nx],
                            "units": [u for _, u, _ in ckpt.variables],
                            "valid_time": f"input time + {ckpt.dt_seconds:g} s"}]
        meta["sampler"] = sampler
        meta["smoothing_order"] = ckpt.smoothing_order
        meta["smoothing"] = ("Shapiro filter of this order after the step along periodic axes: x <- x - "
                             "(-delta^2/4)^(order/2) x per axis, y first (0: none)")
    else:
        meta["inputs"] = [
            {"name": "x", "shape": ["batch", nvar, ny, nx], "units": "1 (standardised increment + noise)"},
            {"name": "sigma", "shape": ["batch"], "units": "1 (standardised)"},
            {"name": "cond", "shape": ["batch", nvar, ny, nx], "units": "1: (state - state_mean) / state_std"}]
        meta["outputs"] = [{"name": "denoised" if what == "denoiser" else "consistent",
                            "shape": ["batch", nvar, ny, nx], "units": "1 (standardised increment)"}]
        if what == "consistency":
            meta["consistency"] = {"sigma_min": ckpt.single_step["sigma_min"],
                                   "sigma_max": ckpt.single_step["sigma_max"],
                                   "sample": "f(sigma_max * z, sigma_max | cond), z standard normal, is one "
                                             "standardised increment"}
    return meta


def build_module(checkpoint_path: str | os.PathLike, *, what: str = "step", sampler: str = "heun",
                 dtype: str = "float32", steps: int | None = None, sigma_min: float | None = None,
                 sigma_max: float | None = None, rho: float | None = None,
                 churn: float | None = None) -> tuple[torch.jit.ScriptModule, dict]:
    """The scripted module and its metadata (not written); see `export_checkpoint`."""
    if what not in WHATS:
        raise ExportError(f"export: what must be one of {', '.join(WHATS)}, not {what!r}")
    if sampler not in SAMPLERS:
        raise ExportError(f"export: sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")
    if dtype not in DTYPES:
        raise ExportError(f"export: dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    options = dict(zip(HEUN_OPTIONS, (steps, sigma_min, sigma_max, rho, churn)))
    given = [k for k, v in options.items() if v is not None]
    if sampler == "single_step" and given:
        raise ExportError(f"export: the single_step sampler takes no {', '.join(given)} (heun options; its "
                          "noise levels come from the checkpoint)")
    heun = {k: (int if k == "steps" else float)(getattr(_SAMPLER, k) if v is None else v)
            for k, v in options.items()}
    if heun["steps"] < 1 or not 0 < heun["sigma_min"] < heun["sigma_max"] or heun["rho"] <= 0 or heun["churn"] < 0:
        raise ExportError("export: need steps >= 1, 0 < sigma_min < sigma_max, rho > 0, churn >= 0")
    ckpt = load_checkpoint(checkpoint_path)
    single = what == "consistency" or (what == "step" and sampler == "single_step")
    net = ckpt.build_single_step_network() if single else ckpt.build_network()
    if what != "step":
        settings = None
    elif single:
        settings = {"kind": "single_step", "sigma_min": ckpt.single_step["sigma_min"],
                    "sigma_max": ckpt.single_step["sigma_max"], "network_calls": 1}
    else:
        settings = {"kind": "heun", **heun, "network_calls": 2 * heun["steps"] - 1}
    meta = _metadata(ckpt, what, dtype, settings)
    text, torch_dtype = json.dumps(meta, indent=1), DTYPES[dtype]
    with torch.no_grad(), _quiet():
        if what == "denoiser":
            module: nn.Module = DenoiserModule(ckpt, torch_dtype, net, text)
        elif what == "consistency":
            module = ConsistencyModule(ckpt, torch_dtype, net, text, ckpt.single_step["sigma_min"])
        elif single:
            module = SingleStepModule(ckpt, torch_dtype, net, text, ckpt.single_step["sigma_min"],
                                      ckpt.single_step["sigma_max"])
        else:
            module = StepModule(ckpt, torch_dtype, net, text, **heun)
        return torch.jit.script(module.eval()), meta


def export_checkpoint(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike, *, what: str = "step",
                      sampler: str = "heun", dtype: str = "float32", steps: int | None = None,
                      sigma_min: float | None = None, sigma_max: float | None = None, rho: float | None = None,
                      churn: float | None = None) -> Path:
    """Write CHECKPOINT as TorchScript to `out_path` (+ sidecar `out_path.json`); returns `out_path`.

    `sampler` picks the step module's sampler; the Heun options (None: the emulator's defaults) are
    refused with `sampler="single_step"`, whose noise levels come from the checkpoint.
    Atomic: both files go to temporary names in the target folder first and are renamed only when
    complete (the .json before the .pt, so a .pt always has its sidecar); a failure leaves neither.
    """
    out = Path(out_path)
    if out.is_dir():
        raise ExportError(f"{out}: is a folder (give a file name such as {out / 'model.pt'})")
    module, meta = build_module(checkpoint_path, what=what, sampler=sampler, dtype=dtype, steps=steps,
                                sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, churn=churn)
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
