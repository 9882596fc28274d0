"""Constants in every code generator (issue 22, item 6).

A variant template with a constant ``k`` in several positions, ``k`` drawn from
zero, -0.0, subnormals, 1e±30, integral floats beyond 2^31 and 2^63, small
integers and random floats: every target's generated code agrees with the
NumPy evaluation of the program (``compile.evaluate``): the array code on
NumPy, PyTorch and JAX, the CPU C++ (``CpuKernels``' step functions), the CUDA C
under the host compiler (``HostKernels``), in float64 to ~1e-13 of the magnitude
and in float32 (where the constant rounds to float32, 1e60 to inf, legitimately)
against the evaluation in float32; Triton under its interpreter on a few. nan and
inf constants are refused at trace time with the constant named.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lstm_multi import Variant, sigmoid, tanh
from lstm_multi.compile import emit_cuda, evaluate
from lstm_multi.kernels import build

needs_compiler = pytest.mark.skipif(
    build.host_compiler() is None, reason="no host C++ compiler (g++, clang++ or $CXX)"
)

EDGES = [0.0, -0.0, 5e-324, 1e-30, 1e30, 4e9, 2.0**40, 1e19, 2.0**70, 1e-40, 1e60, 3.0, -2.0]
CONSTANTS = st.one_of(
    st.sampled_from(EDGES),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True),
    st.integers(-(2**70), 2**70).map(float),
)
_names = itertools.count()

# float32 overflows legitimately here (1e60 is inf there), and NumPy says so
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _variant(k):
    """The template: k scales a preactivation, shifts the cell state, scales a tanh's input,
    and is an output's additive term (each a different node kind in the programs)."""

    def forward(z, c_prev, p):
        i = sigmoid(z.i * k + p.i * c_prev)
        c = sigmoid(z.f) * (c_prev + k) + i * tanh(z.g)
        return sigmoid(z.o) * tanh(k * z.o + c) + k * 1e-300, c

    return Variant(f"constant_probe_{next(_names)}", forward, params={"p": ("i",)})


def _inputs(variant, dtype, batch=3, hidden=4, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(batch, 4 * hidden)).astype(dtype)
    c_prev, dh, dc = (rng.normal(size=(batch, hidden)).astype(dtype) for _ in range(3))
    extra = {
        k: rng.normal(size=s).astype(dtype) for k, s in variant.extra_param_shapes(hidden).items()
    }
    return z, c_prev, extra, dh, dc


def _expected(variant, z, c_prev, extra, dh, dc):
    """(h, c, saved, dz, dc_prev, dp) by ``evaluate``, in the inputs' dtype."""
    programs = variant.programs
    inputs = dict(zip(("z_i", "z_f", "z_g", "z_o"), np.split(z, 4, -1), strict=True))
    inputs["c_prev"] = c_prev
    for name, rows in variant.params.items():
        inputs.update((f"{name}_{row}", extra[name][r]) for r, row in enumerate(rows))
    with np.errstate(all="ignore"):
        h, c, saved = evaluate.evaluate_forward(programs, inputs)
        back = {"dh": dh, "dc": dc, **{k: inputs[k] for k in programs.param_rows}}
        out = evaluate.evaluate_backward(programs, back, saved)
    dz = np.concatenate([out[f"dz_{g}"] for g in "ifgo"], -1)
    dp = {n: np.stack([out[f"d{n}_{r}"] for r in rows], 0) for n, rows in variant.params.items()}
    return h, c, saved, dz, out["dc_prev"], dp


def _amplified(rtol, k):
    """``rtol`` for a template with constant ``k``: k scales the arguments of tanh and
    sigmoid, so an ulp of difference between two sigmoids (in c) reaches h times |k|
    (up to |k| = 1e3; beyond, the nonlinearities saturate)."""
    return rtol * min(max(1.0, abs(k)), 1e3)


def _close(got, want, rtol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    finite = np.abs(want[np.isfinite(want)])
    scale = max(1.0, float(np.max(finite, initial=0.0)))
    np.testing.assert_allclose(
        got, want, rtol=rtol, atol=rtol * scale, equal_nan=True, err_msg=what
    )


# the array code on NumPy, PyTorch and JAX -------------------------------------------------


def _frameworks():
    from lstm_multi.ops import ArrayModuleOps

    found = [("numpy", ArrayModuleOps(np), np.asarray, np.asarray)]
    try:
        import torch

        from lstm_multi.backends.torch_ops import TorchOps

        found.append(("torch", TorchOps(), torch.from_numpy, lambda a: a.numpy()))
    except ImportError:
        pass
    try:
        import jax.numpy as jnp

        from lstm_multi.backends.jax_backend import OPS

        found.append(("jax", OPS, jnp.asarray, np.asarray))
    except ImportError:
        pass
    return found


@given(k=CONSTANTS)
@settings(max_examples=25)
@example(k=4e9).via("JAX: the Python int 4000000000")
@example(k=1e30).via("torch: an int beyond int64")
@example(k=2.0**70)
@example(k=-0.0)
@example(k=5e-324)
def test_array_code_agrees_with_the_program(k):
    variant = _variant(k)
    for dtype, rtol in (("float64", _amplified(1e-13, k)), ("float32", _amplified(2e-6, k))):
        z, c_prev, extra, dh, dc = _inputs(variant, np.dtype(dtype))
        h, c, saved, dz, dc_prev, dp = _expected(variant, z, c_prev, extra, dh, dc)
        for name, ops, to, back in _frameworks():
            if name == "jax" and dtype == "float64":
                import jax

                if not jax.config.jax_enable_x64:
                    continue
            wrap = {key: to(v) for key, v in extra.items()}
            got_h, got_c, cache = variant.gates_forward(ops, to(z), to(c_prev), wrap)
            got_dz, got_dc, got_dp = variant.gates_backward(ops, to(dh), to(dc), cache, wrap)
            what = f"{name} {dtype} k={k!r}"
            for got, want in ((got_h, h), (got_c, c), (got_dz, dz), (got_dc, dc_prev)):
                assert str(back(got).dtype) == dtype, what
                _close(back(got), want, rtol, what)
            for got, want in zip(cache, saved, strict=True):
                _close(back(got), want, rtol, what)
            for key in dp:
                _close(back(got_dp[key]), dp[key].sum(1), rtol, what)


@pytest.mark.parametrize("k", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_constants_are_refused_naming_the_constant(k):
    with pytest.raises(ValueError, match=r"gate math: constant .*expected a finite number"):
        _variant(k).programs  # noqa: B018


def test_a_constant_folded_to_inf_is_refused_naming_its_origin():
    variant = Variant("fold_probe", lambda z, c_prev: (sigmoid(z.o) * (1e200 * 1e200), c_prev))
    with pytest.raises(ValueError, match=r"constant inf|constant mul\(1e\+200, 1e\+200\)"):
        variant.programs  # noqa: B018


def test_folding_a_saturated_sigmoid_does_not_overflow():
    # math.exp(1000) raised OverflowError while folding sigmoid(-1000)
    variant = Variant(
        "saturated_probe", lambda z, c_prev: (sigmoid(z.o) + sigmoid(-1000.0) * 3, c_prev)
    )
    z, c_prev, extra, dh, dc = _inputs(variant, np.float64)
    h = _expected(variant, z, c_prev, extra, dh, dc)[0]
    np.testing.assert_allclose(h, 1 / (1 + np.exp(-z[:, 12:])), rtol=1e-15)


# the CPU C++ and the host-compiled CUDA C ----------------------------------------------------


def _cpu_step(variant, scalar, z, c_prev, extra, dh, dc):
    from lstm_multi.kernels.cpu_kernels import CpuKernels

    kernels = CpuKernels(variant, scalar)
    programs = variant.programs
    batch, hidden = c_prev.shape
    P = np.ascontiguousarray(np.concatenate([extra[n] for n in variant.params], 0))
    stored = emit_cuda.forward_stored(programs)
    h, c, y = (np.empty_like(c_prev) for _ in range(3))
    saved = np.empty((max(len(stored), 1), batch, hidden), c_prev.dtype)
    a = lambda x: None if x is None else x.ctypes.data  # noqa: E731
    kernels.step_forward(batch, hidden, a(z), None, a(c_prev), a(c_prev), a(P), None, a(h), a(c),
                         a(y), a(saved))  # fmt: skip
    known = {programs.inputs["c_prev"]: c_prev, programs.forward_outputs["c"]: c}
    known.update(zip(stored, saved, strict=False))
    dz = np.empty_like(z)
    dP = np.zeros_like(P)
    dy, dh_io, dc_io = np.zeros_like(dh), dh.copy(), dc.copy()
    kernels.step_backward(batch, hidden, a(dy), None, a(dh_io), a(dc_io), a(c_prev), a(c),
                          a(saved), a(P), None, a(dz), a(dP))  # fmt: skip
    cache = tuple(known[n] for n in programs.saved)
    return h, c, cache, dz, dc_io, {"p": dP}


def _host_cuda(variant, scalar, z, c_prev, extra, dh, dc):
    from lstm_multi.kernels.host_kernels import HostKernels

    kernels = HostKernels(variant, scalar, scalar)
    h, c, cache = kernels.forward(z, c_prev, extra)
    dz, dc_prev, terms = kernels.backward(dh, dc, cache, extra)
    return h, c, cache, dz, dc_prev, {k: v.sum(0) for k, v in terms.items()}


def _check_compiled(run, k):
    variant = _variant(k)
    for scalar, dtype, base in (("double", np.float64, 1e-13), ("float", np.float32, 2e-5)):
        rtol = _amplified(base, k)
        z, c_prev, extra, dh, dc = _inputs(variant, dtype)
        want = _expected(variant, z, c_prev, extra, dh, dc)
        got = run(variant, scalar, z, c_prev, extra, dh, dc)
        what = f"{run.__name__} {scalar} k={k!r}"
        for name, g, w in zip(("h", "c", "saved", "dz", "dc_prev"), got[:5], want[:5], strict=True):
            if name == "saved":
                for gs, ws in zip(g, w, strict=True):
                    _close(gs, ws, rtol, f"{what} {name}")
            else:
                assert g.dtype == dtype, what
                _close(g, w, rtol, f"{what} {name}")
        _close(got[5]["p"], want[5]["p"].sum(1), rtol, f"{what} dp")


#: the constants every compiled target is pinned to: a signed zero, the smallest
#: subnormal, and large ones that overflow float32 (each C++ check is a compile)
COMPILED_EDGES = [-0.0, 5e-324, 1e30, 4e9, 1e-40, 1e60]
#: the C++ kernels' default run takes these (a signed zero, a subnormal, a float32
#: overflow); ``test_cpu_cxx_agrees_at_the_other_edges`` the rest, under --thorough
CXX_DEFAULT_EDGES = [-0.0, 5e-324, 1e30]


def _pinned(test, edges=COMPILED_EDGES):
    for k in edges:
        test = example(k=k)(test)
    return test


@needs_compiler
@given(k=CONSTANTS)
@settings(max_examples=1)
@functools.partial(_pinned, edges=CXX_DEFAULT_EDGES)
def test_cpu_cxx_agrees_with_the_program(k):
    _check_compiled(_cpu_step, k)


@needs_compiler
@pytest.mark.thorough_only(
    "test_cpu_cxx_agrees_with_the_program takes a zero, a subnormal, an overflow"
)
@pytest.mark.parametrize("k", [k for k in COMPILED_EDGES if k not in CXX_DEFAULT_EDGES])
def test_cpu_cxx_agrees_at_the_other_edges(k):
    _check_compiled(_cpu_step, k)


@needs_compiler
@given(k=CONSTANTS)
@settings(max_examples=1)
@_pinned
def test_host_cuda_c_agrees_with_the_program(k):
    _check_compiled(_host_cuda, k)


# Triton, in its interpreter ---------------------------------------------------------------


@pytest.fixture
def triton_kernels(monkeypatch, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when a generated module is imported
    monkeypatch.setenv("LSTM_MULTI_CACHE", str(tmp_path))
    from lstm_multi.backends.triton_kernels import TritonKernels

    return TritonKernels()


def test_triton_agrees_with_the_program(triton_kernels):
    import torch

    from lstm_multi.compile import emit_triton

    # pinned edges (1e-40, 5e-324 and 1e60 are the constants Triton would type float64) and a
    # few drawn ones, each checked in float32 against the float32 evaluation
    rng = np.random.default_rng(5)
    drawn = [float(rng.normal() * 10.0 ** rng.integers(-8, 9)) for _ in range(2)]
    for k in [0.0, -0.0, 5e-324, 1e-40, 1e30, 4e9, 1e60, *drawn]:
        variant = _variant(k)
        source = emit_triton.module_source(variant.programs, interpret=True)
        if k != 0 and not 2.0**-126 <= abs(k) <= 3.4e38:  # Triton would type it float64
            assert f"tl.full([BLOCK], {k!r}, tl.float32)" in source, source
        z, c_prev, extra, dh, dc = _inputs(variant, np.float32)
        want = _expected(variant, z, c_prev, extra, dh, dc)
        t = {key: torch.from_numpy(v) for key, v in extra.items()}
        h, c, saved = triton_kernels.forward(
            variant, torch.from_numpy(z), torch.from_numpy(c_prev), t
        )
        dz, dc_prev, terms = triton_kernels.backward(
            variant, torch.from_numpy(dh), torch.from_numpy(dc), saved, t
        )
        what = f"triton k={k!r}"
        for g, w in ((h, want[0]), (c, want[1]), (dz, want[3]), (dc_prev, want[4])):
            assert g.dtype == torch.float32, what
            _close(g.numpy(), w, _amplified(2e-5, k), what)
        for g, w in zip(saved, want[2], strict=True):
            _close(g.numpy(), w, _amplified(2e-5, k), what)
        _close(terms["p"].numpy().sum(0), want[5]["p"].sum(1), _amplified(2e-5, k), what)
