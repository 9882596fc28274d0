"""The modules of "Building a LSTM by hand on PyTorch", their products as written there.

``NaiveCustomLSTM`` (one matrix per gate; its input matrices are named U_*, its
recurrent ones V_*, and the g gate c) and ``CustomLSTM`` (one fused W, U, bias;
``peephole=True`` is the article's peephole form, lstm_multi's "peephole_full").
They are the starting point users have today: the benchmark times
``CustomLSTM`` as a peer, and tests/test_article.py compares both with the
backends. ``article_modules()`` defines them on first use, so importing this
module imports no framework.

What they model is the article's way of running a step: its parameters, its
matrix products and its Python loop under autograd. The preactivations are the
article's products::

    naive:     z_k = x_t U_k + r V_k + b_k      k in (i, f, c, o), (B, H) each
    fused:     z   = x_t W + r U + bias         (B, 4H)
    peephole:  the fused z, then z_g = (x_t W + bias)_g: the article's second
               product (its g gate does not read r)

with r = h_{t-1} (r = c_{t-1} in the peephole form).

The gate math that follows is not restated here: it is the code generated from
the spec's variant (``Variant.array_code``), "lstm" for the plain modules and
"peephole_full" for the peephole form, looked up by name at each call. So the
article's nonlinearities and state updates are the spec's, and a variant changed
in the spec changes these modules too. Which state r is, and which gate blocks
skip r U (the second product), are the variant's say as well
(``recurrent_state``, ``unused_recurrent_gates``).
"""

from __future__ import annotations

import functools
import math


@functools.cache
def article_modules():
    """(NaiveCustomLSTM, CustomLSTM), the article's classes."""
    import torch
    from torch import nn

    from .. import spec
    from ..backends.torch_ops import OPS

    class NaiveCustomLSTM(nn.Module):
        def __init__(self, input_sz: int, hidden_sz: int):
            super().__init__()
            self.input_size = input_sz
            self.hidden_size = hidden_sz
            # i_t
            self.U_i = nn.Parameter(torch.Tensor(input_sz, hidden_sz))
            self.V_i = nn.Parameter(torch.Tensor(hidden_sz, hidden_sz))
            self.b_i = nn.Parameter(torch.Tensor(hidden_sz))
            # f_t
            self.U_f = nn.Parameter(torch.Tensor(input_sz, hidden_sz))
            self.V_f = nn.Parameter(torch.Tensor(hidden_sz, hidden_sz))
            self.b_f = nn.Parameter(torch.Tensor(hidden_sz))
            # c_t
            self.U_c = nn.Parameter(torch.Tensor(input_sz, hidden_sz))
            self.V_c = nn.Parameter(torch.Tensor(hidden_sz, hidden_sz))
            self.b_c = nn.Parameter(torch.Tensor(hidden_sz))
            # o_t
            self.U_o = nn.Parameter(torch.Tensor(input_sz, hidden_sz))
            self.V_o = nn.Parameter(torch.Tensor(hidden_sz, hidden_sz))
            self.b_o = nn.Parameter(torch.Tensor(hidden_sz))
            self.init_weights()

        def init_weights(self):
            stdv = 1.0 / math.sqrt(self.hidden_size)
            for weight in self.parameters():
                weight.data.uniform_(-stdv, stdv)

        def forward(self, x, init_states=None):
            bs, seq_sz, _ = x.size()
            hidden_seq = []
            if init_states is None:
                h_t, c_t = (
                    torch.zeros(bs, self.hidden_size).to(x.device),
                    torch.zeros(bs, self.hidden_size).to(x.device),
                )
            else:
                h_t, c_t = init_states
            variant = spec.get_variant("lstm")
            gate_math = _gate_math(variant)
            for t in range(seq_sz):
                x_t = x[:, t, :]
                r_t = c_t if variant.recurrent_state == "c" else h_t
                h_t, c_t, _ = gate_math(
                    OPS,
                    x_t @ self.U_i + r_t @ self.V_i + self.b_i,
                    x_t @ self.U_f + r_t @ self.V_f + self.b_f,
                    x_t @ self.U_c + r_t @ self.V_c + self.b_c,
                    x_t @ self.U_o + r_t @ self.V_o + self.b_o,
                    c_t,
                )
                hidden_seq.append(h_t.unsqueeze(0))
            hidden_seq = torch.cat(hidden_seq, dim=0)
            hidden_seq = hidden_seq.transpose(0, 1).contiguous()
            return hidden_seq, (h_t, c_t)

    class CustomLSTM(nn.Module):
        def __init__(self, input_sz, hidden_sz, peephole=False):
            super().__init__()
            self.input_sz = input_sz
            self.hidden_size = hidden_sz
            self.peephole = peephole
            self.W = nn.Parameter(torch.Tensor(input_sz, hidden_sz * 4))
            self.U = nn.Parameter(torch.Tensor(hidden_sz, hidden_sz * 4))
            self.bias = nn.Parameter(torch.Tensor(hidden_sz * 4))
            self.init_weights()

        def init_weights(self):
            stdv = 1.0 / math.sqrt(self.hidden_size)
            for weight in self.parameters():
                weight.data.uniform_(-stdv, stdv)

        def forward(self, x, init_states=None):
            bs, seq_sz, _ = x.size()
            hidden_seq = []
            if init_states is None:
                h_t, c_t = (
                    torch.zeros(bs, self.hidden_size).to(x.device),
                    torch.zeros(bs, self.hidden_size).to(x.device),
                )
            else:
                h_t, c_t = init_states
            HS = self.hidden_size
            variant = spec.get_variant("peephole_full" if self.peephole else "lstm")
            gate_math = _gate_math(variant)
            for t in range(seq_sz):
                x_t = x[:, t, :]
                # batch the computations into a single matrix multiplication
                r_t = c_t if variant.recurrent_state == "c" else h_t
                gates = x_t @ self.W + r_t @ self.U + self.bias
                z = [gates[:, k * HS : (k + 1) * HS] for k in range(4)]
                if variant.unused_recurrent_gates:  # the peephole form's second product
                    zx = x_t @ self.W + self.bias
                    for k, gate in enumerate(spec.GATE_ORDER):
                        if gate in variant.unused_recurrent_gates:
                            z[k] = zx[:, k * HS : (k + 1) * HS]
                h_t, c_t, _ = gate_math(OPS, *z, c_t)
                hidden_seq.append(h_t.unsqueeze(0))
            hidden_seq = torch.cat(hidden_seq, dim=0)
            hidden_seq = hidden_seq.transpose(0, 1).contiguous()
            return hidden_seq, (h_t, c_t)

    return NaiveCustomLSTM, CustomLSTM


def _gate_math(variant):
    """The variant's generated forward, ``(ops, z_i, z_f, z_g, z_o, c_{t-1}) -> (h_t, c_t,
    saved)`` with each z (B, H): the article's modules have no parameters of the variant's
    own (the peephole rows of "peephole" and the Greff variants), so none are passed."""
    if variant.params:
        raise ValueError(
            f"variant: the article's modules have no {sorted(variant.params)} parameters, "
            f"which {variant.name!r} reads"
        )
    return variant.array_code[0]


def article_module(input_size, hidden_size, peephole=False):
    """The article's optimized module (its peephole form with ``peephole=True``)."""
    return article_modules()[1](input_size, hidden_size, peephole)
