"""Observation space across ranks: H(ensemble), values and errors of all observations.

Filters that need observations beyond their own subdomain (LETKF's taper support, global EnKF)
all-gather them; observations are small. Gathered observations are ordered by id, so the order —
and so every floating-point sum over observations — is the same under any rank count.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from assim.observations import ObservationBatch
from twin.domain import Decomposition


@dataclass(frozen=True)
class ObsSpace:
    """hx (member, n_obs) with the observations' values, errors, locations and ids."""

    hx: torch.Tensor
    values: torch.Tensor
    error_std: torch.Tensor
    locations: torch.Tensor
    ids: torch.Tensor


def gather_obs_space(ens: torch.Tensor, obs: ObservationBatch, domain: Decomposition) -> ObsSpace:
    """H applied on this rank, then all ranks' observations, ordered by id."""
    hx = obs.operator(ens)
    if domain.size == 1:
        return ObsSpace(hx, obs.values, obs.error_std, obs.locations, obs.ids)
    parts = domain.allgather_object(tuple(t.detach().cpu().numpy() for t in
                                          (hx, obs.values, obs.error_std, obs.locations, obs.ids)))
    hx_all, y, err, loc, ids = (np.concatenate([p[i] for p in parts], axis=-1 if i == 0 else 0)
                                for i in range(5))
    order = np.argsort(ids, kind="stable")
    return ObsSpace(torch.from_numpy(hx_all[:, order]).to(hx), torch.from_numpy(y[order]).to(obs.values),
                    torch.from_numpy(err[order]).to(obs.error_std), torch.from_numpy(loc[order]),
                    torch.from_numpy(ids[order]))


def observed_points(obs: ObservationBatch, domain: Decomposition, n_variables: int, n_points: int) -> torch.Tensor:
    """(variable, grid point) bool over the GLOBAL grid: True where any rank's observations sample
    the state. Needs an operator on grid points (identity, subset, arctan)."""
    op = obs.operator
    if not hasattr(op, "point"):
        raise ValueError("this stage needs observations on grid points (identity, subset or arctan operators)")
    parts = domain.allgather_object((op.variable.numpy(), op.point.numpy()))
    known = torch.zeros(n_variables, n_points, dtype=torch.bool)
    known[torch.from_numpy(np.concatenate([p[0] for p in parts])).long(),
          torch.from_numpy(np.concatenate([p[1] for p in parts])).long()] = True
    return known
