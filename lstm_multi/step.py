"""One time step of a layer-direction over any ``ops``, and its backward.

A step is the recurrent product, the spec's gate math and the projection::

    z   = zx_t + r U            zx_t = x_t W + b (B, 4H), computed by the caller
                                for all steps at once; r = h_{t-1} (B, H or P)
                                or c_{t-1} (B, H), as the variant says
    m_t, c_t = gates(z, c_{t-1}, extra)    the variant's generated gate math
    h_t = m_t W_hr  (B, P)      with a projection (LSTMP); h_t = m_t otherwise

and its backward, per step::

    dm_t = dh_t W_hr^T   (dW_hr += m_t^T dh_t)      with a projection
    dz, dc_{t-1}, dextra = gates_backward(dm_t, dc_t)  the derived backward
    dr   = dz U^T        (into dh_{t-1}, or dc_{t-1} where r = c_{t-1})

with dW, dU, db and dx formed afterwards from the whole sequence's dz
(``projection_grads``), one product each.

A variant with split halves (``Variant.halves == "split"``, the layer-normalised
ones) reads x_t W and r U apart, and the bias as a parameter of its gate math::

    zx_t = x_t W (B, 4H)        still one whole-sequence product, without b
    z    = [zx_t, r U] (B, 8H)  the two halves side by side, never added
    m_t, c_t = gates(z, c_{t-1}, extra + {b})

and in the backward dz (B, 8H) is [dzx, dzr]: dr = dzr U^T, dW = sum x^T dzx,
dU = sum r^T dzr, dx = dzx W^T, and db comes from the gate math (the gradient
of its parameter b), not from a sum of dz. U is the variant's recurrent weight:
the canonical U with the blocks of the gates the variant leaves unused
(``Variant.unused_recurrent_gates``) zeroed (``recurrent_weight``).

Nothing here states a gate equation: ``ops.gates_forward`` and
``ops.gates_backward`` run the code generated from ``lstm_multi.spec``. Used
by the Python time loop (``network``), the hand-written BPTT (``bptt``), JAX's
scan and the native kernels' drivers.
"""

from __future__ import annotations

from . import spec


def recurrent_mask(ops, variant, hidden_size, like):
    """A (4H,) 0/1 row that zeroes the unused gate blocks of U (in ``like``'s dtype and
    device), or None where the variant uses every block."""
    variant = spec.get_variant(variant)
    if not variant.unused_recurrent_gates:
        return None
    blocks = [
        ops.zeros((hidden_size,), like)
        if gate in variant.unused_recurrent_gates
        else ops.zeros((hidden_size,), like) + 1
        for gate in spec.GATE_ORDER
    ]
    return ops.concat(blocks, 0)


def recurrent_weight(ops, variant, U):
    """The U (H or P, 4H) a step multiplies r by: U itself, or U with the unused gate
    blocks' columns zeroed."""
    mask = recurrent_mask(ops, variant, U.shape[-1] // 4, U)
    return U if mask is None else U * mask


def input_half(variant, x, p):
    """The step's input half from canonical parameters ``p``: x W + b (x W alone for split
    halves), for inputs x (..., in); one product however many steps x holds."""
    zx = x @ p["W"]
    return zx if variant.split else zx + p["b"]


def input_projection(ops, variant, xs, p):
    """``input_half`` of a whole sequence xs (T, B, in) -> (T, B, 4H) as ``ops.project``'s
    one (T*B, in) x (in, 4H) product (fresh: the steps may write into it). Split halves
    add a zero bias: the product stays the backend's fastest one."""
    b = ops.zeros_like(p["b"]) if variant.split else p["b"]
    return ops.project(xs, p["W"], b)


def step_params(variant, p):
    """What a step reads of canonical parameters ``p`` beyond W and U (``extra``): the
    variant's own, W_hr with a projection, and b for split halves."""
    skip = ("W", "U") if variant.split else ("W", "U", "b")
    return {k: v for k, v in p.items() if k not in skip}


def gate_params(extra):
    """The parameters the gate math reads: ``extra`` without the projection ``W_hr``."""
    return {k: v for k, v in extra.items() if k != spec.PROJECTION}


def step_forward(ops, variant, zx, h_prev, c_prev, U_step, extra):
    """One step: z = zx + r U, then the gate math, then the projection if there is one.

    zx: (B, 4H) input half of the preactivations, x_t W + b; the step may
    overwrite it (``ops.step_gemm``), so it must be scratch of the caller.
    h_prev: (B, H), or (B, P) with a projection; c_prev: (B, H).
    U_step: ``ops.prepare_step_weight(recurrent_weight(ops, variant, U))``.
    extra: the variant's own parameters, and ``W_hr`` (H, P) with a projection:
    then the gate math's output m_t (B, H) becomes h_t = m_t W_hr (B, P).
    Returns (h_t, c_t, cache): the cache is the saved values of the derived
    backward (and m_t last, with a projection).
    """
    r = h_prev if variant.recurrent_state == "h" else c_prev
    if variant.split:  # [x_t W, r U] side by side (module doc)
        z = ops.concat([zx, ops.step_gemm(r, U_step, ops.zeros_like(zx))], -1)
    else:
        z = ops.step_gemm(r, U_step, zx)
    return gates_and_projection(ops, variant, z, c_prev, extra)


def gates_and_projection(ops, variant, z, c_prev, extra):
    """The step after its recurrent product: the gate math on the preactivations z
    (B, 4H; (B, 8H) [x_t W, r U] for a split-halves variant), then the projection if
    there is one. Returns (h_t, c_t, cache) as ``step_forward`` does
    (``lstm_multi.regularize`` forms z its own way)."""
    W_hr = extra.get(spec.PROJECTION)
    if W_hr is None:
        return ops.gates_forward(variant, z, c_prev, extra)
    m, c, cache = ops.gates_forward(variant, z, c_prev, gate_params(extra))
    return ops.cast(m, ops.dtype_name(W_hr)) @ W_hr, c, (*cache, m)


def step_backward(ops, variant, dh, dc, cache, U_step_t, extra):
    """Backward of ``step_forward``: gradients at (h_t, c_t) -> those at the step's inputs.

    dh: (B, H), or (B, P) with a projection; dc: (B, H).
    U_step_t: ``ops.prepare_step_weight_t(recurrent_weight(ops, variant, U))``.
    Returns (dz (B, 4H), dh_{t-1}, dc_{t-1}, extra grads). dz is also the
    gradient of zx; the gradients of W, U, b and x follow from the stacked dz
    by ``projection_grads``. dr = dz U^T goes to dh_{t-1} where r = h_{t-1}
    (dh_{t-1} is zero where r = c_{t-1}, and dr joins dc_{t-1}). With a
    projection, dm_t = dh_t W_hr^T enters the gate backward and this step's
    dW_hr = m_t^T dh_t (in dz's dtype) is among the extra grads.
    """
    dz, dc_prev, dextra = gates_and_projection_backward(ops, variant, dh, dc, cache, extra)
    dr = ops.step_gemm_t(dz[..., dz.shape[-1] // 2 :] if variant.split else dz, U_step_t)
    if variant.recurrent_state == "h":
        return dz, dr, dc_prev, dextra
    return dz, ops.zeros_like(dh), dc_prev + dr, dextra


def gates_and_projection_backward(ops, variant, dh, dc, cache, extra):
    """Backward of ``gates_and_projection``: (dh_t, dc_t) -> (dz (B, 4H), the gate
    math's dc_{t-1}, extra grads), without the recurrent product's dr."""
    W_hr = extra.get(spec.PROJECTION)
    if W_hr is None:
        return ops.gates_backward(variant, dh, dc, cache, extra)
    *cache, m = cache
    dm = ops.cast(dh, ops.dtype_name(W_hr)) @ ops.transpose(W_hr)
    dz, dc_prev, dextra = ops.gates_backward(variant, dm, dc, tuple(cache), gate_params(extra))
    state = ops.dtype_name(dz)
    dextra[spec.PROJECTION] = ops.transpose(ops.cast(m, state)) @ ops.cast(dh, state)
    return dz, dc_prev, dextra


def projection_grads(ops, variant, xs, rs, dzs, W):
    """Gradients of W, U, b and the inputs from a whole sequence, one product each:

        dW = sum_t x_t^T dz_t    dU = sum_t r_t^T dz_t (unused blocks zeroed)
        db = sum_t sum_B dz_t    dx_t = dz_t W^T

    xs: (T, B, in) the layer's inputs; rs: (T, B, H or P) the recurrent inputs r;
    dzs: (T, B, 4H) the preactivation gradients; W: (in, 4H).
    Returns (dW (in, 4H), dU (H or P, 4H), db (4H,), dxs (T, B, in)).

    Split halves: dzs is (T, B, 8H), [dzx, dzr]; dW and dx read dzx, dU reads dzr, and
    db is None (the gate math's parameter b has its own gradient).
    """
    t, b = dzs.shape[0], dzs.shape[1]
    dz2 = ops.reshape(dzs, (t * b, dzs.shape[2]))
    x2 = ops.reshape(xs, (t * b, xs.shape[2]))
    r2 = ops.reshape(rs, (t * b, rs.shape[2]))
    if variant.split:
        return _split_projection_grads(ops, variant, xs, x2, r2, dz2, W)
    dW, dU, dx2 = ops.sequence_grads(x2, r2, dz2, W)
    mask = recurrent_mask(ops, variant, dU.shape[-1] // 4, dU)
    if mask is not None:
        dU = dU * mask
    return dW, dU, ops.sum(dz2, 0), ops.reshape(dx2, (t, b, xs.shape[2]))


def _split_projection_grads(ops, variant, xs, x2, r2, dz2, W):
    """``projection_grads`` for split halves, on 2-d (T*B, ...) arrays: one product each,
    in dz2's dtype as ``ops.sequence_grads`` forms them."""
    width = W.shape[1]
    dzx2, dzr2 = dz2[:, :width], dz2[:, width:]
    dtype = ops.dtype_name(dz2)
    x2, r2, W = (ops.cast(a, dtype) for a in (x2, r2, W))
    dW = ops.transpose(x2) @ dzx2
    dU = ops.transpose(r2) @ dzr2
    dx2 = dzx2 @ ops.transpose(W)
    mask = recurrent_mask(ops, variant, width // 4, dU)
    if mask is not None:
        dU = dU * mask
    return dW, dU, None, ops.reshape(dx2, (xs.shape[0], xs.shape[1], xs.shape[2]))
