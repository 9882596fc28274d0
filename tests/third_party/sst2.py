"""google/flax ``examples/sst2``: ``TextClassifier`` and its ``train_step``.

Source: https://github.com/google/flax/tree/main/examples/sst2 (``models.py``,
``train.py``), Apache License 2.0, Copyright The Flax Authors. Restated here, docstrings
shortened and the TensorBoard/tf.data plumbing left out; the swap is the one marked line
in ``SimpleLSTM``, which puts ``lstm_multi.flax.LinenCell`` where the example has
``nn.OptimizedLSTMCell`` (the carry and the scan are Flax's, unchanged).

Shapes as in the example: ``token_ids`` (batch, seq_length) integers, ``lengths`` (batch,)
in 1..seq_length, padding at the end; ``logits`` (batch, output_size).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.training import train_state

from lstm_multi.flax import LinenCell


def sequence_mask(lengths, max_length):
    """(batch, max_length) booleans: True on each sequence's first ``lengths[n]`` steps."""
    return jnp.arange(max_length)[None] < lengths[:, None]


@jax.vmap
def flip_sequences(inputs, lengths):
    """Reverse each sequence within its length, the padding left at the end."""
    max_length = inputs.shape[0]
    return jnp.flip(jnp.roll(inputs, max_length - lengths, axis=0), axis=0)


class WordDropout(nn.Module):
    """Replace each input id by ``unk_idx`` with probability ``dropout_rate``."""

    dropout_rate: float
    unk_idx: int
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, inputs, deterministic=None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or self.dropout_rate == 0.0:
            return inputs
        mask = jax.random.bernoulli(self.make_rng("dropout"), self.dropout_rate, inputs.shape)
        return jnp.where(mask, jnp.array([self.unk_idx]), inputs)


class Embedder(nn.Module):
    """Token ids -> (batch, seq_length, embedding_size), with word dropout and dropout."""

    vocab_size: int
    embedding_size: int
    embedding_init: Any = nn.initializers.normal(stddev=0.1)
    dropout_rate: float = 0.0
    word_dropout_rate: float = 0.0
    unk_idx: int | None = None
    deterministic: bool | None = None
    dtype: Any = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding", self.embedding_init, (self.vocab_size, self.embedding_size), self.dtype
        )
        self.dropout_layer = nn.Dropout(rate=self.dropout_rate)
        self.word_dropout_layer = WordDropout(self.word_dropout_rate, self.unk_idx)

    def __call__(self, inputs, deterministic=None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        inputs = self.word_dropout_layer(inputs, deterministic=deterministic)
        return self.dropout_layer(self.embedding[inputs], deterministic=deterministic)


class SimpleLSTM(nn.Module):
    """A unidirectional LSTM: the cell scanned over axis 1, its parameters broadcast."""

    hidden_size: int
    variant: str | None = None  # None: Flax's nn.OptimizedLSTMCell

    @functools.partial(
        nn.transforms.scan,
        variable_broadcast="params",
        in_axes=1,
        out_axes=1,
        split_rngs={"params": False},
    )
    @nn.compact
    def __call__(self, carry, x):
        if self.variant is None:
            return nn.OptimizedLSTMCell(self.hidden_size)(carry, x)
        return LinenCell(self.hidden_size, variant=self.variant)(carry, x)  # the swap

    def initialize_carry(self, input_shape):
        return nn.OptimizedLSTMCell(self.hidden_size, parent=None).initialize_carry(
            jax.random.key(0), input_shape
        )


class SimpleBiLSTM(nn.Module):
    """Two SimpleLSTMs, the second over each sequence reversed within its length."""

    hidden_size: int
    variant: str | None = None

    def setup(self):
        self.forward_lstm = SimpleLSTM(self.hidden_size, self.variant)
        self.backward_lstm = SimpleLSTM(self.hidden_size, self.variant)

    def __call__(self, embedded_inputs, lengths):
        carry = self.forward_lstm.initialize_carry(embedded_inputs[:, 0].shape)
        _, forward_outputs = self.forward_lstm(carry, embedded_inputs)
        reversed_inputs = flip_sequences(embedded_inputs, lengths)
        carry = self.backward_lstm.initialize_carry(reversed_inputs[:, 0].shape)
        _, backward_outputs = self.backward_lstm(carry, reversed_inputs)
        backward_outputs = flip_sequences(backward_outputs, lengths)
        return jnp.concatenate([forward_outputs, backward_outputs], -1)


class MLP(nn.Module):
    """Dense -> tanh -> dropout -> Dense (no output bias)."""

    hidden_size: int
    output_size: int
    dropout_rate: float = 0.0
    output_bias: bool = False
    deterministic: bool | None = None

    def setup(self):
        self.intermediate_layer = nn.Dense(self.hidden_size)
        self.output_layer = nn.Dense(self.output_size, use_bias=self.output_bias)
        self.dropout_layer = nn.Dropout(rate=self.dropout_rate)

    def __call__(self, inputs, deterministic=None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        hidden = self.dropout_layer(
            nn.tanh(self.intermediate_layer(inputs)), deterministic=deterministic
        )
        return self.output_layer(hidden)


class KeysOnlyMlpAttention(nn.Module):
    """Bahdanau-style attention scores from the keys alone, softmax over valid steps."""

    hidden_size: int

    @nn.compact
    def __call__(self, keys, mask):
        hidden = nn.Dense(self.hidden_size, name="keys", use_bias=False)(keys)
        scores = nn.Dense(1, name="energy", use_bias=False)(nn.tanh(hidden)).squeeze(-1)
        scores = jnp.where(mask, scores, -jnp.inf)
        return nn.softmax(scores, axis=-1)


class AttentionClassifier(nn.Module):
    """Attention-weighted sum of the encoded steps -> MLP -> logits."""

    hidden_size: int
    output_size: int
    dropout_rate: float = 0.0
    deterministic: bool | None = None

    def setup(self):
        self.dropout_layer = nn.Dropout(rate=self.dropout_rate)
        self.keys_only_mlp_attention = KeysOnlyMlpAttention(hidden_size=self.hidden_size)
        self.mlp = MLP(self.hidden_size, self.output_size, dropout_rate=self.dropout_rate)

    def __call__(self, encoded_inputs, lengths, deterministic=None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        encoded_inputs = self.dropout_layer(encoded_inputs, deterministic=deterministic)
        mask = sequence_mask(lengths, encoded_inputs.shape[1])
        attention = self.keys_only_mlp_attention(encoded_inputs, mask)
        context = (jnp.expand_dims(attention, 1) @ encoded_inputs).squeeze(1)
        context = self.dropout_layer(context, deterministic=deterministic)
        return self.mlp(context, deterministic=deterministic)


class TextClassifier(nn.Module):
    """Embedder -> SimpleBiLSTM -> AttentionClassifier."""

    embedding_size: int
    hidden_size: int
    vocab_size: int
    output_size: int
    dropout_rate: float
    word_dropout_rate: float
    unk_idx: int = 1
    deterministic: bool | None = None
    variant: str | None = None

    def setup(self):
        self.embedder = Embedder(
            vocab_size=self.vocab_size,
            embedding_size=self.embedding_size,
            dropout_rate=self.dropout_rate,
            word_dropout_rate=self.word_dropout_rate,
            unk_idx=self.unk_idx,
        )
        self.encoder = SimpleBiLSTM(hidden_size=self.hidden_size, variant=self.variant)
        self.classifier = AttentionClassifier(
            hidden_size=self.hidden_size,
            output_size=self.output_size,
            dropout_rate=self.dropout_rate,
        )

    def __call__(self, token_ids, lengths, deterministic=None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        embedded_inputs = self.embedder(token_ids, deterministic=deterministic)
        encoded_inputs = self.encoder(embedded_inputs, lengths)
        return self.classifier(encoded_inputs, lengths, deterministic=deterministic)


def sigmoid_cross_entropy_with_logits(*, labels, logits):
    """Per-example binary cross-entropy from logits, in the numerically stable form."""
    zeros = jnp.zeros_like(logits)
    condition = logits >= zeros
    relu_logits = jnp.where(condition, logits, zeros)
    neg_abs_logits = jnp.where(condition, -logits, logits)
    return relu_logits - logits * labels + jnp.log1p(jnp.exp(neg_abs_logits))


def create_train_state(params, model, learning_rate=0.1, momentum=0.9, weight_decay=3e-6):
    """The example's optimiser (configs/default.py): SGD with momentum, weight decay."""
    tx = optax.chain(
        optax.sgd(learning_rate=learning_rate, momentum=momentum),
        optax.add_decayed_weights(weight_decay=weight_decay),
    )
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def train_step(state, batch, rngs):
    """One step: (new state, mean loss, accuracy) on ``batch`` (``token_ids``, ``length``,
    ``label``); a new dropout key each step, folded from ``rngs`` and the step number. The
    caller jits it, as ``train.py`` does (``jax.jit(train_step)``)."""
    rngs = {name: jax.random.fold_in(rng, state.step) for name, rng in rngs.items()}
    labels = jnp.expand_dims(batch["label"], 1)

    def loss_fn(params):
        logits = state.apply_fn(
            {"params": params},
            batch["token_ids"],
            batch["length"],
            deterministic=False,
            rngs=rngs,
        )
        loss = sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
        return jnp.mean(loss), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    accuracy = jnp.mean((logits >= 0.0) == labels)
    return state.apply_gradients(grads=grads), loss, accuracy


def accuracy(state, batch):
    """The fraction of ``batch`` classified right, dropout off (``eval_step``'s metric)."""
    logits = state.apply_fn(
        {"params": state.params}, batch["token_ids"], batch["length"], deterministic=True
    )
    return jnp.mean((logits >= 0.0) == jnp.expand_dims(batch["label"], 1))
