"""Rank-count-independent random streams: the one source of random numbers in EarthTwin.

Every draw is keyed by (seed, purpose, *integer keys, block of global indices), never by the MPI
rank, so a decomposed run draws exactly the numbers the serial run draws at the same global points.
Global indices (grid points, observation ids) are cut into fixed blocks of `BLOCK` indices; each block
is its own stream (numpy PCG64 seeded by a hash of the key), and a draw for arbitrary global indices
reads the blocks they fall in. numpy's draws are prefix-consistent, so a block is drawn only up to
the largest index needed. A leaf module: torch and numpy only.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 4096

PURPOSES = ("truth", "init", "obs_noise", "obs_select", "filter", "sampler", "model", "test")


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
        for b in np.unique(blocks):
            sel = blocks == b
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
