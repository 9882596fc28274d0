"""The generated Triton gate kernels run on PyTorch tensors.

``TritonKernels`` has the interface of the CuPy backend's kernels
(``cupy_kernels``): ``forward(variant, z, c_prev, extra) -> (h, c, saved)`` and
``backward(variant, dh, dc, saved, extra) -> (dz, dc_prev, terms)``, with
``terms`` each parameter's per-element gradient terms (B, rows, H). The kernels
(``lstm_multi.compile.emit_triton``) are generated per variant, a user's own
included, on first use. A variant with split halves (``"layernorm"``) takes z
(B, 8H) = [x_t W, r U] and gives dz (B, 8H) = [dzx, dzr], its bias b among the
parameters (terms (B, 4, H)); one with row reductions runs whole rows a program
(``emit_triton.row_layout``). They run on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1`` (set before first use), which is how CI tests them.

The math is float32: inputs may be float32, float16 or bfloat16 (h comes back
in the input's dtype, everything else in float32); float64 is refused.

``sequence_forward`` / ``sequence_backward`` run a direction's whole time loop in
one launch (the generated persistent kernels: one program per 16 rows of the
batch, U's gate blocks held on chip for the whole sequence, ``tl.dot`` per step).
"""

from __future__ import annotations

import weakref

import torch
import triton

from .. import environment
from ..compile.emit_cuda import forward_stored
from ..compile.emit_triton import row_layout
from ..kernels import triton_modules
from ..kernels.build import cache_dir

_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TritonKernels:
    BLOCK = 256

    def __init__(self, directory=None):
        self.directory = directory or cache_dir().parent / "triton"
        # variant -> {interpreted: module}; weak, so that a variant dropped by its user is
        # freed (its module stays in sys.modules, shared by every variant of equal text)
        self._modules = weakref.WeakKeyDictionary()

    def module(self, variant):
        """The variant's generated module, generated and imported once per variant and
        interpreter mode (Triton reads TRITON_INTERPRET when the module is imported)."""
        interpret = environment.triton_interpret()
        modes = self._modules.setdefault(variant, {})
        if interpret not in modes:
            modes[interpret] = triton_modules.load(variant.programs, self.directory, interpret)
        return modes[interpret]

    def _check(self, name, tensor):
        if tensor.dtype not in _INPUT_DTYPES:
            raise TypeError(
                f"{name}: the Triton gate kernels compute in float32 and take float32, "
                f"float16 or bfloat16 tensors, got {tensor.dtype}"
            )

    def _launch(self, kernel, programs, shape, *args):
        """``kernel`` over a (B, H) state in the programs' layout (``emit_triton.row_layout``):
        BLOCK flat elements a program, or, where the gate math reduces over a row, whole
        rows: BLOCK_B = BLOCK // BLOCK_H rows (at least one) of BLOCK_H = H rounded up to a
        power of two, a tile of BLOCK elements while H <= BLOCK."""
        batch, hidden = shape
        if not row_layout(programs):
            n = batch * hidden
            return kernel[(triton.cdiv(n, self.BLOCK),)](*args, n, hidden, BLOCK=self.BLOCK)
        block_h = triton.next_power_of_2(hidden)
        block_b = max(1, self.BLOCK // block_h)
        grid = (triton.cdiv(batch, block_b),)
        return kernel[grid](*args, batch, hidden, BLOCK_B=block_b, BLOCK_H=block_h)

    def _params(self, variant, extra, like):
        """The gate math's parameters (``Variant.gate_params``: for split halves the bias b
        (4H,) first, its rows i, f, g, o at b + r H), contiguous in ``like``'s dtype."""
        return [extra[name].to(like.dtype).contiguous() for name in variant.gate_params]

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
        self._launch(
            self.module(variant).forward, programs, shape, z, c_prev, *params, h, c,
            *stored.values(),
        )  # fmt: skip
        known = {programs.inputs["c_prev"]: c_prev, programs.forward_outputs["c"]: c, **stored}
        return h, c, tuple(known[node] for node in programs.saved)

    def backward(self, variant, dh, dc, saved, extra):
        self._check("dh", dh)
        batch, hidden = dc.shape
        dh, dc = dh.contiguous(), dc.to(torch.float32).contiguous()
        saved = [s.to(torch.float32).contiguous() for s in saved]
        width = len(variant.programs.z_inputs) * hidden  # 4H, or 8H for split halves
        dz = torch.empty((batch, width), dtype=torch.float32, device=dc.device)
        dc_prev = torch.empty_like(dc)
        terms = {
            name: torch.empty((batch, len(rows), hidden), dtype=torch.float32, device=dc.device)
            for name, rows in variant.gate_params.items()
        }
        params = self._params(variant, extra, dh)
        self._launch(
            self.module(variant).backward, variant.programs, (batch, hidden), dh, dc, *saved,
            *params, dz, dc_prev, *terms.values(),
        )  # fmt: skip
        return dz, dc_prev, terms

    # the whole time loop in one launch ----------------------------------------------

    BLOCK_B = 16
    #: the largest H the persistent kernels take: U's four (H, H) blocks stay in registers
    #: (64 KiB in float32 at H = 64, FlashRNN's limit for its Triton kernel too)
    MAX_SEQUENCE_HIDDEN = 64

    def _sequence_meta(self, variant, batch, hidden, valid):
        return dict(
            RECURRENT_C=variant.recurrent_state == "c",
            HAS_VALID=valid is not None,
            BLOCK_B=self.BLOCK_B,
            BLOCK_H=max(16, triton.next_power_of_2(hidden)),
        )

    def _valid_bytes(self, valid, like):
        """(T, B, 1) booleans -> (T, B) bytes, or a placeholder pointer when there are none."""
        if valid is None:
            return like
        return valid.reshape(valid.shape[0], valid.shape[1]).to(torch.uint8).contiguous()

    def sequence_forward(self, variant, zx, U, h0, c0, extra, valid):
        """One direction forward: zx (T, B, 4H) = x W + b (split halves: x W, the bias is
        among ``extra``), U (H, 4H) (unused gate blocks zeroed), h0, c0 (B, H), valid (T,
        B, 1) booleans or None.

        Returns (ys (T, B, H) in zx's dtype, hs and cs (T + 1, B, H) from h0, c0 on,
        the stored values (T, B, H) each, float32, as ``forward_stored`` lists them).
        """
        self._check("zx", zx)
        programs = variant.programs
        steps, batch, gates = zx.shape
        hidden = gates // 4
        device, f32 = zx.device, torch.float32
        zx, U = zx.contiguous(), U.to(f32).contiguous()
        hs = torch.empty((steps + 1, batch, hidden), dtype=zx.dtype, device=device)
        cs = torch.empty((steps + 1, batch, hidden), dtype=f32, device=device)
        hs[0], cs[0] = h0, c0
        ys = torch.empty((steps, batch, hidden), dtype=zx.dtype, device=device)
        stored = [torch.empty((steps, batch, hidden), dtype=f32, device=device)
                  for _ in forward_stored(programs)]  # fmt: skip
        self.module(variant).sequence_forward[(triton.cdiv(batch, self.BLOCK_B),)](
            zx, U, hs[0], cs[0], *self._params(variant, extra, cs), self._valid_bytes(valid, zx),
            hs, cs, ys, *stored, steps, batch, hidden,
            **self._sequence_meta(variant, batch, hidden, valid),
        )  # fmt: skip
        return ys, hs, cs, tuple(stored)

    def sequence_backward(self, variant, dys, dh, dc, cs, stored, U, extra, valid):
        """One direction backward from ``sequence_forward``'s cs and stored values.

        Returns (dzs (T, B, 4H), or (T, B, 8H) [dzx, dzr] for split halves, dh0, dc0 (B,
        H), the parameter gradients in ``extra``'s shapes: (rows, H), b (4H,)), float32;
        dW, dU, db and dx follow from dzs (``bptt.direction_grads``).
        """
        self._check("dys", dys)
        steps, batch, hidden = dys.shape
        device, f32 = dys.device, torch.float32
        programs_n = triton.cdiv(batch, self.BLOCK_B)
        width = len(variant.programs.z_inputs) * hidden  # 4H, or 8H [dzx, dzr] (split)
        dzs = torch.empty((steps, batch, width), dtype=f32, device=device)
        dh0 = torch.empty((batch, hidden), dtype=f32, device=device)
        dc0 = torch.empty_like(dh0)
        sums = {
            name: torch.zeros((programs_n, len(rows), hidden), dtype=f32, device=device)
            for name, rows in variant.gate_params.items()
        }
        self.module(variant).sequence_backward[(programs_n,)](
            dys.contiguous(), dh.to(f32).contiguous(), dc.to(f32).contiguous(), cs, *stored,
            U.to(f32).contiguous(), *self._params(variant, extra, cs),
            self._valid_bytes(valid, dys), dzs, dh0, dc0, *sums.values(), steps, batch, hidden,
            **self._sequence_meta(variant, batch, hidden, valid),
        )  # fmt: skip
        return dzs, dh0, dc0, {name: total.sum(0).reshape(extra[name].shape)
                               for name, total in sums.items()}  # fmt: skip
