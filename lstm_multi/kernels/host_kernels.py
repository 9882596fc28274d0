"""The generated CUDA kernels' operations compiled for the CPU by a host C++ compiler.

``emit_cuda.host_source`` wraps each ElementwiseKernel operation in a plain
loop; ``HostKernels`` compiles that text (``build.compile_library``: the host
C++ compiler, the cache) and calls it through
ctypes on NumPy arrays. This runs the exact operation text the GPU runs, so it
is how that text is checked on machines without a GPU (tests and
``lstm_multi.testing.check_variant``). Without a compiler it raises
``build.CompilerMissing`` (a ``RuntimeError``) saying so; a compiler that
refuses the generated code raises ``RuntimeError`` with its messages.
"""

from __future__ import annotations

import ctypes

import numpy as np

from ..compile import emit_cuda
from .build import compile_library

_C_TYPES = {"double": np.float64, "float": np.float32}


def _pointer(array):
    return array.ctypes.data_as(ctypes.c_void_p)


class HostKernels:
    """A variant's forward and backward kernels run on the CPU, T and S given as C types."""

    def __init__(self, variant, t_type="double", s_type="double"):
        if t_type not in _C_TYPES or s_type not in _C_TYPES:
            raise ValueError(f"types: expected 'double' or 'float', got {t_type!r}, {s_type!r}")
        self.variant = variant
        self.T, self.S = _C_TYPES[t_type], _C_TYPES[s_type]
        programs = variant.programs
        self.kernels = (
            emit_cuda.forward_kernel(programs, variant.name),
            emit_cuda.backward_kernel(programs, variant.name),
        )
        self.library = compile_library(emit_cuda.host_source(self.kernels, t_type, s_type))

    def _params(self, extra):
        return [np.ascontiguousarray(extra[name], dtype=self.T) for name in self.variant.params]

    def forward(self, z, c_prev, extra):
        """-> (h in T, c in S, saved values in S): what the GPU forward kernel writes."""
        programs = self.variant.programs
        z = np.ascontiguousarray(z, dtype=self.T)
        c_prev = np.ascontiguousarray(c_prev, dtype=self.S)
        shape = c_prev.shape
        h, c = np.empty(shape, self.T), np.empty(shape, self.S)
        stored = {n: np.empty(shape, self.S) for n in emit_cuda.forward_stored(programs)}
        params = self._params(extra)
        getattr(self.library, self.kernels[0].name)(
            ctypes.c_ssize_t(c_prev.size),
            _pointer(z),
            _pointer(c_prev),
            *map(_pointer, params),
            ctypes.c_longlong(shape[-1]),
            _pointer(h),
            _pointer(c),
            *map(_pointer, stored.values()),
        )
        known = {programs.inputs["c_prev"]: c_prev, programs.forward_outputs["c"]: c, **stored}
        return h, c, tuple(known[n] for n in programs.saved)

    def backward(self, dh, dc, saved, extra):
        """-> (dz (B, 4H), dc_prev, {param: per-element terms (B, rows, H)}), all in S."""
        dh = np.ascontiguousarray(dh, dtype=self.T)
        dc = np.ascontiguousarray(dc, dtype=self.S)
        batch, hidden = dc.shape
        saved = [np.ascontiguousarray(a, dtype=self.S) for a in saved]
        dz = np.empty((batch, 4 * hidden), self.S)
        dc_prev = np.empty(dc.shape, self.S)
        terms = {
            name: np.empty((batch, len(rows), hidden), self.S)
            for name, rows in self.variant.params.items()
        }
        params = self._params(extra)
        getattr(self.library, self.kernels[1].name)(
            ctypes.c_ssize_t(dc.size),
            _pointer(dh),
            _pointer(dc),
            *map(_pointer, saved),
            *map(_pointer, params),
            ctypes.c_longlong(hidden),
            _pointer(dz),
            _pointer(dc_prev),
            *map(_pointer, terms.values()),
        )
        return dz, dc_prev, terms
