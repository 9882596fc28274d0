"""The fused gate kernels of the CuPy backend, generated from the spec, and their runners.

Each variant's forward gate math (``lstm_multi.spec``) and its derived backward
(``lstm_multi.compile.derive``) are emitted as the operations of two
``cupy.ElementwiseKernel``s (``lstm_multi.compile.emit_cuda``): a step's whole
elementwise math is one kernel launch forward and one backward, for every
variant, a user's own included. ``CudaKernels`` runs the generated kernels,
compiled by CuPy (NVRTC) on first use per variant and dtype, and cached by CuPy
on disk. (The tests run the plumbing around the kernels on machines without a
GPU through a stand-in with the same interface, ``tests/doubles.py``
``ProgramKernels``; the generated C itself is compiled with a host C++ compiler
in the tests and checked against the programs.)

Interface: ``forward(variant, z, c_prev, extra) -> (h, c, saved)`` and
``backward(variant, dh, dc, saved, extra) -> (dz, dc_prev, terms)`` where
``terms`` maps each parameter to its per-element gradient terms (B, rows, H).

Precision: loads are converted to the state type ``S`` (float32 for float16
inputs, else the input type ``T``), the math runs in ``S``, h is stored as
``T`` and everything the backward sums over time and batch (dz, the parameter
terms) as ``S`` (``ArrayModuleOps.state_dtype``).
"""

from __future__ import annotations

import weakref

from ..compile import emit_cuda
from ..ops import ArrayModuleOps


class CudaKernels:
    """The generated kernels as ``cupy.ElementwiseKernel``s (built on first use per variant)."""

    def __init__(self, cupy):
        self.xp = cupy
        self._kernels = weakref.WeakKeyDictionary()  # a variant dropped by its user is freed

    def kernels(self, variant):
        """(forward, backward) ElementwiseKernels of ``variant``."""
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

    def forward(self, variant, z, c_prev, extra):
        cp = self.xp
        programs = variant.programs
        z = cp.ascontiguousarray(z)
        shape, state = c_prev.shape, c_prev.dtype
        h = cp.empty(shape, dtype=z.dtype)
        c = cp.empty(shape, dtype=state)
        stored = {n: cp.empty(shape, dtype=state) for n in emit_cuda.forward_stored(programs)}
        params = [cp.ascontiguousarray(extra[name], dtype=z.dtype) for name in variant.params]
        forward, _ = self.kernels(variant)
        forward(z, c_prev, *params, shape[-1], h, c, *stored.values())
        known = {programs.inputs["c_prev"]: c_prev, programs.forward_outputs["c"]: c, **stored}
        return h, c, tuple(known[n] for n in programs.saved)

    def backward(self, variant, dh, dc, saved, extra):
        cp = self.xp
        batch, hidden = dc.shape
        state = dc.dtype
        dz = cp.empty((batch, 4 * hidden), dtype=state)
        dc_prev = cp.empty(dc.shape, dtype=state)
        terms = {
            name: cp.empty((batch, len(rows), hidden), dtype=state)
            for name, rows in variant.params.items()
        }
        params = [cp.ascontiguousarray(extra[name], dtype=dh.dtype) for name in variant.params]
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
    variant the kernel emitters write (a variant with row reductions, which they do
    not yet, runs its generated array code on ``xp`` instead), and ``add_matmul`` accumulates ``r @ U`` into the step's slice of
    the hoisted input projection in place. With ``CudaKernels`` this is the
    CuPy backend's ops; with the tests' ``ProgramKernels`` the same plumbing runs on the
    CPU for tests.
    """

    def __init__(self, kernels, name="fused"):
        super().__init__(kernels.xp)
        self.kernels = kernels
        self.name = name

    def gates_forward(self, variant, z, c_prev, extra):
        if variant.programs.kernel_refusal() is not None:  # row reductions: the array code
            return super().gates_forward(variant, z, c_prev, extra)
        c_prev = self.cast(c_prev, self.state_dtype(self.dtype_name(z)))
        return self.kernels.forward(variant, z, c_prev, extra)

    def gates_backward(self, variant, dh, dc, cache, extra):
        if variant.programs.kernel_refusal() is not None:
            return super().gates_backward(variant, dh, dc, cache, extra)
        dc = self.cast(dc, self.state_dtype(self.dtype_name(dh)))
        dz, dc_prev, terms = self.kernels.backward(variant, dh, dc, cache, extra)
        # summed over time in the state dtype, rounded to each parameter's dtype once (bptt)
        return dz, dc_prev, {name: self.sum(t, 0) for name, t in terms.items()}

    def add_matmul(self, z, a, b):
        return self.kernels.gemm_accumulate(z, self.cast(a, self.dtype_name(b)), b)
