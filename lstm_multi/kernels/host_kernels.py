"""The generated CUDA kernels compiled for the CPU by a host C++ compiler.

Element kernels: ``emit_cuda.host_source`` wraps each ElementwiseKernel operation in a
plain loop. Row kernels (programs with row reductions): ``emit_cuda.row_source`` is the
very text CuPy's RawKernel compiles, which a host compiler reads as a loop over the rows
and, within each pass between two barriers, over the block's threads (``emit_cuda``'s
module doc says what that emulation cannot show). ``HostKernels`` compiles the text
(``build.compile_library``: the host C++ compiler, the cache) and calls it through
ctypes on NumPy arrays. This runs the exact text the GPU runs, so it is how that text is
checked on machines without a GPU (tests and ``lstm_multi.testing.check_variant``).
Without a compiler it raises ``build.CompilerMissing`` (a ``RuntimeError``) saying so; a
compiler that refuses the generated code raises ``RuntimeError`` with its messages.
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
    """A variant's forward and backward kernels run on the CPU, T and S given as C types.

    ``threads``: the block size a row kernel is run with (a power of two, at least 2);
    None takes ``emit_cuda.row_threads``' choice for the rows' H, as the CuPy runner does.
    ``reverse``: run each pass's threads last to first (a race within a pass changes the
    result with the order: ``emit_cuda``'s module doc).
    """

    def __init__(self, variant, t_type="double", s_type="double", threads=None):
        if t_type not in _C_TYPES or s_type not in _C_TYPES:
            raise ValueError(f"types: expected 'double' or 'float', got {t_type!r}, {s_type!r}")
        if threads is not None and (threads < 2 or threads & (threads - 1)):
            raise ValueError(f"threads: expected a power of two >= 2 or None, got {threads!r}")
        self.variant = variant
        self.T, self.S = _C_TYPES[t_type], _C_TYPES[s_type]
        self.threads = threads
        self.reverse = False
        programs = variant.programs
        self.rows = emit_cuda.row_layout(programs)
        if self.rows:
            self.kernels = (
                emit_cuda.forward_row_kernel(programs, variant.name),
                emit_cuda.backward_row_kernel(programs, variant.name),
            )
            source = emit_cuda.row_source(self.kernels, t_type, s_type)
        else:
            self.kernels = (
                emit_cuda.forward_kernel(programs, variant.name),
                emit_cuda.backward_kernel(programs, variant.name),
            )
            source = emit_cuda.host_source(self.kernels, t_type, s_type)
        self.library = compile_library(source)

    def _params(self, extra):
        """The gate math's parameters (split halves: the bias ``b`` first), as T arrays."""
        names = self.variant.programs.params
        return [np.ascontiguousarray(extra[name], dtype=self.T) for name in names]

    def _launch(self, kernel, batch, hidden):
        """The arguments a call starts with: the number of elements (element kernels), or
        the block's threads, the launch's shared bytes and the threads' order (row
        kernels)."""
        if not self.rows:
            return [ctypes.c_ssize_t(batch * hidden)]
        size = np.dtype(self.S).itemsize
        threads = self.threads or emit_cuda.row_threads(hidden, self.kernels, size)
        shared = emit_cuda.shared_bytes(kernel, threads, size)
        return [ctypes.c_int(threads), ctypes.c_longlong(shared), ctypes.c_int(self.reverse)]

    def _sizes(self, batch, hidden):
        """The sizes among a kernel's own arguments: H, and the rows (row kernels)."""
        sizes = [ctypes.c_longlong(hidden)]
        return sizes + ([ctypes.c_longlong(batch)] if self.rows else [])

    def forward(self, z, c_prev, extra):
        """-> (h in T, c in S, saved values in S): what the GPU forward kernel writes.

        z: (B, G H) (G = 8 for split halves: x_t W then r U); extra: the gate math's
        parameters by name (split halves: ``b`` (4H,) among them)."""
        programs = self.variant.programs
        z = np.ascontiguousarray(z, dtype=self.T)
        c_prev = np.ascontiguousarray(c_prev, dtype=self.S)
        shape = c_prev.shape
        h, c = np.full(shape, np.nan, self.T), np.full(shape, np.nan, self.S)
        stored = {n: np.full(shape, np.nan, self.S) for n in emit_cuda.forward_stored(programs)}
        params = self._params(extra)
        getattr(self.library, self.kernels[0].name)(
            *self._launch(self.kernels[0], *shape),
            _pointer(z),
            _pointer(c_prev),
            *map(_pointer, params),
            *self._sizes(*shape),
            _pointer(h),
            _pointer(c),
            *map(_pointer, stored.values()),
        )
        known = {programs.inputs["c_prev"]: c_prev, programs.forward_outputs["c"]: c, **stored}
        return h, c, tuple(known[n] for n in programs.saved)

    def backward(self, dh, dc, saved, extra):
        """-> (dz (B, G H), dc_prev, {param: per-element terms (B, rows, H)}), all in S."""
        programs = self.variant.programs
        dh = np.ascontiguousarray(dh, dtype=self.T)
        dc = np.ascontiguousarray(dc, dtype=self.S)
        batch, hidden = dc.shape
        saved = [np.ascontiguousarray(a, dtype=self.S) for a in saved]
        dz = np.full((batch, len(programs.z_inputs) * hidden), np.nan, self.S)
        dc_prev = np.full(dc.shape, np.nan, self.S)
        terms = {
            name: np.full((batch, len(rows), hidden), np.nan, self.S)
            for name, rows in programs.params.items()
        }
        params = self._params(extra)
        getattr(self.library, self.kernels[1].name)(
            *self._launch(self.kernels[1], batch, hidden),
            _pointer(dh),
            _pointer(dc),
            *map(_pointer, saved),
            *map(_pointer, params),
            *self._sizes(batch, hidden),
            _pointer(dz),
            _pointer(dc_prev),
            *map(_pointer, terms.values()),
        )
        return dz, dc_prev, terms
