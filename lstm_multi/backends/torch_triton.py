"""The torch generic path with each step's gate math in one generated Triton kernel.

``TritonTorchOps`` is the generic path's ops (``torch_bptt.OneDnnTorchOps``)
with ``gates_forward`` / ``gates_backward`` replaced by the variant's generated
Triton kernels (``triton_kernels.TritonKernels``): one launch per step and
direction instead of one per operation. It is used where Triton can run the
tensors: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (the tests);
float64, and tensors Triton cannot run, fall back to the generated array code.
Chosen with ``get_cell("torch")(..., gate_kernel="triton")``.

``gate_kernel="triton_persistent"`` runs each direction's whole time loop as one
launch of the generated persistent kernels (``PersistentEngine``: U's gate
blocks held on chip, one program per 16 rows of the batch), forward and
backward, with the weight gradients as whole-sequence products after the loop
(``bptt.direction_grads``); for H up to ``TritonKernels.MAX_SEQUENCE_HIDDEN``
and no projection, else the per-step kernels above.

Half precision follows the library's policy: the kernels compute in float32
and return h in the input's dtype and c, dz and the parameter terms in
float32, which ``bptt`` sums and rounds once.
"""

from __future__ import annotations

import torch

from .. import bptt, environment, spec
from ..step import input_projection, recurrent_weight
from .torch_bptt import OneDnnTorchOps, direction_runner_for
from .triton_kernels import TritonKernels

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_can_run(tensor):
    """Whether Triton can run ``tensor``: on CUDA, or anywhere under its interpreter."""
    on_device = tensor.is_cuda or environment.triton_interpret()
    return on_device and tensor.dtype in _DTYPES


class TritonTorchOps(OneDnnTorchOps):
    name = "torch_triton"

    def __init__(self):
        super().__init__()
        self.kernels = TritonKernels()

    def gates_forward(self, variant, z, c_prev, extra):
        if not triton_can_run(z):
            return super().gates_forward(variant, z, c_prev, extra)
        return self.kernels.forward(variant, z, c_prev, extra)

    def gates_backward(self, variant, dh, dc, cache, extra):
        if not triton_can_run(dh):
            return super().gates_backward(variant, dh, dc, cache, extra)
        dz, dc_prev, terms = self.kernels.backward(variant, dh, dc, cache, extra)
        # (B, rows, H) terms summed over the batch, in the parameter's shape (b: (4H,))
        return dz, dc_prev, {name: t.sum(0).reshape(extra[name].shape) for name, t in terms.items()}


TRITON_OPS = TritonTorchOps()
run_direction = direction_runner_for(TRITON_OPS, False, None)  # Triton or the array code


class PersistentEngine:
    """A direction as one launch of the persistent kernels, forward and backward (the
    engine interface of ``torch_bptt``: ``forward`` keeps a flat tape of tensors)."""

    def __init__(self, ops):
        self.ops = ops

    def _weights(self, variant, p):
        U = recurrent_weight(self.ops, variant, p["U"])
        return U, {name: p[name] for name in variant.gate_params}

    def forward(self, variant, p, xs, h0, c0, valid, record):
        U, extra = self._weights(variant, p)
        zx = input_projection(self.ops, variant, xs, p)  # x W + b, or x W for split halves
        ys, hs, cs, stored = self.ops.kernels.sequence_forward(variant, zx, U, h0, c0, extra, valid)
        tape = (xs, hs, cs, *stored) if record else ()
        return ys, hs[-1], cs[-1].to(c0.dtype), tape

    def backward(self, variant, p, tape, dys, dh, dc, valid):
        xs, hs, cs, *stored = tape
        U, extra = self._weights(variant, p)
        dzs, dh0, dc0, dextra = self.ops.kernels.sequence_backward(
            variant, dys, dh, dc, cs, stored, U, extra, valid
        )
        rs = (hs if variant.recurrent_state == "h" else cs)[: xs.shape[0]]
        return bptt.direction_grads(self.ops, variant, p, xs, rs, dzs, dextra, dh0, dc0, dh, dc)


def persistent_engine(variant, p, xs, h0, c0):
    """A ``PersistentEngine`` where the persistent kernels take the direction, else None
    (then the per-step Triton kernels, or the array code, run it)."""
    tensors = (xs, h0, c0, *p.values())
    if spec.PROJECTION in p or h0.shape[-1] > TritonKernels.MAX_SEQUENCE_HIDDEN:
        return None
    if not all(triton_can_run(t) and t.dtype == xs.dtype for t in tensors):
        return None
    return PersistentEngine(TRITON_OPS)


#: the whole time loop in one launch where it can (``gate_kernel="triton_persistent"``)
persistent_run_direction = direction_runner_for(TRITON_OPS, False, persistent_engine)
