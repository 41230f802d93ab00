"""The shipped emulator runs free for 1000 steps (250 days) from a truth state: finite and bounded, with
a climate near the truth's (about a minute; the figures are in BENCHMARKS.md,
`benchmarks/emulator_rollout.py`)."""
import torch

from emulators.diffusion.emulator import DiffusionEmulator
from emulators.diffusion.skill import free_rollout, truth_runs
from emulators.registry import model_registry
from twin.domain import SerialDomain


def test_shipped_emulator_free_run_of_1000_steps_stays_bounded():
    torch.set_num_threads(1)
    cfg = DiffusionEmulator.Config(sampler="single_step")
    em = DiffusionEmulator(cfg, SerialDomain(DiffusionEmulator.global_grid(cfg)), torch.float32)
    steps = 1000
    truth = truth_runs("sqg", model_registry["sqg"].Config(size=64), [9501], 50 * 86400, em.dt, steps + 1).float()[0]
    result = free_rollout(em, truth[0], truth, steps)
    assert result["finite"]
    assert result["max_abs"] < 2 * float(truth.abs().max())
    assert all(0.5 < r < 1.5 for r in result["variance_ratio_per_variable"]), result
