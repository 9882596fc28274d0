"""A Keras 3 layer: ``LSTM``, ``keras.layers.LSTM``'s semantics with lstm_multi's variants.

The layer wraps the functional cell of the backend Keras runs on (Keras's
backend is process-wide, fixed by ``KERAS_BACKEND`` before keras is imported):
``"jax"`` -> ``get_cell("jax")``, ``"torch"`` -> ``get_cell("torch")``,
``"numpy"`` -> ``get_cell("numpy")`` (inference only, as Keras's numpy backend
is). On ``"tensorflow"`` or any other backend constructing the layer raises a
``RuntimeError`` naming the three supported ones. The gate math, the time loop
and the gradients are the cell's; this module only maps Keras's conventions
(batch-first input, masks, ``go_backwards``, ``return_sequences``,
``return_state``, variables, serialisation) onto it.

Weights are Keras variables, one per canonical array, created in ``build``:
``{key}_l{layer}_d{direction}`` for ``key`` in W (in, 4H), U (H, 4H), b (4H,) and
the variant's own (``p`` (rows, H) for the peephole variants), gate blocks
(i, f, g, o) as in ``lstm_multi.spec``. For the plain ``"lstm"`` variant W, U, b
are exactly ``keras.layers.LSTM``'s ``kernel``, ``recurrent_kernel`` and ``bias``
(``lstm_multi.convert.to_keras`` / ``from_keras`` move them).

Masks. Keras passes a (B, T) boolean mask (``Embedding(mask_zero=True)``,
``Masking``); it becomes ``lengths = mask.sum(1)``, so it must be True on each
row's first steps and False after (padding at the end). ``keras.layers.LSTM``
skips masked steps wherever they are; lstm_multi runs each sequence over its
first ``length`` steps, so any other pattern is a ``ValueError`` rather than a
different computation. Under ``jax.jit`` (``model.fit`` / ``predict`` on JAX) the
mask's values are not known while tracing: such a row is given the length
T + 1, and the cell's own run-time check raises ``lengths: expected every value
in 1..T ... got [T + 1]`` (a ``ValueError``, or JAX's runtime error carrying it)
when the result is computed.

Outputs at masked steps. The cell zeros its outputs past a sequence's length;
``keras.layers.LSTM`` (its scan, on the jax and numpy backends) outputs the
current h at a masked step: the last valid output repeated past the length, and
before a row's first valid step (``go_backwards`` reads the padding first; a
fully masked row) the initial h, zeros unless ``initial_state`` is given. The
outputs here are gathered on the time axis to be exactly those (cheap: one
gather and one select). Keras's torch loop (and ``unroll=True``) gives zeros
instead of the initial h before the first valid step; the two agree without an
``initial_state``. A fully masked row (length 0, which ``nn.LSTM`` and the cell
refuse) gets Keras's result: its initial state back, its initial h as every
output; the cell runs it for one step on a zeroed input (so nothing in the
padding, NaN included, reaches a gradient) and the result is discarded.
``bidirectional`` outputs are ``keras.layers.Bidirectional``'s: zero at masked
steps.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("keras") is None:  # pragma: no cover - exercised without keras
    raise ImportError(
        "lstm_multi.keras needs keras, which is not installed: pip install 'lstm_multi[keras]'"
    )
try:
    import keras
except ImportError as error:  # pragma: no cover - Keras's default backend is tensorflow
    raise ImportError(
        f"lstm_multi.keras: importing keras failed ({error}). Keras runs on the backend named by "
        "KERAS_BACKEND (its default is 'tensorflow'); lstm_multi.keras runs on 'jax', 'torch' or "
        "'numpy': set os.environ['KERAS_BACKEND'] = 'jax' (or 'torch', 'numpy') before keras is "
        "imported"
    ) from error

import functools
import numbers

import numpy as np

from . import init, spec, validation
from .ops import ArrayModuleOps, host_values
from .registry import get_cell

__all__ = ["LSTM"]

#: Keras backend name -> the lstm_multi backend whose functional cell runs the layer
CELL_BACKENDS = {"jax": "jax", "torch": "torch", "numpy": "numpy"}

_NUMPY_OPS = ArrayModuleOps(np)
ops = keras.ops


def _keras_backend():
    """The name of the backend Keras runs on (one place, so tests can replace it)."""
    return keras.backend.backend()


def _cell_backend():
    name = _keras_backend()
    if name not in CELL_BACKENDS:
        raise RuntimeError(
            f"lstm_multi.keras.LSTM runs on the Keras backends {sorted(CELL_BACKENDS)}, but Keras "
            f"runs on {name!r}; set KERAS_BACKEND to one of them before keras is imported"
        )
    return CELL_BACKENDS[name]


def _check_seed(seed):
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed: expected None or a non-negative integer, got {seed!r}")
    return int(seed)


def _constant(value, shape, dtype=None):
    """A Keras initializer giving ``value`` (the numbers drawn by lstm_multi's init)."""
    return ops.convert_to_tensor(value, dtype=dtype)


def _take_steps(y, index):
    """``y[n, index[n, t], :]`` for y (B, T, F) and integer index (B, T)."""
    index = ops.broadcast_to(ops.expand_dims(index, -1), ops.shape(y))
    return ops.take_along_axis(y, index, axis=1)


@keras.saving.register_keras_serializable(package="lstm_multi")
class LSTM(keras.layers.Layer):
    """A multi-layer, optionally bidirectional LSTM of any lstm_multi variant, as a Keras layer.

    Arguments:
        units: H, the width of h and c (each direction's).
        proj_size: P > 0 projects h to width P (LSTMP: ``W_hr`` (H, P) per layer and
            direction; outputs and h are P wide, c stays ``units`` wide); 0 for none.
        variant: "lstm" (``keras.layers.LSTM``'s function), "peephole", "peephole_full",
            Greff et al.'s "nig", "nfg", "nog", "niaf", "noaf", "cifg", or a
            ``lstm_multi.Variant``; a user's own Variant must be registered
            (``lstm_multi.register_variant``), in the saving and the loading process,
            for the layer to be saved.
        return_sequences: return the outputs of every step (B, T, D * units) rather
            than the last one (B, D * units).
        return_state: also return the final states: ``output, h, c``; h and c are
            (B, units) for one layer and direction, as ``keras.layers.LSTM``'s, and
            (num_layers * D, B, units) otherwise (lstm_multi's and ``nn.LSTM``'s
            layout, layer-major, forward direction first).
        go_backwards: read each sequence reversed, as ``keras.layers.LSTM`` does: the
            sequence outputs come in the order read (the last input's first), and
            with a mask the padding steps come first (outputting the initial h).
            Not with ``bidirectional``.
        num_layers: stacked layers; layer k > 0 reads layer k - 1's outputs.
        bidirectional: add a direction that reads each sequence reversed (within
            its length); outputs are the two directions' concatenated (D = 2), as
            ``keras.layers.Bidirectional(LSTM(...))`` gives with ``merge_mode="concat"``:
            zero past a mask's end with ``return_sequences``, each direction's
            final h without.
        scheme: the initial weights: "keras" (the default, ``keras.layers.LSTM``'s:
            glorot-uniform W, orthogonal U, forget-gate bias 1, zero peepholes) or
            "uniform" (``nn.LSTM``'s U(-1/sqrt(H), 1/sqrt(H))); see ``lstm_multi.init``.
        seed: a non-negative integer: the same seed gives the same initial numbers as
            ``get_cell(backend)(...).init(seed, scheme=scheme)`` on every lstm_multi
            backend; None draws one from NumPy's global generator (which
            ``keras.utils.set_random_seed`` seeds).
        **kwargs: ``keras.layers.Layer``'s (``name``, ``dtype``, ``trainable``).

    Call arguments:
        inputs: (B, T, features), batch first as in Keras.
        mask: (B, T) booleans, True on each row's first steps, False after (as
            ``Embedding(mask_zero=True)`` or ``Masking`` give for sequences padded at
            the end); Keras passes it by itself. A masked step outputs the current h,
            as in ``keras.layers.LSTM`` (module docstring); a row with no True step
            returns its initial state.
        initial_state: ``[h0, c0]``, each (B, units) for one layer and direction,
            (num_layers * D, B, units) otherwise; zeros when not given.

    Returns ``output`` or, with ``return_state``, ``output, h, c`` (shapes above);
    a mask is passed on with ``return_sequences``, unchanged (also with
    ``go_backwards``, as Keras does).
    """

    def __init__(
        self,
        units,
        *,
        variant="lstm",
        return_sequences=False,
        return_state=False,
        go_backwards=False,
        num_layers=1,
        bidirectional=False,
        proj_size=0,
        scheme="keras",
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = validation.check_positive_int("units", units)
        self.variant = spec.get_variant(variant)
        self.return_sequences = validation.check_bool("return_sequences", return_sequences)
        self.return_state = validation.check_bool("return_state", return_state)
        self.go_backwards = validation.check_bool("go_backwards", go_backwards)
        self.num_layers = validation.check_positive_int("num_layers", num_layers)
        self.bidirectional = validation.check_bool("bidirectional", bidirectional)
        self.proj_size = validation.check_proj_size(proj_size, self.units)
        if go_backwards and bidirectional:
            raise ValueError(
                "go_backwards: expected False with bidirectional=True (the network already "
                "reads each sequence both ways), got True"
            )
        self.scheme = init.check_scheme(scheme)
        self.seed = _check_seed(seed)
        self._backend = _cell_backend()
        self.supports_masking = True
        self.cell = None  # the functional cell, made in build (it needs the input size)
        self._params = None  # params[layer][direction] = {key: keras.Variable}

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    def _cell_kwargs(self):
        """The arguments the functional cell takes from this layer (beside input_size)."""
        return {
            "hidden_size": self.units,
            "variant": self.variant,
            "num_layers": self.num_layers,
            "bidirectional": self.bidirectional,
            "proj_size": self.proj_size,
        }

    @property
    def output_units(self):
        """The width of h (each direction's output): proj_size with a projection, else units."""
        return self.proj_size or self.units

    def _state_shape(self, batch, part="c"):
        """The shape of the state ``part`` ("h" or "c"; they differ with a projection)."""
        width = self.output_units if part == "h" else self.units
        stacked = self.num_layers * self.num_directions
        return (batch, width) if stacked == 1 else (stacked, batch, width)

    # building ---------------------------------------------------------------------

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError(
                "inputs: expected a 3-d shape (batch, time, features) with the features "
                f"known, got {input_shape}"
            )
        input_size = int(input_shape[-1])
        self.cell = get_cell(self._backend)(input_size, **self._cell_kwargs())
        seed = self.seed if self.seed is not None else int(np.random.randint(0, 2**31 - 1))
        # drawn in float32 (float64 for float64 variables) and cast to the variables' dtype
        float64 = keras.backend.standardize_dtype(self.variable_dtype) == "float64"
        dtype = "float64" if float64 else "float32"
        numpy_cell = get_cell("numpy")(input_size, **self._cell_kwargs())
        values = numpy_cell.init(seed, dtype=dtype, scheme=self.scheme)
        self._params = [
            [
                {
                    key: self.add_weight(
                        name=f"{key}_l{layer}_d{direction}",
                        shape=value.shape,
                        initializer=functools.partial(_constant, value),
                    )
                    for key, value in p.items()
                }
                for direction, p in enumerate(layer_values)
            ]
            for layer, layer_values in enumerate(values)
        ]

    def get_canonical_params(self):
        """The weights as lstm_multi's canonical ``params[layer][direction]`` (NumPy arrays):
        for a functional cell's ``from_numpy`` or ``lstm_multi.convert.to_keras``."""
        self._check_built("get_canonical_params")
        return [
            [{key: ops.convert_to_numpy(v) for key, v in p.items()} for p in layer]
            for layer in self._params
        ]

    def set_canonical_params(self, params):
        """Set the weights from canonical ``params[layer][direction]`` (any arrays; e.g.
        ``lstm_multi.convert.from_keras(keras_lstm)``)."""
        self._check_built("set_canonical_params")
        validation.check_params(_NUMPY_OPS, params, self.cell.param_shapes())
        for variables, values in zip(self._params, params, strict=True):
            for p_vars, p_values in zip(variables, values, strict=True):
                for key, variable in p_vars.items():
                    variable.assign(np.asarray(p_values[key]))

    def _check_built(self, what):
        if self._params is None:
            raise ValueError(f"{what}: the layer is not built yet (call it once, or build it)")

    # running ----------------------------------------------------------------------

    def call(self, inputs, mask=None, initial_state=None):
        x = inputs
        batch, steps = int(ops.shape(x)[0]), int(ops.shape(x)[1])
        dtype = keras.backend.standardize_dtype(x.dtype)
        params = [
            [{key: ops.cast(v.value, dtype) for key, v in p.items()} for p in layer]
            for layer in self._params
        ]
        state = self._initial_state(initial_state, batch)
        lengths = run_lengths = empty = None
        if mask is not None:
            lengths, run_lengths, empty = self._lengths(mask, batch, steps)
            x = ops.where(empty[:, None, None], ops.zeros_like(x), x)
        if self.go_backwards:
            x = self._reverse_within(x, lengths, steps)
        y, (h_n, c_n) = self.cell(params, x, state, run_lengths)
        h0, c0 = state if state is not None else (ops.zeros_like(h_n), ops.zeros_like(c_n))
        if empty is not None:  # length 0: the initial state comes back
            keep = ops.reshape(empty, (1, batch, 1))
            h_n, c_n = ops.where(keep, h0, h_n), ops.where(keep, c0, c_n)
        if self.return_sequences:
            output = self._keras_steps(y, lengths, steps, h0[-1])
        else:  # each direction's final h of the top layer, as Keras's last output
            top = range(h_n.shape[0] - self.num_directions, h_n.shape[0])
            output = ops.concatenate([h_n[k] for k in top], axis=-1)
        if not self.return_state:
            return output
        if len(self._state_shape(batch)) == 2:
            h_n, c_n = h_n[0], c_n[0]
        return output, h_n, c_n

    def _initial_state(self, initial_state, batch):
        """``[h0, c0]`` in Keras's layout -> the cell's ``(h0, c0)``, each (L * D, B, H)."""
        if initial_state is None:
            return None
        if not isinstance(initial_state, (list, tuple)) or len(initial_state) != 2:
            raise TypeError(
                f"initial_state: expected a list [h0, c0], got {type(initial_state).__name__}"
                + (f" of {len(initial_state)}" if isinstance(initial_state, (list, tuple)) else "")
            )
        states = []
        for part, s in zip(("h0", "c0"), initial_state, strict=True):
            expected = self._state_shape(batch, part[0])
            s = ops.convert_to_tensor(s)
            if tuple(s.shape) != expected:
                raise ValueError(
                    f"initial_state {part}: expected shape {expected}, got {tuple(s.shape)}"
                )
            states.append(ops.expand_dims(s, 0) if len(expected) == 2 else s)
        return tuple(states)

    def _lengths(self, mask, batch, steps):
        """A (B, T) mask -> (lengths, the lengths the cell runs, rows of length 0).

        lengths = mask.sum(1); the cell runs a row of length 0 for one step (its
        result is discarded) and is given T + 1 for a row that is not a prefix of
        Trues, which its own check refuses when the values are only known at run
        time (under ``jax.jit``); known values are checked here.
        """
        mask = ops.convert_to_tensor(mask)
        if tuple(mask.shape) != (batch, steps):
            raise ValueError(
                f"mask: expected shape {(batch, steps)} (batch, time), got {tuple(mask.shape)}"
            )
        ones = ops.cast(mask, "int32")
        lengths = ops.sum(ones, axis=1)
        prefix = ops.cast(ops.arange(steps, dtype="int32")[None, :] < lengths[:, None], "int32")
        is_prefix = ops.all(ops.equal(ones, prefix), axis=1)
        known = host_values(is_prefix)
        if known is not None and not np.all(known):
            bad = np.flatnonzero(~np.asarray(known, bool))
            raise ValueError(
                "mask: expected each row to be True on its first steps and False after "
                "(sequences padded at the end; lstm_multi runs each over its first "
                f"mask.sum(1) steps), got a False before a True in rows {bad[:5].tolist()}"
            )
        run = ops.where(is_prefix, ops.maximum(lengths, 1), steps + 1)
        return lengths, run, ops.equal(lengths, 0)

    def _reverse_within(self, x, lengths, steps):
        """Each sequence reversed within its length (the padding after it stays)."""
        if lengths is None:
            return ops.flip(x, axis=1)
        t = ops.arange(steps, dtype="int32")[None, :]
        length = lengths[:, None]
        return _take_steps(x, ops.where(t < length, length - 1 - t, t))

    def _keras_steps(self, y, lengths, steps, h0_top):
        """The cell's outputs (zero past each length) -> Keras's (``backend.rnn``'s scan on
        jax and numpy): a masked step outputs the current h, so the last valid output
        repeats past the length, and before a row's first valid step (go_backwards'
        padding, a row of length 0) comes the initial h (zeros unless an initial state
        is given). Bidirectional outputs are Keras's ``Bidirectional`` ones: zero where
        masked. ``h0_top`` (B, H): the top layer's initial h."""
        if lengths is None:
            return y
        t = ops.arange(steps, dtype="int32")[None, :]
        length = lengths[:, None]
        if self.bidirectional:
            return ops.where(ops.equal(length, 0)[:, :, None], ops.zeros_like(y), y)
        if self.go_backwards:
            y = _take_steps(y, (t + length) % steps)
            before = t < steps - length
        else:
            y = _take_steps(y, ops.minimum(t, ops.maximum(length - 1, 0)))
            before = ops.broadcast_to(ops.equal(length, 0), (y.shape[0], steps))
        return ops.where(before[:, :, None], h0_top[:, None, :], y)

    # shapes, masks, config --------------------------------------------------------

    def compute_output_shape(self, input_shape):
        batch, steps = input_shape[0], input_shape[1]
        width = self.num_directions * self.output_units
        output = (batch, steps, width) if self.return_sequences else (batch, width)
        if not self.return_state:
            return output
        return output, self._state_shape(batch, "h"), self._state_shape(batch, "c")

    def compute_mask(self, inputs, mask=None):
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        output_mask = mask if self.return_sequences else None
        return [output_mask, None, None] if self.return_state else output_mask

    def get_config(self):
        name = self.variant.name
        if not spec.is_registered(self.variant):  # the name must find what this computes
            raise ValueError(
                f"variant: the Variant {name!r} is not registered, so a saved layer could not "
                "find it again; call lstm_multi.register_variant(variant) (in the process that "
                "saves and the one that loads) before saving"
            )
        config = super().get_config()
        config.update(
            units=self.units,
            variant=name,
            return_sequences=self.return_sequences,
            return_state=self.return_state,
            go_backwards=self.go_backwards,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            proj_size=self.proj_size,
            scheme=self.scheme,
            seed=self.seed,
        )
        return config
