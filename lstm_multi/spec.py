"""The LSTM specification, written once against an array namespace.

Every backend runs the equations in this module; none restates them. A step is
split in two: the preactivation ``z = x_t W + b + r U`` (the input half
``x_t W + b`` is computed for all steps at once by the caller) and the gate
math that turns ``z`` and the previous cell state into the new state. Each
variant gives the gate math forward and backward; the backward is what the
hand-written backends (NumPy, CuPy) run, and what the autodiff backends are
tested against.

Gate order is (i, f, g, o): ``z`` has shape (B, 4H) and its column blocks
``z[:, k*H:(k+1)*H]`` are the gates in that order. ``sigma`` is the logistic
sigmoid.

``"lstm"`` (identical to ``torch.nn.LSTM``), r = h_{t-1}::

    i = sigma(z_i)   f = sigma(z_f)   g = tanh(z_g)   o = sigma(z_o)
    c_t = f * c_{t-1} + i * g
    h_t = o * tanh(c_t)

``"peephole"`` (Gers & Schmidhuber 2000, diagonal peepholes p of shape (3, H),
rows (i, f, o)), r = h_{t-1}::

    i = sigma(z_i + p_i * c_{t-1})   f = sigma(z_f + p_f * c_{t-1})   g = tanh(z_g)
    c_t = f * c_{t-1} + i * g
    o = sigma(z_o + p_o * c_t)
    h_t = o * tanh(c_t)

``"peephole_full"`` (the peephole form of "Building a LSTM by hand on PyTorch":
the gates read the cell state through the full matrix U), r = c_{t-1}, and the
g block of U is unused (masked to zero, so its gradient is zero)::

    i = sigma(z_i)   f = sigma(z_f)   o = sigma(z_o)   g = sigma(x_t W_g + b_g)
    c_t = f * c_{t-1} + i * g
    h_t = tanh(o * c_t)

Its recurrence never reads h_{t-1}: an initial h0 is accepted (so a previous
chunk's (h_n, c_n) can be passed on unchanged) but does not enter the
computation, and its gradient is zero.

Canonical parameters of one layer and direction (``in`` is input_size for
layer 0 and H * num_directions after)::

    W (in, 4H)   U (H, 4H)   b (4H,)   [p (3, H) for "peephole"]
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

GATE_ORDER = ("i", "f", "g", "o")
STATE_ORDER = ("h", "c")


class GateCache(NamedTuple):
    """What one step keeps for its backward: the gate activations and the cells."""

    i: Any
    f: Any
    g: Any
    o: Any
    c_prev: Any
    c: Any
    act: Any  # tanh(c) for "lstm"/"peephole"; h = tanh(o * c) for "peephole_full"


def split_gates(z, hidden_size):
    """Split (B, 4H) preactivations into the four (B, H) blocks, in gate order."""
    h = hidden_size
    return z[..., 0:h], z[..., h : 2 * h], z[..., 2 * h : 3 * h], z[..., 3 * h : 4 * h]


class Variant:
    """One LSTM variant: its parameters, its recurrent input and its gate math.

    Subclasses define ``gates_forward`` and ``gates_backward``; adding a variant
    means adding one subclass here and registering it in ``VARIANTS``.
    """

    name: str = ""
    #: which state feeds the recurrent product r @ U: "h" (h_{t-1}) or "c" (c_{t-1})
    recurrent_state: str = "h"
    #: gates whose block of U is unused (its columns masked to zero)
    unused_recurrent_gates: tuple[str, ...] = ()
    #: with its own extra parameters at zero it computes ``torch.nn.LSTM``'s function
    #: from the same W, U, b (so nn.LSTM's weights mean the same thing in it)
    extends_lstm: bool = False

    def extra_param_shapes(self, hidden_size: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the parameters beyond W, U, b (empty for most variants)."""
        return {}

    def gates_forward(self, ops, z, c_prev, extra):
        """(B, 4H) preactivations and c_{t-1} -> (h_t, c_t, GateCache)."""
        raise NotImplementedError

    def gates_backward(self, ops, dh, dc, cache, extra):
        """Gradients at (h_t, c_t) -> (dz (B, 4H), dc_{t-1} excluding r @ U, extra grads).

        The extra grads are a dict like ``extra`` holding this step's
        contribution (already summed over the batch).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Variant({self.name!r})"


class PlainLSTM(Variant):
    name = "lstm"
    extends_lstm = True

    def gates_forward(self, ops, z, c_prev, extra):
        zi, zf, zg, zo = split_gates(z, c_prev.shape[-1])
        i, f, g, o = ops.sigmoid(zi), ops.sigmoid(zf), ops.tanh(zg), ops.sigmoid(zo)
        c = f * c_prev + i * g
        tanh_c = ops.tanh(c)
        return o * tanh_c, c, GateCache(i, f, g, o, c_prev, c, tanh_c)

    def gates_backward(self, ops, dh, dc, cache, extra):
        i, f, g, o, c_prev, _, tanh_c = cache
        dc = dc + dh * o * (1 - tanh_c * tanh_c)
        dzi = dc * g * i * (1 - i)
        dzf = dc * c_prev * f * (1 - f)
        dzg = dc * i * (1 - g * g)
        dzo = dh * tanh_c * o * (1 - o)
        return ops.concat([dzi, dzf, dzg, dzo], -1), dc * f, {}


class PeepholeLSTM(Variant):
    name = "peephole"
    extends_lstm = True  # p = 0 is the plain LSTM

    def extra_param_shapes(self, hidden_size):
        return {"p": (3, hidden_size)}

    def gates_forward(self, ops, z, c_prev, extra):
        p = extra["p"]
        zi, zf, zg, zo = split_gates(z, c_prev.shape[-1])
        i = ops.sigmoid(zi + p[0] * c_prev)
        f = ops.sigmoid(zf + p[1] * c_prev)
        g = ops.tanh(zg)
        c = f * c_prev + i * g
        o = ops.sigmoid(zo + p[2] * c)
        tanh_c = ops.tanh(c)
        return o * tanh_c, c, GateCache(i, f, g, o, c_prev, c, tanh_c)

    def gates_backward(self, ops, dh, dc, cache, extra):
        p = extra["p"]
        i, f, g, o, c_prev, c, tanh_c = cache
        dzo = dh * tanh_c * o * (1 - o)
        dc = dc + dh * o * (1 - tanh_c * tanh_c) + dzo * p[2]
        dzi = dc * g * i * (1 - i)
        dzf = dc * c_prev * f * (1 - f)
        dzg = dc * i * (1 - g * g)
        dc_prev = dc * f + dzi * p[0] + dzf * p[1]
        dp = ops.stack([ops.sum(dzi * c_prev, 0), ops.sum(dzf * c_prev, 0), ops.sum(dzo * c, 0)], 0)
        return ops.concat([dzi, dzf, dzg, dzo], -1), dc_prev, {"p": dp}


class FullPeepholeLSTM(Variant):
    name = "peephole_full"
    recurrent_state = "c"
    unused_recurrent_gates = ("g",)

    def gates_forward(self, ops, z, c_prev, extra):
        zi, zf, zg, zo = split_gates(z, c_prev.shape[-1])
        i, f, g, o = ops.sigmoid(zi), ops.sigmoid(zf), ops.sigmoid(zg), ops.sigmoid(zo)
        c = f * c_prev + i * g
        h = ops.tanh(o * c)
        return h, c, GateCache(i, f, g, o, c_prev, c, h)

    def gates_backward(self, ops, dh, dc, cache, extra):
        i, f, g, o, c_prev, c, h = cache
        d_oc = dh * (1 - h * h)
        dc = dc + d_oc * o
        dzi = dc * g * i * (1 - i)
        dzf = dc * c_prev * f * (1 - f)
        dzg = dc * i * g * (1 - g)
        dzo = d_oc * c * o * (1 - o)
        return ops.concat([dzi, dzf, dzg, dzo], -1), dc * f, {}


VARIANTS: dict[str, Variant] = {
    v.name: v for v in (PlainLSTM(), PeepholeLSTM(), FullPeepholeLSTM())
}


def get_variant(name) -> Variant:
    """The Variant called ``name``; a ValueError listing the known ones otherwise."""
    if isinstance(name, Variant):
        return name
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"variant: expected one of {sorted(VARIANTS)}, got {name!r}") from None


def param_shapes(variant, layer_input_size: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
    """Canonical shapes of one layer-direction's parameters, in canonical key order."""
    h4 = 4 * hidden_size
    shapes = {"W": (layer_input_size, h4), "U": (hidden_size, h4), "b": (h4,)}
    shapes.update(get_variant(variant).extra_param_shapes(hidden_size))
    return shapes


def layer_input_size(layer: int, input_size: int, hidden_size: int, num_directions: int) -> int:
    """Feature size a layer reads: input_size for layer 0, H * num_directions after."""
    return input_size if layer == 0 else hidden_size * num_directions


def network_param_shapes(variant, input_size, hidden_size, num_layers, num_directions):
    """Canonical shapes of a whole network: ``shapes[layer][direction] = {"W": ..., ...}``."""
    return [
        [
            param_shapes(
                variant,
                layer_input_size(layer, input_size, hidden_size, num_directions),
                hidden_size,
            )
            for _ in range(num_directions)
        ]
        for layer in range(num_layers)
    ]


def init_params(variant, input_size, hidden_size, num_layers, num_directions, seed, dtype):
    """Canonical NumPy parameters, every entry drawn from U(-1/sqrt(H), 1/sqrt(H)).

    Returns ``params[layer][direction] = {"W": ..., "U": ..., "b": ..., ...}``.
    The same seed gives the same numbers on every backend.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    bound = 1.0 / math.sqrt(hidden_size)
    params = []
    for layer in range(num_layers):
        size = layer_input_size(layer, input_size, hidden_size, num_directions)
        directions = []
        for _ in range(num_directions):
            shapes = param_shapes(variant, size, hidden_size)
            directions.append(
                {k: rng.uniform(-bound, bound, s).astype(dtype) for k, s in shapes.items()}
            )
        params.append(directions)
    return params


def recurrent_mask(ops, variant, hidden_size, like):
    """A (4H,) 0/1 row that zeroes the unused gate blocks of U, or None."""
    variant = get_variant(variant)
    if not variant.unused_recurrent_gates:
        return None
    blocks = [
        ops.zeros((hidden_size,), like)
        if gate in variant.unused_recurrent_gates
        else ops.zeros((hidden_size,), like) + 1
        for gate in GATE_ORDER
    ]
    return ops.concat(blocks, 0)


def recurrent_weight(ops, variant, U):
    """The U a step multiplies by: U itself, or U with unused gate columns zeroed."""
    mask = recurrent_mask(ops, variant, U.shape[0], U)
    return U if mask is None else U * mask


def step_forward(ops, variant, zx, h_prev, c_prev, U_step, extra):
    """One step: z = zx + r U, then the gate math.

    zx: (B, 4H) input half of the preactivations, x_t W + b; the step may
    overwrite it (``ops.step_gemm``), so it must be scratch of the caller.
    U_step: ``ops.prepare_step_weight(recurrent_weight(ops, variant, U))``.
    Returns (h_t, c_t, GateCache).
    """
    r = h_prev if variant.recurrent_state == "h" else c_prev
    return ops.gates_forward(variant, ops.step_gemm(r, U_step, zx), c_prev, extra)


def step_backward(ops, variant, dh, dc, cache, U_step_t, extra):
    """Backward of ``step_forward``.

    U_step_t: ``ops.prepare_step_weight_t(recurrent_weight(ops, variant, U))``.
    Returns (dz (B, 4H), dh_{t-1}, dc_{t-1}, extra grads). dz is also the
    gradient of zx; the gradients of W, U, b and x follow from the stacked dz
    by ``projection_grads``.
    """
    dz, dc_prev, dextra = ops.gates_backward(variant, dh, dc, cache, extra)
    dr = ops.step_gemm_t(dz, U_step_t)
    if variant.recurrent_state == "h":
        return dz, dr, dc_prev, dextra
    return dz, ops.zeros_like(dh), dc_prev + dr, dextra


def projection_grads(ops, variant, xs, rs, dzs, W):
    """Gradients of W, U, b and the inputs from a whole sequence.

    xs: (T, B, in) the layer's inputs; rs: (T, B, H) the recurrent inputs r;
    dzs: (T, B, 4H) the preactivation gradients; W: (in, 4H).
    Returns (dW, dU, db, dxs (T, B, in)).
    """
    t, b = dzs.shape[0], dzs.shape[1]
    dz2 = ops.reshape(dzs, (t * b, dzs.shape[2]))
    x2 = ops.reshape(xs, (t * b, xs.shape[2]))
    r2 = ops.reshape(rs, (t * b, rs.shape[2]))
    dW, dU, dx2 = ops.sequence_grads(x2, r2, dz2, W)
    mask = recurrent_mask(ops, variant, rs.shape[2], dU)
    if mask is not None:
        dU = dU * mask
    return dW, dU, ops.sum(dz2, 0), ops.reshape(dx2, (t, b, xs.shape[2]))
