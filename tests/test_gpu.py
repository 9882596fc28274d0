"""GPU execution: the CuPy backend, torch on CUDA, JAX on GPU, half precision.

Two kinds of tests live here:

* ``@pytest.mark.gpu`` tests run the core properties on every GPU backend
  (cupy, torch-cuda generic and native, jax-gpu): float64 and float32 (TF32
  off) against the independent oracle (``oracle.py``), float16/bfloat16
  against a float32 run with the derived bounds of ``half_precision.py``, and
  torch.autocast on CUDA; without a GPU they are skipped with the reason shown
  (``pytest -rs``).
* CPU tests of everything GPU code is made of that can run without a GPU:
  the fused kernels' source (executed by NumPy, compiled by a host C++
  compiler, and compiled by NVRTC where CuPy and NVRTC are installed), the
  CuPy ops' plumbing run with NumPy arrays, the half-precision policy, and the
  errors when CuPy has no CUDA device.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import importlib.machinery
import importlib.util
import itertools
import os
import re
import sys
import types

import numpy as np
import pytest
from conftest import assert_close, scaled
from doubles import ProgramKernels
from half_precision import FORGETFUL, INTEGRATOR, assert_within_bound, errors_in_u
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import CORE_VARIANTS, KERNEL_VARIANTS, Config, configs, make_problem, reference
from test_agreement import assert_matches_reference, run_cell
from test_compile import oracle_gates

import lstm_multi
from lstm_multi import spec
from lstm_multi.backends import cupy_kernels as ck
from lstm_multi.backends.numpy_backend import ArrayModuleCell
from lstm_multi.compile import emit_cuda
from lstm_multi.kernels.build import compile_library, host_compiler
from lstm_multi.kernels.host_kernels import HostKernels
from lstm_multi.ops import ArrayModuleOps

VARIANTS = list(KERNEL_VARIANTS)  # reductions: tests/test_layernorm.py
NP_OPS = ArrayModuleOps(np)
GPU_EXAMPLES = int(os.environ.get("LSTM_MULTI_GPU_EXAMPLES", "10"))


def _gate_inputs(rng, name, batch, hidden, dtype="float64"):
    variant = spec.VARIANTS[name]
    z = rng.normal(size=(batch, 4 * hidden)) * 2
    c_prev = rng.normal(size=(batch, hidden))
    extra = {k: rng.normal(size=s) for k, s in variant.extra_param_shapes(hidden).items()}
    dh, dc = rng.normal(size=(batch, hidden)), rng.normal(size=(batch, hidden))
    cast = lambda a: a.astype(dtype)  # noqa: E731
    return cast(z), cast(c_prev), {k: cast(v) for k, v in extra.items()}, cast(dh), cast(dc)


# ---------------------------------------------------------------------------
# the kernel source against the spec (CPU)


@pytest.mark.parametrize("name", VARIANTS)
@settings(max_examples=scaled(10), deadline=None)
@given(batch=st.integers(1, 5), hidden=st.integers(1, 7), seed=st.integers(0, 2**31))
def test_program_kernels_equal_oracle_gates(name, batch, hidden, seed):
    """The kernels' programs evaluated node by node (``ProgramKernels``) against the
    oracle's gate math (``test_compile.oracle_gates``), forward and backward."""
    variant = spec.VARIANTS[name]
    z, c_prev, extra, dh, dc = _gate_inputs(np.random.default_rng(seed), name, batch, hidden)
    kernels = ProgramKernels()
    kh, kc, kcache = kernels.forward(variant, z, c_prev, extra)
    kdz, kdc_prev, terms = kernels.backward(variant, dh, dc, kcache, extra)
    h, c, dz, dc_prev, dextra = oracle_gates(name, z, c_prev, extra, dh, dc)
    for what, got, want in [("h", kh, h), ("c", kc, c), ("dz", kdz, dz), ("dc", kdc_prev, dc_prev)]:
        assert_close(got, want, "float64", f"{name} {what}")
    assert set(terms) == set(dextra) == set(variant.params)
    for k in dextra:
        assert_close(terms[k].sum(0), dextra[k], "float64", f"{name} d{k}")


HOST_TYPES = [("double", "double"), ("float", "float"), ("float", "double")]


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    """The generated kernels compiled on the host on first use, per variant and (T, S),
    cached in a temporary folder: ``host_kernels(name, t, s)``."""
    if host_compiler() is None:
        pytest.skip("no host C++ compiler (g++ or clang++) to compile the kernel source")
    cache, built = str(tmp_path_factory.mktemp("cache")), {}

    def build(name, t, s):
        if (name, t, s) not in built:
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("LSTM_MULTI_CACHE", cache)
                built[name, t, s] = HostKernels(spec.VARIANTS[name], t, s)
        return built[name, t, s]

    return build


#: each compilation takes a second or two: the default run compiles every variant in
#: double and the mixed types for one variant; the thorough run the product
HOST_CASES = [
    case
    if case[1] == HOST_TYPES[0] or case[0] == "peephole"
    else pytest.param(*case, marks=pytest.mark.thorough_only("double, and peephole's types"))
    for case in itertools.product(VARIANTS, HOST_TYPES)
]


@pytest.mark.parametrize("name,types_", HOST_CASES)
def test_kernel_c_source_compiled_on_host_equals_program(host_kernels, name, types_):
    """The exact C++ operations the GPU kernels run, compiled by the host compiler,
    against the program's NumPy evaluation in float64 on the same (rounded) inputs."""
    kernels = host_kernels(name, *types_)
    T, S = kernels.T, kernels.S
    variant = spec.VARIANTS[name]
    rng = np.random.default_rng(7)
    z, c_prev, extra, dh, dc = _gate_inputs(rng, name, 3, 5)
    z, dh, extra = z.astype(T), dh.astype(T), {k: v.astype(T) for k, v in extra.items()}
    c_prev, dc = c_prev.astype(S), dc.astype(S)
    wide = {k: v.astype(np.float64) for k, v in extra.items()}
    evaluate = ProgramKernels()
    h, c, saved = evaluate.forward(variant, z.astype(np.float64), c_prev.astype(np.float64), wide)
    kh, kc, k_saved = kernels.forward(z, c_prev, extra)
    tol = dict(rtol=1e-12, atol=1e-13) if T is np.float64 else dict(rtol=2e-5, atol=2e-6)
    assert kh.dtype == T and kc.dtype == S and all(a.dtype == S for a in k_saved)
    for got, want in zip((kh, kc, *k_saved), (h, c, *saved), strict=True):
        np.testing.assert_allclose(got, want, **tol)
    # backward from the kernel's own saved values
    dz, dc_prev, terms = evaluate.backward(
        variant, dh.astype(np.float64), dc.astype(np.float64),
        tuple(a.astype(np.float64) for a in k_saved), wide,
    )  # fmt: skip
    k_dz, k_dc_prev, k_terms = kernels.backward(dh, dc, k_saved, extra)
    np.testing.assert_allclose(k_dz, dz, **tol)
    np.testing.assert_allclose(k_dc_prev, dc_prev, **tol)
    assert set(k_terms) == set(terms) == set(variant.params)
    for k in variant.params:
        np.testing.assert_allclose(k_terms[k], terms[k], **tol)


def _nvrtc_toolchain():
    """cupy's kernel generator and NVRTC, usable without a GPU, or a skip."""
    if importlib.util.find_spec("cupy") is None:
        pytest.skip("cupy is not installed (pip install cupy-cuda12x) to generate the CUDA code")
    try:
        import cupy
        from cupy._core import _carray, _kernel, _scalar, core
        from cupy.cuda import compiler

        compiler._get_nvrtc_version()
    except Exception as error:  # no NVRTC library, or cupy internals moved
        pytest.skip(f"NVRTC through cupy is not usable here ({type(error).__name__}: {error})")
    return cupy, _carray, _kernel, _scalar, core, compiler


@pytest.mark.parametrize("name", VARIANTS)
def test_cuda_kernels_compile_with_nvrtc(name):
    """cupy generates each ElementwiseKernel's CUDA code and NVRTC compiles it (no GPU needed).

    Uses cupy internals (the argument metadata an ElementwiseKernel call would
    build); it checks that the generated CUDA C++ compiles for every dtype pair.
    """
    cupy, _carray, _kernel, _scalar, core, compiler = _nvrtc_toolchain()
    kernels = ck.CudaKernels(cupy)
    header = "".join(f"#include <{h}>\n" for h in core._cupy_header_list)
    options = tuple(core.assemble_cupy_compiler_options(())) + (
        "-arch=compute_80",
        "--device-as-default-execution-space",
    )
    for direction, (io, state) in itertools.product(
        ("forward", "backward"),
        [("float16", "float32"), ("float32", "float32"), ("float64", "float64")],
    ):
        ek = kernels.kernels(spec.VARIANTS[name])[direction == "backward"]
        dtypes = {"T": np.dtype(io).type, "S": np.dtype(state).type}
        in_types = tuple(None if p.ctype == "long long" else dtypes[p.ctype] for p in ek.in_params)
        out_types = tuple(dtypes[p.ctype] for p in ek.out_params)
        _, _, type_map = ek._decide_params_type(in_types, out_types)
        infos = []
        for p in ek.in_params + ek.out_params:
            if p.ctype == "long long":
                infos.append(_kernel._ArgInfo(3, _scalar.CScalar, np.int64, 0, True, True))
            else:
                infos.append(
                    _kernel._ArgInfo(
                        1, cupy.ndarray, dtypes[p.ctype], 2 if p.raw else 1, True, True
                    )
                )
        infos.append(_kernel._ArgInfo(2, _carray.Indexer, None, 1, True, True))
        code = _kernel._get_elementwise_kernel_code(
            tuple(infos), type_map, ek.params, ek.operation, ek.name, ek.preamble
        )
        program = compiler._NVRTCProgram(header + code, "kern.cu", (), (), method="ptx")
        ptx, _ = program.compile(options)
        assert len(ptx) > 0, (name, direction, io)


def test_cuda_row_kernels_compile_with_nvrtc():
    """The row kernels' text (what CudaKernels gives ``cupy.RawKernel``) compiles with NVRTC
    for every dtype pair, float16 through CuPy's ``float16`` (no GPU needed): both kernels
    of a layer-normalised variant, under CUDA's definitions of the prelude's macros."""
    cupy, _carray, _kernel, _scalar, core, compiler = _nvrtc_toolchain()
    programs = spec.VARIANTS["layernorm_peephole"].programs
    kernels = (emit_cuda.forward_row_kernel(programs, "ln"),
               emit_cuda.backward_row_kernel(programs, "ln"))  # fmt: skip
    options = (*core.assemble_cupy_compiler_options(()), "-arch=compute_80")
    for io, state in [("float16", "float"), ("float", "float"), ("double", "double")]:
        code = emit_cuda.row_source(kernels, io, state)
        ptx, _ = compiler._NVRTCProgram(code, "kern.cu", (), (), method="ptx").compile(options)
        text = ptx.decode() if isinstance(ptx, bytes) else ptx
        for k in kernels:
            assert f".entry {k.name}(" in text, (k.name, io)
        assert "bar.sync" in text, io  # __syncthreads(): the barriers are CUDA's


# ---------------------------------------------------------------------------
# the CuPy ops' plumbing, run with NumPy arrays (CPU)


class ReferenceNumpyCell(ArrayModuleCell):
    """The NumPy-like cell on the reference loop (what the CuPy backend runs), plain NumPy ops."""

    backend = "numpy"  # its engines: the array loop (these ops give the CPU kernels no memory)
    ops = ArrayModuleOps(np)


class ProgramFusedOps(ck.FusedOps):
    """``FusedOps`` over ``ProgramKernels`` that, like CuPy's arrays, never take the CPU
    kernels: every step goes through the fused hooks (else NumPy float32/float64 arrays
    would run the compiled CPU kernels and this would compare them with themselves)."""

    def cpu_scalar(self, x):
        return None


class FusedNumpyCell(ArrayModuleCell):
    """The CuPy backend's plumbing (``FusedOps``) with the kernels' programs evaluated by
    NumPy (``ProgramKernels``) in place of the CUDA kernels."""

    backend = "cupy"  # its engines: the CuPy plumbing, with the kernels on the host
    ops = ProgramFusedOps(ProgramKernels())


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@settings(max_examples=scaled(6), deadline=None)
@given(
    layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    steps=st.integers(1, 6),
    batch=st.integers(1, 4),
    use_lengths=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_fused_ops_on_program_kernels_equal_numpy_backend(
    name, dtype, layers, bidirectional, batch_first, steps, batch, use_lengths, seed
):
    """``FusedOps`` (the CuPy backend's fused hooks, in-place gemm accumulation, parameter
    reductions, half policy) on ``ProgramKernels`` (the kernels' programs evaluated by
    NumPy; ``CudaKernels`` itself is tested by ``test_cuda_kernels_host_side_matches_oracle``)
    give the NumPy backend's numbers, to the rounding that
    separates the kernels' two-branch sigmoid from NumPy's 1 / (1 + exp(-z)) (one
    unit in the last place of the dtype, carried through the steps)."""
    rng = np.random.default_rng(seed)
    kw = dict(
        input_size=3,
        hidden_size=4,
        variant=name,
        num_layers=layers,
        bidirectional=bidirectional,
        batch_first=batch_first,
    )
    ref, fused = ReferenceNumpyCell(**kw), FusedNumpyCell(**kw)
    params = ref.init(seed=seed % 1000, dtype=dtype)
    shape = (batch, steps, 3) if batch_first else (steps, batch, 3)
    x = rng.normal(size=shape).astype(dtype)
    lengths = rng.integers(1, steps + 1, size=batch) if use_lengths else None
    state = tuple(rng.normal(size=ref.state_shape(batch)).astype(dtype) for _ in range(2))
    y_ref, (h_ref, c_ref) = ref(params, x, state, lengths)
    y, (h, c) = fused(params, x, state, lengths)
    dy = rng.normal(size=y.shape).astype(dtype)
    dh_n, dc_n = (rng.normal(size=h.shape).astype(dtype) for _ in range(2))
    g_ref, dx_ref, d0_ref = ref.vjp(params, x, dy, state, lengths, dh_n, dc_n)
    g, dx, d0 = fused.vjp(params, x, dy, state, lengths, dh_n, dc_n)
    tol = {"float64": 1e-12, "float32": 2e-5, "float16": 4e-3}[dtype]
    for a, b in [(y, y_ref), (h, h_ref), (c, c_ref), (dx, dx_ref), *zip(d0, d0_ref, strict=True)]:
        assert a.dtype == b.dtype == np.dtype(dtype)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    for gl, rl in zip(g, g_ref, strict=True):
        for gd, rd in zip(gl, rl, strict=True):
            assert set(gd) == set(rd)
            for k in rd:
                assert gd[k].dtype == rd[k].dtype == np.dtype(dtype)
                np.testing.assert_allclose(gd[k], rd[k], rtol=tol, atol=tol)


def test_fused_add_matmul_accumulates_in_place():
    ops = ck.FusedOps(ProgramKernels())
    rng = np.random.default_rng(0)
    z, a, b = rng.normal(size=(3, 8)), rng.normal(size=(3, 2)), rng.normal(size=(2, 8))
    expected = z + a @ b
    scratch = z.copy()
    out = ops.add_matmul(scratch, a, b)
    assert out is scratch
    np.testing.assert_allclose(out, expected, rtol=1e-14)


# ---------------------------------------------------------------------------
# CudaKernels' host-side logic, run without a GPU (CPU)
#
# ``CudaKernels`` is given a stand-in for the ``cupy`` module: NumPy arrays, each
# ``ElementwiseKernel`` built from exactly the strings CudaKernels passes (its
# parameters and operation) and run by the host C++ compiler in a loop, as
# ElementwiseKernel runs them on the GPU, and ``cupy.cublas.gemm`` written here from
# cuBLAS's documented semantics. What runs is CudaKernels' own code: which arrays it
# allocates, the argument order of its kernel calls, and the beta = 1 GEMM that
# accumulates r @ U into the step's slice of x W + b.


def _c_param_list(text):
    """ElementwiseKernel's parameter text ``"raw T z, S c, int64 H"`` -> [(raw, type, name)]."""
    out = []
    for item in text.split(","):
        words = item.split()
        raw = words[0] == "raw"
        out.append((raw, *words[int(raw) :]))
    return out


class HostElementwiseKernel:
    """``cupy.ElementwiseKernel`` on the CPU: the operation in a C++ loop over the
    elements, compiled per (T, S) by the host compiler (``emit_cuda.host_source``)."""

    def __init__(self, in_params, out_params, operation, name, preamble=""):
        assert preamble == emit_cuda.PREAMBLE, "CudaKernels' preamble is not the emitted one"
        self.source = emit_cuda.KernelSource(in_params, out_params, operation, name)
        self.params = _c_param_list(in_params) + _c_param_list(out_params)
        self.libraries = {}

    def __call__(self, *args):
        assert len(args) == len(self.params), f"{self.source.name}: {len(args)} arguments"
        types_, size = {}, None
        for (raw, type_, name), arg in zip(self.params, args, strict=True):
            if type_ == "int64":
                assert isinstance(arg, int), f"{name}: expected an int, got {type(arg)}"
                continue
            assert isinstance(arg, np.ndarray) and arg.flags.c_contiguous, name
            assert types_.setdefault(type_, arg.dtype) == arg.dtype, f"{name}: mixed {type_}"
            if not raw:  # elementwise: every such argument has the launch's size
                assert size in (None, arg.size), f"{name}: size {arg.size} != {size}"
                size = arg.size
        c_type = {np.dtype(np.float64): "double", np.dtype(np.float32): "float"}
        key = (c_type[types_["T"]], c_type[types_["S"]])
        if key not in self.libraries:
            self.libraries[key] = compile_library(emit_cuda.host_source([self.source], *key))
        call = [ctypes.c_ssize_t(size)]
        for (_, type_, _), arg in zip(self.params, args, strict=True):
            call.append(
                ctypes.c_longlong(arg) if type_ == "int64" else arg.ctypes.data_as(ctypes.c_void_p)
            )
        getattr(self.libraries[key], self.source.name)(*call)


class HostRawKernel:
    """``cupy.RawKernel`` on the CPU, for the row kernels: their text (CUDA under NVRTC, a
    loop over rows and over each pass's threads for a host compiler: ``emit_cuda.row_source``)
    compiled as it is by the host compiler, launched with the block's threads and the shared
    bytes CudaKernels gives; every argument checked against the kernel's signature (type,
    contiguity) and the launch against the rows (one block a row)."""

    #: the most threads a block may have (a GPU's register bound): small, so that the
    #: tests' H = 5 makes a thread stride over two units and leaves others idle
    max_threads_per_block = 4

    def __init__(self, code, name, options=()):
        self.name = name
        c_types = {"double": np.dtype(np.float64), "float": np.dtype(np.float32)}
        self.dtypes = {alias: c_types[c] for c, alias in re.findall(r"typedef (\w+) ([TS]);", code)}
        signature = re.search(rf"LM_KERNEL {name}\(LM_LAUNCH_ARGS (.*?)\) {{", code).group(1)
        self.params = [item.rsplit(" ", 1) for item in signature.split(", ")]
        self.library = compile_library(code)  # one library for both kernels: the disk cache

    def __call__(self, grid, block, args, shared_mem=0):
        assert len(args) == len(self.params), f"{self.name}: {len(args)} arguments"
        call, rows = [ctypes.c_int(block[0]), ctypes.c_longlong(shared_mem), ctypes.c_int(0)], None
        for (type_, name), arg in zip(self.params, args, strict=True):
            if type_ == "long long":
                assert isinstance(arg, np.int64), f"{name}: expected numpy.int64, got {type(arg)}"
                call.append(ctypes.c_longlong(int(arg)))
                rows = int(arg) if name == "lm_rows" else rows
                continue
            alias = type_.removeprefix("const ").rstrip("*")
            assert isinstance(arg, np.ndarray) and arg.flags.c_contiguous, name
            assert arg.dtype == self.dtypes[alias], f"{name}: {arg.dtype}, not {alias}"
            call.append(arg.ctypes.data_as(ctypes.c_void_p))
        assert tuple(grid) == (rows,) and len(block) == 1, (grid, block)
        getattr(self.library, self.name)(*call)


def host_gemm(transa, transb, a, b, out=None, alpha=1.0, beta=0.0):
    """cuBLAS gemm (``cupy.cublas.gemm``'s signature): out = alpha op(a) op(b) + beta out,
    op = transpose for "T"; with beta = 0 ``out`` is not read (cuBLAS's rule)."""
    op = {"N": lambda m: m, "T": lambda m: m.T}
    product = alpha * (op[transa](a) @ op[transb](b))
    if out is None:
        return product
    out[...] = product if beta == 0 else product + beta * out
    return out


@pytest.fixture
def host_cupy(monkeypatch):
    """A ``cupy`` stand-in module on the host (see above), installed as ``cupy`` and
    ``cupy.cublas`` for the duration of the test."""
    if host_compiler() is None:
        pytest.skip("no host C++ compiler (g++ or clang++) to compile the kernel operations")
    module = types.ModuleType("cupy")
    module.__getattr__ = lambda name: getattr(np, name)  # arrays and routines: NumPy's
    module.ElementwiseKernel = HostElementwiseKernel
    module.RawKernel = HostRawKernel
    module.cublas = types.ModuleType("cupy.cublas")
    module.cublas.gemm = host_gemm
    monkeypatch.setitem(sys.modules, "cupy", module)
    monkeypatch.setitem(sys.modules, "cupy.cublas", module.cublas)
    return module


def host_cuda_cell(host_cupy):
    """The CuPy backend's cell class with ``host_cupy`` as its array module."""

    class DeviceArrayOps(ck.FusedOps):
        def cpu_scalar(self, x):
            return None  # as for CuPy arrays: never the CPU kernels, always CudaKernels

    class HostCudaCell(ArrayModuleCell):
        backend = "cupy"  # the CuPy cell, on a host stand-in of CuPy
        ops = DeviceArrayOps(ck.CudaKernels(host_cupy), "cupy")

    return HostCudaCell


def _config(variant, **kw):
    sizes = dict(batch=2, steps=3, input_size=2, hidden_size=3, num_layers=2)
    flags = dict(bidirectional=True, with_state=True, with_lengths=True, batch_first=False)
    return Config(variant=variant, **{**sizes, **flags, "seed": 11, **kw})


#: a peephole network (two bidirectional layers, lengths), a plain one batch-first, and
#: a projected one: every argument CudaKernels passes is read by some element; the
#: layer-normalised ones run the row kernels (split halves, row means) with 4 threads a
#: block (``HostRawKernel``) for H = 5: a thread striding over two units, idle threads
PINNED_HOST_CUDA = [
    _config("peephole"),
    _config("lstm", batch=3, steps=4, num_layers=1, bidirectional=False, batch_first=True),
    _config("cifg", num_layers=1, with_state=False, proj_size=2),
    _config("layernorm_peephole", hidden_size=5),
    _config("layernorm", hidden_size=5, num_layers=1, with_state=False, proj_size=2),
]
#: each layer-normalised case compiles its row kernels (a second or two): the default run
#: takes one variant in each dtype, the thorough run both in both
_ROW_THOROUGH = {("layernorm_peephole", "float32"), ("layernorm", "float64")}
HOST_CUDA_CASES = [
    pytest.param(
        config,
        dtype,
        id=f"{dtype}-{config.variant}",
        marks=[pytest.mark.thorough_only("the other variant in this dtype")]
        if (config.variant, dtype) in _ROW_THOROUGH
        else [],
    )
    for dtype in ("float64", "float32")
    for config in PINNED_HOST_CUDA
]


@pytest.mark.parametrize(("config", "dtype"), HOST_CUDA_CASES)
def test_cuda_kernels_host_side_matches_oracle(host_cupy, config, dtype):
    """CudaKernels (forward, backward, gemm_accumulate), its kernels' operation strings
    compiled on the host and cuBLAS's gemm emulated, in a whole network against the oracle."""
    problem = make_problem(config)
    cell = host_cuda_cell(host_cupy)(
        config.input_size,
        config.hidden_size,
        variant=config.variant,
        num_layers=config.num_layers,
        bidirectional=config.bidirectional,
        batch_first=config.batch_first,
        proj_size=config.proj_size,
    )
    result = run_cell(cell, config, problem, dtype)
    assert_matches_reference(result, reference(config, problem), dtype, label=False)


def test_cuda_gemm_accumulate_adds_to_its_output(host_cupy):
    """z += a @ b in place for float32/float64 (the cuBLAS path) and float16 (matmul + add)."""
    kernels = ck.CudaKernels(host_cupy)
    rng = np.random.default_rng(0)
    for dtype in ("float64", "float32", "float16"):
        z, a, b = (rng.normal(size=s).astype(dtype) for s in ((3, 8), (3, 2), (2, 8)))
        expected = z.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)
        scratch = z.copy()
        assert kernels.gemm_accumulate(scratch, a, b) is scratch
        # one rounding of the product and one of the sum, each within eps of the result's
        # dtype; float16 rounds through float32 in matmul
        tol = 8 * np.finfo(dtype).eps
        np.testing.assert_allclose(scratch, expected, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------
# half precision: gate math and cell state in float32 (CPU)


def test_gates_forward_keeps_cell_state_in_float32_for_half_inputs():
    rng = np.random.default_rng(0)
    for name in VARIANTS:  # the row-reduction variants: tests/test_layernorm.py
        variant = spec.VARIANTS[name]
        z, c_prev, extra, dh, dc = _gate_inputs(rng, name, 2, 3, "float16")
        h, c, cache = NP_OPS.gates_forward(variant, z, c_prev, extra)
        assert h.dtype == np.float16 and c.dtype == np.float32
        assert all(a.dtype == np.float32 for a in cache)
        dz, dc_prev, dextra = NP_OPS.gates_backward(variant, dh, c.astype(np.float32), cache, extra)
        # everything the backward sums over time and batch stays in float32
        assert dz.dtype == np.float32 and dc_prev.dtype == np.float32
        assert all(g.dtype == np.float32 for g in dextra.values())
    assert NP_OPS.state_dtype("bfloat16") == "float32"
    assert NP_OPS.state_dtype("float16") == "float32"
    assert NP_OPS.state_dtype("float64") == "float64"


# ---------------------------------------------------------------------------
# CuPy without a CUDA device (CPU)


@pytest.fixture
def fake_cupy():
    """Put a stand-in ``cupy`` module in sys.modules; restore everything afterwards."""
    saved = {k: sys.modules.get(k) for k in ("cupy", "lstm_multi.backends.cupy_backend")}
    package = importlib.import_module("lstm_multi.backends")
    saved_attr = package.__dict__.get("cupy_backend")

    def install(count=None, error=None):
        module = types.ModuleType("cupy")
        module.__spec__ = importlib.machinery.ModuleSpec("cupy", None)

        def get_device_count():
            if error is not None:
                raise error
            return count

        module.ndarray = type("ndarray", (), {})
        module.cuda = types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDeviceCount=get_device_count)
        )
        sys.modules["cupy"] = module
        sys.modules.pop("lstm_multi.backends.cupy_backend", None)
        return module

    yield install
    for key, value in saved.items():
        if value is None:
            sys.modules.pop(key, None)
        else:
            sys.modules[key] = value
    if saved_attr is None:
        package.__dict__.pop("cupy_backend", None)
    else:
        package.cupy_backend = saved_attr


class FakeCUDARuntimeError(RuntimeError):
    pass


def test_cupy_without_device_count_zero(fake_cupy):
    fake_cupy(count=0)
    backend = importlib.import_module("lstm_multi.backends.cupy_backend")
    assert backend.unavailable_reason() == (
        "no CUDA device is available (cupy.cuda.runtime.getDeviceCount() = 0)"
    )
    with pytest.raises(RuntimeError, match="no CUDA device is available"):
        lstm_multi.get_cell("cupy")
    assert "cupy" not in lstm_multi.available_backends()
    assert "cupy" in lstm_multi.known_backends()


def test_cupy_without_driver_reports_the_cuda_error(fake_cupy):
    fake_cupy(error=FakeCUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected"))
    with pytest.raises(RuntimeError) as info:
        lstm_multi.get_cell("cupy")
    message = str(info.value)
    assert "backend 'cupy' cannot run here: no CUDA device is available" in message
    assert "cudaErrorNoDevice" in message and "FakeCUDARuntimeError" in message
    assert "cupy" not in lstm_multi.available_backends()


def test_cupy_with_a_device_is_loaded(fake_cupy):
    fake_cupy(count=1)
    Cell = lstm_multi.get_cell("cupy")
    assert Cell.backend == "cupy" and issubclass(Cell, ArrayModuleCell)
    assert "cupy" in lstm_multi.available_backends()
    cell = Cell(2, 3)
    with pytest.raises(TypeError, match="bfloat16"):
        cell.init(dtype="bfloat16")


def test_cupy_real_module_without_gpu():
    """With the real cupy installed on a machine without a GPU (skipped otherwise)."""
    if importlib.util.find_spec("cupy") is None:
        pytest.skip("cupy is not installed")
    backend = importlib.import_module("lstm_multi.backends.cupy_backend")
    reason = backend.unavailable_reason()
    if reason is None:
        pytest.skip("a CUDA device is available: covered by the gpu tests")
    assert reason.startswith("no CUDA device is available")
    with pytest.raises(RuntimeError, match="no CUDA device is available"):
        lstm_multi.get_cell("cupy")
    assert "cupy" not in lstm_multi.available_backends()


def test_torch_cell_device_argument_places_numpy_inputs():
    torch = pytest.importorskip("torch")
    Cell = lstm_multi.get_cell("torch")
    cell = Cell(3, 4, variant="peephole", device="cpu")
    params = cell.init(seed=0)
    assert all(
        v.device == torch.device("cpu") for layer in params for p in layer for v in p.values()
    )
    y, _ = cell(params, np.zeros((2, 5, 3), np.float32), lengths=[5, 2])
    assert isinstance(y, torch.Tensor) and y.device.type == "cpu"


# ---------------------------------------------------------------------------
# on a GPU: every GPU backend against the oracle (float64, float32 with TF32 off),
# half precision against a float32 run with the derived bounds of half_precision.py


class GpuTarget:
    """How to run one GPU backend: the cell, array conversion, supported dtypes."""

    def __init__(self, name):
        self.name = name

    def setup(self):
        """Skip (with the reason) unless this target can run here; returns self."""
        if self.name == "cupy":
            try:
                self.Cell = lstm_multi.get_cell("cupy")
            except (ImportError, RuntimeError) as error:
                pytest.skip(f"cupy: {error}")
            import cupy

            self.cupy = cupy
            self.backend, self.kwargs = "cupy", {}
            self.engine = "cupy_kernels"
            self.dtypes = ("float64", "float32", "float16")
        elif self.name.startswith("torch"):
            torch = pytest.importorskip("torch", reason="torch is not installed")
            if not torch.cuda.is_available():
                pytest.skip("torch: no CUDA device (torch.cuda.is_available() is False)")
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            self.torch = torch
            self.Cell = lstm_multi.get_cell("torch")
            native = self.name == "torch-cuda-native"
            self.backend, self.kwargs = "torch", {"native": native, "device": "cuda"}
            self.engine = "native" if native else "array"
            self.dtypes = ("float64", "float32", "float16", "bfloat16")
        else:
            jax = pytest.importorskip("jax", reason="jax is not installed")
            try:
                self.device = jax.devices("gpu")[0]
            except RuntimeError as error:
                pytest.skip(f"jax: no GPU device ({error})")
            jax.config.update("jax_default_matmul_precision", "highest")  # no TF32
            self.jax = jax
            self.Cell = lstm_multi.get_cell("jax")
            self.backend, self.kwargs = "jax", {}
            self.engine = "scan"
            self.dtypes = ("float32", "float16", "bfloat16") + (
                ("float64",) if jax.config.jax_enable_x64 else ()
            )
        return self

    @property
    def native(self):
        return self.name == "torch-cuda-native"

    def cell(self, **kw):
        return self.Cell(**kw, **self.kwargs)

    def to(self, array, dtype):
        array = np.asarray(array)
        if self.name == "cupy":
            return self.cupy.asarray(array.astype(dtype))
        if self.name.startswith("torch"):
            t = self.torch.as_tensor(array)
            return t.to(device="cuda", dtype=getattr(self.torch, dtype))
        import jax.numpy as jnp

        return self.jax.device_put(jnp.asarray(array, dtype=dtype), self.device)

    def back(self, array):
        if self.name == "cupy":
            return self.cupy.asnumpy(array).astype(np.float64)
        if self.name.startswith("torch"):
            assert array.device.type == "cuda"
            return array.detach().cpu().double().numpy()
        assert array.devices() == {self.device}
        return np.asarray(array.astype("float32") if array.dtype.itemsize == 2 else array).astype(
            np.float64
        )


# cupy last: a backend that stalls (a kernel compiling, say) cannot hide the others
GPU_TARGETS = ["torch-cuda", "torch-cuda-native", "jax-gpu", "cupy"]


@pytest.fixture(params=GPU_TARGETS)
def gpu_target(request):
    return GpuTarget(request.param).setup()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@settings(
    max_examples=GPU_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(config=configs(max_layers=2))
def test_gpu_backend_matches_oracle(gpu_target, dtype, config):
    """Forward and vjp on the GPU against the README's equations (tests/oracle.py):
    float64 and float32 (TF32 off) to 100 machine epsilons (conftest.TOLERANCES), relative,
    as on the CPU."""
    target = gpu_target
    if dtype not in target.dtypes:
        pytest.skip(f"{target.name} has no {dtype} here")
    if target.native and config.variant != "lstm":
        config = dataclasses.replace(config, variant="lstm")  # the native path is "lstm" only
    problem = make_problem(config)
    cell = config.cell(target.backend, **target.kwargs)
    result = run_cell(cell, config, problem, dtype)
    label = f"oracle vs {target.name}/{config.variant}"
    assert_matches_reference(result, reference(config, problem), dtype, label)
    assert cell.last_choice.engine == target.engine, cell.last_choice  # not a fallback


@pytest.mark.gpu
@pytest.mark.parametrize("problem", [INTEGRATOR, FORGETFUL], ids=lambda p: p.name)
@pytest.mark.parametrize("variant", ["lstm", "peephole"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_half_precision_within_derived_bound(gpu_target, dtype, variant, problem):
    """The half-precision policy on the GPU, with the bounds the CPU test uses (a wrong
    policy fails them: tests/test_half_precision.py)."""
    target = gpu_target
    if dtype not in target.dtypes:
        pytest.skip(f"{target.name} has no {dtype}")
    if target.native:
        pytest.skip("the native path is cuDNN's, with cuDNN's own precision policy")
    found, dtypes = errors_in_u(
        problem,
        lambda v: target.cell(input_size=8, hidden_size=16, variant=v),
        variant,
        dtype,
        target.to,
        target.back,
    )
    assert set(dtypes.values()) == {dtype}, dtypes
    assert_within_bound(found, f"{target.name} {dtype} {variant} {problem.name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    ("variant", "native"), [("lstm", True), ("lstm", False), ("peephole", True)]
)
def test_torch_autocast_on_cuda(variant, native, dtype):
    """torch.autocast on CUDA: float32 parameter gradients, results close to the float32
    run (within the half type's reach). The generic path gives outputs in the autocast
    dtype; the native path is ``nn.LSTM``'s and gives what ``nn.LSTM`` gives there
    (PyTorch autocasts cuDNN's RNN to float16 whatever the autocast dtype)."""
    GpuTarget("torch-cuda").setup()
    import torch

    from lstm_multi.torch import LSTM

    torch.manual_seed(0)
    module = LSTM(5, 8, num_layers=2, variant=variant, native=native).to("cuda")
    x = torch.randn(12, 3, 5, device="cuda")
    full = module(x)[0].detach()
    with torch.autocast("cuda", dtype=getattr(torch, dtype)):
        out, (h, c) = module(x)
    if module.runs_native:
        peer = torch.nn.LSTM(5, 8, num_layers=2).to("cuda")
        peer.load_state_dict(module.state_dict())
        with torch.autocast("cuda", dtype=getattr(torch, dtype)):
            expected = peer(x)[0]
        assert out.dtype == expected.dtype
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    else:
        assert out.dtype == getattr(torch, dtype)
    out.float().square().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in module.parameters())
    reach = {torch.float16: 2.0**-7, torch.bfloat16: 2.0**-4}[out.dtype]
    assert float((out.detach().float() - full).norm() / full.norm()) < reach


@pytest.mark.gpu
@pytest.mark.parametrize("name", VARIANTS)
def test_cupy_fused_kernels_equal_spec_on_gpu(name):
    """The compiled ElementwiseKernels against the spec's math run by plain CuPy (float64)."""
    target = GpuTarget("cupy").setup()
    cupy = target.cupy
    from lstm_multi.backends.cupy_backend import OPS

    variant = spec.VARIANTS[name]
    plain = ArrayModuleOps(cupy)
    rng = np.random.default_rng(11)
    z, c_prev, extra, dh, dc = (
        cupy.asarray(a) if not isinstance(a, dict) else {k: cupy.asarray(v) for k, v in a.items()}
        for a in _gate_inputs(rng, name, 6, 33)
    )
    h, c, cache = OPS.gates_forward(variant, z, c_prev, extra)
    h_ref, c_ref, cache_ref = variant.gates_forward(plain, z, c_prev, extra)
    for a, b in zip((h, c, *cache), (h_ref, c_ref, *cache_ref), strict=True):
        cupy.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    dz, dc_prev, dextra = OPS.gates_backward(variant, dh, dc, cache, extra)
    dz_ref, dc_prev_ref, dextra_ref = variant.gates_backward(plain, dh, dc, cache_ref, extra)
    cupy.testing.assert_allclose(dz, dz_ref, rtol=1e-12, atol=1e-13)
    cupy.testing.assert_allclose(dc_prev, dc_prev_ref, rtol=1e-12, atol=1e-13)
    for k in dextra_ref:
        cupy.testing.assert_allclose(dextra[k], dextra_ref[k], rtol=1e-12, atol=1e-12)
    # the in-place gemm accumulation (cuBLAS, beta = 1)
    a, b = cupy.asarray(rng.normal(size=(6, 5))), cupy.asarray(rng.normal(size=(5, 12)))
    scratch = cupy.asarray(rng.normal(size=(6, 12)))
    expected = scratch + a @ b
    assert OPS.add_matmul(scratch, a, b) is scratch
    cupy.testing.assert_allclose(scratch, expected, rtol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [33, 1500])  # a unit a thread; a thread striding past 1024
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ["layernorm", "layernorm_peephole"])
def test_cupy_row_kernels_equal_spec_on_gpu(name, dtype, hidden):
    """The compiled row kernels (row reductions, split halves) against the spec's math run
    by plain CuPy: forward, saved values, backward and every parameter's gradient."""
    target = GpuTarget("cupy").setup()
    cupy = target.cupy
    from lstm_multi.backends.cupy_backend import OPS

    variant = spec.VARIANTS[name]
    plain = ArrayModuleOps(cupy)
    rng = np.random.default_rng(12)
    batch = 5
    z = rng.normal(size=(batch, 8 * hidden)) * 2
    c_prev, dh, dc = (rng.normal(size=(batch, hidden)) for _ in range(3))
    extra = {k: rng.normal(size=s) for k, s in variant.extra_param_shapes(hidden).items()}
    extra["b"] = rng.normal(size=4 * hidden)
    z, c_prev, dh, dc = (cupy.asarray(a, dtype=dtype) for a in (z, c_prev, dh, dc))
    extra = {k: cupy.asarray(v, dtype=dtype) for k, v in extra.items()}
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == "float64" else dict(rtol=1e-4, atol=1e-4)
    h, c, cache = OPS.gates_forward(variant, z, c_prev, extra)
    h_ref, c_ref, cache_ref = variant.gates_forward(plain, z, c_prev, extra)
    for a, b in zip((h, c, *cache), (h_ref, c_ref, *cache_ref), strict=True):
        cupy.testing.assert_allclose(a, cupy.broadcast_to(b, a.shape), **tol)
    dz, dc_prev, dextra = OPS.gates_backward(variant, dh, dc, cache, extra)
    dz_ref, dc_prev_ref, dextra_ref = variant.gates_backward(plain, dh, dc, cache_ref, extra)
    cupy.testing.assert_allclose(dz, dz_ref, **tol)
    cupy.testing.assert_allclose(dc_prev, dc_prev_ref, **tol)
    assert set(dextra) == set(dextra_ref)
    for k in dextra_ref:
        assert dextra[k].shape == dextra_ref[k].shape, k
        cupy.testing.assert_allclose(dextra[k], dextra_ref[k], **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", CORE_VARIANTS)
@pytest.mark.parametrize("native", [True, False])
def test_torch_module_on_cuda_matches_cpu(variant, native):
    """``lstm_multi.torch.LSTM`` moved with ``.to("cuda")``: forward, PackedSequence, backward."""
    GpuTarget("torch-cuda").setup()
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from lstm_multi.torch import LSTM

    torch.manual_seed(0)
    cpu = LSTM(
        5,
        7,
        num_layers=2,
        bidirectional=True,
        batch_first=True,
        variant=variant,
        native=native,
        dtype=torch.float64,
    )
    gpu = LSTM(
        5, 7, num_layers=2, bidirectional=True, batch_first=True, variant=variant, native=native
    ).to("cuda", torch.float64)
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(4, 9, 5, dtype=torch.float64)
    lengths = torch.tensor([9, 3, 6, 1])
    outs = []
    for module, xs in ((cpu, x), (gpu, x.to("cuda"))):
        xs = xs.clone().requires_grad_(True)
        packed = pack_padded_sequence(xs, lengths, batch_first=True, enforce_sorted=False)
        out, (h_n, c_n) = module(packed)
        y, _ = pad_packed_sequence(out, batch_first=True)
        (y.sum() + h_n.square().sum() + c_n.sum()).backward()
        outs.append([y, h_n, c_n, xs.grad, *(p.grad for p in module.parameters())])
        assert y.device == xs.device
    native_runs = native and variant == "lstm"
    assert gpu.last_choice.engine == ("native" if native_runs else "array"), gpu.last_choice
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-9)
