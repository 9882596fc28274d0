"""The prepared GPU check: the GPU tests, then a short benchmark, in under 5 minutes.

Run from the repository root on a machine with a CUDA GPU, no install step and
no network needed (torch, jax, cupy preinstalled as available)::

    PYTHONPATH=. python benchmarks/gpu_check.py [--out DIR]

1. ``pytest -m gpu tests`` (every GPU backend against the torch backend on the
   CPU in float64), its output kept in ``gpu_tests.log`` and summed up;
2. what XLA compiles a step of the JAX cell to (GEMMs and fusions per step);
3. a benchmark of every backend, path and variant (torch: native, Triton
   per-step gates with and without CUDA graphs, the persistent Triton kernels,
   the generic loop with and without CUDA graphs; jax; cupy with and without
   CUDA graphs; the article's module for scale) against ``torch.nn.LSTM`` on
   cuDNN, over ``CASES`` (the issue's T512 B64 I=H=512 and FlashRNN's B16
   T1024 I=H=768 in float32 and bfloat16, B=1 latency, a persistent-kernel
   size): forward, and forward + backward (``vjp``), TF32 off, the first call
   timed apart, at least one more untimed call (where CUDA graphs are
   captured), the device synchronised around every call, the median of the
   repeats. A time budget stops the benchmark early (the rows left are marked
   skipped) so that the whole check ends within ``--budget-s``.

Writes ``gpu_check.json`` and ``gpu_check.md`` (and ``gpu_tests.log``) to
``--out``, or ``$OUT``, or ``./gpu_check_out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# JAX takes 75% of the GPU's memory at its first use unless told not to; torch,
# CuPy and the test subprocess share the card with it here
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402

VARIANTS = ("lstm", "peephole", "peephole_full")
#: (T, B, I, H, dtype, variants, runners) in the order they are measured: the time
#: budget cuts the later ones. First the issue's two sizes (T512 B64 I=H=512; and
#: FlashRNN's, B16 T1024 I=H=768) in float32 then bfloat16, then B=1 latency
#: (T1024 I=H=256), one size the persistent Triton kernels take (H <= 64) and one
#: with a large product per step. "all" runners at the first case, the unfused
#: loop and the article's module for scale included; elsewhere the fast paths. Last, the
#: layer-normalised LSTM (whose rows the ratio column sets beside cuDNN's plain LSTM).
CASES = (
    (512, 64, 512, 512, "float32", VARIANTS, "all"),
    (1024, 16, 768, 768, "float32", ("lstm", "peephole"), "fast"),
    (512, 64, 512, 512, "bfloat16", ("lstm", "peephole"), "fast"),
    (1024, 16, 768, 768, "bfloat16", ("lstm", "peephole"), "fast"),
    (1024, 1, 256, 256, "float32", ("lstm", "peephole"), "fast"),
    (256, 16, 64, 64, "float32", ("lstm", "peephole"), "fast"),
    (64, 256, 1024, 1024, "float32", ("lstm", "peephole"), "fast"),
    # issue 26: the layer-normalised LSTM against cuDNN's plain float32 LSTM (target 1.5x)
    # at the first size, and at one the persistent kernels take
    (512, 64, 512, 512, "float32", ("layernorm",), "fast"),
    (256, 16, 64, 64, "float32", ("layernorm",), "fast"),
)
BASELINE = "torch.nn.LSTM (cuDNN)"


# ---------------------------------------------------------------------------
# environment


def environment():
    env = {"python": sys.version.split()[0], "platform": platform.platform()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cudnn"] = torch.backends.cudnn.version()
    except Exception as error:  # report, never fail here
        env["torch"] = f"unavailable ({error})"
    try:
        import jax

        env["jax"] = jax.__version__
        env["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception as error:
        env["jax"] = f"unavailable ({error})"
    try:
        import cupy

        env["cupy"] = cupy.__version__
        env["cupy_devices"] = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:
        env["cupy"] = f"unavailable ({type(error).__name__}: {error})"
    return env


# ---------------------------------------------------------------------------
# the GPU tests


#: the GPU tests, cheapest and most telling first, so that a run cut short by its
#: time limit still reports on every backend
GPU_TESTS = [
    "tests/test_gpu.py::test_cupy_fused_kernels_equal_spec_on_gpu",
    "tests/test_gpu.py::test_torch_module_on_cuda_matches_cpu",
    "tests/test_gpu.py::test_torch_autocast_on_cuda",
    "tests/test_gpu.py::test_gpu_backend_matches_oracle",
    "tests/test_gpu.py::test_gpu_half_precision_within_derived_bound",
    "tests/test_triton.py::test_triton_kernels_compiled_on_cuda_equal_the_program",
    "tests/test_triton.py::test_persistent_kernels_compiled_on_cuda_match_the_oracle",
    "tests/test_torch_graphs.py::test_cuda_graphs_on_the_gpu_equal_direct_calls",
    "tests/test_torch_graphs.py::test_a_training_loop_on_the_gpu",
    "tests/test_torch_graphs.py::test_tensors_on_another_gpu_are_captured_and_replayed_there",
    "tests/test_cupy_graphs.py::test_cuda_graphs_on_the_gpu_equal_direct_calls",
]


def run_tests(out, timeout_s, examples, per_test_timeout_s):
    """The GPU tests; returns a summary dict, the log streamed to ``gpu_tests.log``.

    The log is written as pytest runs (one line per test, ``-v``), so a run cut
    short keeps every result and traceback so far; with pytest-timeout present a
    test stuck past ``per_test_timeout_s`` fails with the stack where it hung.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["LSTM_MULTI_GPU_EXAMPLES"] = str(examples)
    command = [sys.executable, "-m", "pytest", *GPU_TESTS, "-m", "gpu", "-v", "--tb=short"]
    command += ["-rfEs", "-p", "no:cacheprovider", "--durations=15"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        command.append(f"--timeout={per_test_timeout_s:g}")
    log_path = out / "gpu_tests.log"
    start = time.perf_counter()
    with log_path.open("w") as log_file:
        try:
            code = subprocess.run(
                command,
                cwd=ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    seconds = time.perf_counter() - start
    log = log_path.read_text()
    if code is None:
        log += f"\n[timed out after {timeout_s} s]\n"
        log_path.write_text(log)
    lines = log.strip().splitlines()
    counts = {}
    for number, word in re.findall(
        r"(\d+) (passed|failed|skipped|errors?|deselected)", lines[-1] if lines else ""
    ):
        counts[word.rstrip("s") if word == "errors" else word] = int(number)
    if code is None:  # no pytest summary line: count the per-test lines so far
        for word in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
            counts[word.lower()] = len(re.findall(rf"::\S+ {word}", log))
    skipped = sorted(set(re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", log)))
    failed = sorted(set(re.findall(r"^FAILED (\S+)", log, flags=re.M)))
    return {
        "command": " ".join(command),
        "returncode": code,
        "seconds": round(seconds, 1),
        "counts": counts,
        "skip_reasons": skipped,
        "failed": failed,
        "summary": lines[-1] if lines else "",
    }


# ---------------------------------------------------------------------------
# the benchmark


class Skip(Exception):
    pass


def _time(call, sync, repeats, warmup):
    """Median and min wall time (ms) of ``call()`` with the device synchronised."""
    for _ in range(warmup):
        sync(call())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(call())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def _data(size, seed=0):
    steps, batch, inp, hidden = size
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, steps, inp), dtype=np.float32)
    dy = rng.standard_normal((batch, steps, hidden), dtype=np.float32)
    return x, dy


#: runners measured everywhere ("fast") or at the first case only ("scale": the
#: paths the issue compares against, not candidates for the fastest)
SCALE_RUNNERS = ("lstm_multi torch generic", "article CustomLSTM (torch loop)")


def torch_runners(dev):
    import torch

    if dev == "cuda" and not torch.cuda.is_available():
        raise Skip("torch: no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    import lstm_multi
    from lstm_multi.bench.article import article_module

    def sync(result):
        if dev == "cuda":
            torch.cuda.synchronize()

    def tensors(size, dtype):
        x_np, dy_np = _data(size)
        dtype = getattr(torch, dtype)
        return (torch.as_tensor(a, device=dev).to(dtype) for a in (x_np, dy_np))

    def module_runner(module, x, dy):
        def forward():
            with torch.no_grad():
                return module(x)

        def train():
            xg = x.detach().requires_grad_(True)
            y, _ = module(xg)
            return torch.autograd.grad(y, [xg, *module.parameters()], dy)

        return forward, train, sync

    def cudnn(variant, size, dtype):
        if variant != "lstm":
            raise Skip("torch.nn.LSTM has the plain variant only")
        steps, batch, inp, hidden = size
        lstm = torch.nn.LSTM(inp, hidden, batch_first=True).to(dev, getattr(torch, dtype))
        return module_runner(lstm, *tensors(size, dtype))

    def article(variant, size, dtype):
        if variant == "peephole":
            raise Skip("the article has no 'peephole' form (its peephole is 'peephole_full')")
        if dtype != "float32":
            raise Skip("measured in float32 only, for scale")
        steps, batch, inp, hidden = size
        module = article_module(inp, hidden, peephole=variant == "peephole_full").to(dev)
        return module_runner(module, *tensors(size, dtype))

    def layernorm_ops(variant, size, dtype):
        """Issue 26's baseline: the layer norm LSTM as a user writes it in plain torch
        (``bench.peers.layernorm_lstm_module``: nn.LayerNorm and a Python loop), eager."""
        if variant != "layernorm":
            raise Skip("the plain-torch baseline of the 'layernorm' rows only")
        from lstm_multi.bench.peers import layernorm_lstm_module

        steps, batch, inp, hidden = size
        torch.manual_seed(0)
        module = layernorm_lstm_module()(inp, hidden).to(dev, getattr(torch, dtype))
        return module_runner(module, *tensors(size, dtype))

    def cell(native, needs_triton=False, max_hidden=None, **options):
        def make(variant, size, dtype):
            if needs_triton and not triton_here:
                raise Skip("triton is not installed, or no GPU and no TRITON_INTERPRET=1")
            steps, batch, inp, hidden = size
            if max_hidden is not None and hidden > max_hidden:
                raise Skip(f"H > {max_hidden}: the per-step Triton kernels run, as in that row")
            Cell = lstm_multi.get_cell("torch")
            c = Cell(inp, hidden, variant=variant, native=native, device=dev, **options)
            if native and not c.uses_native:
                raise Skip("no native kernel for this variant")
            to = getattr(torch, dtype)
            params = c._map(lambda name, a: a.to(to), c.init(seed=0))
            x, dy = tensors(size, dtype)
            return (lambda: c(params, x)), (lambda: c.vjp(params, x, dy)), sync

        return make

    triton_here = importlib.util.find_spec("triton") is not None and (
        dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    )
    from lstm_multi.backends.triton_kernels import TritonKernels

    return {
        BASELINE: cudnn,
        "lstm_multi torch native": cell(True),
        "lstm_multi torch, Triton gates + CUDA graphs": cell(
            False, True, gate_kernel="triton", cuda_graphs=True
        ),
        "lstm_multi torch, Triton gates": cell(False, True, gate_kernel="triton"),
        "lstm_multi torch, Triton persistent": cell(
            False, True, TritonKernels.MAX_SEQUENCE_HIDDEN, gate_kernel="triton_persistent"
        ),
        "lstm_multi torch generic, CUDA graphs": cell(False, gate_kernel="array", cuda_graphs=True),
        "lstm_multi torch generic": cell(False),
        "article CustomLSTM (torch loop)": article,
        "layer norm LSTM in plain torch (nn.LayerNorm loop)": layernorm_ops,
    }


def jax_runners(dev):
    import jax

    try:
        device = jax.devices("gpu" if dev == "cuda" else "cpu")[0]
    except RuntimeError as error:
        raise Skip(f"jax: no GPU ({error})") from None
    jax.config.update("jax_default_matmul_precision", "highest")
    import lstm_multi

    def sync(result):
        jax.block_until_ready(result)

    def cell(**options):
        def make(variant, size, dtype):
            steps, batch, inp, hidden = size
            if options.get("kernel") == "pallas_persistent" and hidden > 64:
                raise Skip("H > 64: the scan runs, as in the lstm_multi jax row")
            c = lstm_multi.get_cell("jax")(inp, hidden, variant=variant, **options)
            to = getattr(jax.numpy, dtype)
            params = jax.device_put(jax.tree.map(lambda a: a.astype(to), c.init(seed=0)), device)
            x_np, dy_np = _data(size)
            x, dy = (jax.device_put(a, device).astype(to) for a in (x_np, dy_np))
            return (lambda: c(params, x)), (lambda: c.vjp(params, x, dy)), sync

        return make

    return {
        "lstm_multi jax": cell(),
        "lstm_multi jax, Pallas persistent": cell(kernel="pallas_persistent"),
    }


def cupy_runners(dev):
    import lstm_multi

    try:
        Cell = lstm_multi.get_cell("cupy")
    except (ImportError, RuntimeError) as error:
        raise Skip(f"cupy: {error}") from None
    import cupy

    def sync(result):
        cupy.cuda.get_current_stream().synchronize()

    def cell(**options):
        def make(variant, size, dtype):
            if dtype == "bfloat16":
                raise Skip("cupy has no bfloat16")
            steps, batch, inp, hidden = size
            c = Cell(inp, hidden, variant=variant, **options)
            params = c._map(lambda name, a: a.astype(dtype), c.init(seed=0))
            x_np, dy_np = _data(size)
            x, dy = cupy.asarray(x_np, dtype=dtype), cupy.asarray(dy_np, dtype=dtype)
            return (lambda: c(params, x)), (lambda: c.vjp(params, x, dy)), sync

        return make

    return {
        "lstm_multi cupy, CUDA graphs": cell(cuda_graphs=True),
        "lstm_multi cupy": cell(),
    }


def run_benchmark(deadline, repeats, warmup, cases=CASES, dev="cuda"):
    runners, unavailable = {}, {}
    for group in (torch_runners, jax_runners, cupy_runners):
        try:
            runners.update(group(dev))
        except Skip as why:
            unavailable[group.__name__.removesuffix("_runners")] = str(why)
        except Exception as error:  # a broken framework install: report it
            unavailable[group.__name__.removesuffix("_runners")] = (
                f"{type(error).__name__}: {error}"
            )
    rows = []
    for *size, dtype, variants, which in cases:
        for variant in variants:
            for name, make in runners.items():
                if which != "all" and name in SCALE_RUNNERS:
                    continue
                rows.append(
                    _measure(name, make, variant, tuple(size), dtype, deadline, repeats, warmup)
                )
    return rows, unavailable


def _measure(name, make, variant, size, dtype, deadline, repeats, warmup):
    """One row: ``make(variant, size, dtype) -> (forward, train, sync)`` timed."""
    row = {"backend": name, "variant": variant, "dtype": dtype}
    row.update(zip("TBIH", size, strict=True))
    if time.perf_counter() > deadline:
        row["status"] = "skipped: time budget"
        return row
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _time_modes(row, make, variant, size, dtype, deadline, repeats, warmup)
    # a failed CUDA-graph capture warns and runs directly: say so beside the time
    messages = sorted({str(w.message)[:300] for w in seen if w.category is RuntimeWarning})
    if messages:
        row["warnings"] = messages
    return row


def _time_modes(row, make, variant, size, dtype, deadline, repeats, warmup):
    """Fill ``row`` with the forward and forward+backward times, or why not."""
    try:
        forward, train, sync = make(variant, size, dtype)
        for mode, call in (("forward", forward), ("forward+backward", train)):
            if time.perf_counter() > deadline:
                row[mode] = "skipped: time budget"
                continue
            start = time.perf_counter()
            sync(call())  # first call: compilation, autotuning, allocation
            first = time.perf_counter() - start
            n = repeats if first < 1.0 else max(2, repeats // 3)
            median, best = _time(call, sync, n, max(1, warmup - 1))
            row[mode] = {
                "median_ms": round(median, 3),
                "min_ms": round(best, 3),
                "repeats": n,
                "first_call_s": round(first, 2),
            }
        row["status"] = "ok"
    except Skip as why:
        row["status"] = f"n/a: {why}"
    except Exception as error:
        row["status"] = f"error: {type(error).__name__}: {error}"[:300]


# ---------------------------------------------------------------------------
# report


def jax_kernels_per_step(dev, size=(64, 64, 512, 512)):
    """What XLA compiles a step of the JAX cell to (``lstm_multi.bench.hlo``): GEMMs,
    elementwise fusions and data moves per step, forward and VJP, per variant; the
    issue asks whether a step is one GEMM and one fusion on a GPU. An error string
    when JAX has no such device."""
    try:
        import jax
        import jax.numpy as jnp

        import lstm_multi
        from lstm_multi.bench import hlo

        device = jax.devices("gpu" if dev == "cuda" else "cpu")[0]
        steps, batch, inputs, hidden = size
        report = {"size": size, "device": str(device)}
        with jax.default_device(device):
            for variant in ("lstm", "peephole"):
                cell = lstm_multi.get_cell("jax")(inputs, hidden, variant=variant)
                x = jnp.ones((steps, batch, inputs), jnp.float32)
                report[variant] = hlo.cell_report(cell, cell.init(seed=0), x)
        return report
    except Exception as error:  # noqa: BLE001 - recorded, the check goes on
        return {"error": f"{type(error).__name__}: {error}"}


def _ms(entry):
    return f"{entry['median_ms']:.2f}" if isinstance(entry, dict) else "–"


def markdown(result):
    env, tests = result["environment"], result["tests"]
    lines = ["# GPU check", ""]
    lines.append(
        f"- GPU: {env.get('gpu', 'none')}; torch {env.get('torch')} (CUDA "
        f"{env.get('torch_cuda')}, cuDNN {env.get('cudnn')}); jax {env.get('jax')}; "
        f"cupy {env.get('cupy')}; Python {env.get('python')}"
    )
    if tests:
        lines.append(
            f"- GPU tests (`{tests['command']}`): {tests['summary']} ({tests['seconds']} s)"
        )
        for reason in tests["skip_reasons"]:
            lines.append(f"  - skipped: {reason}")
        for test in tests.get("failed", []):
            lines.append(f"  - FAILED: {test}")
    kernels = result.get("jax_hlo") or {}
    if "error" in kernels:
        lines.append(f"- JAX kernels per step: not measured ({kernels['error']})")
    elif kernels:
        lines.append(
            f"- JAX kernels per step on {kernels['device']} (T, B, I, H = {kernels['size']}; "
            "GEMMs / elementwise fusions / data moves per step, from the optimized HLO):"
        )
        for variant in ("lstm", "peephole"):
            for phase, loops in kernels.get(variant, {}).items():
                counts = ", ".join(
                    f"{loop['gemm']:g} / {loop['elementwise']:g} / {loop['data']:g}"
                    for loop in loops
                )
                lines.append(f"  - {variant} {phase}: {counts} (one entry per loop)")
    settings = result["settings"]
    lines.append(
        f"- benchmark on {settings.get('device', 'cuda')}: TF32 off, batch_first, 1 layer, 1 direction; "
        f"median of {settings['repeats']} timed calls after warm-up, device synchronised;"
        f" times in ms"
    )
    for name, why in result.get("unavailable", {}).items():
        lines.append(f"- {name}: not benchmarked ({why})")
    lines.append("")
    rows = [r for r in result.get("benchmark", []) if r.get("status") == "ok"]

    def case(r):
        return r["T"], r["B"], r["I"], r["H"], r.get("dtype", "float32")

    base = {case(r): r for r in rows if r["backend"] == BASELINE}
    lines.append(
        "| T | B | I=H | dtype | backend | variant | forward | fwd+bwd | forward vs cuDNN |"
        " fwd+bwd vs cuDNN |"
    )
    lines.append("|---|---|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        ref = base.get(case(r))
        ratios = []
        for mode in ("forward", "forward+backward"):
            ok = ref and isinstance(ref.get(mode), dict) and isinstance(r.get(mode), dict)
            ratios.append(f"{r[mode]['median_ms'] / ref[mode]['median_ms']:.2f}x" if ok else "–")
        lines.append(
            f"| {r['T']} | {r['B']} | {r['I']} | {r.get('dtype', 'float32')} | "
            f"{r['backend']} | {r['variant']} | "
            f"{_ms(r.get('forward'))} | {_ms(r.get('forward+backward'))} | "
            f"{ratios[0]} | {ratios[1]} |"
        )
    others = [
        r
        for r in result.get("benchmark", [])
        if r.get("status") != "ok" and not str(r.get("status", "")).startswith("n/a")
    ]
    warned = [r for r in result.get("benchmark", []) if r.get("warnings")]
    if warned:
        lines += ["", "Warnings (a time beside one may be of the path without its graph):", ""]
        lines += [
            f"- {r['backend']} {r['variant']} T={r['T']} B={r['B']} H={r['H']} "
            f"{r.get('dtype', 'float32')}: {'; '.join(r['warnings'])}"
            for r in warned
        ]
    if others:
        lines += ["", "Not measured:", ""]
        lines += [
            f"- {r['backend']} {r['variant']} T={r['T']} B={r['B']} H={r['H']} "
            f"{r.get('dtype', 'float32')}: {r['status']}"
            for r in others
        ]
    return "\n".join(lines) + "\n"


def _case_text(case):
    *size, dtype, variants, which = case
    return "x".join(map(str, size)) + f":{dtype}"


def parse_cases(text):
    """``TxBxIxH[:dtype],...`` -> cases with every variant and every runner."""
    cases = []
    for item in text.split(","):
        shape, _, dtype = item.partition(":")
        size = tuple(int(n) for n in shape.split("x"))
        if len(size) != 4 or dtype not in ("", "float32", "bfloat16", "float16"):
            raise SystemExit(f"--sizes: expected TxBxIxH[:float32|bfloat16|float16], got {item!r}")
        cases.append((*size, dtype or "float32", VARIANTS, "all"))
    return tuple(cases)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=290.0,
        help="the whole check's time budget in seconds (default 290)",
    )
    parser.add_argument(
        "--sizes",
        default=None,
        help="TxBxIxH[:dtype],... every variant and runner at each (default: the "
        "cases of CASES: " + ", ".join(_case_text(c) for c in CASES) + ")",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="try the script itself without a GPU: torch and jax on the CPU",
    )
    parser.add_argument("--tests-timeout-s", type=float, default=180.0)
    parser.add_argument("--per-test-timeout-s", type=float, default=60.0)
    parser.add_argument(
        "--examples",
        type=int,
        default=4,
        help="hypothesis examples per GPU property test (default 4)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = CASES if args.sizes is None else parse_cases(args.sizes)
    dev = "cpu" if args.cpu else "cuda"
    result = {
        "environment": environment(),
        "tests": None,
        "benchmark": [],
        "settings": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "tf32": False,
            "cases": [_case_text(c) for c in cases],
            "budget_s": args.budget_s,
            "device": dev,
        },
    }
    print(json.dumps(result["environment"], indent=1), flush=True)
    if not args.skip_tests:
        timeout = max(30.0, min(args.tests_timeout_s, args.budget_s - 90.0))
        result["tests"] = run_tests(out, timeout, args.examples, args.per_test_timeout_s)
        print("tests:", result["tests"]["summary"], flush=True)
    result["jax_hlo"] = jax_kernels_per_step(dev)
    print("jax kernels per step:", json.dumps(result["jax_hlo"]), flush=True)
    if not args.skip_bench:
        deadline = start + args.budget_s - 10.0
        result["benchmark"], result["unavailable"] = run_benchmark(
            deadline, args.repeats, args.warmup, cases, dev
        )
    result["seconds"] = round(time.perf_counter() - start, 1)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    text = markdown(result)
    (out / "gpu_check.md").write_text(text)
    print(text, flush=True)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {result['seconds']} s")
    tests_ok = result["tests"] is None or result["tests"]["returncode"] == 0
    return 0 if tests_ok else 1


if __name__ == "__main__":
    sys.exit(main())
