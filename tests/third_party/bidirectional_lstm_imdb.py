"""keras-team/keras-io ``examples/nlp/bidirectional_lstm_imdb.py``: the model, its data
preparation and ``compile``/``fit``.

Source: https://github.com/keras-team/keras-io/blob/master/examples/nlp/bidirectional_lstm_imdb.py
(author fchollet), Apache License 2.0, Copyright the Keras authors. Restated here with
the sizes as arguments (the example's are the defaults: 20000 words, 128-wide
embeddings, two bidirectional LSTMs of 64 units, reviews cut or padded to 200 tokens,
batches of 32) and the IMDB download replaced by the caller's token lists. The swap is
the one marked line: ``lstm_multi.keras.LSTM`` where the example has ``layers.LSTM``.

``pad_sequences`` pads and cuts at the front (its defaults, as in the example) and the
embedding has no ``mask_zero``: the LSTMs read the padding as tokens, no mask is made.
"""

from __future__ import annotations

import functools

import keras
from keras import layers

import lstm_multi.keras


def build_model(max_features=20000, embedding_size=128, units=64, variant=None):
    """Embedding -> Bidirectional(LSTM, sequences) -> Bidirectional(LSTM) -> Dense(sigmoid)."""
    if variant is None:
        LSTM = layers.LSTM
    else:  # the swap
        LSTM = functools.partial(lstm_multi.keras.LSTM, variant=variant)
    # Input for variable-length sequences of integers
    inputs = keras.Input(shape=(None,), dtype="int32")
    # Embed each integer in an embedding_size-dimensional vector
    x = layers.Embedding(max_features, embedding_size)(inputs)
    # Add 2 bidirectional LSTMs
    x = layers.Bidirectional(LSTM(units, return_sequences=True))(x)
    x = layers.Bidirectional(LSTM(units))(x)
    # Add a classifier
    outputs = layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs)


def prepare(reviews, maxlen=200):
    """Lists of token ids -> (len(reviews), maxlen) int32, as the example pads its reviews."""
    return keras.utils.pad_sequences(reviews, maxlen=maxlen)


def compile_and_fit(model, x_train, y_train, batch_size=32, epochs=2, **fit_options):
    """The example's training: Adam, binary cross-entropy, accuracy; returns the History."""
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    return model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, **fit_options)
