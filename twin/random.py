"""Rank-count-independent random streams: the one source of random numbers in EarthTwin.

Every draw is keyed by (seed, purpose, *integer keys, block of global indices), never by the MPI
rank, so a decomposed run draws exactly the numbers the serial run draws at the same global points.
Global indices (grid points, observation ids) are cut into fixed blocks of `BLOCK` indices; each block
is its own stream (numpy PCG64 seeded by a hash of the key), and a draw for arbitrary global indices
reads the blocks they fall in. numpy's draws are prefix-consistent, so a block is drawn only up to
the largest index needed. `NormalStream` (bulk normals) is keyed by (seed, purpose, *keys) and
reads any global position directly (PCG64 `advance`). A leaf module: torch and numpy only.
"""
from __future__ import annotations

import hashlib
import struct
import threading
from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 4096

_STREAM_TAG = 0x4E53  # keeps `normal_stream` keys apart from the block streams' keys

PURPOSES = ("truth", "init", "obs_noise", "obs_select", "filter", "sampler", "model", "test", "repaint")  # append only


def _key_int(seed: int, purpose: str, keys: tuple[int, ...]) -> int:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown random purpose {purpose!r}; one of {PURPOSES}")
    payload = struct.pack(f"<q{len(keys) + 1}q", seed, PURPOSES.index(purpose), *keys)
    return int.from_bytes(hashlib.blake2b(payload, digest_size=16).digest(), "little")


def generator(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    """A numpy generator for one keyed stream (for small draws that are global, e.g. a rotation)."""
    return np.random.Generator(np.random.PCG64(_key_int(seed, purpose, tuple(keys))))


@dataclass(frozen=True)
class Streams:
    """Keyed random draws for one experiment seed."""

    seed: int

    def _draw(self, kind: str, purpose: str, keys: tuple[int, ...], indices: torch.Tensor) -> np.ndarray:
        idx = indices.reshape(-1).numpy()
        out = np.empty(idx.shape, dtype=np.float64)
        if idx.size == 0:
            return out
        blocks = idx // BLOCK
        order = np.argsort(blocks, kind="stable")  # group the indices by block without per-block masks
        uniq, starts = np.unique(blocks[order], return_index=True)
        ends = np.append(starts[1:], idx.size)
        for b, lo, hi in zip(uniq, starts, ends):
            sel = order[lo:hi]
            offsets = idx[sel] - b * BLOCK
            gen = generator(self.seed, purpose, *keys, int(b))
            n = int(offsets.max()) + 1
            draws = gen.standard_normal(n) if kind == "normal" else gen.random(n)
            out[sel] = draws[offsets]
        return out

    def normal(self, purpose: str, keys: tuple[int, ...], indices: torch.Tensor,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Standard normals at the given global indices (shape of `indices`)."""
        vals = self._draw("normal", purpose, keys, indices)
        return torch.from_numpy(vals).to(dtype).reshape(indices.shape)

    def uniform(self, purpose: str, keys: tuple[int, ...], indices: torch.Tensor,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Uniforms on [0, 1) at the given global indices."""
        vals = self._draw("uniform", purpose, keys, indices)
        return torch.from_numpy(vals).to(dtype).reshape(indices.shape)

    def normal_stream(self, purpose: str, keys: tuple[int, ...]) -> "NormalStream":
        """A random-access stream of standard normals for bulk draws (see `NormalStream`)."""
        return NormalStream(_key_int(self.seed, purpose, (_STREAM_TAG,) + tuple(keys)))

    def field_normal(self, purpose: str, keys: tuple[int, ...], members: int, variables: int,
                     flat_indices: torch.Tensor, local_shape: tuple[int, ...],
                     dtype: torch.dtype = torch.float64, first_member: int = 0) -> torch.Tensor:
        """Normals of shape (members, variables, *local_shape) for the grid points `flat_indices`
        (global C-order indices of the local subdomain); member m, variable v is stream (*keys, m, v)."""
        out = torch.empty((members, variables) + tuple(local_shape), dtype=dtype)
        for m in range(members):
            for v in range(variables):
                out[m, v] = self.normal(purpose, keys + (first_member + m, v), flat_indices, dtype).reshape(local_shape)
        return out


_PIECE = 1 << 15  # raw words per Box–Muller pass, all rows together (keeps the temporaries in cache)
_U24 = np.float32(-(2.0 ** -24))
_THETA24 = np.float32(2.0 * np.pi * 2.0 ** -24)


class NormalStream:
    """Standard normals of one key at any position, by random access: fast bulk draws.

    Raw 64-bit word j of a PCG64 stream (seeded by the key's hash) gives the normals at positions
    2j and 2j+1 by Box–Muller: r = sqrt(-2 ln(1 - u)), θ = 2π v from the top 24 bits of its two
    halves, then (r cos θ, r sin θ). A value depends only on (seed, purpose, keys, position), so a
    rank filling its own positions gets the serial run's numbers; PCG64's `advance` makes a jump
    cheap and a sweep in increasing order needs none. Values are float32 numbers (24-bit uniforms:
    tails end at 5.8σ) whatever the output dtype, so float32 and float64 runs draw the same noise.
    Made for bulk draws (the EnSF draws 2·10^7 a pseudo-step at 10^6 points): ~3 ns a value on one
    core, no per-block masks and no float64 detour.
    """

    def __init__(self, key: int) -> None:
        self._bg = np.random.PCG64(key)
        self._origin = self._bg.state
        self._word = 0  # the next raw word the generator will produce

    def raw(self, word: int, count: int) -> np.ndarray:
        """Raw words word .. word+count-1 (uint64)."""
        if word != self._word:
            self._bg.state = self._origin
            self._bg.advance(word)
        self._word = word + count
        return self._bg.random_raw(count)

    def fill(self, start: int, out: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """out[i] = scale · normal(start + i) for a 1-D float array `out` (may be a strided view)."""
        fill_rows([self], start, out[None], scale)
        return out


_WORK = threading.local()  # per-thread Box–Muller scratch: no page faults from fresh temporaries


def _scratch(rows: int, words: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    size = rows * words
    buf = getattr(_WORK, "buf", None)
    if buf is None or buf.shape[1] < size:
        buf = _WORK.buf = np.empty((3, size), dtype=np.float32)
    return tuple(b[:size].reshape(rows, words) for b in buf)  # type: ignore[return-value]


def _box_muller(raw: np.ndarray, out: np.ndarray, scale: float) -> None:
    """Pairs of normals (scaled) from raw words (R, W) into out (R, 2W), interleaved."""
    r, theta, trig = _scratch(*raw.shape)
    halves = raw.view(np.uint32).reshape(raw.shape + (2,))
    np.right_shift(halves, 8, out=halves)
    np.multiply(halves[..., 0], _U24, out=r, dtype=np.float32, casting="unsafe")  # -u, u in [0, 1)
    np.log1p(r, out=r)
    np.multiply(r, np.float32(-2.0 * scale * scale), out=r)
    np.sqrt(r, out=r)
    np.multiply(halves[..., 1], _THETA24, out=theta, dtype=np.float32, casting="unsafe")
    np.cos(theta, out=trig)
    np.multiply(r, trig, out=out[:, 0::2], casting="same_kind")
    np.sin(theta, out=trig)
    np.multiply(r, trig, out=out[:, 1::2], casting="same_kind")


def fill_rows(streams: list[NormalStream], start: int, out: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """out[r, i] = scale · normal of streams[r] at position start + i; out (R, n), float32 or float64."""
    rows, n = out.shape
    if rows != len(streams):
        raise ValueError(f"fill_rows: {len(streams)} streams for {rows} rows")
    pos, end = start, start + n
    piece = max(64, _PIECE // max(rows, 1))
    while pos < end:
        w0 = pos // 2
        w1 = min((end + 1) // 2, w0 + piece)
        lead = pos - 2 * w0
        take = min(end - pos, 2 * (w1 - w0) - lead)
        count = w1 - w0
        raw = streams[0].raw(w0, count)[None] if rows == 1 else np.stack([s.raw(w0, count) for s in streams])
        dst = out[:, pos - start: pos - start + take]
        if lead == 0 and take == 2 * count:
            _box_muller(raw, dst, scale)
        else:
            tmp = np.empty((rows, 2 * count), dtype=np.float32)
            _box_muller(raw, tmp, scale)
            dst[...] = tmp[:, lead: lead + take]
        pos += take
    return out
