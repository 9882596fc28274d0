"""Stacked, bidirectional, variable-length LSTM networks, written against ``ops``.

Layer semantics are ``torch.nn.LSTM``'s. Arrays are time-major here:
x (T, B, in), states (L * D, B, H), y (T, B, D * H), where L is the number of
layers and D the number of directions. Direction 1 reads each sequence reversed
over its own valid steps, which this module does by a permutation of the time
axis (``reverse``) around an ordinary forward run; the permutation is its own
inverse, so outputs and gradients are mapped back by the same gather.

Which steps are real comes as ``lengths`` (B,) (right-padded sequences: steps
t < lengths[n]) or as a per-step mask (T, B) of booleans (any pattern: left
padding, gaps, rows with no real step). At a step that is not real every
direction holds its state (h and c carried unchanged) and outputs zero; direction
1 then runs t = T-1 .. 0 over the whole padded sequence (a plain flip, and the
mask flipped with it), so it reads the real steps in reverse order. For
right-padded sequences that is exactly the reversal within each length: the
flipped padding comes first and holds the initial state.

The time loop over one direction (``run_direction``) is the backend's choice: a
Python loop (``loop_direction``), ``jax.lax.scan``, or a native kernel.
"""

from __future__ import annotations

import numpy as np

from . import spec, step


def is_step_mask(lengths):
    """Whether the network's ``lengths`` argument is a per-step mask (T, B) rather than
    lengths (B,) (see the module doc)."""
    return lengths is not None and len(lengths.shape) == 2


def prefix_lengths(mask):
    """A (B, T) NumPy boolean mask -> its rows' lengths (B,) where every row is True on
    its first steps (at least one) and False after (right padding), else None."""
    lengths = mask.sum(1)
    prefix = np.arange(mask.shape[1])[None, :] < lengths[:, None]
    if not (lengths >= 1).all() or not (mask == prefix).all():
        return None
    return lengths


def mask_steps(mask):
    """A (B, T) NumPy boolean mask (True at a real step) -> what ``TimeLayout`` runs: None
    where every step is real; the rows' lengths (B,) as int64 where each row is True on
    its first steps and False after (right padding: the lengths' path, PyTorch's kernel
    included); else the mask itself, time-major (T, B)."""
    lengths = prefix_lengths(mask)
    if lengths is None:
        return np.ascontiguousarray(mask.T)
    if (lengths == mask.shape[1]).all():
        return None
    return lengths.astype(np.int64)


class TimeLayout:
    """Where each sequence is valid, and the permutation that reverses it.

    ``lengths``: (B,) integers (right-padded sequences), a (T, B) boolean mask, or
    None (every step real).
    valid: (T, B, 1) booleans, True at a real step (t < lengths[n], or the mask);
    None when every sequence is full.
    reverse_index: (T, B, 1) integers, lengths[n] - 1 - t inside the sequence
    and t past it; None for a mask or when every sequence is full (a plain
    flip then).
    reverse_valid: ``valid`` in direction 1's order (the order ``reverse`` gives).
    """

    def __init__(self, ops, steps, lengths):
        self.valid = None
        self.reverse_index = None
        self.reverse_valid = None
        if is_step_mask(lengths):
            self.valid = ops.reshape(lengths, (steps, lengths.shape[1], 1))
            self.reverse_valid = ops.flip_time(self.valid)
        elif lengths is not None:
            t = ops.reshape(ops.arange(steps, lengths), (steps, 1))
            n = ops.reshape(lengths, (1, lengths.shape[0]))
            valid = t < n
            self.valid = self.reverse_valid = ops.reshape(valid, (steps, lengths.shape[0], 1))
            index = ops.where(valid, n - 1 - t, t)
            self.reverse_index = ops.reshape(index, (steps, lengths.shape[0], 1))

    def valid_of(self, direction):
        """The valid steps (T, B, 1) in the order ``direction`` reads them, or None."""
        return self.valid if direction == 0 else self.reverse_valid

    def zero_padding(self, ops, xs):
        """(T, B, F) with every entry past its sequence's length replaced by 0.

        Padded steps are still computed (and their results masked), so the
        input is cleaned first: NaN or inf in the padding would otherwise reach
        the weight gradients through 0 * NaN. ``where`` selects, so the
        gradient of the padding is exactly 0.
        """
        return ops.where(self.valid, xs, ops.zeros_like(xs))

    def reverse(self, ops, xs):
        """Reverse each sequence of (T, B, F) within its valid steps (lengths), or the
        whole time axis (a mask, or full sequences)."""
        if self.reverse_index is None:
            return ops.flip_time(xs)
        return ops.take_time(xs, self.reverse_index)


def extra_params(p):
    """The parameters beyond W, U, b (the variant's own, such as peepholes)."""
    return {k: v for k, v in p.items() if k not in ("W", "U", "b")}


def layer_step(ops, variant, p, x_t, h, c):
    """One step of one layer-direction from its canonical parameters ``p``: x_t (..., in),
    h, c (..., H) (h (..., P) with a projection) -> (h_t, c_t). For cells that a
    framework's own loop drives (Flax's ``nn.RNN``, an Equinox ``lax.scan``)."""
    U_step = ops.prepare_step_weight(step.recurrent_weight(ops, variant, p["U"]))
    zx = step.input_half(variant, x_t, p)
    h, c, _ = step.step_forward(ops, variant, zx, h, c, U_step, step.step_params(variant, p))
    return h, c


def masked_step(ops, variant, zx, h, c, v, U_step, extra):
    """One step of a direction: the spec's step, with sequences past their length held.

    v: (B, 1) booleans (the sequence is inside its length at this step) or None.
    Returns (h_t, c_t, y_t, cache): where v is False, h and c are carried
    unchanged and y_t is zero.
    """
    h_new, c_new, cache = step.step_forward(ops, variant, zx, h, c, U_step, extra)
    if v is None:
        return h_new, c_new, h_new, cache
    y = ops.where(v, h_new, ops.zeros_like(h_new))
    return ops.where(v, h_new, h), ops.where(v, c_new, c), y, cache


def loop_direction(ops, variant, p, xs, h0, c0, valid, record=False):
    """Run one direction over time in a Python loop.

    xs: (T, B, in); h0, c0: (B, H); valid: (T, B, 1) or None.
    Returns (ys (T, B, H), h_T, c_T, tape); the tape (for ``backward_direction``)
    is None unless ``record``. Past a sequence's length its state is carried
    unchanged and its output is zero.
    """
    zxs = ops.unstack_time(step.input_projection(ops, variant, xs, p))
    U_step = ops.prepare_step_weight(step.recurrent_weight(ops, variant, p["U"]))
    extra = step.step_params(variant, p)
    h, c = h0, ops.cast(c0, ops.state_dtype(ops.dtype_name(c0)))  # float32 for half inputs
    ys, caches, rs = [], [], []
    for t, zx in enumerate(zxs):
        if record:
            rs.append(h if variant.recurrent_state == "h" else c)
        v = None if valid is None else valid[t]
        h, c, y, cache = masked_step(ops, variant, zx, h, c, v, U_step, extra)
        ys.append(y)
        if record:
            caches.append(cache)
    tape = (xs, rs, caches) if record else None
    return ops.stack(ys, 0), h, ops.cast(c, ops.dtype_name(c0)), tape


def reverse_masks(ops, layout, masks):
    """A ``regularize.StepMasks`` (a NamedTuple) with its per-step (T, B, F) masks in
    direction 1's order (``TimeLayout.reverse``); probabilities and per-call masks stay."""

    def order(k):
        return layout.reverse(ops, k) if hasattr(k, "shape") and len(k.shape) == 3 else k

    return type(masks)(order(masks[0]), order(masks[1]), *masks[2:])


def forward(
    ops,
    variant,
    params,
    x,
    h0,
    c0,
    lengths,
    run_direction,
    between_layers=None,
    layer_masks=None,
    step_masks=None,
):
    """The whole network forward.

    x: (T, B, in); h0, c0: (L * D, B, H) (h: (L * D, B, P) with a projection);
    lengths: (B,) integers, a (T, B) boolean mask (``TimeLayout``) or None.
    ``run_direction(ops, variant, p, xs, h0, c0, valid)`` returns
    (ys, h_T, c_T, tape). ``between_layers`` (such as the torch module's
    dropout) is applied to the input of every layer after the first;
    ``layer_masks[k]`` (k >= 1; (T, B, F) arrays, such as inverted-dropout
    masks) multiplies layer k's input, where ``bptt.backward`` can apply it
    again to the gradient. ``step_masks[k]`` (k = layer * D + direction; a
    ``regularize.StepMasks``, time on x's axis): zoneout and recurrent-dropout masks,
    handed to ``run_direction(..., step_masks=...)`` in the order the direction
    reads its steps.
    Returns (y (T, B, D * H), h_n, c_n, tapes[layer][direction], layout).
    """
    variant = spec.get_variant(variant)
    num_directions = len(params[0])
    layout = TimeLayout(ops, x.shape[0], lengths)
    layer_input = x if layout.valid is None else layout.zero_padding(ops, x)
    h_n, c_n, tapes = [], [], []
    for layer, layer_params in enumerate(params):
        if layer > 0 and between_layers is not None:
            layer_input = between_layers(layer_input)
        if layer > 0 and layer_masks is not None:
            layer_input = layer_input * layer_masks[layer]
        outputs, layer_tapes = [], []
        for direction, p in enumerate(layer_params):
            k = layer * num_directions + direction
            xs = layer_input if direction == 0 else layout.reverse(ops, layer_input)
            valid = layout.valid_of(direction)
            if step_masks is None:
                ys, h, c, tape = run_direction(ops, variant, p, xs, h0[k], c0[k], valid)
            else:
                masks = (
                    step_masks[k] if direction == 0 else reverse_masks(ops, layout, step_masks[k])
                )
                ys, h, c, tape = run_direction(
                    ops, variant, p, xs, h0[k], c0[k], valid, step_masks=masks
                )
            outputs.append(ys if direction == 0 else layout.reverse(ops, ys))
            h_n.append(h)
            c_n.append(c)
            layer_tapes.append(tape)
        layer_input = outputs[0] if num_directions == 1 else ops.concat(outputs, -1)
        tapes.append(layer_tapes)
    return layer_input, ops.stack(h_n, 0), ops.stack(c_n, 0), tapes, layout
