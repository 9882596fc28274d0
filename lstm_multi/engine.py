"""The engine table: every way a backend can run a layer-direction's time loop, and the
one rule that picks one per call.

An *engine* runs one direction of one layer over a whole sequence: the forward, with
what its backward needs, and that backward. Every engine computes the same function,
the spec's (each is tested against the independent oracle); they differ in where the
work runs and how many host calls a step costs:

=========================  =========  ==========================================================
engine                     backends   what runs
=========================  =========  ==========================================================
``native``                 torch      PyTorch's own LSTM kernel (``torch._VF.lstm``: cuDNN on
                                      CUDA), plain ``"lstm"`` math only
``cpu_kernels``            numpy,     the variant's generated C++ (a fused gate step, the
                           torch      whole loop in C where steps are small), framework BLAS
``array``                  numpy,     the generated array code in a Python time loop
                           torch
``triton``                 torch      one generated Triton kernel per step, each way
``triton_persistent``      torch      the whole loop in one generated Triton launch
``graphed_array``          torch      ``array``'s per-step loop replayed from CUDA graphs
``graphed_triton``         torch      ``triton``'s per-step loop replayed from CUDA graphs
``graphed_triton_persis``  torch      ``triton_persistent`` replayed from CUDA graphs
``tent``
``cupy_kernels``           cupy       one generated fused CUDA C kernel per step, cuBLAS
``cupy_graphed``           cupy       ``cupy_kernels``' loop replayed from CUDA graphs
``scan``                   jax        ``lax.scan`` under ``jit``, BPTT in a reverse scan
``pallas_persistent``      jax        the whole loop in one generated Pallas kernel
=========================  =========  ==========================================================

``engines()`` lists them (``engine_table()`` as Markdown). A cell's ``engine`` argument
names one, or ``"auto"`` (the default): the first engine of ``AUTO_ORDER[backend,
device]`` that can run the call (``Engine.refusal`` is None). A named engine that cannot
run a call falls back along ``Engine.fallback`` (``triton_persistent`` -> ``triton`` ->
``array``; ``native`` -> ``"auto"``), as the older spellings did (``gate_kernel="triton"``
on CPU tensors ran the array code), and the ``Choice`` says so. ``select_engine`` makes
the choice; ``cell.explain(x)`` shows it for a call, ``cell.last_choice`` for the last.

The auto order is measured, not habit (``benchmarks/NOTES.md``): an engine enters it on a
device only after a run there showed it correct and fastest. Engines outside it run only
when named; ``Engine.auto_note`` says why each one is outside.

Pure Python and framework-free: whether a framework is installed is asked of
``importlib.util.find_spec``, never by importing it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

from . import environment, spec
from .kernels import build

__all__ = [
    "AUTO",
    "AUTO_ORDER",
    "Case",
    "Choice",
    "Engine",
    "engine_names",
    "engine_table",
    "engines",
    "get_engine",
    "select_engine",
]

#: the engine name that asks for the table's choice
AUTO = "auto"

#: dtypes by name
_FLOATS = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class Case:
    """What the choice of an engine depends on, for one call of a cell.

    backend: "numpy", "torch", "jax" or "cupy"; device: the arrays' device type ("cpu",
    "cuda"; JAX's default backend "cpu"/"gpu"/"tpu"); dtype: the compute dtype's name
    (the autocast dtype inside ``torch.autocast``); transform: inside ``torch.func``
    transforms, which see only plain ops; layer_masks: dropout between layers from a
    ``dropout_key`` (the functional cell's; PyTorch's own kernel cannot take them);
    tracing: under ``torch.jit.trace``, which records plain ops only (PyTorch's own
    kernel is one); step_mask: a per-step mask that is not right padding (left padding,
    gaps, a row with no real step; right padding runs as lengths); step_masks: zoneout
    (training or evaluation), recurrent or input dropout inside the time loop
    (``lstm_multi.regularize``), which only the ``REGULARIZING`` engines run.
    """

    backend: str
    device: str
    dtype: str
    variant: spec.Variant
    hidden_size: int
    proj_size: int = 0
    transform: bool = False
    layer_masks: bool = False
    tracing: bool = False
    step_mask: bool = False
    step_masks: bool = False


@dataclass(frozen=True)
class Engine:
    """One way to run a direction's loop: the table's row.

    ``refusal(case)`` is None where the engine can run ``case``, else the reason it
    cannot (a sentence fragment: "needs CUDA tensors, got cpu"). ``fallback``: what runs
    when it is named but refuses ("auto": the table's choice among the rest; None: it
    never refuses a case of its backends). ``spelled``: the older arguments that mean it.
    """

    name: str
    backends: tuple[str, ...]
    summary: str
    devices: str
    dtypes: tuple[str, ...]
    limits: str
    fallback: str | None
    spelled: str
    auto_note: str
    refusal: Callable[[Case], str | None] = field(repr=False, compare=False)

    def runs(self, case: Case) -> bool:
        return case.backend in self.backends and _refusal(self, case) is None


@dataclass(frozen=True)
class Choice:
    """The engine a call runs, and why: ``engine`` (its name), ``requested`` (what the
    cell asked for), ``reason`` (one sentence), ``passed_over`` ((engine, why not) for
    each engine tried before it)."""

    engine: str
    requested: str
    reason: str
    passed_over: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        lines = [f"engine {self.engine!r} (asked: {self.requested!r}): {self.reason}"]
        lines += [f"  not {name!r}: {why}" for name, why in self.passed_over]
        return "\n".join(lines)


# eligibility --------------------------------------------------------------------------


def _first(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r is not None), None)


def _dtype_in(case: Case, dtypes) -> str | None:
    if case.dtype in dtypes:
        return None
    return f"takes {', '.join(dtypes)}, got {case.dtype}"


def _installed(package: str, extra: str) -> str | None:
    if importlib.util.find_spec(package) is None:
        return f"needs {package}, which is not installed (pip install 'lstm_multi[{extra}]')"
    return None


def _no_transform(case: Case) -> str | None:
    if case.transform:
        return "torch.func transforms see only plain torch ops (the array loop runs there)"
    if case.tracing:
        return "torch.jit.trace records only plain torch ops (the array loop runs there)"
    return None


def _cuda(case: Case) -> str | None:
    return None if case.device == "cuda" else f"needs CUDA tensors, got {case.device}"


def _native_refusal(case: Case) -> str | None:
    if not spec.computes_lstm(case.variant):
        return f"PyTorch's kernel computes only the plain 'lstm' math, not {case.variant.name!r}"
    if case.layer_masks:
        return "PyTorch's kernel cannot take the cell's dropout masks between layers"
    if case.step_mask:
        return (
            "PyTorch's kernel takes right-padded lengths only, not a mask with left padding, "
            "gaps or a row with no real step"
        )
    if case.transform:
        return "torch.func transforms see only plain torch ops (the array loop runs there)"
    return None


def _kernel_math(case: Case, kernels: str, cpu=False) -> str | None:
    """Why ``kernels`` cannot run the case's gate math yet: row reductions and array-only
    operations or split halves (``GatePrograms.kernel_refusal``; the C++ kernels, ``cpu``,
    write both), else None."""
    why = case.variant.programs.kernel_refusal(reductions=cpu, split=cpu)
    if why is None:
        return None
    return f"{why}: not yet in {kernels} (the array code runs {case.variant.name!r})"


def _cpu_kernels_refusal(case: Case) -> str | None:
    kernel_math = _kernel_math(case, "the C++ kernels", cpu=True)
    if kernel_math is not None:
        return kernel_math
    if case.device != "cpu":
        return f"needs host arrays, got {case.device}"
    if not environment.cpu_kernels_enabled():
        return f"turned off ({environment.CPU_KERNELS}=0)"
    if build.host_compiler() is None:
        return "needs a C++ compiler on PATH (none found; CXX names one)"
    return _first(_dtype_in(case, ("float32", "float64")), _no_transform(case))


def _triton_refusal(case: Case) -> str | None:
    # no _kernel_math: the Triton kernels write row reductions, rsqrt and split halves
    device = None if environment.triton_interpret() else _cuda(case)
    return _first(
        device,
        _installed("triton", "triton"),
        _dtype_in(case, ("float16", "bfloat16", "float32")),
        _no_transform(case),
    )


#: the persistent kernels hold U on chip: H up to this (``triton_kernels.TritonKernels``
#: and ``jax_pallas`` use the same bound)
PERSISTENT_MAX_HIDDEN = 64


def _persistent_limits(case: Case) -> str | None:
    if case.proj_size:
        return "has no projection (proj_size > 0)"
    if case.hidden_size > PERSISTENT_MAX_HIDDEN:
        return f"holds U on chip: hidden_size up to {PERSISTENT_MAX_HIDDEN}, got {case.hidden_size}"
    return None


def _graphed_refusal(case: Case) -> str | None:
    """The array loop replayed from CUDA graphs: its gate math is the array code's, which
    runs every variant (row reductions and split halves included)."""
    return _first(_cuda(case), _no_transform(case))


def _graphed_triton_refusal(case: Case) -> str | None:
    """The graph replay's own conditions for the Triton engines: their gate math is the
    Triton kernels' (``_triton_refusal``), which write row reductions and split halves."""
    return _first(_cuda(case), _no_transform(case))


def _pallas_refusal(case: Case) -> str | None:
    # no _kernel_math: the Pallas kernels call the variant's array code on whole-row
    # tiles, so they run row reductions, rsqrt and split halves (``jax_pallas``)
    return _first(
        _dtype_in(case, ("float16", "bfloat16", "float32")),
        _persistent_limits(case),
    )


def _never(case: Case) -> str | None:
    return None


#: the engines that run zoneout, recurrent and input dropout (``lstm_multi.regularize``): the
#: array loops, differentiated by hand (NumPy) or by the framework (torch, JAX), and CuPy's
#: step loop, the NumPy loop on CuPy arrays (its gate math in the fused kernel)
REGULARIZING = ("array", "scan", "cupy_kernels")


def _refusal(engine: Engine, case: Case) -> str | None:
    """``engine.refusal(case)``, and a refusal of zoneout / recurrent / input dropout by the
    engines outside ``REGULARIZING`` (their kernels have no such step yet)."""
    if case.step_masks and engine.name not in REGULARIZING:
        return (
            "its kernels run no zoneout, recurrent dropout or input dropout (the array loop "
            f"does: engines {', '.join(REGULARIZING)})"
        )
    return engine.refusal(case)


def _check_regularizable(case: Case) -> None:
    """A ValueError where a case with zoneout / recurrent / input dropout has no engine."""
    if case.step_masks and not any(e.name in REGULARIZING for e in engines(case.backend)):
        raise ValueError(
            f"zoneout / recurrent_dropout / input_dropout: no engine of the {case.backend} "
            "backend runs them yet (the numpy, torch, jax and cupy backends do: engines "
            f"{', '.join(REGULARIZING)})"
        )


_NOT_ON_GPU_YET = (
    "not in auto: it has not been verified and timed at HEAD on a GPU (benchmarks/results/gpu/)"
)

_TABLE = (
    Engine(
        "native",
        ("torch",),
        "PyTorch's own LSTM kernel (torch._VF.lstm, what nn.LSTM runs: cuDNN on CUDA)",
        "cpu, cuda",
        _FLOATS,
        "variant 'lstm' only; not under torch.func; no dropout_key masks; a step mask only as right padding",
        "auto",
        "native=True",
        "first in auto for 'lstm' (cuDNN on CUDA; on an AMD EPYC it beat cpu_kernels, NOTES 13)",
        _native_refusal,
    ),
    Engine(
        "cpu_kernels",
        ("numpy", "torch"),
        "the variant's generated C++: a fused gate step per call, or the whole loop in C",
        "cpu",
        ("float32", "float64"),
        "a C++ compiler on PATH (built on first use, cached)",
        "array",
        "the default on host float32/float64 arrays",
        "first in auto on the CPU for every variant but 'lstm' (native's)",
        _cpu_kernels_refusal,
    ),
    Engine(
        "array",
        ("numpy", "torch"),
        "the generated array code in a Python time loop (torch: one autograd node a direction)",
        "any",
        _FLOATS,
        "none",
        None,
        "gate_kernel='array'",
        "last in auto everywhere: it runs every case",
        _never,
    ),
    Engine(
        "triton",
        ("torch",),
        "each step's gate math as one generated Triton kernel forward and one backward",
        "cuda (any device under TRITON_INTERPRET=1)",
        ("float16", "bfloat16", "float32"),
        "triton installed",
        "array",
        "gate_kernel='triton'",
        _NOT_ON_GPU_YET,
        _triton_refusal,
    ),
    Engine(
        "triton_persistent",
        ("torch",),
        "each direction's whole loop in one launch of the generated persistent Triton kernels",
        "cuda (any device under TRITON_INTERPRET=1)",
        ("float16", "bfloat16", "float32"),
        f"hidden_size <= {PERSISTENT_MAX_HIDDEN}, no projection; triton installed",
        "triton",
        "gate_kernel='triton_persistent'",
        _NOT_ON_GPU_YET,
        lambda case: _first(_triton_refusal(case), _persistent_limits(case)),
    ),
    Engine(
        "graphed_array",
        ("torch",),
        "the array engine's per-step loop replayed from a CUDA graph per shape",
        "cuda",
        _FLOATS,
        "CUDA tensors",
        "auto",
        "cuda_graphs=True",
        _NOT_ON_GPU_YET,
        _graphed_refusal,
    ),
    Engine(
        "graphed_triton",
        ("torch",),
        "the Triton engine's per-step loop replayed from a CUDA graph per shape",
        "cuda",
        ("float16", "bfloat16", "float32"),
        "CUDA tensors; triton installed",
        "triton",
        "gate_kernel='triton', cuda_graphs=True",
        "not in auto: 0.74x cuDNN's float32 forward on an H100 at commit 37fbb62, but the "
        "graph replay at HEAD has not run on a GPU (issue 20)",
        lambda case: _first(_graphed_triton_refusal(case), _triton_refusal(case)),
    ),
    Engine(
        "graphed_triton_persistent",
        ("torch",),
        "the persistent Triton engine replayed from a CUDA graph per shape",
        "cuda",
        ("float16", "bfloat16", "float32"),
        f"CUDA tensors; hidden_size <= {PERSISTENT_MAX_HIDDEN}, no projection; triton installed",
        "graphed_triton",
        "gate_kernel='triton_persistent', cuda_graphs=True",
        _NOT_ON_GPU_YET,
        lambda case: _first(
            _graphed_triton_refusal(case), _triton_refusal(case), _persistent_limits(case)
        ),
    ),
    Engine(
        "cupy_kernels",
        ("cupy",),
        "one generated fused CUDA C kernel per step each way, cuBLAS for the products",
        "cuda",
        ("float16", "float32", "float64"),
        "none: a variant with row reductions (layernorm) runs row kernels, one thread block "
        "a batch row",
        None,
        "the CuPy default",
        "the CuPy backend's only direct engine",
        _never,
    ),
    Engine(
        "cupy_graphed",
        ("cupy",),
        "the cupy_kernels loop, forward and backward, replayed from CUDA graphs",
        "cuda",
        ("float16", "float32", "float64"),
        "none",
        "cupy_kernels",
        "cuda_graphs=True",
        "not in auto: no gain measured on an H100 (benchmarks/results/gpu/)",
        _never,
    ),
    Engine(
        "scan",
        ("jax",),
        "jax.lax.scan under jit; a custom VJP runs the BPTT in a reverse scan",
        "any",
        _FLOATS,
        "none",
        None,
        "the JAX default",
        "the JAX backend's default",
        _never,
    ),
    Engine(
        "pallas_persistent",
        ("jax",),
        "each direction's whole loop in one generated Pallas kernel (Pallas's interpreter on "
        "the CPU: for tests)",
        "gpu (interpreted on cpu)",
        ("float16", "bfloat16", "float32"),
        f"hidden_size <= {PERSISTENT_MAX_HIDDEN}, no projection; reverse mode only",
        "scan",
        "kernel='pallas_persistent'",
        _NOT_ON_GPU_YET,
        _pallas_refusal,
    ),
)

_BY_NAME = {engine.name: engine for engine in _TABLE}

#: (backend, device) -> the engines "auto" tries, in order; the last runs every case
AUTO_ORDER: dict[tuple[str, str], tuple[str, ...]] = {
    ("torch", "cpu"): ("native", "cpu_kernels", "array"),
    ("torch", "cuda"): ("native", "array"),
    ("numpy", "cpu"): ("cpu_kernels", "array"),
    ("cupy", "cuda"): ("cupy_kernels",),
    ("jax", "cpu"): ("scan",),
    ("jax", "gpu"): ("scan",),
    ("jax", "tpu"): ("scan",),
}

#: backend -> the order for a device with no row of its own
_AUTO_OTHER_DEVICE = {
    "torch": ("native", "array"),
    "numpy": ("array",),
    "cupy": ("cupy_kernels",),
    "jax": ("scan",),
}


def engines(backend: str | None = None) -> list[Engine]:
    """The engine table (every engine, or those of ``backend``), in the table's order."""
    return [e for e in _TABLE if backend is None or backend in e.backends]


def engine_names(backend: str | None = None) -> list[str]:
    """The names ``engine=`` takes on ``backend`` (every backend's if None), "auto" first."""
    return [AUTO, *(e.name for e in engines(backend))]


def get_engine(name: str) -> Engine:
    """The engine called ``name``; a ValueError lists the names."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"engine: expected one of {engine_names()}, got {name!r}") from None


def check_engine(backend: str, name) -> str:
    """``name`` checked for a cell of ``backend``: "auto" or one of its engines."""
    if name == AUTO:
        return AUTO
    engine = get_engine(name)
    if backend not in engine.backends:
        raise ValueError(
            f"engine: {name!r} runs on the {'/'.join(engine.backends)} backend, not "
            f"{backend!r}; this backend's engines are {engine_names(backend)}"
        )
    return name


def auto_order(backend: str, device: str) -> tuple[str, ...]:
    """The engines ``"auto"`` tries for ``backend`` on ``device``, in order."""
    if backend not in _AUTO_OTHER_DEVICE:
        raise ValueError(
            f"backend: expected one of {sorted(_AUTO_OTHER_DEVICE)} (a cell's ``backend`` "
            f"names the engines it runs), got {backend!r}"
        )
    return AUTO_ORDER.get((backend, device), _AUTO_OTHER_DEVICE[backend])


def select_engine(case: Case, requested: str = AUTO, exclude: tuple[str, ...] = ()) -> Choice:
    """The engine a call described by ``case`` runs, for the cell's ``engine=`` argument.

    ``"auto"``: the first engine of ``auto_order`` that can run the case. A named
    engine: itself where it can, else its ``fallback`` chain (a fallback of "auto"
    continues with the auto order). ``exclude``: engines auto must not pick (the torch
    cell's ``native=False``). The returned ``Choice`` names the engines passed over and
    why.
    """
    requested = check_engine(case.backend, requested)
    _check_regularizable(case)
    passed_over: list[tuple[str, str]] = []
    name = requested
    while name != AUTO:
        why = _refusal(_BY_NAME[name], case)
        if why is None:
            reason = "asked for by name" if name == requested else f"the fallback of {requested!r}"
            return Choice(name, requested, reason, tuple(passed_over))
        passed_over.append((name, why))
        fallback = _BY_NAME[name].fallback
        if fallback is None:  # pragma: no cover - an engine without a fallback never refuses
            raise AssertionError(f"engine {name!r} refused {case}")
        name = fallback
    order = auto_order(case.backend, case.device)
    tried = {n for n, _ in passed_over}
    for name in order:
        if name in tried:
            continue
        why = (
            "excluded by the cell's options" if name in exclude else _refusal(_BY_NAME[name], case)
        )
        if why is None:
            where = f"{case.backend} on {case.device}"
            return Choice(
                name, requested, f"the first engine of auto's order for {where} that runs it",
                tuple(passed_over),
            )  # fmt: skip
        passed_over.append((name, why))
    raise AssertionError(f"no engine of {order} runs {case}")  # the last runs every case


def engine_table(backend: str | None = None) -> str:
    """The engine table as Markdown: name, backends, devices, dtypes, limits, old
    spelling, and whether and where auto picks it."""
    rows = [
        "| engine | backends | devices | dtypes | limits | also spelled | auto |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in engines(backend):
        rows.append(
            f"| `{e.name}` | {', '.join(e.backends)} | {e.devices} | {', '.join(e.dtypes)} | "
            f"{e.limits} | {e.spelled} | {e.auto_note} |"
        )
    return "\n".join(rows)
