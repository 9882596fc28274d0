"""The timing method: first call, warm-up, rounds alternating with the reference, medians.

Every case runs inside rounds ``ref, a, ref, b, ref, ..., ref``: each
measurement of a case sits between two measurements of the reference
(``torch.nn.LSTM``), and its ratio is its time over the smaller of those two
(so a one-off spike of the reference, common on a busy 2-core machine, cannot
shrink it). The reported ratio is the median over rounds, so slow drifts of the machine (another
process, clock changes) cancel; the reported time is the median over rounds.
Every call ends with the framework's synchronisation, so asynchronous work
(JAX dispatch, CUDA kernels) is inside the measured interval.

Each timed call is preceded by one untimed call of the same function
(``settled``): on a small CPU, a framework's thread pool that another framework
ran in between must wake up and refill its caches, which measured 2-6x on a
0.5 ms ``torch.nn.LSTM`` call right after NumPy or JAX work. The time reported
is that of a warm, steady-state call, as in a training loop.

A case whose times spread by more than ``max_spread`` ((max - min) / median)
is measured again, in fresh rounds against the same reference, up to
``retries`` more times (``measure``); the attempt with the smallest spread is
kept, and a case still above ``max_spread`` is marked ``noisy``.
"""

from __future__ import annotations

import statistics
import time


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def settled(fn):
    """The time of a call of ``fn`` right after an untimed one."""
    fn()
    return timed(fn)


class Measured:
    """Timings of one case: the first call, then one time (and ratio) per round."""

    def __init__(self):
        self.first_call_s = None
        self.times = []
        self.ratios = []
        self.error = None
        self.attempts = 1  # rounds of ``repeats`` measured (1 + retries taken)

    @property
    def median_s(self):
        return statistics.median(self.times) if self.times else None

    @property
    def ratio(self):
        return statistics.median(self.ratios) if self.ratios else None

    @property
    def spread(self):
        """Relative spread of the times: (max - min) / median."""
        if len(self.times) < 2:
            return 0.0
        return (max(self.times) - min(self.times)) / self.median_s

    def noisy(self, max_spread):
        """Whether the kept times spread by more than ``max_spread``."""
        return self.error is None and bool(self.times) and self.spread > max_spread

    def keep_better(self, other):
        """Take ``other``'s times and ratios where they spread less (one more attempt)."""
        self.attempts += 1
        if other.error is None and other.times and other.spread < self.spread:
            self.times, self.ratios = other.times, other.ratios


def warm_up(fn, warmup):
    """Time the first call (compilation, tracing, allocation), then ``warmup`` more calls."""
    first = timed(fn)
    for _ in range(warmup):
        fn()
    return first


def alternate(reference, cases, repeats, tick=lambda: None):
    """Rounds of ``ref, case_1, ref, case_2, ..., ref``.

    reference: (callable, Measured) or None; cases: list of (callable, Measured).
    Fills each Measured's times (and ratios when there is a reference).
    A case that raises is marked with its error and left out of later rounds.
    """
    for _ in range(repeats):
        ref_before = settled(reference[0]) if reference else None
        if reference:
            reference[1].times.append(ref_before)
        for fn, measured in cases:
            if measured.error is not None:
                tick()
                continue
            try:
                t = settled(fn)
            except Exception as error:  # noqa: BLE001 - recorded, the run goes on
                measured.error = f"{type(error).__name__}: {error}"
                tick()
                continue
            measured.times.append(t)
            if reference:
                ref_after = settled(reference[0])
                reference[1].times.append(ref_after)
                measured.ratios.append(t / min(ref_before, ref_after))
                ref_before = ref_after
            tick()


def measure(reference, cases, repeats, max_spread, retries, tick=lambda: None, clock=None):
    """``alternate``, then fresh rounds for the cases that spread over ``max_spread``.

    reference and cases as in ``alternate``. Each retry runs ``repeats`` rounds
    of the cases still over ``max_spread`` against the reference (whose times
    keep accumulating); a case keeps the attempt with the smallest spread. At
    most ``retries`` retries; ``clock``, when given, is ``(now, deadline)``:
    no retry starts after ``deadline`` (a run's time budget). Returns the
    number of retries taken.
    """
    alternate(reference, cases, repeats, tick)
    taken = 0
    for _ in range(retries):
        again = [(fn, m) for fn, m in cases if m.noisy(max_spread)]
        if not again or (clock is not None and clock[0]() > clock[1]):
            break
        fresh = [(fn, Measured()) for fn, _ in again]
        alternate(reference, fresh, repeats)
        for (_, kept), (_, new) in zip(again, fresh, strict=True):
            kept.keep_better(new)
        taken += 1
    return taken
