"""The fused gate kernels of the CuPy backend, generated from the spec, and their runners.

Each variant's forward gate math (``lstm_multi.spec``) and its derived backward
(``lstm_multi.compile.derive``) are emitted as the operations of two
``cupy.ElementwiseKernel``s (``lstm_multi.compile.emit_cuda``): a step's whole
elementwise math is one kernel launch forward and one backward, for every
variant, a user's own included. Two runners share one interface:

* ``CudaKernels``: the generated kernels, compiled by CuPy (NVRTC) on first use
  per variant and dtype, and cached by CuPy on disk;
* ``ProgramKernels``: the same programs evaluated node by node with NumPy
  (``lstm_multi.compile.evaluate``), so the plumbing around the kernels runs in
  the tests on machines without a GPU. The generated C itself is compiled with
  a host C++ compiler in the tests and checked against the same evaluation.

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

import numpy as np

from .. import spec
from ..compile import emit_cuda, evaluate
from ..ops import ArrayModuleOps


def _blocks(z, hidden):
    return [z[:, k * hidden : (k + 1) * hidden] for k in range(4)]


def _rows(variant, extra):
    """Input name -> parameter row, for the variant's parameters."""
    return {
        f"{name}_{row}": extra[name][r]
        for name, rows in variant.params.items()
        for r, row in enumerate(rows)
    }


class ProgramKernels:
    """The kernels' programs evaluated by NumPy (for tests on machines without a GPU)."""

    xp = np

    def forward(self, variant, z, c_prev, extra):
        programs = variant.programs
        state = c_prev.dtype
        inputs = dict(
            zip(
                ("z_i", "z_f", "z_g", "z_o"),
                (b.astype(state) for b in _blocks(z, c_prev.shape[-1])),
                strict=True,
            )
        )
        inputs["c_prev"] = c_prev
        inputs.update((k, v.astype(state)) for k, v in _rows(variant, extra).items())
        h, c, saved = evaluate.evaluate_forward(programs, inputs)
        return h.astype(z.dtype), c, tuple(np.asarray(a, dtype=state) for a in saved)

    def backward(self, variant, dh, dc, saved, extra):
        programs = variant.programs
        state = dc.dtype
        inputs = {"dh": dh.astype(state), "dc": dc}
        inputs.update((k, v.astype(state)) for k, v in _rows(variant, extra).items())
        out = evaluate.evaluate_backward(programs, inputs, saved)
        dz = np.concatenate([out[f"dz_{g}"] for g in spec.GATE_ORDER], -1)
        terms = {
            name: np.stack([out[f"d{name}_{row}"] for row in rows], 1)
            for name, rows in variant.params.items()
        }
        return dz, out["dc_prev"], terms

    def gemm_accumulate(self, z, a, b):
        """z += a @ b in place; returns z."""
        z += a @ b
        return z


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
    variant, and ``add_matmul`` accumulates ``r @ U`` into the step's slice of
    the hoisted input projection in place. With ``CudaKernels`` this is the
    CuPy backend's ops; with ``ProgramKernels`` the same plumbing runs on the
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
        return dz, dc_prev, {name: self.sum(t, 0) for name, t in terms.items()}

    def add_matmul(self, z, a, b):
        return self.kernels.gemm_accumulate(z, self.cast(a, self.dtype_name(b)), b)
