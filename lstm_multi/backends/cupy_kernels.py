"""The fused gate kernels of the CuPy backend, generated from the spec, and their runners.

Each variant's forward gate math (``lstm_multi.spec``) and its derived backward
(``lstm_multi.compile.derive``) are emitted as CUDA C (``lstm_multi.compile.emit_cuda``):
a step's whole gate math is one kernel launch forward and one backward, for every
variant, a user's own included. A variant without row reductions runs two
``cupy.ElementwiseKernel``s (one thread an element); one with row reductions (the
layer-normalised variants) two ``cupy.RawKernel``s with one thread block a batch row
(``emit_cuda``'s row layout), launched with ``emit_cuda.row_threads`` threads and
``emit_cuda.shared_bytes`` of shared memory. ``CudaKernels`` runs the generated kernels,
compiled by CuPy (NVRTC) on first use per variant (and per dtype), and cached by CuPy
on disk. (The tests run the plumbing around the kernels on machines without a
GPU through a stand-in with the same interface, ``tests/doubles.py``
``ProgramKernels``; the generated C itself is compiled with a host C++ compiler
in the tests and checked against the programs.)

Interface: ``forward(variant, z, c_prev, extra) -> (h, c, saved)`` and
``backward(variant, dh, dc, saved, extra) -> (dz, dc_prev, terms)`` where
``terms`` maps each parameter of the gate math to its per-element gradient terms
(B, rows, H). For split halves z is (B, 8H), x_t W then r U (without b), dz likewise,
and the bias ``b`` (4H,) is among the gate math's parameters (``extra``), read as (4, H).

Precision: loads are converted to the state type ``S`` (float32 for float16
inputs, else the input type ``T``), the math runs in ``S``, h is stored as
``T`` and everything the backward sums over time and batch (dz, the parameter
terms) as ``S`` (``ArrayModuleOps.state_dtype``).
"""

from __future__ import annotations

import weakref

import numpy as np

from ..compile import emit_cuda
from ..ops import ArrayModuleOps

#: NumPy dtype name -> the C type the row kernels' source is written in
_ROW_C_TYPES = {"float16": "float16", "float32": "float", "float64": "double"}


class CudaKernels:
    """The generated kernels as ``cupy.ElementwiseKernel``s, or ``cupy.RawKernel``s for a
    variant with row reductions (built on first use per variant, and per dtype for those)."""

    def __init__(self, cupy):
        self.xp = cupy
        self._kernels = weakref.WeakKeyDictionary()  # a variant dropped by its user is freed
        self._row_kernels = weakref.WeakKeyDictionary()  # variant -> {(io, state): built}

    def kernels(self, variant):
        """(forward, backward) ElementwiseKernels of ``variant`` (one without reductions)."""
        found = self._kernels.get(variant)
        if found is None:
            programs = variant.programs
            label = variant.name
            found = tuple(
                self.xp.ElementwiseKernel(
                    k.in_params, k.out_params, k.operation, k.name, preamble=emit_cuda.PREAMBLE
                )
                for k in (
                    emit_cuda.forward_kernel(programs, label),
                    emit_cuda.backward_kernel(programs, label),
                )
            )
            self._kernels[variant] = found
        return found

    def row_kernels(self, variant, io, state):
        """(sources, RawKernels, their most threads a block) of ``variant`` (one with row
        reductions) for input dtype ``io`` and state dtype ``state`` (names)."""
        built = self._row_kernels.setdefault(variant, {})
        found = built.get((io, state))
        if found is None:
            programs = variant.programs
            sources = (
                emit_cuda.forward_row_kernel(programs, variant.name),
                emit_cuda.backward_row_kernel(programs, variant.name),
            )
            code = emit_cuda.row_source(sources, _ROW_C_TYPES[io], _ROW_C_TYPES[state])
            kernels = tuple(self.xp.RawKernel(code, k.name) for k in sources)
            # the registers a thread needs bound the block (a power of two for the tree)
            most = min(k.max_threads_per_block for k in kernels)
            found = built[io, state] = (sources, kernels, 1 << (int(most).bit_length() - 1))
        return found

    def _row_launch(self, variant, io, state, which, batch, hidden):
        """(kernel, grid, block, shared bytes) of a row kernel for (B, H) rows."""
        sources, kernels, most = self.row_kernels(variant, io, state)
        size = np.dtype(state).itemsize
        threads = emit_cuda.row_threads(hidden, sources, size, most)
        shared = emit_cuda.shared_bytes(sources[which], threads, size)
        return kernels[which], (batch,), (threads,), shared

    def forward(self, variant, z, c_prev, extra):
        cp = self.xp
        programs = variant.programs
        z = cp.ascontiguousarray(z)
        shape, state = c_prev.shape, c_prev.dtype
        h = cp.empty(shape, dtype=z.dtype)
        c = cp.empty(shape, dtype=state)
        stored = {n: cp.empty(shape, dtype=state) for n in emit_cuda.forward_stored(programs)}
        params = [cp.ascontiguousarray(extra[name], dtype=z.dtype) for name in programs.params]
        if emit_cuda.row_layout(programs):
            kernel, grid, block, shared = self._row_launch(
                variant, z.dtype.name, state.name, 0, *shape
            )
            args = (z, cp.ascontiguousarray(c_prev), *params, np.int64(shape[-1]),
                    np.int64(shape[0]), h, c, *stored.values())  # fmt: skip
            kernel(grid, block, args, shared_mem=shared)
        else:
            forward, _ = self.kernels(variant)
            forward(z, c_prev, *params, shape[-1], h, c, *stored.values())
        known = {programs.inputs["c_prev"]: c_prev, programs.forward_outputs["c"]: c, **stored}
        return h, c, tuple(known[n] for n in programs.saved)

    def backward(self, variant, dh, dc, saved, extra):
        cp = self.xp
        programs = variant.programs
        batch, hidden = dc.shape
        state = dc.dtype
        dz = cp.empty((batch, len(programs.z_inputs) * hidden), dtype=state)
        dc_prev = cp.empty(dc.shape, dtype=state)
        terms = {
            name: cp.empty((batch, len(rows), hidden), dtype=state)
            for name, rows in programs.params.items()
        }
        params = [cp.ascontiguousarray(extra[name], dtype=dh.dtype) for name in programs.params]
        if emit_cuda.row_layout(programs):
            kernel, grid, block, shared = self._row_launch(
                variant, dh.dtype.name, state.name, 1, batch, hidden
            )
            saved = [cp.ascontiguousarray(a, dtype=state) for a in saved]
            args = (cp.ascontiguousarray(dh), cp.ascontiguousarray(dc), *saved, *params,
                    np.int64(hidden), np.int64(batch), dz, dc_prev, *terms.values())  # fmt: skip
            kernel(grid, block, args, shared_mem=shared)
        else:
            saved = [cp.asarray(a, dtype=state) for a in saved]
            _, backward = self.kernels(variant)
            backward(dh, dc, *saved, *params, hidden, dz, dc_prev, *terms.values())
        return dz, dc_prev, terms

    def gemm_accumulate(self, z, a, b):
        """z += a @ b in place (one cuBLAS gemm with beta = 1 for float32/float64)."""
        cp = self.xp
        if (
            z.dtype.char in "fd"
            and a.dtype == b.dtype == z.dtype
            and z.ndim == 2
            and z.flags.c_contiguous
        ):
            import cupy.cublas

            cupy.cublas.gemm("N", "N", a, b, out=z, beta=1.0)
            return z
        z += cp.matmul(a, b)  # float16: cuBLAS through cupy.matmul, then one add
        return z


# ---------------------------------------------------------------------------
# the ops that route a step through the kernels


class FusedOps(ArrayModuleOps):
    """``ArrayModuleOps`` whose per-step work goes through ``kernels``.

    ``gates_forward`` / ``gates_backward`` run one fused kernel each, for every
    variant (row reductions and split halves included: ``emit_cuda`` writes them all),
    and ``add_matmul`` accumulates ``r @ U`` into the step's slice of
    the hoisted input projection in place. With ``CudaKernels`` this is the
    CuPy backend's ops; with the tests' ``ProgramKernels`` the same plumbing runs on the
    CPU for tests.
    """

    def __init__(self, kernels, name="fused"):
        super().__init__(kernels.xp)
        self.kernels = kernels
        self.name = name

    def gates_forward(self, variant, z, c_prev, extra):
        c_prev = self.cast(c_prev, self.state_dtype(self.dtype_name(z)))
        return self.kernels.forward(variant, z, c_prev, extra)

    def gates_backward(self, variant, dh, dc, cache, extra):
        dc = self.cast(dc, self.state_dtype(self.dtype_name(dh)))
        dz, dc_prev, terms = self.kernels.backward(variant, dh, dc, cache, extra)
        # summed over time in the state dtype, rounded to each parameter's dtype once (bptt)
        grads = {name: self.sum(t, 0) for name, t in terms.items()}
        if variant.split:  # the bias's (4, H) rows are its (4H,) in gate order
            grads["b"] = self.reshape(grads["b"], (-1,))
        return dz, dc_prev, grads

    def add_matmul(self, z, a, b):
        return self.kernels.gemm_accumulate(z, self.cast(a, self.dtype_name(b)), b)
