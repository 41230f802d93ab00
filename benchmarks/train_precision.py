"""Training-step time of the SQG emulator's network in float32 and under bfloat16 autocast, side by side.

One step = what `twin train`'s teacher stage does per iteration: a batch of EDM-noised 64 x 64 pairs
through the shipped architecture (with its halo), the loss, backward, Adam. Variants are timed
interleaved — float32, bfloat16, float32, ... — for each thread count, with the median over
`--repeats`; the table gives each median and the float32/bfloat16 ratio. bfloat16 pays off where the
CPU has native bf16 arithmetic (AVX512-BF16 or AMX); elsewhere it can be slower.

    python benchmarks/train_precision.py [--threads 1 2] [--batch 16] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from emulators.diffusion.edm import EDMConfig, Precond, edm_loss
from emulators.diffusion.network import NetworkConfig, UNetLite
from twin.domain import pad_halo


def training_step(batch: int, seed: int = 0):
    """A closure doing one teacher iteration at a given precision (fresh network, fixed data)."""
    torch.manual_seed(seed)
    net = UNetLite(NetworkConfig(in_channels=6, out_channels=2, fold=2, channels=(64, 128), blocks=(1, 2)))
    model = Precond(net, 1.0)
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    g = torch.Generator().manual_seed(seed)
    h = net.receptive_halo
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
    args = p.parse_args(argv)
    print(f"| threads | float32 s/step | bfloat16 s/step | float32 / bfloat16 |\n|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        step = training_step(args.batch)
        times: dict[bool, list[float]] = {False: [], True: []}
        for bf in times:  # warm-up
            step(bf)
        for _ in range(args.repeats):
            for bf in times:
                times[bf].append(step(bf))
        fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {threads} | {fp32:.3f} | {bf16:.3f} | {fp32 / bf16:.2f} |")


if __name__ == "__main__":
    main()
