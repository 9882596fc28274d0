"""The "layernorm" rows with what `lstm-multi bench` cannot show (benchmarks/NOTES.md section 23).

Forward and forward+backward, float32, one torch thread (``--threads``), at the bench's
sizes (``--size``, repeatable: a preset or T,B,I,H). Runners, all in this process and
built by the bench's own builders (``lstm_multi.bench.runners``), so each computes what
its bench row computes:

* ``nn.LSTM``: ``torch.nn.LSTM`` (the reference of every ratio);
* ``ours layernorm``: the torch cell, ``engine="auto"`` (the C++ kernels, batch split);
* ``ours layernorm, no split``: the same with ``LSTM_MULTI_CPU_THREADS=0`` (the per-step
  loop: one ``torch.mm`` and one fused step call a step), set around each call;
* ``ours peephole``: the torch cell on "peephole", for the part of the gap that is not the
  layer norms';
* ``ops eager``, ``ops compiled``: ``layernorm.torch_ops`` and ``layernorm.torch_compile``,
  the layer norm LSTM written in plain torch, eager and with its step under torch.compile.

The rounds are interleaved (every runner once per round, each timed call after one
untimed call of the same runner, NOTES section 2b); each row gives the median over
rounds, the spread ((max - min) / median) and the ratio to ``nn.LSTM``'s median. The
load average is printed before and after::

    python benchmarks/layernorm_rows.py -s medium -s large --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from lstm_multi.bench import config, runners


def _split_off(fn):
    def run():
        os.environ["LSTM_MULTI_CPU_THREADS"] = "0"
        try:
            fn()
        finally:
            os.environ.pop("LSTM_MULTI_CPU_THREADS", None)

    return run


#: row -> (bench runner, variant, wrapper or None)
ROWS = {
    "nn.LSTM": ("torch.nn.LSTM", "lstm", None),
    "ours layernorm": ("torch", "layernorm", None),
    "ours layernorm, no split": ("torch", "layernorm", _split_off),
    "ours peephole": ("torch", "peephole", None),
    "ops eager": ("layernorm.torch_ops", "layernorm", None),
    "ops compiled": ("layernorm.torch_compile", "layernorm", None),
}


def measure(size, mode, names, rounds):
    """{row: (median s, spread)} over ``rounds`` interleaved rounds."""
    every = {r.name: r for r in runners.all_runners()}
    calls = {}
    for name in names:
        runner, variant, wrap = ROWS[name]
        built = every[runner].build(
            every[runner], runners.Case(size, variant, mode, "float32", "cpu")
        )
        calls[name] = wrap(built) if wrap else built
        start = time.perf_counter()
        calls[name]()
        print(f"# {name}, {mode}: first call {time.perf_counter() - start:.2f} s", flush=True)
    times = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            calls[name]()
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {
        n: (statistics.median(t), (max(t) - min(t)) / statistics.median(t))
        for n, t in times.items()
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", "-s", action="append", help="a preset or T,B,I,H")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--row", action="append", choices=list(ROWS), help="default: all")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.row or list(ROWS)
    print(f"# load average before: {os.getloadavg()}; torch threads {torch.get_num_threads()}")
    print("| size | mode | row | median ms | spread | x nn.LSTM |\n|---|---|---|---:|---:|---:|")
    for text in args.size or ["medium"]:
        size = config.parse_size(text)
        for mode in config.MODES:
            found = measure(size, mode, names, args.rounds)
            reference = found.get("nn.LSTM", (None,))[0]
            for name, (median, spread) in found.items():
                ratio = f"{median / reference:.2f}" if reference else ""
                print(f"| {size.key} | {mode} | {name} | {median * 1e3:.1f} | {spread:.2f} | {ratio} |",
                      flush=True)  # fmt: skip
    print(f"# load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
