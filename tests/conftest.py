"""Shared test settings: one torch thread (the machine has 2 cores shared by the suites), and
hypothesis derandomised under CI (CI=true) so a CI run is repeatable; developers' runs explore."""
import os

import torch
from hypothesis import settings

torch.set_num_threads(1)
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")
