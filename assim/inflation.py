"""Ensemble post-processing shared by the LETKF and EnKF: RTPP, RTPS, inflation, random rotation.

Everything works on *reduced anomalies*: with B an orthonormal (N, N-1) basis of the vectors whose
entries sum to zero (a Helmert basis), an ensemble E (N, ...) is `1 x̄ᵀ + B A'` with A' = Bᵀ E of
shape (N-1, ...). The reduced form is centred by construction (no mean to subtract) and needs one
matmul to go back to members, so the filters fold inflation and rotation into that matmul.

Conventions (DAPPER's `post_process`, so its tuned numbers carry over): `inflation` multiplies the
analysis anomalies after the update; `rotation` left-multiplies them by a random orthogonal matrix
that fixes the vector of ones (DAPPER's `genOG_1`, mean-preserving and covariance-preserving).
Order: RTPP, then RTPS (both relative to the raw analysis), then inflation, then rotation.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

import torch

from twin.random import generator


@functools.lru_cache(maxsize=32)
def _helmert(n_members: int) -> np.ndarray:
    """(N, N-1) orthonormal columns, each summing to zero (the Helmert contrasts)."""
    n = n_members
    basis = np.zeros((n, n - 1))
    for k in range(1, n):
        basis[:k, k - 1] = 1.0
        basis[k, k - 1] = -k
        basis[:, k - 1] /= np.sqrt(k * (k + 1))
    basis.setflags(write=False)
    return basis


@functools.lru_cache(maxsize=64)
def _cached(kind: str, n_members: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    b = _helmert(n_members)
    n = n_members
    if kind == "basis":
        out = b.copy()
    elif kind == "projector":  # rows: mean, then reduced anomalies
        out = np.vstack([np.full((1, n), 1.0 / n), b.T])
    elif kind == "obs_projector":  # applied to [HX; y]: rows Y' (N-1) and y - mean(HX)
        out = np.zeros((n, n + 1))
        out[: n - 1, :n] = b.T
        out[n - 1, :n] = -1.0 / n
        out[n - 1, n] = 1.0
    else:
        raise KeyError(kind)
    return torch.as_tensor(out, dtype=dtype, device=device)


@dataclass(frozen=True)
class PostProcessing:
    """Analysis post-processing keys shared by the ensemble Kalman filters (DAPPER's conventions)."""

    inflation: float = field(default=1.0, metadata={
        "min": 1.0, "help": "multiplies the analysis anomalies after the update (DAPPER's infl)"})
    rotation: bool = field(default=False, metadata={
        "help": "random mean-preserving rotation of the analysis anomalies (DAPPER's rot)"})
    rtps: float = field(default=0.0, metadata={
        "min": 0.0, "max": 1.0, "help": "relaxation to prior spread (RTPS alpha)"})
    rtpp: float = field(default=0.0, metadata={
        "min": 0.0, "max": 1.0, "help": "relaxation to prior perturbations (RTPP alpha)"})


def ensemble_basis(n_members: int, dtype: torch.dtype = torch.float64,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """B (N, N-1): orthonormal columns spanning the zero-sum vectors (cached; do not modify)."""
    return _cached("basis", n_members, dtype, str(device))


def ensemble_projector(n_members: int, dtype: torch.dtype = torch.float64,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """P (N, N) with P @ E = [x̄; A'] (mean row, then reduced anomalies Bᵀ E)."""
    return _cached("projector", n_members, dtype, str(device))


def observation_projector(n_members: int, dtype: torch.dtype = torch.float64,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """Q (N, N+1) with Q @ [HX; y] = [Y'; y - mean(HX)]: reduced obs anomalies and innovation."""
    return _cached("obs_projector", n_members, dtype, str(device))


ROTATION_BLOCK = 64  # cycles whose rotations are drawn together (one stream, one batched QR)
_ROTATION_TAG = 0x524F54  # extra key so these draws never share a stream with other "filter" draws


@functools.lru_cache(maxsize=4)
def _rotation_block(seed: int, block: int, n: int, size: int) -> torch.Tensor:
    rng = generator(seed, "filter", _ROTATION_TAG, size, block)
    q, r = torch.linalg.qr(torch.from_numpy(rng.standard_normal((size, n, n))))
    sign = torch.sgn(torch.diagonal(r, dim1=-2, dim2=-1))
    return q * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(-2)


def rotation_draw(seed: int, cycle: int, n_members: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The reduced random rotation Q' (N-1, N-1) of one analysis cycle: Haar on O(N-1).

    The member-space rotation B Q' Bᵀ + 11ᵀ/N is distributed as DAPPER's `genOG_1(N)`. A pure
    function of (seed, cycle, N), drawn from the keyed "filter" stream; small ensembles draw the
    rotations of ROTATION_BLOCK consecutive cycles at once, which makes a draw nearly free.
    """
    n = n_members - 1
    size = ROTATION_BLOCK if n <= 32 else 1
    block, offset = divmod(int(cycle), size)
    return _rotation_block(int(seed), block, n, size)[offset].to(dtype)


def member_rotation(reduced: torch.Tensor) -> torch.Tensor:
    """The (N, N) member-space rotation B Q' Bᵀ + 11ᵀ/N of a reduced rotation Q' (N-1, N-1)."""
    n = reduced.shape[0] + 1
    b = ensemble_basis(n, reduced.dtype, reduced.device)
    return b @ reduced @ b.t() + 1.0 / n


def anomaly_map(n_members: int, inflation: float, rotation: torch.Tensor | None,
                dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, N) matrix [s B Q' | 1] taking [A'_a; δx̄] (reduced analysis anomalies, then the mean
    increment) to member space: E = 1 x̄ᵀ + [s B Q' | 1] [A'_a; δx̄].

    Inflation s and rotation Q' are folded into the one matmul that returns to members anyway.
    """
    scaled = _scaled_basis(n_members, float(inflation), dtype, str(device))
    if rotation is None:
        return scaled
    rotated = scaled[:, :-1] @ rotation.to(dtype=dtype, device=device)
    return torch.cat([rotated, scaled[:, -1:]], dim=1)


@functools.lru_cache(maxsize=32)
def _scaled_basis(n_members: int, inflation: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    out = np.ones((n_members, n_members))
    out[:, :-1] = inflation * _helmert(n_members)
    return torch.as_tensor(out, dtype=dtype, device=device)


def relax(posterior: torch.Tensor, prior: torch.Tensor, rtpp: float = 0.0, rtps: float = 0.0) -> torch.Tensor:
    """Relax reduced analysis anomalies (N-1, ...) toward the prior's (same shape).

    RTPP (Zhang et al. 2004): A_a ← (1-α) A_a + α A_b. RTPS (Whitaker & Hamill 2012): per state
    variable σ_a ← σ_a + α (σ_b - σ_a), i.e. A_a ← A_a (1 - α + α σ_b/σ_a); left alone where σ_a = 0.
    """
    if rtpp:
        posterior = torch.lerp(posterior, prior, rtpp)
    if rtps:
        var_a = posterior.square().sum(0)
        var_b = prior.square().sum(0)
        ratio = torch.where(var_a > 0, (var_b / var_a.clamp_min(torch.finfo(var_a.dtype).tiny)).sqrt(),
                            torch.ones_like(var_a))
        posterior = posterior * (1.0 - rtps + rtps * ratio)
    return posterior


def relax_spread(prior: torch.Tensor, analysis: torch.Tensor, rtps: float) -> torch.Tensor:
    """RTPS on full ensembles (member, ...): the analysis anomalies rescaled pointwise (mean kept)."""
    mean = analysis.mean(0, keepdim=True)
    return mean + relax(analysis - mean, prior - prior.mean(0, keepdim=True), rtps=rtps)


def post_process(analysis: torch.Tensor, prior: torch.Tensor, *, inflation: float = 1.0,
                 rotation: torch.Tensor | None = None, rtpp: float = 0.0, rtps: float = 0.0) -> torch.Tensor:
    """RTPP, RTPS, inflation and rotation of an analysis ensemble (N, ...) given its prior (N, ...).

    `rotation` is a reduced rotation Q' from `rotation_draw` (None: no rotation).
    """
    if inflation == 1.0 and rotation is None and not rtpp and not rtps:
        return analysis
    n = analysis.shape[0]
    p = ensemble_projector(n, analysis.dtype, analysis.device)
    red_a = p @ analysis.reshape(n, -1)
    anom = red_a[1:]
    if rtpp or rtps:
        anom = relax(anom, (p[1:] @ prior.reshape(n, -1)), rtpp, rtps)
    mix = anomaly_map(n, inflation, rotation, analysis.dtype, analysis.device)
    return torch.addmm(red_a[:1], mix[:, :-1], anom).reshape(analysis.shape)


def check_config(name: str, *, inflation: float | None = None, prior_inflation: float | None = None,
                 rotation: object = False, rtps: float = 0.0, rtpp: float = 0.0) -> None:
    """Shared validation of the post-processing keys; ValueError naming the key."""
    def number(key: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise ValueError(f"{name}: {key} must be a finite number, got {value!r}")
        return float(value)

    for key, value in (("inflation", inflation), ("prior_inflation", prior_inflation)):
        if value is not None and number(key, value) < 1.0:
            raise ValueError(f"{name}: {key} must be >= 1, got {value!r}")
    if not isinstance(rotation, bool):
        raise ValueError(f"{name}: rotation must be true or false, got {rotation!r}")
    for key, value in (("rtps", rtps), ("rtpp", rtpp)):
        if not 0.0 <= number(key, value) <= 1.0:
            raise ValueError(f"{name}: {key} must be in [0, 1], got {value!r}")
