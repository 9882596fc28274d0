"""``lstm_multi.keras.LSTM``, the Keras 3 layer, against Keras's own ``LSTM``.

Keras's backend is process-wide, chosen by KERAS_BACKEND before keras is
imported: the checks run in this process on its backend (jax unless set, as in
test_convert.py) and, for the other supported backends, in a subprocess that
runs this file as a script (``python test_layer_keras.py CHECK...``).

What is checked, against an independent computation each time:
``keras.layers.LSTM`` / ``Bidirectional`` with the same weights (moved by
``lstm_multi.convert``) give the same outputs and states, with
``return_sequences``, ``go_backwards``, ``initial_state`` and masks (a fully
masked row included; right padding, left padding as ``pad_sequences`` gives it,
and gaps), compared at every step, masked ones too (the layer gives what Keras's
LSTM gives there: the current h); a left-padded Embedding(mask_zero=True)
pipeline trains as Keras's own (same losses and weights after ``fit``, jax and
torch); a peephole network equals
the functional NumPy cell run sequence by sequence, laid out as Keras would;
``keras.layers.Bidirectional`` wrapping the layer equals ``bidirectional=True`` and,
for "lstm", ``Bidirectional(keras.layers.LSTM)`` (masks and initial states
included); ``stateful`` split sequences equal one call and follow Keras's own
stateful LSTM; ``model.fit`` lowers the loss (jax, torch); a ``.keras`` file
restores identical outputs, in this process and in a fresh one after ``import
lstm_multi``; configs round-trip; the errors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")  # read when keras is first imported
keras = pytest.importorskip("keras")

from conftest import tolerance  # noqa: E402

import lstm_multi  # noqa: E402
from lstm_multi import convert  # noqa: E402

SUPPORTED = ("jax", "numpy", "torch")
BACKEND = keras.backend.backend()
TRAINABLE = ("jax", "torch")  # Keras's numpy backend has no fit
B, T, F, H = 3, 4, 3, 2
#: float32 throughout; Keras's LSTM sums its gates in its own order (another on each Keras
#: backend): worst seen 1.2e-7 (1 eps) on the JAX backend, 6e-8 on torch; 10 eps is a few
#: times that
TOL = {"rtol": tolerance("float32", k=10), "atol": tolerance("float32", k=10)}
#: lengths 4, 2 and 0 (a fully masked row)
MASK = np.arange(T)[None, :] < np.array([T, 2, 0])[:, None]
#: masks that are not right padding: left padding (``pad_sequences``' default "pre"), gaps,
#: and each beside a fully masked row
GENERAL_MASKS = {
    "left": np.array([[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]], bool),
    "gaps": np.array([[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], bool),
}


def _numpy(values):
    return [keras.ops.convert_to_numpy(v) for v in values]


def _inputs(seed=0, shape=(B, T, F)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _random_params(layer, seed):
    """Random canonical parameters of the layer's shapes (nothing like the initial ones)."""
    rng = np.random.default_rng(seed)
    return [
        [
            {k: 0.5 * rng.standard_normal(v.shape).astype(np.float32) for k, v in p.items()}
            for p in d
        ]
        for d in layer.get_canonical_params()
    ]


def _ours(units=H, **kwargs):
    from lstm_multi.keras import LSTM

    return LSTM(units, **kwargs)


# checks (run here, and in a subprocess for the other backends) ---------------------


def check_lstm_equals_keras():
    """Every return option, go_backwards, initial_state and a mask, against keras.layers.LSTM."""
    x = _inputs()
    rng = np.random.default_rng(1)
    h0, c0 = (rng.standard_normal((B, H)).astype(np.float32) for _ in range(2))
    for go_backwards in (False, True):
        for return_sequences in (False, True):
            options = dict(
                return_sequences=return_sequences, return_state=True, go_backwards=go_backwards
            )
            ours, theirs = _ours(**options), keras.layers.LSTM(H, **options)
            ours.build(x.shape)
            theirs.build(x.shape)
            params = _random_params(ours, seed=2 * go_backwards + return_sequences)
            ours.set_canonical_params(params)
            convert.to_keras(params, theirs)
            cases = [(None, None), (MASK, [h0, c0])] + [(MASK, None)] * return_sequences
            for mask, state in cases:
                got = _numpy(ours(x, mask=mask, initial_state=state))
                want = _numpy(theirs(x, mask=mask, initial_state=state))
                if mask is not None and state is not None and BACKEND == "torch":
                    _torch_keras_steps_before_the_first(got[0], want[0], h0, options)
                assert [g.shape for g in got] == [w.shape for w in want]
                for g, w in zip(got, want, strict=True):
                    np.testing.assert_allclose(g, w, **TOL, err_msg=str((options, mask, state)))
    plain = _ours(return_sequences=True)
    assert keras.ops.convert_to_numpy(plain(x)).shape == (B, T, H)  # no state: one array


def _torch_keras_steps_before_the_first(got, want, h0, options):
    """Keras's torch loop outputs zeros before a row's first valid step (go_backwards'
    padding, a fully masked row), its jax and numpy scans the initial h, as the layer
    does: check the layer's h0 there, and take Keras's torch numbers as agreeing."""
    lengths = MASK.sum(1)
    if options["return_sequences"]:
        t = np.arange(T)[None, :]
        before = t < T - lengths[:, None] if options["go_backwards"] else (lengths == 0)[:, None]
        before = np.broadcast_to(before, (B, T))
        np.testing.assert_allclose(got[before], np.broadcast_to(h0[:, None], got.shape)[before])
    else:
        before = lengths == 0
        np.testing.assert_allclose(got[before], h0[before])
    np.testing.assert_array_equal(want[before], 0)
    want[before] = got[before]


def check_bidirectional_stack_equals_keras():
    """num_layers=2, bidirectional: two keras Bidirectional(LSTM) layers, with a mask (row 0
    unmasked, row 2 fully masked)."""
    x = _inputs(3)
    for return_sequences in (True, False):
        options = dict(num_layers=2, bidirectional=True, return_sequences=return_sequences)
        ours, with_state = _ours(**options), _ours(**options, return_state=True)
        first = keras.layers.Bidirectional(keras.layers.LSTM(H, return_sequences=True))
        top = keras.layers.LSTM(H, return_sequences=return_sequences, return_state=True)
        second = keras.layers.Bidirectional(top)
        for layer, shape in ((ours, x.shape), (with_state, x.shape), (first, x.shape)):
            layer.build(shape)
        second.build((B, T, 2 * H))
        params = _random_params(ours, seed=7)
        ours.set_canonical_params(params)
        with_state.set_canonical_params(params)
        convert.to_keras(params, [first, second])
        out, h_fw, c_fw, h_bw, c_bw = _numpy(second(first(x, mask=MASK), mask=MASK))
        got, h_n, c_n = _numpy(with_state(x, mask=MASK))
        np.testing.assert_allclose(got, out, **TOL)
        np.testing.assert_allclose(h_n[2:], np.stack([h_fw, h_bw]), **TOL)
        np.testing.assert_allclose(c_n[2:], np.stack([c_fw, c_bw]), **TOL)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(ours(x, mask=MASK)), out, **TOL)


def check_peephole_equals_functional_cell():
    """Peephole variants against the NumPy functional cell run on each sequence alone."""
    lengths = MASK.sum(1)
    x = _inputs(4)
    cell = lstm_multi.get_cell("numpy")(F, H, variant="peephole")
    for go_backwards in (False, True):
        ours = _ours(
            variant="peephole", return_sequences=True, return_state=True, go_backwards=go_backwards
        )
        ours.build(x.shape)
        params = _random_params(ours, seed=5)
        ours.set_canonical_params(params)
        y, h, c = _numpy(ours(x, mask=MASK))
        for n, length in enumerate(lengths):
            if length == 0:  # Keras's: the initial h (zero) at every step, the initial state
                for got in (y[n], h[n], c[n]):
                    np.testing.assert_array_equal(got, 0)
                continue
            seq = x[n : n + 1, :length]
            seq = seq[:, ::-1] if go_backwards else seq
            want, (h_n, c_n) = cell(params, np.ascontiguousarray(seq))
            if go_backwards:  # Keras's order: the padding first, as the initial h (zero)
                want = np.concatenate([np.zeros((1, T - length, H), np.float32), want], 1)
            else:  # Keras's: the last valid output repeated
                want = np.concatenate([want, np.repeat(want[:, -1:], T - length, 1)], 1)
            np.testing.assert_allclose(y[n], want[0], **TOL)
            np.testing.assert_allclose(h[n], h_n[0, 0], **TOL)
            np.testing.assert_allclose(c[n], c_n[0, 0], **TOL)
    stack = _ours(variant="nog", num_layers=2, bidirectional=True, return_sequences=True)
    stack.build(x.shape)
    stack_cell = lstm_multi.get_cell("numpy")(F, H, "nog", num_layers=2, bidirectional=True)
    params = _random_params(stack, seed=6)
    stack.set_canonical_params(params)
    want, _ = stack_cell(params, x[:2], lengths=lengths[:2])
    got = keras.ops.convert_to_numpy(stack(x[:2], mask=MASK[:2]))
    np.testing.assert_allclose(got, want, **TOL)
    # a projection (LSTMP): outputs and h of width 1, c of width H
    projected = _ours(variant="peephole", num_layers=2, proj_size=1, return_sequences=True,
                      return_state=True)  # fmt: skip
    projected.build(x.shape)
    projected_cell = lstm_multi.get_cell("numpy")(F, H, "peephole", num_layers=2, proj_size=1)
    params = _random_params(projected, seed=7)
    projected.set_canonical_params(params)
    y, h, c = _numpy(projected(x))
    want, (h_n, c_n) = projected_cell(params, x)
    assert y.shape == (B, T, 1) and h.shape == (2, B, 1) and c.shape == (2, B, H)
    for got, expected in ((y, want), (h, h_n), (c, c_n)):
        np.testing.assert_allclose(got, expected, **TOL)


def _split_directions(params):
    """A one-layer bidirectional network's params -> (forward, backward) one-direction ones."""
    return [[params[0][0]]], [[params[0][1]]]


def check_bidirectional_wrapper_equals_bidirectional():
    """``keras.layers.Bidirectional(LSTM(...))`` against ``LSTM(..., bidirectional=True)`` with
    the same weights, for "lstm" and "peephole" (and for "lstm" against
    ``Bidirectional(keras.layers.LSTM)``): outputs and states, with masks (right padding
    and a fully masked row, left padding, gaps), initial states, both; with the same seed
    they start equal too."""
    x = _inputs(12)
    rng = np.random.default_rng(13)
    h0, c0 = (rng.standard_normal((2, B, H)).astype(np.float32) for _ in range(2))
    for variant in ("lstm", "peephole"):
        for return_sequences in (False, True):
            options = dict(variant=variant, return_sequences=return_sequences, return_state=True)
            wrapped = keras.layers.Bidirectional(_ours(**options, seed=3))
            ours = _ours(**options, bidirectional=True, seed=3)
            wrapped.build(x.shape)
            ours.build(x.shape)
            assert wrapped.backward_layer.go_backwards and not wrapped.forward_layer.go_backwards
            assert wrapped.backward_layer.zero_output_for_mask == return_sequences
            start = _split_directions(ours.get_canonical_params())
            for layer, want in zip(
                (wrapped.forward_layer, wrapped.backward_layer), start, strict=True
            ):
                for key, value in want[0][0].items():
                    np.testing.assert_array_equal(layer.get_canonical_params()[0][0][key], value)
            params = _random_params(ours, seed=14 + return_sequences)
            ours.set_canonical_params(params)
            forward, backward = _split_directions(params)
            wrapped.forward_layer.set_canonical_params(forward)
            wrapped.backward_layer.set_canonical_params(backward)
            theirs = None
            if variant == "lstm":
                lstm = keras.layers.LSTM(H, return_sequences=return_sequences, return_state=True)
                theirs = keras.layers.Bidirectional(lstm)
            left, gaps = GENERAL_MASKS["left"], GENERAL_MASKS["gaps"]
            cases = ((None, None), (MASK, None), (None, True), (MASK, True), (left, None),
                     (gaps, None), (gaps, True))  # fmt: skip
            for mask, state in cases:
                initial = [h0, c0] if state else None
                split = [h0[0], c0[0], h0[1], c0[1]] if state else None
                got = _numpy(wrapped(x, mask=mask, initial_state=split))
                want = _numpy(ours(x, mask=mask, initial_state=initial))
                message = str((options, mask is not None, state))
                np.testing.assert_allclose(got[0], want[0], **TOL, err_msg=message)
                for k, part in ((1, want[1]), (2, want[2])):  # h (fw, bw), c (fw, bw)
                    both = np.stack([got[k], got[k + 2]])
                    np.testing.assert_allclose(both, part, **TOL, err_msg=message)
                if theirs is not None and (mask is None or state is None):
                    # (Keras's torch loop outputs zeros where its scans give the initial h:
                    # see _torch_keras_steps_before_the_first; without one they agree)
                    if not theirs.built:
                        theirs.build(x.shape)
                        convert.to_keras(params, theirs)
                    keras_out = _numpy(theirs(x, mask=mask, initial_state=split))
                    for g, w in zip(got, keras_out, strict=True):
                        np.testing.assert_allclose(g, w, **TOL, err_msg=message)


def check_stateful_bidirectional_wrapper():
    """Bidirectional(LSTM(stateful=True)) carries each direction's state as a stateful
    bidirectional=True layer does (same seed, so same weights), and resets with it."""
    x = _inputs(24)
    wrapped = keras.layers.Bidirectional(_ours(stateful=True, return_sequences=True, seed=5))
    ours = _ours(stateful=True, bidirectional=True, return_sequences=True, seed=5)
    first, second = (_numpy([wrapped(x), ours(x)]) for _ in range(2))
    assert np.abs(first[0] - second[0]).max() > 1e-3  # the state was carried
    for got, want in (first, second):
        np.testing.assert_allclose(got, want, **TOL)
    assert len(wrapped.states) == 4
    wrapped.reset_states()
    ours.reset_states()
    np.testing.assert_allclose(*_numpy([wrapped(x), ours(x)]), **TOL)
    np.testing.assert_allclose(_numpy([wrapped(x)])[0], second[0], **TOL)


def check_zero_output_for_mask_equals_keras():
    """``zero_output_for_mask=True`` (what Bidirectional sets): zeros at the masked steps, in
    the order read, as keras.layers.LSTM's."""
    x = _inputs(15)
    for go_backwards in (False, True):
        options = dict(return_sequences=True, go_backwards=go_backwards, zero_output_for_mask=True)
        ours, theirs = _ours(**options), keras.layers.LSTM(H, **options)
        ours.build(x.shape)
        theirs.build(x.shape)
        params = _random_params(ours, seed=16)
        ours.set_canonical_params(params)
        convert.to_keras(params, theirs)
        got = keras.ops.convert_to_numpy(ours(x, mask=MASK))
        want = keras.ops.convert_to_numpy(theirs(x, mask=MASK))
        read = MASK[:, ::-1] if go_backwards else MASK
        np.testing.assert_array_equal(got[~read], 0)
        np.testing.assert_allclose(got, want, **TOL)


def check_general_masks_equal_keras():
    """Left-padded and gapped masks (and a fully masked row), every return option,
    go_backwards and zero_output_for_mask, against keras.layers.LSTM at every step; with an
    initial state where Keras's loop gives the initial h before a row's first real step
    (its jax and numpy scans)."""
    x = _inputs(30)
    rng = np.random.default_rng(31)
    h0, c0 = (rng.standard_normal((B, H)).astype(np.float32) for _ in range(2))
    for go_backwards in (False, True):
        for return_sequences, zero_output in ((False, False), (True, False), (True, True)):
            options = dict(return_sequences=return_sequences, return_state=True,
                           go_backwards=go_backwards, zero_output_for_mask=zero_output)  # fmt: skip
            ours, theirs = _ours(**options), keras.layers.LSTM(H, **options)
            ours.build(x.shape)
            theirs.build(x.shape)
            params = _random_params(ours, seed=32 + 2 * go_backwards + return_sequences)
            ours.set_canonical_params(params)
            convert.to_keras(params, theirs)
            states = (None,) if BACKEND == "torch" else (None, [h0, c0])
            for name, mask in GENERAL_MASKS.items():
                for state in states:
                    got = _numpy(ours(x, mask=mask, initial_state=state))
                    want = _numpy(theirs(x, mask=mask, initial_state=state))
                    message = str((options, name, state is not None))
                    for g, w in zip(got, want, strict=True):
                        np.testing.assert_allclose(g, w, **TOL, err_msg=message)


def _prepadded_tokens(seed, count):
    """Token rows of 1..4 left-padded with 0 (``pad_sequences``' default), and a target."""
    rng = np.random.default_rng(seed)
    rows = [rng.integers(1, 5, rng.integers(1, T + 1)).tolist() for _ in range(count)]
    tokens = keras.utils.pad_sequences(rows, maxlen=T)  # padding="pre"
    assert (tokens[:, 0] == 0).any(), "some rows padded at the start"
    return tokens, (tokens == 3).sum(1, keepdims=True).astype(np.float32)


def check_prepadded_pipeline_trains_as_keras():
    """Embedding(mask_zero=True) on left-padded tokens -> LSTM -> Dense, ours and Keras's
    with the same weights: the same predictions, then a few steps of ``model.fit`` (SGD,
    no shuffling) give the same losses and weights, and the loss falls."""
    tokens, target = _prepadded_tokens(40, 12)
    models = []
    for layer in (_ours(variant="lstm", seed=0), keras.layers.LSTM(H)):
        keras.utils.set_random_seed(0)
        models.append(keras.Sequential([
            keras.Input((T,), dtype="int32"), keras.layers.Embedding(5, F, mask_zero=True),
            layer, keras.layers.Dense(1),
        ]))  # fmt: skip
    ours, theirs = models
    convert.to_keras(ours.layers[1].get_canonical_params(), theirs.layers[1])
    for k in (0, 2):
        theirs.layers[k].set_weights(ours.layers[k].get_weights())
    np.testing.assert_allclose(
        ours.predict(tokens, verbose=0), theirs.predict(tokens, verbose=0), **TOL
    )
    losses = []
    for model in models:
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        fit = model.fit(tokens, target, epochs=4, batch_size=6, shuffle=False, verbose=0)
        losses.append(fit.history["loss"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    assert losses[0][-1] < losses[0][0], losses[0]
    trained = convert.from_keras(theirs.layers[1])
    for got, want in zip(ours.layers[1].get_canonical_params(), trained, strict=True):
        for g, w in zip(got, want, strict=True):
            for key in w:
                np.testing.assert_allclose(g[key], w[key], rtol=1e-4, atol=1e-5, err_msg=key)


def check_stateful():
    """stateful=True: a sequence in two calls equals one call (with a mask ending in the
    second call too), reset_state() starts afresh, as keras.layers.LSTM(stateful=True)
    with the same weights (go_backwards included), in eager calls and in model.predict
    (whatever Keras's own does there: it carries on torch, not in JAX's jitted predict);
    the states are not weights; model.fit runs (jax, torch)."""
    x = _inputs(17)
    ragged = np.arange(T)[None, :] < np.array([T, 3, 1])[:, None]  # ends in either half
    for variant in ("lstm", "peephole"):
        for go_backwards in (False, True):
            options = dict(variant=variant, return_sequences=True, return_state=True)
            stateful = _ours(**options, go_backwards=go_backwards, stateful=True)
            stateful.build(x.shape)
            params = _random_params(stateful, seed=18)
            stateful.set_canonical_params(params)
            assert [w.name for w in stateful.weights] == [w.name for w in _built(variant)]
            assert [tuple(s.shape) for s in stateful.states] == [(B, H), (B, H)]
            calls = [_numpy(stateful(x[:, :2])), _numpy(stateful(x[:, 2:]))]
            np.testing.assert_allclose(_numpy(stateful.states), calls[1][1:], **TOL)
            if not go_backwards:  # the two halves are one sequence
                whole = _ours(**options)
                whole.build(x.shape)
                whole.set_canonical_params(params)
                want = _numpy(whole(x))
                np.testing.assert_allclose(
                    np.concatenate([calls[0][0], calls[1][0]], 1), want[0], **TOL
                )
                for g, w in zip(calls[1][1:], want[1:], strict=True):
                    np.testing.assert_allclose(g, w, **TOL)
                stateful.reset_states()
                y1, *_ = _numpy(stateful(x[:, :2], mask=ragged[:, :2]))
                y2, h, c = _numpy(stateful(x[:, 2:], mask=ragged[:, 2:]))
                y, h_n, c_n = _numpy(whole(x, mask=ragged))
                np.testing.assert_allclose(np.concatenate([y1, y2], 1), y, **TOL)
                np.testing.assert_allclose(h, h_n, **TOL)
                np.testing.assert_allclose(c, c_n, **TOL)
            stateful.reset_states()
            for v in _numpy(stateful.states):
                np.testing.assert_array_equal(v, 0)
            again = _numpy(stateful(x[:, :2]))
            for g, w in zip(again, calls[0], strict=True):
                np.testing.assert_array_equal(g, w)
            if variant != "lstm":
                continue
            keras_options = dict(options, go_backwards=go_backwards, stateful=True)
            theirs = keras.layers.LSTM(H, **{k: v for k, v in keras_options.items()
                                             if k != "variant"})  # fmt: skip
            theirs.build(x.shape)
            convert.to_keras(params, theirs)
            theirs_calls = [_numpy(theirs(x[:, :2])), _numpy(theirs(x[:, 2:]))]
            for ours_call, keras_call in zip(calls, theirs_calls, strict=True):
                for g, w in zip(ours_call, keras_call, strict=True):
                    np.testing.assert_allclose(g, w, **TOL)
    # in a model with a fixed batch: eager calls and predict, as Keras's own
    layers = [_ours(stateful=True), keras.layers.LSTM(H, stateful=True)]
    models = [keras.Sequential([keras.Input((2, F), batch_size=B), layer]) for layer in layers]
    params = _random_params(layers[0], seed=19)
    layers[0].set_canonical_params(params)
    convert.to_keras(params, layers[1])
    for run in (lambda m, x: m(x), lambda m, x: m.predict(x, verbose=0)):
        outputs = []
        for model, layer in zip(models, layers, strict=True):
            layer.reset_states()
            outputs.append([keras.ops.convert_to_numpy(run(model, x[:, :2])),
                            keras.ops.convert_to_numpy(run(model, x[:, 2:]))])  # fmt: skip
        np.testing.assert_allclose(np.array(outputs[0]), np.array(outputs[1]), **TOL)
    # weights move to a stateless model of another batch size (the states are not weights)
    stateless = keras.Sequential([keras.Input((2, F)), _ours()])
    stateless.set_weights(models[0].get_weights())
    layers[0].reset_states()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(stateless(x[:1, :2])),
        keras.ops.convert_to_numpy(models[0](x[:, :2]))[:1],
        **TOL,
    )
    if BACKEND in TRAINABLE:  # the carried state is not part of the graph of a step
        model = keras.Sequential(
            [keras.Input((2, F), batch_size=B), _ours(stateful=True, seed=0), keras.layers.Dense(1)]
        )
        model.compile(optimizer="adam", loss="mse")
        chunks = np.concatenate([x[:, :2], x[:, 2:]])
        history = model.fit(chunks, np.ones((2 * B, 1)), batch_size=B, shuffle=False, verbose=0)
        assert np.isfinite(history.history["loss"][0])


def _built(variant):
    layer = _ours(variant=variant)
    layer.build((B, T, F))
    return layer.weights


def check_masks_flow_through_a_model():
    """Masking -> our LSTM (sequences) -> our LSTM (backwards), as Keras's own model."""
    x = _inputs(8)
    x[1, 2:] = 0.0  # padding the Masking layer masks
    x[2, 1:] = 0.0
    ours = [_ours(return_sequences=True, variant="lstm"), _ours(go_backwards=True)]
    theirs = [keras.layers.LSTM(H, return_sequences=True), keras.layers.LSTM(H, go_backwards=True)]
    models = [
        keras.Sequential(
            [keras.Input((T, F)), keras.layers.Masking(0.0), *layers, keras.layers.Dense(1)]
        )
        for layers in (ours, theirs)
    ]
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        params = _random_params(a, seed=10 + k)
        a.set_canonical_params(params)
        convert.to_keras(params, b)
    models[1].layers[-1].set_weights(models[0].layers[-1].get_weights())
    got, want = (model.predict(x, verbose=0) for model in models)
    np.testing.assert_allclose(got, want, **TOL)


def check_fit_lowers_the_loss():
    """A tiny task with a masked embedding: five epochs of model.fit lower the loss."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 5, (12, T))
    tokens[np.arange(T)[None, :] >= rng.integers(1, T + 1, 12)[:, None]] = 0  # padding
    target = (tokens == 3).sum(1, keepdims=True).astype(np.float32)
    model = keras.Sequential(
        [
            keras.Input((T,), dtype="int32"),
            keras.layers.Embedding(5, F, mask_zero=True),
            _ours(variant="peephole", seed=0),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    losses = model.fit(tokens, target, epochs=5, batch_size=6, shuffle=False, verbose=0)
    losses = losses.history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses


def _saved_model(directory):
    """A model of the layer (bidirectional, peephole, 2 layers) and of Bidirectional wrapping
    it, with random weights, saved to ``directory``/model.keras; returns (model, path, x)."""
    x = _inputs(9)
    x[1, 3:] = 0.0
    layer = _ours(variant="peephole", num_layers=2, bidirectional=True, return_sequences=True)
    wrapped = keras.layers.Bidirectional(_ours(variant="nog", unroll=True, use_cudnn=False))
    model = keras.Sequential([keras.Input((T, F)), keras.layers.Masking(0.0), layer, wrapped])
    layer.set_canonical_params(_random_params(layer, seed=11))
    for k, direction in enumerate((wrapped.forward_layer, wrapped.backward_layer)):
        direction.set_canonical_params(_random_params(direction, seed=20 + k))
    path = os.path.join(directory, "model.keras")
    model.save(path)
    return model, path, x


def check_save_and_load(directory):
    """A .keras file restores the layers (config and weights): identical outputs."""
    model, path, x = _saved_model(directory)
    loaded = keras.models.load_model(path)
    for restored, layer in zip(loaded.layers[-2:], model.layers[-2:], strict=True):
        assert type(restored) is type(layer)
        # (through JSON: Bidirectional's nested build_config has tuples, restored as lists)
        assert _json(restored.get_config()) == _json(layer.get_config())
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def _json(config):
    return json.loads(json.dumps(config))


CHECKS = {
    "lstm": check_lstm_equals_keras,
    "bidirectional": check_bidirectional_stack_equals_keras,
    "wrapper": check_bidirectional_wrapper_equals_bidirectional,
    "zero_output": check_zero_output_for_mask_equals_keras,
    "general_masks": check_general_masks_equal_keras,
    "prepadded_fit": check_prepadded_pipeline_trains_as_keras,
    "stateful_wrapper": check_stateful_bidirectional_wrapper,
    "stateful": check_stateful,
    "peephole": check_peephole_equals_functional_cell,
    "model": check_masks_flow_through_a_model,
    "fit": check_fit_lowers_the_loss,
    "save": check_save_and_load,
}


def _run_checks(names):
    with tempfile.TemporaryDirectory() as directory:
        for name in names:
            check = CHECKS[name]
            check(directory) if check is check_save_and_load else check()
            print(f"{keras.backend.backend()} {name}: ok", flush=True)


# this process's backend ------------------------------------------------------------

here = pytest.mark.skipif(
    BACKEND not in SUPPORTED, reason=f"Keras runs on {BACKEND}, which the layer does not support"
)


@here
@pytest.mark.parametrize(
    "name", [n for n in CHECKS if n not in ("fit", "prepadded_fit") or BACKEND in TRAINABLE]
)
def test_checks_on_this_backend(name):
    _run_checks([name])


# the other backends, each in a subprocess (the backend is fixed per process) ----------


def _other_backends():
    params = []
    for name in SUPPORTED:
        if name == BACKEND:
            continue
        missing = name != "numpy" and importlib.util.find_spec(name) is None
        marks = pytest.mark.skip(reason=f"{name} is not installed") if missing else ()
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def _checks_for(other):
    names = ["lstm", "peephole", "wrapper", "zero_output", "stateful", "stateful_wrapper"]
    return (
        names + ["save", "general_masks"] + (["fit", "prepadded_fit"] if other in TRAINABLE else [])
    )


@pytest.mark.parametrize("other", _other_backends())
def test_checks_on_another_backend(other, tmp_path):
    """The checks in a subprocess with KERAS_BACKEND=other. Started by its own test (not
    ahead, by a module fixture), so that under pytest-xdist only the worker that runs the
    test pays for it."""
    names = _checks_for(other)
    process = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *names],
        env={**os.environ, "KERAS_BACKEND": other},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    output = process.stdout
    assert process.returncode == 0, output[-4000:]
    for name in names:
        assert f"{other} {name}: ok" in output, output[-4000:]


# initial weights and errors ----------------------------------------------------------


@here
@pytest.mark.parametrize("scheme", ["keras", "uniform"])
def test_initial_weights_are_the_cells(scheme):
    layer = _ours(variant="peephole", num_layers=2, scheme=scheme, seed=3)
    layer.build((B, T, F))
    want = lstm_multi.get_cell("numpy")(F, H, "peephole", num_layers=2).init(3, scheme=scheme)
    names = [w.name for w in layer.weights]
    assert names == [f"{k}_l{l}_d0" for l in range(2) for k in ("W", "U", "b", "p")]
    for got_layer, want_layer in zip(layer.get_canonical_params(), want, strict=True):
        for k, v in want_layer[0].items():
            np.testing.assert_array_equal(got_layer[0][k], v)
    if scheme == "keras":  # Keras's unit_forget_bias
        np.testing.assert_array_equal(want[0][0]["b"], np.repeat([0.0, 1.0, 0.0, 0.0], H))


@here
def test_unsupported_keras_backend_is_refused(monkeypatch):
    from lstm_multi import keras as lstm_keras

    monkeypatch.setattr(lstm_keras, "_keras_backend", lambda: "tensorflow")
    with pytest.raises(
        RuntimeError,
        match=r"runs on the Keras backends \['jax', 'numpy', 'torch'\], but Keras runs on "
        r"'tensorflow'; set KERAS_BACKEND",
    ):
        _ours()


@here
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"units": 0}, ValueError, r"units: expected a positive integer, got 0"),
        ({"units": 2.0}, ValueError, r"units: expected a positive integer, got 2\.0"),
        ({"num_layers": 0}, ValueError, r"num_layers: expected a positive integer, got 0"),
        ({"variant": "gru"}, ValueError, r"variant: expected one of \[.*\], got 'gru'"),
        ({"return_sequences": 1}, TypeError, r"return_sequences: expected True or False, got 1"),
        (
            {"scheme": "glorot"},
            ValueError,
            r"scheme: expected one of \('uniform', 'keras', 'flax', 'equinox'\)",
        ),
        ({"seed": -1}, ValueError, r"seed: expected None or a non-negative integer, got -1"),
        (
            {"go_backwards": True, "bidirectional": True},
            ValueError,
            r"go_backwards: expected False with bidirectional=True",
        ),
        ({"stateful": "yes"}, TypeError, r"stateful: expected True or False, got 'yes'"),
        ({"unroll": 1}, TypeError, r"unroll: expected True or False, got 1"),
        ({"use_cudnn": "on"}, ValueError, r"use_cudnn: expected 'auto', True or False, got 'on'"),
        ({"use_cudnn": 1}, ValueError, r"use_cudnn: expected 'auto', True or False, got 1"),
        ({"zero_output_for_mask": None}, TypeError, r"zero_output_for_mask: expected True or"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    kwargs = {"units": H, **kwargs}
    with pytest.raises(error, match=message):
        _ours(**kwargs)


@here
def test_bad_inputs():
    layer = _ours(return_state=True)
    x = _inputs()
    with pytest.raises(ValueError, match=r"inputs: expected a 3-d shape \(batch, time, features\)"):
        layer(x[0])
    with pytest.raises(
        ValueError, match=r"initial_state h0: expected shape \(3, 2\), got \(1, 3, 2\)"
    ):
        layer(x, initial_state=[np.zeros((1, B, H), np.float32)] * 2)
    with pytest.raises(TypeError, match=r"initial_state: expected a list \[h0, c0\]"):
        layer(x, initial_state=[np.zeros((B, H), np.float32)])
    stack = _ours(num_layers=2, return_state=True)
    with pytest.raises(
        ValueError, match=r"initial_state h0: expected shape \(2, 3, 2\), got \(3, 2\)"
    ):
        stack(x, initial_state=[np.zeros((B, H), np.float32)] * 2)
    unbuilt = _ours()
    with pytest.raises(ValueError, match=r"get_canonical_params: the layer is not built yet"):
        unbuilt.get_canonical_params()


@here
def test_stateful_needs_one_batch_size():
    x = _inputs()
    layer = _ours(stateful=True)
    with pytest.raises(ValueError, match=r"stateful: expected a fixed batch size"):
        layer.build((None, T, F))
    layer(x)
    with pytest.raises(
        ValueError, match=r"stateful: expected inputs of the batch size the state was built "
        r"for \(3\), got 2"
    ):  # fmt: skip
        layer(x[:2])
    stack = _ours(stateful=True, num_layers=2, bidirectional=True, return_state=True)
    _, h, c = stack(x)
    assert [tuple(v.shape) for v in stack.states] == [(4, B, H), (4, B, H)]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(stack.states[1]), _numpy([c])[0])
    assert _ours().states is None
    _ours().reset_states()  # nothing to reset, as keras.layers.LSTM(stateful=False)


@here
@pytest.mark.parametrize("options", [{"unroll": True}, {"use_cudnn": True}, {"use_cudnn": False}])
def test_unroll_and_use_cudnn_change_nothing(options):
    """Accepted for keras.layers.LSTM's configs; the cell's engine runs either way."""
    x = _inputs(21)
    plain, other = (
        _ours(return_sequences=True, seed=4),
        _ours(return_sequences=True, seed=4, **options),
    )
    for layer in (plain, other):
        layer.build(x.shape)
    assert other.get_config() == {**plain.get_config(), **options, "name": other.name}
    np.testing.assert_array_equal(*_numpy([other(x, mask=MASK), plain(x, mask=MASK)]))


@here
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"variant": "peephole", "return_sequences": True, "go_backwards": True, "stateful": True},
        {"variant": "nfg", "num_layers": 2, "bidirectional": True, "proj_size": 1, "seed": 7,
         "return_state": True, "unroll": True, "use_cudnn": False, "scheme": "uniform",
         "zero_output_for_mask": True},
        {"variant": "vanilla"},  # an alias: saved by the name it stands for
    ],
)  # fmt: skip
def test_config_round_trip(options):
    layer = _ours(**options)
    config = layer.get_config()
    for key in ("stateful", "unroll", "use_cudnn", "zero_output_for_mask", "go_backwards"):
        assert key in config
    again = type(layer).from_config(config)
    assert again.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == "lstm_multi>LSTM"
    assert serialized["module"] == "lstm_multi.keras"
    restored = keras.saving.deserialize_keras_object(_json(serialized))
    assert type(restored) is type(layer)
    assert restored.get_config() == config
    assert restored.variant is lstm_multi.get_variant(config["variant"])


@here
def test_layers_of_one_configuration_share_their_cell():
    """Layers of equal configuration run one functional cell (its compiled programs serve
    every layer: ``registry.shared_cell``); their weights stay their own."""
    a, b = _ours(variant="peephole", seed=1), _ours(variant="peephole", seed=2)
    other = _ours(units=H + 1, variant="peephole", seed=1)
    for layer in (a, b, other):
        layer.build((B, T, F))
    assert a.cell is b.cell and other.cell is not a.cell
    first = [keras.ops.convert_to_numpy(layer.weights[0]) for layer in (a, b)]
    assert not np.array_equal(*first)


@here
def test_a_registered_variant_round_trips(monkeypatch):
    from lstm_multi import Variant, sigmoid, spec, tanh

    def coupled(z, c_prev, p):
        i = sigmoid(z.i + p.i * c_prev)
        c = (1 - i) * c_prev + i * tanh(z.g)
        return sigmoid(z.o + p.o * c) * tanh(c), c

    monkeypatch.setattr(spec, "VARIANTS", dict(spec.VARIANTS))  # undone after the test
    variant = lstm_multi.register_variant(
        Variant("keras_test_registered", coupled, params={"p": ("i", "o")})
    )
    layer = _ours(variant=variant, return_sequences=True)
    x = _inputs(22)
    layer.build(x.shape)
    layer.set_canonical_params(_random_params(layer, seed=23))
    config = layer.get_config()
    assert config["variant"] == "keras_test_registered"
    restored = type(layer).from_config(config)
    assert restored.variant is variant
    restored.build(x.shape)
    restored.set_weights(layer.get_weights())
    np.testing.assert_array_equal(*_numpy([restored(x), layer(x)]))


# loading in a fresh process ------------------------------------------------------------

#: run in a fresh process: keras.models.load_model(path) after ``first`` (lstm_multi.keras not
#: imported), then after ``then``; prints the error, the frameworks ``then`` imported and
#: whether lstm_multi.keras is, and saves the predictions
FRESH_LOAD = """
import json, sys
import numpy as np
path, x_path, out_path = sys.argv[1:]
FRAMEWORKS = {frameworks!r}
{first}
try:
    keras.models.load_model(path)
    print("loaded without lstm_multi.keras")
except TypeError as error:
    print("error:", error)
before = {{m for m in FRAMEWORKS if m in sys.modules}}
{then}
print("new frameworks:", json.dumps(sorted({{m for m in FRAMEWORKS if m in sys.modules}} - before)))
print("lstm_multi.keras imported:", "lstm_multi.keras" in sys.modules)
import keras
model = keras.models.load_model(path)
np.save(out_path, model.predict(np.load(x_path), verbose=0))
"""


def _fresh_load(tmp_path, first, then):
    model, path, x = _saved_model(str(tmp_path))
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "load.py"
    frameworks = ["torch", "jax", "jaxlib", "cupy", "tensorflow", "flax", "equinox", "keras"]
    script.write_text(FRESH_LOAD.format(first=first, then=then, frameworks=frameworks))
    out = tmp_path / "y.npy"
    run = subprocess.run(
        [sys.executable, str(script), path, str(tmp_path / "x.npy"), str(out)],
        env={**os.environ, "KERAS_BACKEND": BACKEND},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout, model.predict(x, verbose=0), out


@here
def test_load_model_in_a_fresh_process_after_import_lstm_multi(tmp_path):
    """With keras imported, ``import lstm_multi`` registers the layer (and imports no other
    framework): load_model restores the model; before it Keras cannot find the class, and
    its error shows the module to import."""
    stdout, want, out = _fresh_load(tmp_path, "import keras", "import lstm_multi")
    assert "error: " in stdout, stdout
    error = stdout.split("error: ", 1)[1]
    assert "Could not locate class 'LSTM'" in error
    assert "'module': 'lstm_multi.keras'" in error
    assert "new frameworks: []" in stdout, stdout
    assert "lstm_multi.keras imported: True" in stdout, stdout
    np.testing.assert_array_equal(np.load(out), want)


@here
def test_load_model_needs_lstm_multi_keras_when_keras_comes_after(tmp_path):
    """``import lstm_multi`` before keras imports no keras, so nothing registers the layer:
    Keras imports no module a config names (but its own), and load_model fails until
    ``lstm_multi.keras`` is imported (the module docstring says so)."""
    first = "import lstm_multi\nimport keras\nassert 'lstm_multi.keras' not in sys.modules"
    stdout, want, out = _fresh_load(tmp_path, first, "import lstm_multi.keras")
    assert "Could not locate class 'LSTM'" in stdout, stdout
    assert "new frameworks: []" in stdout, stdout
    np.testing.assert_array_equal(np.load(out), want)


@here
def test_a_gapped_mask_under_jit_is_the_eager_one():
    """Under ``jax.jit`` the mask's values are not known while tracing: it runs as a mask,
    with the eager call's results (which ``check_general_masks_equal_keras`` checks)."""
    if BACKEND != "jax":
        pytest.skip("jax.jit: the JAX backend")
    import jax

    layer = _ours(return_sequences=True)
    x = _inputs()
    layer.build(x.shape)  # built outside the trace
    run = jax.jit(lambda x, mask: layer(x, mask=mask))
    for mask in (MASK, *GENERAL_MASKS.values()):
        np.testing.assert_allclose(
            np.asarray(run(x, mask)), np.asarray(layer(x, mask=mask)), rtol=1e-6, atol=1e-6
        )


@here
def test_an_unregistered_variant_is_not_saved():
    from lstm_multi import Variant, sigmoid, tanh

    def coupled(z, c_prev, p):
        i = sigmoid(z.i + p.i * c_prev)
        c = (1 - i) * c_prev + i * tanh(z.g)
        return sigmoid(z.o + p.o * c) * tanh(c), c

    layer = _ours(variant=Variant("keras_test_coupled", coupled, params={"p": ("i", "o")}))
    x = _inputs()
    assert keras.ops.convert_to_numpy(layer(x)).shape == (B, H)  # it runs
    with pytest.raises(
        ValueError, match=r"'keras_test_coupled' is not registered.*register_variant"
    ):
        layer.get_config()
    assert _ours(variant="vanilla").get_config()["variant"] == "peephole"


if __name__ == "__main__":
    _run_checks(sys.argv[1:])
