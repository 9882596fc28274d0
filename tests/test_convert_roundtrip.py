"""Converters carry every parameter or refuse by name (issue 22, items 2 and 3).

A property test: random canonical parameters (1-3 layers, one or two directions, a
variant with or without its own parameters, with or without a projection) through every
converter of ``lstm_multi.convert``, both directions, into real Keras layers and Equinox
cells: either the same arrays come back bit for bit, or a ``ValueError`` names the key the
framework cannot hold. A Keras layer reading its sequence backwards alone
(``go_backwards=True``) is refused by name, and its refusal is checked against what the
Keras layer computes.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from conftest import scaled
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lstm_multi import convert, spec

os.environ.setdefault("KERAS_BACKEND", "jax")  # read when keras is first imported

#: variants whose canonical parameters are W, U, b only, and some with their own ("p")
VARIANTS = ["lstm", "peephole_full", "peephole", "nig", "cifg"]
SETTINGS = settings(
    max_examples=scaled(12), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def networks(draw):
    """(variant, input_size, H, proj_size, params) with random float32 values."""
    variant = draw(st.sampled_from(VARIANTS))
    layers = draw(st.integers(1, 3))
    directions = draw(st.sampled_from([1, 2]))
    hidden = draw(st.integers(2, 4))
    proj = draw(st.sampled_from([0, 0, 1]))
    size = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shapes = spec.network_param_shapes(variant, size, hidden, layers, directions, proj)
    params = [
        [
            {k: rng.standard_normal(s).astype(np.float32) for k, s in direction.items()}
            for direction in layer
        ]
        for layer in shapes
    ]
    return variant, size, hidden, proj, params


def _first_extra_key(params):
    """The first key beyond W, U, b, in canonical order, or None."""
    for key in params[0][0]:
        if key not in ("W", "U", "b"):
            return key
    return None


def _assert_same(got, want):
    assert len(got) == len(want)
    for got_layer, want_layer in zip(got, want, strict=True):
        assert len(got_layer) == len(want_layer)
        for g, w in zip(got_layer, want_layer, strict=True):
            assert set(g) == set(w)
            for key in w:
                assert g[key].dtype == w[key].dtype, key
                assert np.array_equal(g[key], w[key]), key


def _refusal(key):
    """``pytest.raises`` for a ValueError naming the key ``[key]``."""
    return pytest.raises(ValueError, match=re.escape(f"[{key!r}]"))


# Flax (plain trees) -------------------------------------------------------------------


@SETTINGS
@given(networks())
def test_flax_converters_carry_everything_or_refuse_by_name(network):
    _, _, _, _, params = network
    extra = _first_extra_key(params)
    if extra is not None:
        with _refusal(extra):
            convert.to_flax_rnn(params)
        with _refusal(extra):
            convert.to_flax(params[0][0])
        return
    trees = convert.to_flax_rnn(params)
    _assert_same(convert.from_flax_rnn(trees), params)
    _assert_same(
        [[convert.from_flax(convert.to_flax(p)) for p in layer] for layer in params], params
    )
    again = convert.to_flax_rnn(convert.from_flax_rnn(trees))  # framework -> ours -> framework
    for a, b in zip(_leaves(again), _leaves(trees), strict=True):
        assert np.array_equal(a, b)


def _leaves(tree):
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree) for leaf in _leaves(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree]


# Equinox -----------------------------------------------------------------------------


@SETTINGS
@given(networks())
def test_equinox_converters_carry_everything_or_refuse_by_name(network):
    jax = pytest.importorskip("jax")
    eqx = pytest.importorskip("equinox")
    _, _, hidden, _, params = network
    extra = _first_extra_key(params)
    for k, layer in enumerate(params):
        for d, p in enumerate(layer):
            cell = eqx.nn.LSTMCell(
                p["W"].shape[0], hidden, dtype=np.float32, key=jax.random.key(k * 2 + d)
            )
            if extra is not None:
                with _refusal(extra):
                    convert.to_equinox(p, cell)
                continue
            written = convert.to_equinox(p, cell)
            _assert_same([[convert.from_equinox(written)]], [[p]])
            # and the other way: the cell's own weights out and back in
            back = convert.to_equinox(convert.from_equinox(cell), written)
            for a, b in zip(
                (back.weight_ih, back.weight_hh, back.bias),
                (cell.weight_ih, cell.weight_hh, cell.bias),
                strict=True,
            ):
                assert np.array_equal(np.asarray(a), np.asarray(b))


def test_equinox_refuses_to_cast():
    jax = pytest.importorskip("jax")
    eqx = pytest.importorskip("equinox")
    cell = eqx.nn.LSTMCell(3, 2, dtype=np.float32, key=jax.random.key(0))
    p = {k: np.asarray(v, np.float64) for k, v in convert.from_equinox(cell).items()}
    with pytest.raises(ValueError, match=r"p\['W'\]: expected dtype float32"):
        convert.to_equinox(p, cell)


# Keras -------------------------------------------------------------------------------


def _keras():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() not in ("jax", "torch", "numpy"):
        pytest.skip(f"Keras runs on {keras.backend.backend()}, which this test does not cover")
    return keras


def _keras_layers(keras, size, hidden, num_layers, directions, steps=3):
    """Built Keras layers of the stack's shapes (not run: building is enough)."""
    layers = []
    width = size
    for _ in range(num_layers):
        lstm = keras.layers.LSTM(hidden, return_sequences=True)
        layer = lstm if directions == 1 else keras.layers.Bidirectional(lstm)
        layer.build((None, steps, width))
        layers.append(layer)
        width = hidden * directions
    return layers


def _keras_weights(layers):
    return [np.array(w.numpy()) for layer in layers for w in layer.weights]


@SETTINGS
@given(networks(), st.booleans())
def test_keras_converters_carry_everything_or_refuse_by_name(network, go_backwards):
    keras = _keras()
    _, size, hidden, proj, params = network
    directions = len(params[0])
    extra = _first_extra_key(params)
    if proj:  # a projection changes U's shape too: Keras's layer has none to build
        with _refusal(extra):
            convert.to_keras(params, _keras_layers(keras, size, hidden, len(params), directions))
        return
    layers = _keras_layers(keras, size, hidden, len(params), directions)
    if extra is not None:
        before = _keras_weights(layers)
        with _refusal(extra):
            convert.to_keras(params, layers)
        for a, b in zip(_keras_weights(layers), before, strict=True):
            assert np.array_equal(a, b)  # nothing half-written
        return
    convert.to_keras(params, layers)
    _assert_same(convert.from_keras(layers), params)
    # the other way: the Keras layers' weights out and into fresh layers, bit for bit
    fresh = _keras_layers(keras, size, hidden, len(params), directions)
    convert.to_keras(convert.from_keras(layers), fresh)
    for a, b in zip(_keras_weights(fresh), _keras_weights(layers), strict=True):
        assert np.array_equal(a, b)
    if go_backwards and directions == 1:  # a lone layer reading backwards: refused unless
        lone = keras.layers.LSTM(hidden, return_sequences=True, go_backwards=True)
        lone.build((None, 3, size))
        convert.to_keras(params[:1], lone)  # the caller chose a layer that reads backwards
        with pytest.raises(ValueError, match="go_backwards"):
            convert.from_keras(lone)
        _assert_same(convert.from_keras(lone, allow_go_backwards=True), params[:1])


def test_keras_go_backwards_is_refused_and_would_compute_something_else():
    """The refusal is needed: the converted weights, run as a forward layer or as the
    reverse direction, do not give what the Keras layer computes."""
    import lstm_multi

    keras = _keras()
    hidden, size, steps, batch = 3, 2, 5, 2
    layer = keras.layers.LSTM(hidden, return_sequences=True, go_backwards=True)
    x = np.random.default_rng(0).standard_normal((batch, steps, size)).astype(np.float32)
    want = keras.ops.convert_to_numpy(layer(x))
    with pytest.raises(ValueError, match=r"layers\[0\]: go_backwards=True"):
        convert.from_keras(layer)
    with pytest.raises(ValueError, match=r"layers\[0\]: go_backwards=True"):
        convert.from_keras([layer])
    # what the refused weights would compute, read as they are
    plain = keras.layers.LSTM(hidden, return_sequences=True)
    plain.build(x.shape)  # its weights, to be overwritten (a call would run it too)
    for target, source in zip(plain.weights, layer.weights, strict=True):
        target.assign(source.numpy())
    params = convert.from_keras(plain)
    cell = lstm_multi.get_cell("numpy")(size, hidden)
    y, _ = cell(cell.from_numpy(params), x)
    assert np.max(np.abs(np.asarray(y) - want)) > 1e-3


def test_keras_bidirectional_must_concatenate_and_read_its_directions_as_ours():
    keras = _keras()
    summed = keras.layers.Bidirectional(
        keras.layers.LSTM(3, return_sequences=True), merge_mode="sum"
    )
    summed.build((None, 4, 2))
    with pytest.raises(ValueError, match="merge_mode must be 'concat'"):
        convert.from_keras(summed)
    backwards_first = keras.layers.Bidirectional(
        keras.layers.LSTM(3, return_sequences=True, go_backwards=True),
        backward_layer=keras.layers.LSTM(3, return_sequences=True),
    )
    backwards_first.build((None, 4, 2))
    with pytest.raises(ValueError, match=r"direction 0: go_backwards must be False"):
        convert.from_keras(backwards_first)


def test_keras_refuses_to_cast():
    keras = _keras()
    layer = keras.layers.LSTM(3)
    layer.build((None, 4, 2))
    params = [[{k: v.astype(np.float64) for k, v in convert.from_keras(layer)[0][0].items()}]]
    with pytest.raises(ValueError, match=r"params\[0\]\[0\]\['W'\]: expected dtype float32"):
        convert.to_keras(params, layer)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"W": np.zeros((2, 12), np.float32)}, r"params: expected params\[layer\]\[direction\]"),
        ([], r"params: expected params\[layer\]\[direction\].*got \[\]"),
        ([{"W": 0}], r"params\[0\]: expected a list of 1 or 2 directions, got dict"),
        ([[1.0]], r"params\[0\]\[0\]: expected a dict of arrays, got float"),
    ],
)
def test_keras_and_flax_writers_name_a_params_structure_they_cannot_read(params, match):
    """One layer-direction's dict given where ``params[layer][direction]`` is expected (a
    likely slip) is named as such, not read as a list of its keys."""
    keras = _keras()
    layer = keras.layers.LSTM(3)
    layer.build((None, 4, 2))
    with pytest.raises(ValueError, match=match):
        convert.to_keras(params, layer)
    with pytest.raises(ValueError, match=match):
        convert.to_flax_rnn(params)


# the framework layers' own converters ---------------------------------------------------


def test_equinox_module_to_equinox_refuses_what_the_cell_cannot_hold():
    jax = pytest.importorskip("jax")
    pytest.importorskip("equinox")
    from lstm_multi import Variant, sigmoid, tanh
    from lstm_multi import equinox as lm_eqx

    def scaled(z, c_prev):
        i, f, g, o = sigmoid(z.i), sigmoid(z.f), tanh(z.g), sigmoid(z.o)
        c = f * c_prev + i * g
        return o * tanh(c) * 0.5, c

    for variant, match in (
        ("peephole", "variant: eqx.nn.LSTMCell computes the 'lstm' variant only"),
        (Variant("half", scaled, extends_lstm=True), "variant: eqx.nn.LSTMCell computes"),
    ):
        with pytest.raises(ValueError, match=match):
            lm_eqx.LSTM(2, 3, variant=variant, key=jax.random.key(0)).to_equinox()
    with pytest.raises(ValueError, match="proj_size: eqx.nn.LSTMCell has no projection"):
        lm_eqx.LSTM(2, 3, proj_size=2, key=jax.random.key(0)).to_equinox()
    module = lm_eqx.LSTM(2, 3, num_layers=2, bidirectional=True, key=jax.random.key(1))
    cells = module.to_equinox()
    again = lm_eqx.LSTM.from_equinox(cells, variant="lstm")
    _assert_same(
        [[{k: np.asarray(v) for k, v in p.items()} for p in layer] for layer in again.params],
        [[{k: np.asarray(v) for k, v in p.items()} for p in layer] for layer in module.params],
    )
