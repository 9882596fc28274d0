"""pytorch/examples ``word_language_model``: ``RNNModel`` and one step of its ``train()``.

Source: https://github.com/pytorch/examples/tree/main/word_language_model (``model.py``,
``main.py``), BSD-3-Clause licence, Copyright (c) 2017 PyTorch contributors. Restated here
for the LSTM model only (the GRU/RNN branches, weight tying's check and the Transformer
are left out); the swap is the one marked line. Shapes as in the original: ``data``
(bptt, batch) token ids, sequence first; ``hidden = (h, c)`` each (nlayers, batch, nhid);
``output`` (bptt * batch, ntoken) log-probabilities.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import lstm_multi.torch


class RNNModel(nn.Module):
    """Container module with an encoder, a recurrent module, and a decoder."""

    def __init__(
        self, ntoken, ninp, nhid, nlayers, dropout=0.5, tie_weights=False, variant=None, native=True
    ):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        if variant is None:
            self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        else:  # the swap
            self.rnn = lstm_multi.torch.LSTM(
                ninp, nhid, nlayers, dropout=dropout, variant=variant, native=native
            )
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        self.init_weights()
        self.nhid = nhid
        self.nlayers = nlayers

    def init_weights(self):
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (
            weight.new_zeros(self.nlayers, bsz, self.nhid),
            weight.new_zeros(self.nlayers, bsz, self.nhid),
        )


def batchify(data, bsz):
    """A 1-D token stream -> (steps, bsz): bsz contiguous columns, the remainder dropped."""
    nbatch = data.size(0) // bsz
    return data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t().contiguous()


def get_batch(source, i, bptt):
    """Inputs source[i:i+seq_len] and their next tokens, flattened, as targets."""
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)


def repackage_hidden(h):
    """Detach the hidden state from its history (truncated backpropagation through time)."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def evaluate(model, data_source, ntokens, *, bptt=35, eval_batch_size=10):
    """``main.py``'s ``evaluate()``: the mean NLL over ``data_source``, dropout off."""
    criterion = nn.NLLLoss()
    model.eval()
    total_loss = 0.0
    hidden = model.init_hidden(eval_batch_size)
    with torch.no_grad():
        for i in range(0, data_source.size(0) - 1, bptt):
            data, targets = get_batch(data_source, i, bptt)
            output, hidden = model(data, hidden)
            total_loss += len(data) * criterion(output, targets).item()
            hidden = repackage_hidden(hidden)
    return total_loss / (len(data_source) - 1)


def train(model, train_data, ntokens, *, bptt=35, lr=20.0, clip=0.25, batch_size=20):
    """``main.py``'s ``train()`` for one pass over ``train_data``: the loss of each batch.

    Each batch: detach the hidden state, forward, NLL loss, backward, clip the gradient norm
    to ``clip``, plain SGD with learning rate ``lr``.
    """
    criterion = nn.NLLLoss()
    model.train()
    hidden = model.init_hidden(batch_size)
    losses = []
    for i in range(0, train_data.size(0) - 1, bptt):
        data, targets = get_batch(train_data, i, bptt)
        model.zero_grad()
        hidden = repackage_hidden(hidden)
        output, hidden = model(data, hidden)
        loss = criterion(output, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        losses.append(loss.item())
    return losses
