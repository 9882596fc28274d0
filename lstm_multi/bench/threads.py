"""torch's intra-op threads for a run: the faster of one thread and every core, measured.

On a small machine more threads are not always faster: a step of a medium
``nn.LSTM`` is a few hundred microseconds, and two threads that wait on each
other (or on another process) can lose to one. So the torch process times one
quick ``nn.LSTM`` forward with each candidate count and keeps the faster;
``--threads N`` sets it instead.
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


def describe(chosen, medians):
    """``torch threads: 2 (measured: 1 -> 6.1 ms, 2 -> 4.0 ms)`` or ``(set by --threads)``."""
    if not medians:
        return f"torch threads: {chosen} (set by --threads)"
    measured = ", ".join(f"{n} -> {1e3 * s:.1f} ms" for n, s in medians.items())
    return f"torch threads: {chosen} (measured: {measured}; nn.LSTM T50 B64 I128 H256 forward)"


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
