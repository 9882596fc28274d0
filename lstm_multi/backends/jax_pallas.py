"""A JAX persistent LSTM kernel in Pallas: one direction's whole time loop in one call.

The JAX counterpart of the Triton persistent kernels run on PyTorch tensors
(``compile.emit_triton.sequence_forward_source`` / ``sequence_backward_source``,
``triton_kernels.TritonKernels.sequence_forward`` / ``sequence_backward``,
``torch_triton.PersistentEngine``), with the same contract, tape and limits.

Design. One ``pallas_call`` per direction forward and one backward. The grid has
one program per ``BLOCK_B`` = 16 rows of the batch; each program runs the whole
time loop (``lax.fori_loop`` inside the kernel) with U's four gate blocks
(``BLOCK_H`` x ``BLOCK_H`` each) loaded once and kept on chip. A step of the
forward is z_k = zx[t, rows, gate k] + r_{t-1} U_k for the four gates k = i, f,
g, o (four dots; the gate blocks are separate refs, never slices of one value,
which Triton cannot take), then the gate math, then the masking: past a
sequence's length (``valid`` False) h and c are held and y is zero
(``network.masked_step``). The backward walks the steps in reverse: the gate
backward, dz_k masked to zero past the length, dh_{t-1} = sum_k dz_k U_k^T (or,
when the recurrence reads c, dc_{t-1} += that), dh and dc passed through past
the length (``bptt.masked_step_backward``), and the variant's own parameter
gradients summed over the program's rows and the steps. dW, dU, db and dx are
then whole-sequence products of the stored dz (``bptt.direction_grads``), as in
``jax_backend._direction_backward`` and ``PersistentEngine.backward``.

Where the equations come from. Nowhere here: the gate math inside both kernels
is the variant's generated array code (``variant.array_code``, made by
``compile.emit_array`` from the traced program and its derived backward), called
on the tiles loaded from the refs with ``_TileOps`` (the JAX backend's sigmoid,
tanh and rsqrt, a ``row_mean`` over a tile's real units, and a ``sum`` over the
tile's valid rows). A user's own ``lstm_multi.Variant`` gets kernels the same way,
row reductions and split halves included.

Row reductions: the layout. A program holds whole rows: its (16, BLOCK_H) tiles
span every unit of its 16 rows (BLOCK_H >= H), so the gate math's ``mean(v)``
over a row's H units is a sum along the tile's lanes, in registers, with no pass
over memory and nothing shared between programs (the grid splits only the batch,
which a row reduction never crosses). It is the sum over the H real lanes (the
padded ones selected away with ``where``, so that whatever they hold adds
nothing) divided by H, a (16, 1) value that broadcasts against the row's
tiles. A mean over the 4H preactivations is the spec's ``0.25 * mean(v_i + v_f +
v_g + v_o)``: the four gate tiles summed lane by lane, then one lane sum. The
derived backward's means (a row mean's gradient spread over the row) are the
same lane sums. A per-row value on the tape is stored broadcast to a
(16, BLOCK_H) tile like the others (3 of the 26 stored arrays of "layernorm"),
so every load and store keeps the one tile shape.

Split halves (``variant.split``, the layer-normalised variants): the caller's zx
is x W without b (``step.input_projection``); a step hands the gate math x_t W_k
and r U_k apart, eight tiles, and b's four gate blocks as parameter rows among
the variant's own. The backward writes eight dz sequences, dzx_k then dzr_k:
dh_{t-1} = sum_k dzr_k U_k^T, dW and dx come from dzx, dU from dzr, and db is the
gate math's parameter sum, as the scan's (``step.projection_grads``).

Shapes (the caller's, never padded): zx (T, B, 4H) = x W + b (split halves:
x W); U (H, 4H) with the
unused gate blocks zeroed (``step.recurrent_weight``); h0, c0 (B, H); valid
(T, B, 1) booleans or None. Inside, B is padded to a multiple of 16 (the padded
rows are marked invalid, so they hold zeros and add nothing to the sums) and H
to ``BLOCK_H`` = max(16, next power of 2 of H) with zeros (zero rows and columns
of U, so padded units never reach real ones); results are sliced back. The
forward zeroes r's padded lanes before the products: a gate math that leaves nan
there (``c * rsqrt(s * s)`` with a parameter s, zero in the padding) would
otherwise reach every real unit through 0 * nan in r U.
The tape is the Triton kernels': hs and cs (T + 1, B, H) from h0, c0 on, and the
"stored" values of the derived backward (``emit_cuda.forward_stored``: its saved
values other than c_{t-1} and c_t, which the backward reads from cs).

Limits: H <= ``MAX_SEQUENCE_HIDDEN`` = 64 (U's four blocks on chip) and no
projection; ``PallasKernels.fits`` says when, and ``pallas_direction`` falls
back to ``jax_backend.scan_direction`` otherwise.

Precision: the math runs in float32 (``lax.Precision.HIGHEST`` dots: IEEE float32
in Triton, no TF32); inputs may be float32, float16 or bfloat16. h (hs, ys) comes
back in the input's dtype; c (cs), the stored values, dz, dh0, dc0 and the
parameter sums are float32, rounded once by ``bptt.direction_grads``. The carried
h stays float32 between steps, as in the Triton kernels. float64 is not for the
kernel (``PallasKernels.fits`` falls back to the scan), except under the
interpreter of kernels built with ``interpret_float64=True``: then the kernel's
math runs in float64, which the tests use to check its structure against the
oracle to 1e-10.

Interpreter: ``PallasKernels(interpret=True)`` runs the kernels as plain JAX
(Pallas's interpreter; the JAX cell takes such an object as ``pallas_kernels``),
the default when JAX's default backend is the CPU or, for CI,
``LSTM_MULTI_PALLAS_INTERPRET=1``; that is how the tests run without a GPU. On a
GPU Pallas lowers the kernels through Triton, asked for by name
(``pltriton.CompilerParams``: jax >= 0.10 may otherwise pick Mosaic GPU); the
block shapes are chosen for it (powers of 2, dot operands at least 16 in each
dimension, every load and store a (16, BLOCK_H) tile or a (1, BLOCK_H) row).
Checked compiled on an H100 with jax 0.11.2 and Triton 3.6 (tests/test_pallas.py's
``gpu`` test: float32 within 5e-7 of the oracle), where jax warns that Pallas's
Triton backend is deprecated in favour of Mosaic GPU. The products outside the
kernels (x W, and dW, dU, dx after the backward) follow JAX's default matmul
precision, TF32 on such a GPU unless ``jax.default_matmul_precision`` says
otherwise; the kernels' own dots are float32 always.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .. import bptt, environment, spec, validation
from ..compile.emit_cuda import forward_stored
from ..step import input_projection, recurrent_weight, step_params
from . import jax_backend

_INPUT_DTYPES = ("float32", "float16", "bfloat16")

#: rows of the batch per program
BLOCK_B = 16
#: the largest H the kernels take (U's four blocks held on chip), as the Triton kernels'
MAX_SEQUENCE_HIDDEN = 64


def default_interpret():
    """Whether the kernels run in Pallas's interpreter: on the CPU, or when asked."""
    return environment.pallas_interpret() or jax.default_backend() == "cpu"


def block_hidden(hidden):
    """BLOCK_H: H rounded up to a power of 2, at least 16 (Triton's smallest dot)."""
    return max(16, int(pl.next_power_of_2(hidden)))


def _real_units(shape, hidden):
    """(BLOCK_B, BLOCK_H) booleans: True in the first ``hidden`` lanes (the real units),
    False in the padding."""
    return jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1) < hidden


class _TileOps:
    """The ops the generated gate code calls inside a kernel, on (BLOCK_B, BLOCK_H) tiles of
    a direction with ``hidden`` = H real units: the JAX backend's sigmoid, tanh and rsqrt;
    ``row_mean``, the mean over a row's H real units, (BLOCK_B, 1), the padded lanes
    selected away (``where``: whatever they hold, nan included, adds nothing); and ``sum``
    over the rows still inside their sequence (``keep``, (BLOCK_B, 1) booleans, or None
    for all)."""

    def __init__(self, hidden, keep=None):
        self.hidden = hidden
        self.keep = keep

    sigmoid = staticmethod(jax_backend.OPS.sigmoid)
    tanh = staticmethod(jnp.tanh)
    rsqrt = staticmethod(jax.lax.rsqrt)
    zeros_like = staticmethod(jnp.zeros_like)

    def row_mean(self, x):
        if x.shape[-1] == 1:  # a per-row value (B, 1): its row's mean is itself
            return x
        if x.shape[-1] > self.hidden:
            x = jnp.where(_real_units(x.shape, self.hidden), x, jnp.zeros_like(x))
        return jnp.sum(x, axis=-1, keepdims=True) / self.hidden

    def sum(self, x, axis):
        if self.keep is not None:
            x = jnp.where(self.keep, x, jnp.zeros_like(x))
        return jnp.sum(x, axis=axis, keepdims=True)


def _dot(a, b):
    return jax.lax.dot(a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=a.dtype)


def _index32(n):
    return np.int32(n)


# the kernels --------------------------------------------------------------------------


def _forward_kernel(variant, steps, hidden, compute, has_valid, n_rows, stored_at):
    """The forward kernel's body; refs in ``PallasKernels.sequence_forward``'s order.

    A step: the four recurrent products r U_k, then the gate math on z_k = zx_k + r U_k
    (fused halves) or on (zx_k, r U_k) apart (split halves: zx_k = x_t W_k without b, which
    is among the parameter rows). Where H is padded, r's padded lanes are zeroed before
    the products: whatever the gate math leaves there (a constant, a row value, rsqrt of
    a zero) never reaches a real unit."""
    forward, _ = variant.array_code
    ops = _TileOps(hidden)
    recurrent_c = variant.recurrent_state == "c"

    def kernel(*refs):
        zx_refs, U_refs = refs[0:4], refs[4:8]
        h0_ref, c0_ref = refs[8:10]
        row_refs = refs[10 : 10 + n_rows]
        k = 10 + n_rows
        valid_ref = refs[k] if has_valid else None
        k += has_valid
        ys_ref, hs_ref, cs_ref, *stored_refs = refs[k:]
        U = [ref[...].astype(compute) for ref in U_refs]
        rows = [ref[...].astype(compute) for ref in row_refs]
        h = h0_ref[...].astype(compute)
        c = c0_ref[...].astype(compute)
        tile = h.shape
        real = _real_units(tile, hidden) if tile[1] > hidden else None
        hs_ref[0] = h.astype(hs_ref.dtype)
        cs_ref[0] = c.astype(cs_ref.dtype)

        def step(t, carry):
            h, c = carry
            r = c if recurrent_c else h
            if real is not None:
                r = jnp.where(real, r, jnp.zeros_like(r))
            zx = [zx_refs[g][t].astype(compute) for g in range(4)]
            zr = [_dot(r, U[g]) for g in range(4)]
            z = [*zx, *zr] if variant.split else [a + b for a, b in zip(zx, zr, strict=True)]
            h_new, c_new, saved = forward(ops, *z, c, *rows)
            h_new = jnp.broadcast_to(h_new, tile)
            c_new = jnp.broadcast_to(c_new, tile)
            if has_valid:
                v = valid_ref[t] != 0
                y = jnp.where(v, h_new, jnp.zeros_like(h_new))
                h = jnp.where(v, h_new, h)
                c = jnp.where(v, c_new, c)
            else:
                y = h = h_new
                c = c_new
            ys_ref[t] = y.astype(ys_ref.dtype)
            hs_ref[t + 1] = h.astype(hs_ref.dtype)
            cs_ref[t + 1] = c.astype(cs_ref.dtype)
            for ref, at in zip(stored_refs, stored_at, strict=True):
                ref[t] = jnp.broadcast_to(saved[at], tile).astype(ref.dtype)
            return h, c

        jax.lax.fori_loop(_index32(0), _index32(steps), step, (h, c))

    return kernel


def _backward_kernel(variant, steps, hidden, compute, has_valid, n_rows, saved_from):
    """The backward kernel's body; refs in ``PallasKernels.sequence_backward``'s order.

    ``saved_from[j]`` says where the backward's j-th saved value comes from: ("c", 0)
    c_{t-1} (cs[t]), ("c", 1) c_t (cs[t + 1]), ("stored", i) the i-th stored array.
    The gate backward gives the preactivations' gradients, four (fused halves: dz_k) or
    eight (split halves: dzx_k then dzr_k), each zero past the length; dr = sum_k dz_k
    U_k^T (split: dzr_k). The padded lanes need no guard here, unlike the forward's: the
    tape comes in padded with zeros (``sequence_backward``), and the derived backward's
    own operations are sums and products of it, dh, dc and the (zero-padded) parameter
    rows, finite there; the row means skip those lanes.
    """
    _, backward = variant.array_code
    n_stored = sum(kind == "stored" for kind, _ in saved_from)
    n_z = len(variant.programs.z_inputs)
    recurrent_c = variant.recurrent_state == "c"

    def kernel(*refs):
        dys_ref, dhT_ref, dcT_ref, cs_ref = refs[0:4]
        k = 4
        stored_refs = refs[k : k + n_stored]
        k += n_stored
        UT_refs = refs[k : k + 4]
        k += 4
        row_refs = refs[k : k + n_rows]
        k += n_rows
        valid_ref = refs[k] if has_valid else None
        k += has_valid
        dz_refs = refs[k : k + n_z]
        dh0_ref, dc0_ref, *sum_refs = refs[k + n_z :]
        UT = [ref[...].astype(compute) for ref in UT_refs]
        rows = [ref[...].astype(compute) for ref in row_refs]
        dh = dhT_ref[...].astype(compute)
        dc = dcT_ref[...].astype(compute)
        tile = dh.shape
        sums = tuple(jnp.zeros((1, tile[1]), compute) for _ in range(n_rows))

        def step(i, carry):
            dh, dc, sums = carry
            t = _index32(steps - 1) - i
            dy = dys_ref[t].astype(compute)
            if has_valid:
                v = valid_ref[t] != 0
                zero = jnp.zeros_like(dh)
                v_dh = jnp.where(v, dh + dy, zero)
                v_dc = jnp.where(v, dc, zero)
            else:
                v = None
                v_dh, v_dc = dh + dy, dc
            saved = []
            for kind, at in saved_from:
                ref = cs_ref if kind == "c" else stored_refs[at]
                index = t + at if kind == "c" else t
                saved.append(ref[index].astype(compute))
            out = backward(_TileOps(hidden, v), v_dh, v_dc, *rows, *saved)
            dz = []
            for g in range(n_z):
                dz_g = jnp.broadcast_to(out[g], tile)
                if has_valid:
                    dz_g = jnp.where(v, dz_g, jnp.zeros_like(dz_g))
                dz_refs[g][t] = dz_g.astype(dz_refs[g].dtype)
                dz.append(dz_g)
            dc_prev = jnp.broadcast_to(out[n_z], tile)
            dzr = dz[n_z - 4 :]
            dr = _dot(dzr[0], UT[0]) + _dot(dzr[1], UT[1]) + _dot(dzr[2], UT[2])
            dr = dr + _dot(dzr[3], UT[3])
            if recurrent_c:
                dh_new, dc_new = jnp.zeros_like(dh), dc_prev + dr
            else:
                dh_new, dc_new = dr, dc_prev
            if has_valid:
                dh = jnp.where(v, dh_new, dh)
                dc = jnp.where(v, dc_new, dc)
            else:
                dh, dc = dh_new, dc_new
            terms = zip(sums, out[n_z + 1 :], strict=True)
            sums = tuple(s + jnp.broadcast_to(term, s.shape) for s, term in terms)
            return dh, dc, sums

        dh, dc, sums = jax.lax.fori_loop(_index32(0), _index32(steps), step, (dh, dc, sums))
        dh0_ref[...] = dh.astype(dh0_ref.dtype)
        dc0_ref[...] = dc.astype(dc0_ref.dtype)
        for ref, total in zip(sum_refs, sums, strict=True):
            ref[...] = total.astype(ref.dtype)

    return kernel


# padding and the specs ------------------------------------------------------------------


def _pad_to(array, shape):
    widths = [(0, n - m) for n, m in zip(shape, array.shape, strict=True)]
    return jnp.pad(array, widths) if any(w for _, w in widths) else array


def _gate_blocks(array, hidden, shape):
    """(..., 4H) -> four (...) arrays of ``shape`` (the gate blocks, zero-padded)."""
    return [_pad_to(array[..., g * hidden : (g + 1) * hidden], shape) for g in range(4)]


def _sequence_spec(steps, block_h):
    return pl.BlockSpec((steps, BLOCK_B, block_h), lambda b: (0, b, 0))


def _tile_spec(block_h):
    return pl.BlockSpec((BLOCK_B, block_h), lambda b: (b, 0))


def _whole_spec(shape):
    return pl.BlockSpec(shape, lambda b: (0,) * len(shape))


def _triton_params():
    """Pallas's Triton lowering, asked for by name: without it jax >= 0.10 may choose
    Mosaic GPU, whose copies these (16, BLOCK_H) tiles do not suit. One stage: the loop
    over time is sequential, there is nothing to pipeline."""
    return pltriton.CompilerParams(num_warps=4, num_stages=1)


class PallasKernels:
    """The persistent kernels' launches, with ``TritonKernels``' contract.

    ``interpret``: True runs Pallas's interpreter, False compiles (on a GPU, through
    Triton); None (the default) decides at each call (``default_interpret``).
    ``interpret_float64`` (for tests; False by default): under the interpreter, take
    float64 arrays and run the kernels' math in float64, so that their indexing,
    masking and tape can be checked against a float64 oracle to 1e-10. Compiled
    kernels never take float64.
    """

    BLOCK_B = BLOCK_B
    MAX_SEQUENCE_HIDDEN = MAX_SEQUENCE_HIDDEN

    def __init__(self, interpret=None, interpret_float64=False):
        if interpret is not None and not isinstance(interpret, bool):
            raise TypeError(f"interpret: expected None, True or False, got {interpret!r}")
        self.interpret = interpret
        self.interpret_float64 = validation.check_bool("interpret_float64", interpret_float64)

    def __repr__(self):
        return (
            f"{type(self).__name__}(interpret={self.interpret!r}, "
            f"interpret_float64={self.interpret_float64!r})"
        )

    def _interpret(self):
        return default_interpret() if self.interpret is None else self.interpret

    def _takes_float64(self):
        return self.interpret_float64 and self._interpret()

    def fits(self, variant, p, xs):
        """Whether these kernels take this direction: H <= 64, no projection, and float32,
        float16 or bfloat16 throughout (float64 falls back to the scan, except under the
        interpreter with ``interpret_float64``)."""
        variant = spec.get_variant(variant)
        if spec.PROJECTION in p or p["U"].shape[-1] // 4 > MAX_SEQUENCE_HIDDEN:
            return False
        dtype = str(xs.dtype)
        allowed = dtype in _INPUT_DTYPES or (dtype == "float64" and self._takes_float64())
        return allowed and all(str(v.dtype) == dtype for v in p.values())

    def _compute_dtype(self, name, array):
        dtype = str(array.dtype)
        if dtype in _INPUT_DTYPES:
            return jnp.float32
        if dtype == "float64" and self._takes_float64():
            return jnp.float64
        raise TypeError(
            f"{name}: the Pallas persistent kernels compute in float32 and take float32, "
            f"float16 or bfloat16 arrays, got {dtype}"
        )

    @staticmethod
    def _rows(variant, extra, compute, block_h):
        """The parameter rows, (1, BLOCK_H) each, in ``variant.param_rows`` order."""
        return [
            _pad_to(row.astype(compute)[None, :], (1, block_h))
            for row in variant.param_rows(extra)
        ]  # fmt: skip

    @staticmethod
    def _valid(valid, steps, batch, padded):
        """(T, B, 1) booleans -> (T, B_pad, 1) int32 (padded rows invalid), or None when
        every row is valid at every step."""
        if valid is None and padded == batch:
            return None
        if valid is None:
            valid = jnp.ones((steps, batch, 1), jnp.int32)
        return _pad_to(valid.reshape(steps, batch, 1).astype(jnp.int32), (steps, padded, 1))

    def sequence_forward(self, variant, zx, U, h0, c0, extra, valid):
        """One direction forward: zx (T, B, 4H) = x W + b (split halves: x W), U (H, 4H)
        (unused gate blocks zeroed), h0, c0 (B, H), extra the gate math's parameters (the
        variant's own; split halves: b too), valid (T, B, 1) booleans or None.

        Returns (ys (T, B, H) in zx's dtype, hs (T + 1, B, H) in zx's dtype and cs
        (T + 1, B, H) float32 from h0, c0 on, the stored values (T, B, H) each,
        float32, as ``forward_stored`` lists them).
        """
        compute = self._compute_dtype("zx", zx)
        programs = variant.programs
        steps, batch, gates = zx.shape
        hidden = gates // 4
        block_h = block_hidden(hidden)
        padded = pl.cdiv(batch, BLOCK_B) * BLOCK_B
        tile = (padded, block_h)
        sequence = (steps, padded, block_h)
        stored_nodes = forward_stored(programs)
        stored_at = tuple(programs.saved.index(n) for n in stored_nodes)
        rows = self._rows(variant, extra, compute, block_h)
        valid_in = self._valid(valid, steps, batch, padded)
        inputs = [
            *_gate_blocks(zx, hidden, sequence),
            *_gate_blocks(U.astype(compute), hidden, (block_h, block_h)),
            _pad_to(h0.astype(zx.dtype), tile),
            _pad_to(c0.astype(compute), tile),
            *rows,
            *([] if valid_in is None else [valid_in]),
        ]
        in_specs = [_sequence_spec(steps, block_h)] * 4
        in_specs += [_whole_spec((block_h, block_h))] * 4 + [_tile_spec(block_h)] * 2
        in_specs += [_whole_spec((1, block_h))] * len(rows)
        if valid_in is not None:
            in_specs.append(pl.BlockSpec((steps, BLOCK_B, 1), lambda b: (0, b, 0)))
        tape = (steps + 1, padded, block_h)
        out_shape = [
            jax.ShapeDtypeStruct(sequence, zx.dtype),
            jax.ShapeDtypeStruct(tape, zx.dtype),
            jax.ShapeDtypeStruct(tape, compute),
            *(jax.ShapeDtypeStruct(sequence, compute) for _ in stored_nodes),
        ]
        out_specs = [_sequence_spec(steps, block_h)] + [_sequence_spec(steps + 1, block_h)] * 2
        out_specs += [_sequence_spec(steps, block_h)] * len(stored_nodes)
        kernel = _forward_kernel(
            variant, steps, hidden, compute, valid_in is not None, len(rows), stored_at
        )
        ys, hs, cs, *stored = pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=(padded // BLOCK_B,),
            in_specs=in_specs,
            out_specs=out_specs,
            interpret=self._interpret(),
            compiler_params=_triton_params(),
            name=f"lstm_multi_{variant.name}_sequence_forward",
        )(*inputs)
        cut = (slice(None), slice(0, batch), slice(0, hidden))
        return ys[cut], hs[cut], cs[cut], tuple(s[cut] for s in stored)

    def sequence_backward(self, variant, dys, dh, dc, cs, stored, U, extra, valid):
        """One direction backward from ``sequence_forward``'s cs and stored values; dys
        (T, B, H), dh, dc (B, H) the gradients of the outputs and of h_T, c_T.

        Returns (dzs (T, B, 4H), dh0, dc0 (B, H), the parameter gradients {name: (rows,
        H)}), float32; dW, dU, db and dx follow from dzs (``bptt.direction_grads``). Split
        halves: dzs (T, B, 8H) [dzx, dzr], and the gradients hold b's (4H,).
        """
        compute = self._compute_dtype("dys", dys)
        programs = variant.programs
        steps, batch, hidden = dys.shape
        block_h = block_hidden(hidden)
        padded = pl.cdiv(batch, BLOCK_B) * BLOCK_B
        programs_n = padded // BLOCK_B
        tile = (padded, block_h)
        sequence = (steps, padded, block_h)
        stored_nodes = forward_stored(programs)
        c_prev, c_new = programs.inputs["c_prev"], programs.forward_outputs["c"]
        saved_from = tuple(
            ("c", 0) if n == c_prev else ("c", 1) if n == c_new
            else ("stored", stored_nodes.index(n))
            for n in programs.saved
        )  # fmt: skip
        rows = self._rows(variant, extra, compute, block_h)
        valid_in = self._valid(valid, steps, batch, padded)
        UT = [block.T for block in _gate_blocks(U.astype(compute), hidden, (hidden, hidden))]
        inputs = [
            _pad_to(dys, sequence),
            _pad_to(dh.astype(compute), tile),
            _pad_to(dc.astype(compute), tile),
            _pad_to(cs.astype(compute), (steps + 1, padded, block_h)),
            *(_pad_to(s.astype(compute), sequence) for s in stored),
            *(_pad_to(block, (block_h, block_h)) for block in UT),
            *rows,
            *([] if valid_in is None else [valid_in]),
        ]
        in_specs = [_sequence_spec(steps, block_h), _tile_spec(block_h), _tile_spec(block_h)]
        in_specs += [_sequence_spec(steps + 1, block_h)]
        in_specs += [_sequence_spec(steps, block_h)] * len(stored)
        in_specs += [_whole_spec((block_h, block_h))] * 4
        in_specs += [_whole_spec((1, block_h))] * len(rows)
        if valid_in is not None:
            in_specs.append(pl.BlockSpec((steps, BLOCK_B, 1), lambda b: (0, b, 0)))
        n_z = len(programs.z_inputs)
        out_shape = [jax.ShapeDtypeStruct(sequence, compute)] * n_z
        out_shape += [jax.ShapeDtypeStruct(tile, compute)] * 2
        out_shape += [jax.ShapeDtypeStruct((programs_n, block_h), compute)] * len(rows)
        out_specs = [_sequence_spec(steps, block_h)] * n_z + [_tile_spec(block_h)] * 2
        out_specs += [pl.BlockSpec((1, block_h), lambda b: (b, 0))] * len(rows)
        kernel = _backward_kernel(
            variant, steps, hidden, compute, valid_in is not None, len(rows), saved_from
        )
        out = pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=(programs_n,),
            in_specs=in_specs,
            out_specs=out_specs,
            interpret=self._interpret(),
            compiler_params=_triton_params(),
            name=f"lstm_multi_{variant.name}_sequence_backward",
        )(*inputs)
        dzs = jnp.concatenate([d[:, :batch, :hidden] for d in out[:n_z]], axis=-1)
        dh0, dc0 = out[n_z][:batch, :hidden], out[n_z + 1][:batch, :hidden]
        sums = [total.sum(0)[:hidden] for total in out[n_z + 2 :]]
        grads, k = {}, 0
        for name, names in variant.gate_params.items():  # split halves: the bias b first
            join = jnp.concatenate if name == "b" and variant.split else jnp.stack
            grads[name] = join(sums[k : k + len(names)], 0)
            k += len(names)
        return dzs, dh0, dc0, grads


#: the kernels a cell launches unless given its own (``pallas_kernels``)
KERNELS = PallasKernels()


# one direction, differentiable ------------------------------------------------------------


def _weights(variant, p):
    """U with the unused gate blocks zeroed, and the gate math's parameters (the variant's
    own; for split halves b too)."""
    return recurrent_weight(jax_backend.OPS, variant, p["U"]), step_params(variant, p)


def _forward(variant, kernels, p, xs, h0, c0, valid):
    U, extra = _weights(variant, p)
    zx = input_projection(jax_backend.OPS, variant, xs, p)  # split halves: x W alone
    return kernels.sequence_forward(variant, zx, U, h0, c0, extra, valid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _direction(variant, kernels, p, xs, h0, c0, valid):
    ys, hs, cs, _ = _forward(variant, kernels, p, xs, h0, c0, valid)
    return ys, hs[-1].astype(h0.dtype), cs[-1].astype(c0.dtype)


def _direction_forward(variant, kernels, p, xs, h0, c0, valid):
    ys, hs, cs, stored = _forward(variant, kernels, p, xs, h0, c0, valid)
    out = ys, hs[-1].astype(h0.dtype), cs[-1].astype(c0.dtype)
    return out, (p, xs, h0, c0, valid, hs, cs, stored)


def _direction_backward(variant, kernels, saved, cotangents):
    """The persistent backward, then one product each for dW, dU, db and dx over the
    whole sequence (``bptt.direction_grads``, which gives each its primal's dtype)."""
    p, xs, h0, c0, valid, hs, cs, stored = saved
    dys, dh, dc = cotangents
    U, extra = _weights(variant, p)
    dzs, dh0, dc0, dextra = kernels.sequence_backward(
        variant, dys, dh, dc, cs, stored, U, extra, valid
    )
    rs = (hs if variant.recurrent_state == "h" else cs)[: xs.shape[0]]
    grads, dxs, dh0, dc0 = bptt.direction_grads(
        jax_backend.OPS, variant, p, xs, rs, dzs, dextra, dh0, dc0, h0, c0
    )
    grads, dxs, dh0, dc0 = jax_backend.summed_like((grads, dxs, dh0, dc0), (p, xs, h0, c0))
    return grads, dxs, dh0, dc0, None


_direction.defvjp(_direction_forward, _direction_backward)


def pallas_direction(ops, variant, p, xs, h0, c0, valid, plan, kernels=KERNELS):
    """One direction over time in the persistent ``kernels`` (a ``PallasKernels``);
    ``network.loop_direction``'s contract (returns ys, h_T, c_T, None). Differentiable
    (reverse mode) through a custom VJP that runs the persistent backward. Where the
    kernels do not fit (``kernels.fits``), ``jax_backend.scan_direction`` runs the
    direction, compiled as ``plan`` (a ``jax_backend.ScanPlan``) says."""
    if not kernels.fits(variant, p, xs) or str(h0.dtype) != str(xs.dtype):
        return jax_backend.scan_direction(ops, variant, p, xs, h0, c0, valid, plan)
    ys, h, c = _direction(variant, kernels, p, xs, h0, c0, valid)
    return ys, h, c, None
