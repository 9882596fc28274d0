"""The generated Triton gate kernels run on PyTorch tensors.

``TritonKernels`` has the interface of the CuPy backend's kernels
(``cupy_kernels``): ``forward(variant, z, c_prev, extra) -> (h, c, saved)`` and
``backward(variant, dh, dc, saved, extra) -> (dz, dc_prev, terms)``, with
``terms`` each parameter's per-element gradient terms (B, rows, H). The kernels
(``lstm_multi.compile.emit_triton``) are generated per variant, a user's own
included, on first use. They run on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1`` (set before first use), which is how CI tests them.

The math is float32: inputs may be float32, float16 or bfloat16 (h comes back
in the input's dtype, everything else in float32); float64 is refused.
"""

from __future__ import annotations

import os

import torch
import triton

from ..compile import emit_triton
from ..compile.emit_cuda import forward_stored
from ..compile.host_kernels import cache_dir

_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TritonKernels:
    BLOCK = 256

    def __init__(self, directory=None):
        self.directory = directory or cache_dir().parent / "triton"
        self._modules = {}

    def module(self, variant):
        """The variant's generated module, generated and imported once per variant and
        interpreter mode (Triton reads TRITON_INTERPRET when the module is imported)."""
        key = (variant, os.environ.get("TRITON_INTERPRET", ""))
        found = self._modules.get(key)
        if found is None:
            found = self._modules[key] = emit_triton.load(variant.programs, self.directory)
        return found

    def _check(self, name, tensor):
        if tensor.dtype not in _INPUT_DTYPES:
            raise TypeError(
                f"{name}: the Triton gate kernels compute in float32 and take float32, "
                f"float16 or bfloat16 tensors, got {tensor.dtype}"
            )

    def _grid(self, n):
        return (triton.cdiv(n, self.BLOCK),)

    def _params(self, variant, extra, like):
        return [extra[name].to(like.dtype).contiguous() for name in variant.params]

    def forward(self, variant, z, c_prev, extra):
        self._check("z", z)
        programs = variant.programs
        z = z.contiguous()
        c_prev = c_prev.to(torch.float32).contiguous()
        shape = c_prev.shape
        h = torch.empty(shape, dtype=z.dtype, device=z.device)
        c = torch.empty(shape, dtype=torch.float32, device=z.device)
        stored = {n: torch.empty_like(c) for n in forward_stored(programs)}
        params = self._params(variant, extra, z)
        n = c.numel()
        self.module(variant).forward[self._grid(n)](
            z, c_prev, *params, h, c, *stored.values(), n, shape[-1], BLOCK=self.BLOCK
        )
        known = {programs.inputs["c_prev"]: c_prev, programs.forward_outputs["c"]: c, **stored}
        return h, c, tuple(known[node] for node in programs.saved)

    def backward(self, variant, dh, dc, saved, extra):
        self._check("dh", dh)
        batch, hidden = dc.shape
        dh, dc = dh.contiguous(), dc.to(torch.float32).contiguous()
        saved = [s.to(torch.float32).contiguous() for s in saved]
        dz = torch.empty((batch, 4 * hidden), dtype=torch.float32, device=dc.device)
        dc_prev = torch.empty_like(dc)
        terms = {
            name: torch.empty((batch, len(rows), hidden), dtype=torch.float32, device=dc.device)
            for name, rows in variant.params.items()
        }
        params = self._params(variant, extra, dh)
        n = dc.numel()
        self.module(variant).backward[self._grid(n)](
            dh, dc, *saved, *params, dz, dc_prev, *terms.values(), n, hidden, BLOCK=self.BLOCK
        )
        return dz, dc_prev, terms
