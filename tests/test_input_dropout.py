"""Input dropout (Gal & Ghahramani's variational dropout on x; Keras's ``dropout``).

The functional cells' ``input_dropout`` (per gate masks e (B, 4, F_in), fixed over the
sequence: zx_t = concat_g((x_t ∘ e_g) W_g) + b) against the independent oracle given the
cell's masks, on numpy, torch and jax in float64 (outputs, final states, every
gradient); finite differences on the NumPy hand backward; p = 0 is the plain network
exactly; evaluation is the plain network; the other regularizers' masks are unchanged
by it; padding never leaks. The torch module's ``input_dropout``; the Keras layer's
``dropout`` against ``keras.layers.LSTM(dropout=p)`` and ``(dropout=p,
recurrent_dropout=q)`` run with Keras's own masks, and ``model.fit``.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close
from test_zoneout import (
    BACKENDS,
    RATES,
    _against_oracle,
    _array,
    _cell,
    _keras,
    _key,
    _layers,
    _numpy,
)

import lstm_multi
from lstm_multi import regularize

oracle = pytest.importorskip("oracle")


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_agrees_with_the_oracle(backend):
    """Input dropout alone: peephole, two layers (layer 1 reads 2 H; JAX one, as
    test_zoneout's ``_layers`` says: its two layers are the next test's), both
    directions, right padding; each layer-direction's four gates read x through their
    own masks."""
    cell = _against_oracle(
        backend, 7, np.array([5, 2, 4]), variant="peephole", input_dropout=0.4, **_layers(backend)
    )
    assert cell.last_choice.engine in ("array", "scan")
    masks, _ = cell.regularizer_masks(_array(backend, np.zeros((5, 3, 2))), _key(backend, 7))
    widths = [2, 6][: cell.num_layers]
    assert [tuple(m.inputs.shape) for m in masks] == [(3, 4, w) for w in widths for _ in "fr"]
    assert all(m.recurrent is None and m.keep_h is None for m in masks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_every_regularizer_agrees_with_the_oracle(backend):
    """Input dropout with zoneout, recurrent dropout and DropConnect; a mask with gaps
    (numpy) or r = c (peephole_full, whose g gate reads x only) on torch and jax; two
    layers on every backend (JAX's two layers with its regularizers are checked here)."""
    if backend == "numpy":
        mask = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
        _against_oracle(backend, 3, mask=mask, proj_size=2, input_dropout=0.3, **RATES)
    else:
        _against_oracle(backend, 3, variant="peephole_full", input_dropout=0.3, **RATES)


def test_the_masks_are_per_gate_and_inverted():
    """Four different masks per layer-direction (not one shared by the gates), entries 0
    or 1 / (1 - p), zero with probability p; the other regularizers' masks are the ones
    drawn without input dropout (they are drawn first)."""
    cell = _cell("numpy", hidden_size=50, input_dropout=0.3, **RATES)
    x = np.zeros((3, 200, 2))
    masks, u_masks = cell.regularizer_masks(x, 0)
    e = masks[0].inputs
    assert set(np.unique(e)) == {0.0, 1 / 0.7}
    assert abs((e == 0).mean() - 0.3) < 0.03
    assert all(not np.array_equal(e[:, 0], e[:, g]) for g in (1, 2, 3))
    plain, plain_u = _cell("numpy", hidden_size=50, **RATES).regularizer_masks(x, 0)
    for with_e, without in zip(masks, plain, strict=True):
        assert without.inputs is None
        for name in ("keep_h", "keep_c", "recurrent"):
            np.testing.assert_array_equal(getattr(with_e, name), getattr(without, name))
    for a, b in zip(u_masks, plain_u, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rate_and_evaluation_are_the_plain_network_exactly(backend):
    layers = _layers(backend)  # JAX: one layer, each cell's programs compiled
    plain = _cell(backend, variant="peephole", **layers)
    zero = _cell(backend, variant="peephole", input_dropout=0.0, **layers)
    dropped = _cell(backend, variant="peephole", input_dropout=0.5, **layers)
    params = plain.init(seed=1, dtype="float64")
    x = _array(backend, np.random.default_rng(1).standard_normal((4, 2, 2)))
    want, _ = plain(params, x, dropout_key=_key(backend, 3))
    np.testing.assert_array_equal(
        _numpy(zero(params, x, dropout_key=_key(backend, 3))[0]), _numpy(want)
    )
    np.testing.assert_array_equal(_numpy(dropped(params, x)[0]), _numpy(want))  # evaluation
    assert dropped.regularizer_masks(x) == (None, None)
    assert not np.allclose(
        _numpy(dropped(params, x, dropout_key=_key(backend, 3))[0]), _numpy(want)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_does_not_leak(backend):
    """NaN in the padded steps changes nothing, outputs, states and gradients."""
    cell = _cell(backend, batch_first=True, num_layers=1, input_dropout=0.4)
    params = cell.init(seed=2, dtype="float64")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, 2))
    lengths = np.array([5, 2, 3])
    nan = x.copy()
    for n, length in enumerate(lengths):
        nan[n, length:] = np.nan
    dy = _array(backend, rng.standard_normal((3, 5, 2 * cell.output_size)))
    call = dict(lengths=lengths, dropout_key=_key(backend, 4))
    y, (h, c) = cell(params, _array(backend, x), **call)
    y2, (h2, c2) = cell(params, _array(backend, nan), **call)
    for a, b in ((y, y2), (h, h2), (c, c2)):
        np.testing.assert_array_equal(_numpy(a), _numpy(b))
    grads, dx, _ = cell.vjp(params, _array(backend, nan), dy, **call)
    assert np.isfinite(_numpy(dx)).all()
    assert all(np.isfinite(_numpy(g)).all() for layer in grads for p in layer for g in p.values())


def test_vjp_matches_finite_differences():
    """numpy's hand-written backward with fixed masks (the same int key), float64: dW in
    each gate block, dx, and dU through the masked recurrence."""
    cell = _cell("numpy", variant="peephole", input_dropout=0.5, recurrent_dropout=0.3)
    params = cell.init(seed=5, dtype="float64")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 2, 2))
    dy = rng.standard_normal((4, 2, 6))
    grads, dx, _ = cell.vjp(params, x, dy, dropout_key=9)

    def loss(params, x):
        return float(np.sum(cell(params, x, dropout_key=9)[0] * dy))

    eps = 1e-6
    checks = [(0, 0, "W", (r, col)) for r in range(2) for col in (1, 4, 7, 10)]
    checks += [(1, 1, "W", (4, 8)), (1, 0, "U", (2, 5))]
    for layer, direction, name, index in checks:
        plus = [[dict(p) for p in lay] for lay in params]
        minus = [[dict(p) for p in lay] for lay in params]
        for sign, ps in ((1, plus), (-1, minus)):
            ps[layer][direction][name] = params[layer][direction][name].copy()
            ps[layer][direction][name][index] += sign * eps
        numeric = (loss(plus, x) - loss(minus, x)) / (2 * eps)
        assert abs(numeric - grads[layer][direction][name][index]) < 1e-6, (name, index)
    for index in ((2, 1, 0), (0, 0, 1), (3, 1, 1)):
        shifted, other = x.copy(), x.copy()
        shifted[index] += eps
        other[index] -= eps
        numeric = (loss(params, shifted) - loss(params, other)) / (2 * eps)
        assert abs(numeric - dx[index]) < 1e-6, index


def test_kernel_engines_refuse_and_bad_rates_are_refused():
    cell = _cell("numpy", input_dropout=0.2)
    x = np.zeros((3, 2, 2))
    assert cell.explain(x, dropout_key=1).engine == "array"
    for rate, error in ((1.0, ValueError), (-0.1, ValueError), ("0.1", TypeError)):
        with pytest.raises(error, match="input_dropout"):
            _cell("numpy", input_dropout=rate)


def test_jax_grad_is_the_vjp_under_jit():
    jax = pytest.importorskip("jax")
    cell = _cell("jax", num_layers=1, bidirectional=False, input_dropout=0.3)
    params = cell.init(seed=1, dtype="float64")
    x = jax.numpy.asarray(np.random.default_rng(1).standard_normal((4, 2, 2)))
    key = jax.random.key(5)
    y = jax.jit(lambda p, k: cell(p, x, dropout_key=k)[0])(params, key)
    np.testing.assert_allclose(np.asarray(y), np.asarray(cell(params, x, dropout_key=key)[0]))
    grads = jax.grad(lambda p: cell(p, x, dropout_key=key)[0].sum())(params)
    want, _, _ = cell.vjp(params, x, jax.numpy.ones_like(y), dropout_key=key)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-12)


# the torch module ------------------------------------------------------------------


def test_torch_module_input_dropout_is_the_cells():
    """Training: the cell's input dropout with the seed drawn from torch's default
    generator; evaluation: the plain network; bad rates refused by name."""
    torch = pytest.importorskip("torch")
    from lstm_multi.torch import LSTM

    torch.manual_seed(0)
    module = LSTM(3, 4, 2, batch_first=True, bidirectional=True, input_dropout=0.3).double()
    cell = lstm_multi.get_cell("torch")(3, 4, "lstm", 2, True, input_dropout=0.3)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.manual_seed(1)
    y, _ = module(x)
    torch.manual_seed(1)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    want, _ = cell(module.canonical_params(), x, dropout_key=seed)
    assert_close(_numpy(y), _numpy(want), "float64", "y")
    assert module.last_choice.engine == "array"
    y.sum().backward()
    assert module.weight_ih_l1_reverse.grad.abs().sum() > 0
    module.eval()
    assert_close(
        _numpy(module(x)[0]), _numpy(cell(module.canonical_params(), x)[0]), "float64", "y"
    )
    assert "input_dropout=0.3" in repr(module)
    with pytest.raises(ValueError, match="input_dropout"):
        LSTM(3, 4, input_dropout=1.0)


# the Keras layer ---------------------------------------------------------------------


def _keras_pair(keras, x, units, **rates):
    """``keras.layers.LSTM(**rates)`` and ``lstm_multi.keras.LSTM(**rates)`` with the same
    weights, built for x."""
    import lstm_multi.keras as lk
    from lstm_multi import convert

    ref = keras.layers.LSTM(units, return_sequences=True, seed=1, **rates)
    ours = lk.LSTM(units, return_sequences=True, seed=1, **rates)
    ref.build(x.shape)
    ours.build(x.shape)
    ours.set_canonical_params(convert.from_keras(ref))
    return ref, ours


def test_keras_dropout_is_keras_rule():
    """``keras.layers.LSTM(dropout=p)`` in training (implementation 2: one mask (B, I) on
    x, fixed over the sequence), its mask read back (drawn before the call: the cell
    caches it for the call) and given to our layer: the same outputs. A mask redrawn at
    every step is not Keras's."""
    keras = _keras()
    batch, steps, features, units = 3, 6, 2, 4
    x = np.random.default_rng(0).standard_normal((batch, steps, features)).astype("float32")
    ref, ours = _keras_pair(keras, x, units, dropout=0.5)
    mask = np.asarray(ref.cell.get_dropout_mask(np.zeros((batch, features), "float32")))
    assert mask.shape == (batch, features) and set(np.unique(mask)) <= {0.0, 2.0}
    want = np.asarray(ref(x, training=True))
    own = np.asarray(ours._input_mask(x))  # the layer's own draw: one row per sequence
    assert own.shape == (batch, features) and set(np.unique(own)) <= {0.0, 2.0}
    assert ours.cell.input_dropout == 0.0  # the cell runs x * mask, on any engine
    ours._input_mask = lambda x: mask
    assert_close(np.asarray(ours(x, training=True)), want, "float32", "y")
    assert_close(np.asarray(ours(x)), np.asarray(ref(x)), "float32", "inference")
    # a wrong rule: each step its own mask
    per_step = np.random.default_rng(1).random((batch, steps, features)) >= 0.5
    cell = lstm_multi.get_cell("numpy")(features, units)
    params = ours.get_canonical_params()
    wrong, _ = cell(params, x * per_step * 2)
    assert not np.allclose(wrong, want, atol=1e-3)


def test_keras_dropout_with_recurrent_dropout_is_keras_rule():
    """``keras.layers.LSTM(dropout=p, recurrent_dropout=q)``: implementation 1, four input
    masks and four recurrent masks, one per gate, read back and given to our layer's
    cell: the same outputs. One input mask for all four gates is not Keras's."""
    keras = _keras()
    batch, steps, features, units = 3, 6, 2, 4
    x = np.random.default_rng(0).standard_normal((batch, steps, features)).astype("float32")
    ref, ours = _keras_pair(keras, x, units, dropout=0.5, recurrent_dropout=0.3)
    inputs = ref.cell.get_dropout_mask(np.zeros((batch, features), "float32"))
    recurrent = ref.cell.get_recurrent_dropout_mask(np.zeros((batch, units), "float32"))
    e = np.stack([np.asarray(m) for m in inputs], 1)  # (B, 4, I)
    d = np.stack([np.asarray(m) for m in recurrent], 1)  # (B, 4, H)
    want = np.asarray(ref(x, training=True))
    assert ours.cell.input_dropout == 0.5

    def run(e):
        ours.cell._regularizers = lambda key, x: (
            None if key is None else [regularize.StepMasks(None, None, d, e)],
            None,
        )
        return np.asarray(ours(x, training=True))

    assert_close(run(e), want, "float32", "y")
    assert not np.allclose(run(e[:, :1].repeat(4, 1)), want, atol=1e-3)


@pytest.mark.parametrize("rates", [dict(dropout=0.4), dict(dropout=0.4, recurrent_dropout=0.2)])
def test_keras_layer_dropout_trains_and_round_trips(rates):
    """Training draws new masks each call, from the layer's seed generator; inference is
    Keras's; the config round-trips ``dropout``."""
    keras = _keras()
    import lstm_multi.keras as lk

    x = np.random.default_rng(1).standard_normal((4, 5, 3)).astype("float32")
    ref, ours = _keras_pair(keras, x, 4, **rates)
    a, b = np.asarray(ours(x, training=True)), np.asarray(ours(x, training=True))
    assert not np.allclose(a, b)
    assert_close(np.asarray(ours(x)), np.asarray(ref(x)), "float32", "inference")
    config = ours.get_config()
    assert config["dropout"] == 0.4
    again = lk.LSTM.from_config(config)
    assert again.dropout == 0.4
    assert again.recurrent_dropout == rates.get("recurrent_dropout", 0.0)


@pytest.mark.parametrize("rates", [dict(dropout=0.4), dict(dropout=0.4, recurrent_dropout=0.2)])
def test_keras_model_fit_runs_with_dropout(rates):
    """``model.fit`` (Keras's jitted step on JAX) trains with the masks drawn in it."""
    keras = _keras()
    import lstm_multi.keras as lk

    x = np.random.default_rng(1).standard_normal((4, 5, 3)).astype("float32")
    model = keras.Sequential([keras.Input((5, 3)), lk.LSTM(4, seed=2, **rates)])
    model.compile("sgd", "mse")
    before = [np.asarray(w) for w in model.get_weights()]
    history = model.fit(x, np.ones((4, 4), "float32"), epochs=1, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert any(
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(before, model.get_weights(), strict=True)
    )


def test_keras_layer_refuses_bad_dropout():
    _keras()
    import lstm_multi.keras as lk

    with pytest.raises(ValueError, match="dropout"):
        lk.LSTM(4, dropout=1.0)
    with pytest.raises(TypeError, match="dropout"):
        lk.LSTM(4, dropout="0.2")


@pytest.mark.parametrize("variant", oracle.VARIANTS)
def test_every_variant_agrees_with_the_oracle(variant, thorough):
    if not thorough:
        pytest.skip("every variant runs under --thorough (peephole, peephole_full, lstm run "
                    "in the default run)")  # fmt: skip
    # JAX runs every variant's generated array code in one regularized scan: two variants
    # (fused and split halves) take its path; numpy's hand-written backward and torch every one
    for backend in BACKENDS if variant in ("peephole", "layernorm") else ("numpy", "torch"):
        _against_oracle(
            backend, 11, lengths=np.array([5, 3, 1]), variant=variant, input_dropout=0.35
        )
        _against_oracle(backend, 12, variant=variant, proj_size=2, input_dropout=0.2, **RATES)
