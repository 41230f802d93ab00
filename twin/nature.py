"""The nature run of a twin experiment: the truth trajectory and its synthetic observations.

Simulated ahead of the assimilation loop (as DAPPER's `HMM.simulate` does), so the loop's speed
measures the filter and the forecast model only. Entries are dropped once consumed.
"""
from __future__ import annotations

import torch

from assim.observations import ObservationBatch
from assim.synthetic import SyntheticObserver
from emulators.base import Model


class NatureRun:
    """Truth states and observations at each cycle, computed on demand and ahead of time."""

    def __init__(self, model: Model, observer: SyntheticObserver, truth0: torch.Tensor, steps_per_cycle: int,
                 first_cycle: int = 0, cycle_length: float | None = None) -> None:
        """`steps_per_cycle` counts steps of the *truth* model; `cycle_length` (model time) defaults
        to steps_per_cycle · model.dt."""
        self.model = model
        self.observer = observer
        self.steps_per_cycle = steps_per_cycle
        self.cycle_length = cycle_length if cycle_length is not None else steps_per_cycle * model.dt
        self._states: dict[int, torch.Tensor] = {first_cycle: truth0}
        self._obs: dict[int, ObservationBatch] = {}
        self._last = first_cycle
        self._first = first_cycle

    def time(self, cycle: int) -> float:
        return cycle * self.cycle_length

    def extend(self, cycles: int) -> None:
        """Make sure truth and observations exist up to (and including) cycle `cycles`."""
        x = self._states[self._last]
        while self._last < cycles:
            for i in range(self.steps_per_cycle):
                x = self.model.step(x.unsqueeze(0), self.time(self._last) + i * self.model.dt)[0]
            self._last += 1
            self._states[self._last] = x

    def truth(self, cycle: int) -> torch.Tensor:
        self.extend(cycle)
        return self._states[cycle]

    def observations(self, cycle: int) -> ObservationBatch:
        if cycle not in self._obs:
            self._obs[cycle] = self.observer.observe(self.truth(cycle), cycle, self.time(cycle))
        return self._obs[cycle]

    def prepare(self, first: int, last: int, observations: bool = True) -> None:
        """Simulate truth (and observations) for cycles first..last before a timed loop."""
        self.extend(last)
        if observations:
            for c in range(first, last + 1):
                self.observations(c)

    def release(self, before: int) -> None:
        """Forget cycles before `before` (the twin has consumed them)."""
        while self._first < min(before, self._last):
            self._states.pop(self._first, None)
            self._obs.pop(self._first, None)
            self._first += 1
