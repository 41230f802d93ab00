"""`DiffusionEmulator` (`kind: diffusion`): a learned forecast model that samples the next state.

One step of Δ seconds (the checkpoint's `dt_seconds`): standardise the state per variable, sample the
standardised Δ-increment conditioned on the standardised state (and static channels) — by the EDM
stochastic Heun sampler (`heun`, 2N − 1 denoiser calls) or by one call of the distilled, CRPS-tuned
consistency network (`single_step`, f(σ_max z, σ_max)) — then x(t + Δ) = x(t) + inc_mean + inc_std · increment.
Predicting the increment rather than the state keeps the target small and near σ_d = 1, and makes
persistence the zero of the network. A checkpoint with a regression network R of the increment's mean
(`emulators.diffusion.regression`) samples only the residual: increment = R(x) + residual_std · sample;
R reads the same padded condition, so it tiles, wraps and exchanges halos with the denoiser.

Locality: the network consumes a halo of `receptive_halo` points and needs tiles aligned to
`alignment` points; each denoiser evaluation exchanges a halo of `halo` points through the domain
object (receptive_halo plus the largest alignment slack of any rank's subdomain: one width for all
ranks, as neighbours exchange equal strips), over several hops where a subdomain is thinner than that,
so every rank always samples its own subdomain. A process that holds a whole doubly periodic grid
exchanges nothing: the network wraps its convolutions instead (`UNetLite.wrap`, the same function).
Noise comes from `Streams(seed).normal_stream("sampler", (step, sub_step, member))` at positions
variable · grid.size + global flat index, so members draw independent noise and a subdomain reads the
serial run's numbers. The network runs in the run's dtype (float32 or float64).

`symmetries: members` conjugates member m's step by an exact symmetry g of the truth system
(`SQG.symmetry`: mirrors and lid swaps that map the attractor onto itself): x ↦ g⁻¹ f(g x), g cycling
through the group with the global member index. The network is not equivariant, so its errors differ
between the variants: the members form a multi-model ensemble at no extra cost, and part of the error
they would share becomes spread (SQG, v6: 12 h ensemble-mean RMSE 1.44 → 1.35 K, CRPS −8 %).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from emulators.base import Variable
from emulators.diffusion.checkpoint import SHIPPED_SQG, Checkpoint, CheckpointMismatch, load_checkpoint
from emulators.diffusion.consistency import ConsistencyPrecond
from emulators.diffusion.edm import Precond, heun_sample
from emulators.diffusion.smoothing import shapiro, shapiro_halo
from emulators.registry import model_registry, register_model
from twin.domain import Decomposition, Grid
from twin.random import Streams, fill_rows

SAMPLERS = ("heun", "single_step")
SYMMETRIES = ("none", "members")


def static_fields(names: tuple[str, ...], shape: tuple[int, int], y_range: tuple[int, int],
                  x_range: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Static channels (len(names), ny', nx') on global index ranges [y0, y1) x [x0, x1), which may
    reach past the grid (periodic wrap): cos/sin of 2π · index / size along y or x."""
    ny, nx = shape
    y = torch.arange(*y_range).remainder(ny).double() * (2 * math.pi / ny)
    x = torch.arange(*x_range).remainder(nx).double() * (2 * math.pi / nx)
    out = []
    for name in names:
        trig, axis = name.split("_")
        vals = (torch.cos if trig == "cos" else torch.sin)(y if axis == "y" else x)
        out.append(vals[:, None].expand(len(y), len(x)) if axis == "y" else vals[None, :].expand(len(y), len(x)))
    return torch.stack(out).to(dtype) if out else torch.empty((0, len(y), len(x)), dtype=dtype)


@register_model("diffusion")
class DiffusionEmulator:
    """A score-based (EDM) emulator loaded from a checkpoint; time unit: seconds."""

    @dataclass(frozen=True)
    class Config:
        checkpoint: str = field(default=SHIPPED_SQG, metadata={
            "help": "checkpoint file (a bare name is also looked up in emulators/weights/)"})
        sampler: str = field(default="heun", metadata={
            "help": "heun: EDM stochastic Heun, 2N - 1 network calls; single_step: the distilled, CRPS-tuned "
                    "consistency sampler, one call"})
        steps: int = field(default=18, metadata={"min": 1, "help": "Heun steps N (single_step ignores it)"})
        sigma_min: float = field(default=0.002, metadata={"gt": 0, "help": "smallest noise level"})
        sigma_max: float = field(default=20.0, metadata={"gt": 0, "help": "largest noise level (standardised units)"})
        rho: float = field(default=7.0, metadata={"gt": 0, "help": "schedule exponent"})
        churn: float = field(default=0.0, metadata={"min": 0, "help": "S_churn (γ = min(churn/N, √2 − 1))"})
        seed: int = field(default=0, metadata={"help": "seed of the sampler's noise streams"})
        inpaint_levels: tuple[float, ...] = field(default=(20.0, 6.0, 2.0, 0.6, 0.15), metadata={
            "help": "noise levels (decreasing) of learned inpainting: one network call each"})
        smoothing_order: int | None = field(default=None, metadata={
            "help": "Shapiro filter of this even order after each step, along periodic axes (0: none; "
                    "null: the checkpoint's, which it was trained with)"})
        symmetries: str = field(default="none", metadata={
            "help": "members: member m steps as g⁻¹ f(g x), g the (m mod G)-th exact symmetry of the truth "
                    "model the checkpoint learned (SQG: G = 8 mirrors and lid swaps), so the members differ by "
                    "model variant too and part of the network's systematic error becomes spread; none: f(x)"})
        symmetry_mean: int = field(default=1, metadata={
            "min": 1, "help": "symmetries: members: each member's step is the mean of this many conjugated "
                              "samples (g_m, g_(m+G/k), ...; k divides G; k network calls), which trims the "
                              "spread the variants add (SQG: 2 keeps spread/skill near 1, 12 h error -12 %)"})
        residual_scale: float = field(default=1.0, metadata={
            "min": 0, "help": "checkpoints with a regression: the sampled residual is scaled by this (1: as "
                              "trained; < 1 trims an overdispersive ensemble toward the regression's mean)"})

    time_unit_seconds = 1.0

    def __init__(self, config: "DiffusionEmulator.Config", domain: Decomposition, dtype: torch.dtype = torch.float64):
        self.validate(config)
        ckpt = load_checkpoint(config.checkpoint)
        if tuple(domain.grid.shape) != ckpt.grid_shape:
            raise CheckpointMismatch(f"{ckpt.path}: trained on a {ckpt.grid_shape} grid, this domain is "
                                     f"{tuple(domain.grid.shape)}")
        self.config, self.domain, self.grid, self.dtype, self.ckpt = config, domain, domain.grid, dtype, ckpt
        self.dt = ckpt.dt_seconds
        self.variables = tuple(Variable(*v) for v in ckpt.variables)
        if config.sampler == "single_step":
            self.model = ConsistencyPrecond(ckpt.build_single_step_network().to(dtype), ckpt.sigma_data,
                                            ckpt.single_step["sigma_min"])
        else:
            self.model = Precond(ckpt.build_network().to(dtype), ckpt.sigma_data)
        self.regression = ckpt.build_regression()
        if self.regression is not None:
            self.regression = self.regression.to(dtype)
        if config.residual_scale != 1.0 and self.regression is None:
            raise CheckpointMismatch(f"{ckpt.path}: residual_scale {config.residual_scale} needs a "
                                     "checkpoint with a regression; this one has none")
        self.residual_std = torch.tensor(ckpt.residual_std(), dtype=dtype).view(-1, 1, 1)
        self.receptive_halo = self.model.net.receptive_halo
        self.alignment = self.model.net.alignment
        self.streams = Streams(config.seed)
        stat = {k: torch.tensor(v, dtype=dtype).view(-1, 1, 1) for k, v in ckpt.stats.items()}
        self.mean, self.std, self.inc_mean, self.inc_std = (stat[k] for k in ("state_mean", "state_std",
                                                                               "inc_mean", "inc_std"))
        # one halo width for all ranks (neighbours must exchange equal strips): the largest need
        width = max(domain.allgather_object(self._need(domain.local_slices)))
        # this rank holds the whole doubly periodic, aligned grid: wrapping convolutions replace the halo
        # (the same function, ~1.7x faster: no ring of halo points computed and thrown away)
        whole = all(s.start == 0 and s.stop == n for s, n in zip(domain.local_slices, self.grid.shape))
        self.wrap = whole and self.model.net.can_wrap(self.grid.shape, self.grid.periodic)
        self.model.net.wrap = self.wrap
        if self.regression is not None:
            self.regression.net.wrap = self.wrap
        self._local = self._plan(domain.local_slices, 0 if self.wrap else width)
        self.halo = 0 if self.wrap else width
        order = config.smoothing_order
        self.smoothing_order = ckpt.smoothing_order if order is None else order
        self.symmetry = self._symmetry(config, ckpt)
        if self.symmetry is not None and not whole:
            raise ValueError("symmetries: members needs whole fields on every rank (the symmetries mirror and "
                             "shift the grid): split the members across ranks, not the grid")

    @staticmethod
    def validate(config: "DiffusionEmulator.Config") -> None:
        """Checks that need no domain: the sampler kind and that the checkpoint loads."""
        levels = config.inpaint_levels
        if not levels or min(levels) <= 0 or any(a <= b for a, b in zip(levels, levels[1:])):
            raise ValueError(f"inpaint_levels must be positive and decreasing (got {list(levels)})")
        if config.sampler not in SAMPLERS:
            raise ValueError(f"sampler {config.sampler!r} is not available (one of: {', '.join(SAMPLERS)})")
        if config.symmetries not in SYMMETRIES:
            raise ValueError(f"symmetries {config.symmetries!r} is not available "
                             f"(one of: {', '.join(SYMMETRIES)})")
        if config.smoothing_order is not None:
            shapiro_halo(config.smoothing_order)
        ckpt = load_checkpoint(config.checkpoint)
        if config.sampler == "single_step":
            ckpt.build_single_step_network()
        DiffusionEmulator._symmetry(config, ckpt)

    @staticmethod
    def _symmetry(config: "DiffusionEmulator.Config", ckpt: Checkpoint
                  ) -> tuple[int, Callable[[int, torch.Tensor], torch.Tensor]] | None:
        """(group size G, g(index, fields)) of the truth model's symmetries for `symmetries: members`;
        checks what needs no domain (the truth model declares symmetries, symmetry_mean divides G)."""
        if config.symmetries == "none":
            if config.symmetry_mean != 1:
                raise ValueError("symmetry_mean needs symmetries: members")
            return None
        kind = ckpt.training.get("truth_model")
        truth = model_registry.get(kind) if isinstance(kind, str) else None
        if truth is None or not hasattr(truth, "symmetry"):
            raise ValueError(f"{ckpt.path}: symmetries: members needs the symmetries of the model the "
                             f"checkpoint learned; it was trained on {kind or 'archive data'}, which declares none")
        if truth.symmetry_count % config.symmetry_mean:
            raise ValueError(f"symmetry_mean {config.symmetry_mean} must divide the {kind} model's "
                             f"{truth.symmetry_count} symmetries")
        return truth.symmetry_count, truth.symmetry

    @staticmethod
    def global_grid(config: "DiffusionEmulator.Config") -> Grid:
        ckpt = load_checkpoint(config.checkpoint)
        return Grid(shape=ckpt.grid_shape, periodic=ckpt.periodic, dims=("y", "x"), units="1")

    # ------------------------------------------------------------ geometry

    def _slack(self, slices: tuple[slice, ...]) -> tuple[list[int], list[int]]:
        """Points from each subdomain edge out to the next `alignment` boundary (below, above)."""
        a = self.alignment
        return [s.start - (s.start // a) * a for s in slices], [-(-s.stop // a) * a - s.stop for s in slices]

    def _need(self, slices: tuple[slice, ...]) -> int:
        lo, hi = self._slack(slices)
        return self.receptive_halo + max(lo + hi)

    def _plan(self, slices: tuple[slice, ...], width: int) -> tuple[int, tuple[slice, ...], tuple[slice, ...],
                                                                    torch.Tensor]:
        """(halo width to exchange, slices of the padded array that form the network's input window,
        slices of the window's interior that are this subdomain, static channels on the window).
        The window is the subdomain grown to `alignment` boundaries, plus the receptive halo."""
        h = self.model.net.input_halo
        lo, hi = self._slack(slices)
        read = tuple(slice(width - h - l, width + (s.stop - s.start) + u + h) for s, l, u in zip(slices, lo, hi))
        keep = tuple(slice(l, l + s.stop - s.start) for s, l in zip(slices, lo))
        ranges = [(s.start - l - h, s.stop + u + h) for s, l, u in zip(slices, lo, hi)]
        static = static_fields(self.ckpt.static, self.ckpt.grid_shape, ranges[0], ranges[1], self.dtype)
        return width, read, keep, static

    # ------------------------------------------------------------ stepping

    def initial_state(self, noise: torch.Tensor) -> torch.Tensor:
        """Climatological draw mean + std · noise per variable (for a truth run of the emulator)."""
        return self.mean + self.std * noise.to(self.dtype)

    member_keyed = True  # step() takes `first_member`: the twin passes it when ranks split the members

    def step(self, ens: torch.Tensor, t: float = 0.0, first_member: int = 0) -> torch.Tensor:
        """Advance every member (member, variable, y, x) by Δ = `dt` seconds; round(t / Δ) keys the noise,
        and member m of `ens` draws global member first_member + m's numbers."""
        key = int(round(t / self.dt))
        if self.symmetry is None:
            return self._sample(ens.to(self.dtype), key, first_member).to(ens.dtype)
        count, g = self.symmetry
        k = self.config.symmetry_mean
        x, samples = ens.to(self.dtype), []
        for j in range(k):  # conjugate j draws its own noise (j = 0: the numbers of k = 1)
            index = [(first_member + m + j * count // k) % count for m in range(len(x))]
            conjugate = lambda z: torch.stack([g(i, zm) for i, zm in zip(index, z)])  # noqa: E731
            samples.append(conjugate(self._sample(conjugate(x), key, first_member, j)))
        return torch.stack(samples).mean(0).to(ens.dtype)

    @torch.no_grad()
    def _sample(self, x: torch.Tensor, key: int, first_member: int = 0, variant: int = 0) -> torch.Tensor:
        width, read, keep, static = self._local
        members = x.shape[0]

        def pad(z: torch.Tensor, h: int = 0) -> torch.Tensor:
            return self.domain.exchange_halo(z, width)[(..., *read)]

        cond = torch.cat([pad((x - self.mean) / self.std), static.expand(members, *static.shape)], dim=1)

        def denoise(z: torch.Tensor, sigma: float) -> torch.Tensor:
            s = torch.full((members,), sigma, dtype=self.dtype)
            return self.model(z, s, cond, pad)[(..., *keep)]

        c = self.config
        noise = self._noise_fn(key, members, self.domain, first_member=first_member, variant=variant)
        if c.sampler == "single_step":
            sigma_max = self.ckpt.single_step["sigma_max"]
            inc = denoise(noise(0) * sigma_max, sigma_max)
        else:
            inc = heun_sample(denoise, noise, steps=c.steps, sigma_min=c.sigma_min, sigma_max=c.sigma_max,
                              rho=c.rho, churn=c.churn)
        inc = self._mean(cond, keep) + c.residual_scale * self.residual_std * inc
        return shapiro(x + self.inc_mean + self.inc_std * inc, self.smoothing_order, self.grid.periodic,
                       self.domain.exchange_halo)

    def _mean(self, cond: torch.Tensor, keep: tuple[slice, ...]) -> torch.Tensor | float:
        """The regression network's standardised increment on this subdomain (0 without one)."""
        return 0.0 if self.regression is None else self.regression(cond)[(..., *keep)]

    # ------------------------------------------------------------ learned inpainting

    def inpainter(self, previous: torch.Tensor, t: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A learned `Inpainter` for states one step Δ after `previous` (members' states at time t, the
        input of the last forecast step): `fill(field, known)` keeps `field` (member, variable, *local)
        where `known` (variable, *local) is True and fills the rest by RePaint-style sampling of the
        step's increment with the known part held fixed: at each level σ_k of `inpaint_levels`,
        predict the clean increment, overwrite its known part, re-noise to σ_{k+1}. Both levels of a
        2-level state are filled coherently, including a level with no known point. The predictions
        come from the EDM denoiser whichever the sampler: it is trained at every noise level, whereas
        the single-step network's CRPS tuning is at σ_max only (with it, v4 filled 19-88 % worse)."""
        key = int(round(t / self.dt))

        def fill(field: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
            return self._repaint(previous.to(self.dtype), field.to(self.dtype), known, key).to(field.dtype)

        return fill

    @functools.cached_property
    def denoiser(self) -> Precond:
        """The EDM denoiser: the Heun sampler's model, built on first use under the single-step one."""
        if isinstance(self.model, Precond):
            return self.model
        net = self.ckpt.build_network().to(self.dtype)
        net.wrap = self.wrap
        return Precond(net, self.ckpt.sigma_data)

    @torch.no_grad()
    def _repaint(self, previous: torch.Tensor, field: torch.Tensor, known: torch.Tensor,
                 key: int) -> torch.Tensor:
        width, read, keep, static = self._local
        members = previous.shape[0]

        def pad(z: torch.Tensor, h: int = 0) -> torch.Tensor:
            return self.domain.exchange_halo(z, width)[(..., *read)]

        cond = torch.cat([pad((previous - self.mean) / self.std), static.expand(members, *static.shape)], dim=1)
        mean = self._mean(cond, keep)
        target = ((field - previous - self.inc_mean) / self.inc_std - mean) / self.residual_std
        levels = self.config.inpaint_levels
        noise = self._noise_fn(key, members, self.domain, "repaint")
        x = noise(0) * levels[0]
        for k, sigma in enumerate(levels):
            clean = self.denoiser(x, torch.full((members,), sigma, dtype=self.dtype), cond, pad)[(..., *keep)]
            clean = torch.where(known, target, clean)
            if k + 1 < len(levels):
                x = clean + levels[k + 1] * noise(k + 1)
        return torch.where(known, field, previous + self.inc_mean + self.inc_std * (mean + self.residual_std * clean))

    def _noise_fn(self, key: int, members: int, domain: Decomposition, purpose: str = "sampler",
                  first_member: int = 0, variant: int = 0) -> Callable[[int], torch.Tensor]:
        """noise(k): standard normals (members, variables, *local) for sub-step k of step `key`, member m
        keyed as global member first_member + m (and `variant` > 0: the symmetry_mean's other draws)."""
        nvar, size, nx = len(self.variables), self.grid.size, self.grid.shape[1]
        ys, xs = domain.local_slices
        ly, lx = ys.stop - ys.start, xs.stop - xs.start

        def noise(k: int) -> torch.Tensor:
            extra = (variant,) if variant else ()
            streams = [self.streams.normal_stream(purpose, (key, k, first_member + m, *extra))
                       for m in range(members)]
            out = np.empty((nvar, members, ly, lx), dtype=np.float32)
            for v in range(nvar):
                if lx == nx:  # whole rows: one contiguous run of positions per member
                    fill_rows(streams, v * size + ys.start * nx, out[v].reshape(members, ly * lx))
                else:
                    for y in range(ly):
                        fill_rows(streams, v * size + (ys.start + y) * nx + xs.start, out[v, :, y])
            return torch.from_numpy(out).transpose(0, 1).to(self.dtype)

        return noise
