"""Flax modules over the JAX functional cell: ``LSTM`` (``flax.nnx``) and ``LinenLSTM``
(``flax.linen``).

Both compute exactly what ``lstm_multi.get_cell("jax")`` computes (every variant, stacked
layers, both directions, lengths; the custom-VJP gradient), and hold the canonical
parameters in the canonical structure, ``params[layer][direction] = {"W": (in, 4H),
"U": (H, 4H), "b": (4H,), ...}``:

* ``LSTM`` keeps them as ``nnx.Param`` leaves of ``nnx.List``/``nnx.Dict`` containers under
  ``model.layers``, so ``nnx.state(model)`` holds ``["layers"][layer][direction][name]``
  and ``model.params`` is the plain pytree of arrays the functional cell takes.
* ``LinenLSTM`` keeps the whole pytree as one parameter, ``variables["params"]["layers"]``
  (a list of lists of dicts of arrays), which the functional cell takes as it is.

Shapes (B batch, T time, H hidden_size, L num_layers, D 1 or 2 directions)::

    x       (B, T, input_size) if batch_first else (T, B, input_size)
    y       (B, T, D * H)      if batch_first else (T, B, D * H)
    state, (h_n, c_n)   each (L * D, B, H); lengths (B,) integers in 1..T

(with ``proj_size`` P: y (.., D * P), h0 and h_n (L * D, B, P), ``W_hr`` (H, P) per
layer and direction). Dropout between layers (``dropout``) and the regularizers inside the
loop (``zoneout``, ``recurrent_dropout``, ``input_dropout``, ``dropconnect``: the functional
cell's, ``lstm_multi.regularize``) follow each framework's idiom: NNX draws their masks from
the ``"dropout"`` stream of the ``rngs`` it was built with (or of a call's ``rngs``) unless
``model.eval()`` (or ``deterministic=True``); Linen takes ``deterministic`` and the
``"dropout"`` rng of ``apply`` (``self.make_rng("dropout")``), as ``linen.Dropout`` does.
Evaluation runs zoneout's expectation and no dropout.

Initial parameters come from Flax's PRNG key (``rngs.params()`` for NNX, the ``"params"``
stream for Linen) and equal ``cell.init(seed=key, dtype=param_dtype, scheme=scheme)``.
That draw reads the key's bits on the host (NumPy draws the numbers, so that one key gives
the same numbers on every backend), but Flax often initialises under tracing: Linen's
``apply`` checks each parameter's shape by evaluating its initialiser with
``jax.eval_shape``, and ``jax.jit(module.init)``, ``nnx.eval_shape`` and ``nnx.jit`` of a
constructor trace the key. So the key's bits are drawn in the graph and the host draw runs
in a ``jax.pure_callback`` (``_draw``): the same numbers, traced, vmapped or not (tested).
"""

from __future__ import annotations

try:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen, nnx
except ModuleNotFoundError as error:  # pragma: no cover - tested with flax hidden from sys.modules
    raise ImportError(
        f"lstm_multi.flax needs flax and jax ({error.name} is not installed): "
        "pip install 'lstm_multi[flax]'"
    ) from error

from . import init, network, regularize, spec, validation
from .backends import jax_backend
from .registry import shared_cell

__all__ = ["LSTM", "LinenCell", "LinenLSTM"]

#: the constructor arguments both modules forward to the functional cell, by name
CELL_ARGS = (
    "input_size",
    "hidden_size",
    "variant",
    "num_layers",
    "bidirectional",
    "batch_first",
    "proj_size",
    "dropout",
    "zoneout",
    "recurrent_dropout",
    "input_dropout",
    "dropconnect",
)

#: the regularizers inside the time loop (``lstm_multi.regularize``), each a module attribute
REGULARIZERS = ("zoneout", "recurrent_dropout", "input_dropout", "dropconnect")


def _config(module):
    """The functional cell's arguments from a module's attributes (``CELL_ARGS``), a zoneout
    pair as a tuple, so that equal configurations share one cached cell."""
    config = {name: getattr(module, name) for name in CELL_ARGS}
    if isinstance(config["zoneout"], list):
        config["zoneout"] = tuple(config["zoneout"])
    return config


def _random(module):
    """Whether a training call of ``module`` draws masks: inter-layer dropout, or one of the
    regularizers inside the loop (zoneout, recurrent / input dropout, DropConnect)."""
    rates = [getattr(module, name) for name in ("dropout", *REGULARIZERS)]
    return any(any(r) if isinstance(r, (tuple, list)) else bool(r) for r in rates)


def functional_cell(config, backend="jax"):
    """The functional cell of ``backend`` built from ``config`` (a dict of ``CELL_ARGS``),
    shared between modules of equal configuration (``registry.shared_cell``): the JAX cell
    compiles its calls once per cell, and a Linen module is rebuilt on every ``apply``."""
    return shared_cell(backend, **config)


def _param_dtype(param_dtype):
    """param_dtype -> its name ("float32"), refusing float64 while JAX's 64-bit mode is off."""
    name = validation.dtype_name("param_dtype", param_dtype)
    if name == "float64" and not jax_backend.x64_enabled():
        raise TypeError(
            "param_dtype: float64 needs JAX's 64-bit mode, which is off "
            "(jax.config.update('jax_enable_x64', True) turns it on); "
            "without it JAX would silently hold float32"
        )
    return name


def _draw(config, key, dtype, scheme):
    """Canonical parameters equal to ``cell.init(seed=key, dtype=dtype, scheme=scheme)``,
    for a concrete or a traced JAX key (see the module docstring).

    The 64 bits are those ``lstm_multi.init.seed_from`` draws from a key; the host draws
    with the NumPy cell and casts to bfloat16 in the graph, as ``cell.init`` does.
    """
    host = functional_cell(config, "numpy")
    host_dtype = "float32" if dtype == "bfloat16" else dtype
    shapes = jax.tree.map(
        lambda shape: jax.ShapeDtypeStruct(shape, host_dtype),
        host.param_shapes(),
        is_leaf=lambda node: isinstance(node, tuple),
    )

    def draw_on_host(bits):
        high, low = (int(b) for b in np.asarray(bits))
        return host.init(((high << 32) | low) & (2**63 - 1), host_dtype, scheme)

    bits = jax.random.bits(key, (2,), jnp.uint32)
    params = jax.pure_callback(draw_on_host, shapes, bits, vmap_method="sequential")
    # back in canonical key order (JAX sorts a dict's keys) and in the asked dtype
    return [
        [{k: params[l][d][k].astype(dtype) for k in s} for d, s in enumerate(layer)]
        for l, layer in enumerate(host.param_shapes())
    ]


def _checked_params(cell, params, dtype, name="params"):
    """Canonical parameters (NumPy or JAX arrays) checked against ``cell``'s shapes and
    ``dtype`` -> JAX arrays, values and dtype unchanged."""
    arrays = cell.from_numpy(params)  # checks the structure and shapes
    for layer, directions in enumerate(arrays):
        for direction, p in enumerate(directions):
            for key, array in p.items():
                if str(array.dtype) != dtype:
                    raise TypeError(
                        f"{name}[{layer}][{direction}][{key!r}]: expected dtype {dtype} "
                        f"(the module's param_dtype), got {array.dtype}"
                    )
    return arrays


class LSTM(nnx.Module):
    """A multi-layer, optionally bidirectional LSTM of any ``lstm_multi`` variant (Flax NNX).

    Arguments:
        input_size: features of x.
        hidden_size: H, the width of h and c.
        variant: a variant name ("lstm", "peephole", "peephole_full", "nig", ...) or a
            ``lstm_multi.Variant``.
        num_layers: stacked layers; layer k > 0 reads the outputs of layer k - 1.
        bidirectional: add a direction that reads each sequence reversed.
        batch_first: x and y are (B, T, F) if True, (T, B, F) if False.
        proj_size: P > 0 projects h to width P (LSTMP, ``W_hr`` (H, P)); 0 for none.
        dropout: probability of zeroing each input of layers after the first (as
            ``nn.LSTM`` places it) while the module is in training mode.
        zoneout: p in [0, 1) or a pair (p_h, p_c) (Krueger et al. 2017): in training each
            unit of h (of c) keeps its previous value with probability p_h (p_c), drawn
            per step, h_t = k_t ∘ h_{t-1} + (1 - k_t) ∘ h̃_t; in evaluation
            (``deterministic``) the expectation h_t = p_h h_{t-1} + (1 - p_h) h̃_t.
        recurrent_dropout: Keras's: in training the recurrent input of gate g's product is
            (h_{t-1} ∘ d_g) U_g, d_g (B, R) inverted dropout, one mask per gate, fixed over
            the sequence; off in evaluation.
        input_dropout: in training x_t as gate g's product reads it is x_t ∘ e_g, e_g
            (B, F_in) inverted dropout, one mask per gate, fixed over the sequence.
        dropconnect: in training U ∘ M, M (R, 4H) one inverted-dropout mask per call.
            The four are the functional cell's (``lstm_multi.regularize``, the equations;
            the masks from the ``"dropout"`` stream, gradients through the same masks).
        scheme: the initial parameters: "flax" (the default: Flax's
            ``OptimizedLSTMCell``'s, lecun-normal W, orthogonal U per gate, zero b),
            "uniform" (``nn.LSTM``'s), "keras" or "equinox"; see ``lstm_multi.init``.
        param_dtype: the parameters' dtype; inputs and states must have it too.
        rngs: an ``nnx.Rngs``; ``rngs.params()`` is the key of the initial parameters,
            and with ``dropout`` the module keeps it, as ``nnx.Dropout`` does, to draw
            each training call's masks from its ``"dropout"`` stream.

    ``model.layers[layer][direction][name]`` are ``nnx.Param``; ``model.params`` is the
    canonical pytree of their arrays; ``model.load_params(params)`` sets them.
    """

    def __init__(
        self,
        input_size,
        hidden_size,
        *,
        variant="lstm",
        num_layers=1,
        bidirectional=False,
        batch_first=True,
        proj_size=0,
        dropout=0.0,
        zoneout=0.0,
        recurrent_dropout=0.0,
        input_dropout=0.0,
        dropconnect=0.0,
        scheme="flax",
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.variant = variant
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.batch_first = batch_first
        self.proj_size = proj_size
        self.dropout = dropout
        self.zoneout = regularize.check_zoneout(zoneout)  # (p_h, p_c)
        self.recurrent_dropout = recurrent_dropout
        self.input_dropout = input_dropout
        self.dropconnect = dropconnect
        self.deterministic = False  # model.eval() sets it, as on nnx.Dropout
        functional_cell(self._cell_config())  # checks the arguments above
        self.scheme = init.check_scheme(scheme)
        self.param_dtype = _param_dtype(param_dtype)
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs: expected an nnx.Rngs, got {type(rngs).__name__}")
        params = _draw(self._cell_config(), rngs.params(), self.param_dtype, self.scheme)
        self.rngs = rngs if _random(self) else None
        self.layers = nnx.List(
            [
                nnx.List([nnx.Dict({k: nnx.Param(v) for k, v in p.items()}) for p in layer])
                for layer in params
            ]
        )

    def _cell_config(self):
        return _config(self)

    @property
    def cell(self):
        """The JAX functional cell this module runs (``lstm_multi.get_cell("jax")``)."""
        return functional_cell(self._cell_config())

    @property
    def params(self):
        """The parameters' arrays in the canonical structure ``[layer][direction][name]``."""
        shapes = self.cell.param_shapes()  # for the canonical key order (nnx.Dict sorts)
        return [
            [{k: p[k].get_value() for k in s} for p, s in zip(layer, ls, strict=True)]
            for layer, ls in zip(self.layers, shapes, strict=True)
        ]

    def load_params(self, params):
        """Set every parameter from canonical ones (NumPy or JAX arrays of the module's
        shapes and param_dtype, e.g. ``[[lstm_multi.convert.from_flax(tree)]]``); returns
        the module."""
        arrays = _checked_params(self.cell, params, self.param_dtype)
        for layer, directions in zip(self.layers, arrays, strict=True):
            for p, values in zip(layer, directions, strict=True):
                for key, value in values.items():
                    p[key].set_value(value)
        return self

    def __call__(self, x, state=None, lengths=None, *, mask=None, deterministic=None, rngs=None):
        """Run the network over a sequence: returns ``y, (h_n, c_n)``.

        x: (B, T, input_size) if batch_first else (T, B, input_size); state: ``(h0, c0)``,
        each (L * D, B, H), or None for zeros; lengths: (B,) integers in 1..T, or None
        for full sequences (outputs past a length are zero, h_n and c_n are the states
        at each sequence's last valid step); or mask: (B, T) booleans, True at a real
        step, any pattern (held state and zero output at a masked step; docs/masks.md).
        With ``dropout``, ``zoneout``, ``recurrent_dropout``, ``input_dropout`` or
        ``dropconnect``: ``deterministic`` (default the module's, False until
        ``model.eval()``) says evaluation (no dropout, zoneout's expectation); in training
        the masks come from ``rngs`` (default the module's) ``"dropout"`` stream.
        """
        deterministic = self.deterministic if deterministic is None else deterministic
        key = None
        if _random(self) and not deterministic:
            key = (rngs if rngs is not None else self.rngs).dropout()
        return self.cell(self.params, x, state=state, lengths=lengths, mask=mask, dropout_key=key)

    def step(self, x_t, state=None):
        """One time step of the whole stack: x_t (B, input_size), state ``(h, c)`` each
        (L, B, H) or None; returns ``y_t, (h, c)`` with y_t (B, H). T steps give the
        sequence call's outputs; a bidirectional module has no step (ValueError)."""
        return self.cell.step(self.params, x_t, state)


class LinenLSTM(linen.Module):
    """A multi-layer, optionally bidirectional LSTM of any ``lstm_multi`` variant (Flax Linen).

    The fields are ``LSTM``'s arguments (input_size, hidden_size, variant, num_layers,
    bidirectional, batch_first, proj_size, dropout, zoneout, recurrent_dropout,
    input_dropout, dropconnect, scheme, param_dtype) and ``deterministic`` (as on
    ``linen.Dropout``: with any of the dropouts or zoneout, a field or a call argument
    must say it; a training call needs ``rngs={"dropout": key}``, the masks' key;
    ``deterministic=True`` is evaluation, zoneout's expectation);
    ``module.init(key, x)`` draws the
    parameters from the key's ``"params"`` stream (distinct keys, distinct parameters).
    ``variables["params"]["layers"]`` is the canonical ``[layer][direction][name]`` pytree;
    ``module.variables_from(params)`` builds variables from canonical parameters.
    ``module.apply(variables, x, state=None, lengths=None)`` returns ``y, (h_n, c_n)``;
    ``module.apply(variables, x_t, state, method="step")`` runs one time step.
    """

    input_size: int
    hidden_size: int
    variant: str | spec.Variant = "lstm"
    num_layers: int = 1
    bidirectional: bool = False
    batch_first: bool = True
    proj_size: int = 0
    dropout: float = 0.0
    zoneout: float | tuple[float, float] = 0.0
    recurrent_dropout: float = 0.0
    input_dropout: float = 0.0
    dropconnect: float = 0.0
    deterministic: bool | None = None
    scheme: str = "flax"
    param_dtype: object = jnp.float32

    def __post_init__(self):
        super().__post_init__()
        functional_cell(self._cell_config())  # errors at construction, not at the first apply
        init.check_scheme(self.scheme)
        _param_dtype(self.param_dtype)

    @linen.nowrap
    def _cell_config(self):
        return _config(self)

    @property
    def cell(self):
        """The JAX functional cell this module runs (``lstm_multi.get_cell("jax")``)."""
        return functional_cell(self._cell_config())

    @linen.nowrap
    def variables_from(self, params):
        """``{"params": {"layers": params}}`` for ``apply``, from canonical parameters (NumPy
        or JAX arrays of this module's shapes and param_dtype) as JAX arrays."""
        arrays = _checked_params(self.cell, params, _param_dtype(self.param_dtype))
        return {"params": {"layers": arrays}}

    def setup(self):
        config, dtype = self._cell_config(), _param_dtype(self.param_dtype)
        self.param("layers", lambda key: _draw(config, key, dtype, self.scheme))

    def _params(self):
        # Linen freezes what setup assigns (lists to tuples, dicts to FrozenDict); the
        # variable itself is read back as a plain canonical pytree
        layers = self.get_variable("params", "layers")
        return [[dict(p) for p in directions] for directions in layers]

    def __call__(self, x, state=None, lengths=None, deterministic=None, mask=None):
        """Run the network over a sequence: returns ``y, (h_n, c_n)`` (see ``LSTM.__call__``)."""
        key = None
        if _random(self):
            deterministic = linen.merge_param("deterministic", self.deterministic, deterministic)
            if not deterministic:
                key = self.make_rng("dropout")
        return self.cell(
            self._params(), x, state=state, lengths=lengths, mask=mask, dropout_key=key
        )

    def step(self, x_t, state=None):
        """One time step of the whole stack: returns ``y_t, (h, c)`` (see ``LSTM.step``)."""
        return self.cell.step(self._params(), x_t, state)


class LinenCell(linen.RNNCellBase):
    """One step of one layer of any ``lstm_multi`` variant, as a Flax ``RNNCellBase``: what
    ``nn.LSTMCell`` / ``nn.OptimizedLSTMCell`` are, so ``nn.RNN``, ``nn.Bidirectional``,
    ``nn.scan`` and your own loops take it, peepholes included.

    ``cell.apply(variables, carry, x_t)`` returns ``((c, h), h)`` with Flax's carry order
    (c first); x_t (..., input features), any leading batch axes; h (..., features), or
    (..., proj_size) with a projection. The step is ``lstm_multi.step.step_forward`` (the
    spec's generated gate math) and JAX differentiates it. The parameters are one canonical
    layer-direction dict, ``variables["params"]["lstm"] = {"W", "U", "b", ...}``, drawn from
    the ``"params"`` key as ``cell.init(seed=key)`` draws them (``scheme``), so
    ``[[variables["params"]["lstm"]]]`` is a one-layer functional cell's ``params``.
    """

    features: int
    variant: str | spec.Variant = "lstm"
    proj_size: int = 0
    scheme: str = "flax"
    param_dtype: object = jnp.float32

    def __post_init__(self):
        super().__post_init__()
        validation.check_positive_int("features", self.features)
        spec.get_variant(self.variant)
        validation.check_proj_size(self.proj_size, self.features)
        init.check_scheme(self.scheme)
        _param_dtype(self.param_dtype)

    @linen.compact
    def __call__(self, carry, inputs):
        c, h = carry
        config = dict(
            input_size=int(inputs.shape[-1]),
            hidden_size=self.features,
            variant=self.variant,
            num_layers=1,
            bidirectional=False,
            batch_first=True,
            proj_size=self.proj_size,
            dropout=0.0,
        )
        dtype, scheme = _param_dtype(self.param_dtype), self.scheme
        p = self.param("lstm", lambda key: _draw(config, key, dtype, scheme)[0][0])
        variant = spec.get_variant(self.variant)
        h, c = network.layer_step(jax_backend.OPS, variant, dict(p), inputs, h, c)
        return (c, h), h

    @linen.nowrap
    def initialize_carry(self, rng, input_shape):
        """Zeros ``(c, h)`` for inputs of ``input_shape`` (batch axes, then features)."""
        batch = tuple(input_shape[:-1])
        dtype = _param_dtype(self.param_dtype)
        c = jnp.zeros((*batch, self.features), dtype)
        h = jnp.zeros((*batch, self.proj_size or self.features), dtype)
        return c, h

    @property
    def num_feature_axes(self):
        return 1
