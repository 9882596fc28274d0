"""``torch.nn`` modules: ``LSTM`` (a drop-in for ``torch.nn.LSTM`` with variants) and
``NaiveLSTM`` (the article's readable one-matrix-per-gate form, the reference).

``LSTM`` keeps ``nn.LSTM``'s constructor, defaults, return values and
state_dict keys (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``,
``bias_hh_l{k}``, with ``_reverse`` for direction 1), so an ``nn.LSTM``
state_dict loads into it. The "peephole" variant adds ``weight_peephole_l{k}``
of shape (3, H), rows (i, f, o). Its canonical parameters are
W = weight_ih^T, U = weight_hh^T, b = bias_ih + bias_hh.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import network, spec, validation
from .backends import torch_fused, torch_native
from .backends.torch_backend import OPS

__all__ = ["LSTM", "NaiveLSTM"]


def _suffix(direction):
    return "_reverse" if direction == 1 else ""


class LSTM(nn.Module):
    r"""A multi-layer LSTM, ``torch.nn.LSTM``'s drop-in, with the variants of ``lstm_multi.spec``.

    Arguments are ``nn.LSTM``'s (``proj_size`` must be 0), plus
    ``variant`` ("lstm", "peephole", "peephole_full") and ``native``: when True
    (the default) the plain variant runs on PyTorch's own kernel (cuDNN on CUDA),
    as ``nn.LSTM`` does; other variants always run the spec's loop.

    Inputs: ``input`` of shape (T, B, in), (B, T, in) with ``batch_first``, (T, in)
    unbatched, or a ``PackedSequence``; ``hx = (h_0, c_0)``, each (L * D, B, H).
    Returns ``output, (h_n, c_n)`` exactly as ``nn.LSTM`` does.
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
    ):
        super().__init__()
        self.input_size = validation.check_positive_int("input_size", input_size)
        self.hidden_size = validation.check_positive_int("hidden_size", hidden_size)
        self.num_layers = validation.check_positive_int("num_layers", num_layers)
        self.bias = validation.check_bool("bias", bias)
        self.batch_first = validation.check_bool("batch_first", batch_first)
        self.bidirectional = validation.check_bool("bidirectional", bidirectional)
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, (int, float))
            or not 0 <= dropout <= 1
        ):
            raise ValueError(f"dropout: expected a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout: applies between layers, so it has no effect with num_layers=1 "
                f"(got dropout={dropout})",
                stacklevel=2,
            )
        self.dropout = float(dropout)
        if proj_size != 0:
            raise NotImplementedError(
                f"proj_size: projections are not supported by lstm_multi; expected 0, got {proj_size!r}"
            )
        self.proj_size = 0
        self.variant = spec.get_variant(variant).name
        self.native = bool(native)
        factory = {"device": device, "dtype": dtype}
        num_directions = 2 if bidirectional else 1
        h4 = 4 * hidden_size
        for layer in range(num_layers):
            size = spec.layer_input_size(layer, input_size, hidden_size, num_directions)
            for direction in range(num_directions):
                sfx = f"l{layer}{_suffix(direction)}"
                shapes = {f"weight_ih_{sfx}": (h4, size), f"weight_hh_{sfx}": (h4, hidden_size)}
                if bias:
                    shapes.update({f"bias_ih_{sfx}": (h4,), f"bias_hh_{sfx}": (h4,)})
                for key, shape in spec.get_variant(variant).extra_param_shapes(hidden_size).items():
                    shapes[f"weight_{self._extra_names[key]}_{sfx}"] = shape
                for name, shape in shapes.items():
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
        self.reset_parameters()

    #: canonical extra-parameter key -> the word in its state_dict name
    _extra_names = {"p": "peephole"}

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    def reset_parameters(self):
        """Every parameter from U(-1/sqrt(H), 1/sqrt(H)), as ``nn.LSTM``."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self):
        """Kept for ``nn.LSTM`` compatibility; parameters are used as they are."""

    def extra_repr(self):
        text = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            text += f", num_layers={self.num_layers}"
        if not self.bias:
            text += ", bias=False"
        if self.batch_first:
            text += ", batch_first=True"
        if self.dropout:
            text += f", dropout={self.dropout}"
        if self.bidirectional:
            text += ", bidirectional=True"
        return text + f", variant={self.variant!r}"

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
                for key, word in self._extra_names.items():
                    name = f"weight_{word}_l{layer}{_suffix(direction)}"
                    if hasattr(self, name):
                        p[key] = getattr(self, name)
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
            self.variant, self.input_size, self.hidden_size, self.num_layers, self.num_directions
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
                for key, word in self._extra_names.items():
                    if key in p:
                        getattr(self, f"weight_{word}_{sfx}").copy_(torch.as_tensor(p[key]))
        return self

    # conversion with torch.nn.LSTM --------------------------------------------

    @classmethod
    def from_torch(cls, lstm: nn.LSTM, variant="lstm", native=True):
        """A module with ``lstm``'s configuration and weights.

        With variant "peephole" the peephole weights start at zero, so the new
        module computes exactly what ``lstm`` does until they are trained.
        """
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"lstm: expected a torch.nn.LSTM, got {type(lstm).__name__}")
        if lstm.proj_size:
            raise NotImplementedError(f"lstm: proj_size is not supported, got {lstm.proj_size}")
        weight = lstm.weight_ih_l0
        module = cls(
            lstm.input_size,
            lstm.hidden_size,
            lstm.num_layers,
            lstm.bias,
            lstm.batch_first,
            lstm.dropout,
            lstm.bidirectional,
            device=weight.device,
            dtype=weight.dtype,
            variant=variant,
            native=native,
        )
        state = lstm.state_dict()
        with torch.no_grad():
            for name, value in module.named_parameters():
                if name in state:
                    value.copy_(state[name])
                else:
                    value.zero_()
        return module

    def to_torch(self) -> nn.LSTM:
        """An ``nn.LSTM`` with this module's configuration and weights (variant "lstm" only)."""
        if self.variant != "lstm":
            raise ValueError(
                f"variant: torch.nn.LSTM can only hold the 'lstm' variant, this module is {self.variant!r}"
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
            device=weight.device,
            dtype=weight.dtype,
        )
        lstm.load_state_dict(self.state_dict())
        return lstm

    # forward -------------------------------------------------------------------

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        lengths = None
        if packed:
            x, lengths = pad_packed_sequence(input)
            unbatched = False
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(
                    f"input: expected a tensor or PackedSequence, got {type(input).__name__}"
                )
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"input: expected a 2-D (unbatched) or 3-D tensor, got shape {tuple(input.shape)}"
                )
            unbatched = input.dim() == 2
            x = input.unsqueeze(1) if unbatched else input
            if self.batch_first and not unbatched:
                x = x.transpose(0, 1)
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"input: expected input_size {self.input_size} on the last axis, "
                f"got shape {tuple(input.data.shape if packed else input.shape)}"
            )
        weight = self.weight_ih_l0
        if x.dtype != weight.dtype:
            raise TypeError(f"input: expected dtype {weight.dtype} (the module's), got {x.dtype}")
        h0, c0 = self._initial_state(hx, x, unbatched)
        if self.native and torch_native.supports(spec.get_variant(self.variant)):
            y, h_n, c_n = torch_native.run_flat(
                self._flat_weights(),
                x,
                h0,
                c0,
                lengths,
                self.num_layers,
                self.bidirectional,
                self.bias,
                self.dropout,
                self.training,
            )
        else:
            between = None
            if self.dropout > 0 and self.training:

                def between(layer_input):
                    return nn.functional.dropout(layer_input, self.dropout, True)

            y, h_n, c_n, _, _ = network.forward(
                OPS,
                self.variant,
                self.canonical_params(),
                x,
                h0,
                c0,
                None if lengths is None else lengths.to(x.device),
                torch_fused.run_direction,
                between,
            )
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
        return (y.transpose(0, 1) if self.batch_first else y), (h_n, c_n)

    def _flat_weights(self):
        kinds = (
            ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            if self.bias
            else ("weight_ih", "weight_hh")
        )
        return [
            self._param(kind, layer, direction)
            for layer in range(self.num_layers)
            for direction in range(self.num_directions)
            for kind in kinds
        ]

    def _initial_state(self, hx, x, unbatched):
        shape = (self.num_layers * self.num_directions, x.shape[1], self.hidden_size)
        if hx is None:
            zeros = x.new_zeros(shape)
            return zeros, zeros
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"hx: expected a pair (h_0, c_0), got {type(hx).__name__}")
        state = []
        for name, s in zip(("h_0", "c_0"), hx):
            if not isinstance(s, torch.Tensor):
                raise TypeError(f"hx {name}: expected a tensor, got {type(s).__name__}")
            s = s.unsqueeze(1) if unbatched and s.dim() == 2 else s
            if tuple(s.shape) != shape:
                expected = (shape[0], shape[2]) if unbatched else shape
                raise ValueError(
                    f"hx {name}: expected shape {expected}, got {tuple(hx[len(state)].shape)}"
                )
            if s.dtype != x.dtype:
                raise TypeError(f"hx {name}: expected dtype {x.dtype} (the input's), got {s.dtype}")
            state.append(s)
        return state[0], state[1]


class NaiveLSTM(nn.Module):
    r"""The article's readable LSTM: one W, U, b per gate, eight products a step.

    One layer, one direction; written straight from the equations (not from the
    spec) so that it is an independent reference for the fused form. Parameters
    are ``W_i, U_i, b_i`` ... for gates i, f, g, o, plus ``p_i, p_f, p_o`` for
    the "peephole" variant. ``forward(x, hx=None)`` takes x of shape (B, T, in)
    (``batch_first=True``, as in the article) and returns ``y, (h_n, c_n)`` with
    h_n, c_n of shape (1, B, H), like ``LSTM``.
    """

    def __init__(self, input_size, hidden_size, variant="lstm", batch_first=True):
        super().__init__()
        self.input_size = validation.check_positive_int("input_size", input_size)
        self.hidden_size = validation.check_positive_int("hidden_size", hidden_size)
        self.variant = spec.get_variant(variant).name
        self.batch_first = validation.check_bool("batch_first", batch_first)
        for gate in spec.GATE_ORDER:
            setattr(self, f"W_{gate}", nn.Parameter(torch.empty(input_size, hidden_size)))
            setattr(self, f"U_{gate}", nn.Parameter(torch.empty(hidden_size, hidden_size)))
            setattr(self, f"b_{gate}", nn.Parameter(torch.empty(hidden_size)))
        if self.variant == "peephole":
            for gate in ("i", "f", "o"):
                setattr(self, f"p_{gate}", nn.Parameter(torch.empty(hidden_size)))
        bound = 1.0 / math.sqrt(hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    @torch.no_grad()
    def load_numpy_params(self, layer_params):
        """Take one canonical layer-direction ``{"W", "U", "b", ...}`` (NumPy or torch)."""
        h = self.hidden_size
        for k, gate in enumerate(spec.GATE_ORDER):
            block = slice(k * h, (k + 1) * h)
            getattr(self, f"W_{gate}").copy_(torch.as_tensor(layer_params["W"])[:, block])
            getattr(self, f"U_{gate}").copy_(torch.as_tensor(layer_params["U"])[:, block])
            getattr(self, f"b_{gate}").copy_(torch.as_tensor(layer_params["b"])[block])
        if self.variant == "peephole":
            for row, gate in enumerate(("i", "f", "o")):
                getattr(self, f"p_{gate}").copy_(torch.as_tensor(layer_params["p"])[row])
        return self

    def forward(self, x, hx=None):
        if not self.batch_first:
            x = x.transpose(0, 1)
        batch, steps, _ = x.shape
        if hx is None:
            h_t = c_t = x.new_zeros(batch, self.hidden_size)
        else:
            h_t, c_t = hx[0][0], hx[1][0]
        outputs = []
        for t in range(steps):
            x_t = x[:, t, :]
            if self.variant == "lstm":
                i_t = torch.sigmoid(x_t @ self.W_i + h_t @ self.U_i + self.b_i)
                f_t = torch.sigmoid(x_t @ self.W_f + h_t @ self.U_f + self.b_f)
                g_t = torch.tanh(x_t @ self.W_g + h_t @ self.U_g + self.b_g)
                o_t = torch.sigmoid(x_t @ self.W_o + h_t @ self.U_o + self.b_o)
                c_t = f_t * c_t + i_t * g_t
                h_t = o_t * torch.tanh(c_t)
            elif self.variant == "peephole":
                i_t = torch.sigmoid(x_t @ self.W_i + h_t @ self.U_i + self.b_i + self.p_i * c_t)
                f_t = torch.sigmoid(x_t @ self.W_f + h_t @ self.U_f + self.b_f + self.p_f * c_t)
                g_t = torch.tanh(x_t @ self.W_g + h_t @ self.U_g + self.b_g)
                c_t = f_t * c_t + i_t * g_t
                o_t = torch.sigmoid(x_t @ self.W_o + h_t @ self.U_o + self.b_o + self.p_o * c_t)
                h_t = o_t * torch.tanh(c_t)
            else:  # "peephole_full": the gates read c_{t-1}; g has no recurrent term
                i_t = torch.sigmoid(x_t @ self.W_i + c_t @ self.U_i + self.b_i)
                f_t = torch.sigmoid(x_t @ self.W_f + c_t @ self.U_f + self.b_f)
                g_t = torch.sigmoid(x_t @ self.W_g + self.b_g)
                o_t = torch.sigmoid(x_t @ self.W_o + c_t @ self.U_o + self.b_o)
                c_t = f_t * c_t + i_t * g_t
                h_t = torch.tanh(o_t * c_t)
            outputs.append(h_t)
        y = torch.stack(outputs, dim=1 if self.batch_first else 0)
        return y, (h_t.unsqueeze(0), c_t.unsqueeze(0))
