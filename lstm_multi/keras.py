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

Keras's protocol. The layer has ``keras.layers.LSTM``'s ``return_sequences``,
``return_state``, ``go_backwards``, ``stateful`` (with ``states``,
``reset_state``/``reset_states``), ``zero_output_for_mask``, ``unroll`` and
``use_cudnn`` arguments and attributes, and its ``get_config`` round-trips through
``from_config``: that is what ``keras.layers.Bidirectional`` needs to wrap it (it
rebuilds the layer from its config, once as given and once with
``go_backwards=True``, sets ``zero_output_for_mask = return_sequences`` on both, and
flips the backward outputs), so ``Bidirectional(LSTM(units))`` computes what
``LSTM(units, bidirectional=True)`` does given the same weights, masks included.
``unroll`` has no effect (the time loop is the cell's engine's) and ``use_cudnn``
does not choose anything ("auto", True or False: lstm_multi's own kernels run,
chosen by the cell's engine table); both are accepted so that code and configs
written for ``keras.layers.LSTM`` work.

Stateful. With ``stateful=True`` the final h and c of each call become the initial
state of the next (row n of one batch continues row n of the previous one), until
``reset_state()`` zeros them; the batch size is fixed by the first build
(``keras.Input(..., batch_size=B)``). The states are ``keras.Variable``s held, as
``keras.layers.RNN`` holds them, outside the layer's weights: not saved, not in
``get_weights``, so weights move between models of other batch sizes. Like
``keras.layers.LSTM``'s they are carried by eager calls (``layer(x)``,
``model(x)``) and by the torch backend's ``predict``/``fit``; Keras's jitted JAX
``predict``/``fit`` only write back tracked variables, so there (for
``keras.layers.LSTM(stateful=True)`` too, Keras 3.15) the state is not carried.

Saving. The class is registered as ``"lstm_multi>LSTM"``
(``keras.saving.register_keras_serializable``), which is what ``load_model`` looks
up: it is registered when this module is imported, and ``import lstm_multi``
imports it where keras is already imported. Keras imports the module a saved
config names only for its own packages (keras, keras_hub, ...), so a process that
loads a model must import ``lstm_multi.keras`` (or keras, then ``lstm_multi``)
first; otherwise Keras's ``TypeError`` says ``Could not locate class 'LSTM'`` and
shows the config's ``'module': 'lstm_multi.keras'``.

Masks. Keras passes a (B, T) boolean mask (``Embedding(mask_zero=True)``,
``Masking``), with any pattern: padding at the end, at the start (``pad_sequences``'
default ``padding="pre"``), gaps, a fully masked row. The cell takes it as it is
(``mask=``): at a masked step h and c are held, as in ``keras.layers.LSTM``, and
nothing at a masked step (NaN included) reaches an output or a gradient. A mask
that is True on each row's first steps runs as lengths (PyTorch's own kernel on
the torch backend); under ``jax.jit`` (``model.fit`` / ``predict`` on JAX) the
mask's values are not known while tracing and it runs as a mask, whatever it is.
``go_backwards`` reads the input and its mask from the end, as Keras does.

Outputs at masked steps. The cell outputs zero at a masked step;
``keras.layers.LSTM`` (its scan, on the jax and numpy backends) outputs the
current h there: the output of the row's last real step before it, and before a
row's first real step (a fully masked row) the initial h, zeros unless
``initial_state`` is given. The outputs here are gathered on the time axis to be
exactly those (cheap: one cumulative max, one gather and one select). Keras's
torch loop (and ``unroll=True``) gives zeros instead of the initial h before the
first real step; the two agree without an ``initial_state``. ``bidirectional``
outputs are ``keras.layers.Bidirectional``'s: zero at masked steps;
``zero_output_for_mask=True`` gives zeros there too (with ``return_sequences``).
The final states (and the output without ``return_sequences``) are those of each
row's last real step.
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

from . import init, regularize, spec, validation
from .ops import ArrayModuleOps
from .registry import get_cell, shared_cell

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


class _Carried:
    """Where a stateful layer keeps its h and c variables: a plain object, which Keras's
    attribute tracking does not look into (a list or tuple attribute it would track),
    so that, as ``keras.layers.RNN``'s states, they are not weights."""

    __slots__ = ("variables",)

    def __init__(self):
        self.variables = None


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
            Not with ``bidirectional``. With a ``seed`` the initial numbers are
            those of the seed's reverse direction (below).
        stateful: carry the final state of each call into the next (the initial
            state when none is given; module docstring); the batch size is the one
            the layer is built with. ``reset_state()`` zeros it.
        unroll: accepted for ``keras.layers.LSTM``'s configs (True or False); no
            effect: the time loop is the cell's engine's, compiled or fused.
        use_cudnn: accepted for ``keras.layers.LSTM``'s configs ("auto", True or
            False); lstm_multi's own kernels run whatever it says (the cell's
            engine table chooses them).
        zero_output_for_mask: with ``return_sequences`` and a mask, output zeros at
            the masked steps instead of the current h (``keras.layers.RNN``'s
            argument; ``keras.layers.Bidirectional`` sets it).
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
            ``keras.utils.set_random_seed`` seeds). With ``go_backwards`` the seed's
            generator draws each layer's forward numbers first and the layer takes
            the ones after (a reverse direction's), so that
            ``keras.layers.Bidirectional(LSTM(units, seed=s))`` starts as
            ``LSTM(units, bidirectional=True, seed=s)`` does (one layer) rather than
            with two equal directions.
        dropout: ``keras.layers.LSTM``'s: in training, the input dropped with this
            rate (inverted dropout, kept entries scaled by 1 / (1 - dropout)) by masks
            drawn once per call and kept over the sequence. With
            ``recurrent_dropout`` 0 (Keras's ``implementation=2``) one mask (B, features)
            on x before the cell, so every engine runs it (the fused kernels
            included); with ``recurrent_dropout`` > 0 (which makes Keras's cell
            ``implementation=1``) four masks, one per gate, x ∘ e_g read by gate g's
            product (the cell's ``input_dropout``). With ``num_layers`` > 1 the first
            case drops the layer's input only and the second each layer's input (as
            stacked ``keras.layers.LSTM(dropout=..., recurrent_dropout=...)``); with
            ``bidirectional`` the first case's one mask is the two directions' (the
            two layers of ``keras.layers.Bidirectional`` draw one each), the second's
            masks each direction's own. Not ``nn.LSTM``'s ``dropout``, which acts
            between layers, per step.
        recurrent_dropout: ``keras.layers.LSTM``'s: in training, the previous h as each
            gate's recurrent product reads it is multiplied by that gate's own
            inverted-dropout mask (B, units), drawn once per call and kept over the
            sequence (Keras 3's ``LSTMCell``, four masks). The masks come from the
            layer's ``keras.random.SeedGenerator(seed)`` (``dropout``'s too), not the
            same numbers as Keras's layer draws (the rule is the same; tested with
            Keras's masks).
        zoneout: p or (p_h, p_c) (Krueger et al. 2017; no Keras argument): in training
            each unit of h (c) keeps its previous value with probability p_h (p_c),
            per step; in inference the expectation.
        dropconnect: in training, the recurrent kernel U times one inverted-dropout
            mask per call (Wan et al. 2013; haste's ``dropout``; no Keras argument).
            ``lstm_multi.regularize`` has the equations of all three.
        **kwargs: ``keras.layers.Layer``'s (``name``, ``dtype``, ``trainable``).

    Call arguments:
        inputs: (B, T, features), batch first as in Keras.
        mask: (B, T) booleans, True on each row's first steps, False after (as
            ``Embedding(mask_zero=True)`` or ``Masking`` give for sequences padded at
            the end); Keras passes it by itself. A masked step outputs the current h,
            as in ``keras.layers.LSTM`` (module docstring); a row with no True step
            returns its initial state.
        initial_state: ``[h0, c0]``, each (B, units) for one layer and direction,
            (num_layers * D, B, units) otherwise; when not given zeros, or with
            ``stateful`` the state the previous call ended with.

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
        stateful=False,
        unroll=False,
        use_cudnn="auto",
        zero_output_for_mask=False,
        num_layers=1,
        bidirectional=False,
        proj_size=0,
        scheme="keras",
        seed=None,
        dropout=0.0,
        recurrent_dropout=0.0,
        zoneout=0.0,
        dropconnect=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.dropout = regularize.check_rate("dropout", dropout)
        self.recurrent_dropout = regularize.check_rate("recurrent_dropout", recurrent_dropout)
        self.zoneout = regularize.check_zoneout(zoneout)
        self.dropconnect = regularize.check_rate("dropconnect", dropconnect)
        self.units = validation.check_positive_int("units", units)
        self.variant = spec.get_variant(variant)
        self.return_sequences = validation.check_bool("return_sequences", return_sequences)
        self.return_state = validation.check_bool("return_state", return_state)
        self.go_backwards = validation.check_bool("go_backwards", go_backwards)
        self.stateful = validation.check_bool("stateful", stateful)
        self.unroll = validation.check_bool("unroll", unroll)
        if not (use_cudnn == "auto" or isinstance(use_cudnn, bool)):
            raise ValueError(f"use_cudnn: expected 'auto', True or False, got {use_cudnn!r}")
        self.use_cudnn = use_cudnn
        self.zero_output_for_mask = validation.check_bool(
            "zero_output_for_mask", zero_output_for_mask
        )
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
        # the regularizers' masks (made only where they are used, so that other layers
        # keep exactly their weights and variables)
        rates = (self.dropout, self.recurrent_dropout, *self.zoneout, self.dropconnect)
        self.seed_generator = keras.random.SeedGenerator(self.seed) if any(rates) else None
        self._backend = _cell_backend()
        self.supports_masking = True
        self.cell = None  # the functional cell, made in build (it needs the input size)
        self._params = None  # params[layer][direction] = {key: keras.Variable}
        self._carried = _Carried()  # the stateful layer's [h, c] variables, made in build

    @property
    def states(self):
        """``[h, c]``, the ``keras.Variable``s a stateful layer carries (shapes as
        ``return_state``'s), once built; None otherwise (as ``keras.layers.RNN``)."""
        return None if self._carried.variables is None else list(self._carried.variables)

    def reset_state(self):
        """Zero the carried state of a stateful layer (nothing to do otherwise, as for
        ``keras.layers.LSTM``)."""
        for variable in self.states or ():
            variable.assign(ops.zeros_like(variable.value))

    def reset_states(self):
        """``reset_state`` (Keras's other spelling)."""
        self.reset_state()

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
            "zoneout": self.zoneout,
            "recurrent_dropout": self.recurrent_dropout,
            # Keras's implementation 1 (any recurrent_dropout): four input masks, per gate
            "input_dropout": self.dropout if self.recurrent_dropout else 0.0,
            "dropconnect": self.dropconnect,
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
        if self.stateful and input_shape[0] is None:
            raise ValueError(
                "stateful: expected a fixed batch size (keras.Input(shape, batch_size=B), or "
                f"a first call on a batch), got the input shape {input_shape}"
            )
        input_size = int(input_shape[-1])
        # one cell per configuration, shared by every layer of it (its JAX programs compiled once)
        self.cell = shared_cell(self._backend, input_size=input_size, **self._cell_kwargs())
        seed = self.seed if self.seed is not None else int(np.random.randint(0, 2**31 - 1))
        # drawn in float32 (float64 for float64 variables) and cast to the variables' dtype
        float64 = keras.backend.standardize_dtype(self.variable_dtype) == "float64"
        values = self._initial_values(input_size, seed, "float64" if float64 else "float32")
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
        if self.stateful:
            batch = int(input_shape[0])
            self._carried.variables = [
                keras.Variable(
                    np.zeros(self._state_shape(batch, part)),
                    trainable=False,
                    dtype=self.variable_dtype,
                    name=f"{part}_state",
                )
                for part in ("h", "c")
            ]

    def _initial_values(self, input_size, seed, dtype):
        """The initial canonical numbers: ``get_cell("numpy")(...).init(seed)``'s; with
        ``go_backwards`` a reverse direction's: the seed's generator draws each layer's
        forward numbers first (discarded) and the layer's after, as a bidirectional
        network's direction 1 (for one layer, the very same numbers)."""
        if not self.go_backwards:
            numpy_cell = get_cell("numpy")(input_size, **self._cell_kwargs())
            return numpy_cell.init(seed, dtype=dtype, scheme=self.scheme)
        rng = np.random.default_rng(seed)
        shapes = spec.network_param_shapes(
            self.variant, input_size, self.units, self.num_layers, 1, self.proj_size
        )
        values = []
        for (layer_shapes,) in shapes:
            init.draw(self.scheme, rng, layer_shapes, self.units, dtype)  # the forward one's
            values.append(
                [init.draw(self.scheme, rng, layer_shapes, self.units, dtype, self.variant)]
            )
        return values

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

    def call(self, inputs, mask=None, initial_state=None, training=None):
        x = inputs
        batch, steps = int(ops.shape(x)[0]), int(ops.shape(x)[1])
        dtype = keras.backend.standardize_dtype(x.dtype)
        params = [
            [{key: ops.cast(v.value, dtype) for key, v in p.items()} for p in layer]
            for layer in self._params
        ]
        if self.stateful:
            carried = self._carried.variables
            if tuple(carried[1].shape)[-2] != batch:
                raise ValueError(
                    f"stateful: expected inputs of the batch size the state was built for "
                    f"({tuple(carried[1].shape)[-2]}), got {batch}"
                )
            if initial_state is None:  # copies: the variables are overwritten below
                initial_state = [ops.copy(ops.cast(v.value, dtype)) for v in carried]
        state = self._initial_state(initial_state, batch)
        if mask is not None:
            mask = self._check_mask(mask, batch, steps)
        if self.go_backwards:  # Keras's: the input and its mask read from the end
            x = ops.flip(x, axis=1)
            mask = None if mask is None else ops.flip(mask, axis=1)
        if training and self.dropout and not self.recurrent_dropout:
            x = x * ops.cast(self._input_mask(x), dtype)[:, None, :]  # implementation 2's
        key = None
        if training and self.seed_generator is not None:  # the masks' randomness
            key = keras.random.randint((), 0, 2**31 - 1, seed=self.seed_generator)
        y, (h_n, c_n) = self.cell(params, x, state, mask=mask, dropout_key=key)
        h0 = state[0] if state is not None else ops.zeros_like(h_n)
        if self.return_sequences:
            output = y if mask is None else self._keras_steps(y, mask, steps, h0[-1])
        else:  # each direction's final h of the top layer, as Keras's last output
            top = range(h_n.shape[0] - self.num_directions, h_n.shape[0])
            output = ops.concatenate([h_n[k] for k in top], axis=-1)
        if len(self._state_shape(batch)) == 2:
            h_n, c_n = h_n[0], c_n[0]
        if self.stateful:
            for variable, value in zip(self._carried.variables, (h_n, c_n), strict=True):
                variable.assign(ops.cast(value, variable.dtype))
        if not self.return_state:
            return output
        return output, h_n, c_n

    def _input_mask(self, x):
        """``dropout``'s one inverted-dropout mask (B, features) for a call on x (B, T,
        features), Keras's ``implementation=2`` (``recurrent_dropout`` 0): every step of
        a sequence is multiplied by the same row."""
        ones = ops.ones_like(x[:, 0, :])
        return keras.random.dropout(ones, rate=self.dropout, seed=self.seed_generator)

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

    def _check_mask(self, mask, batch, steps):
        """Keras's (B, T) mask, checked, as booleans (Keras's RNNs read nonzero as real)."""
        mask = ops.convert_to_tensor(mask)
        if tuple(mask.shape) != (batch, steps):
            raise ValueError(
                f"mask: expected shape {(batch, steps)} (batch, time), got {tuple(mask.shape)}"
            )
        return ops.cast(mask, "bool")

    def _keras_steps(self, y, mask, steps, h0_top):
        """The cell's outputs (zero at masked steps) -> Keras's (``backend.rnn``'s scan on
        jax and numpy): a masked step outputs the current h, the output of the row's last
        real step before it, or before a row's first real step the initial h (zeros unless
        an initial state is given). Bidirectional outputs are Keras's ``Bidirectional``
        ones, and with ``zero_output_for_mask`` all: zero where masked, the cell's own.
        mask (B, T) in the order read; ``h0_top`` (B, H): the top layer's initial h."""
        if self.bidirectional or self.zero_output_for_mask:
            return y
        t = ops.arange(steps, dtype="int32")[None, :]
        # the last real step at or before t, -1 before the first (Keras's numpy backend
        # scans in floats: cast back)
        last_real = ops.cast(
            ops.associative_scan(ops.maximum, ops.where(mask, t, -1), axis=1), "int32"
        )
        y = _take_steps(y, ops.maximum(last_real, 0))
        return ops.where((last_real < 0)[:, :, None], h0_top[:, None, :], y)

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
            stateful=self.stateful,
            unroll=self.unroll,
            use_cudnn=self.use_cudnn,
            zero_output_for_mask=self.zero_output_for_mask,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            proj_size=self.proj_size,
            scheme=self.scheme,
            seed=self.seed,
            dropout=self.dropout,
            recurrent_dropout=self.recurrent_dropout,
            zoneout=list(self.zoneout),
            dropconnect=self.dropconnect,
        )
        return config
