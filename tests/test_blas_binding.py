"""The kernels call a BLAS with integers of the width it declares (``kernels/blas.py``,
``kernels/cpp/lm_blas.h``).

* ``blas.integer_bytes``: ILP64 where OpenBLAS's config names ``USE64BITINT``;
  LP64 for an OpenBLAS without it, and for a library that says nothing (torch's
  MKL, libc) or is not loaded;
* the batch-split loops on a stand-in BLAS (``tests/fake_blas.cpp``) with 32-bit
  and with 64-bit integers: every integer it receives is a valid dimension or code,
  and the loops compute what the whole-sequence loop computes, in float (through
  the packed GEMM) and in double.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from lstm_multi import spec
from lstm_multi.kernels import blas, build, cpu_kernels

pytestmark = pytest.mark.skipif(
    build.host_compiler() is None, reason="no host C++ compiler (g++, clang++ or $CXX)"
)

FAKE = (Path(__file__).parent / "fake_blas.cpp").read_text()
INTEGER = {blas.LP64: "int", blas.ILP64: "long long"}


def _fake_blas(width, config=None):
    """The stand-in BLAS with ``width``-byte integers, loaded; ``config``: what its
    ``openblas_get_config`` says (none without)."""
    head = [f"typedef {INTEGER[width]} lm_fake_int;"]
    if config is not None:
        head.append(f'#define LM_FAKE_CONFIG "{config}"')
    library = build.compile_library(
        "\n".join([*head, FAKE]), ("-O2", "-Wall", "-Werror", "-fopenmp")
    )
    for name in ("lm_fake_calls", "lm_fake_bad"):
        getattr(library, name).argtypes, getattr(library, name).restype = [], ctypes.c_long
    return library


OPENBLAS_LP64 = "OpenBLAS 0.3.27 DYNAMIC_ARCH NO_AFFINITY Haswell MAX_THREADS=64"
OPENBLAS_ILP64 = "OpenBLAS 0.3.27 USE64BITINT DYNAMIC_ARCH NO_AFFINITY Haswell MAX_THREADS=64"


def test_openblas_says_its_width_in_its_config():
    assert blas.integer_bytes(_fake_blas(8, OPENBLAS_ILP64)._name) == blas.ILP64
    assert blas.integer_bytes(_fake_blas(4, OPENBLAS_LP64)._name) == blas.LP64


def test_a_library_that_says_nothing_is_lp64(tmp_path):
    assert blas.integer_bytes(_fake_blas(4)._name) == blas.LP64
    assert blas.integer_bytes("libc.so.6") == blas.LP64
    assert blas.integer_bytes(str(tmp_path / "not_loaded.so")) == blas.LP64


def test_torchs_mkl_is_lp64():
    """torch's x86 wheels link MKL's LP64 interface into libtorch_cpu: ``sgemm_`` takes
    32-bit integers (its ILP64 API is ``sgemm_64``)."""
    pytest.importorskip("torch")
    from lstm_multi.backends import torch_ops

    host = torch_ops.TorchOps().host_blas()
    if host is None:
        pytest.skip("this torch has no MKL")
    assert blas.integer_bytes(host.library) == blas.LP64


def _kernels(variant, scalar):
    """The variant's kernels in a library of their own (the BLAS a library binds is its
    global state: the stand-in must not replace torch's in the kernels other tests use)."""
    source = cpu_kernels.kernel_source(spec.get_variant(variant), scalar)
    return cpu_kernels.CpuKernels(spec.get_variant(variant), scalar, source + "// fake BLAS\n")


def _sequences(kernels, loops, dtype, packed):
    """Forward and backward of a 4-step sequence of batch 5 over 2 threads, by the split
    loops on ``loops`` (``packed``: through the packed GEMM) and by the whole-sequence
    loop; -> (split, whole) outputs."""
    rng = np.random.default_rng(3)
    T, B, H, threads = 4, 5, 6, 2
    G, R = 4 * H, kernels.rows
    U = (rng.standard_normal((H, G)) * 0.3).astype(dtype)
    P = (rng.standard_normal((max(R, 1), H)) * 0.5).astype(dtype)
    zx = rng.standard_normal((T, B, G)).astype(dtype)
    state = rng.standard_normal((2, B, H)).astype(dtype)
    dys = rng.standard_normal((T, B, H)).astype(dtype)
    final = rng.standard_normal((2, B, H)).astype(dtype)
    valid = np.ones((T, B), np.uint8)
    valid[2:, 1] = 0  # one sequence of length 2

    def pack(transposed):
        if not packed:
            return None
        rows = -(-B // threads)
        nbytes = loops.packed_bytes(rows, H, transposed)
        assert nbytes > 0
        buffer = np.zeros(nbytes // 4 + 1, np.float32)
        loops.pack(rows, H, U.ctypes.data, transposed, buffer.ctypes.data)
        return buffer

    results = []
    for split in (True, False):
        z = zx.copy()
        hs, cs = np.zeros((2, T + 1, B, H), dtype)
        hs[0], cs[0] = state
        ys = np.zeros((T, B, H), dtype)
        saved = np.zeros((T, max(kernels.saved_count, 1), B, H), dtype)
        a = [z, U, hs, cs, P, valid, ys, saved]
        if split:
            buffer = pack(0)
            loops.forward(T, B, H, z.ctypes.data, U.ctypes.data,
                          None if buffer is None else buffer.ctypes.data,
                          *(x.ctypes.data for x in a[2:]), threads)  # fmt: skip
        else:
            kernels.sequence_forward(T, B, H, *(x.ctypes.data for x in a))
        dh, dc = final.copy()
        dzs, dP = np.zeros((T, B, G), dtype), np.zeros_like(P)
        if split:
            buffer = pack(1)
            loops.backward(T, B, H, dys.ctypes.data, dh.ctypes.data, dc.ctypes.data,
                           cs.ctypes.data, saved.ctypes.data, P.ctypes.data, valid.ctypes.data,
                           U.ctypes.data, None if buffer is None else buffer.ctypes.data,
                           dzs.ctypes.data, dP.ctypes.data, threads)  # fmt: skip
        else:
            Ut = np.ascontiguousarray(U.T)
            kernels.sequence_backward(T, B, H, dys.ctypes.data, dh.ctypes.data, dc.ctypes.data,
                                      cs.ctypes.data, saved.ctypes.data, P.ctypes.data,
                                      valid.ctypes.data, Ut.ctypes.data, dzs.ctypes.data,
                                      dP.ctypes.data)  # fmt: skip
        results.append([hs, cs, ys, saved, dh, dc, dzs, dP])
    return results


@pytest.mark.parametrize("width", [blas.LP64, blas.ILP64], ids=["lp64", "ilp64"])
@pytest.mark.parametrize("scalar", ["float", "double"])
def test_split_loops_pass_the_blas_integers_of_its_width(width, scalar, monkeypatch):
    monkeypatch.setenv("LSTM_MULTI_CPU_THREADS", "1")
    config = OPENBLAS_ILP64 if width == blas.ILP64 else OPENBLAS_LP64
    fake = _fake_blas(width, config)
    kernels = _kernels("peephole", scalar)
    loops = kernels.split_loops(cpu_kernels.HostBlas(fake._name, 2))
    assert loops is not None
    dtype, rtol = (np.float32, 1e-5) if scalar == "float" else (np.float64, 1e-12)
    for packed in (False, True) if scalar == "float" else (False,):
        calls = fake.lm_fake_calls()
        split, whole = _sequences(kernels, loops, dtype, packed)
        assert fake.lm_fake_calls() > calls  # the products ran on the stand-in
        assert fake.lm_fake_bad() == 0  # every integer it read was the one meant
        for got, want in zip(split, whole, strict=True):
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)
