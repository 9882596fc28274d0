"""Hand-written backpropagation through time, against ``ops``.

Walks the tape that ``network.forward`` recorded with ``loop_direction(...,
record=True)`` backwards, one ``spec.step_backward`` per step, then forms the
W, U, b gradients with one matrix product each over the whole sequence
(``spec.projection_grads``). Used by the NumPy and CuPy backends; the autodiff
backends are tested against it and it against finite differences.
"""

from __future__ import annotations

from . import spec
from .network import extra_params


def masked_step_backward(ops, variant, dh, dc, dy, cache, v, U_step_t, extra):
    """Backward of ``network.masked_step``.

    dh, dc: gradients of the carried h_t, c_t; dy: of the output y_t.
    Returns (dz (B, 4H), dh_{t-1}, dc_{t-1}, extra grads of this step).
    """
    dh_out = dh + dy
    if v is None:
        return spec.step_backward(ops, variant, dh_out, dc, cache, U_step_t, extra)
    zeros = ops.zeros_like(dh)
    dz, dh_prev, dc_prev, dextra = spec.step_backward(
        ops, variant, ops.where(v, dh_out, zeros), ops.where(v, dc, zeros), cache, U_step_t, extra
    )
    # past the length the state was carried unchanged: its gradient passes straight through
    return dz, dh_prev + ops.where(v, zeros, dh), dc_prev + ops.where(v, zeros, dc), dextra


def backward_direction(ops, variant, p, tape, dys, dh, dc, valid):
    """Backward of one ``loop_direction``.

    dys: (T, B, H) gradient of the outputs; dh, dc: (B, H) gradients of the
    final states. Returns (grads like p, dxs (T, B, in), dh0, dc0).
    """
    xs, rs, caches = tape
    U_step_t = ops.prepare_step_weight_t(spec.recurrent_weight(ops, variant, p["U"]))
    extra = extra_params(p)
    dextra = {k: ops.zeros_like(v) for k, v in extra.items()}
    dzs = [None] * len(caches)
    for t in range(len(caches) - 1, -1, -1):
        v = None if valid is None else valid[t]
        dzs[t], dh, dc, dextra_t = masked_step_backward(
            ops, variant, dh, dc, dys[t], caches[t], v, U_step_t, extra
        )
        for k, g in dextra_t.items():
            dextra[k] = dextra[k] + g
    dW, dU, db, dxs = spec.projection_grads(
        ops, variant, xs, ops.stack(rs, 0), ops.stack(dzs, 0), p["W"]
    )
    return {"W": dW, "U": dU, "b": db, **dextra}, dxs, dh, dc


def backward(ops, variant, params, tapes, layout, dy, dh_n, dc_n):
    """Backward of ``network.forward``.

    dy: (T, B, D * H); dh_n, dc_n: (L * D, B, H).
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
                ops, variant, p, tapes[layer][direction], dys, dh_n[k], dc_n[k], layout.valid
            )
            if direction == 1:
                dxs = layout.reverse(ops, dxs)
            grads[layer][direction] = g
            d_layer_in = dxs if d_layer_in is None else d_layer_in + dxs
        d_layer_out = d_layer_in
    return grads, d_layer_out, ops.stack(dh0, 0), ops.stack(dc0, 0)
