"""The Ensemble Score Filter (EnSF; Bao, Zhang, Tran et al. 2024): a training-free score-based filter.

Pseudo-time t ∈ [0, 1]: forward kernel z_t | z_0 ~ N(α_t z_0, β_t² I), α_t = 1 - (1 - ε_α) t,
β_t² = ε_β + (1 - ε_β) t, f = d log α_t/dt, g² = dβ_t²/dt - 2 f β_t². Prior score from the forecast
ensemble {x_j}: S(z, t) = -(z - α_t x̃)/β_t², x̃ = Σ_j w_j x_j with w = softmax_j(-‖z - α_t x_j‖²/(2β_t²))
over the whole state (`mixture`: one small all-reduce per pseudo-step), or x̃ = x_i for particle i
(`paired`, the authors' scripts: pointwise, no communication). Posterior score S + h(t) L(z),
L = ∇ log p(y|x) at x = z, h(t) = 1 - t. From z_1 ~ N(0, I) (the authors' start) Euler steps at
t_k = 1 - kΔt (k < N_t) of the reverse SDE z ← z - Δt [f z - g² S_post] + √Δt g ξ or of the
probability-flow ODE z ← z - Δt [f z - ½ g² S_post]; each is one affine map
    z ← a z + b x̃ + c L(z) + d ξ,   L clipped to ±score_clip (the authors: 1000).
`likelihood_step: implicit` instead applies c L/(1 + c h'²/σ²) after the rest of the step (a
Gauss–Newton sub-step: stiff-safe for small σ_o). The fast path (CPU, float32/64, the built-in
identity/subset/arctan operators) runs the step in cache-sized chunks of in-place numpy kernels;
other operators go through torch autograd on whole tensors.

Noise: member m's stream is keyed (seed, "filter", tag, cycle, m) and pseudo-step k (0 = z_1) reads
positions k·n + i at the *global* flat index i of (variable, *grid): any rank count draws the same
numbers. Unobserved points have L = 0: in the paired variant a particle there follows its own
member's kernel alone and ends near x_i plus noise of variance about ε_β (SDE), with no information
from observed neighbours (no cross-covariances); in the mixture variant only the whole-state weights
move them. Filling them is a separate (inpainting) stage's job. Masked points (`Grid.mask`) carry
the same fill in every member, so they add nothing to the mixture weights, and keep that fill.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch

from assim.inflation import relax_spread
from assim.inpainting import classic_fill
from assim.observations import ObservationBatch
from assim.obsspace import observed_points
from assim.operators import ArctanOperator, SubsetOperator
from assim.registry import register_stage
from assim.regression import regression_fill
from assim.stages import AnalysisContext, keep_masked
from twin.random import NormalStream, Streams, fill_rows

ENSF_TAG = 0x456E5346  # "EnSF": keeps these "filter" draws apart from other filters' draws
CHUNK_ELEMENTS = 1 << 18  # auto chunk: about this many ensemble values per chunk (fewer calls)
CACHED_ELEMENTS = 1 << 18  # ensembles up to this size (cache-resident) are swept in (members, points) blocks
_FAST = (SubsetOperator, ArctanOperator)
Term = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    """The forward kernel α_t, β_t² and the SDE coefficients f(t), g²(t)."""

    eps_alpha: float = 0.5
    eps_beta: float = 0.025

    def at(self, t: float) -> tuple[float, float, float, float]:
        """(α_t, β_t², f(t), g²(t))."""
        alpha = 1.0 - (1.0 - self.eps_alpha) * t
        beta2 = self.eps_beta + (1.0 - self.eps_beta) * t
        f = -(1.0 - self.eps_alpha) / alpha
        return alpha, beta2, f, (1.0 - self.eps_beta) - 2.0 * f * beta2


def step_coefficients(schedule: Schedule, steps: int, integrator: str = "sde",
                      damping: str = "linear") -> list[tuple[float, float, float, float, float, float]]:
    """Per pseudo-step (t, α_t, a, b, c, d) of  z ← a z + b x̃ + c L(z) + d ξ."""
    dt = 1.0 / steps
    gamma = 1.0 if integrator == "sde" else 0.5
    out = []
    for k in range(steps):
        t = 1.0 - k * dt
        alpha, beta2, f, g2 = schedule.at(t)
        h = 1.0 - t if damping == "linear" else 1.0
        q = dt * gamma * g2
        d = math.sqrt(dt * g2) if integrator == "sde" else 0.0
        out.append((t, alpha, 1.0 - dt * f - q / beta2, q * alpha / beta2, q * h, d))
    return out


# ---------------------------------------------------------------- likelihood scores

def likelihood_score(z: torch.Tensor, obs: ObservationBatch) -> torch.Tensor:
    """∇_z log p(y | z) by autograd through any operator; z (..., variable, *grid), same shape out."""
    y = obs.values.to(z.dtype)
    prec = obs.error_std.to(z.dtype).square().reciprocal()
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        loss = -0.5 * ((y - obs.operator(zz)).square() * prec).sum()
        (grad,) = torch.autograd.grad(loss, zz)
    return grad


def _scatter(op: SubsetOperator, z: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Sum per-observation values (..., n_obs) onto the observed flat indices of z (..., variable, *grid)."""
    nd = op.grid.ndim + 1
    out = torch.zeros_like(z).flatten(-nd)
    out.index_add_(-1, op.flat_index, values.expand(out.shape[:-1] + values.shape[-1:]).contiguous())
    return out.view(z.shape)


def analytic_likelihood_score(z: torch.Tensor, obs: ObservationBatch) -> torch.Tensor:
    """∇_z log p(y | z) for the built-in identity/subset and arctan operators: the scatter of
    (y - h(x))/σ² · h'(x) onto the observed flat indices of (variable, *grid)."""
    op = obs.operator
    if type(op) not in _FAST:
        raise TypeError(f"no analytic score for {type(op).__name__}; use likelihood_score")
    resid = (obs.values.to(z.dtype) - op(z)) * obs.error_std.to(z.dtype).square().reciprocal()
    if type(op) is ArctanOperator:
        resid = resid / (1.0 + op.select(z).square())
    return _scatter(op, z, resid)


def likelihood_curvature(z: torch.Tensor, obs: ObservationBatch) -> torch.Tensor:
    """Gauss–Newton diagonal Σ_k h_k'(x)²/σ_k² of -∇² log p(y|x) for the built-in operators."""
    op = obs.operator
    if type(op) not in _FAST:
        raise ValueError(f"ensf: likelihood_step implicit needs the identity/subset or arctan operator, "
                         f"not {type(op).__name__}")
    curv = obs.error_std.to(z.dtype).square().reciprocal()
    if type(op) is ArctanOperator:
        curv = curv / (1.0 + op.select(z).square()).square()
    return _scatter(op, z, curv)


@dataclass
class _Dense:
    """Observations as per-state-point arrays for the fast path: L = (wy - w h(z)) h'(z).

    With every point observed at one precision `w` is None and `y` holds y itself (w folded into c).
    """

    arctan: bool
    y: np.ndarray
    w: np.ndarray | None
    w_scalar: float

    def term(self, z: np.ndarray, p0: int, out: np.ndarray, tmp: np.ndarray, wbuf: np.ndarray, c: float,
             clip: float | None, implicit: bool) -> None:
        """out = c clip(L(z)), or clip(c L/(1 + c w h'²)) when implicit, for the chunk z (R, C) at p0."""
        size = z.shape[1]
        y = self.y[p0:p0 + size]
        w = None if self.w is None else self.w[p0:p0 + size]
        cw = c * self.w_scalar
        if self.arctan:
            np.arctan(z, out=out)
            if w is not None:
                out *= w
            np.subtract(y, out, out=out)
            np.multiply(z, z, out=tmp)
            tmp += 1.0  # 1/h'
            out /= tmp
        else:
            np.multiply(z, w, out=out) if w is not None else np.copyto(out, z)
            np.subtract(y, out, out=out)
        if not implicit:
            if clip is not None:
                np.clip(out, -clip / self.w_scalar, clip / self.w_scalar, out=out)
            out *= cw
            return
        if self.arctan:  # c L/(1 + c w h'²) = c L s²/(s² + c w) with s = 1/h'
            out *= cw
            tmp *= tmp
            out *= tmp
            if w is None:
                tmp += cw
            else:
                tmp += np.multiply(w, c, out=wbuf[:size])
            out /= tmp
        elif w is None:
            out *= cw / (1.0 + cw)
        else:
            out *= c
            np.multiply(w, c, out=wbuf[:size])
            wbuf[:size] += 1.0
            out /= wbuf[:size]
        if clip is not None:  # the same bound on the increment as the explicit step's
            np.clip(out, -c * clip, c * clip, out=out)


def _dense(obs: ObservationBatch, positions: np.ndarray, keep: np.ndarray, n: int, dtype: np.dtype) -> _Dense:
    prec = obs.error_std.double().square().reciprocal().numpy()[keep]
    y = obs.values.double().numpy()[keep]
    w = np.bincount(positions, weights=prec, minlength=n)
    wy = np.bincount(positions, weights=prec * y, minlength=n)
    arctan = type(obs.operator) is ArctanOperator
    if n and w.min() > 0 and w.min() == w.max():
        return _Dense(arctan, (wy / w).astype(dtype), None, float(w[0]))
    return _Dense(arctan, wy.astype(dtype), w.astype(dtype), 1.0)


# ---------------------------------------------------------------- noise and layout

class _Noise:
    """Member m's keyed stream; pseudo-step k reads positions k·n_global + global flat index."""

    def __init__(self, streams: Streams, cycle: int, members: int, gidx: np.ndarray | None,
                 n_global: int) -> None:
        self.rows: list[NormalStream] = [streams.normal_stream("filter", (ENSF_TAG, cycle, m))
                                         for m in range(members)]
        self.n_global = n_global
        if gidx is None:
            self.runs = [(0, 0, n_global)]
        else:  # runs of consecutive global indices: (local start, global start, length)
            cut = np.flatnonzero(np.diff(gidx) != 1) + 1
            starts = np.concatenate([[0], cut])
            stops = np.concatenate([cut, [len(gidx)]])
            self.runs = [(int(a), int(gidx[a]), int(b - a)) for a, b in zip(starts, stops)]

    def fill(self, k: int, out: np.ndarray, p0: int, scale: float, members: slice = slice(None)) -> None:
        """out (R, C) = scale · the normals of pseudo-step k, members[r], local points p0 .. p0+C-1."""
        p1 = p0 + out.shape[1]
        rows = self.rows[members]
        for l0, g0, length in self.runs:
            a, b = max(p0, l0), min(p1, l0 + length)
            if a < b:
                fill_rows(rows, k * self.n_global + g0 + a - l0, out[:, a - p0:b - p0], scale)


def _layout(ens: torch.Tensor, ctx: AnalysisContext) -> tuple[np.ndarray | None, int]:
    """Global flat indices of the local state (None when the state is the whole grid) and the global size."""
    n_var = ens.shape[1]
    grid = ctx.grid
    if tuple(ens.shape[2:]) == tuple(grid.shape):
        return None, n_var * grid.size
    local = ctx.domain.local_flat_indices().numpy().astype(np.int64)
    gidx = (np.arange(n_var, dtype=np.int64)[:, None] * grid.size + local[None]).reshape(-1)
    return gidx, n_var * grid.size


def _observed_positions(op: SubsetOperator, gidx: np.ndarray | None,
                        n_global: int) -> tuple[np.ndarray, np.ndarray]:
    """Local state positions of the observed flat indices and the mask of observations held here."""
    flat = op.flat_index.numpy().astype(np.int64)
    if gidx is None:
        return flat, np.ones(flat.shape, dtype=bool)
    inv = np.full(n_global, -1, dtype=np.int64)
    inv[gidx] = np.arange(len(gidx))
    pos = inv[flat]
    keep = pos >= 0
    return pos[keep], keep


# ---------------------------------------------------------------- the stage

def _check(cfg: "Ensf.Config") -> None:
    def number(key: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"ensf: {key} must be a finite number, got {value!r}")
        return float(value)

    if not 0.0 < number("eps_alpha", cfg.eps_alpha) <= 1.0:
        raise ValueError(f"ensf: eps_alpha must be in (0, 1], got {cfg.eps_alpha!r}")
    if not 0.0 <= number("eps_beta", cfg.eps_beta) <= 1.0:
        raise ValueError(f"ensf: eps_beta must be in [0, 1], got {cfg.eps_beta!r}")
    for key, value in (("steps", cfg.steps), ("chunk_size", cfg.chunk_size)):
        if key == "chunk_size" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"ensf: {key} must be a positive integer, got {value!r}")
    for key, value, choices in (("variant", cfg.variant, ("paired", "mixture")),
                                ("integrator", cfg.integrator, ("sde", "ode")),
                                ("damping", cfg.damping, ("linear", "none")),
                                ("start", cfg.start, ("standard", "kernel")),
                                ("likelihood_step", cfg.likelihood_step, ("explicit", "implicit"))):
        if value not in choices:
            raise ValueError(f"ensf: {key} must be one of {', '.join(choices)}, got {value!r}")
    if cfg.score_clip is not None and not number("score_clip", cfg.score_clip) > 0:
        raise ValueError(f"ensf: score_clip must be > 0 or null, got {cfg.score_clip!r}")
    if cfg.kernel == "spread" and cfg.likelihood_step != "implicit":
        raise ValueError("ensf: kernel: spread needs likelihood_step: implicit (in spread units the "
                         "likelihood is stiff wherever σ_o is small against the prior spread)")
    if cfg.unobserved == "regression" and cfg.localization_radius is None:
        raise ValueError("ensf: unobserved: regression needs localization_radius")


@register_stage("ensf")
class Ensf:
    """EnSF stage: prior score from the forecast ensemble, likelihood score from the observations."""

    @dataclass(frozen=True)
    class Config:
        eps_alpha: float = field(default=0.5, metadata={
            "gt": 0, "max": 1, "help": "α at t = 1: α_t = 1 - (1 - ε_α) t"})
        eps_beta: float = field(default=0.025, metadata={
            "min": 0, "max": 1, "help": "β² at t = 0: β_t² = ε_β + (1 - ε_β) t"})
        steps: int = field(default=200, metadata={
            "min": 1, "help": "pseudo-time steps N_t (Euler, t = 1 → 0)"})
        variant: Literal["paired", "mixture"] = field(default="paired", metadata={
            "help": "paired: particle i uses member i (pointwise); mixture: softmax-weighted ensemble score"})
        integrator: Literal["sde", "ode"] = field(default="sde", metadata={
            "help": "reverse SDE (Euler-Maruyama) or probability-flow ODE (½ g², noise only at t = 1)"})
        damping: Literal["linear", "none"] = field(default="linear", metadata={
            "help": "likelihood damping h(t): linear = 1 - t, none = 1"})
        score_clip: float | None = field(default=1000.0, metadata={
            "help": "clip the likelihood score to ±value (implicit: the increment to ±c·value); null: none"})
        likelihood_step: Literal["explicit", "implicit"] = field(default="explicit", metadata={
            "help": "explicit (the authors') or implicit: c L/(1 + c h'^2/σ²) after the rest (stiff-safe)"})
        start: Literal["standard", "kernel"] = field(default="standard", metadata={
            "help": "z_1 ~ N(0, I) (the authors') or the forward kernel N(α_1 x_i, β_1² I)"})
        unobserved: Literal["keep", "harmonic", "biharmonic", "regression"] = field(default="keep", metadata={
            "help": "points without observations: keep the EnSF result, or fill the increment there by "
                    "harmonic/biharmonic inpainting of the observed increments (variables with no "
                    "observations keep the prior), or by the prior ensemble's localised regression of them "
                    "(needs localization_radius; updates unobserved variables too)"})
        kernel: Literal["absolute", "spread"] = field(default="absolute", metadata={
            "help": "absolute: eps_beta in state units squared (the authors'); spread: run in units of each "
                    "point's prior ensemble spread, so eps_beta is the share of the prior variance a particle's "
                    "kernel keeps and the pointwise gain is about eps_beta s²/(eps_beta s² + σ_o²) "
                    "(observations of state values only)"})
        rtps: float = field(default=0.0, metadata={
            "min": 0.0, "max": 1.0, "help": "relax the analysis spread towards the prior's, pointwise (RTPS)"})
        localization_radius: float | None = field(default=None, metadata={
            "gt": 0.0, "help": "unobserved: regression: distance where the Gaspari-Cohn taper is exp(-1/2)"})
        regression_ridge: float = field(default=1e-8, metadata={
            "gt": 0.0, "help": "unobserved: regression: ridge added to the observed prior covariance, as a "
                               "fraction of its mean variance (~0.1 damps its poorly sampled directions)"})
        chunk_size: int | None = field(default=None, metadata={
            "help": "state points per chunk of the fast path (null: about 262144 values / members)"})

    def __init__(self, config: "Ensf.Config") -> None:
        _check(config)
        self.config = config
        self.schedule = Schedule(float(config.eps_alpha), float(config.eps_beta))
        self.coefficients = step_coefficients(self.schedule, config.steps, config.integrator, config.damping)
        self.fast_kernels = True  # False: the whole-tensor torch path with autograd everywhere (checks)

    def __call__(self, ens: torch.Tensor, obs: ObservationBatch, ctx: AnalysisContext) -> torch.Tensor:
        cfg = self.config
        if cfg.kernel == "spread":
            if not isinstance(obs.operator, SubsetOperator) or isinstance(obs.operator, ArctanOperator):
                raise ValueError("ensf: kernel: spread needs observations of state values (identity or subset)")
            mean = ens.mean(0, keepdim=True)
            spread = ens.std(0, keepdim=True).clamp_min(torch.finfo(ens.dtype).tiny ** 0.5)
            sel_mean, sel_spread = obs.operator.select(mean)[0], obs.operator.select(spread)[0]
            scaled = dataclasses.replace(obs, values=(obs.values - sel_mean) / sel_spread,
                                         error_std=obs.error_std / sel_spread)
            analysis = mean + spread * self._analyse((ens - mean) / spread, scaled, ctx)
        else:
            analysis = self._analyse(ens, obs, ctx)
        if cfg.unobserved == "regression":
            analysis = regression_fill(ens, analysis, obs, ctx, float(cfg.localization_radius),
                                       float(cfg.regression_ridge))
        elif cfg.unobserved != "keep":
            analysis = fill_unobserved(ens, analysis, obs, ctx, cfg.unobserved)
        if cfg.rtps:
            analysis = relax_spread(ens, analysis, cfg.rtps)
        return keep_masked(ens, analysis, ctx)  # masked points (no likelihood term) keep their fill

    def _analyse(self, ens: torch.Tensor, obs: ObservationBatch, ctx: AnalysisContext) -> torch.Tensor:
        """The reverse-SDE/ODE analysis of every point (unobserved points follow the prior score only)."""
        cfg = self.config
        shape, n_members = ens.shape, ens.shape[0]
        x = ens.detach().reshape(n_members, -1).contiguous()
        n = x.shape[1]
        gidx, n_global = _layout(ens, ctx)
        fast = (self.fast_kernels and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
                and type(obs.operator) in _FAST)
        noise = _Noise(ctx.streams, ctx.cycle, n_members, gidx, n_global)
        z = torch.empty_like(x) if fast else torch.empty_like(x, device="cpu", dtype=torch.float32)
        noise.fill(0, z.numpy(), 0, 1.0)  # z_1 ~ N(0, I)
        z = z.to(x)
        if cfg.start == "kernel":
            alpha1, beta2_1 = self.schedule.at(1.0)[:2]
            z.mul_(math.sqrt(beta2_1)).add_(x, alpha=alpha1)
        mix = _Mixture(x, ctx) if cfg.variant == "mixture" else None
        if fast:
            pos, keep = _observed_positions(obs.operator, gidx, n_global)
            dense = _dense(obs, pos, keep, n, x.numpy().dtype) if obs.size else None
            self._run_fast(z, x, dense, noise, mix)
        else:
            def term(state: torch.Tensor, c: float) -> torch.Tensor:
                """c L(z), clipped; divided by 1 + c κ(z) when implicit."""
                lik = likelihood_score(state.view(shape), obs).view(n_members, -1)
                bound = cfg.score_clip
                if cfg.likelihood_step == "implicit":
                    curv = likelihood_curvature(state.view(shape), obs).view(n_members, -1)
                    lik.mul_(c).div_(curv.mul_(c).add_(1.0))
                    return lik.clamp_(-c * bound, c * bound) if bound is not None else lik
                return (lik.clamp_(-bound, bound) if bound is not None else lik).mul_(c)
            self._run_generic(z, x, term if obs.size else None, noise, mix)
        return z.view(shape)

    def _run_fast(self, z: torch.Tensor, x: torch.Tensor, dense: _Dense | None, noise: _Noise,
                  mix: "_Mixture | None") -> None:
        """Chunked in-place numpy kernels, so the temporaries stay in cache.

        A small ensemble is one (members, n) block; a large one is swept in contiguous pieces of
        one member's row (chunk_size points), members innermost so the observations stay cached.
        """
        clip = self.config.score_clip
        n_members, n = z.shape
        if n * n_members <= CACHED_ELEMENTS:  # blocks of all members: fewer calls
            chunk, groups = max(1, CHUNK_ELEMENTS // n_members), [slice(0, n_members)]
        else:  # contiguous rows stream from memory best
            chunk, groups = CHUNK_ELEMENTS, [slice(m, m + 1) for m in range(n_members)]
        chunk = min(n, self.config.chunk_size or chunk)
        zn, xn = z.numpy(), x.numpy()
        rows = groups[0].stop - groups[0].start
        tbuf = np.empty((rows, chunk), dtype=zn.dtype)
        sbuf = np.empty_like(tbuf)
        wbuf = np.empty(chunk, dtype=zn.dtype)
        implicit = self.config.likelihood_step == "implicit"
        for k, (t, alpha, a, b, c, d) in enumerate(self.coefficients):
            xe = xn if mix is None else mix.mean(z, alpha, self.schedule.at(t)[1]).numpy()
            c = c if dense is not None else 0.0
            for p0 in range(0, n, chunk):
                p1 = min(n, p0 + chunk)
                tc, sc = tbuf[:, :p1 - p0], sbuf[:, :p1 - p0]
                for g in groups:
                    zc = zn[g, p0:p1]
                    if c and not implicit:  # explicit: L at the old z
                        dense.term(zc, p0, tc, sc, wbuf, c, clip, False)
                    zc *= a
                    np.multiply(xe[g, p0:p1], b, out=sc)
                    zc += sc
                    if d:
                        noise.fill(k + 1, sc, p0, d, g)
                        zc += sc
                    if c:  # implicit: a Gauss–Newton sub-step from the predicted z
                        if implicit:
                            dense.term(zc, p0, tc, sc, wbuf, c, clip, True)
                        zc += tc

    def _run_generic(self, z: torch.Tensor, x: torch.Tensor, term: Term | None, noise: _Noise,
                     mix: "_Mixture | None") -> None:
        """Whole-state torch updates with the autograd likelihood score (any operator, any device)."""
        nbuf = np.empty(tuple(z.shape), dtype=np.float32)
        implicit = self.config.likelihood_step == "implicit"
        for k, (t, alpha, a, b, c, d) in enumerate(self.coefficients):
            xe = x if mix is None else mix.mean(z, alpha, self.schedule.at(t)[1])
            lik = term(z, c) if (c and term is not None and not implicit) else None
            z.mul_(a).add_(xe, alpha=b)
            if d:
                noise.fill(k + 1, nbuf, 0, d)
                z.add_(torch.from_numpy(nbuf).to(z))
            if c and term is not None:
                z.add_(term(z, c) if implicit else lik)


class _Mixture:
    """x̃_i = Σ_j w_ij x_j with w_i = softmax_j(-‖z_i - α x_j‖² / (2β²)) over the whole state.

    ‖z_i‖² is the same for every j and cancels in the softmax, leaving (α z_i·x_j - α²‖x_j‖²/2)/β².
    The products are formed in float64 (sums over a 10^6-point state lose too much in float32) and
    summed over ranks: one all-reduce of an (N, N) array per pseudo-step.
    """

    def __init__(self, x: torch.Tensor, ctx: AnalysisContext) -> None:
        self.x = x
        self.x64 = x.double()
        self.domain = ctx.domain
        self.xx = ctx.domain.allreduce(self.x64.square().sum(1).cpu()).to(x.device)
        self.out = torch.empty_like(x)

    def mean(self, z: torch.Tensor, alpha: float, beta2: float) -> torch.Tensor:
        zx = self.domain.allreduce((z.double() @ self.x64.t()).cpu()).to(z.device)
        logits = zx.mul_(alpha / beta2).sub_(self.xx[None], alpha=alpha * alpha / (2.0 * beta2))
        weights = torch.softmax(logits, dim=1)
        return torch.mm(weights.to(self.x.dtype), self.x, out=self.out)


def fill_unobserved(prior: torch.Tensor, analysis: torch.Tensor, obs: ObservationBatch, ctx: AnalysisContext,
                    kind: str) -> torch.Tensor:
    """Prior + increment, where the increment at unobserved points is inpainted from the observed
    ones (Liang et al. 2025); a variable with no observation keeps the prior. The sparse solve is
    global: under MPI the increments are gathered to rank 0 and the result scattered."""
    grid, dom = ctx.grid, ctx.domain
    known = observed_points(obs, dom, prior.shape[1], grid.size)
    increment = dom.gather(analysis - prior)
    if increment is not None:
        for v in range(increment.shape[1]):
            if known[v].any():
                increment[:, v] = classic_fill(increment[:, v], known[v].reshape(grid.shape), grid, kind)
            else:
                increment[:, v] = 0.0
    return prior + dom.scatter(increment)
