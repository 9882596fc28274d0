"""One benchmark run: plan the cases, measure each framework in a process of its own, collect.

The parent (``run_benchmark``) imports no array framework (NumPy aside, which
lstm_multi itself imports) and computes nothing. It groups the
chosen runners by framework and starts one child process per framework
(``isolation.run_child``), with that framework's thread-pool variables set to
the cores (torch's to the threads chosen) and every other library's to one, so
that no idle pool of another framework spins beside the one measured (on 2
cores that slowed ``nn.LSTM`` 6x; benchmarks/NOTES.md, section 14). The child
(``run_framework``) times its rows alternately with the framework's reference
(``runners.REFERENCES``: ``nn.LSTM``, Flax, the GEMM floor) and returns JSON.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import time

from . import flops, frameworks, machine, runners, timing
from .config import DEFAULT_VARIANTS, BenchConfig, Size
from .frameworks import Unavailable


class Progress:
    """tqdm when it is installed, else a line on stderr every few percent."""

    def __init__(self, total, enabled, prefix=""):
        self.total, self.done, self.enabled, self.bar = total, 0, enabled, None
        self.prefix = prefix
        self._last = -1
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def describe(self, text):
        if self.bar is not None:
            self.bar.set_description(f"{self.prefix}{text}")
        elif self.enabled:
            print(f"[bench] {self.prefix}{text}", file=sys.stderr, flush=True)

    def tick(self, n=1):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            pct = int(100 * self.done / max(self.total, 1))
            if pct // 10 != self._last // 10:
                self._last = pct
                print(f"[bench] {pct}% ({self.done}/{self.total})", file=sys.stderr, flush=True)

    def say(self, text):
        """A line for the console that leaves the progress bar whole."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            say(text)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def say(text):
    """A line for the person at the console (stderr, so stdout stays the table)."""
    print(text, file=sys.stderr, flush=True)


def load_registry(path):
    """``"module:function"`` -> the list of runners that function returns."""
    module, _, function = path.partition(":")
    return getattr(importlib.import_module(module), function)()


# the parent: which rows, in which process ----------------------------------


def _runnable_here(runner, device):
    """None when ``runner``'s framework is installed and can compute on ``device``, else why
    (known without importing the framework)."""
    fw = frameworks.get(runner.framework)
    if not fw.installed():
        return f"{fw.module} is not installed"
    if device not in fw.devices or (runner.devices is not None and device not in runner.devices):
        devices = runner.devices or fw.devices
        return f"runs on {', '.join(devices)} only (--device {devices[0]})"
    return None


def select_runners(config, every=None):
    """The runners of this run: the chosen backends and peers, and the reference of
    every framework among them. ``-b`` restricts every row: the peers too, to those of its
    backends' frameworks, unless named with ``--peer``."""
    every = load_registry(config.registry) if every is None else every
    chosen = []
    for r in every:
        if r.name == runners.REFERENCES.get(r.framework):
            continue  # added below, for the frameworks that have rows
        if r.role == "backend":
            if r.devices is not None and config.device not in r.devices:
                continue  # a GPU path on a CPU run
            if config.backends is None or r.backend in config.backends or r.name in config.backends:
                chosen.append(r)
        elif config.peers is not None:
            if r.name in config.peers:
                chosen.append(r)
        elif not (r.in_default or config.every_peer):
            continue  # named with --peer, or in --full runs
        elif config.backends is None or r.framework in _frameworks_of(config.backends):
            chosen.append(r)
    with_rows = {r.framework for r in chosen}
    with_rows |= {r.framework for r in every if config.peers and r.name in config.peers}
    if config.backends is not None:
        with_rows |= _frameworks_of(config.backends)
    references = [r for r in every if r.name == runners.REFERENCES.get(r.framework)]
    return [r for r in references if r.framework in with_rows] + chosen


def _frameworks_of(backends):
    """The frameworks the chosen backends run on (a peer of another one is left out)."""
    return {frameworks.framework_of_backend(b.split("[")[0]) for b in backends}


def _cases(selected, variants):
    out = []
    for r in selected:
        if r.name == runners.REFERENCES.get(r.framework):
            continue
        if not r.per_variant:
            out.append((r, "*"))
            continue
        out += [(r, v) for v in variants if r.supports(v)]
    return out


def _left_out(runner, variant, config) -> bool:
    """Whether the engine table leaves an engine runner's case out at every size of the
    run (``runners._check_engine_runs``: its engine falls back, or auto runs it already),
    decided as the child will, without importing a framework; False where unsure."""
    if runner.engine is None or variant == "*":
        return False
    from .. import engine, spec

    try:
        for size in config.sizes:
            case = engine.Case(
                runner.backend, config.device, config.dtype, spec.get_variant(variant),
                size.hidden_size,
            )  # fmt: skip
            named = engine.select_engine(case, runner.engine).engine
            if named == runner.engine and engine.select_engine(case).engine != named:
                return False
        return True
    except Exception:  # noqa: BLE001 - an estimate: count the case in full
        return False


#: the order the frameworks' processes run in (torch first: its thread choice is printed early)
FRAMEWORK_ORDER = ("torch", "jax", "numpy", "cupy")

#: a rough model of a run on the reference machine (2-core AMD EPYC, a 185 GFLOP/s square
#: GEMM; the quiet default runs of NOTES.md 16). One call of a case costs its products at
#: the rate such LSTM calls reach there (forward, forward+backward, step), plus a cost per
#: time step (the loop's overhead, which is what a small size measures). A case makes
#: ``1 + warmup`` calls before its rounds, and in each round two of its own and two of the
#: reference's (``timing.settled``: an untimed call before each timed one), at the case's
#: cost; the rounds' bookkeeping adds ``_ROUND_OVERHEAD`` to that. Each case also costs
#: its building and first-call work (JAX's compilation), each group (size and mode) its
#: reference's, and each process its start (Python, the framework's import, the thread
#: choice, the GEMM probe, the torch engine plan's measurement). Cases the engine table
#: leaves out (``_left_out``) are not counted; retries are not in it (the run's time budget
#: bounds them).
_ESTIMATED_RATE = {"forward": 125e9, "forward_backward": 95e9, "step": 60e9}
_ESTIMATED_STEP_S = {"forward": 25e-6, "forward_backward": 60e-6, "step": 150e-6}
_ROUND_OVERHEAD = 1.15
_ESTIMATED_CASE_S = {"torch": 0.3, "jax": 2.0, "numpy": 0.1, "cupy": 0.5}
_ESTIMATED_GROUP_S = {"torch": 1.0, "jax": 3.0, "numpy": 0.3, "cupy": 1.0}
_ESTIMATED_PROCESS_S = {"torch": 6.0, "jax": 6.0, "numpy": 2.0, "cupy": 6.0}
#: the parent's own work: the cases' selection, the report and the plot
_ESTIMATED_PARENT_S = 1.5


def _estimated_call_s(size, mode):
    return flops.gemm_flops(size, mode) / _ESTIMATED_RATE.get(
        mode, 60e9
    ) + size.steps * _ESTIMATED_STEP_S.get(mode, 150e-6)


def estimate_framework_seconds(config: BenchConfig, framework: str, n_cases: int) -> float:
    """The rough duration (the model above) of one framework's process with ``n_cases``
    cases, its reference not counted, without retries."""
    total = _ESTIMATED_PROCESS_S.get(framework, 5.0)
    calls = 1 + config.warmup + 4 * config.repeats
    for size in config.sizes:
        for mode in config.modes:
            call = _estimated_call_s(size, mode)
            total += _ESTIMATED_GROUP_S.get(framework, 1.0) + (1 + config.warmup) * call
            total += n_cases * (
                _ESTIMATED_CASE_S.get(framework, 0.5) + calls * call * _ROUND_OVERHEAD
            )
    return total


def estimate_seconds(config: BenchConfig, n_cases_by_framework):
    """A rough estimate of a run's duration (said up front; the model is above), without
    retries. ``n_cases_by_framework``: framework -> its cases, its reference not counted."""
    return _ESTIMATED_PARENT_S + sum(
        estimate_framework_seconds(config, f, n) for f, n in n_cases_by_framework.items()
    )


def run_benchmark(config: BenchConfig, announce=None, launch=None):
    """Measure ``config``, each framework in a child process; returns the results as a
    JSON-ready dict.

    ``announce(n_cases, seconds, loaded_seconds)``, when given, is called once the cases
    are known, with a rough estimate of the run's duration on a quiet machine and, when
    the machine is busy, at the load average now (else None). ``launch(job, env)`` runs one
    framework's job and returns its result (default: ``isolation.run_child``, a
    child process; the tests pass one running it in this process).
    """
    from . import isolation

    launch = isolation.run_child if launch is None else launch
    started = time.time()
    variants = tuple(config.variants or DEFAULT_VARIANTS)
    every = load_registry(config.registry)
    selected = select_runners(config, every)
    skipped, by_framework = [], {}
    for r in selected:
        reason = _runnable_here(r, config.device)
        if reason is not None:
            skipped.append(_skip(r, "*" if not r.per_variant else "lstm", None, None, reason))
            continue
        by_framework.setdefault(r.framework, []).append(r)
    order = sorted(by_framework, key=lambda f: (FRAMEWORK_ORDER + (f,)).index(f))
    n_cases = {
        f: sum(not _left_out(r, v, config) for r, v in _cases(by_framework[f], variants))
        for f in order
    }
    estimate = estimate_seconds(config, n_cases)
    description = machine.describe(config.device)
    loadavg, cores = description.get("loadavg_at_start"), machine.usable_cores()
    busy = machine.busy_at_start(loadavg, cores)
    loaded = None if not busy else estimate * machine.slowdown(loadavg, cores)
    if announce is not None:
        announce(sum(n_cases.values()), estimate, loaded)
    if busy:
        say(busy)
    description["busy_at_start"] = busy
    rows, processes, rates = [], {}, {}
    for framework in order:
        # each process's retries are bounded by its own share of the budget, so that the
        # first framework's noisy rows cannot take the retries of the others
        own = estimate_framework_seconds(config, framework, n_cases[framework])
        deadline = time.time() + config.retry_budget * own
        job = {
            "framework": framework,
            "config": config.as_dict(),
            "variants": list(variants),
            "runners": [r.name for r in by_framework[framework]],
            "reference": runners.REFERENCES.get(framework),
            "retry_deadline": deadline,
        }
        launched = time.time()
        try:
            result = launch(job, isolation.child_environment(framework, config.threads))
        except isolation.ChildFailed as error:
            skipped += [_skip(r, "*", None, None, str(error)) for r in by_framework[framework]]
            continue
        rows += result["rows"]
        skipped += result["skipped"]
        rates.update(result["gemm_rates"])
        processes[framework] = {**result["process"], "wall_s": time.time() - launched}
        description.update(result.get("machine", {}))
    if hasattr(os, "getloadavg"):
        description["loadavg_at_end"] = list(os.getloadavg())
    rate = max(rates.values()) if rates else None
    results = {
        "meta": {
            "machine": description,
            "config": {
                **config.as_dict(),
                "sizes": [s.as_dict() for s in config.sizes],
                "variants": list(variants),
                "modes": list(config.modes),
            },
            "references": {f: runners.REFERENCES.get(f) for f in order},
            "processes": processes,
            "gemm_rate_flops": rate,
            "gemm_rates_by_framework": rates,
            "gemm_probe": "square 1024 x 1024 product, best of 7 after one warm-up, "
            "in each framework's process",
            "estimate_s": estimate,
            "estimate_at_load_s": loaded,
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
    row's ``pct_of_limit`` is then computed against that rate.
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


# the child: one framework's rows --------------------------------------------


def run_framework(job):
    """Measure one framework's rows (in its own process); returns a JSON-ready dict:
    rows, skipped, the framework's GEMM rate, what it chose (torch's threads)."""
    config = BenchConfig.from_dict(job["config"])
    framework, variants = job["framework"], tuple(job["variants"])
    by_name = {r.name: r for r in load_registry(config.registry)}
    selected = [by_name[name] for name in job["runners"]]
    reference = by_name.get(job["reference"]) if job["reference"] in job["runners"] else None
    prefix = f"{framework}: "
    info = {}
    if framework in ("torch", "numpy"):
        from . import threads

        chosen_by = threads.set_torch_threads if framework == "torch" else threads.set_numpy_threads
        info = chosen_by(config, say)
    _, gemm_rates = frameworks.gemm_rate(config.device, config.dtype, names=(framework,))
    cases = _cases(selected, variants)
    groups = [(size, mode) for size in config.sizes for mode in config.modes]
    progress = Progress(len(groups) * len(cases) * (1 + config.repeats), config.progress, prefix)
    sampler = machine.CpuSampler()
    rows, skipped = [], []
    try:
        for size, mode in groups:
            sampler.start()
            group_rows, group_skipped = _run_group(
                config, size, mode, reference, cases, variants, progress, job["retry_deadline"]
            )
            others = sampler.others_share()
            busy = machine.busy_during(others, f"{prefix}{size.key} {mode}")
            if busy:
                progress.say(busy)
            for row in group_rows:
                row["others_cpu"] = others
            rows += group_rows
            skipped += group_skipped
    finally:
        progress.close()
    return {
        "rows": rows,
        "skipped": skipped,
        "gemm_rates": gemm_rates,
        "machine": info,
        "process": {
            "pid": os.getpid(),
            "environment": {k: os.environ.get(k) for k in _REPORTED_VARIABLES},
        },
    }


#: the environment a child records (its thread pools, Keras's backend)
_REPORTED_VARIABLES = (*frameworks.THREAD_VARIABLES, "KERAS_BACKEND", "OPENBLAS_THREAD_TIMEOUT")


def _build(runner, case):
    try:
        return runner.build(runner, case), None
    except Unavailable as error:
        return None, str(error)
    except ImportError as error:
        return None, f"import failed: {error}"


def _run_group(config, size, mode, reference, cases, variants, progress, retry_deadline):
    """Build, warm up and time every case of one size and mode against the reference."""
    progress.describe(f"{size.key} {mode}")
    rows, skipped = [], []
    ref_measured, ref_fn, ref_variant = None, None, None
    if reference is not None:
        ref_variant = "lstm" if reference.per_variant else "*"
        ref_case = runners.Case(size, "lstm", mode, config.dtype, config.device, config.seed)
        ref_fn, reason = _build(reference, ref_case)
        if ref_fn is None:
            skipped.append(_skip(reference, ref_variant, size, mode, reason))
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
    timing.measure(
        (ref_fn, ref_measured) if ref_measured is not None else None,
        [(fn, m) for _, _, fn, m in built],
        config.repeats,
        config.max_spread,
        config.retries,
        progress.tick,
        clock=(time.time, retry_deadline),
    )
    limit = flops.limit_seconds(size, mode, None)
    ref_name = reference.name if ref_measured is not None else None
    if ref_measured is not None:
        ref_measured.ratios = [1.0] * len(ref_measured.times)
        rows.append(_row(reference, ref_variant, size, mode, ref_measured, limit, ref_name, config))
    for runner, variant, _, measured in built:
        rows.append(_row(runner, variant, size, mode, measured, limit, ref_name, config))
    del built, ref_fn
    gc.collect()
    return rows, skipped


def _skip(runner, variant, size, mode, reason):
    return {
        "runner": runner.name,
        "variant": variant,
        "size": None if size is None else size.key,
        "mode": mode,
        "reason": reason,
    }


def _row(runner, variant, size, mode, measured, limit, reference, config):
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
        "noisy": measured.noisy(config.max_spread),
        "attempts": measured.attempts,
        "first_call_s": measured.first_call_s,
        "setup_s": setup,
        "reference": None if measured.ratio is None else reference,
        "ratio_to_reference": measured.ratio,
        "ratios": measured.ratios,
        "flops": flops.gemm_flops(size, mode),
        "limit_s": limit,
        "pct_of_limit": None,  # the parent's, once every process's GEMM rate is known
        "error": measured.error,
    }


__all__ = ["BenchConfig", "Size", "run_benchmark", "run_framework", "select_runners"]
