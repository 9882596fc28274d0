"""Hand-written backpropagation through time, against ``ops``.

Walks the tape that ``network.forward`` recorded with ``loop_direction(...,
record=True)`` backwards, one ``step.step_backward`` per step, then forms the
W, U, b gradients with one matrix product each over the whole sequence
(``step.projection_grads``). Used by the NumPy and CuPy backends; the autodiff
backends are tested against it and it against finite differences.
"""

from __future__ import annotations

from . import spec, step


def masked_step_backward(ops, variant, dh, dc, dy, cache, v, U_step_t, extra):
    """Backward of ``network.masked_step``.

    dh, dc: gradients of the carried h_t, c_t; dy: of the output y_t.
    Returns (dz (B, 4H), dh_{t-1}, dc_{t-1}, extra grads of this step). Where v
    is False (past the sequence's length) dz and the extra grads are exactly
    zero and dh, dc pass through unchanged: ``where`` selects, it does not
    multiply, so nothing computed at a padded step can leak in.
    """
    dh_out = dh + dy
    if v is None:
        return step.step_backward(ops, variant, dh_out, dc, cache, U_step_t, extra)
    zero_h, zero_c = ops.zeros_like(dh), ops.zeros_like(dc)
    dz, dh_prev, dc_prev, dextra = step.step_backward(
        ops, variant, ops.where(v, dh_out, zero_h), ops.where(v, dc, zero_c), cache, U_step_t, extra
    )
    # past the length the state was carried unchanged: its gradient passes straight through
    return dz, dh_prev + ops.where(v, zero_h, dh), dc_prev + ops.where(v, zero_c, dc), dextra


def zero_extra_grads(ops, extra, like):
    """Zero accumulators for the variant's own parameters' gradients, in ``like``'s
    dtype (the state dtype: float32 for half-precision inputs)."""
    dtype = ops.dtype_name(like)
    return {k: ops.zeros_like(ops.cast(v, dtype)) for k, v in extra.items()}


def direction_grads(ops, variant, p, xs, rs, dzs, dextra, dh0, dc0, h0, c0):
    """The gradients of one direction once its steps are walked back.

    rs: (T, B, H) recurrent inputs; dzs: (T, B, 4H) preactivation gradients;
    dextra: the variant's own parameter gradients summed over time. Forms dW,
    dU, db, dxs with one product each over the whole sequence, then rounds every
    gradient to its primal's dtype, once (the sums stay in the state dtype
    until here). Returns (grads like p, dxs (T, B, in), dh0, dc0).
    """
    dW, dU, db, dxs = step.projection_grads(ops, variant, xs, rs, dzs, p["W"])
    grads = {"W": dW, "U": dU, "b": db, **dextra}  # split halves: b is among dextra
    dtype = ops.dtype_name
    grads = {k: ops.cast(g, dtype(p[k])) for k, g in grads.items()}
    return grads, ops.cast(dxs, dtype(xs)), ops.cast(dh0, dtype(h0)), ops.cast(dc0, dtype(c0))


def backward_direction(ops, variant, p, tape, dys, dh, dc, valid):
    """Backward of one ``loop_direction``.

    dys: (T, B, H) gradient of the outputs; dh, dc: (B, H) gradients of the
    final states. Returns (grads like p, dxs (T, B, in), dh0, dc0), each in its
    primal's dtype.
    """
    xs, rs, caches = tape
    U_step_t = ops.prepare_step_weight_t(step.recurrent_weight(ops, variant, p["U"]))
    extra = step.step_params(variant, p)
    h0_like, c0_like = dh, dc
    dc = ops.cast(dc, ops.state_dtype(ops.dtype_name(xs)))
    dextra = zero_extra_grads(ops, extra, dc)
    dzs = [None] * len(caches)
    for t in range(len(caches) - 1, -1, -1):
        v = None if valid is None else valid[t]
        dzs[t], dh, dc, dextra_t = masked_step_backward(
            ops, variant, dh, dc, dys[t], caches[t], v, U_step_t, extra
        )
        for k, g in dextra_t.items():
            dextra[k] = dextra[k] + g
    return direction_grads(
        ops, variant, p, xs, ops.stack(rs, 0), ops.stack(dzs, 0), dextra, dh, dc, h0_like, c0_like
    )


def backward(
    ops,
    variant,
    params,
    tapes,
    layout,
    dy,
    dh_n,
    dc_n,
    backward_direction=backward_direction,
    layer_masks=None,
):
    """Backward of ``network.forward``.

    dy: (T, B, D * H); dh_n, dc_n: (L * D, B, H). ``backward_direction`` walks
    one direction's tape back (the one that matches the forward's
    ``run_direction``); ``layer_masks`` are the forward's (the gradient of a
    masked layer input is masked the same way).
    Returns (grads[layer][direction], dx (T, B, in), dh0, dc0).
    """
    variant = spec.get_variant(variant)
    num_directions = len(params[0])
    hidden = dh_n.shape[-1]
    grads = [[None] * num_directions for _ in params]
    dh0 = [None] * (len(params) * num_directions)
    dc0 = [None] * (len(params) * num_directions)
    d_layer_out = dy
    for layer in range(len(params) - 1, -1, -1):
        d_layer_in = None
        for direction, p in enumerate(params[layer]):
            k = layer * num_directions + direction
            dys = d_layer_out[..., direction * hidden : (direction + 1) * hidden]
            if direction == 1:
                dys = layout.reverse(ops, dys)
            g, dxs, dh0[k], dc0[k] = backward_direction(
                ops,
                variant,
                p,
                tapes[layer][direction],
                dys,
                dh_n[k],
                dc_n[k],
                layout.valid_of(direction),
            )
            if direction == 1:
                dxs = layout.reverse(ops, dxs)
            grads[layer][direction] = g
            d_layer_in = dxs if d_layer_in is None else d_layer_in + dxs
        if layer > 0 and layer_masks is not None:
            d_layer_in = d_layer_in * layer_masks[layer]
        d_layer_out = d_layer_in
    return grads, d_layer_out, ops.stack(dh0, 0), ops.stack(dc0, 0)
