"""Numerics at the edges, on every CPU backend.

- The logistic sigmoid is accurate in both tails: within 4 ulp of the exact
  value over z in [-80, 80] in float32 and float64 (NumPy's and CuPy's kernel
  formula, torch, JAX; the CUDA kernels' C++ formula compiled on the host).
- Outputs and gradients stay finite with pre-activations up to +-1e4.
- A sequence of T = 20,000 steps (B = 1) runs forward and backward (no
  recursion, no per-step Python frames kept), every output and gradient equal
  to a float64 reference written in the test, with memory linear in T.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import tracemalloc

import numpy as np
import oracle
import pytest
from conftest import assert_close, to_numpy, tolerance
from reference import CORE_VARIANTS

import lstm_multi
from lstm_multi.compile import emit_cuda
from lstm_multi.ops import ArrayModuleOps

ULP_BOUND = 4


def exact_sigmoid(z):
    """sigma(z) in float64, from 50-digit arithmetic (mpmath) where it is installed."""
    try:
        import mpmath
    except ImportError:  # pragma: no cover - scipy's expit is accurate to about 1 ulp
        from scipy.special import expit

        return expit(z.astype(np.float64))
    mpmath.mp.dps = 50
    return np.array([float(1 / (1 + mpmath.exp(-mpmath.mpf(float(v))))) for v in z])


def sigmoid_functions():
    """name -> callable taking and returning NumPy arrays, for every backend here."""
    numpy_ops = ArrayModuleOps(np)
    functions = {"numpy (and the cupy kernels' body)": numpy_ops.sigmoid}
    try:
        import torch

        from lstm_multi.backends.torch_ops import OPS as torch_ops

        functions["torch"] = lambda z: torch_ops.sigmoid(torch.as_tensor(z)).numpy()
    except ImportError:
        pass
    try:
        import jax.numpy as jnp

        from lstm_multi.backends.jax_backend import OPS as jax_ops

        functions["jax"] = lambda z: np.asarray(jax_ops.sigmoid(jnp.asarray(z)))
    except ImportError:
        pass
    return functions


@pytest.fixture(scope="module")
def grids():
    z64 = np.concatenate([np.linspace(-80, 80, 4001), [-80.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 80.0]])
    return {"float32": z64.astype(np.float32), "float64": z64}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(sigmoid_functions()))
def test_sigmoid_accurate_in_both_tails(grids, name, dtype):
    z = grids[dtype]
    got = np.asarray(sigmoid_functions()[name](z))
    assert got.dtype == z.dtype
    exact = exact_sigmoid(z)
    ulps = np.abs(got.astype(np.float64) - exact) / np.spacing(exact.astype(dtype)).astype(
        np.float64
    )
    worst = int(np.argmax(ulps))
    assert ulps[worst] <= ULP_BOUND, f"{name} {dtype}: {ulps[worst]:.1f} ulp at z = {z[worst]}"
    if dtype == "float32":  # the case that motivated it: no underflow to 0 at -20
        assert got[np.argmin(np.abs(z + 20))] > 0


def test_kernel_sigmoid_compiled_on_the_host_is_accurate(grids, tmp_path):
    """The C++ sigmoid every CUDA kernel uses (``emit_cuda.PREAMBLE``), built by g++."""
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++ or clang++)")
    source = tmp_path / "sigmoid.cpp"
    source.write_text(
        "#include <cmath>\n#include <cstddef>\nusing std::exp; using std::fabs;\n"
        "#define __device__\n#define __forceinline__ inline\n"
        + emit_cuda.PREAMBLE
        + 'extern "C" void sigmoid_f(const float* z, float* out, size_t n) '
        "{ for (size_t i = 0; i < n; ++i) out[i] = sigmoid(z[i]); }\n"
        'extern "C" void sigmoid_d(const double* z, double* out, size_t n) '
        "{ for (size_t i = 0; i < n; ++i) out[i] = sigmoid(z[i]); }\n"
    )
    library = tmp_path / "sigmoid.so"
    subprocess.run([cxx, "-O2", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    lib = ctypes.CDLL(str(library))
    for dtype, function in (("float32", lib.sigmoid_f), ("float64", lib.sigmoid_d)):
        z = grids[dtype]
        out = np.empty_like(z)
        function(
            z.ctypes.data_as(ctypes.c_void_p),
            out.ctypes.data_as(ctypes.c_void_p),
            ctypes.c_size_t(z.size),
        )
        exact = exact_sigmoid(z)
        ulps = np.abs(out - exact) / np.spacing(exact.astype(dtype)).astype(np.float64)
        assert ulps.max() <= ULP_BOUND, (
            f"C++ {dtype}: {ulps.max():.1f} ulp at z = {z[np.argmax(ulps)]}"
        )


def _cell_and_params(backend, variant, dtype, scale, **kwargs):
    cell = lstm_multi.get_cell(backend)(
        3, 4, variant=variant, num_layers=2, bidirectional=True, **kwargs
    )
    np_params = lstm_multi.get_cell("numpy")(
        3, 4, variant=variant, num_layers=2, bidirectional=True
    ).init(seed=1, dtype="float64")
    big = [
        [{k: (v * scale).astype(dtype) for k, v in p.items()} for p in layer] for layer in np_params
    ]
    return cell, cell.from_numpy(big)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("variant", CORE_VARIANTS)
def test_huge_preactivations_stay_finite(backend, variant, dtype):
    """Weights scaled so that |z| reaches about 1e4: saturated gates, finite everything."""
    cell, params = _cell_and_params(backend, variant, dtype, scale=5e3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 3)).astype(dtype)
    dy = rng.standard_normal((2, 7, 8)).astype(dtype)
    y, (h_n, c_n) = cell(params, x, lengths=[7, 4])
    grads, dx, (dh0, dc0) = cell.vjp(params, x, dy, lengths=[7, 4])
    flat = [y, h_n, c_n, dx, dh0, dc0] + [g[k] for layer in grads for g in layer for k in g]
    for k, a in enumerate(to_numpy(flat)):
        assert np.all(np.isfinite(a)), f"result {k} is not finite"
    z_scale = np.abs(to_numpy(params[0][0]["W"])).max() * np.abs(x).max()
    assert z_scale > 1e3  # the pre-activations really are that large
    # and the values are the oracle's (float64, on the same rounded inputs)
    wide = [[{k: np.asarray(v, np.float64) for k, v in p.items()} for p in layer]
            for layer in cell.to_numpy(params)]  # fmt: skip
    zeros_h = np.zeros((4, 2, 4))
    want = oracle.oracle(
        variant, wide, np.swapaxes(x, 0, 1).astype(np.float64), zeros_h, zeros_h, [7, 4],
        np.swapaxes(dy, 0, 1).astype(np.float64), zeros_h, zeros_h,
    )  # fmt: skip
    got = to_numpy([y, h_n, c_n, dx])
    for what, a, b in zip(("y", "h_n", "c_n", "dx"), got, (
        np.swapaxes(want["y"], 0, 1), want["h_n"], want["c_n"], np.swapaxes(want["dx"], 0, 1)
    ), strict=True):  # fmt: skip
        assert_close(a, b, dtype, f"{variant} {what}")


LONG = 20_000

#: float32 against the float64 reference over 20,000 steps, relative to max(1, max|reference|):
#: each parameter gradient is a sum over all 20,000 steps, accumulated in float32, so its
#: error grows with T (measured: up to 3.6e-6, i.e. ~30 eps, for db and dp); 1000 eps (1.2e-4)
#: leaves a margin for the accumulation order of other platforms and still fails on a wrong
#: term (an error of the size of the gradient itself, ~1e1 here).
LONG_TOLERANCE = tolerance("float32", k=1000)


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def long_sequence_reference(params, x, dy):
    """A one-layer "peephole" LSTM ("lstm" when ``params`` has no p: peepholes of zero)
    in float64 NumPy, written from the README's equations, for one sequence from zero
    state: x (T, in), dy (T, H) -> (y (T, H), h_n (H,), c_n (H,), dx (T, in), grads of
    sum(y * dy) by key), the backward written by hand (BPTT), so that 20,000 steps take
    about a second where the oracle's autograd over per-gate matmuls would take minutes.

        z = x_t W + h_{t-1} U + b;  i = σ(z_i + p_i c_{t-1});  f = σ(z_f + p_f c_{t-1})
        g = tanh(z_g);  c_t = f c_{t-1} + i g;  o = σ(z_o + p_o c_t);  h_t = o tanh(c_t)
    """
    W, U, b = (np.asarray(params[k], np.float64) for k in ("W", "U", "b"))
    hidden = U.shape[0]
    p = np.asarray(params["p"], np.float64) if "p" in params else np.zeros((3, hidden))
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    steps, H2, H3 = x.shape[0], 2 * hidden, 3 * hidden
    xwb = x @ W + b
    hs, cs = np.zeros((steps + 1, hidden)), np.zeros((steps + 1, hidden))  # row t: state t-1
    gates, tanh_c = np.zeros((steps, 4 * hidden)), np.zeros((steps, hidden))
    h, c = hs[0], cs[0]
    for t in range(steps):
        z, a = xwb[t] + h @ U, gates[t]
        a[:H2] = _sigmoid(z[:H2] + p[:2].reshape(-1) * np.concatenate((c, c)))
        a[H2:H3] = np.tanh(z[H2:H3])
        c = cs[t + 1] = a[hidden:H2] * c + a[:hidden] * a[H2:H3]
        a[H3:] = _sigmoid(z[H3:] + p[2] * c)
        tanh_c[t] = np.tanh(c)
        h = hs[t + 1] = a[H3:] * tanh_c[t]
    i, f, g, o = (gates[:, k * hidden : (k + 1) * hidden] for k in range(4))
    dz = np.zeros((steps, 4 * hidden))
    dh, dc = np.zeros(hidden), np.zeros(hidden)
    for t in range(steps - 1, -1, -1):
        dh = dh + dy[t]
        d = dz[t]
        d[H3:] = dh * tanh_c[t] * o[t] * (1 - o[t])
        dc = dc + dh * o[t] * (1 - tanh_c[t] ** 2) + d[H3:] * p[2]
        d[:hidden] = dc * g[t] * i[t] * (1 - i[t])
        d[hidden:H2] = dc * cs[t] * f[t] * (1 - f[t])
        d[H2:H3] = dc * i[t] * (1 - g[t] ** 2)
        dc = dc * f[t] + d[:hidden] * p[0] + d[hidden:H2] * p[1]
        dh = U @ d
    grads = {"W": x.T @ dz, "U": hs[:-1].T @ dz, "b": dz.sum(0)}
    if "p" in params:
        grads["p"] = np.stack([(dz[:, :hidden] * cs[:-1]).sum(0),
                               (dz[:, hidden:H2] * cs[:-1]).sum(0),
                               (dz[:, H3:] * cs[1:]).sum(0)])  # fmt: skip
    return hs[1:], h, c, dz @ W.T, grads


_LONG_REFERENCES = {}


def _cached_long_reference(params, x, dy):
    """``long_sequence_reference``, once per distinct parameters (the backends' inits of
    one seed are the same numbers, so the three "peephole" runs share one)."""
    key = tuple((k, v.tobytes()) for k, v in sorted(params.items()))
    if key not in _LONG_REFERENCES:
        _LONG_REFERENCES[key] = long_sequence_reference(params, x, dy)
    return _LONG_REFERENCES[key]


def test_long_sequence_reference_matches_the_oracle():
    """The hand-written reference itself, on a prefix short enough for the oracle."""
    rng = np.random.default_rng(3)
    for variant in ("lstm", "peephole"):
        shapes = oracle.param_shapes(variant, 2, 3, 1, 1)[0][0]
        params = {k: rng.uniform(-1, 1, shape) for k, shape in shapes.items()}
        x, dy = rng.standard_normal((9, 1, 2)), rng.standard_normal((9, 1, 3))
        zeros = np.zeros((1, 1, 3))
        want = oracle.oracle(variant, [[params]], x, zeros, zeros, None, dy, zeros, zeros)
        y, h_n, c_n, dx, grads = long_sequence_reference(params, x[:, 0], dy[:, 0])
        assert_close(y, want["y"][:, 0], "float64", f"{variant} y")
        assert_close(h_n, want["h_n"][0, 0], "float64", f"{variant} h_n")
        assert_close(c_n, want["c_n"][0, 0], "float64", f"{variant} c_n")
        assert_close(dx, want["dx"][:, 0], "float64", f"{variant} dx")
        for k, grad in grads.items():
            assert_close(grad, want["grads"][0][0][k], "float64", f"{variant} d{k}")


@pytest.mark.parametrize(
    ("backend", "kwargs"),
    [
        pytest.param("numpy", {}, id="numpy"),
        pytest.param("torch", {"native": False}, id="torch-generic"),
        pytest.param("torch", {"native": True}, id="torch-native"),
        pytest.param("jax", {}, id="jax"),
    ],
)
def test_a_20000_step_sequence_runs_forward_and_backward(backend, kwargs):
    """Forward and vjp over T = 20,000 steps, every output and gradient against a float64
    reference (``long_sequence_reference``, itself checked against the oracle)."""
    try:
        lstm_multi.registry.load_backend(backend)
    except (ImportError, RuntimeError) as error:
        pytest.skip(str(error))
    variant = "lstm" if kwargs.get("native") else "peephole"
    cell = lstm_multi.get_cell(backend)(2, 8, variant=variant, **kwargs)
    params = cell.init(seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, LONG, 2)).astype("float32")
    dy = rng.standard_normal((1, LONG, 8)).astype("float32")
    y, (h_n, c_n) = cell(params, x)
    grads, dx, _ = cell.vjp(params, x, dy)
    assert to_numpy(y).shape == (1, LONG, 8)
    canonical = to_numpy(params[0][0])
    want_y, want_h, want_c, want_dx, want_grads = _cached_long_reference(canonical, x[0], dy[0])
    got = {"y": to_numpy(y)[0], "h_n": to_numpy(h_n)[0, 0], "c_n": to_numpy(c_n)[0, 0],
           "dx": to_numpy(dx)[0], **{f"d{k}": v for k, v in to_numpy(grads[0][0]).items()}}  # fmt: skip
    want = {"y": want_y, "h_n": want_h, "c_n": want_c, "dx": want_dx,
            **{f"d{k}": v for k, v in want_grads.items()}}  # fmt: skip
    assert got.keys() == want.keys()
    for what, expected in want.items():
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(
            got[what], expected, rtol=LONG_TOLERANCE, atol=LONG_TOLERANCE * scale, err_msg=what
        )


def test_numpy_memory_is_linear_in_sequence_length():
    """Peak memory of a forward + backward grows by a constant number of bytes per step."""
    cell = lstm_multi.get_cell("numpy")(2, 8, variant="peephole")
    params = cell.init(seed=0)

    def peak(steps):
        x = np.ones((1, steps, 2), "float32")
        dy = np.ones((1, steps, 8), "float32")
        tracemalloc.start()
        cell.vjp(params, x, dy)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    short, long = peak(LONG // 4), peak(LONG)
    per_step = (long - short) / (LONG - LONG // 4)
    assert 0.9 * per_step * LONG <= long <= 1.1 * per_step * LONG + 1e6, (short, long)
