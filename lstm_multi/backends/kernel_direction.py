"""One direction of one layer on the compiled CPU kernels (``compile/emit_cpu``), against ``ops``.

The same contract as ``network.loop_direction`` (forward) and
``bptt.backward_direction`` (backward), for host arrays of float32 or float64
of any framework whose ``ops`` give raw memory (``cpu_scalar``, ``empty``,
``contiguous``, ``address``): NumPy and torch.

Forward: the input projection x W + b for the whole sequence (the
framework's GEMM), then per step z_t += r_{t-1} U and the fused gate kernel.
Where a step's product is small (``SEQUENCE_LOOP_MAX_MACS``) the whole time
loop runs in C, products included: a framework's per-call overhead (several
microseconds) would dominate there. Above it, where the framework offers its
BLAS (``ops.host_blas()``: torch's MKL) the batch-split loops run the whole
sequence in C, each thread its own rows, its products on that BLAS
(``_split_plan``); elsewhere each step is one framework GEMM plus one call of
the fused gate kernel.

Backward: per step (in reverse) the fused gate backward, then dr = dz U^T;
afterwards dW, dU, dx as whole-sequence products and db as a sum
(``bptt.direction_grads``), the peephole-style parameter gradients summed
inside the kernel.

The tape is a ``KernelTape``: hs, cs (T + 1, B, H) every carried state from
h_0, c_0 on; saved (T, NS, B, H) the values the derived backward reads besides
c_{t-1} and c_t, which it reads from cs.
With a projection (``W_hr``) the per-step loop always runs, the projection's
products in the framework around the same gate kernel (see ``_forward_projected``).
``run_direction`` and ``backward_any`` choose between these kernels and the
array code per call, so a backend passes them where it passed
``network.loop_direction`` and ``bptt.backward_direction``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import bptt, network, spec
from ..kernels.cpu_kernels import cpu_kernels
from ..network import extra_params
from ..step import recurrent_weight

#: up to this many multiply-adds per step (B * H * 4H) the whole loop runs in C
#: (measured: benchmarks/NOTES.md section 9)
SEQUENCE_LOOP_MAX_MACS = 1 << 17

#: the batch-split loops give each thread at least this many rows (see ``_split_plan``)
SPLIT_MIN_ROWS = 8
#: nor where U (H, 4H) is larger than this (H <= 1024 in float32)
SPLIT_MAX_WEIGHT_BYTES = 16 << 20


class KernelTape(NamedTuple):
    """What ``forward_direction`` keeps for ``backward_direction``."""

    xs: Any
    hs: Any
    cs: Any
    saved: Any
    kernels: Any
    ms: Any = None  # with a projection: (T, B, H) each step's m_t, zero past the length


def run_direction(ops, variant, p, xs, h0, c0, valid, record=False):
    """``network.loop_direction``'s contract, on the CPU kernels wherever they apply."""
    kernels = direction_kernels(ops, variant, p, xs, h0, c0)
    if kernels is None:
        return network.loop_direction(ops, variant, p, xs, h0, c0, valid, record)
    return forward_direction(ops, kernels, variant, p, xs, h0, c0, valid, record)


def backward_any(ops, variant, p, tape, dys, dh, dc, valid):
    """``bptt.backward_direction``'s contract for a tape from ``run_direction``."""
    if isinstance(tape, KernelTape):
        return backward_direction(ops, tape.kernels, variant, p, tape, dys, dh, dc, valid)
    return bptt.backward_direction(ops, variant, p, tape, dys, dh, dc, valid)


def kernels_for(ops, variant, *arrays):
    """The variant's CPU kernels for these arrays, or None (not host float32/64, none here, or
    a variant the C++ emitter does not write yet: ``GatePrograms.kernel_refusal``)."""
    if spec.get_variant(variant).programs.kernel_refusal(reductions=True, split=True):
        return None
    scalar = ops.cpu_scalar(arrays[0])
    if scalar is None or any(ops.cpu_scalar(a) != scalar for a in arrays[1:]):
        return None
    return cpu_kernels(spec.get_variant(variant), scalar)


def direction_kernels(ops, variant, p, xs, h0, c0):
    """The kernels for one direction's arrays, or None (see ``kernels_for``)."""
    return kernels_for(ops, variant, xs, h0, c0, *p.values())


def packed_params(ops, variant, p, like):
    """The gate math's parameters as one (R, H) array, rows in ``programs.param_rows`` order:
    for split halves the bias b's four blocks first, then the variant's own (a (1, H) zero
    array when there are none: the kernels never read it then)."""
    extra = extra_params(p)
    rows = [extra[name] for name in variant.params]
    if variant.split:
        rows.insert(0, ops.reshape(p["b"], (4, like.shape[-1])))
    if not rows:
        return ops.zeros((1, like.shape[-1]), like)
    return ops.contiguous(ops.concat(rows, 0))


def _unpacked_grads(ops, variant, dP):
    """dP (R, H), the parameter rows' gradients, -> the gradients by name (b's as (4H,) for
    split halves: the gate math's own, ``bptt.direction_grads`` takes it over db)."""
    dextra, row = {}, 0
    if variant.split:
        dextra["b"] = ops.reshape(dP[0:4], (4 * dP.shape[-1],))
        row = 4
    for name, rows in variant.params.items():
        dextra[name] = dP[row : row + len(rows)]
        row += len(rows)
    return dextra


def _input_projection(ops, kernels, variant, p, xs, like):
    """x W + b (x W alone for split halves: b is the gate math's) of the whole sequence,
    (T, B, 4H), one product into a fresh buffer the loops may add r U into."""
    steps, batch, hidden = xs.shape[0], like.shape[0], like.shape[-1]
    b = ops.zeros_like(p["b"]) if variant.split else p["b"]
    out = _fresh(ops, kernels, (steps, batch, 4 * hidden), like)
    return ops.contiguous(ops.project_into(xs, p["W"], b, out))


def _valid_bytes(ops, valid):
    """(T, B, 1) booleans -> C-contiguous (T, B) bytes (a bool is one byte, 0 or 1), or None."""
    if valid is None:
        return None
    return ops.contiguous(ops.reshape(valid, valid.shape[:2]))


def _offsets(base, count, step):
    return [None if base is None else base + t * step for t in range(count)]


def sequence_loop_in_c(batch, hidden):
    return batch * hidden * 4 * hidden <= SEQUENCE_LOOP_MAX_MACS


def _split_plan(ops, kernels, batch, hidden):
    """(loops, threads) for the batch-split loops, or None for the per-step loop.

    Only where the framework's BLAS can be called from the kernels and each of the
    framework's threads gets at least ``SPLIT_MIN_ROWS`` rows. With fewer, every
    thread streams all of U for little work, and a thread left out idles while
    the BLAS runs single-threaded inside the region: on 2 cores, B8 H512 took
    34 ms split over one thread against 16 ms per step (with torch itself on one
    thread, the split loop won: 24 against 32 ms).

    Nor where U is larger than ``SPLIT_MAX_WEIGHT_BYTES``: every thread reads all of U
    each step, twice the traffic of one product split by columns, which loses once
    U no longer stays in the caches (H2048, 64 MiB: B16 108 against 87 ms per
    step, B64 250 against 220; H1024, 16 MiB: B16 55 against 62, B32 51 against 52).
    benchmarks/NOTES.md section 12.
    """
    host = ops.host_blas()
    loops = kernels.split_loops(host)
    if loops is None or batch < SPLIT_MIN_ROWS * host.threads:
        return None
    if hidden * 4 * hidden * _itemsize(kernels) > SPLIT_MAX_WEIGHT_BYTES:
        return None
    return loops, host.threads


def _packed(ops, loops, U, batch, threads, hidden, transposed):
    """U packed for the BLAS's packed GEMM (float32 with MKL), or None."""
    rows = -(-batch // threads)
    nbytes = loops.packed_bytes(rows, hidden, int(transposed))
    if not nbytes:
        return None
    packed = ops.empty((nbytes // 4 + 1,), U)
    loops.pack(rows, hidden, ops.address(U), int(transposed), ops.address(packed))
    return packed


def forward_direction(ops, kernels, variant, p, xs, h0, c0, valid, record=False):
    """``network.loop_direction`` on the kernels: -> (ys, h_T, c_T, tape or None)."""
    _require(kernels)
    variant = spec.get_variant(variant)
    if spec.PROJECTION in p:
        return _forward_projected(ops, kernels, variant, p, xs, h0, c0, valid, record)
    steps, batch, hidden = xs.shape[0], h0.shape[0], h0.shape[-1]
    # (T, B, G), on huge pages where large; the loops add r U into it
    zx = _input_projection(ops, kernels, variant, p, xs, h0)
    U = ops.contiguous(recurrent_weight(ops, variant, p["U"]))
    P = packed_params(ops, variant, p, h0)
    hs = _fresh(ops, kernels, (steps + 1, batch, hidden), h0)
    cs = _fresh(ops, kernels, (steps + 1, batch, hidden), h0)
    hs[0], cs[0] = h0, c0
    ys = _fresh(ops, kernels, (steps, batch, hidden), h0)
    saved = (
        _fresh(ops, kernels, (steps, kernels.saved_count, batch, hidden), h0) if record else None
    )
    valid_bytes = _valid_bytes(ops, valid)
    address = ops.address
    v = None if valid_bytes is None else address(valid_bytes)
    s = None if saved is None else address(saved)
    if sequence_loop_in_c(batch, hidden):
        kernels.sequence_forward(
            steps, batch, hidden, address(zx), address(U), address(hs), address(cs),
            address(P), v, address(ys), s,
        )  # fmt: skip
    elif (split := _split_plan(ops, kernels, batch, hidden)) is not None:
        loops, threads = split
        packed = _packed(ops, loops, U, batch, threads, hidden, transposed=False)
        loops.forward(
            steps, batch, hidden, address(zx), address(U), None if packed is None else address(packed),
            address(hs), address(cs), address(P), v, address(ys), s, threads,
        )  # fmt: skip
    else:
        rs = ops.unstack_time(hs if variant.recurrent_state == "h" else cs)
        product = ops.empty((batch, 4 * hidden), h0)  # r_{t-1} U, read by the gate kernel
        state, item = batch * hidden, _itemsize(kernels)
        z_at = _offsets(address(zx), steps, 4 * state * item)
        h_at = _offsets(address(hs), steps + 1, state * item)
        c_at = _offsets(address(cs), steps + 1, state * item)
        y_at = _offsets(address(ys), steps, state * item)
        v_at = _offsets(v, steps, batch)
        s_at = _offsets(s, steps, kernels.saved_count * state * item)
        product_at, p_at = address(product), address(P)
        for t in range(steps):
            ops.matmul_into(rs[t], U, product)
            kernels.step_forward(
                batch, hidden, z_at[t], product_at, h_at[t], c_at[t], p_at,
                v_at[t], h_at[t + 1], c_at[t + 1], y_at[t], s_at[t],
            )  # fmt: skip
    tape = KernelTape(xs, hs, cs, saved, kernels) if record else None
    return ys, hs[steps], cs[steps], tape


def _recurrent_half(variant, dz):
    """The part of a step's dz (B, 4H or 8H) that r U received: all of it, or dzr."""
    return dz[:, dz.shape[-1] // 2 :] if variant.split else dz


def _require(kernels):
    """``kernels_for`` gives None where the kernels are off or cannot be built here; the
    callers then run the array code (``run_direction``), never these functions."""
    if kernels is None:
        raise ValueError(
            "kernels: expected the variant's CpuKernels, got None (kernels_for gives None "
            "where they are turned off or cannot be built here: run network.loop_direction "
            "then, as run_direction does)"
        )


def _fresh(ops, kernels, shape, like):
    """An uninitialised array for the kernels to fill, on huge pages where it is large."""
    array = ops.empty(shape, like)
    count = 1
    for n in shape:
        count *= n
    kernels.advise_huge_pages(ops.address(array), count * _itemsize(kernels))
    return array


def _itemsize(kernels):
    return 4 if kernels.scalar == "float" else 8


def backward_direction(ops, kernels, variant, p, tape, dys, dh, dc, valid):
    """``bptt.backward_direction`` on the kernels: -> (grads like p, dxs, dh0, dc0)."""
    _require(kernels)
    variant = spec.get_variant(variant)
    if spec.PROJECTION in p:
        return _backward_projected(ops, kernels, variant, p, tape, dys, dh, dc, valid)
    xs, hs, cs, saved, _, _ = tape
    steps, batch, hidden = dys.shape
    h0_like, c0_like = dh, dc
    U = ops.contiguous(recurrent_weight(ops, variant, p["U"]))
    P = packed_params(ops, variant, p, hs)
    dys = ops.contiguous(ops.cast(dys, ops.dtype_name(hs)))
    dh = ops.contiguous(ops.cast(dh, ops.dtype_name(hs))) + 0  # fresh: updated in place
    dc = ops.contiguous(ops.cast(dc, ops.dtype_name(hs))) + 0
    width = kernels.z_blocks * hidden  # 4H, or 8H for split halves: [dzx, dzr]
    dzs = _fresh(ops, kernels, (steps, batch, width), hs)
    dP = ops.zeros(P.shape, P)
    valid_bytes = _valid_bytes(ops, valid)
    address = ops.address
    v = None if valid_bytes is None else address(valid_bytes)
    if sequence_loop_in_c(batch, hidden):
        U_t = ops.contiguous(ops.transpose(U))
        kernels.sequence_backward(
            steps, batch, hidden, address(dys), address(dh), address(dc), address(cs),
            address(saved),
            address(P), v, address(U_t), address(dzs), address(dP),
        )  # fmt: skip
    elif (split := _split_plan(ops, kernels, batch, hidden)) is not None:
        loops, threads = split
        packed = _packed(ops, loops, U, batch, threads, hidden, transposed=True)
        loops.backward(
            steps, batch, hidden, address(dys), address(dh), address(dc), address(cs),
            address(saved), address(P), v, address(U), None if packed is None else address(packed),
            address(dzs), address(dP), threads,
        )  # fmt: skip
    else:
        U_t = ops.transpose(U)
        dr = ops.empty((batch, hidden), hs)  # dz_{t+1} U^T, added by the next gate backward
        state, item = batch * hidden, _itemsize(kernels)
        dy_at = _offsets(address(dys), steps, state * item)
        s_at = _offsets(address(saved), steps, kernels.saved_count * state * item)
        dz_at = _offsets(address(dzs), steps, kernels.z_blocks * state * item)
        c_at = _offsets(address(cs), steps + 1, state * item)
        v_at = _offsets(v, steps, batch)
        dzs_t = [_recurrent_half(variant, dz) for dz in ops.unstack_time(dzs)]
        dr_at, dh_at, dc_at = address(dr), address(dh), address(dc)
        p_at, dp_at = address(P), address(dP)
        for t in range(steps - 1, -1, -1):
            kernels.step_backward(
                batch, hidden, dy_at[t], None if t == steps - 1 else dr_at, dh_at, dc_at,
                c_at[t], c_at[t + 1], s_at[t], p_at, v_at[t], dz_at[t], dp_at,
            )  # fmt: skip
            ops.matmul_into(dzs_t[t], U_t, dr)
        if variant.recurrent_state == "h":
            dh += dr
        else:
            dc += dr
    dextra = _unpacked_grads(ops, variant, dP)
    rs = (hs if variant.recurrent_state == "h" else cs)[:steps]
    return bptt.direction_grads(ops, variant, p, xs, rs, dzs, dextra, dh, dc, h0_like, c0_like)


# with a projection (proj_size): h_t = m_t W_hr ----------------------------------------
#
# Always the per-step loop. The gate kernel writes m_t masked (zero past the length) as
# its output y, and its own h (held m) into scratch nobody reads; the framework then
# forms y_t = m_t W_hr (zero past the length, as m_t is) and h_t = y_t, or h_{t-1}
# past the length. Backward: dm_t = (dy_t + dh_t) W_hr^T enters the gate kernel as its
# output gradient (masked there), dh_{t-1} = dz_t U^T inside the length (the carried
# gradient past it), and dW_hr = sum_t m_t^T (dy_t + dh_t) is one product at the end,
# over rows of dy_t + dh_t set to zero past the length (whatever dy holds there).


def _forward_projected(ops, kernels, variant, p, xs, h0, c0, valid, record):
    steps, batch, hidden = xs.shape[0], c0.shape[0], c0.shape[-1]
    W_hr = p[spec.PROJECTION]
    zx = _input_projection(ops, kernels, variant, p, xs, c0)
    U = ops.contiguous(recurrent_weight(ops, variant, p["U"]))
    P = packed_params(ops, variant, p, c0)
    hs = ops.empty((steps + 1, batch, W_hr.shape[1]), h0)
    cs = _fresh(ops, kernels, (steps + 1, batch, hidden), c0)
    ms = _fresh(ops, kernels, (steps, batch, hidden), c0)
    hs[0], cs[0] = h0, c0
    saved = (
        _fresh(ops, kernels, (steps, kernels.saved_count, batch, hidden), c0) if record else None
    )
    valid_bytes = _valid_bytes(ops, valid)
    address = ops.address
    product = ops.empty((batch, 4 * hidden), c0)
    # the kernel's own h (m held past the length): read from zeros, written to scratch
    no_h, held = ops.zeros((batch, hidden), c0), ops.empty((batch, hidden), c0)
    state, item = batch * hidden, _itemsize(kernels)
    z_at = _offsets(address(zx), steps, 4 * state * item)
    c_at = _offsets(address(cs), steps + 1, state * item)
    m_at = _offsets(address(ms), steps, state * item)
    v_at = _offsets(None if valid_bytes is None else address(valid_bytes), steps, batch)
    s_at = _offsets(
        None if saved is None else address(saved), steps, kernels.saved_count * state * item
    )
    ys = ops.empty((steps, batch, W_hr.shape[1]), h0)
    y_steps = ops.unstack_time(ys)
    for t in range(steps):
        ops.matmul_into(hs[t] if variant.recurrent_state == "h" else cs[t], U, product)
        kernels.step_forward(
            batch, hidden, z_at[t], address(product), address(no_h), c_at[t], address(P),
            v_at[t], address(held), c_at[t + 1], m_at[t], s_at[t],
        )  # fmt: skip
        ops.matmul_into(ms[t], W_hr, y_steps[t])
        hs[t + 1] = y_steps[t] if valid is None else ops.where(valid[t], y_steps[t], hs[t])
    tape = KernelTape(xs, hs, cs, saved, kernels, ms) if record else None
    return ys, hs[steps], cs[steps], tape


def _backward_projected(ops, kernels, variant, p, tape, dys, dh, dc, valid):
    xs, hs, cs, saved, _, ms = tape
    steps, batch, hidden = ms.shape
    h0_like, c0_like = dh, dc
    W_hr = p[spec.PROJECTION]
    U = ops.contiguous(recurrent_weight(ops, variant, p["U"]))
    P = packed_params(ops, variant, p, cs)
    W_hr_t, U_t = ops.transpose(W_hr), ops.transpose(U)
    dys = ops.cast(dys, ops.dtype_name(hs))
    dh = ops.cast(dh, ops.dtype_name(hs))
    dc = ops.contiguous(ops.cast(dc, ops.dtype_name(cs))) + 0  # updated in place
    dzs = _fresh(ops, kernels, (steps, batch, kernels.z_blocks * hidden), cs)
    douts = ops.empty((steps, batch, W_hr.shape[1]), hs)  # dy_t + dh_t
    dm = ops.empty((batch, hidden), cs)
    dm_h = ops.zeros((batch, hidden), cs)  # the kernel's own dh: always zero
    dr_c = ops.empty((batch, hidden), cs)  # dz_{t+1} U^T when the recurrence reads c
    dP = ops.zeros(P.shape, P)
    valid_bytes = _valid_bytes(ops, valid)
    address = ops.address
    state, item = batch * hidden, _itemsize(kernels)
    s_at = _offsets(address(saved), steps, kernels.saved_count * state * item)
    dz_at = _offsets(address(dzs), steps, kernels.z_blocks * state * item)
    c_at = _offsets(address(cs), steps + 1, state * item)
    v_at = _offsets(None if valid_bytes is None else address(valid_bytes), steps, batch)
    dzs_t = [_recurrent_half(variant, dz) for dz in ops.unstack_time(dzs)]
    douts_t = ops.unstack_time(douts)
    reads_c = variant.recurrent_state == "c"
    # past the length dy_t is never read (it may hold anything, NaN included): the row
    # of douts is zero there, else 0 * NaN would reach dm and dW_hr = sum_t m_t^T douts_t
    no_out = None if valid is None else ops.zeros_like(dh)
    for t in range(steps - 1, -1, -1):
        douts[t] = dys[t] + dh if valid is None else ops.where(valid[t], dys[t] + dh, no_out)
        ops.matmul_into(douts_t[t], W_hr_t, dm)
        kernels.step_backward(
            batch, hidden, address(dm), address(dr_c) if reads_c and t < steps - 1 else None,
            address(dm_h), address(dc), c_at[t], c_at[t + 1], s_at[t], address(P), v_at[t],
            dz_at[t], address(dP),
        )  # fmt: skip
        if reads_c:
            ops.matmul_into(dzs_t[t], U_t, dr_c)
            inside = ops.zeros_like(dh)
        else:
            inside = dzs_t[t] @ U_t
        dh = inside if valid is None else ops.where(valid[t], inside, dh)
    if reads_c:
        dc += dr_c
    dextra = _unpacked_grads(ops, variant, dP)
    m2 = ops.reshape(ms, (steps * batch, hidden))
    douts2 = ops.reshape(douts, (steps * batch, W_hr.shape[1]))  # not -1: batch may be 0
    dextra[spec.PROJECTION] = ops.transpose(m2) @ douts2
    rs = (hs if not reads_c else cs)[:steps]
    return bptt.direction_grads(ops, variant, p, xs, rs, dzs, dextra, dh, dc, h0_like, c0_like)
