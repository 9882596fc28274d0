"""``torch.nn`` modules: ``LSTM`` (a drop-in for ``torch.nn.LSTM`` with variants),
``NaiveLSTM`` (the article's readable one-matrix-per-gate form) and ``QuantizedLSTM``
(int8 CPU inference, made by ``quantize_dynamic``; docs/deployment.md).

``LSTM`` is a subclass of ``torch.nn.LSTM``: same constructor, defaults, return
values, attributes (``all_weights``, ``_flat_weights_names``, ``mode``,
``check_forward_args``, ``permute_hidden``, ``flatten_parameters``) and
state_dict keys (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``,
``bias_hh_l{k}``, with ``_reverse`` for direction 1), so code written for
``nn.LSTM`` keeps working and an ``nn.LSTM`` state_dict loads into it. The
"peephole" variant adds ``weight_peephole_l{k}`` of shape (3, H), rows
(i, f, o). Its canonical parameters are W = weight_ih^T, U = weight_hh^T,
b = bias_ih + bias_hh.

Importing this module registers ``LSTM`` and ``NaiveLSTM`` with
``torch.serialization.add_safe_globals``, so ``torch.load`` with its default
``weights_only=True`` restores a whole saved model, as it does ``nn.LSTM``.
"""

from __future__ import annotations

try:
    import torch
except ModuleNotFoundError as error:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "lstm_multi.torch needs torch, which is not installed: pip install 'lstm_multi[torch]'"
    ) from error

import math

from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import network, regularize, spec, validation
from .backends import torch_int8, torch_native
from .backends.torch_backend import (
    choose_engine,
    engine_from_options,
    engine_runner,
    export_engine,
    generic_forward,
    regularized_direction,
    spelled_as,
    warn_device_fallback,
)
from .backends.torch_compile_break import break_graph_at
from .backends.torch_graphs import GraphOwner
from .backends.torch_ops import OPS

__all__ = ["LSTM", "NaiveLSTM", "QuantizedLSTM", "quantize_dynamic"]

#: the state_dict entry (``prefix + "_extra_state"``) where a module whose variant does not
#: compute "lstm" records it (``{"variant": name, "fingerprint": ...}``); a module computing
#: "lstm" keeps exactly ``nn.LSTM``'s keys
_VARIANT_KEY = "_extra_state"


def _suffix(direction):
    return "_reverse" if direction == 1 else ""


def _check_dtype_and_device(name, tensor, like, whose):
    """Raise unless ``tensor`` has ``like``'s dtype and device (``whose``: "the input's", ...)."""
    if tensor.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype} ({whose}), got {tensor.dtype}")
    if tensor.device != like.device:
        raise ValueError(
            f"{name}: expected a tensor on {like.device} ({whose} device), got one on {tensor.device}"
        )


def _recorded_variant(state_dict, prefix):
    """(name, fingerprint) of the variant a state_dict was saved from: its record, else
    "lstm"'s (nn.LSTM's keys). A record saved before fingerprints were recorded gives the
    fingerprint of the registered variant of its name, or None when none is registered."""
    record = state_dict.get(prefix + _VARIANT_KEY)
    if not (isinstance(record, dict) and isinstance(record.get("variant"), str)):
        return "lstm", spec.VARIANTS["lstm"].fingerprint
    name, fingerprint = record["variant"], record.get("fingerprint")
    if not isinstance(fingerprint, str):
        known = spec.VARIANTS.get(spec.ALIASES.get(name, name))
        fingerprint = None if known is None else known.fingerprint
    return name, fingerprint


def _as_given(input, y, h_n, c_n, lengths, packed, unbatched, batch_first):
    """The time-major result (y (T, B, D*P), h_n, c_n) in the form ``input`` came in: a
    ``PackedSequence`` (in its sorting), unbatched (T, ...), or batch-first (B, T, ...)."""
    if packed:
        order = input.sorted_indices
        if order is None:
            data = pack_padded_sequence(y, lengths, enforce_sorted=True).data
        else:
            data = pack_padded_sequence(
                y.index_select(1, order), lengths[order.cpu()], enforce_sorted=True
            ).data
        return PackedSequence(
            data, input.batch_sizes, input.sorted_indices, input.unsorted_indices
        ), (h_n, c_n)
    if unbatched:
        return y.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
    return (y.transpose(0, 1) if batch_first else y), (h_n, c_n)


class LSTM(GraphOwner, nn.LSTM):
    r"""A multi-layer LSTM, ``torch.nn.LSTM``'s drop-in, with the variants of ``lstm_multi.spec``.

    Arguments are ``nn.LSTM``'s (``proj_size`` P > 0 projects h for every variant:
    ``weight_hr_l{k}`` (P, H), h states (L * D, B, P); a variant whose recurrence
    reads c_{t-1} keeps ``weight_hh`` (4H, H)), plus
    ``variant`` ("lstm", "peephole", "peephole_full", or a ``Variant``), ``native`` and
    ``engine``. ``native=True`` (the default) runs the plain variant on ``nn.LSTM``'s own
    forward (its kernel, cuDNN on CUDA), so that a plain module is ``nn.LSTM`` bit for
    bit; ``native=False`` never does. Everything else runs the spec's loop on the engine
    ``engine`` names (``lstm_multi.engines``; "auto", the default, lets the engine table
    choose per call: the generated CPU kernels on the CPU; ``explain(input)`` says which
    engine a call runs and why, ``last_choice`` holds the last call's), e.g.
    ``engine="graphed_triton"`` on a GPU; an engine named explicitly wins over
    ``native=True``. ``gate_kernel`` and ``cuda_graphs`` are the older spellings of the
    Triton and graphed engines. The graphed engines replay the module's own CUDA graphs
    (``lstm_multi.backends.torch_graphs``): ``graph_stats()`` counts their captures and
    replays, ``free_graphs()`` drops them; a copy starts without graphs. An engine that
    acts on CUDA tensors only warns once per process on other tensors (a ``UserWarning``
    naming the engine that runs instead; not the Triton engines under
    ``TRITON_INTERPRET=1``) and the call runs without it, so that a module made for a
    GPU and moved to the CPU still runs.
    A batch of no sequences gives empty outputs, as ``nn.LSTM`` does. ``torch.export.export``
    takes every variant: each direction of each layer is one call of the custom op
    ``lstm_multi::direction`` (``backends/torch_library``: the generated CPU kernels, any
    sequence length, differentiable), registered by ``import lstm_multi.torch``, which a
    process loading the exported program must do first; ``lstm_multi.onnx.export`` writes
    ONNX (docs/deployment.md). ``torch.jit.script``
    scripts variant "lstm" with ``native=True`` as ``nn.LSTM`` (sharing the parameters)
    and refuses the others, naming torch.export (``__prepare_scriptable__``);
    ``torch.compile`` takes every one;
    ``torch.jit.trace`` records ``nn.LSTM``'s kernel ("lstm", native) or the spec's loop as
    plain ops, unrolled over the traced sequence length (that length only).

    Inputs: ``input`` of shape (T, B, in), (B, T, in) with ``batch_first``, (T, in)
    unbatched, or a ``PackedSequence``; ``hx = (h_0, c_0)``, each (L * D, B, H), or
    (L * D, H) for unbatched input; beyond ``nn.LSTM``, ``mask=`` (keyword): booleans
    (B, T) whatever ``batch_first`` ((T,) unbatched), True where a step is real, any
    pattern (``forward``; ``docs/masks.md``). Returns ``output, (h_n, c_n)`` exactly as
    ``nn.LSTM`` does. For "peephole_full", whose recurrence reads c_{t-1} only,
    h_0 does not enter the computation (its gradient is zero); it is accepted so
    that a previous chunk's (h_n, c_n) can be passed on as they are.

    Regularizers inside the recurrence (keyword arguments; ``lstm_multi.regularize`` has
    the equations): ``zoneout`` p or (p_h, p_c): in training (``module.training``) each
    unit of h (c) keeps its previous value with probability p_h (p_c), drawn per step;
    in evaluation the expectation h_t = p_h h_{t-1} + (1 - p_h) h̃_t (c likewise).
    ``recurrent_dropout`` (Keras's): in training, the recurrent input of each gate's
    product times its own inverted-dropout mask, fixed over the sequence.
    ``input_dropout`` (Keras's ``dropout`` as ``recurrent_dropout`` runs it): in
    training, each layer-direction's input as each gate's product reads it times that
    gate's own inverted-dropout mask, fixed over the sequence (not ``nn.LSTM``'s
    ``dropout``, which acts between layers, per step).
    ``dropconnect`` (haste's ``dropout``): in training, U times one inverted-dropout
    mask per call. The masks are drawn from torch's default generator (one seed per
    call, so ``torch.manual_seed`` repeats them). Zoneout, recurrent and input dropout run on
    the "array" engine (the loop under autograd; ``explain`` says why the others are
    passed over); DropConnect runs on every engine, ``nn.LSTM``'s kernel included.

    PyTorch machinery: repeated backward (``retain_graph=True``), double
    backward, ``gradcheck``/``gradgradcheck``, ``torch.func`` transforms (the
    spec's loop as plain ops runs there), ``torch.autocast`` (outputs in the
    autocast dtype, float32 cell state), and ``torch.compile``, which runs the
    module eagerly between compiled regions, as it does ``nn.LSTM``.
    """

    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers=1,
        bias=True,
        batch_first=False,
        dropout=0.0,
        bidirectional=False,
        proj_size=0,
        device=None,
        dtype=None,
        *,
        variant="lstm",
        native=True,
        engine="auto",
        gate_kernel=None,
        cuda_graphs=False,
        zoneout=0.0,
        recurrent_dropout=0.0,
        dropconnect=0.0,
        input_dropout=0.0,
    ):
        zoneout = regularize.check_zoneout(zoneout)
        recurrent_dropout = regularize.check_rate("recurrent_dropout", recurrent_dropout)
        dropconnect = regularize.check_rate("dropconnect", dropconnect)
        input_dropout = regularize.check_rate("input_dropout", input_dropout)
        input_size = validation.check_positive_int("input_size", input_size)
        hidden_size = validation.check_positive_int("hidden_size", hidden_size)
        num_layers = validation.check_positive_int("num_layers", num_layers)
        validation.check_bool("bias", bias)
        validation.check_bool("batch_first", batch_first)
        validation.check_bool("bidirectional", bidirectional)
        validation.check_bool("native", native)
        validation.check_bool("cuda_graphs", cuda_graphs)
        requested, excluded = engine_from_options(engine, native, gate_kernel, cuda_graphs)
        if not validation.is_real_number(dropout) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout: expected a number in [0, 1], got {dropout!r}")
        proj_size = validation.check_proj_size(proj_size, hidden_size)
        variant = spec.get_variant(variant)
        super().__init__(
            input_size,
            hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            proj_size=proj_size,
            device=device,
            dtype=dtype,
        )
        if proj_size and variant.recurrent_state == "c":
            self._widen_recurrent_weights(hidden_size, device, dtype)
        self.variant = variant.name
        if spec.VARIANTS.get(variant.name) is not variant:
            # a user's Variant need not be registered: the module keeps the object itself
            # (never its name, which may be a built-in's or another variant's)
            self._user_variant = variant
        self.native = native
        self.gate_kernel, self.cuda_graphs = gate_kernel, cuda_graphs
        self.engine = engine
        self._requested, self._excluded = requested, excluded
        self.zoneout, self.recurrent_dropout, self.dropconnect = (
            zoneout, recurrent_dropout, dropconnect,
        )  # fmt: skip
        self.input_dropout = input_dropout
        #: the ``lstm_multi.engines.Choice`` of the most recent call (None before the first)
        self.last_choice = None
        # the variant's own parameters, after nn.LSTM's (which nn.LSTM.__init__ drew
        # first, so a plain module starts with nn.LSTM's numbers for the same seed)
        bound = 1.0 / math.sqrt(hidden_size)
        for layer in range(num_layers):
            for direction in range(self.num_directions):
                for key, shape in variant.extra_param_shapes(hidden_size).items():
                    weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
                    nn.init.uniform_(weight, -bound, bound)
                    if key in variant.param_init:  # the layer norms' gains 1, shifts 0
                        nn.init.constant_(weight, variant.param_init[key])
                    word = self._extra_names.get(key, key)
                    name = f"weight_{word}_l{layer}{_suffix(direction)}"
                    self.register_parameter(name, weight)

    #: canonical extra-parameter key -> the word in its state_dict name (else the key)
    _extra_names = {"p": "peephole"}

    @torch.no_grad()
    def _widen_recurrent_weights(self, hidden_size, device, dtype):
        """A variant whose recurrence reads c_{t-1} (width H) keeps weight_hh (4H, H)
        under a projection (nn.LSTM made it (4H, P) for h_{t-1}); drawn as nn.LSTM draws."""
        bound = 1.0 / math.sqrt(hidden_size)
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                name = f"weight_hh_l{layer}{_suffix(direction)}"
                weight = torch.empty(4 * hidden_size, hidden_size, device=device, dtype=dtype)
                setattr(self, name, nn.Parameter(weight.uniform_(-bound, bound)))

    @property
    def _variant_spec(self):
        """The Variant object (a registered one is kept by name, so the module pickles)."""
        return self.__dict__.get("_user_variant") or spec.get_variant(self.variant)

    def _extra_words(self):
        """(canonical key, state_dict word) of each of the variant's own parameters."""
        return [(key, self._extra_names.get(key, key)) for key in self._variant_spec.params]

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    def __getstate__(self):
        # the last call's choice is a record of that call, not part of the module (and
        # torch.load's weights_only default refuses its class); the graphs: GraphOwner
        state = super().__getstate__()
        state["last_choice"] = None
        return state

    def extra_repr(self):
        text = super().extra_repr() + f", variant={self.variant!r}"
        if not self.native:
            text += ", native=False"
        if self.__dict__.get("engine", "auto") != "auto":
            text += f", engine={self.engine!r}"
        if self.__dict__.get("gate_kernel") is not None:
            text += f", gate_kernel={self.gate_kernel!r}"
        if self.__dict__.get("cuda_graphs"):
            text += ", cuda_graphs=True"
        if any(self.__dict__.get("zoneout", ())):
            text += f", zoneout={self.zoneout}"
        for name in ("recurrent_dropout", "dropconnect", "input_dropout"):
            if self.__dict__.get(name):
                text += f", {name}={getattr(self, name)}"
        return text

    def _step_masks_on(self):
        """Whether this call runs zoneout, recurrent or input dropout in its loop."""
        zoneout = any(self.__dict__.get("zoneout", ()))
        rates = self.__dict__.get("recurrent_dropout"), self.__dict__.get("input_dropout")
        return zoneout or (self.training and any(rates))

    def _regularized(self, params, x):
        """(params with DropConnect's U, step masks or None) for time-major x; the masks
        drawn from one seed of torch's default generator (``lstm_multi.regularize``)."""
        p_h, p_c = self.__dict__.get("zoneout", (0.0, 0.0))
        rates = (p_h, p_c, self.__dict__.get("recurrent_dropout", 0.0))
        rates += (self.__dict__.get("dropconnect", 0.0), self.__dict__.get("input_dropout", 0.0))
        count = self.num_layers * self.num_directions
        if not self.training:
            masks = regularize.evaluation_masks(count, p_h, p_c) if p_h or p_c else None
            return params, masks
        if not any(rates):
            return params, None
        seed = int(torch.randint(0, 2**62, (1,)).item())
        steps, batch, hidden = x.shape[0], x.shape[1], self.hidden_size
        out = self.proj_size or hidden
        shapes_of = [
            (
                (steps, batch, out),
                (steps, batch, hidden),
                p["U"].shape[0],
                tuple(p["U"].shape),
                p["W"].shape[0],
            )
            for layer in params
            for p in layer
        ]
        step_masks, u_masks = regularize.draw(OPS, seed, x, shapes_of, rates)
        if rates[3]:
            it = iter(u_masks)
            params = [[{**p, "U": p["U"] * next(it)} for p in layer] for layer in params]
        return params, (step_masks if any(rates[:3]) or rates[4] else None)

    # the variant in the state_dict ------------------------------------------------

    def _variant_matches(self, recorded):
        """Whether a state_dict's recorded (name, fingerprint) is what this module computes
        (a record with no known fingerprint, from before they were recorded, by its name)."""
        name, fingerprint = recorded
        if fingerprint is None:
            return name == self.variant
        return fingerprint == self._variant_spec.fingerprint

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        variant = self._variant_spec
        if not spec.computes_lstm(variant):
            destination[prefix + _VARIANT_KEY] = {
                "variant": self.variant,
                "fingerprint": variant.fingerprint,
            }

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # PyTorch calls this with strict=True always and applies the caller's strict to
        # the key lists afterwards: a variant that differs is reported through them
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        key = prefix + _VARIANT_KEY
        matches = self._variant_matches(_recorded_variant(state_dict, prefix))
        if key in state_dict:
            if matches and key in unexpected_keys:
                unexpected_keys.remove(key)
            elif not matches and key not in unexpected_keys:
                unexpected_keys.append(key)  # another variant's record
        elif not matches:
            missing_keys.append(key)  # nn.LSTM's weights, or a "lstm" module's

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """``nn.Module.load_state_dict``, refusing (with ``strict``) a state_dict saved from
        another variant, nn.LSTM's included: its weights would mean something else here.

        The variant is recorded in the state_dict of every non-"lstm" module (key
        ``_extra_state``); inside a larger model a mismatch shows as that key
        missing or unexpected.
        """
        recorded = _recorded_variant(state_dict, "")
        if strict and not self._variant_matches(recorded):
            name, fingerprint = recorded
            origin = (
                "torch.nn.LSTM's or a 'lstm' module's (it records no variant)"
                if _VARIANT_KEY not in state_dict
                else f"a {name!r} module's (fingerprint {str(fingerprint)[:12]})"
            )
            raise RuntimeError(
                f"variant: this module computes the {self.variant!r} variant (fingerprint "
                f"{self._variant_spec.fingerprint[:12]}), but the state_dict is {origin}, "
                "which computes something else, so its weights mean something else here; "
                "load_state_dict(..., strict=False) loads them anyway"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # parameters in the canonical layout ----------------------------------------

    def _param(self, kind, layer, direction):
        return getattr(self, f"{kind}_l{layer}{_suffix(direction)}")

    def canonical_params(self):
        """The parameters as ``params[layer][direction] = {"W", "U", "b", ...}`` (differentiable views)."""
        params = []
        for layer in range(self.num_layers):
            directions = []
            for direction in range(self.num_directions):
                w_ih = self._param("weight_ih", layer, direction)
                p = {"W": w_ih.T, "U": self._param("weight_hh", layer, direction).T}
                if self.bias:
                    p["b"] = self._param("bias_ih", layer, direction) + self._param(
                        "bias_hh", layer, direction
                    )
                else:
                    p["b"] = w_ih.new_zeros(w_ih.shape[0])
                for key, word in self._extra_words():
                    p[key] = getattr(self, f"weight_{word}_l{layer}{_suffix(direction)}")
                if self.proj_size:
                    p[spec.PROJECTION] = self._param("weight_hr", layer, direction).T
                directions.append(p)
            params.append(directions)
        return params

    def to_numpy_params(self):
        """Canonical NumPy parameters (for ``get_cell(...).from_numpy``)."""
        return [
            [{k: OPS.to_numpy(v) for k, v in p.items()} for p in layer]
            for layer in self.canonical_params()
        ]

    @torch.no_grad()
    def load_numpy_params(self, np_params):
        """Set the parameters from canonical ones: weight_ih = W^T, weight_hh = U^T,
        bias_ih = b, bias_hh = 0."""
        shapes = spec.network_param_shapes(
            self._variant_spec,
            self.input_size,
            self.hidden_size,
            self.num_layers,
            self.num_directions,
            self.proj_size,
        )
        validation.check_params(OPS, np_params, shapes, name="np_params")
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                p = np_params[layer][direction]
                if not self.bias and bool((torch.as_tensor(p["b"]) != 0).any()):
                    raise ValueError(
                        f"np_params[{layer}][{direction}]['b']: this module has bias=False, "
                        "so b must be zero"
                    )
                sfx = f"l{layer}{_suffix(direction)}"
                getattr(self, f"weight_ih_{sfx}").copy_(torch.as_tensor(p["W"]).T)
                getattr(self, f"weight_hh_{sfx}").copy_(torch.as_tensor(p["U"]).T)
                if self.bias:
                    getattr(self, f"bias_ih_{sfx}").copy_(torch.as_tensor(p["b"]))
                    getattr(self, f"bias_hh_{sfx}").zero_()
                for key, word in self._extra_words():
                    getattr(self, f"weight_{word}_{sfx}").copy_(torch.as_tensor(p[key]))
                if self.proj_size:
                    getattr(self, f"weight_hr_{sfx}").copy_(torch.as_tensor(p[spec.PROJECTION]).T)
        return self

    # conversion with torch.nn.LSTM --------------------------------------------

    @classmethod
    def from_torch(cls, lstm: nn.LSTM, variant="lstm", native=True, *, strict=True):
        """A module with ``lstm``'s configuration and weights.

        With variant "peephole" the peephole weights start at zero, so the new
        module computes exactly what ``lstm`` does until they are trained. A
        variant that cannot compute ``lstm``'s function from its weights
        ("peephole_full": its gates read c_{t-1} through U, its g is a sigmoid)
        is refused unless ``strict=False``, which takes the weights as a
        starting point only.
        """
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"lstm: expected a torch.nn.LSTM, got {type(lstm).__name__}")
        target = spec.get_variant(variant)
        # what the source computes: its variant (by fingerprint, never by name), or "lstm"
        source = lstm._variant_spec if isinstance(lstm, LSTM) else spec.VARIANTS["lstm"]
        same_function = spec.same_computation(source, target) or (
            spec.computes_lstm(source) and target.extends_lstm
        )
        if strict and not same_function:
            raise ValueError(
                f"variant: {target.name!r} does not compute the function of a {source.name!r} "
                f"LSTM, so its weights would mean something else there; "
                "from_torch(..., strict=False) starts from them anyway"
            )
        weight = lstm.weight_ih_l0
        module = cls(
            lstm.input_size,
            lstm.hidden_size,
            lstm.num_layers,
            lstm.bias,
            lstm.batch_first,
            lstm.dropout,
            lstm.bidirectional,
            lstm.proj_size,
            device=weight.device,
            dtype=weight.dtype,
            variant=target,
            native=native,
        )
        state = lstm.state_dict()
        with torch.no_grad():
            for name, value in module.named_parameters():
                if name not in state:
                    value.zero_()
                elif state[name].shape != value.shape:  # never broadcast into another shape
                    raise ValueError(
                        f"lstm: its {name} has shape {tuple(state[name].shape)}, and "
                        f"variant {target.name!r} needs {tuple(value.shape)}"
                    )
                else:
                    value.copy_(state[name])
        return module

    def to_torch(self) -> nn.LSTM:
        """An ``nn.LSTM`` with this module's configuration and weights (a variant computing
        "lstm" only, ``spec.computes_lstm``)."""
        if not spec.computes_lstm(self._variant_spec):
            raise ValueError(
                "variant: torch.nn.LSTM can only hold the 'lstm' variant, this module is "
                f"{self.variant!r}, which computes something else"
            )
        weight = self.weight_ih_l0
        lstm = nn.LSTM(
            self.input_size,
            self.hidden_size,
            self.num_layers,
            self.bias,
            self.batch_first,
            self.dropout,
            self.bidirectional,
            self.proj_size,
            device=weight.device,
            dtype=weight.dtype,
        )
        lstm.load_state_dict(self.state_dict())
        return lstm

    # torch.jit.script ------------------------------------------------------------

    def __prepare_scriptable__(self):
        """What ``torch.jit.script(module)`` compiles in this module's place.

        Variant "lstm" with ``native=True`` runs ``nn.LSTM``'s own forward, so it is
        scripted as an ``nn.LSTM`` holding this module's parameters (the same
        ``Parameter`` objects: training either trains both), exactly what scripting
        an ``nn.LSTM`` gives. Any other configuration runs the spec's generic Python
        loop, which TorchScript cannot compile: a ``RuntimeError`` says what to use.
        """
        if self.native and torch_native.supports(self._variant_spec):
            return self._sharing_torch_lstm()
        raise RuntimeError(
            f"torch.jit.script: lstm_multi.torch.LSTM with variant={self.variant!r}"
            f"{'' if self.native else ', native=False'} cannot be scripted (it runs the "
            "spec's generic Python loop, which TorchScript does not compile; TorchScript is "
            "deprecated in PyTorch). To deploy it, use torch.export.export(module, (input,)) "
            "(each direction is the custom op lstm_multi::direction; a process loading the "
            "program imports lstm_multi.torch first) or lstm_multi.onnx.export; "
            "torch.compile(module) runs it eagerly between compiled regions, as nn.LSTM; "
            "docs/deployment.md"
        )

    def _sharing_torch_lstm(self) -> nn.LSTM:
        """An ``nn.LSTM`` with this configuration holding this module's own parameters."""
        weight = self.weight_ih_l0
        lstm = nn.LSTM(
            self.input_size, self.hidden_size, self.num_layers, self.bias, self.batch_first,
            self.dropout, self.bidirectional, self.proj_size, device="meta", dtype=weight.dtype,
        )  # fmt: skip
        for name in lstm._flat_weights_names:
            setattr(lstm, name, getattr(self, name))  # nn.LSTM updates its _flat_weights
        return lstm.train(self.training)

    # forward -------------------------------------------------------------------

    def _engine_request(self):
        """(requested engine, excluded engines, how the user spelled it); a module
        unpickled from before ``engine`` existed asks as its options did."""
        if "_requested" not in self.__dict__:
            gate_kernel = self.__dict__.get("gate_kernel")
            cuda_graphs = self.__dict__.get("cuda_graphs", False)
            self._requested, self._excluded = engine_from_options(
                "auto", self.native, gate_kernel, cuda_graphs
            )
        spelled = spelled_as(
            self.__dict__.get("engine", "auto"),
            self.__dict__.get("gate_kernel"),
            self.__dict__.get("cuda_graphs", False),
        )
        return self._requested, self._excluded, spelled

    def explain(self, input):
        """The engine a call on ``input`` would run, and why, without running it: an
        ``lstm_multi.engines.Choice`` (``print`` it for the engines passed over)."""
        data = input.data if isinstance(input, PackedSequence) else input
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"input: expected a tensor, got {type(input).__name__}")
        requested, excluded, _ = self._engine_request()
        return choose_engine(
            self._variant_spec, self.hidden_size, self.proj_size, requested, excluded, data,
            step_masks=self._step_masks_on(),
        )  # fmt: skip

    @property
    def runs_native(self):
        """Whether a call on this module's device and dtype runs ``nn.LSTM``'s own forward
        (``explain(input)`` says which engine runs and why)."""
        weight = self.weight_ih_l0
        return self.explain(weight.new_empty(0)).engine == "native"

    # one graph break, run eagerly: what torch.compile does to nn.LSTM (torch.compiler.disable,
    # applied once TorchDynamo is imported: break_graph_at after the class)
    def forward(self, input, hx=None, *, mask=None):
        """``nn.LSTM``'s forward, and ``mask``: None, or booleans (B, T) (whatever
        ``batch_first``; (T,) for unbatched input), True where a step is real, in any
        pattern (left padding, gaps, a row with no real step). At a masked step h and c
        are held (carried unchanged) and the output is zero; the reverse direction reads
        the real steps in reverse order; nothing reaches the input or the parameters from
        a masked step. A right-padded mask runs as the lengths it spells (PyTorch's
        kernel included); not with a ``PackedSequence``, which says it already."""
        packed = isinstance(input, PackedSequence)
        batch = self._check_input(input)
        unbatched = not packed and input.dim() == 2
        data = input.data if packed else input
        self._check_state(hx, batch, unbatched, data)
        steps_run = None if mask is None else self._mask_steps(mask, input, batch, unbatched)
        requested, excluded, spelled = self._engine_request()
        choice = choose_engine(
            self._variant_spec, self.hidden_size, self.proj_size, requested, excluded, data,
            step_mask=steps_run is not None and steps_run.dim() == 2,
            step_masks=self._step_masks_on(),
        )  # fmt: skip
        self.last_choice = choice
        warn_device_fallback(choice, spelled, data)
        engine = export_engine(choice.engine, data)
        drop_connect = self.training and bool(self.__dict__.get("dropconnect"))
        if engine == "native" and not drop_connect:
            if steps_run is not None:
                return self._native_with_lengths(input, hx, steps_run, unbatched)
            return super().forward(input, hx)
        lengths = None
        if packed:
            x, lengths = pad_packed_sequence(input)
        else:
            x = input.unsqueeze(1) if unbatched else input
            if self.batch_first and not unbatched:
                x = x.transpose(0, 1)
            lengths = steps_run
        if hx is None:
            layers = self.num_layers * self.num_directions
            h0 = x.new_zeros(layers, batch, self.proj_size or self.hidden_size)
            c0 = x.new_zeros(layers, batch, self.hidden_size)
        else:
            h0, c0 = (s.unsqueeze(1) for s in hx) if unbatched else hx
        between = None
        if self.dropout > 0 and self.training:

            def between(layer_input):
                return nn.functional.dropout(layer_input, self.dropout, True)

        params, step_masks = self._regularized(self.canonical_params(), x)
        if engine == "native":  # DropConnect's U on nn.LSTM's kernel
            y, h_n, c_n = torch_native.run_flat(
                torch_native.flat_weights(params), x, h0, c0, lengths, self.num_layers,
                self.bidirectional, dropout=self.dropout, training=True,
            )  # fmt: skip
        else:
            y, h_n, c_n = generic_forward(
                self._variant_spec,
                params,
                x,
                h0,
                c0,
                None if lengths is None else lengths.to(x.device),
                regularized_direction
                if step_masks is not None
                else engine_runner(engine, self._graphs_for(engine)),
                between_layers=between,
                step_masks=step_masks,
            )
        return _as_given(input, y, h_n, c_n, lengths, packed, unbatched, self.batch_first)

    def _mask_steps(self, mask, input, batch, unbatched):
        """``forward``'s mask checked -> what the network runs (``network.mask_steps``):
        None, lengths (B,) on the CPU, or a (T, B) mask on the input's device."""
        if isinstance(input, PackedSequence):
            raise ValueError(
                "mask: expected None with a PackedSequence input (its batch_sizes already "
                "say which steps are real), got a mask"
            )
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a bool tensor, got {type(mask).__name__}")
        steps = input.shape[1 if self.batch_first and not unbatched else 0]
        if unbatched:
            if tuple(mask.shape) != (steps,):
                raise ValueError(
                    f"mask: expected shape ({steps},) (time) for unbatched input, got "
                    f"{tuple(mask.shape)}"
                )
            mask = mask.unsqueeze(0)
        validation.check_mask(str(mask.dtype).removeprefix("torch."), mask.shape, batch, steps)
        steps_run = network.mask_steps(OPS.host_values(mask).astype(bool))
        if steps_run is None:
            return None
        steps_run = torch.as_tensor(steps_run)
        return steps_run if steps_run.dim() == 1 else steps_run.to(input.device)

    def _native_with_lengths(self, input, hx, lengths, unbatched):
        """``nn.LSTM``'s forward on a right-padded mask's lengths (packed, then padded
        back with zeros to the input's length)."""
        x = input.unsqueeze(1) if unbatched else input
        batch_first = self.batch_first and not unbatched
        if hx is not None and unbatched:
            hx = tuple(s.unsqueeze(1) for s in hx)
        steps = x.shape[1 if batch_first else 0]
        packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
        out, (h_n, c_n) = super().forward(packed, hx)
        y, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=steps)
        if unbatched:
            return y.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return y, (h_n, c_n)

    def _check_input(self, input):
        """Raise on a malformed input; return its batch size."""
        if isinstance(input, PackedSequence):
            data = input.data
            if data.dim() != 2:
                raise ValueError(
                    f"input: expected a PackedSequence of 2-D data (sum of lengths, input_size), "
                    f"got data of shape {tuple(data.shape)}"
                )
            batch, shape, layout = int(input.batch_sizes[0]), tuple(data.shape), ""
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(
                    f"input: expected a tensor or PackedSequence, got {type(input).__name__}"
                )
            data, shape = input, tuple(input.shape)
            layout = (
                "(batch, time, input_size)" if self.batch_first else "(time, batch, input_size)"
            )
            if input.dim() == 2:
                layout = "(time, input_size)"
            elif input.dim() != 3:
                raise ValueError(
                    f"input: expected a 2-D (unbatched) or 3-D tensor, got shape {shape}"
                )
            time_axis = 1 if self.batch_first and input.dim() == 3 else 0
            if shape[time_axis] == 0:
                raise ValueError(f"input: expected at least one time step {layout}, got {shape}")
            batch = 1 if input.dim() == 2 else shape[1 - time_axis]  # 0 allowed, as by nn.LSTM
        if shape[-1] != self.input_size:
            raise ValueError(
                f"input: expected input_size {self.input_size} on the last axis {layout}".rstrip()
                + f", got shape {shape}"
            )
        _check_dtype_and_device("input", data, self._compute_like(), "the module's")
        return batch

    def _compute_like(self):
        """A tensor of the dtype and device this module computes in (inputs must match)."""
        return self.weight_ih_l0

    def _check_state(self, hx, batch, unbatched, data):
        """Raise unless hx is None or a pair (h_0, c_0) of the right shape, dtype, device."""
        if hx is None:
            return
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"hx: expected a pair (h_0, c_0), got {type(hx).__name__}")
        layers = self.num_layers * self.num_directions
        kind = "unbatched" if unbatched else "batched"
        for name, s, width in zip(
            ("h_0", "c_0"), hx, (self.proj_size or self.hidden_size, self.hidden_size), strict=True
        ):
            if not isinstance(s, torch.Tensor):
                raise TypeError(f"hx {name}: expected a tensor, got {type(s).__name__}")
            expected = (layers, width) if unbatched else (layers, batch, width)
            if tuple(s.shape) != expected:
                raise ValueError(
                    f"hx {name}: expected shape {expected} for {kind} input, got {tuple(s.shape)}"
                )
            _check_dtype_and_device(f"hx {name}", s, data, "the input's")


break_graph_at(LSTM, ("forward",))


class NaiveLSTM(nn.Module):
    r"""The article's readable LSTM: one W, U, b per gate and a product per gate a step.

    One layer, one direction, any variant. Each step computes each gate's
    preactivation with products of its own,

        z_k = x_t W_k + r U_k + b_k    (k in i, f, g, o; r = h_{t-1}, or c_{t-1}
                                        where the variant's recurrence reads c;
                                        no r U_k where the variant leaves U_k unused)

    and hands the four to the variant's gate math, the code generated from the
    spec (``Variant.gates_forward``): the gate equations are the spec's, not
    restated here, so a variant changed in the spec changes this module too.
    Where the fused module multiplies x_t by one (in, 4H) W, this one makes the
    per-gate products of the article's teaching form: the layout of W, U and b
    (gate blocks in the order i, f, g, o) is what a comparison of the two checks.

    Parameters: ``W_k`` (in, H), ``U_k`` (H, H) and ``b_k`` (H,) for each gate
    k, and each row of the variant's own parameters as ``{name}_{row}`` (H,)
    (``p_i, p_f, p_o`` for "peephole"). ``forward(x, hx=None)`` takes x of shape
    (B, T, in) (``batch_first=True``, as in the article; (T, B, in) otherwise) and
    ``hx = (h_0, c_0)``, each (1, B, H), and returns ``y, (h_n, c_n)`` with y of
    shape (B, T, H) and h_n, c_n of shape (1, B, H), like ``LSTM``.
    """

    def __init__(self, input_size, hidden_size, variant="lstm", batch_first=True):
        super().__init__()
        self.input_size = validation.check_positive_int("input_size", input_size)
        self.hidden_size = validation.check_positive_int("hidden_size", hidden_size)
        resolved = spec.get_variant(variant)
        self.variant = resolved.name
        if not spec.is_registered(resolved):
            self._user_variant = resolved  # a user's Variant need not be registered
        self.batch_first = validation.check_bool("batch_first", batch_first)
        for gate in spec.GATE_ORDER:
            setattr(self, f"W_{gate}", nn.Parameter(torch.empty(input_size, hidden_size)))
            setattr(self, f"U_{gate}", nn.Parameter(torch.empty(hidden_size, hidden_size)))
            setattr(self, f"b_{gate}", nn.Parameter(torch.empty(hidden_size)))
        for name, rows in resolved.params.items():
            for row in rows:
                setattr(self, f"{name}_{row}", nn.Parameter(torch.empty(hidden_size)))
        bound = 1.0 / math.sqrt(hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)
        for name, value in resolved.param_init.items():  # the layer norms' gains 1, shifts 0
            for row in resolved.params[name]:
                nn.init.constant_(getattr(self, f"{name}_{row}"), value)

    @property
    def _variant_spec(self):
        return self.__dict__.get("_user_variant") or spec.get_variant(self.variant)

    @torch.no_grad()
    def load_numpy_params(self, layer_params):
        """Take one canonical layer-direction ``{"W", "U", "b", ...}`` (NumPy or torch)."""
        h = self.hidden_size
        for k, gate in enumerate(spec.GATE_ORDER):
            block = slice(k * h, (k + 1) * h)
            getattr(self, f"W_{gate}").copy_(torch.as_tensor(layer_params["W"])[:, block])
            getattr(self, f"U_{gate}").copy_(torch.as_tensor(layer_params["U"])[:, block])
            getattr(self, f"b_{gate}").copy_(torch.as_tensor(layer_params["b"])[block])
        for name, rows in self._variant_spec.params.items():
            for r, row in enumerate(rows):
                getattr(self, f"{name}_{row}").copy_(torch.as_tensor(layer_params[name])[r])
        return self

    def forward(self, x, hx=None):
        variant = self._variant_spec
        if not self.batch_first:
            x = x.transpose(0, 1)
        batch, steps, _ = x.shape
        if hx is None:
            h_t = c_t = x.new_zeros(batch, self.hidden_size)
        else:
            h_t, c_t = hx[0][0], hx[1][0]
        extra = {
            name: torch.stack([getattr(self, f"{name}_{row}") for row in rows])
            for name, rows in variant.params.items()
        }
        if variant.split:  # the bias is the gate math's (spec: split halves)
            extra["b"] = torch.cat([getattr(self, f"b_{gate}") for gate in spec.GATE_ORDER])
        outputs = []
        for t in range(steps):
            x_t = x[:, t, :]
            r = h_t if variant.recurrent_state == "h" else c_t
            zx, zr = [], []
            for gate in spec.GATE_ORDER:
                zx_k = x_t @ getattr(self, f"W_{gate}")
                if not variant.split:
                    zx_k = zx_k + getattr(self, f"b_{gate}")
                zr_k = None
                if gate not in variant.unused_recurrent_gates:
                    zr_k = r @ getattr(self, f"U_{gate}")
                zx.append(zx_k)
                zr.append(zr_k)
            if variant.split:  # x_t W_k and r U_k apart, side by side
                zr = [torch.zeros_like(a) if b is None else b for a, b in zip(zx, zr, strict=True)]
                z = torch.cat(zx + zr, -1)
            else:
                z = torch.cat([a if b is None else a + b for a, b in zip(zx, zr, strict=True)], -1)
            h_t, c_t, _ = variant.gates_forward(OPS, z, c_t, extra)
            outputs.append(h_t)
        y = torch.stack(outputs, dim=1 if self.batch_first else 0)
        return y, (h_t.unsqueeze(0), c_t.unsqueeze(0))


class QuantizedLSTM(nn.Module):
    r"""An ``LSTM`` for CPU inference with int8 weights (dynamic quantisation); made by
    ``quantize_dynamic`` or ``QuantizedLSTM.from_float(module)``.

    Every variant, projection included. Per layer-direction (``backends/torch_int8``)::

        zx = int8(x W) + b        the whole sequence's input projection, one int8 GEMM
        z_t = zx_t + int8(r U)    per step, an int8 GEMM (r = h_{t-1} or c_{t-1})
        m_t, c_t = gates(z_t)     the variant's generated gate code, float32
        h_t = int8(m_t W_hr)      with a projection (proj_size P > 0); h_t = m_t else

    W (in, 4H), U (H or P, 4H) and W_hr (H, P) are int8, symmetric, one scale per
    output unit; each product's activations are quantised per call (per tensor, 7 bits
    on fbgemm, x86 and onednn) by ``quantized::linear_dynamic``. Biases and the variant's own
    parameters (peepholes) stay float32. Shapes, inputs and outputs are ``LSTM``'s:
    ``forward(input, hx=None, *, mask=None)`` with input (T, B, in), (B, T, in) with
    ``batch_first``, (T, in) or a ``PackedSequence``, float32 on the CPU; returns
    ``output, (h_n, c_n)``. Inference only: no parameters, no gradient (an input that
    requires one is refused), and ``train(True)`` is refused; dropout is not applied.

    The state_dict holds the int8 weights as quantised tensors under the float
    module's names (``weight_ih_l0`` (4H, in) qint8, ...), the summed bias as
    ``bias_l{k}`` and the variant's own parameters as in the float module.
    """

    def __init__(self, module: LSTM):
        super().__init__()
        if not isinstance(module, LSTM):
            raise TypeError(
                f"module: expected a lstm_multi.torch.LSTM, got {type(module).__name__} "
                "(an nn.LSTM quantises with torch.ao.quantization.quantize_dynamic)"
            )
        weight = module.weight_ih_l0
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError(
                "module: expected a float32 module on the CPU (int8 inference runs fbgemm's "
                f"CPU kernels), got {weight.dtype} on {weight.device}; .float().cpu() it first"
            )
        if any(module.__dict__.get("zoneout", ())):
            raise ValueError(
                f"module: its zoneout {module.zoneout} changes the evaluation output too "
                "(h_t = p h_{t-1} + (1 - p) h~_t), and QuantizedLSTM's int8 loop runs no "
                "zoneout; quantise a module without zoneout"
            )
        for name in (
            "input_size", "hidden_size", "num_layers", "bias", "batch_first", "bidirectional",
            "proj_size", "dropout", "variant",
        ):  # fmt: skip
            setattr(self, name, getattr(module, name))
        if "_user_variant" in module.__dict__:
            self._user_variant = module._user_variant
        self.training = False
        self._extra_names = module._extra_names
        with torch.no_grad():
            params = module.canonical_params()
            self._qparams = [
                [torch_int8.quantize_direction(self._variant_spec, p) for p in layer]
                for layer in params
            ]
        self._register_weights()

    @classmethod
    def from_float(cls, mod, use_precomputed_fake_quant=False, **kwargs):
        """``torch.ao.quantization``'s conversion hook (``quantize_dynamic(model,
        {LSTM, ...}, mapping={..., LSTM: QuantizedLSTM})``): refuses a qconfig whose
        weights are not qint8, else ignores its observers (the scheme is fixed: the
        class doc)."""
        qconfig = getattr(mod, "qconfig", None)
        if qconfig is not None:
            dtype = qconfig.weight().dtype
            if dtype != torch.qint8:
                raise ValueError(
                    f"qconfig: QuantizedLSTM takes qint8 weights, the qconfig asks for {dtype}"
                )
        return cls(mod)

    _variant_spec = LSTM._variant_spec
    num_directions = LSTM.num_directions
    _check_input = LSTM._check_input
    _check_state = LSTM._check_state
    _mask_steps = LSTM._mask_steps

    def _compute_like(self):
        return torch.empty(0)  # float32 on the CPU

    def _names(self, layer, direction):
        sfx = f"l{layer}{_suffix(direction)}"
        return sfx, [(key, f"weight_{word}_{sfx}") for key, word in LSTM._extra_words(self)]

    def _register_weights(self):
        """The int8 weights, bias and own parameters as buffers (the state_dict's entries)."""
        for layer, directions in enumerate(self._qparams):
            for direction, q in enumerate(directions):
                sfx, extra = self._names(layer, direction)
                self.register_buffer(f"weight_ih_{sfx}", q["W"].weight)
                self.register_buffer(f"weight_hh_{sfx}", q["U"].weight)
                _, bias = torch.ops.quantized.linear_unpack(q["W"].packed)
                self.register_buffer(f"bias_{sfx}", bias)
                for key, name in extra:
                    self.register_buffer(name, q[key])
                if self.proj_size:
                    self.register_buffer(f"weight_hr_{sfx}", q[spec.PROJECTION].weight)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Take each int8 weight, bias and own parameter as saved, then pack them again."""
        for name, current in list(self._buffers.items()):
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if value.shape != current.shape or value.dtype != current.dtype:
                error_msgs.append(
                    f"{key}: expected {current.dtype} of shape {tuple(current.shape)}, got "
                    f"{value.dtype} of shape {tuple(value.shape)}"
                )
                continue
            self._buffers[name] = value
        self._repack()

    def _repack(self):
        """The packed int8 weights (``_qparams``) again from the buffers."""
        self._qparams = [
            [self._packed_direction(layer, direction) for direction in range(self.num_directions)]
            for layer in range(self.num_layers)
        ]

    def _packed_direction(self, layer, direction):
        sfx, extra = self._names(layer, direction)
        buffers = self._buffers
        q = {
            "W": torch_int8.pack(buffers[f"weight_ih_{sfx}"], buffers[f"bias_{sfx}"]),
            "U": torch_int8.pack(buffers[f"weight_hh_{sfx}"]),
        }
        q.update({key: buffers[name] for key, name in extra})
        if self.proj_size:
            q[spec.PROJECTION] = torch_int8.pack(buffers[f"weight_hr_{sfx}"])
        return q

    def __getstate__(self):
        # fbgemm's packed weights are rebuilt from the int8 buffers on loading, so that the
        # pickle holds tensors only (``torch.load``'s default ``weights_only=True`` takes it)
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state.pop("_qparams", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._repack()

    def dequantized_params(self):
        """The float parameters the int8 ones stand for, canonical
        (``params[layer][direction] = {"W", "U", "b", ...}``): for comparisons."""
        variant = self._variant_spec
        return [[torch_int8.dequantized(variant, q) for q in layer] for layer in self._qparams]

    def train(self, mode=True):
        if mode:
            raise RuntimeError(
                "QuantizedLSTM is for inference only (int8 weights, no gradient): train the "
                "float lstm_multi.torch.LSTM and quantise it again (quantize_dynamic)"
            )
        return super().train(False)

    def extra_repr(self):
        text = (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"variant={self.variant!r}, int8"
        )
        if self.bidirectional:
            text += ", bidirectional=True"
        if self.batch_first:
            text += ", batch_first=True"
        if self.proj_size:
            text += f", proj_size={self.proj_size}"
        return text

    def forward(self, input, hx=None, *, mask=None):
        """``LSTM.forward``'s inputs and outputs, computed with int8 products (class doc)."""
        packed = isinstance(input, PackedSequence)
        batch = self._check_input(input)
        unbatched = not packed and input.dim() == 2
        data = input.data if packed else input
        self._check_state(hx, batch, unbatched, data)
        tensors = [data, *(() if hx is None else hx)]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            raise RuntimeError(
                "QuantizedLSTM is for inference only: its int8 products have no gradient, "
                "and the input or hx requires one; call it under torch.no_grad() or "
                "torch.inference_mode() (train the float lstm_multi.torch.LSTM)"
            )
        steps_run = None if mask is None else self._mask_steps(mask, input, batch, unbatched)
        lengths = None
        if packed:
            x, lengths = pad_packed_sequence(input)
        else:
            x = input.unsqueeze(1) if unbatched else input
            if self.batch_first and not unbatched:
                x = x.transpose(0, 1)
            lengths = steps_run
        layers = self.num_layers * self.num_directions
        if hx is None:
            h0 = x.new_zeros(layers, batch, self.proj_size or self.hidden_size)
            c0 = x.new_zeros(layers, batch, self.hidden_size)
        else:
            h0, c0 = (s.unsqueeze(1) for s in hx) if unbatched else hx
        if batch == 0:
            width = (self.proj_size or self.hidden_size) * self.num_directions
            y, h_n, c_n = x.new_zeros(x.shape[0], 0, width), h0.clone(), c0.clone()
        else:
            y, h_n, c_n = torch_int8.forward(
                self._variant_spec, self._qparams, x.contiguous(), h0, c0, lengths
            )
        return _as_given(input, y, h_n, c_n, lengths, packed, unbatched, self.batch_first)


break_graph_at(QuantizedLSTM, ("forward",))  # run eagerly under torch.compile, as LSTM


def _torch_quantized_lstm(module, dtype):
    """PyTorch's own dynamic quantised LSTM (``torch.ao.nn.quantized.dynamic.LSTM``) of a
    module computing "lstm" without a projection, quantised as
    ``torch.ao.quantization.quantize_dynamic`` quantises an ``nn.LSTM`` by default."""
    from torch.ao.nn.quantized.dynamic import LSTM as DynamicLSTM  # noqa: PLC0415
    from torch.ao.quantization import default_dynamic_qconfig  # noqa: PLC0415

    lstm = module.to_torch()
    lstm.qconfig = default_dynamic_qconfig
    return DynamicLSTM.from_float(lstm)


def _routes_to_torch(module, native):
    return native and spec.computes_lstm(module._variant_spec) and not module.proj_size


def quantize_dynamic(model, qconfig_spec=None, dtype=torch.qint8, mapping=None, *, native=False):
    """``model`` for CPU inference in int8: every ``lstm_multi.torch.LSTM`` in it becomes
    a ``QuantizedLSTM`` (any variant, projection included), and the rest goes to
    ``torch.ao.quantization.quantize_dynamic(model, qconfig_spec, dtype, mapping)``, so
    ``nn.Linear`` and the like quantise as PyTorch quantises them. Returns a new model;
    ``model`` is left as it was (copied).

    ``native=True`` routes each ``LSTM`` computing "lstm" without a projection to
    PyTorch's own quantised LSTM instead (``torch.ao.nn.quantized.dynamic.LSTM``:
    exactly what torch's ``quantize_dynamic`` makes of an ``nn.LSTM`` with the same
    weights, per-tensor weights; no ``mask=``). Not the default: on the 2-core AMD EPYC
    it was faster only at B=1, H=256 (3.2 against 4.6 ms at T=100) and slower from B=8
    or H=512 on (33.2 against 23.1 ms at B=8, H=512; benchmarks/NOTES.md section 17),
    since ``QuantizedLSTM`` makes the whole sequence's input projection one int8 GEMM.
    ``dtype``: ``torch.qint8`` only.

    ``torch.ao.quantization.quantize_dynamic(model)`` called directly leaves an
    ``lstm_multi.torch.LSTM`` in float32, silently (PyTorch matches modules by exact
    type, and ours is a subclass of ``nn.LSTM``): call this function instead, or pass
    the mapping shown in docs/deployment.md.
    """
    import copy  # noqa: PLC0415

    import torch.ao.quantization as quantization  # noqa: PLC0415

    if dtype != torch.qint8:
        raise ValueError(
            f"dtype: expected torch.qint8 (int8 weights), got {dtype!r}; lstm_multi offers no "
            "float16 dynamic quantisation"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model)

    def convert(module):
        if _routes_to_torch(module, native):
            return _torch_quantized_lstm(module, dtype)
        return QuantizedLSTM(module)

    if isinstance(model, LSTM):
        return convert(model)
    for name, child in list(model.named_modules()):
        if isinstance(child, LSTM):
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attribute, convert(child))
    return quantization.quantize_dynamic(
        model, qconfig_spec=qconfig_spec, dtype=dtype, mapping=mapping, inplace=True
    )


torch.serialization.add_safe_globals([LSTM, NaiveLSTM, QuantizedLSTM])
