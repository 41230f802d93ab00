"""Training pairs for `twin train`: standardised (condition x_t, target increment) batches and true
rollouts, from in-memory truth runs (`TruthPairs`) or read lazily from a CF archive (`ArchivePairs`).

Both expose the same interface to the training stages: `count`, `batch`, `rollout_count`, `rollout`,
`condition`, the statistics `mean`/`std`/`inc_mean`/`inc_std` (1, V, 1, 1), the padding `pad`, `net`,
`periodic_x` (whether random shifts along x are a valid augmentation) and `symmetry_count` (the size of
the truth model's exact symmetry group that `batch` and `rollout` may apply per pair; 0: none). `batch`
and `rollout` also return a validity mask (None for truth runs): an archive's masked (NaN) points are 0 after
standardising, and `net` zeroes a network's output there, so they add nothing to a loss. The network
sees the window the emulator gives it: the grid grown to its alignment, plus the halo. With a regression
network set (`set_regression`), `residual` turns a target increment into the diffusion networks' target,
(increment − R(condition)) / residual_std, and `increment` turns their sample back.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from twin.archive import Archive
from twin.domain import pad_halo

Pad = Callable[[torch.Tensor, int], torch.Tensor]
_STATS = ("state_mean", "state_std", "inc_mean", "inc_std")


def periodic_pad(x: torch.Tensor, h: int) -> torch.Tensor:
    """Halo of width h on both axes of a doubly periodic grid (the truth models')."""
    return pad_halo(x, (h, h), (True, True))


def window_pad(shape: tuple[int, int], alignment: int, periodic: tuple[bool, bool]) -> Pad:
    """pad(x, h): x (..., ny, nx) grown to the network's window as the serial emulator grows it: the grid
    extended up to multiples of `alignment`, plus a halo of h; wrapped where periodic, zeros elsewhere."""
    slack = [-n % alignment for n in shape]
    if all(periodic) and not any(slack):
        return periodic_pad

    def pad(x: torch.Tensor, h: int) -> torch.Tensor:
        w = h + max(slack)
        xp = pad_halo(x, (w, w), periodic)
        return xp[..., w - h:w + shape[0] + slack[0] + h, w - h:w + shape[1] + slack[1] + h]
    return pad


def lon_periodic(lon: np.ndarray) -> bool:
    """Whether a 1-D longitude axis is regular and covers 360° (a global grid, periodic in x)."""
    if lon.ndim != 1 or len(lon) < 2:
        return False
    d = np.diff(np.unwrap(lon, period=360.0))
    tol = 1e-3 * abs(d[0])
    return bool(np.allclose(d, d[0], rtol=0, atol=tol) and abs(abs(d[0]) * len(lon) - 360) < tol)


def roll_x(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Roll sample b of x (B, ...) by shifts[b] along the last axis."""
    return torch.stack([c.roll(int(s), -1) for c, s in zip(x, shifts)])


Symmetry = Callable[[int, torch.Tensor], torch.Tensor]  # g(element, fields (..., V, y, x)), physical units


class _Standardised:
    """Statistics, static channels and halo padding shared by both kinds of pairs."""

    periodic_x = True
    symmetry_count = 0
    regression: Callable[[torch.Tensor], torch.Tensor] | None = None
    residual_std: torch.Tensor | None = None  # (1, V, 1, 1)

    def __init__(self, stats: dict, static: torch.Tensor, halo: int, shape: tuple[int, int], alignment: int,
                 periodic: tuple[bool, bool]) -> None:
        self.mean, self.std, self.inc_mean, self.inc_std = (
            torch.tensor(stats[k]).float().view(1, -1, 1, 1) for k in _STATS)
        self.static, self.halo, self.shape, self.periodic = static, halo, shape, periodic
        self.pad = window_pad(shape, alignment, periodic)
        self._grown = any(n % alignment for n in shape)

    def net(self, model: Callable[..., torch.Tensor], mask: torch.Tensor | None) -> Callable[..., torch.Tensor]:
        """`model` (a denoiser or consistency function) as the losses call it: its output cropped from
        the aligned window to the grid and zeroed where `mask` is False (the target is 0 there, so
        masked points add nothing to a loss and pass no gradient)."""
        if mask is None and not self._grown:
            return model
        ny, nx = self.shape

        def run(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, pad: Pad) -> torch.Tensor:
            out = model(x, sigma, cond, pad)[..., :ny, :nx]
            return out if mask is None else out * mask
        return run

    def set_regression(self, regression: Callable[[torch.Tensor], torch.Tensor], residual_std: torch.Tensor) -> None:
        """From now on the diffusion targets are the residuals of `regression` (R(condition) on the window)."""
        self.regression, self.residual_std = regression, residual_std.view(1, -1, 1, 1)

    def mean_increment(self, cond: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | float:
        """R(cond) cropped to the grid and zeroed where `mask` is False (0 without a regression)."""
        if self.regression is None:
            return 0.0
        out = self.regression(cond)[..., :self.shape[0], :self.shape[1]]
        return out if mask is None else out * mask

    def residual(self, target: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The diffusion networks' target for a standardised increment `target` (unchanged without a
        regression, which gets no gradient from it)."""
        if self.regression is None:
            return target
        with torch.no_grad():
            mean = self.mean_increment(cond, mask)
        return (target - mean) / self.residual_std

    def increment(self, cond: torch.Tensor, sample: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The standardised increment of a diffusion network's `sample`: R(cond) + residual_std · sample."""
        if self.regression is None:
            return sample
        return self.mean_increment(cond, mask) + self.residual_std * sample

    def pad_grid(self, x: torch.Tensor, h: int) -> torch.Tensor:
        """A halo of h on the grid itself (wrapped where periodic, zeros elsewhere), as the emulator's
        halo exchange gives it (for the Shapiro filter)."""
        return pad_halo(x, (h, h), self.periodic)

    def condition(self, standardised: torch.Tensor) -> torch.Tensor:
        """The network's condition: the halo-padded standardised state and the static channels."""
        b = standardised.shape[0]
        return torch.cat([self.pad(standardised, self.halo), self.static.expand(b, *self.static.shape)], dim=1)


class TruthPairs(_Standardised):
    """Pairs and rollouts of in-memory truth runs (runs, samples, variables, y, x), doubly periodic.
    With `symmetry` (count, g), a pair may be mapped by an element of the truth model's exact symmetry
    group: g maps trajectories onto trajectories, so (g x_t, g x_{t+Δ}) is a true pair too."""

    def __init__(self, data: torch.Tensor, stats: dict, static: torch.Tensor, halo: int, alignment: int,
                 symmetry: tuple[int, Symmetry] | None = None) -> None:
        super().__init__(stats, static, halo, tuple(data.shape[-2:]), alignment, (True, True))
        self.data = data
        self.state = (data[:, :-1] - self.mean) / self.std
        self.inc = (data[:, 1:] - data[:, :-1] - self.inc_mean) / self.inc_std
        self.count = self.state.shape[0] * self.state.shape[1]
        self.symmetry_count, self._g = symmetry or (0, None)

    def _map(self, x: torch.Tensor, elements: torch.Tensor) -> torch.Tensor:
        """Sample b of x (..., B, V, y, x) mapped by symmetry element elements[b] (physical units)."""
        return torch.stack([self._g(int(e), x[..., b, :, :, :]) for b, e in enumerate(elements)], dim=-4)

    def batch(self, index: torch.Tensor, shifts: torch.Tensor | None = None, elements: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """(target increment, condition, mask) of pairs `index`, each mapped by its symmetry `elements`
        and rolled by `shifts` along x."""
        per = self.state.shape[1]
        run, first = index // per, index % per
        if elements is None:
            cond, target = self.state[run, first], self.inc[run, first]
        else:
            x0, x1 = self._map(torch.stack([self.data[run, first], self.data[run, first + 1]]), elements)
            cond, target = (x0 - self.mean) / self.std, (x1 - x0 - self.inc_mean) / self.inc_std
        if shifts is not None:
            cond, target = roll_x(cond, shifts), roll_x(target, shifts)
        return target, self.condition(cond), None

    def rollout_count(self, steps: int) -> int:
        return self.data.shape[0] * (self.data.shape[1] - steps)

    def rollout(self, index: torch.Tensor, steps: int, shifts: torch.Tensor | None = None,
                elements: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, None]:
        """True states (B, C, y, x) at the starts and (steps, B, C, y, x) after 1..steps emulator steps,
        each rollout mapped by its symmetry `elements` and rolled by `shifts` along x."""
        per = self.data.shape[1] - steps
        run, first = index // per, index % per
        seq = torch.stack([self.data[run, first + k] for k in range(steps + 1)])
        if elements is not None:
            seq = self._map(seq, elements)
        if shifts is not None:
            seq = torch.stack([roll_x(s, shifts) for s in seq])
        return seq[0], seq[1:], None


class ArchivePairs(_Standardised):
    """Pairs and rollouts of one split of an `Archive`, read per batch. Masked (NaN) points are 0 in
    the standardised condition and target; the mask marks the points valid at every time involved."""

    def __init__(self, archive: Archive, split: str, stats: dict, static: torch.Tensor, halo: int,
                 alignment: int, periodic: tuple[bool, bool]) -> None:
        super().__init__(stats, static, halo, archive.grid_shape, alignment, periodic)
        self.archive, self.split, self.periodic_x = archive, split, periodic[1]
        self.count = archive.pair_count(split)
        self._chains: dict[int, np.ndarray] = {}

    def batch(self, index: torch.Tensor, shifts: torch.Tensor | None = None, elements: None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(target increment, condition, mask) of pairs `index`, each rolled by `shifts` along x (an
        archive declares no symmetries: `elements` is always None)."""
        x_t, x_next = self.archive.pairs(index, self.split)
        state = (x_t - self.mean) / self.std
        inc = (x_next - x_t - self.inc_mean) / self.inc_std
        mask = torch.isfinite(inc)
        cond, target = torch.where(torch.isfinite(state), state, 0.0), torch.where(mask, inc, 0.0)
        if shifts is not None:
            cond, target, mask = (roll_x(v, shifts) for v in (cond, target, mask))
        return target, self.condition(cond), mask

    def _chain(self, steps: int) -> np.ndarray:
        """(starts, steps + 1) indices into the archive's times of `steps` consecutive pairs of the split."""
        if steps not in self._chains:
            p = self.archive.pair_index(self.split)
            following = np.full(len(self.archive.times), -1)
            following[p[:, 0]] = np.arange(len(p))
            times = [p[:, 0], p[:, 1]]
            for _ in range(steps - 1):
                nxt = following[times[-1]]
                keep = nxt >= 0
                times = [t[keep] for t in times] + [p[nxt[keep], 1]]
            self._chains[steps] = np.stack(times, axis=1)
        return self._chains[steps]

    def rollout_count(self, steps: int) -> int:
        return len(self._chain(steps))

    def rollout(self, index: torch.Tensor, steps: int, shifts: torch.Tensor | None = None, elements: None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """True states (B, C, y, x) at the starts, (steps, B, C, y, x) after 1..steps emulator steps and
        the mask (B, C, y, x) of points valid throughout; masked points hold the state mean throughout."""
        seq = self._chain(steps)[np.asarray(index, dtype=np.int64).reshape(-1)]
        x = torch.from_numpy(self.archive.read(seq.reshape(-1))).view(*seq.shape, -1, *self.archive.grid_shape)
        mask = torch.isfinite(x).all(dim=1)
        x = torch.where(mask[:, None], x, self.mean).transpose(0, 1)
        if shifts is not None:
            x, mask = torch.stack([roll_x(s, shifts) for s in x]), roll_x(mask, shifts)
        return x[0], x[1:], mask


Pairs = TruthPairs | ArchivePairs
