"""Threads for a run: the faster of one thread and every core, measured, for torch's
intra-op pool and NumPy's BLAS.

On a small machine more threads are not always faster: a step of a medium
LSTM is a few hundred microseconds, and two threads that wait on each other at
every step (or on another process) can lose to one - by 20x on a busy 2-core
machine (benchmarks/NOTES.md 14). So the torch process times one quick
``nn.LSTM`` forward, and the NumPy process the same shape's matrix products,
with each candidate count, and keeps the faster; ``--threads N`` sets both.
"""

from __future__ import annotations

import statistics

from . import timing
from .machine import usable_cores

#: the quick shape the choice is measured on: T50 B64 I128 H256, forward (a few ms)
PROBE_SHAPE = (50, 64, 128, 256)


def choose(measure, candidates, rounds=3):
    """The candidate with the smallest median time, and every candidate's median.

    ``measure(n)`` times one call with ``n`` threads (seconds). The candidates
    take turns, ``rounds`` times, so a slow moment of the machine hits each alike.
    """
    times = {n: [] for n in candidates}
    for _ in range(rounds):
        for n in candidates:
            times[n].append(measure(n))
    medians = {n: statistics.median(t) for n, t in times.items()}
    return min(candidates, key=lambda n: medians[n]), medians


def describe(chosen, medians, what="torch", probe="nn.LSTM T50 B64 I128 H256 forward"):
    """``torch threads: 2 (measured: 1 -> 6.1 ms, 2 -> 4.0 ms; ...)`` or ``(set by --threads)``."""
    if not medians:
        return f"{what} threads: {chosen} (set by --threads)"
    measured = ", ".join(f"{n} -> {1e3 * s:.1f} ms" for n, s in medians.items())
    return f"{what} threads: {chosen} (measured: {measured}; {probe})"


def set_torch_threads(config, say):
    """Set torch's intra-op threads for this process (the torch process) and say how many.

    ``config.threads`` when given; else on a CPU run the faster of 1 and the core
    count (``choose``); on CUDA every core. Returns what the results record.
    """
    import torch

    cores = usable_cores()
    medians = {}
    if config.threads is not None:
        chosen = config.threads
    elif config.device != "cpu" or cores == 1:
        chosen = cores
    else:
        t, b, i, h = PROBE_SHAPE
        module = torch.nn.LSTM(i, h, batch_first=True)
        x = torch.randn(b, t, i)

        def call():
            with torch.no_grad():
                module(x)

        def measure(n):
            torch.set_num_threads(n)
            return timing.settled(call)

        chosen, medians = choose(measure, sorted({1, cores}))
    torch.set_num_threads(chosen)
    say(describe(chosen, medians))
    info = {
        "torch_threads": chosen,
        "torch_thread_probe_s": {str(n): s for n, s in medians.items()},
    }
    if config.device == "cuda":
        from .machine import gpu_name

        info["gpu"] = gpu_name()
    return info


def set_numpy_threads(config, say):
    """Set NumPy's BLAS threads for this process (the NumPy process) and say how many.

    ``config.threads`` when given, else the faster of 1 and the core count on the
    products of one LSTM forward at ``PROBE_SHAPE`` (``choose``). Needs threadpoolctl
    (the ``bench`` extra); without it the BLAS keeps the cores its variables give it.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        say("numpy threads: not chosen (pip install threadpoolctl, in lstm_multi[bench])")
        return {}
    import numpy as np

    cores = usable_cores()
    medians = {}
    if config.threads is not None:
        chosen = config.threads
    elif cores == 1:
        chosen = 1
    else:
        t, b, i, h = PROBE_SHAPE
        rng = np.random.default_rng(0)
        x = rng.standard_normal((t * b, i)).astype("float32")
        w = rng.standard_normal((i, 4 * h)).astype("float32")
        u = rng.standard_normal((h, 4 * h)).astype("float32")
        r, z = np.zeros((b, h), "float32"), np.empty((b, 4 * h), "float32")

        def call():
            x @ w
            for _ in range(t):
                np.matmul(r, u, out=z)

        def measure(n):
            with threadpool_limits(n, user_api="blas"):
                return timing.settled(call)

        chosen, medians = choose(measure, sorted({1, cores}))
    threadpool_limits(chosen, user_api="blas")  # for the rest of this process
    say(describe(chosen, medians, "numpy", "its BLAS on an LSTM's products, T50 B64 I128 H256"))
    return {
        "numpy_threads": chosen,
        "numpy_thread_probe_s": {str(n): s for n, s in medians.items()},
    }
