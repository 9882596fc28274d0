"""patrick-kidger/equinox ``examples/train_rnn.ipynb``: the RNN classifier of clockwise and
anticlockwise spirals, its data and its training step.

Source: https://github.com/patrick-kidger/equinox/blob/main/examples/train_rnn.ipynb,
Apache License 2.0, Copyright Patrick Kidger. Restated here with an LSTM cell where the
example has ``eqx.nn.GRUCell`` (an LSTM's carry is the pair ``(h, c)``, so the scan's
initial carry and the classifier's input are the pair's), the sizes as arguments (the
example's are the defaults: 10000 spirals of 16 steps, batches of 32, hidden 16, Adam
3e-3), the print-out left out, and the optimiser's state made for the model's
floating-point arrays only (``eqx.filter(model, eqx.is_inexact_array)``, as Equinox's
later examples do: ``optim.init(model)`` gives the integer ``hidden_size`` a state that
current optax then fails to match with its ``None`` gradient). The swap is the one marked line:
``lstm_multi.equinox.LSTMCell`` where the LSTM version has ``eqx.nn.LSTMCell``.

Shapes: ``x`` (dataset_size, 16, 2), ``y`` (dataset_size, 1); the model takes one
sequence (16, 2) and returns (1,), ``jax.vmap`` over the batch.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jrandom
import optax

import lstm_multi.equinox


def dataloader(arrays, batch_size, *, key):
    """Endless shuffled batches of ``arrays`` (a full batch each, the rest dropped)."""
    dataset_size = arrays[0].shape[0]
    indices = jnp.arange(dataset_size)
    while True:
        perm = jrandom.permutation(key, indices)
        (key,) = jrandom.split(key, 1)
        for start in range(0, dataset_size - batch_size + 1, batch_size):
            batch_perm = perm[start : start + batch_size]
            yield tuple(array[batch_perm] for array in arrays)


def get_data(dataset_size, *, key):
    """Spirals of 16 points with random phase; the first half clockwise, label 0."""
    t = jnp.linspace(0, 2 * math.pi, 16)
    offset = jrandom.uniform(key, (dataset_size, 1), minval=0, maxval=2 * math.pi)
    x1 = jnp.sin(t + offset) / (1 + t)
    x2 = jnp.cos(t + offset) / (1 + t)
    y = jnp.ones((dataset_size, 1))
    half_dataset_size = dataset_size // 2
    x1 = x1.at[:half_dataset_size].multiply(-1)
    y = y.at[:half_dataset_size].set(0)
    return jnp.stack([x1, x2], axis=-1), y


class RNN(eqx.Module):
    """A recurrent cell scanned over the sequence, then a linear map and a sigmoid."""

    hidden_size: int
    cell: eqx.Module
    linear: eqx.nn.Linear
    bias: jax.Array

    def __init__(self, in_size, out_size, hidden_size, *, key, variant=None):
        ckey, lkey = jrandom.split(key)
        self.hidden_size = hidden_size
        if variant is None:
            self.cell = eqx.nn.LSTMCell(in_size, hidden_size, key=ckey)
        else:  # the swap
            self.cell = lstm_multi.equinox.LSTMCell(in_size, hidden_size, variant=variant, key=ckey)
        self.linear = eqx.nn.Linear(hidden_size, out_size, use_bias=False, key=lkey)
        self.bias = jnp.zeros(out_size)

    def __call__(self, input):
        hidden = (jnp.zeros((self.hidden_size,)), jnp.zeros((self.hidden_size,)))

        def f(carry, inp):
            return self.cell(inp, carry), None

        (out, _), _ = lax.scan(f, hidden, input)
        # sigmoid because we're performing binary classification
        return jax.nn.sigmoid(self.linear(out) + self.bias)


def make_step_function(optim):
    """The example's jitted training step for the optax optimiser ``optim``."""

    @eqx.filter_value_and_grad
    def compute_loss(model, x, y):
        pred_y = jax.vmap(model)(x)
        # Trains with respect to binary cross-entropy
        return -jnp.mean(y * jnp.log(pred_y) + (1 - y) * jnp.log(1 - pred_y))

    @eqx.filter_jit
    def make_step(model, x, y, opt_state):
        loss, grads = compute_loss(model, x, y)
        updates, opt_state = optim.update(grads, opt_state)
        model = eqx.apply_updates(model, updates)
        return loss, model, opt_state

    return make_step


def train(model, xs, ys, *, batch_size=32, learning_rate=3e-3, steps=200, key):
    """The example's ``main`` loop from ``model``: (trained model, the loss of each step)."""
    iter_data = dataloader((xs, ys), batch_size, key=key)
    optim = optax.adam(learning_rate)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    make_step = make_step_function(optim)
    losses = []
    for _, (x, y) in zip(range(steps), iter_data, strict=False):
        loss, model, opt_state = make_step(model, x, y, opt_state)
        losses.append(loss.item())
    return model, losses


def accuracy(model, xs, ys):
    """The fraction of spirals classified right."""
    pred_ys = jax.vmap(model)(xs)
    return (jnp.sum((pred_ys > 0.5) == ys) / xs.shape[0]).item()
