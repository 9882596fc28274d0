"""Numerics at the edges, on every CPU backend.

- The logistic sigmoid is accurate in both tails: within 4 ulp of the exact
  value over z in [-80, 80] in float32 and float64 (NumPy's and CuPy's kernel
  formula, torch, JAX; the CUDA kernels' C++ formula compiled on the host).
- Outputs and gradients stay finite with pre-activations up to +-1e4.
- A sequence of T = 20,000 steps (B = 1) runs forward and backward (no
  recursion, no per-step Python frames kept), with memory linear in T.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import tracemalloc

import numpy as np
import pytest
from conftest import to_numpy
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


LONG = 20_000


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
    for a in to_numpy([y, h_n, c_n, dx, *grads[0][0].values()]):
        assert np.all(np.isfinite(a))


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
