"""The plain LSTM on PyTorch's own kernel (``torch._VF.lstm``, cuDNN on CUDA).

Canonical parameters map onto ``torch.nn.LSTM``'s as weight_ih = W^T,
weight_hh = U^T, bias_ih = b, bias_hh = 0 and, with a projection,
weight_hr = W_hr^T (``_VF.lstm`` sees the projection from h's width). Variable lengths go through
``pack_padded_sequence`` exactly as ``nn.LSTM`` users do.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import spec


def supports(variant):
    """Whether PyTorch's kernel computes ``variant``: it computes the built-in "lstm"
    (decided by what it computes, ``spec.computes_lstm``, never by its name)."""
    return spec.computes_lstm(variant)


def flat_weights(params):
    """Canonical params -> nn.LSTM's flat list [w_ih, w_hh, b_ih, b_hh(, w_hr)] per layer-direction.

    On CUDA the matrices are made contiguous: cuDNN copies each weight into its
    own flat buffer with ``view_as``, which a transposed view cannot give (the
    CPU kernel reads the transposed views as they are, with no copy).
    """
    flat = []
    for layer in params:
        for p in layer:
            w_ih, w_hh = p["W"].T, p["U"].T
            if w_ih.is_cuda:
                w_ih, w_hh = w_ih.contiguous(), w_hh.contiguous()
            flat += [w_ih, w_hh, p["b"], torch.zeros_like(p["b"])]
            if "W_hr" in p:  # the projection: nn.LSTM's weight_hr (P, H) = W_hr^T
                w_hr = p["W_hr"].T
                flat.append(w_hr.contiguous() if w_hr.is_cuda else w_hr)
    return flat


@contextlib.contextmanager
def _weights_copied_by_cudnn():
    """cuDNN warns that it copies weights held outside one flat buffer into its own;
    canonical parameters always are, and the copy is the intended cost here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="RNN module weights are not part of single")
        yield


def run_flat(
    weights,
    x,
    h0,
    c0,
    lengths,
    num_layers,
    bidirectional,
    has_bias=True,
    dropout=0.0,
    training=False,
):
    """Time-major x (T, B, in) through ``_VF.lstm``; returns (y, h_n, c_n)."""
    if lengths is None:
        batch_major = x.transpose(0, 1)
        # a time-major view of a batch-first input: let the kernel read the input as
        # it lies (batch_first=True) rather than the transposed view; y comes back
        # as the same kind of view
        batch_first = batch_major.is_contiguous() and not x.is_contiguous()
        with _weights_copied_by_cudnn():
            y, h_n, c_n = torch._VF.lstm(
                batch_major if batch_first else x,
                (h0, c0),
                weights,
                has_bias,
                num_layers,
                dropout,
                training,
                bidirectional,
                batch_first,
            )
        return (y.transpose(0, 1) if batch_first else y), h_n, c_n
    packed = pack_padded_sequence(x, lengths.detach().cpu().to(torch.int64), enforce_sorted=False)
    order, inverse = packed.sorted_indices, packed.unsorted_indices
    state = (h0.index_select(1, order.to(h0.device)), c0.index_select(1, order.to(c0.device)))
    with _weights_copied_by_cudnn():
        data, h_n, c_n = torch._VF.lstm(
            packed.data,
            packed.batch_sizes,
            state,
            weights,
            has_bias,
            num_layers,
            dropout,
            training,
            bidirectional,
        )
    out = PackedSequence(data, packed.batch_sizes, order, inverse)
    y, _ = pad_packed_sequence(out, total_length=x.shape[0])
    inverse = inverse.to(h_n.device)
    return y, h_n.index_select(1, inverse), c_n.index_select(1, inverse)


def forward(params, x, h0, c0, lengths):
    weights = flat_weights(params)
    layers, bidirectional = len(params), len(params[0]) == 2
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (*weights, x, h0, c0))
    if not differentiable:
        # inference mode lets _VF.lstm take its fused oneDNN kernel on the CPU,
        # about 2x faster than under grad mode
        with torch.no_grad():
            return run_flat(weights, x, h0, c0, lengths, layers, bidirectional)
    # cuDNN keeps what its backward reads (the reserve space) only in training
    # mode; with dropout 0 the mode changes nothing else. The CPU kernel needs no
    # such flag, and keeps its own choice of kernel without it.
    return run_flat(weights, x, h0, c0, lengths, layers, bidirectional, training=x.is_cuda)
