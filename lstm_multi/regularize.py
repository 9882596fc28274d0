"""Zoneout, recurrent and input dropout, DropConnect on U: the regularizers inside the recurrence.

Four regularizers act within a layer-direction's time loop (inter-layer ``dropout``
acts between layers, in ``network``). With h̃_t, c̃_t the step's own results (the
spec's gate math, ``step.gates_and_projection``)::

    zoneout (Krueger et al. 2017)    h_t = k^h_t ∘ h_{t-1} + (1 - k^h_t) ∘ h̃_t
                                     c_t = k^c_t ∘ c_{t-1} + (1 - k^c_t) ∘ c̃_t
        training: k^h_t (B, P or H), k^c_t (B, H) are 0/1 masks, each entry 1 (the unit
        keeps its previous value) with probability p_h, p_c, drawn anew at every step;
        evaluation: k^h = p_h, k^c = p_c (the expectation of the training step). The
        output y_t is the zoned h_t (as haste's ``LSTM(zoneout=...)`` returns it).

    recurrent dropout (Gal & Ghahramani 2016, Keras's ``recurrent_dropout``)
                                     z_t = zx_t + concat_g((r_{t-1} ∘ d_g) U_g)
        r_{t-1} the recurrent input (h_{t-1}, or c_{t-1} where the variant's recurrence
        reads c); g over the four gate blocks (i, f, g, o) of U (R, 4H); d (B, 4, R)
        inverted-dropout masks (0 with probability p, else 1 / (1 - p)), one per gate
        as Keras 3's ``LSTMCell`` draws them (its ``implementation=1``, which any
        ``recurrent_dropout`` forces), drawn once per call and fixed over the sequence.
        Training only.

    input dropout (Gal & Ghahramani 2016; Keras's ``dropout`` with ``recurrent_dropout``)
                                     zx_t = concat_g((x_t ∘ e_g) W_g) + b
        x_t (B, F_in) the layer-direction's input; e (B, 4, F_in) inverted-dropout
        masks, one per gate (Keras 3's ``LSTMCell`` with ``implementation=1``: its four
        ``dropout`` masks), drawn once per call and fixed over the sequence. Backward:
        dW_g = sum_t (x_t ∘ e_g)^T dz_{t,g}, dx_t = sum_g (dz_{t,g} W_g^T) ∘ e_g.
        Training only.

    DropConnect on U (Wan et al. 2013; haste's ``dropout``, AWD-LSTM's weight drop)
                                     U' = U ∘ M,  M (R, 4H) inverted-dropout mask
        one M per layer-direction and call (every step and sequence of the batch shares
        it), applied to the parameter before the loop: every engine runs U' unchanged,
        and dU = dU' ∘ M. Training only.

At a step that is not real (``lengths``/``mask``) h and c are held exactly and y_t is
zero, whatever the zoneout masks. Masks come from the call's ``dropout_key`` (an int
seed, a NumPy or torch generator, a JAX key) through ``ops.random_uniform``, a stream
apart from the inter-layer dropout masks'; the same int or key gives the same masks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from . import step, validation


class StepMasks(NamedTuple):
    """One layer-direction's masks (time-major, in the order the direction reads its steps).

    keep_h: (T, B, P or H) 0/1 zoneout masks of h (training), the float p_h (evaluation)
    or None; keep_c: likewise for c (B, H); recurrent: (B, 4, R) recurrent-dropout masks
    or None; inputs: (B, 4, F_in) input-dropout masks or None. A NamedTuple, so that JAX
    sees a pytree.
    """

    keep_h: Any = None
    keep_c: Any = None
    recurrent: Any = None
    inputs: Any = None


def check_rate(name, p) -> float:
    """A drop or keep probability: a number in [0, 1)."""
    if not validation.is_real_number(p):
        raise TypeError(f"{name}: expected a number in [0, 1), got {type(p).__name__}")
    if not 0 <= p < 1:
        raise ValueError(f"{name}: expected a number in [0, 1), got {p!r}")
    return float(p)


def check_zoneout(zoneout) -> tuple[float, float]:
    """zoneout: a number p in [0, 1) (h and c both zoned with p) or a pair (p_h, p_c)."""
    if isinstance(zoneout, (tuple, list)):
        if len(zoneout) != 2:
            raise ValueError(f"zoneout: expected a number or a pair (p_h, p_c), got {zoneout!r}")
        return check_rate("zoneout", zoneout[0]), check_rate("zoneout", zoneout[1])
    p = check_rate("zoneout", zoneout)
    return p, p


def input_projection(ops, xs, W, b, inputs):
    """zx = x W + b for every step (T, B, 4H), or with input-dropout masks (B, 4, F_in)
    concat_g((x ∘ e_g) W_g) + b (each gate's product reads its own masked x)."""
    if inputs is None:
        return ops.project(xs, W, b)
    hidden = W.shape[-1] // 4
    blocks = [
        ops.project(
            xs * inputs[None, :, g],
            W[:, g * hidden : (g + 1) * hidden],
            b[g * hidden : (g + 1) * hidden],
        )
        for g in range(4)
    ]
    return ops.concat(blocks, -1)


def recurrent_product(ops, r, U, recurrent):
    """r U (B, 4H), or with recurrent-dropout masks (B, 4, R) concat_g((r ∘ d_g) U_g)."""
    if recurrent is None:
        return r @ U
    hidden = U.shape[-1] // 4
    blocks = [(r * recurrent[:, g]) @ U[:, g * hidden : (g + 1) * hidden] for g in range(4)]
    return ops.concat(blocks, -1)


def recurrent_product_backward(ops, dz, U, recurrent):
    """The gradient at r of ``recurrent_product``: dz U^T, or sum_g (dz_g U_g^T) ∘ d_g."""
    if recurrent is None:
        return dz @ ops.transpose(U)
    hidden = U.shape[-1] // 4
    dr = None
    for g in range(4):
        block = slice(g * hidden, (g + 1) * hidden)
        term = (dz[:, block] @ ops.transpose(U[:, block])) * recurrent[:, g]
        dr = term if dr is None else dr + term
    return dr


def blend(keep, previous, new):
    """Zoneout's k ∘ previous + (1 - k) ∘ new (k a mask or a probability; None: new)."""
    if keep is None:
        return new
    return keep * previous + (1 - keep) * new


def at_step(keep, t):
    """A zoneout mask's step t (a float in evaluation stays the float)."""
    return keep[t] if hasattr(keep, "shape") else keep


def regularized_step(ops, variant, zx, h, c, v, U, extra, keep_h, keep_c, recurrent):
    """One step with zoneout and recurrent dropout: (h_t, c_t, y_t, cache).

    U: ``step.recurrent_weight`` of the canonical U; keep_h, keep_c: this step's zoneout
    masks (B, ...) or probabilities, or None; recurrent: (B, 4, R) or None; v: (B, 1)
    booleans (a real step) or None. Where v is False h and c are held and y_t is zero.
    """
    r = h if variant.recurrent_state == "h" else c
    zr = ops.cast(recurrent_product(ops, r, U, recurrent), ops.dtype_name(zx))
    z = ops.concat([zx, zr], -1) if variant.split else zx + zr  # split: [x_t W, r U]
    h_new, c_new, cache = step.gates_and_projection(ops, variant, z, c, extra)
    h_new = blend(keep_h, h, h_new)
    c_new = blend(keep_c, c, c_new)
    if v is None:
        return h_new, c_new, h_new, cache
    y = ops.where(v, h_new, ops.zeros_like(h_new))
    return ops.where(v, h_new, h), ops.where(v, c_new, c), y, cache


class Tape(NamedTuple):
    """What ``backward_direction`` reads: the inputs, the recurrent inputs r, the caches
    and the masks of a ``loop_direction`` run."""

    xs: Any
    rs: list
    caches: list
    masks: StepMasks


def loop_direction(ops, variant, p, xs, h0, c0, valid, masks, record=False):
    """``network.loop_direction`` with ``masks`` (a ``StepMasks`` in reading order): a
    Python loop over ``regularized_step``. Returns (ys, h_T, c_T, tape or None); with
    autodiff ops (torch, JAX) the loop is differentiated as it is."""
    b = ops.zeros_like(p["b"]) if variant.split else p["b"]  # split halves: x W alone
    zxs = ops.unstack_time(input_projection(ops, xs, p["W"], b, masks.inputs))
    U = step.recurrent_weight(ops, variant, p["U"])
    extra = step.step_params(variant, p)
    h, c = h0, ops.cast(c0, ops.state_dtype(ops.dtype_name(c0)))
    ys, caches, rs = [], [], []
    for t, zx in enumerate(zxs):
        if record:
            rs.append(h if variant.recurrent_state == "h" else c)
        v = None if valid is None else valid[t]
        keep_h, keep_c = at_step(masks.keep_h, t), at_step(masks.keep_c, t)
        h, c, y, cache = regularized_step(
            ops, variant, zx, h, c, v, U, extra, keep_h, keep_c, masks.recurrent
        )
        ys.append(y)
        if record:
            caches.append(cache)
    tape = Tape(xs, rs, caches, masks) if record else None
    return ops.stack(ys, 0), h, ops.cast(c, ops.dtype_name(c0)), tape


def _keep_grads(ops, keep, d_out):
    """(gradient to the step's own result, gradient to the previous value) of ``blend``."""
    if keep is None:
        return d_out, None
    return d_out * (1 - keep), d_out * keep


def _plus(a, b):
    return a if b is None else a + b


def backward_direction(ops, variant, p, tape, dys, dh, dc, valid):
    """Backward of ``loop_direction`` (NumPy, CuPy): (grads like p, dxs, dh0, dc0).

    Per step, from the bottom of ``regularized_step`` up: the padding's ``where`` (dh
    and dc pass through a held step), zoneout's blend (k ∘ d to the previous value,
    (1 - k) ∘ d to the step's own), the gate math's derived backward, then the masked
    recurrent product. dW, dU, db, dx are formed from the whole sequence's dz.
    """
    xs, rs, caches, masks = tape
    U = step.recurrent_weight(ops, variant, p["U"])
    extra = step.step_params(variant, p)
    h0_like, c0_like = dh, dc
    dc = ops.cast(dc, ops.state_dtype(ops.dtype_name(xs)))
    dextra = {k: ops.zeros_like(ops.cast(v, ops.dtype_name(dc))) for k, v in extra.items()}
    dzs = [None] * len(caches)
    for t in range(len(caches) - 1, -1, -1):
        v = None if valid is None else valid[t]
        cache = caches[t]
        dh_out = dh + dys[t]
        dc_out = dc
        if v is not None:
            zero_h, zero_c = ops.zeros_like(dh), ops.zeros_like(dc)
            dh_out, dc_out = ops.where(v, dh_out, zero_h), ops.where(v, dc, zero_c)
            dh_held, dc_held = ops.where(v, zero_h, dh), ops.where(v, zero_c, dc)
        dh_new, dh_prev = _keep_grads(ops, at_step(masks.keep_h, t), dh_out)
        dc_new, dc_prev_keep = _keep_grads(ops, at_step(masks.keep_c, t), dc_out)
        dz, dc_prev, dextra_t = step.gates_and_projection_backward(
            ops, variant, dh_new, dc_new, cache, extra
        )
        dzr = dz[..., dz.shape[-1] // 2 :] if variant.split else dz
        dr = recurrent_product_backward(ops, dzr, U, masks.recurrent)
        dc_prev = _plus(dc_prev, dc_prev_keep)
        if variant.recurrent_state == "h":
            dh_prev = _plus(dr, dh_prev)
        else:
            dc_prev = dc_prev + dr
            dh_prev = ops.zeros_like(dh) if dh_prev is None else dh_prev
        if v is not None:
            dh_prev, dc_prev = dh_prev + dh_held, dc_prev + dc_held
        dzs[t], dh, dc = dz, dh_prev, dc_prev
        for k, g in dextra_t.items():
            dextra[k] = dextra[k] + g
    grads, dxs = _sequence_grads(ops, variant, p, xs, ops.stack(rs, 0), ops.stack(dzs, 0), masks)
    grads.update(dextra)
    dtype = ops.dtype_name
    grads = {k: ops.cast(g, dtype(p[k])) for k, g in grads.items()}
    return (
        grads,
        ops.cast(dxs, dtype(xs)),
        ops.cast(dh, dtype(h0_like)),
        ops.cast(dc, dtype(c0_like)),
    )


def _sequence_grads(ops, variant, p, xs, rs, dzs, masks):
    """dW = sum_t x_t^T dz_t, db = sum dz, dx_t = dz_t W^T and dU (per gate block, the
    recurrent input masked as the forward masked it; unused blocks zeroed). With
    input-dropout masks e (B, 4, F_in): dW_g = sum_t (x_t ∘ e_g)^T dz_{t,g} and
    dx_t = sum_g (dz_{t,g} W_g^T) ∘ e_g. Split halves (dz (T, B, 8H) = [dzx, dzr]): dW
    and dx from dzx, dU from dzr, and no db here (b is a parameter of the gate math, its
    gradient among the step's)."""
    if variant.split:
        half = dzs.shape[2] // 2
        dzx, dzr = dzs[..., :half], dzs[..., half:]
    else:
        dzx = dzr = dzs
    t, b = dzs.shape[0], dzs.shape[1]
    dx2 = ops.reshape(dzx, (t * b, dzx.shape[2]))
    dr2 = ops.reshape(dzr, (t * b, dzr.shape[2]))
    if masks.recurrent is None:
        r2 = ops.reshape(rs, (t * b, rs.shape[2]))
        dU = ops.transpose(ops.cast(r2, ops.dtype_name(dr2))) @ dr2
    else:
        hidden = dzr.shape[2] // 4
        blocks = []
        for g in range(4):
            r_g = ops.reshape(rs * masks.recurrent[None, :, g], (t * b, rs.shape[2]))
            dz_g = dr2[:, g * hidden : (g + 1) * hidden]
            blocks.append(ops.transpose(ops.cast(r_g, ops.dtype_name(dr2))) @ dz_g)
        dU = ops.concat(blocks, -1)
    unused = step.recurrent_mask(ops, variant, dU.shape[-1] // 4, dU)
    if unused is not None:
        dU = dU * unused
    x2 = ops.reshape(xs, (t * b, xs.shape[2]))
    W = ops.cast(p["W"], ops.dtype_name(dx2))
    if masks.inputs is None:
        dW = ops.transpose(ops.cast(x2, ops.dtype_name(dx2))) @ dx2
        dx = ops.reshape(dx2 @ ops.transpose(W), xs.shape)
    else:
        hidden = dzx.shape[2] // 4
        dW_blocks, dx = [], None
        for g in range(4):
            block = slice(g * hidden, (g + 1) * hidden)
            e_g = masks.inputs[None, :, g]
            x_g = ops.reshape(xs * e_g, (t * b, xs.shape[2]))
            dW_blocks.append(ops.transpose(ops.cast(x_g, ops.dtype_name(dx2))) @ dx2[:, block])
            dx_g = ops.reshape(dx2[:, block] @ ops.transpose(W[:, block]), xs.shape) * e_g
            dx = dx_g if dx is None else dx + dx_g
        dW = ops.concat(dW_blocks, -1)
    grads = {"W": dW, "U": dU}
    if not variant.split:
        grads["b"] = ops.sum(dx2, 0)
    return grads, dx


def draw(ops, key, like, shapes_of, rates):
    """The masks of one training call: ``(step_masks, u_masks)``.

    shapes_of: per layer-direction ``(h_shape (T, B, P or H), c_shape (T, B, H),
    r_width R, U shape, input width F_in)``; rates: ``(p_h, p_c, recurrent_dropout,
    dropconnect, input_dropout)``. step_masks[k]: a ``StepMasks`` (time on x's axis);
    u_masks[k]: the (R, 4H) DropConnect mask or None. All drawn from one
    ``ops.random_uniform`` call in this order: per layer-direction k^h, k^c, d, M, each
    where its rate is above 0; then per layer-direction the input masks e (after all
    the others, so that adding input dropout leaves the other masks' values as they were).
    """
    p_h, p_c, p_r, p_u, p_x = rates
    shapes = []
    for h_shape, c_shape, width, u_shape, _ in shapes_of:
        batch = h_shape[1]
        shapes += [h_shape] if p_h else []
        shapes += [c_shape] if p_c else []
        shapes += [(batch, 4, width)] if p_r else []
        shapes += [u_shape] if p_u else []
    for h_shape, _, _, _, in_width in shapes_of:
        shapes += [(h_shape[1], 4, in_width)] if p_x else []
    draws = iter(ops.random_uniform(key, shapes, like))
    dtype = ops.dtype_name(like)
    state = ops.state_dtype(dtype)

    def keep(p, dtype_name):  # 1 with probability p
        return ops.astype(next(draws) < p, dtype_name) if p else None

    def drop(p):  # inverted dropout: 0 with probability p, else 1 / (1 - p)
        return ops.astype(next(draws) >= p, dtype) * (1.0 / (1.0 - p)) if p else None

    step_masks, u_masks = [], []
    for _ in shapes_of:
        keep_h, keep_c = keep(p_h, dtype), keep(p_c, state)
        step_masks.append(StepMasks(keep_h, keep_c, drop(p_r)))
        u_masks.append(drop(p_u))
    step_masks = [m._replace(inputs=drop(p_x)) for m in step_masks]
    return step_masks, u_masks


def evaluation_masks(count, p_h, p_c):
    """Evaluation's zoneout, the expectation: k^h = p_h, k^c = p_c at every step."""
    return [StepMasks(p_h or None, p_c or None, None) for _ in range(count)]


__all__ = [
    "StepMasks",
    "Tape",
    "backward_direction",
    "check_rate",
    "check_zoneout",
    "draw",
    "evaluation_masks",
    "input_projection",
    "loop_direction",
    "regularized_step",
]
