"""Training-step time of the SQG emulator's network: float32 vs bfloat16 autocast, halo vs wrapped
convolutions, side by side.

One step = what `twin train`'s teacher stage does per iteration: a batch of EDM-noised 64 x 64 pairs
through the shipped architecture, the loss, backward, Adam. Layouts: `halo` feeds the network the
periodically padded field (26-point halo, 'valid' convolutions: what a subdomain under MPI does);
`wrap` feeds the bare field and wraps every convolution circularly (`UNetLite.wrap`: the same function,
what training on whole periodic fields and the serial emulator use). Variants are timed interleaved
for each thread count, with the median over `--repeats`; the table gives each median and the ratios.
bfloat16 pays off where the CPU has native bf16 arithmetic (AVX512-BF16 or AMX); elsewhere it can be
slower.

    python benchmarks/train_precision.py [--threads 1 2] [--batch 16] [--repeats 7] [--channels 64 128]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from emulators.diffusion.edm import EDMConfig, Precond, edm_loss
from emulators.diffusion.network import NetworkConfig, UNetLite
from twin.domain import pad_halo

VARIANTS = (("halo", False), ("halo", True), ("wrap", False), ("wrap", True))  # (layout, bfloat16)


def training_step(batch: int, channels: tuple[int, ...], wrap: bool, seed: int = 0) -> Callable[[bool], float]:
    """A closure doing one teacher iteration at a given precision (fresh network, fixed data)."""
    torch.manual_seed(seed)
    net = UNetLite(NetworkConfig(in_channels=6, out_channels=2, fold=2, channels=channels, blocks=(1, 2)))
    net.wrap = wrap
    model = Precond(net, 1.0)
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    g = torch.Generator().manual_seed(seed)
    h = net.input_halo
    target = torch.randn(batch, 2, 64, 64, generator=g)
    cond = pad_halo(torch.randn(batch, 4, 64, 64, generator=g), (h, h), (True, True))
    pad = lambda x, halo: pad_halo(x, (halo, halo), (True, True))  # noqa: E731

    def step(bfloat16: bool) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            loss = edm_loss(model, target, cond, pad, EDMConfig(), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0
    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--channels", type=int, nargs="+", default=[64, 128], help="feature channels per level (2)")
    args = p.parse_args(argv)
    print("| threads | halo float32 | halo bfloat16 | wrap float32 | wrap bfloat16 | float32 / bfloat16 (halo) "
          "| halo / wrap (bfloat16) |\n|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        steps = {layout: training_step(args.batch, tuple(args.channels), layout == "wrap") for layout in ("halo", "wrap")}
        times: dict[tuple[str, bool], list[float]] = {v: [] for v in VARIANTS}
        for layout, bf in VARIANTS:  # warm-up
            steps[layout](bf)
        for _ in range(args.repeats):
            for layout, bf in VARIANTS:
                times[(layout, bf)].append(steps[layout](bf))
        med = {v: statistics.median(t) for v, t in times.items()}
        cells = " | ".join(f"{med[v]:.3f}" for v in VARIANTS)
        print(f"| {threads} | {cells} | {med[('halo', False)] / med[('halo', True)]:.2f} "
              f"| {med[('halo', True)] / med[('wrap', True)]:.2f} |")


if __name__ == "__main__":
    main()
