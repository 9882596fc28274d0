"""One benchmark run: build every (runner, variant) case per size and mode, time them, collect."""

from __future__ import annotations

import gc
import os
import sys
import time

from . import flops, frameworks, machine, runners, timing
from .config import DEFAULT_VARIANTS, BenchConfig
from .frameworks import Unavailable


class Progress:
    """tqdm when it is installed, else a line on stderr every few percent."""

    def __init__(self, total, enabled):
        self.total, self.done, self.enabled, self.bar = total, 0, enabled, None
        self._last = -1
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def describe(self, text):
        if self.bar is not None:
            self.bar.set_description(text)
        elif self.enabled:
            print(f"[bench] {text}", file=sys.stderr, flush=True)

    def tick(self, n=1):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            pct = int(100 * self.done / max(self.total, 1))
            if pct // 10 != self._last // 10:
                self._last = pct
                print(f"[bench] {pct}% ({self.done}/{self.total})", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def select_runners(config):
    """The runners of this run: the chosen backends, the chosen peers, and the reference."""
    every = runners.all_runners()
    chosen = []
    for r in every:
        if r.role == "backend":
            if r.devices is not None and config.device not in r.devices:
                continue  # a GPU path on a CPU run
            if config.backends is None or r.backend in config.backends or r.name in config.backends:
                chosen.append(r)
        elif r.name == runners.REFERENCE:
            chosen.append(r)  # always measured: the ratios are to it
        elif config.peers is not None:
            if r.name in config.peers:
                chosen.append(r)
        elif config.backends is None or r.framework in _frameworks_of(config.backends):
            chosen.append(r)  # -b restricts the peers too: those of its backends' frameworks
    return chosen


def _frameworks_of(backends):
    """The frameworks the chosen backends run on (a peer of another one is left out)."""
    return {frameworks.framework_of_backend(b.split("[")[0]) for b in backends}


def _cases(selected, variants):
    out = []
    for r in selected:
        if r.name == runners.REFERENCE:
            continue
        if not r.per_variant:
            out.append((r, "*"))
            continue
        out += [(r, v) for v in variants if r.supports(v)]
    return out


#: a rough model of one timed call, fitted to the recorded 2-core runs: the products at
#: this share of the GEMM rate, plus a per-step cost of the Python loops, plus a fixed
#: cost per case (building it, its first call, JAX's compilation)
_ESTIMATED_GEMM_SHARE, _ESTIMATED_STEP_S, _ESTIMATED_CASE_S = 0.4, 25e-6, 1.0


def estimate_seconds(config: BenchConfig, n_cases, gemm_rate):
    """A rough estimate of a run's duration (said up front; the model is above)."""
    total = 10.0  # imports, the GEMM probe
    calls = 2 * config.repeats + config.warmup + 1  # nn.LSTM is timed between every call
    for size in config.sizes:
        for mode in config.modes:
            factor = {"forward": 1.0, "forward_backward": 2.5}.get(mode, 4.0)  # step: 4
            call = factor * size.steps * _ESTIMATED_STEP_S
            if gemm_rate:
                call += flops.gemm_flops(size, mode) / (gemm_rate * _ESTIMATED_GEMM_SHARE)
            total += n_cases * (calls * call + _ESTIMATED_CASE_S)
    return total


def run_benchmark(config: BenchConfig, announce=None):
    """Measure ``config``; returns the results as a JSON-ready dict.

    ``announce(n_cases, seconds)``, when given, is called once the cases are known,
    with a rough estimate of the run's duration.
    """
    started = time.time()
    variants = tuple(config.variants or DEFAULT_VARIANTS)
    selected = select_runners(config)
    description = machine.describe(config.device)
    gemm_rate, gemm_rates = frameworks.gemm_rate(config.device, config.dtype)
    description.update(machine.threads())
    cases = _cases(selected, variants)
    if announce is not None:
        announce(len(cases), estimate_seconds(config, len(cases), gemm_rate))
    reference = next((r for r in selected if r.name == runners.REFERENCE), None)
    per_group = len(cases) * (1 + config.repeats)
    progress = Progress(per_group * len(config.sizes) * len(config.modes), config.progress)
    rows, skipped = [], []
    try:
        for size in config.sizes:
            for mode in config.modes:
                group_rows, group_skipped = _run_group(
                    config, size, mode, reference, cases, variants, progress, gemm_rate
                )
                rows += group_rows
                skipped += group_skipped
    finally:
        progress.close()
    if hasattr(os, "getloadavg"):
        description["loadavg_at_end"] = list(os.getloadavg())
    results = {
        "meta": {
            "machine": description,
            "config": {
                "sizes": [s.as_dict() for s in config.sizes],
                "variants": list(variants),
                "modes": list(config.modes),
                "dtype": config.dtype,
                "device": config.device,
                "repeats": config.repeats,
                "warmup": config.warmup,
                "seed": config.seed,
            },
            "reference": runners.REFERENCE if reference else None,
            "gemm_rate_flops": gemm_rate,
            "gemm_rates_by_framework": gemm_rates,
            "gemm_probe": "square 1024 x 1024 product, best of 7 after one warm-up",
            # thread-pool settings that change what one framework costs the next
            "environment": {
                k: os.environ.get(k)
                for k in ("OPENBLAS_THREAD_TIMEOUT", "OMP_NUM_THREADS", "LSTM_MULTI_CPU_THREADS")
            },
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": time.time() - started,
        },
        "runners": {
            r.name: {"framework": r.framework, "role": r.role, "description": r.description}
            for r in selected
        },
        "results": rows,
        "skipped": skipped,
    }
    _apply_measured_limit(results)
    return results


def _apply_measured_limit(results):
    """Make "% of limit" a share that cannot exceed 100%.

    The limit is the highest GEMM rate measured in this run: the square-GEMM
    probe's, or a case's own rate over its products where one ran faster than
    the probe (the probe is one shape; a case's products are others). Each
    row's ``pct_of_limit`` is then recomputed against that rate.
    """
    meta = results["meta"]
    rate, source = meta["gemm_rate_flops"], "square GEMM probe"
    for row in results["results"]:
        if row["median_s"] and rate and row["flops"] / row["median_s"] > rate:
            rate = row["flops"] / row["median_s"]
            source = f"{row['runner']} / {row['variant']} at {row['size']} {row['mode']}"
    meta["limit_rate_flops"], meta["limit_source"] = rate, source
    for row in results["results"]:
        if rate and row["median_s"]:
            row["limit_s"] = row["flops"] / rate
            row["pct_of_limit"] = 100.0 * row["limit_s"] / row["median_s"]


def _build(runner, case):
    try:
        return runner.build(runner, case), None
    except Unavailable as error:
        return None, str(error)
    except ImportError as error:
        return None, f"import failed: {error}"


def _run_group(config, size, mode, reference, cases, variants, progress, gemm_rate):
    """Build, warm up and time every case of one size and mode."""
    progress.describe(f"{size.key} {mode}")
    rows, skipped = [], []
    ref_measured, ref_fn = None, None
    if reference is not None:
        ref_case = runners.Case(size, "lstm", mode, config.dtype, config.device, config.seed)
        ref_fn, reason = _build(reference, ref_case)
        if ref_fn is None:
            skipped.append(_skip(reference, "lstm", size, mode, reason))
        else:
            ref_measured = timing.Measured()
            ref_measured.first_call_s = timing.warm_up(ref_fn, config.warmup)
    built = []
    for runner, variant in cases:
        case_variant = variants[0] if variant == "*" else variant
        case = runners.Case(size, case_variant, mode, config.dtype, config.device, config.seed)
        fn, reason = _build(runner, case)
        measured = timing.Measured()
        if fn is None:
            skipped.append(_skip(runner, variant, size, mode, reason))
            progress.tick(1 + config.repeats)
            continue
        try:
            measured.first_call_s = timing.warm_up(fn, config.warmup)
        except Exception as error:  # noqa: BLE001 - recorded in the results
            measured.error = f"{type(error).__name__}: {error}"
        progress.tick()
        built.append((runner, variant, fn, measured))
    timing.alternate(
        (ref_fn, ref_measured) if ref_measured is not None else None,
        [(fn, m) for _, _, fn, m in built],
        config.repeats,
        progress.tick,
    )
    limit = flops.limit_seconds(size, mode, gemm_rate)
    if ref_measured is not None:
        ref_measured.ratios = [1.0] * len(ref_measured.times)
        rows.append(_row(reference, "lstm", size, mode, ref_measured, limit))
    for runner, variant, _, measured in built:
        rows.append(_row(runner, variant, size, mode, measured, limit))
    del built, ref_fn
    gc.collect()
    return rows, skipped


def _skip(runner, variant, size, mode, reason):
    return {
        "runner": runner.name,
        "variant": variant,
        "size": size.key,
        "mode": mode,
        "reason": reason,
    }


def _row(runner, variant, size, mode, measured, limit):
    median = measured.median_s
    setup = None
    if measured.first_call_s is not None and median is not None:
        setup = max(measured.first_call_s - median, 0.0)
    return {
        "runner": runner.name,
        "framework": runner.framework,
        "role": runner.role,
        "variant": variant,
        "size": size.key,
        "dims": size.as_dict(),
        "mode": mode,
        "median_s": median,
        "times_s": measured.times,
        "spread": measured.spread,
        "first_call_s": measured.first_call_s,
        "setup_s": setup,
        "ratio_to_reference": measured.ratio,
        "ratios": measured.ratios,
        "flops": flops.gemm_flops(size, mode),
        "limit_s": limit,
        "pct_of_limit": None if (limit is None or not median) else 100.0 * limit / median,
        "error": measured.error,
    }
