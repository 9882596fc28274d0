"""Weights of Keras, Flax and Equinox LSTMs in and out (``lstm_multi.convert``).

For each framework installed: random weights in that framework's own layer;
its outputs reproduced by the converted weights on every lstm_multi CPU
backend (float32, 1e-5); the round trip gives back identical arrays; layers
that compute something else are refused.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import lstm_multi
from lstm_multi import convert

BACKENDS = [b for b in ("numpy", "torch", "jax") if b in lstm_multi.available_backends()]
B, T, IN, H = 3, 6, 5, 4


def _inputs():
    return np.random.default_rng(0).standard_normal((B, T, IN)).astype(np.float32)


def _randomised(tree, seed):
    rng = np.random.default_rng(seed)
    return {k: 0.5 * rng.standard_normal(np.shape(v)).astype(np.float32) for k, v in tree.items()}


def _ours(params, x, bidirectional=False):
    outputs = []
    for backend in BACKENDS:
        cell = lstm_multi.get_cell(backend)(
            IN, H, num_layers=len(params), bidirectional=bidirectional
        )
        y, _ = cell(cell.from_numpy(params), x)
        outputs.append(np.asarray(cell.ops.to_numpy(y)))
    return outputs


@pytest.fixture
def keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")  # read when keras is first imported
    keras = pytest.importorskip("keras")
    if keras.backend.backend() not in ("jax", "torch", "numpy"):
        pytest.skip(f"Keras runs on {keras.backend.backend()}, which this test does not cover")
    return keras


def test_keras_lstm_and_bidirectional_stack(keras):
    x = _inputs()
    first = keras.layers.Bidirectional(keras.layers.LSTM(H, return_sequences=True))
    second = keras.layers.LSTM(H, return_sequences=True)
    model = keras.Sequential([keras.Input((T, IN)), first])
    plain = keras.Sequential([keras.Input((T, IN)), second])
    for k, layer in enumerate([first.forward_layer, first.backward_layer, second]):
        cell = layer.cell
        for w, seed in (
            (cell.kernel, 3 * k),
            (cell.recurrent_kernel, 3 * k + 1),
            (cell.bias, 3 * k + 2),
        ):
            w.assign(_randomised({"w": w.numpy()}, seed)["w"])
    want_bi = np.asarray(model(x))
    want = np.asarray(plain(x))
    params_bi, params = convert.from_keras(first), convert.from_keras(second)
    for got in _ours(params_bi, x, bidirectional=True):
        np.testing.assert_allclose(got, want_bi, rtol=1e-5, atol=1e-5)
    for got in _ours(params, x):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    fresh = keras.layers.LSTM(H, return_sequences=True)
    fresh.build((B, T, IN))
    convert.to_keras(params, fresh)
    for a, b in zip(convert.from_keras(fresh)[0][0].values(), params[0][0].values(), strict=True):
        np.testing.assert_array_equal(a, b)
    odd = keras.layers.LSTM(H, activation="relu")
    odd.build((B, T, IN))
    with pytest.raises(ValueError, match="activation must be 'tanh' for an LSTM, got 'relu'"):
        convert.from_keras(odd)
    with pytest.raises(TypeError, match="expected a keras.layers.LSTM, got GRU"):
        convert.from_keras(keras.layers.GRU(H))


def test_flax_cells(monkeypatch):
    jax = pytest.importorskip("jax")
    nn = pytest.importorskip("flax.linen")
    x = _inputs()
    for Cell in (nn.LSTMCell, nn.OptimizedLSTMCell):
        model = nn.RNN(Cell(features=H))
        tree = model.init(jax.random.key(0), x)
        cell = tree["params"]["cell"]
        tree = {
            "params": {
                "cell": {
                    name: _randomised(leaves, seed)
                    for seed, (name, leaves) in enumerate(sorted(cell.items()))
                }
            }
        }
        want = np.asarray(model.apply(tree, x))
        p = convert.from_flax(tree)
        for got in _ours([[p]], x):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        back = convert.to_flax(p)
        for name, leaves in tree["params"]["cell"].items():
            for key, value in leaves.items():
                np.testing.assert_array_equal(back[name][key], value)
    with pytest.raises(ValueError, match="expected a Flax LSTMCell / OptimizedLSTMCell params"):
        convert.from_flax({"params": {"cell": {"kernel": np.zeros(3)}}})


def test_equinox_cell():
    jax = pytest.importorskip("jax")
    eqx = pytest.importorskip("equinox")
    x = _inputs()
    cell = eqx.nn.LSTMCell(IN, H, key=jax.random.key(0))
    rng = np.random.default_rng(1)
    cell = eqx.tree_at(
        lambda c: (c.weight_ih, c.weight_hh, c.bias),
        cell,
        tuple(jax.numpy.asarray(0.5 * rng.standard_normal(a.shape), jax.numpy.float32)
              for a in (cell.weight_ih, cell.weight_hh, cell.bias)),
    )  # fmt: skip

    def run(x_one):  # one sequence (T, in) -> (T, H)
        def step(state, x_t):
            h, c = cell(x_t, state)
            return (h, c), h

        zeros = jax.numpy.zeros(H, jax.numpy.float32)
        return jax.lax.scan(step, (zeros, zeros), x_one)[1]

    want = np.asarray(jax.vmap(run)(x))
    p = convert.from_equinox(cell)
    for got in _ours([[p]], x):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    again = convert.to_equinox(p, eqx.nn.LSTMCell(IN, H, key=jax.random.key(9)))
    for a, b in zip(convert.from_equinox(again).values(), p.values(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="use_bias=False has no canonical form"):
        convert.from_equinox(eqx.nn.LSTMCell(IN, H, use_bias=False, key=jax.random.key(0)))


def test_writing_back_checks_counts_and_shapes(keras):
    layer = keras.layers.LSTM(H)
    with pytest.raises(ValueError, match="the Keras layer is not built yet"):
        convert.from_keras(layer)
    layer.build((B, T, IN))
    params = convert.from_keras(layer)
    with pytest.raises(ValueError, match="layers: expected 2 Keras layers, got 1"):
        convert.to_keras(params * 2, layer)
    wrong = [[{**params[0][0], "U": np.zeros((H + 1, 4 * H), np.float32)}]]
    with pytest.raises(ValueError, match=r"params\[0\]\[0\]\['U'\]: expected shape \(4, 16\)"):
        convert.to_keras(wrong, layer)


def test_equinox_writing_back_checks_shapes():
    jax = pytest.importorskip("jax")
    eqx = pytest.importorskip("equinox")
    cell = eqx.nn.LSTMCell(IN, H, key=jax.random.key(0))
    p = {**convert.from_equinox(cell), "b": np.zeros(3)}
    with pytest.raises(
        ValueError, match=r"p\['b'\]: expected the cell's shape \(16,\), got \(3,\)"
    ):
        convert.to_equinox(p, cell)
    with pytest.raises(TypeError, match="cell: expected an equinox.nn.LSTMCell, got GRUCell"):
        convert.from_equinox(eqx.nn.GRUCell(IN, H, key=jax.random.key(0)))
