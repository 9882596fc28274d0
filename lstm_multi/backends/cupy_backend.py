"""CuPy backend: the NumPy backend's code on the GPU, with one fused kernel per step.

The cell is the NumPy backend's (``ArrayModuleCell``: the spec in a Python time
loop, forward recording a tape, BPTT backward) with CuPy as the
array module. What differs is the ops (``cupy_kernels.FusedOps``):

* the input projection x_t W + b of all steps is one matrix product before the
  loop (as on every backend); each step then accumulates r @ U into its slice
  of that buffer with one cuBLAS gemm (beta = 1), so no temporary is made;
* the elementwise gate math of a step is one ``cupy.ElementwiseKernel``
  forward and one backward (a ``cupy.RawKernel`` each, one thread block a batch row,
  for a variant with row reductions such as "layernorm"), generated from the variant's
  forward math and its derived backward (``lstm_multi.compile.emit_cuda``, via
  ``cupy_kernels``), for every variant, a user's own included. For split halves the
  input projection adds no bias (``step.input_projection``): b is a gate parameter.

Dtypes: float32, float64 and float16 (the gate math and the cell state in
float32, see ``ArrayModuleOps.state_dtype``); CuPy has no bfloat16 here.
Arrays may be CuPy or NumPy (copied to the current device).

``cuda_graphs=True`` replays each layer-direction's whole forward (with its
tape) and whole backward from CUDA graphs captured once per shape
(``cupy_graphs``): one host call a direction instead of a few a step.

Zoneout, recurrent and input dropout and DropConnect (``lstm_multi.regularize``)
run as on NumPy: the regularized loop and its hand-written backward
(``regularize.loop_direction`` / ``backward_direction``) with CuPy as the array
module, the gate math of each step in the fused kernel; the masks are NumPy's
draws from the same key, copied to the device, so a CuPy cell draws the NumPy
cell's masks. Such a call runs on ``cupy_kernels``, never from the CUDA graphs.
"""

from __future__ import annotations

import cupy
import numpy as np

from ..cell import FunctionalCell
from .cupy_graphs import GraphedDirectionsCell
from .cupy_kernels import CudaKernels, FusedOps
from .numpy_backend import ArrayModuleCell


def unavailable_reason():
    """None when CuPy sees a CUDA device, else a sentence saying why not."""
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDARuntimeError without a driver or device, and the like
        return f"no CUDA device is available ({type(error).__name__}: {error})"
    if count == 0:
        return "no CUDA device is available (cupy.cuda.runtime.getDeviceCount() = 0)"
    return None


class CupyOps(FusedOps):
    def to_numpy(self, x):
        return cupy.asnumpy(x)

    def on_device_of(self, x, like):
        if x.device.id == like.device.id:
            return x
        with like.device:
            return cupy.asarray(x)


OPS = CupyOps(CudaKernels(cupy), "cupy")


class Cell(GraphedDirectionsCell, ArrayModuleCell):
    __doc__ = (
        (FunctionalCell.__doc__ or "")
        + """
    CuPy only: ``engine="cupy_graphed"`` (older spelling ``cuda_graphs=True``) replays each layer-direction's whole time
    loop, forward (with its tape) and backward, from a CUDA graph captured on
    the second call of each signature (shapes, dtypes, variant) and replayed
    from then on (``lstm_multi.backends.cupy_graphs``): one host call a
    direction instead of a few kernel launches a step, for the same numbers.
    The graphs belong to the cell (at most 8 each way, the least recently
    used dropped first), each with its own memory; a capture that fails warns
    once (``RuntimeWarning``) and that signature runs without a graph.
    ``cuda_graphs=False`` (the default): every call launches step by step.
    """
    )
    backend = "cupy"
    ops = OPS

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        variant="lstm",
        num_layers: int = 1,
        bidirectional: bool = False,
        batch_first: bool = True,
        proj_size: int = 0,
        dropout: float = 0.0,
        *,
        engine: str = "auto",
        cuda_graphs: bool = False,
        zoneout: float | tuple[float, float] = 0.0,
        recurrent_dropout: float = 0.0,
        dropconnect: float = 0.0,
        input_dropout: float = 0.0,
    ):
        super().__init__(
            input_size, hidden_size, variant, num_layers, bidirectional, batch_first,
            proj_size, dropout, engine=engine, cuda_graphs=cuda_graphs, zoneout=zoneout,
            recurrent_dropout=recurrent_dropout, dropconnect=dropconnect,
            input_dropout=input_dropout,
        )  # fmt: skip

    def _device_type(self, x):
        return "cuda"

    def _to_backend(self, array, name):
        if isinstance(array, cupy.ndarray):
            return array
        if isinstance(array, np.ndarray):
            return cupy.asarray(array)
        raise TypeError(f"{name}: expected a cupy or numpy array, got {type(array).__name__}")

    def _check_dtype_supported(self, name, dtype_name):
        if dtype_name == "bfloat16":
            raise TypeError(
                f"{name}: the cupy backend has no bfloat16 (use float16, float32 or float64)"
            )
