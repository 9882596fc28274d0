"""The functional LSTM cell every backend exposes.

A backend subclasses ``FunctionalCell`` and gives its ``ops``, its array
conversion, and ``_forward`` / ``_vjp`` (the time loop and how gradients are
taken). Everything else, the constructor, the canonical parameters, checking
and converting inputs and the batch/time layout, is here, once.

Shapes (B batch, T time, H hidden_size, L num_layers, D 1 or 2 directions)::

    x        (B, T, input_size) if batch_first else (T, B, input_size)
    y        (B, T, D * H)      if batch_first else (T, B, D * H)
    h0, c0, h_n, c_n   (L * D, B, H)
    lengths  (B,) integers in 1..T, or None for full sequences
    mask     (B, T) booleans (whatever batch_first), True where the step is real, or
             None; instead of lengths, for any pattern (left padding, gaps, rows
             with no real step): at a masked step h and c are held and y is zero
    params[layer][direction] = {"W": (in, 4H), "U": (H, 4H), "b": (4H,), ...}

With a projection (``proj_size`` P > 0, the LSTMP of Sak et al. 2014) h is
projected: y (.., D * P), h0 and h_n (L * D, B, P), c0 and c_n still
(L * D, B, H); U is (P, 4H) and each layer-direction adds ``W_hr`` (H, P).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import engine as engines
from . import init, network, regularize, spec, validation
from .ops import ArrayModuleOps

_NUMPY_OPS = ArrayModuleOps(np)

#: ``params[layer][direction][name]``: the canonical parameters, arrays of any backend
Params = list[list[dict[str, Any]]]


class FunctionalCell:
    """A multi-layer, optionally bidirectional LSTM as pure functions of its parameters.

    Arguments:
        input_size: features of x.
        hidden_size: H, the width of h and c.
        variant: "lstm", "peephole" or "peephole_full" (see ``lstm_multi.spec``).
        num_layers: stacked layers; layer k > 0 reads the outputs of layer k - 1.
        bidirectional: add a direction that reads each sequence reversed.
        batch_first: x and y are (B, T, F) if True, (T, B, F) if False.
        proj_size: P > 0 projects each step's output, h_t = (the gate math's
            h) W_hr, with W_hr (H, P); the recurrence and the next layer read
            the projected h (``torch.nn.LSTM(proj_size=P)``'s LSTMP, for every
            variant). 0 (the default): no projection. Must be below H.
        dropout: the probability of zeroing each input of every layer after
            the first, as ``torch.nn.LSTM(dropout=...)`` places it (inverted
            dropout: kept entries are scaled by 1 / (1 - dropout)). It applies
            only to calls given a ``dropout_key`` (training); calls without one
            run the network as in evaluation.
        engine: what runs each direction's time loop, a name from
            ``lstm_multi.engines.engine_names(backend)``; "auto" (the default) lets the
            engine table choose per call (``explain(x)`` says which and why,
            ``last_choice`` holds the last call's).
        zoneout: p in [0, 1), or a pair (p_h, p_c): in a training call (one given a
            ``dropout_key``) each unit of h (of c) keeps its previous value with
            probability p_h (p_c), drawn per step (Krueger et al. 2017); in other calls
            the expectation, h_t = p_h h_{t-1} + (1 - p_h) h̃_t (c likewise). The
            output is the zoned h. haste's ``zoneout=p`` zones h only: ``(p, 0.0)``.
        recurrent_dropout: Keras's: in a training call, the recurrent input of each
            gate's product multiplied by its own inverted-dropout mask (B, R), drawn
            once per call and fixed over the sequence (Gal & Ghahramani 2016).
        input_dropout: in a training call, each layer-direction's input x_t as each
            gate's product reads it multiplied by that gate's own inverted-dropout mask
            (B, F_in), drawn once per call and fixed over the sequence:
            zx_t = concat_g((x_t ∘ e_g) W_g) + b (Gal & Ghahramani's variational
            dropout on the input; Keras's ``dropout`` as ``recurrent_dropout`` runs it,
            four masks). Every layer's input, the first layer's x and the others'.
        dropconnect: in a training call, U multiplied by one inverted-dropout mask per
            layer-direction and call (haste's ``dropout``, Wan et al. 2013).
            See ``lstm_multi.regularize`` for the equations; zoneout, recurrent and
            input dropout run on the array engines (numpy, torch "array", jax "scan"),
            DropConnect on every engine.

    ``cell(params, x, state=None, lengths=None, mask=None)`` returns ``y, (h_n, c_n)``;
    ``cell.vjp(params, x, dy, ...)`` returns the gradients of
    ``sum(y * dy) + sum(h_n * dh_n) + sum(c_n * dc_n)``.
    """

    backend = ""
    ops = _NUMPY_OPS

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        variant: str | spec.Variant = "lstm",
        num_layers: int = 1,
        bidirectional: bool = False,
        batch_first: bool = True,
        proj_size: int = 0,
        dropout: float = 0.0,
        engine: str = "auto",
        *,
        zoneout: float | tuple[float, float] = 0.0,
        recurrent_dropout: float = 0.0,
        dropconnect: float = 0.0,
        input_dropout: float = 0.0,
    ):
        self.input_size = validation.check_positive_int("input_size", input_size)
        self.hidden_size = validation.check_positive_int("hidden_size", hidden_size)
        self.num_layers = validation.check_positive_int("num_layers", num_layers)
        self.bidirectional = validation.check_bool("bidirectional", bidirectional)
        self.batch_first = validation.check_bool("batch_first", batch_first)
        self.variant = spec.get_variant(variant)
        self.proj_size = validation.check_proj_size(proj_size, self.hidden_size)
        self.dropout = validation.check_dropout(dropout, self.num_layers)
        self.engine = engines.check_engine(self.backend, engine)
        #: (p_h, p_c): zoneout's probabilities of keeping h's and c's previous values
        self.zoneout = regularize.check_zoneout(zoneout)
        self.recurrent_dropout = regularize.check_rate("recurrent_dropout", recurrent_dropout)
        self.dropconnect = regularize.check_rate("dropconnect", dropconnect)
        self.input_dropout = regularize.check_rate("input_dropout", input_dropout)
        #: the ``engines.Choice`` of the most recent call (None before the first)
        self.last_choice = None

    def __repr__(self):
        projection = f", proj_size={self.proj_size}" if self.proj_size else ""
        projection += f", dropout={self.dropout}" if self.dropout else ""
        projection += f", zoneout={self.zoneout}" if any(self.zoneout) else ""
        for name in ("recurrent_dropout", "dropconnect", "input_dropout"):
            projection += f", {name}={getattr(self, name)}" if getattr(self, name) else ""
        return (
            f"{type(self).__name__}(input_size={self.input_size}, hidden_size={self.hidden_size}, "
            f"variant={self.variant.name!r}, num_layers={self.num_layers}, "
            f"bidirectional={self.bidirectional}, batch_first={self.batch_first}{projection})"
        )

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    @property
    def output_size(self):
        """Width of h and of each direction's output: P with a projection, else H."""
        return spec.output_size(self.hidden_size, self.proj_size)

    def param_shapes(self) -> list[list[dict[str, tuple[int, ...]]]]:
        """Canonical shapes: ``shapes[layer][direction] = {"W": ..., "U": ..., "b": ...}``."""
        return spec.network_param_shapes(
            self.variant,
            self.input_size,
            self.hidden_size,
            self.num_layers,
            self.num_directions,
            self.proj_size,
        )

    def state_shapes(self, batch: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Shapes of (h, c): (L * D, B, P or H) and (L * D, B, H)."""
        layers = self.num_layers * self.num_directions
        return (layers, batch, self.output_size), (layers, batch, self.hidden_size)

    def state_shape(self, batch: int) -> tuple[int, int, int]:
        """The one shape of h and c, (L * D, B, H), where they share it (no projection)."""
        h_shape, c_shape = self.state_shapes(batch)
        if h_shape != c_shape:
            raise ValueError(
                f"state_shape: with proj_size={self.proj_size} h is {h_shape} and c is "
                f"{c_shape}; use state_shapes(batch)"
            )
        return c_shape

    # parameters ---------------------------------------------------------------

    def init(self, seed: Any = 0, dtype: Any = "float32", scheme: str = "uniform") -> Params:
        """Fresh parameters; the same seed gives the same numbers on every backend.

        seed: a non-negative integer, a ``numpy.random.Generator``, a
        ``torch.Generator`` or a JAX PRNG key (``jax.random.key(n)``); a
        generator advances, and different keys give different parameters.
        dtype: a name ("float32"), a NumPy or JAX dtype (``np.float64``,
        ``jnp.bfloat16``) or a ``torch.dtype``. scheme: "uniform" (``nn.LSTM``'s,
        U(-1/sqrt(H), 1/sqrt(H)) everywhere), "keras" (Keras's ``LSTM``:
        glorot-uniform W, orthogonal U, forget-gate bias 1, zero peepholes),
        "flax" (Flax's ``OptimizedLSTMCell``: lecun-normal W, orthogonal U per
        gate, zero b) or "equinox" (``eqx.nn.LSTMCell``'s, the same as
        "uniform"); see ``lstm_multi.init``.
        """
        seed = init.seed_from(seed)
        scheme = init.check_scheme(scheme)
        dtype = validation.dtype_name("dtype", dtype)
        self._check_dtype_supported("dtype", dtype)
        np_dtype = "float32" if dtype == "bfloat16" else dtype  # NumPy has no bfloat16
        np_params = init.init_params(
            self.variant,
            self.input_size,
            self.hidden_size,
            self.num_layers,
            self.num_directions,
            seed,
            np_dtype,
            scheme,
            self.proj_size,
        )
        params = self.from_numpy(np_params)
        return params if dtype == np_dtype else self._cast(params, dtype)

    def from_numpy(self, np_params: Params) -> Params:
        """Canonical NumPy parameters -> this backend's arrays (same structure)."""
        validation.check_params(_NUMPY_OPS, np_params, self.param_shapes())
        return self._map(lambda name, a: self._to_backend(np.asarray(a), name), np_params)

    def to_numpy(self, params: Params) -> Params:
        """This backend's parameters -> canonical NumPy arrays."""
        validation.check_params(self.ops, params, self.param_shapes())
        return self._map(lambda name, a: self.ops.to_numpy(a), params)

    def _map(self, fn, params):
        return [
            [
                {k: fn(f"params[{l}][{d}][{k!r}]", v) for k, v in p.items()}
                for d, p in enumerate(layer)
            ]
            for l, layer in enumerate(params)
        ]

    def _cast(self, params, dtype):
        return self._map(lambda name, a: self.ops.astype(a, dtype), params)

    # engines ------------------------------------------------------------------

    def explain(self, x, *, dropout_key=None, mask=None) -> engines.Choice:
        """The engine a call on ``x`` would run, and why, without running it.

        Returns an ``lstm_multi.engines.Choice``: ``.engine`` (its name), ``.reason``,
        and ``.passed_over``, the engines tried before it with why each could not
        run (``print`` shows them). ``dropout_key``, ``mask``: as the call would be given.
        """
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"x: expected an array, got {type(x).__name__}")
        x = self._to_backend(x, "x")
        masks = dropout_key is not None and bool(self.dropout) and self.num_layers > 1
        regularized = self._has_step_masks(dropout_key is not None)
        if mask is None:
            return self._choose(x, masks, step_masks=regularized)
        batch_first = self.batch_first and len(x.shape) == 3
        steps, batch = (x.shape[1], x.shape[0]) if batch_first else (x.shape[0], x.shape[1])
        steps_mask = self._prepare_mask(mask, steps, batch, x)
        return self._choose(x, masks, network.is_step_mask(steps_mask), regularized)

    def _has_step_masks(self, training):
        """Whether a call runs zoneout, recurrent or input dropout in its time loop."""
        return any(self.zoneout) or (
            training and bool(self.recurrent_dropout or self.input_dropout)
        )

    def _choose(self, x, layer_masks=False, step_mask=False, step_masks=False) -> engines.Choice:
        """``engines.select_engine`` for a call on x (``layer_masks``: with dropout masks;
        ``step_mask``: with a per-step mask that is not right padding; ``step_masks``:
        with zoneout or recurrent dropout)."""
        case = engines.Case(
            self.backend,
            self._device_type(x),
            self.ops.dtype_name(x),
            self.variant,
            self.hidden_size,
            self.proj_size,
            layer_masks=layer_masks,
            step_mask=step_mask,
            step_masks=step_masks,
        )
        return engines.select_engine(case, self.engine)

    def _device_type(self, x) -> str:
        """The device type of x's memory ("cpu", "cuda", ...)."""
        return "cpu"

    # running ------------------------------------------------------------------

    def __call__(
        self,
        params: Params,
        x: Any,
        state: tuple[Any, Any] | None = None,
        lengths: Any = None,
        *,
        mask: Any = None,
        dropout_key: Any = None,
    ) -> tuple[Any, tuple[Any, Any]]:
        """Run the network: returns ``y, (h_n, c_n)``.

        lengths: (B,) integers in 1..T, sequence n being its first lengths[n] steps;
        or mask: (B, T) booleans (whatever batch_first), True where a step is real,
        any pattern. At a step past the length or masked, h and c are held (carried
        unchanged) and the output is zero; the reverse direction reads the real
        steps in reverse order. At most one of the two; None: every step is real.
        dropout_key: with a cell built with ``dropout`` > 0, the randomness of
        this call's dropout masks between layers: an int seed, a NumPy or torch
        generator, or a JAX key (a JAX key or int on the JAX backend, traceable
        under ``jit``). The same int or key gives the same masks, so ``vjp``
        with it differentiates the same network; a generator advances. None
        (the default): no dropout.
        """
        params, x, h0, c0, lengths = self._prepare(params, x, state, lengths, mask=mask)
        masks = self._layer_masks(dropout_key, x)
        step_masks, u_masks = self._regularizers(dropout_key, x)
        params = _drop_connect(params, u_masks)
        if step_masks is None:
            y, h_n, c_n = self._forward(params, x, h0, c0, lengths, masks)
        else:
            y, h_n, c_n = self._forward(params, x, h0, c0, lengths, masks, step_masks=step_masks)
        return self._from_time_major(y), (h_n, c_n)

    def regularizer_masks(self, x, dropout_key=None):
        """The zoneout, recurrent- and input-dropout and DropConnect masks a call on ``x``
        with ``dropout_key`` runs: ``(step_masks, u_masks)``.

        step_masks: None (no zoneout, recurrent or input dropout in this call), or per
        layer-direction k = layer * D + direction a ``regularize.StepMasks``: ``keep_h``
        (T, B, P or H) and ``keep_c`` (T, B, H) zoneout masks (1: the unit keeps its
        previous value) time-major on x's time axis, or the probabilities p_h, p_c
        without a key (evaluation); ``recurrent`` (B, 4, R) recurrent dropout's masks
        per gate; ``inputs`` (B, 4, F_in) input dropout's masks per gate. u_masks: None,
        or per layer-direction DropConnect's (R, 4H) mask. The same int or key gives the masks the call draws (a generator advances).
        """
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"x: expected an array, got {type(x).__name__}")
        return self._regularizers(dropout_key, self._to_time_major(self._to_backend(x, "x")))

    def _regularizers(self, dropout_key, x):
        """(step masks, U masks) of a call (``lstm_multi.regularize``): per layer-direction
        ``StepMasks`` (zoneout's masks, or its probabilities in evaluation; recurrent
        dropout's) or None where the loop runs none; DropConnect's (R, 4H) masks or None.
        """
        p_h, p_c = self.zoneout
        training = dropout_key is not None
        count = self.num_layers * self.num_directions
        if not training:
            return (regularize.evaluation_masks(count, p_h, p_c) if p_h or p_c else None), None
        rates = (p_h, p_c, self.recurrent_dropout, self.dropconnect, self.input_dropout)
        if not any(rates):
            return None, None
        steps, batch = x.shape[0], x.shape[1]
        width = self.output_size if self.variant.recurrent_state == "h" else self.hidden_size
        shapes_of = [
            (
                (steps, batch, self.output_size),
                (steps, batch, self.hidden_size),
                width,
                p["U"],
                p["W"][0],
            )
            for layer in self.param_shapes()
            for p in layer
        ]
        step_masks, u_masks = regularize.draw(self.ops, dropout_key, x, shapes_of, rates)
        return (
            step_masks if p_h or p_c or self.recurrent_dropout or self.input_dropout else None,
            u_masks if self.dropconnect else None,
        )

    def _layer_masks(self, dropout_key, x):
        """The dropout masks of layers 1..L-1 ([None, mask_1, ...], each (T, B, D * H)),
        or None without dropout."""
        if dropout_key is None or not self.dropout or self.num_layers == 1:
            return None
        steps, batch = x.shape[0], x.shape[1]
        shape = (steps, batch, self.num_directions * self.output_size)
        masks = self.ops.dropout_masks(
            dropout_key, [shape] * (self.num_layers - 1), self.dropout, x
        )
        return [None, *masks]

    def step(
        self, params: Params, x_t: Any, state: tuple[Any, Any] | None = None
    ) -> tuple[Any, tuple[Any, Any]]:
        """One time step of the whole stack: returns ``y_t, (h, c)``.

        x_t: (B, input_size); state: ``(h, c)``, each (L, B, H), or None for
        zeros; y_t (B, H) is the last layer's output (its h; (L, B, P) and
        (B, P) for h and y_t with a projection). Calling ``step``
        T times, feeding each returned state back in, gives the sequence
        call's outputs and final state (tested), so a model trained on
        sequences can decode, run online or act in an environment one input
        at a time. It is the sequence call with T = 1 (differentiable wherever
        that is). A bidirectional cell has no step: its reverse direction
        reads the future; a ``ValueError`` says so.
        """
        if self.bidirectional:
            raise ValueError(
                "step: a bidirectional cell cannot run one step at a time (its reverse "
                "direction reads the whole sequence); call the cell on the sequence"
            )
        if not hasattr(x_t, "shape") or not hasattr(x_t, "dtype"):
            raise TypeError(f"x_t: expected an array, got {type(x_t).__name__}")
        if len(x_t.shape) != 2 or x_t.shape[1] != self.input_size or x_t.shape[0] == 0:
            raise ValueError(
                f"x_t: expected shape (batch, {self.input_size}) with batch >= 1, "
                f"got {tuple(x_t.shape)}"
            )
        validation.check_float_dtype("x_t", self.ops.dtype_name(x_t))
        x = self.ops.reshape(self._to_backend(x_t, "x_t"), (1, *x_t.shape))  # (T=1, B, in)
        params, x, h0, c0, _ = self._prepare(params, x, state, None, time_major=True)
        step_masks, _ = self._regularizers(None, x)  # inference: zoneout's expectation
        if step_masks is None:
            y, h_n, c_n = self._forward(params, x, h0, c0, None)  # no dropout: inference
        else:
            y, h_n, c_n = self._forward(params, x, h0, c0, None, step_masks=step_masks)
        return y[0], (h_n, c_n)

    def stop_gradient(self, state: tuple[Any, Any]) -> tuple[Any, Any]:
        """``(h, c)`` cut from the graph of derivatives: truncated backpropagation
        through time.

        A long sequence is run in chunks, each chunk's final state passed on as
        the next one's initial state (the outputs are then exactly those of one
        call on the whole sequence, tested); cutting the state between chunks
        keeps each backward within its chunk::

            state = None
            for start in range(0, T, K):
                y, state = cell(params, x[:, start : start + K], state=state)
                ...  # loss and gradient of this chunk
                state = cell.stop_gradient(state)

        torch: ``detach``; JAX: ``jax.lax.stop_gradient``; NumPy has no graph (the
        state comes back as it is). A chunked bidirectional network is not the
        whole sequence's (its reverse direction starts over in every chunk).
        """
        if not isinstance(state, tuple) or len(state) != 2:
            raise TypeError(f"state: expected a tuple (h, c), got {type(state).__name__}")
        return tuple(self.ops.stop_gradient(s) for s in state)

    def vjp(
        self,
        params: Params,
        x: Any,
        dy: Any,
        state: tuple[Any, Any] | None = None,
        lengths: Any = None,
        dh_n: Any = None,
        dc_n: Any = None,
        *,
        mask: Any = None,
        dropout_key: Any = None,
    ) -> tuple[Params, Any, tuple[Any, Any]]:
        """Gradients of ``sum(y*dy) + sum(h_n*dh_n) + sum(c_n*dc_n)``.

        Returns ``grads, dx, (dh0, dc0)`` with grads in the canonical structure.
        dh_n and dc_n default to zeros; ``lengths``, ``mask`` and ``dropout_key`` as in
        ``__call__`` (the same int or key gives the network that call ran). Nothing
        reaches x or the parameters from a masked step (its dx is zero); dh and dc pass
        through it unchanged.
        """
        params, x, h0, c0, lengths = self._prepare(params, x, state, lengths, mask=mask)
        dtype = self.ops.dtype_name(x)
        out_shape = tuple(x.shape[:2]) + (self.num_directions * self.output_size,)
        if self.batch_first:
            out_shape = (out_shape[1], out_shape[0], out_shape[2])
        validation.check_array_shape(self.ops, "dy", dy, out_shape, dtype)
        dy = self._to_time_major(self._to_backend(dy, "dy"))
        dh_n, dc_n = (
            self._final_grad(name, grad, like, dtype, x)
            for name, grad, like in (("dh_n", dh_n, h0), ("dc_n", dc_n, c0))
        )
        masks = self._layer_masks(dropout_key, x)
        step_masks, u_masks = self._regularizers(dropout_key, x)
        params = _drop_connect(params, u_masks)
        if step_masks is None:
            grads, dx, dh0, dc0 = self._vjp(params, x, h0, c0, lengths, dy, dh_n, dc_n, masks)
        else:
            grads, dx, dh0, dc0 = self._vjp(
                params, x, h0, c0, lengths, dy, dh_n, dc_n, masks, step_masks=step_masks
            )
        # DropConnect: the gradient of U' = U * M at U is dU' * M
        grads = _drop_connect(grads, u_masks)
        return grads, self._from_time_major(dx), (dh0, dc0)

    def _final_grad(self, name, grad, like, dtype, x):
        """The gradient of a final state (``dh_n`` or ``dc_n``) checked, or zeros for None."""
        if grad is None:
            return self.ops.zeros(like.shape, x)
        validation.check_array_shape(self.ops, name, grad, like.shape, dtype)
        return self._to_backend(grad, name)

    # backend hooks ------------------------------------------------------------

    def _forward(self, params, x, h0, c0, lengths, layer_masks=None, step_masks=None):
        """Time-major forward: returns (y, h_n, c_n). ``lengths``: (B,) integers, a
        time-major (T, B) boolean mask, or None (``network.TimeLayout``);
        ``layer_masks``: see ``network.forward`` (dropout between layers);
        ``step_masks``: zoneout and recurrent dropout (``regularize.StepMasks`` per
        layer-direction, or None)."""
        raise NotImplementedError

    def _vjp(self, params, x, h0, c0, lengths, dy, dh_n, dc_n, layer_masks=None, step_masks=None):
        """Time-major vjp: returns (grads, dx, dh0, dc0)."""
        raise NotImplementedError

    def _to_backend(self, array, name):
        """Convert a NumPy or backend array, changing neither dtype nor values."""
        return self.ops.asarray(array)

    def _check_dtype_supported(self, name, dtype_name):
        """Raise if this backend cannot compute in ``dtype_name`` here."""

    # input handling -----------------------------------------------------------

    def _to_time_major(self, x):
        return self.ops.swap_batch_time(x) if self.batch_first else x

    _from_time_major = _to_time_major

    def _prepare(self, params, x, state, lengths, time_major=False, mask=None):
        """Check and convert a call's arguments: returns (params, time-major x, h0, c0,
        lengths) where lengths is (B,) integers, a (T, B) boolean mask (a ``mask`` that is
        not right padding) or None (``network.TimeLayout``)."""
        validation.check_lengths_or_mask(lengths, mask)
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"x: expected an array, got {type(x).__name__}")
        batch_first = self.batch_first and not time_major
        validation.check_input(self.ops, x, self.input_size, batch_first)
        dtype = self.ops.dtype_name(x)
        self._check_dtype_supported("x", dtype)
        self._check_x_matches_params(params, dtype)
        validation.check_params(self.ops, params, self.param_shapes(), dtype)
        x = self._to_backend(x, "x")
        x = self.ops.swap_batch_time(x) if batch_first else x
        steps, batch = x.shape[0], x.shape[1]
        params = self._map(self._to_backend_if_needed, params)
        h_shape, c_shape = self.state_shapes(batch)
        if state is None:
            h0, c0 = self.ops.zeros(h_shape, x), self.ops.zeros(c_shape, x)
        else:
            validation.check_state(self.ops, state, (h_shape, c_shape), dtype)
            h0, c0 = (
                self._to_backend(s, n) for s, n in zip(state, ("state h0", "state c0"), strict=True)
            )
        if lengths is not None:
            lengths = self._prepare_lengths(lengths, steps, batch, x)
        if mask is not None:
            lengths = self._prepare_mask(mask, steps, batch, x)
        return params, x, h0, c0, lengths

    def _check_x_matches_params(self, params, dtype):
        """x's dtype against the parameters': where every parameter has one dtype and x
        another, the error names x (a parameter is named only where they disagree)."""
        try:
            dtypes = {self.ops.dtype_name(a) for layer in params for p in layer for a in p.values()}
        except (TypeError, AttributeError, ValueError):
            return  # not the canonical structure: check_params says what is wrong
        if len(dtypes) == 1 and dtype not in dtypes:
            (param_dtype,) = dtypes
            raise TypeError(
                f"x: expected the parameters' dtype {param_dtype}, got {dtype} (cast x to "
                f"{param_dtype}, or draw the parameters in {dtype}: cell.init(seed, "
                f"dtype={dtype!r}))"
            )

    def _to_backend_if_needed(self, name, array):
        return array if self.ops.is_array(array) else self._to_backend(array, name)

    def _prepare_lengths(self, lengths, steps, batch, like):
        """lengths (a list, or an integer array of any framework and dtype) -> this
        backend's integer array on x's device, every value checked to lie in 1..T."""
        if isinstance(lengths, (list, tuple)):
            lengths = np.asarray(lengths)
        if not hasattr(lengths, "shape") or not hasattr(lengths, "dtype"):
            raise TypeError(f"lengths: expected an array of integers, got {type(lengths).__name__}")
        dtype = str(lengths.dtype).removeprefix("torch.")
        validation.check_lengths_shape(dtype, lengths.shape, batch)
        values = self.ops.host_values(lengths)
        if values is None:  # traced (JAX under jit): the backend checks at run time
            return self._traced_lengths(lengths, steps)
        validation.check_lengths_values(values, steps)
        return self.ops.on_device_of(self._to_backend(values.astype(np.int64), "lengths"), like)

    def _traced_lengths(self, lengths, steps):
        """lengths whose values are not known yet (only JAX traces)."""
        raise TypeError(f"lengths: expected concrete integers, got {type(lengths).__name__}")

    def _prepare_mask(self, mask, steps, batch, like):
        """mask (B, T) booleans (a list, or an array of any framework) -> what the network
        runs (``network.TimeLayout``): None where every step is real; the rows' lengths
        where each row is True on its first steps and False after (the lengths' path,
        PyTorch's kernel included); else the mask, time-major (T, B), on x's device."""
        if isinstance(mask, (list, tuple)):
            mask = np.asarray(mask)
        if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
            raise TypeError(f"mask: expected an array of booleans, got {type(mask).__name__}")
        validation.check_mask(str(mask.dtype).removeprefix("torch."), mask.shape, batch, steps)
        values = self.ops.host_values(mask)
        if values is None:  # traced (JAX under jit): run it as a mask, whatever its pattern
            return self._traced_mask(mask)
        steps_run = network.mask_steps(np.asarray(values, bool))
        if steps_run is None:
            return None
        return self.ops.on_device_of(self._to_backend(steps_run, "mask"), like)

    def _traced_mask(self, mask):
        """A (B, T) mask whose values are not known yet (only JAX traces) -> (T, B)."""
        raise TypeError(f"mask: expected concrete booleans, got {type(mask).__name__}")


def _drop_connect(params, u_masks):
    """params (or their gradients) with each layer-direction's U multiplied by its
    DropConnect mask; params unchanged for None."""
    if u_masks is None:
        return params
    it = iter(u_masks)
    return [[{**p, "U": p["U"] * next(it)} for p in layer] for layer in params]
