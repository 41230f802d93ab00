"""Shared fixtures: one torch thread (the machine has 2 cores shared by the suites)."""
import torch

torch.set_num_threads(1)
