"""NumPy backend: a Python time loop over the spec, backpropagation through time by hand.

Also the reference path for the CuPy backend, which runs this same code with
CuPy as the array module.
"""

from __future__ import annotations

import functools

import numpy as np

from .. import bptt, network, regularize
from ..cell import FunctionalCell
from . import kernel_direction
from .numpy_fast import InPlaceOps


def unavailable_reason():
    return None


class ArrayModuleCell(FunctionalCell):
    """A cell over a NumPy-like module: forward records a tape, vjp replays it backwards.

    ``engine`` "cpu_kernels" (auto's choice for host float32/float64 arrays where a C++
    compiler is found) runs each direction on the compiled CPU kernels
    (``kernel_direction``); "array" runs the spec's array code in a Python loop.
    """

    def _forward(self, params, x, h0, c0, lengths, layer_masks=None, step_masks=None):
        engine = self._chosen(x, layer_masks, step_masks)
        run = functools.partial(self._run_direction, engine=engine)
        y, h_n, c_n, _, _ = network.forward(
            self.ops, self.variant, params, x, h0, c0, lengths, run, layer_masks=layer_masks,
            step_masks=step_masks,
        )  # fmt: skip
        return y, h_n, c_n

    def _chosen(self, x, layer_masks, step_masks=None):
        """The engine this call runs (kept in ``last_choice``)."""
        self.last_choice = self._choose(
            x, layer_masks is not None, step_masks=step_masks is not None
        )
        return self.last_choice.engine

    def _vjp(self, params, x, h0, c0, lengths, dy, dh_n, dc_n, layer_masks=None, step_masks=None):
        engine = self._chosen(x, layer_masks, step_masks)
        record = functools.partial(self._run_direction, record=True, engine=engine)
        _, _, _, tapes, layout = network.forward(
            self.ops, self.variant, params, x, h0, c0, lengths, record, layer_masks=layer_masks,
            step_masks=step_masks,
        )  # fmt: skip
        grads, dx, dh0, dc0 = bptt.backward(
            self.ops, self.variant, params, tapes, layout, dy, dh_n, dc_n,
            self._backward_direction, layer_masks,
        )  # fmt: skip
        # with half-precision inputs some sums come out in float32 (the cell state's
        # dtype): give every gradient its primal's dtype
        cast, dtype = self.ops.cast, self.ops.dtype_name
        grads = [
            [{k: cast(g, dtype(p[k])) for k, g in gp.items()} for gp, p in zip(gl, pl, strict=True)]
            for gl, pl in zip(grads, params, strict=True)
        ]
        return grads, cast(dx, dtype(x)), cast(dh0, dtype(h0)), cast(dc0, dtype(c0))

    # the time loop of one layer-direction: a subclass may route it elsewhere (the CuPy
    # cell replays it from CUDA graphs with ``cuda_graphs=True``)

    def _run_direction(
        self, ops, variant, p, xs, h0, c0, valid, record=False, engine="array", step_masks=None
    ):
        """One direction's forward for ``network.forward`` (``network.loop_direction``'s
        contract) on ``engine``: "cpu_kernels" (host float32/float64; the array loop
        where the kernels cannot be built) or "array"; with ``step_masks`` (zoneout,
        recurrent dropout) ``regularize.loop_direction``, which only "array" is chosen for."""
        if step_masks is not None:
            return regularize.loop_direction(ops, variant, p, xs, h0, c0, valid, step_masks, record)
        if engine == "cpu_kernels":
            return kernel_direction.run_direction(ops, variant, p, xs, h0, c0, valid, record)
        return network.loop_direction(ops, variant, p, xs, h0, c0, valid, record)

    def _backward_direction(self, ops, variant, p, tape, dys, dh, dc, valid):
        """The backward of a tape from ``_run_direction`` (``bptt.backward_direction``'s
        contract)."""
        if isinstance(tape, regularize.Tape):
            return regularize.backward_direction(ops, variant, p, tape, dys, dh, dc, valid)
        return kernel_direction.backward_any(ops, variant, p, tape, dys, dh, dc, valid)


class Cell(ArrayModuleCell):
    __doc__ = FunctionalCell.__doc__
    backend = "numpy"
    ops = InPlaceOps(np)

    def _check_dtype_supported(self, name, dtype_name):
        if dtype_name == "bfloat16":
            raise TypeError(f"{name}: NumPy has no bfloat16; use float16, float32 or float64")

    def _to_backend(self, array, name):
        if not isinstance(array, np.ndarray):
            raise TypeError(f"{name}: expected a numpy array, got {type(array).__name__}")
        return array
