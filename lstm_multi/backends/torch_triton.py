"""The torch generic path with each step's gate math in one generated Triton kernel.

``TritonTorchOps`` is the generic path's ops (``torch_bptt.OneDnnTorchOps``)
with ``gates_forward`` / ``gates_backward`` replaced by the variant's generated
Triton kernels (``triton_kernels.TritonKernels``): one launch per step and
direction instead of one per operation. It is used where Triton can run the
tensors: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (the tests);
float64, and tensors Triton cannot run, fall back to the generated array code.
Chosen with ``get_cell("torch")(..., gate_kernel="triton")``.

Half precision follows the library's policy: the kernels compute in float32
and return h in the input's dtype and c, dz and the parameter terms in
float32, which ``bptt`` sums and rounds once.
"""

from __future__ import annotations

import os

import torch

from .torch_bptt import OneDnnTorchOps, direction_runner
from .triton_kernels import TritonKernels

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_can_run(tensor):
    """Whether Triton can run ``tensor``: on CUDA, or anywhere under its interpreter."""
    on_device = tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
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
        return dz, dc_prev, {name: t.sum(0) for name, t in terms.items()}


TRITON_OPS = TritonTorchOps()
run_direction = direction_runner(TRITON_OPS, cpu_kernels=False)  # Triton or the array code
