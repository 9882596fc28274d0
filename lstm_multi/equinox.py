"""``equinox.Module`` layer: ``LSTM``, the JAX functional cell with its parameters as fields.

Equinox keeps parameters in the module itself (a pytree), so this layer is thin:
its one array field ``params`` is the canonical ``params[layer][direction] =
{"W", "U", "b", ...}`` of JAX arrays, its configuration is static, and its
calls are the functional cell's (``lstm_multi.get_cell("jax")``: the spec in
``lax.scan``, gradients by the derived BPTT). So ``eqx.filter_jit``,
``eqx.filter_grad``, ``jax.vmap``, optax and ``eqx.tree_serialise_leaves``
work on it as on Equinox's own layers, and every variant runs::

    model = LSTM(3, 5, variant="peephole", num_layers=2, key=jax.random.key(0))
    y, (h_n, c_n) = model(x)  # x (B, T, 3), or (T, 3) unbatched

As Equinox's layers do, ``__call__`` also takes one sequence with the batch axis
left out, so ``jax.vmap(model)(xs)`` works; unlike them it takes a batch too,
which runs the batched scan directly.

``LSTM.from_params`` and ``.params`` move canonical parameters in and out
(from any backend via ``cell.to_numpy``), ``LSTM.from_equinox`` takes trained
``eqx.nn.LSTMCell`` weights and ``to_equinox`` gives them back.
"""

from __future__ import annotations

try:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
except ModuleNotFoundError as error:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        f"lstm_multi.equinox needs {error.name}, which is not installed: "
        "pip install 'lstm_multi[equinox]'"
    ) from error


import numpy as np

from . import convert, init, network, spec, validation
from .backends.jax_backend import OPS, x64_enabled
from .backends.jax_backend import Cell as _JaxCell
from .registry import shared_cell

__all__ = ["LSTM", "LSTMCell"]

#: the constructor arguments forwarded to the functional cell, in its order; each is also a
#: static field of ``LSTM`` holding the cell's checked value
CELL_ARGUMENTS = (
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

#: the regularizers inside the time loop (``lstm_multi.regularize``): a call without
#: ``inference`` and without a key is refused where one of them is on
REGULARIZERS = ("zoneout", "recurrent_dropout", "input_dropout", "dropconnect")


def _checked_key(key):
    """A JAX PRNG key -> the integer seed ``cell.init`` draws from; TypeError otherwise."""
    if key is None:
        raise TypeError(
            "key: expected a JAX PRNG key (jax.random.key(n)), got None; like Equinox's own "
            "layers, LSTM takes its randomness as key=..."
        )
    if type(key).__module__.split(".")[0] not in ("jax", "jaxlib"):
        raise TypeError(
            f"key: expected a JAX PRNG key (jax.random.key(n) or jax.random.PRNGKey(n)), "
            f"got {type(key).__name__}"
        )
    try:
        return init.seed_from(key, "key")
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError) as error:
        raise TypeError(
            "key: expected a concrete JAX PRNG key, got a traced one (inside jax.jit, jax.vmap "
            "or eqx.filter_vmap); the parameters are drawn by NumPy from the key's value, so "
            "build each model outside the transformation (stack them for an ensemble: "
            "jax.tree.map(lambda *a: jnp.stack(a), *models))"
        ) from error


class LSTM(eqx.Module):
    r"""A multi-layer, optionally bidirectional LSTM (any ``lstm_multi`` variant) as an
    ``equinox.Module``.

    Arguments:
        input_size: features of x.
        hidden_size: H, the width of h and c.
        variant: "lstm", "peephole", "peephole_full", Greff et al.'s "nig" ... "cifg", or
            a ``lstm_multi.Variant`` (see the README's table).
        num_layers: stacked layers; layer k > 0 reads the outputs of layer k - 1.
        bidirectional: add a direction that reads each sequence reversed (D = 2).
        batch_first: batched x and y are (B, T, F) if True, (T, B, F) if False.
        proj_size: P > 0 projects h to width P (LSTMP; ``W_hr`` (H, P) per layer and
            direction, h states (L * D, B, P)); 0, the default, for none.
        dropout: probability of zeroing each input of layers after the first (as
            ``nn.LSTM`` places it), in calls given a ``key``.
        zoneout: p in [0, 1) or a pair (p_h, p_c) (Krueger et al. 2017): in training each
            unit of h (of c) keeps its previous value with probability p_h (p_c), drawn
            per step, h_t = k_t ∘ h_{t-1} + (1 - k_t) ∘ h̃_t; in inference the
            expectation h_t = p_h h_{t-1} + (1 - p_h) h̃_t.
        recurrent_dropout: Keras's: in training the recurrent input of gate g's product is
            (h_{t-1} ∘ d_g) U_g, d_g (B, R) inverted dropout, one mask per gate, fixed over
            the sequence; off in inference.
        input_dropout: in training x_t as gate g's product reads it is x_t ∘ e_g, e_g
            (B, F_in) inverted dropout, one mask per gate, fixed over the sequence.
        dropconnect: in training U ∘ M, M (R, 4H) one inverted-dropout mask per call.
            The four are the functional cell's (``lstm_multi.regularize``: the equations;
            masks from the call's ``key``, gradients through the same masks). With any of
            them a call is training unless it says ``inference=True``, and a training
            call needs ``key=`` (as ``eqx.nn.Dropout``: a RuntimeError without).
        scheme: "equinox" (the default: ``eqx.nn.LSTMCell``'s U(-1/sqrt(H), 1/sqrt(H))
            for every entry, the same numbers as "uniform"), "keras" (glorot W,
            orthogonal U, forget bias 1, zero peepholes) or "flax"; see
            ``lstm_multi.init``.
        dtype: the parameters' floating dtype (float64 needs JAX's 64-bit mode).
        key: a JAX PRNG key (``jax.random.key(n)``), required and keyword-only, as in
            Equinox's layers; the same key gives the same parameters, different keys
            different ones (on every backend: ``cell.init(seed=key)`` draws the same).

    Fields: ``params``, the canonical ``params[layer][direction] = {"W": (in, 4H),
    "U": (H, 4H), "b": (4H,), ...}`` (the variant's extras such as ``"p"`` too), the
    only arrays of the module (so ``jax.grad`` and ``jax.tree.map`` take it as they take
    its arrays); the configuration above is static. Hence no ``inference`` field:
    ``eqx.nn.inference_mode`` leaves this layer as it is, and evaluation is the call's
    ``inference=True``.
    """

    params: list
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    variant: spec.Variant = eqx.field(static=True)
    num_layers: int = eqx.field(static=True)
    bidirectional: bool = eqx.field(static=True)
    batch_first: bool = eqx.field(static=True)
    proj_size: int = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    zoneout: tuple[float, float] = eqx.field(static=True)
    recurrent_dropout: float = eqx.field(static=True)
    input_dropout: float = eqx.field(static=True)
    dropconnect: float = eqx.field(static=True)

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
        scheme="equinox",
        dtype=jnp.float32,
        key=None,
    ):
        cell = _JaxCell(
            input_size,
            hidden_size,
            variant=variant,
            num_layers=num_layers,
            bidirectional=bidirectional,
            batch_first=batch_first,
            proj_size=proj_size,
            dropout=dropout,
            zoneout=zoneout,
            recurrent_dropout=recurrent_dropout,
            input_dropout=input_dropout,
            dropconnect=dropconnect,
        )
        seed = _checked_key(key)
        for name in CELL_ARGUMENTS:
            setattr(self, name, getattr(cell, name))
        self.params = cell.init(seed=seed, dtype=dtype, scheme=scheme)

    # the functional cell -----------------------------------------------------------

    def cell_arguments(self):
        """The functional cell's constructor arguments: ``get_cell("jax")(**these)``."""
        return {name: getattr(self, name) for name in CELL_ARGUMENTS}

    @property
    def cell(self):
        """The JAX functional cell this module runs (shared by modules of one configuration)."""
        return shared_cell("jax", **self.cell_arguments())

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    # running ------------------------------------------------------------------------

    def __call__(self, x, state=None, lengths=None, *, mask=None, key=None, inference=False):
        """Run the network over whole sequences.

        Arguments:
            x: (B, T, input_size) if ``batch_first`` else (T, B, input_size); or one
                sequence, (T, input_size), with the batch axis left out (then
                ``jax.vmap(model)(xs)`` maps it over a batch).
            state: ``(h0, c0)``, each (L * D, B, H), or (L * D, H) for one sequence; None
                for zeros (h0 of width P with a projection).
            lengths: (B,) integers in 1..T (a list or any integer array; each sequence runs
                over its first ``lengths[n]`` steps), or one integer for one sequence; None
                for full sequences.
            mask: instead of lengths, (B, T) booleans, True at a real step, any pattern
                (left padding, gaps; h and c held and the output zero at a masked
                step; docs/masks.md), or (T,) for one sequence.
            key: the masks' randomness (a JAX key) in training: with ``zoneout``,
                ``recurrent_dropout``, ``input_dropout`` or ``dropconnect`` a training
                call needs one (RuntimeError without, as ``eqx.nn.Dropout``); with
                ``dropout`` alone None runs without dropout. Under ``jax.vmap`` of
                one-sequence calls, map over split keys (``in_axes``) or every sequence
                gets the same masks.
            inference: True runs evaluation (no dropout, zoneout's expectation; a key is
                ignored); False (the default) training, as on ``eqx.nn.Dropout``.

        Returns:
            ``y, (h_n, c_n)``: y (B, T, D * H) (or (T, B, D * H), or (T, D * H) for one
            sequence), zero past each length; h_n and c_n shaped like the state, each
            sequence's state at its last valid step. Exactly the functional cell's
            ``cell(params, x, state, lengths)``.
        """
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"x: expected an array, got {type(x).__name__}")
        key = self._training_key(key, inference)
        if len(x.shape) == 3:
            return self.cell(
                self.params, x, state=state, lengths=lengths, mask=mask, dropout_key=key
            )
        if len(x.shape) != 2:
            layout = "(batch, time, input_size)" if self.batch_first else "(time, batch, ...)"
            raise ValueError(
                f"x: expected a 3-d array {layout} or one sequence (time, input_size), "
                f"got shape {tuple(x.shape)}"
            )
        self._check_unbatched("x", x, "(time, input_size)")
        batch_axis = 0 if self.batch_first else 1
        state = self._batched_state(state, x)
        if lengths is not None:
            lengths = self._one_length(lengths)
        if mask is not None:
            mask = self._one_mask(mask, x.shape[0])
        y, (h_n, c_n) = self.cell(
            self.params,
            jnp.expand_dims(x, batch_axis),
            state=state,
            lengths=lengths,
            mask=mask,
            dropout_key=key,
        )
        return jnp.squeeze(y, batch_axis), (h_n[:, 0], c_n[:, 0])

    def _training_key(self, key, inference):
        """The call's ``dropout_key``: None in inference, else ``key`` (refused as None
        where a regularizer inside the loop is on)."""
        if validation.check_bool("inference", inference):
            return None
        on = [name for name in REGULARIZERS if any(np.atleast_1d(getattr(self, name)))]
        if key is None and on:
            raise RuntimeError(
                f"key: a training call of an LSTM with {', '.join(on)} needs a JAX key "
                "(model(x, key=jax.random.key(n))) to draw its masks; for evaluation "
                "pass inference=True"
            )
        return key

    def step(self, x_t, state=None):
        """One time step of the whole stack (unidirectional only): returns ``y_t, (h, c)``.

        x_t: (B, input_size), or (input_size,) for one sequence; state: ``(h, c)``, each
        (L, B, H) (or (L, H)), or None for zeros. y_t (B, H) (or (H,)) is the last
        layer's h. T steps give the sequence call's outputs and final state
        (``cell.step``).
        """
        if not hasattr(x_t, "shape") or not hasattr(x_t, "dtype") or len(x_t.shape) != 1:
            return self.cell.step(self.params, x_t, state)
        self._check_unbatched("x_t", x_t, "(input_size,)")
        y_t, (h, c) = self.cell.step(self.params, x_t[None], self._batched_state(state, x_t))
        return y_t[0], (h[:, 0], c[:, 0])

    def _check_unbatched(self, name, x, layout):
        if x.shape[-1] != self.input_size or 0 in x.shape:
            raise ValueError(
                f"{name}: expected one sequence {layout} with input_size {self.input_size} on "
                f"the last axis, got shape {tuple(x.shape)}"
            )

    def _batched_state(self, state, x):
        """An unbatched state (each (L * D, H)) with a batch axis of one, checked first."""
        if state is None:
            return None
        shapes = [(s[0], *s[2:]) for s in self.cell.state_shapes(batch=1)]
        validation.check_state(OPS, state, shapes, OPS.dtype_name(x))
        return tuple(s[:, None] for s in state)

    @staticmethod
    def _one_mask(mask, steps):
        """One sequence's (T,) mask -> (1, T)."""
        shape = getattr(mask, "shape", None)
        if shape is None or tuple(shape) != (steps,):
            got = f"shape {tuple(shape)}" if shape is not None else type(mask).__name__
            raise ValueError(f"mask: expected shape ({steps},) (time) for one sequence, got {got}")
        return jnp.reshape(mask, (1, steps))

    @staticmethod
    def _one_length(lengths):
        if isinstance(lengths, int) and not isinstance(lengths, bool):
            return [lengths]
        if not hasattr(lengths, "shape") or tuple(lengths.shape) != ():
            shape = getattr(lengths, "shape", None)
            got = f"shape {tuple(shape)}" if shape is not None else type(lengths).__name__
            raise ValueError(
                f"lengths: expected one integer for one sequence (time, input_size), got {got}"
            )
        return jnp.reshape(lengths, (1,))

    # canonical parameters and other frameworks' weights -----------------------------

    @classmethod
    def from_params(
        cls,
        params,
        *,
        variant="lstm",
        batch_first=True,
        dropout=0.0,
        zoneout=0.0,
        recurrent_dropout=0.0,
        input_dropout=0.0,
        dropconnect=0.0,
    ):
        """A module holding the canonical ``params[layer][direction]`` (NumPy or JAX
        arrays of one floating dtype, e.g. ``cell.to_numpy(...)`` of any backend), with
        the rates given (see ``LSTM``).

        Sizes, layers, directions and the projection (``W_hr``) are read from the
        shapes; ``variant`` must be the
        one the parameters were made for (its extras, such as ``"p"``, must be there).
        """
        if not (
            isinstance(params, (list, tuple))
            and params
            and isinstance(params[0], (list, tuple))
            and len(params[0]) in (1, 2)
            and isinstance(params[0][0], dict)
            and all(len(getattr(params[0][0].get(k), "shape", ())) == 2 for k in ("W", "U"))
        ):
            raise ValueError(
                "params: expected params[layer][direction] = {'W', 'U', 'b', ...} (a list of "
                f"layers, each a list of 1 or 2 dicts of arrays), got {type(params).__name__}"
            )
        first = params[0][0]
        dtype = OPS.dtype_name(first["W"])
        cell = _JaxCell(
            first["W"].shape[0],
            first["U"].shape[1] // 4,
            variant=variant,
            num_layers=len(params),
            bidirectional=len(params[0]) == 2,
            batch_first=batch_first,
            proj_size=first[spec.PROJECTION].shape[1] if spec.PROJECTION in first else 0,
            dropout=dropout,
            zoneout=zoneout,
            recurrent_dropout=recurrent_dropout,
            input_dropout=input_dropout,
            dropconnect=dropconnect,
        )
        validation.check_params(OPS, params, cell.param_shapes(), dtype)
        arrays = cell.from_numpy(params)  # JAX arrays of the same values
        arguments = {name: getattr(cell, name) for name in CELL_ARGUMENTS}
        module = cls(**arguments, dtype=dtype, key=jax.random.key(0))
        return eqx.tree_at(lambda m: m.params, module, arrays)

    @classmethod
    def from_equinox(cls, cells, *, variant="lstm", batch_first=True):
        """A module computing what trained ``eqx.nn.LSTMCell`` s compute.

        ``cells``: one cell, or a list with one entry per layer, each a cell or a
        ``(forward, reverse)`` pair (bidirectional). The cells compute the "lstm"
        variant; a variant that extends it ("peephole", ...) starts with its extras at
        zero, so it computes the same until trained. Weights map as
        ``convert.from_equinox``: W = weight_ih^T, U = weight_hh^T, b = bias.
        """
        target = spec.get_variant(variant)
        if not target.extends_lstm:
            raise ValueError(
                f"variant: eqx.nn.LSTMCell computes the 'lstm' variant, and {target.name!r} "
                "does not compute it from its weights (expected 'lstm' or a variant that "
                "extends it, such as 'peephole')"
            )
        layers = cells if isinstance(cells, (list, tuple)) else [cells]
        layers = [list(e) if isinstance(e, (list, tuple)) else [e] for e in layers]
        if not layers or any(len(e) != len(layers[0]) or len(e) not in (1, 2) for e in layers):
            raise ValueError(
                "cells: expected a cell, or one entry per layer, every entry a cell or every "
                f"entry a (forward, reverse) pair, got {[len(e) for e in layers]} cells per layer"
            )
        params = []
        for layer in layers:
            directions = []
            for cell in layer:
                p = convert.from_equinox(cell)
                hidden = p["U"].shape[0]
                for k, shape in target.extra_param_shapes(hidden).items():
                    p[k] = np.zeros(shape, p["W"].dtype)
                directions.append(p)
            params.append(directions)
        return cls.from_params(params, variant=target, batch_first=batch_first)

    def to_equinox(self):
        """The weights as ``eqx.nn.LSTMCell`` s, ``cells[layer][direction]`` (a variant
        computing "lstm", ``spec.computes_lstm``, without a projection: the cell has no
        other)."""
        if not spec.computes_lstm(self.variant):
            raise ValueError(
                f"variant: eqx.nn.LSTMCell computes the 'lstm' variant only, this module is "
                f"{self.variant.name!r}, which computes something else"
            )
        if self.proj_size:
            raise ValueError(
                f"proj_size: eqx.nn.LSTMCell has no projection (W_hr), this module has "
                f"proj_size={self.proj_size}"
            )
        return [
            [
                convert.to_equinox(
                    p,
                    eqx.nn.LSTMCell(
                        p["W"].shape[0], self.hidden_size, dtype=p["W"].dtype, key=jax.random.key(0)
                    ),
                )
                for p in layer
            ]
            for layer in self.params
        ]


class LSTMCell(eqx.Module):
    """One step of one layer of any ``lstm_multi`` variant, with ``eqx.nn.LSTMCell``'s
    interface: ``cell(x_t, (h, c)) -> (h, c)``, x_t (input_size,) and h, c (H,) (any
    leading axes work too), for your own ``lax.scan`` or per-token loop.

    Arguments as ``eqx.nn.LSTMCell``'s (input_size, hidden_size, use_bias, dtype, a
    required keyword ``key``), plus ``variant``, ``proj_size`` and ``scheme`` (default
    "equinox": ``eqx.nn.LSTMCell``'s draw). ``dtype=None``, the default, is Equinox's:
    float64 in JAX's 64-bit mode, float32 otherwise, so that swapping this cell for
    ``eqx.nn.LSTMCell`` keeps a program's precision. Its attributes are ``eqx.nn.LSTMCell``'s too:
    ``input_size``, ``hidden_size``, ``use_bias``, and ``weight_ih`` (4H, in),
    ``weight_hh`` (4H, H) and ``bias`` (4H,) as views of the canonical parameters, so code
    written against Equinox's cell reads them. ``params`` is one canonical layer-direction dict ``{"W", "U",
    "b", ...}`` (``[[cell.params]]`` is a one-layer functional cell's parameters), drawn
    as ``cell.init(seed=key)`` draws them. The step is ``lstm_multi.step.step_forward``
    and JAX differentiates it; with ``proj_size`` h is (proj_size,).
    """

    params: dict
    variant: spec.Variant = eqx.field(static=True)
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)

    def __init__(
        self,
        input_size,
        hidden_size,
        use_bias=True,
        dtype=None,
        *,
        variant="lstm",
        proj_size=0,
        scheme="equinox",
        key=None,
    ):
        cell = _JaxCell(input_size, hidden_size, variant=variant, proj_size=proj_size)
        if dtype is None:  # eqx.nn.LSTMCell's default_floating_dtype()
            dtype = jnp.float64 if x64_enabled() else jnp.float32
        self.variant = cell.variant
        self.input_size, self.hidden_size = cell.input_size, cell.hidden_size
        self.use_bias = validation.check_bool("use_bias", use_bias)
        params = cell.init(seed=_checked_key(key), dtype=dtype, scheme=scheme)[0][0]
        if not self.use_bias:
            params["b"] = jnp.zeros_like(params["b"])
        self.params = params

    # eqx.nn.LSTMCell's attributes, as views of the canonical parameters
    @property
    def weight_ih(self):
        """(4H, input_size): ``W`` transposed, gate blocks in the order (i, f, g, o), as
        ``eqx.nn.LSTMCell.weight_ih``."""
        return self.params["W"].T

    @property
    def weight_hh(self):
        """(4H, H) (or (4H, proj_size) with a projection): ``U`` transposed, as
        ``eqx.nn.LSTMCell.weight_hh``."""
        return self.params["U"].T

    @property
    def bias(self):
        """(4H,): ``b``, as ``eqx.nn.LSTMCell.bias``; None with ``use_bias=False``."""
        return self.params["b"] if self.use_bias else None

    def __call__(self, input, hidden, *, key=None):
        """``(h, c)`` after one step from ``hidden = (h, c)``; ``key`` is unused (as in
        ``eqx.nn.LSTMCell``). With ``use_bias=False`` the bias is held at zero (no
        gradient reaches it)."""
        h, c = hidden
        params = self.params
        if not self.use_bias:
            params = {**params, "b": jax.lax.stop_gradient(jnp.zeros_like(params["b"]))}
        return network.layer_step(OPS, self.variant, params, input, h, c)
