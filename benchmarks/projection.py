"""Projected LSTMs (proj_size) on the CPU: lstm_multi's torch module against nn.LSTM(proj_size).

Each row is timed in this process against ``nn.LSTM(proj_size=P)`` measured in
the same process (medians of ``--repeats`` after two warm-up calls; forward
under ``no_grad``, forward+backward of ``y.sum()``). Run it once as it is (the
generated CPU kernels) and once with ``LSTM_MULTI_CPU_KERNELS=0`` (the array
code) to compare the two paths::

    python benchmarks/projection.py --out benchmarks/results/projection/kernels.md
    LSTM_MULTI_CPU_KERNELS=0 python benchmarks/projection.py --out .../array.md

Only torch's thread pool is busy (torch.set_num_threads(--threads)).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from lstm_multi.torch import LSTM

SIZES = {"medium": (100, 64, 128, 256, 64), "large": (50, 128, 512, 512, 128)}


def median_ms(fn, repeats):
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(module, x, repeats):
    def forward():
        with torch.no_grad():
            module(x)

    xg = x.clone().requires_grad_(True)

    def forward_backward():
        module.zero_grad()
        y, _ = module(xg)
        y.sum().backward()

    return median_ms(forward, repeats), median_ms(forward_backward, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the markdown table here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = "array code" if os.environ.get("LSTM_MULTI_CPU_KERNELS") == "0" else "CPU kernels"
    lines = [
        f"lstm_multi projected LSTMs ({path}) against nn.LSTM(proj_size), torch "
        f"{torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}",
        "",
        "| size (T, B, I, H, P) | module | fwd ms | fwd+bwd ms | fwd / nn.LSTM | fwd+bwd / nn.LSTM |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, (steps, batch, inputs, hidden, proj) in SIZES.items():
        x = torch.randn(steps, batch, inputs)
        rows = [
            ("nn.LSTM(proj_size)", torch.nn.LSTM(inputs, hidden, proj_size=proj)),
            ("lstm, native=False", LSTM(inputs, hidden, proj_size=proj, native=False)),
            ("peephole", LSTM(inputs, hidden, proj_size=proj, variant="peephole")),
            ("peephole_full", LSTM(inputs, hidden, proj_size=proj, variant="peephole_full")),
        ]
        base = None
        for label, module in rows:
            fwd, fb = measure(module, x, args.repeats)
            base = base or (fwd, fb)
            lines.append(
                f"| {name} {steps, batch, inputs, hidden, proj} | {label} | {fwd:.1f} | {fb:.1f} "
                f"| {fwd / base[0]:.2f} | {fb / base[1]:.2f} |"
            )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
