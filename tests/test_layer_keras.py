"""``lstm_multi.keras.LSTM``, the Keras 3 layer, against Keras's own ``LSTM``.

Keras's backend is process-wide, chosen by KERAS_BACKEND before keras is
imported: the checks run in this process on its backend (jax unless set, as in
test_convert.py) and, for the other supported backends, in a subprocess that
runs this file as a script (``python test_layer_keras.py CHECK...``).

What is checked, against an independent computation each time:
``keras.layers.LSTM`` / ``Bidirectional`` with the same weights (moved by
``lstm_multi.convert``) give the same outputs and states, with
``return_sequences``, ``go_backwards``, ``initial_state`` and masks (a fully
masked row included), compared at every step, masked ones too (the layer
gives what Keras's LSTM gives there: the current h); a peephole network equals
the functional NumPy cell run sequence by sequence, laid out as Keras would; ``model.fit`` lowers the loss (jax, torch); a ``.keras``
file restores identical outputs; the errors.
"""

from __future__ import annotations

import importlib.util
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


def check_save_and_load(directory):
    """A .keras file restores the layer (config and weights): identical outputs."""
    x = _inputs(9)
    x[1, 3:] = 0.0
    layer = _ours(variant="peephole", num_layers=2, bidirectional=True, return_sequences=True)
    model = keras.Sequential([keras.Input((T, F)), keras.layers.Masking(0.0), layer])
    layer.set_canonical_params(_random_params(layer, seed=11))
    path = os.path.join(directory, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    restored = loaded.layers[-1]
    assert type(restored) is type(layer)
    assert restored.get_config() == layer.get_config()
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


CHECKS = {
    "lstm": check_lstm_equals_keras,
    "bidirectional": check_bidirectional_stack_equals_keras,
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
@pytest.mark.parametrize("name", [n for n in CHECKS if n != "fit" or BACKEND in TRAINABLE])
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


@pytest.fixture(scope="module", autouse=True)
def other_runs(request, tmp_path_factory):
    """The subprocesses of the selected other backends, started before this module's first
    test, so that they run beside the tests in this process."""
    selected = {
        item.callspec.params["other"]
        for item in request.session.items
        if "other" in getattr(getattr(item, "callspec", None), "params", {})
    }
    runs = {}
    for other in sorted(selected):
        names = ["lstm", "peephole", "save"] + (["fit"] if other in TRAINABLE else [])
        log = tmp_path_factory.mktemp(other) / "log"
        with open(log, "w") as out:  # the child keeps its own copy of the file
            process = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), *names],
                env={**os.environ, "KERAS_BACKEND": other},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        runs[other] = (process, names, log)
    yield runs
    for process, _, _ in runs.values():
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("other", _other_backends())
def test_checks_on_another_backend(other, other_runs):
    process, names, log = other_runs[other]
    returncode = process.wait(timeout=240)
    output = log.read_text()
    assert returncode == 0, output[-4000:]
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
def test_a_mask_with_a_gap_is_refused():
    layer = _ours(return_sequences=True)
    gap = np.array([[True, False, True, False]] + [[True] * T] * (B - 1))
    x = _inputs()
    with pytest.raises(ValueError, match=r"mask: expected each row to be True on its first steps"):
        layer(x, mask=gap)
    if BACKEND == "jax":  # traced mask: the cell's run-time lengths check (documented)
        import jax

        run = jax.jit(lambda x, mask: layer(x, mask=mask))
        np.testing.assert_array_equal(np.asarray(run(x, MASK)), np.asarray(layer(x, mask=MASK)))
        with pytest.raises(
            Exception, match=r"lengths: expected every value in 1\.\.4 \(T\), got \[5\]"
        ):
            np.asarray(run(x, gap))


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
