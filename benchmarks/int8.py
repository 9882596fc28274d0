"""int8 dynamic quantisation against float32 for CPU inference (benchmarks/NOTES.md section 17).

Forward only, under ``torch.inference_mode``, one torch thread, T steps of batch B,
input size I = H/2, at a few (B, H). Runners, all in this process:

* ``nn.LSTM fp32`` and ``nn.LSTM int8``: PyTorch's LSTM and what
  ``torch.ao.quantization.quantize_dynamic`` makes of it (its C++ quantised loop);
* ``ours fp32 <v>`` / ``ours int8 <v>``: ``lstm_multi.torch.LSTM(variant=v, native=False)``
  (the generated CPU kernels) and its ``QuantizedLSTM`` (``quantize_dynamic(...,
  native=False)``), for "lstm", "peephole" and "lstm" with proj_size H/4 ("lstm+P").

The rounds are interleaved (every runner once per round, each timed call after one
untimed call of the same runner, NOTES section 2b), and each row gives the median over
rounds and the spread (max/min - 1) so that a disturbed row shows. The load average is
printed before and after::

    python benchmarks/int8.py --rounds 7 --out benchmarks/results/int8.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import torch
from torch import nn

from lstm_multi.torch import LSTM, quantize_dynamic

SIZES = [(1, 256), (8, 256), (64, 256), (1, 512), (8, 512), (64, 512)]


def runners(hidden):
    """name -> module, all eval, on the CPU in float32 or int8."""
    size = hidden // 2
    torch.manual_seed(0)
    plain = nn.LSTM(size, hidden).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        plain_int8 = torch.ao.quantization.quantize_dynamic(plain, {nn.LSTM})
    out = {"nn.LSTM fp32": plain, "nn.LSTM int8": plain_int8}
    for label, variant, proj in (
        ("lstm", "lstm", 0),
        ("peephole", "peephole", 0),
        ("lstm+P", "lstm", hidden // 4),
    ):
        module = LSTM(size, hidden, proj_size=proj, variant=variant, native=False).eval()
        out[f"ours fp32 {label}"] = module
        out[f"ours int8 {label}"] = quantize_dynamic(module, native=False)
    return out


def time_round(modules, x):
    """One interleaved round: {name: seconds} of one call each, after one untimed call."""
    times = {}
    with torch.inference_mode():
        for name, module in modules.items():
            module(x)
            start = time.perf_counter()
            module(x)
            times[name] = time.perf_counter() - start
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [
        f"# int8 against float32, forward (T={args.steps}, I=H/2, {args.threads} torch thread(s), "
        f"{args.rounds} interleaved rounds)",
        "",
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, quantised "
        f"engine {torch.backends.quantized.engine}, load average before "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        "",
        "| B | H | runner | median ms | spread | x fp32 (same module) |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for batch, hidden in SIZES:
        modules = runners(hidden)
        x = torch.randn(args.steps, batch, hidden // 2)
        rounds = [time_round(modules, x) for _ in range(args.rounds)]
        medians = {n: statistics.median(r[n] for r in rounds) for n in modules}
        for name in modules:
            samples = [r[name] for r in rounds]
            spread = max(samples) / min(samples) - 1
            base = name.replace("int8", "fp32")
            ratio = f"{medians[name] / medians[base]:.2f}" if base != name else ""
            row = (
                f"| {batch} | {hidden} | {name} | {1e3 * medians[name]:.2f} | "
                f"{100 * spread:.0f}% | {ratio} |"
            )
            lines.append(row)
            print(row, flush=True)
    tail = f"\nload average after {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    lines.append(tail)
    print(tail)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
