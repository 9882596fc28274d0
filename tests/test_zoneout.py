"""Zoneout, recurrent dropout and DropConnect on U in the functional cells
(``lstm_multi.regularize``; ``zoneout=``, ``recurrent_dropout=``, ``dropconnect=``).

Checked on numpy, torch and jax in float64 against the independent oracle, given the
masks the cell drew (``cell.regularizer_masks``): outputs, final states and every
gradient, in training (masks) and in evaluation (zoneout's expectation); p = 0 is the
plain network exactly; the same key gives the same masks and another key others;
padding never leaks; the kernel engines refuse and say why; bad arguments are refused.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, float64_key

import lstm_multi

oracle = pytest.importorskip("oracle")

BACKENDS = ("numpy", "torch", "jax")
RATES = dict(zoneout=(0.3, 0.2), recurrent_dropout=0.3, dropconnect=0.25)


def _layers(backend):
    """The layers of an oracle check whose point is not the layers: JAX runs one (both
    directions), numpy and torch two. JAX's compilations are most of its time, a scan
    forward and backward a layer-direction; the layers' plumbing (each layer-direction's
    masks drawn, layer 1 reading 2 H) is the network's, shared with numpy and torch, and
    JAX runs two layers in test_input_dropout's every-regularizer test."""
    return {"num_layers": 1} if backend == "jax" else {}


def _cell(backend, **kwargs):
    if backend not in lstm_multi.available_backends():
        pytest.skip(f"{backend} is not installed")
    if backend == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            pytest.skip("float64 needs JAX's x64 mode")
    sizes = dict(input_size=2, hidden_size=3, num_layers=2, bidirectional=True, batch_first=False)
    return lstm_multi.get_cell(backend)(**{**sizes, **kwargs})


def _array(backend, a):
    if backend == "torch":
        import torch

        return torch.as_tensor(a)
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(a)
    return a


def _key(backend, n):
    if backend == "jax":
        import jax

        return jax.random.key(n)
    return n


def _numpy(a):
    if a is None or isinstance(a, float):
        return a
    return np.asarray(a.detach() if hasattr(a, "detach") else a)


def _against_oracle(backend, key, lengths=None, mask=None, **kwargs):
    """The cell's call and vjp against the oracle given the cell's own masks."""
    cell = _cell(backend, **kwargs)
    params = cell.init(seed=3, dtype="float64")
    rng = np.random.default_rng(4)
    steps, batch = 5, 3
    x = rng.standard_normal((steps, batch, 2))
    h_shape, c_shape = cell.state_shapes(batch)
    h0, c0 = rng.standard_normal(h_shape), rng.standard_normal(c_shape)
    width = cell.num_directions * cell.output_size
    dy, dh_n, dc_n = (rng.standard_normal(s) for s in ((steps, batch, width), h_shape, c_shape))
    call = dict(lengths=lengths, mask=None if mask is None else _array(backend, mask))
    if key is not None:
        call["dropout_key"] = _key(backend, key)
    state = (_array(backend, h0), _array(backend, c0))
    cotangents = tuple(_array(backend, a) for a in (dy, dh_n, dc_n))
    if backend == "jax":
        (y, (h_n, c_n)), (grads, dx, dh0, dc0) = _jax_outputs_and_gradients(
            cell, params, _array(backend, x), state, cotangents, call
        )
    else:
        y, (h_n, c_n) = cell(params, _array(backend, x), state, **call)
        grads, dx, (dh0, dc0) = cell.vjp(
            params, _array(backend, x), cotangents[0], state,
            dh_n=cotangents[1], dc_n=cotangents[2], **call,
        )  # fmt: skip
    step_masks, u_masks = cell.regularizer_masks(
        _array(backend, x), None if key is None else _key(backend, key)
    )
    np_params = cell.to_numpy(params)
    if u_masks is not None:  # the oracle runs U' = U * M; dU = dU' * M
        for k, p in enumerate(q for layer in np_params for q in layer):
            p["U"] = p["U"] * _numpy(u_masks[k])
    masks = None
    if step_masks is not None:
        masks = [
            {
                "keep_h": _numpy(m.keep_h),
                "keep_c": _numpy(m.keep_c),
                "drop": _numpy(m.recurrent),
                "drop_x": _numpy(m.inputs),
            }
            for m in step_masks
        ]
    want = oracle.oracle(
        cell.variant.name, np_params, x, h0, c0, lengths, dy, dh_n, dc_n, mask=mask, masks=masks
    )
    for name, got in (("y", y), ("h_n", h_n), ("c_n", c_n), ("dx", dx), ("dh0", dh0), ("dc0", dc0)):
        assert_close(_numpy(got), want[name], float64_key(cell.variant), name)
    for k, (got, wanted) in enumerate(
        zip(
            (q for layer in grads for q in layer),
            (q for layer in want["grads"] for q in layer),
            strict=True,
        )
    ):
        for name in wanted:
            expected = wanted[name]
            if name == "U" and u_masks is not None:
                expected = expected * _numpy(u_masks[k])
            assert_close(_numpy(got[name]), expected, float64_key(cell.variant), f"d{name} of {k}")
    return cell


def _jax_outputs_and_gradients(cell, params, x, state, cotangents, call):
    """The JAX cell's outputs and every gradient from one jitted ``jax.vjp`` of its call
    (the key, lengths and mask as given): one program to compile where the call and
    ``vjp`` are two, and a compilation is most of a JAX check's time. The cell's ``vjp``
    is that ``jax.vjp`` of its call in a jit of its own; its own entry meets ``jax.grad``
    in test_jax_key_is_traceable_and_grad_is_the_vjp and runs with the regularizers in
    test_padding_does_not_leak."""
    import jax

    @jax.jit
    def outputs_and_gradients(params, x, h0, c0, dy, dh_n, dc_n):
        def run(params, x, h0, c0):
            return cell(params, x, (h0, c0), **call)

        outputs, pullback = jax.vjp(run, params, x, h0, c0)
        return outputs, pullback((dy, (dh_n, dc_n)))

    return outputs_and_gradients(params, x, *state, *cotangents)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_agrees_with_the_oracle(backend):
    """All three regularizers, peephole, two layers (JAX one: ``_layers``), both
    directions, right padding."""
    lengths = np.array([5, 2, 4])
    cell = _against_oracle(backend, 7, lengths, variant="peephole", **RATES, **_layers(backend))
    assert cell.last_choice.engine in ("array", "scan")


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_is_the_expectation(backend):
    """No key: h_t = p_h h_{t-1} + (1 - p_h) h̃_t and c likewise, against the oracle."""
    _against_oracle(backend, None, lengths=np.array([5, 2, 4]), **RATES, **_layers(backend))


@pytest.mark.parametrize(
    ("variant", "extra"),
    [("peephole_full", {}), ("lstm", {"proj_size": 2}), ("cifg", {"zoneout": 0.4})],
)
def test_variants_with_a_mask_agree_with_the_oracle(variant, extra):
    """r = c_{t-1} (peephole_full), a projection, one zoneout rate; a mask with gaps."""
    mask = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    _against_oracle("numpy", 2, mask=mask, variant=variant, **{**RATES, **extra})


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_layer_normalised_lstm_with_every_regularizer_agrees_with_the_oracle(backend):
    """Split halves (x_t W and r U apart, b in the gate math): input and recurrent dropout
    mask the x_t W and r U halves, zoneout blends the step's result, DropConnect masks U;
    two layers, both directions, right padding, training."""
    lengths = np.array([5, 2, 4])
    rates = {**RATES, "input_dropout": 0.2}
    cell = _against_oracle(backend, 5, lengths=lengths, variant="layernorm", **rates)
    assert cell.last_choice.engine in ("array", "scan")


def test_torch_and_jax_agree_with_the_oracle_on_peephole_full():
    for backend in ("torch", "jax"):
        _against_oracle(
            backend, 5, variant="peephole_full", proj_size=0, **RATES, **_layers(backend)
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rates_are_the_plain_network_exactly(backend):
    cell = _cell(backend, variant="peephole")
    zero = _cell(backend, variant="peephole", zoneout=0.0, recurrent_dropout=0.0, dropconnect=0.0)
    params = cell.init(seed=1, dtype="float64")
    x = _array(backend, np.random.default_rng(1).standard_normal((4, 2, 2)))
    for key in (None, _key(backend, 3)):
        call = {} if key is None else {"dropout_key": key}
        y, _ = cell(params, x, **call)
        y0, _ = zero(params, x, **call)
        np.testing.assert_array_equal(_numpy(y0), _numpy(y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_choose_the_masks(backend):
    cell = _cell(backend, **RATES, **_layers(backend))
    params = cell.init(seed=1, dtype="float64")
    x = _array(backend, np.random.default_rng(1).standard_normal((4, 2, 2)))
    a, _ = cell(params, x, dropout_key=_key(backend, 1))
    b, _ = cell(params, x, dropout_key=_key(backend, 1))
    c, _ = cell(params, x, dropout_key=_key(backend, 2))
    np.testing.assert_array_equal(_numpy(a), _numpy(b))
    assert not np.allclose(_numpy(a), _numpy(c))
    masks, u_masks = cell.regularizer_masks(x, _key(backend, 1))
    other, _ = cell.regularizer_masks(x, _key(backend, 2))
    assert not np.array_equal(_numpy(masks[0].keep_h), _numpy(other[0].keep_h))
    assert set(np.unique(_numpy(masks[0].keep_h))) <= {0.0, 1.0}
    assert set(np.unique(_numpy(masks[0].recurrent))) <= {0.0, 1 / 0.7}
    assert set(np.unique(_numpy(u_masks[0]))) <= {0.0, 1 / 0.75}


def test_mask_rates_are_the_given_probabilities():
    cell = _cell("numpy", hidden_size=50, **RATES)
    x = np.zeros((40, 30, 2))
    masks, u_masks = cell.regularizer_masks(x, 0)
    assert abs(masks[0].keep_h.mean() - 0.3) < 0.02
    assert abs(masks[0].keep_c.mean() - 0.2) < 0.02
    assert abs((masks[0].recurrent == 0).mean() - 0.3) < 0.03
    assert abs((u_masks[0] == 0).mean() - 0.25) < 0.03


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_does_not_leak(backend):
    """NaN in the padded steps changes nothing, the held state included."""
    cell = _cell(backend, batch_first=True, num_layers=1, **RATES)  # one layer: JAX compiles
    params = cell.init(seed=2, dtype="float64")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, 2))
    lengths = np.array([5, 2, 3])
    nan = x.copy()
    for n, length in enumerate(lengths):
        nan[n, length:] = np.nan
    dy = _array(backend, rng.standard_normal((3, 5, 2 * cell.output_size)))
    key = _key(backend, 4)
    for call in (dict(dropout_key=key), {}):
        y, (h, c) = cell(params, _array(backend, x), lengths=lengths, **call)
        y2, (h2, c2) = cell(params, _array(backend, nan), lengths=lengths, **call)
        for a, b in ((y, y2), (h, h2), (c, c2)):
            np.testing.assert_array_equal(_numpy(a), _numpy(b))
        grads, dx, _ = cell.vjp(params, _array(backend, nan), dy, lengths=lengths, **call)
        assert np.isfinite(_numpy(dx)).all()
        assert all(
            np.isfinite(_numpy(g)).all() for layer in grads for p in layer for g in p.values()
        )
        assert (_numpy(y2)[1, 2:] == 0).all()


def test_vjp_matches_finite_differences():
    """numpy's hand-written BPTT with fixed masks (the same int key), float64."""
    cell = _cell("numpy", variant="peephole", **RATES)
    params = cell.init(seed=5, dtype="float64")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 2, 2))
    dy = rng.standard_normal((4, 2, 6))
    grads, dx, _ = cell.vjp(params, x, dy, dropout_key=9)

    def loss(params, x):
        return float(np.sum(cell(params, x, dropout_key=9)[0] * dy))

    eps = 1e-6
    for layer, direction, name, index in ((1, 1, "U", (2, 7)), (0, 0, "p", (1, 2))):
        plus = [[dict(p) for p in lay] for lay in params]
        minus = [[dict(p) for p in lay] for lay in params]
        for sign, ps in ((1, plus), (-1, minus)):
            ps[layer][direction][name] = params[layer][direction][name].copy()
            ps[layer][direction][name][index] += sign * eps
        numeric = (loss(plus, x) - loss(minus, x)) / (2 * eps)
        assert abs(numeric - grads[layer][direction][name][index]) < 1e-6
    shifted = x.copy()
    shifted[2, 1, 0] += eps
    other = x.copy()
    other[2, 1, 0] -= eps
    assert abs((loss(params, shifted) - loss(params, other)) / (2 * eps) - dx[2, 1, 0]) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_engines_refuse_and_say_why(backend):
    cell = _cell(backend, zoneout=0.1)
    x = _array(backend, np.zeros((3, 2, 2)))
    choice = cell.explain(x, dropout_key=_key(backend, 1))
    assert choice.engine in ("array", "scan")
    for name, why in choice.passed_over:
        assert "zoneout" in why, (name, why)
    # evaluation's zoneout (the expectation) runs on the array loops too, at this stage
    assert cell.explain(x).engine in ("array", "scan")
    # DropConnect alone needs no array loop
    plain = _cell(backend, dropconnect=0.5)
    assert plain.explain(x, dropout_key=_key(backend, 1)).engine == plain.explain(x).engine


def test_named_kernel_engine_falls_back():
    cell = _cell("numpy", engine="cpu_kernels", recurrent_dropout=0.2)
    choice = cell.explain(np.zeros((3, 2, 2)), dropout_key=1)
    assert choice.engine == "array"
    assert "recurrent dropout" in choice.passed_over[0][1]
    # without a key recurrent dropout does nothing: the kernels run
    assert cell.explain(np.zeros((3, 2, 2))).engine in ("cpu_kernels", "array")


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        (dict(zoneout=1.0), ValueError, "zoneout"),
        (dict(zoneout=-0.1), ValueError, "zoneout"),
        (dict(zoneout=(0.1,)), ValueError, "zoneout"),
        (dict(zoneout="0.1"), TypeError, "zoneout"),
        (dict(zoneout=(0.1, 1.5)), ValueError, "zoneout"),
        (dict(recurrent_dropout=1), ValueError, "recurrent_dropout"),
        (dict(recurrent_dropout=True), TypeError, "recurrent_dropout"),
        (dict(dropconnect=2.0), ValueError, "dropconnect"),
        (dict(dropconnect=None), TypeError, "dropconnect"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, name):
    with pytest.raises(error, match=name):
        lstm_multi.get_cell("numpy")(2, 3, **kwargs)


def test_step_runs_evaluation_zoneout():
    """``step`` is the sequence call with T = 1, evaluation's expectation included."""
    cell = _cell("numpy", bidirectional=False, batch_first=True, zoneout=(0.5, 0.3))
    params = cell.init(seed=1, dtype="float64")
    x = np.random.default_rng(1).standard_normal((2, 4, 2))
    y, _ = cell(params, x)
    state = None
    for t in range(4):
        y_t, state = cell.step(params, x[:, t], state)
        assert_close(y_t, y[:, t], "float64", f"y at {t}")


# the torch module ------------------------------------------------------------------


def _module(**kwargs):
    torch = pytest.importorskip("torch")
    from lstm_multi.torch import LSTM

    torch.manual_seed(0)
    sizes = dict(num_layers=2, batch_first=True, bidirectional=True, variant="peephole")
    return LSTM(3, 4, **{**sizes, **kwargs}).double()


def test_torch_module_draws_the_cells_masks_from_torchs_generator():
    """Training: the masks of ``dropout_key`` = one seed drawn from torch's default
    generator, so the module equals the functional cell given that seed; evaluation:
    the cell without a key. ``torch.manual_seed`` repeats a call, another seed does not."""
    import torch

    module = _module(**RATES)
    cell = lstm_multi.get_cell("torch")(3, 4, "peephole", 2, True, **RATES)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.manual_seed(1)
    y, (h, c) = module(x)
    torch.manual_seed(1)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    want, (h_want, c_want) = cell(module.canonical_params(), x, dropout_key=seed)
    for got, expected in ((y, want), (h, h_want), (c, c_want)):
        np.testing.assert_array_equal(_numpy(got), _numpy(expected))
    assert module.last_choice.engine == "array"
    torch.manual_seed(2)
    assert not torch.allclose(module(x)[0], y)
    y.sum().backward()
    assert module.weight_hh_l1_reverse.grad.abs().sum() > 0
    module.eval()
    y_eval, _ = module(x)
    np.testing.assert_array_equal(_numpy(y_eval), _numpy(cell(module.canonical_params(), x)[0]))
    assert "zoneout" in str(module.explain(x))


def test_torch_module_dropconnect_runs_on_nn_lstms_kernel():
    """DropConnect alone: the masked U on the native kernel equals the array engine's."""
    import torch

    native = _module(variant="lstm", dropconnect=0.4)
    array = _module(variant="lstm", dropconnect=0.4, native=False)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.manual_seed(3)
    y, _ = native(x)
    assert native.last_choice.engine == "native"
    torch.manual_seed(3)
    y_array, _ = array(x)
    assert_close(_numpy(y), _numpy(y_array), "float64", "y")
    native.eval()
    np.testing.assert_array_equal(_numpy(native(x)[0]), _numpy(_module(variant="lstm")(x)[0]))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [(dict(zoneout=1.0), "zoneout"), (dict(recurrent_dropout=-1), "recurrent_dropout")],
)
def test_torch_module_refuses_bad_rates(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _module(**kwargs)


# the Keras layer ---------------------------------------------------------------------


def _keras():
    import os

    os.environ.setdefault("KERAS_BACKEND", "jax")  # read when keras is first imported
    keras = pytest.importorskip("keras")
    if keras.backend.backend() not in ("jax", "torch"):
        pytest.skip(f"Keras runs on {keras.backend.backend()} here")
    return keras


def test_keras_recurrent_dropout_is_keras_rule():
    """``keras.layers.LSTM(recurrent_dropout=p)`` in training, its four masks read back
    (drawn before the call: the cell caches them for the call), against lstm_multi's
    step with those masks: Keras's rule (one mask per gate on h_{t-1}, fixed over the
    sequence) is lstm_multi's. Keras's random numbers themselves cannot be matched."""
    keras = _keras()
    from lstm_multi import convert, regularize

    batch, steps, features, units = 3, 6, 2, 4
    x = np.random.default_rng(0).standard_normal((batch, steps, features)).astype("float32")
    ref = keras.layers.LSTM(units, recurrent_dropout=0.5, return_sequences=True, seed=1)
    ref.build((batch, steps, features))
    masks = ref.cell.get_recurrent_dropout_mask(np.zeros((batch, units), "float32"))
    want = np.asarray(ref(x, training=True))
    recurrent = np.stack([np.asarray(m) for m in masks], 1)  # (B, 4, H)
    assert set(np.unique(recurrent)) <= {0.0, 2.0}
    cell = lstm_multi.get_cell("numpy")(features, units, batch_first=True)
    params = convert.from_keras(ref)
    zeros = np.zeros((1, batch, units), "float32")
    got, _, _ = cell._forward(
        params, np.swapaxes(x, 0, 1), zeros, zeros, None,
        step_masks=[regularize.StepMasks(None, None, recurrent)],
    )  # fmt: skip
    assert_close(np.swapaxes(got, 0, 1), want, "float32", "y")
    # one mask for all four gates (a wrong rule) is not Keras's
    wrong, _, _ = cell._forward(
        params, np.swapaxes(x, 0, 1), zeros, zeros, None,
        step_masks=[regularize.StepMasks(None, None, recurrent[:, :1].repeat(4, 1))],
    )  # fmt: skip
    assert not np.allclose(np.swapaxes(wrong, 0, 1), want, atol=1e-3)


def test_keras_layer_recurrent_dropout_trains_and_infers_as_keras():
    """Inference: ``keras.layers.LSTM``'s output (recurrent dropout off); training: masks
    from the layer's seed generator (a new draw each call), the rate's statistics."""
    keras = _keras()
    import lstm_multi.keras as lk
    from lstm_multi import convert

    batch, steps, features, units = 4, 5, 3, 4
    x = np.random.default_rng(1).standard_normal((batch, steps, features)).astype("float32")
    ref = keras.layers.LSTM(units, recurrent_dropout=0.4, return_sequences=True, seed=2)
    ours = lk.LSTM(units, recurrent_dropout=0.4, return_sequences=True, seed=2)
    ref.build(x.shape)
    ours.build(x.shape)
    for layer, values in zip(ours._params, convert.from_keras(ref), strict=True):
        for p, v in zip(layer, values, strict=True):
            for k in p:
                p[k].assign(v[k])
    assert_close(np.asarray(ours(x)), np.asarray(ref(x)), "float32", "inference")
    a, b = np.asarray(ours(x, training=True)), np.asarray(ours(x, training=True))
    assert not np.allclose(a, b)  # a new draw each call
    assert not np.allclose(a, np.asarray(ours(x)))
    config = ours.get_config()
    assert config["recurrent_dropout"] == 0.4
    again = lk.LSTM.from_config(config)
    assert again.recurrent_dropout == 0.4 and again.zoneout == (0.0, 0.0)


def test_keras_layer_zoneout_in_inference_is_the_expectation():
    keras = _keras()
    import lstm_multi.keras as lk

    x = np.random.default_rng(2).standard_normal((2, 5, 3)).astype("float32")
    layer = lk.LSTM(4, zoneout=(0.5, 0.25), return_sequences=True, seed=3)
    y = np.asarray(layer(x))
    cell = lstm_multi.get_cell("numpy")(3, 4, zoneout=(0.5, 0.25))
    params = [
        [{k: np.asarray(v.value) for k, v in p.items()} for p in lay] for lay in layer._params
    ]
    assert_close(y, cell(params, x)[0], "float32", "y")
    assert keras.backend.backend() in ("jax", "torch")
    with pytest.raises(ValueError, match="recurrent_dropout"):
        lk.LSTM(4, recurrent_dropout=1.0)


# JAX's transforms; every variant (thorough) --------------------------------------------


def test_jax_key_is_traceable_and_grad_is_the_vjp():
    """A key passed into ``jax.jit``; ``jax.grad`` through the call with it equals ``vjp``."""
    jax = pytest.importorskip("jax")
    cell = _cell("jax", num_layers=1, bidirectional=False, **RATES)
    params = cell.init(seed=1, dtype="float64")
    x = jax.numpy.asarray(np.random.default_rng(1).standard_normal((4, 2, 2)))
    key = jax.random.key(5)
    y, _ = jax.jit(lambda p, k: cell(p, x, dropout_key=k)[0])(params, key), None
    np.testing.assert_allclose(np.asarray(y), np.asarray(cell(params, x, dropout_key=key)[0]))
    grads = jax.grad(lambda p: cell(p, x, dropout_key=key)[0].sum())(params)
    want, _, _ = cell.vjp(params, x, jax.numpy.ones_like(y), dropout_key=key)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-12)


@pytest.mark.parametrize("variant", oracle.VARIANTS)
def test_every_variant_agrees_with_the_oracle(variant, thorough):
    if not thorough:
        pytest.skip("every variant runs under --thorough (peephole, peephole_full, lstm, cifg "
                    "run in the default run)")  # fmt: skip
    # JAX runs every variant's generated array code in one regularized scan: two variants
    # (fused and split halves) take its path; numpy's hand-written backward and torch every one
    for backend in BACKENDS if variant in ("peephole", "layernorm") else ("numpy", "torch"):
        _against_oracle(backend, 11, lengths=np.array([5, 3, 1]), variant=variant, **RATES)
        _against_oracle(backend, None, variant=variant, proj_size=2, **RATES)


# the Flax and Equinox layers -------------------------------------------------------------

#: the functional cells' rates: the layers' problems are the one of
#: ``test_jax_key_is_traceable_and_grad_is_the_vjp`` (one layer, "lstm", x (4, 2, 2)
#: float64), which runs before them, so that the run's persistent compilation cache
#: (conftest) has their programs (a compile takes seconds)
LAYER_RATES = RATES
LAYER_FRONTENDS = ("nnx", "linen", "equinox")


class _Layer:
    """One layer of a frontend (float64 "lstm", 2 -> 3, time-major, one layer: one
    compiled scan shared by the tests) seen through one interface:
    ``train(x, seed, lengths)`` (the framework's own key or stream from ``seed``),
    ``evaluate(x, lengths)``, ``grads(x, seed)`` (the canonical parameters' gradients of
    sum(y) in training), ``params`` (canonical) and ``cell_key(seed)``: the JAX key the
    functional cell gets from ``seed``, None where the framework derives it (Linen's
    ``make_rng`` folds in the module path)."""

    def __init__(self, frontend, **rates):
        jax = pytest.importorskip("jax")
        if not jax.config.jax_enable_x64:
            pytest.skip("float64 needs JAX's x64 mode")
        jnp = jax.numpy
        config = dict(batch_first=False, **rates)
        self.frontend, self.jax = frontend, jax
        if frontend == "equinox":
            eqx = pytest.importorskip("equinox")
            from lstm_multi.equinox import LSTM

            model = LSTM(2, 3, dtype=jnp.float64, key=jax.random.key(0), **config)
            self.params = model.params

            def run(params, x, key, lengths=None):
                with_params = eqx.tree_at(lambda m: m.params, model, params)
                return with_params(x, lengths=lengths, key=key, inference=key is None)[0]

            self._run, self.model = run, model
            self.cell_key = jax.random.key
            return
        pytest.importorskip("flax")
        from flax import nnx

        from lstm_multi.flax import LSTM, LinenLSTM

        if frontend == "nnx":
            model = LSTM(2, 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0), **config)
            self.params = model.params

            def run(model, x, key, lengths=None):
                if key is None:
                    return model(x, lengths=lengths, deterministic=True)[0]
                return model(x, lengths=lengths, rngs=nnx.Rngs(dropout=key))[0]

            def grads(x, seed):  # nnx.grad of the module: its Params' gradients
                layers = nnx.to_pure_dict(nnx.grad(lambda m: run(m, x, seed).sum())(model))
                layers = layers["layers"]
                return [[layers[l][d] for d in sorted(layers[l])] for l in sorted(layers)]

            self._run, self.model, self._grads = run, model, grads
            self.cell_key = lambda seed: nnx.Rngs(dropout=seed).dropout()
            return
        module = LinenLSTM(2, 3, param_dtype=jnp.float64, **config)
        x = jax.ShapeDtypeStruct((4, 2, 2), jnp.float64)
        variables = module.lazy_init(jax.random.key(0), x, deterministic=True)
        self.params = [[dict(p) for p in layer] for layer in variables["params"]["layers"]]

        def run(params, x, key, lengths=None):
            variables = {"params": {"layers": params}}
            if key is None:
                return module.apply(variables, x, lengths=lengths, deterministic=True)[0]
            rngs = {"dropout": jax.random.key(key)}
            return module.apply(variables, x, lengths=lengths, deterministic=False, rngs=rngs)[0]

        self._run, self.model = run, module
        self.cell_key = lambda seed: None

    def train(self, x, seed, lengths=None):
        return self._run(self._held(), x, seed, lengths)

    def evaluate(self, x, lengths=None):
        return self._run(self._held(), x, None, lengths)

    def _held(self):
        return self.model if self.frontend == "nnx" else self.params

    def grads(self, x, seed):
        if self.frontend == "nnx":
            return self._grads(x, seed)
        return self.jax.grad(lambda p: self._run(p, x, seed).sum())(self.params)


def _layer_x(seed=0):
    return np.random.default_rng(seed).standard_normal((4, 2, 2))  # (T, B, in)


@pytest.mark.parametrize("frontend", LAYER_FRONTENDS)
def test_layers_train_with_the_frameworks_keys(frontend):
    """Training: one key gives the same masks (the same y), another key others; the masks
    are the functional cell's given the key the framework hands it (NNX's ``"dropout"``
    stream, Equinox's ``key=``), and so are the gradients (the same masks); finite."""
    layer = _Layer(frontend, **LAYER_RATES)
    x = _layer_x()
    a, b = layer.train(x, 1), layer.train(x, 1)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = layer.train(x, 2)
    assert not np.allclose(np.asarray(a), np.asarray(other))
    assert not np.allclose(np.asarray(a), np.asarray(layer.evaluate(x)))
    grads = layer.grads(x, 1)
    leaves = [np.asarray(g) for g in layer.jax.tree.leaves(grads)]
    assert leaves and all(np.isfinite(g).all() for g in leaves)
    assert all(np.abs(g).sum() > 0 for g in leaves)
    key = layer.cell_key(1)
    if key is None:  # Linen: make_rng's key is the framework's own derivation
        return
    cell = layer.model.cell  # the layer's functional cell (its compiled calls)
    assert (cell.zoneout, cell.recurrent_dropout, cell.dropconnect) == ((0.3, 0.2), 0.3, 0.25)
    want = cell(layer.params, x, dropout_key=key)[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(want))
    want_grads = layer.jax.grad(lambda p: cell(p, x, dropout_key=key)[0].sum())(layer.params)
    for got, expected in zip(leaves, layer.jax.tree.leaves(want_grads), strict=True):
        assert_close(got, np.asarray(expected), "float64", "gradient")


@pytest.mark.parametrize("frontend", LAYER_FRONTENDS)
def test_layers_evaluate_zoneouts_expectation(frontend):
    """Evaluation (``deterministic=True``, ``inference=True``): h_t = p_h h_{t-1} +
    (1 - p_h) h̃_t, c likewise, every dropout off: the oracle's zoneout with the
    probabilities, on the layer's own parameters."""
    layer = _Layer(frontend, **LAYER_RATES)
    x = _layer_x(1)
    lengths = None  # the program of the training test's evaluation: compiled once
    y = np.asarray(layer.evaluate(x, lengths))
    np.testing.assert_array_equal(y, np.asarray(layer.evaluate(x, lengths)))
    p_h, p_c = LAYER_RATES["zoneout"]
    params = [[{k: np.asarray(v) for k, v in p.items()} for p in lay] for lay in layer.params]
    zeros = np.zeros((1, 2, 3))
    want = oracle.oracle(
        "lstm", params, x, zeros, zeros, lengths, np.zeros_like(y), zeros, zeros,
        masks=[{"keep_h": p_h, "keep_c": p_c, "drop": None, "drop_x": None}],
    )  # fmt: skip
    assert_close(y, want["y"], "float64", "y")
    plain = oracle.oracle("lstm", params, x, zeros, zeros, lengths, y, zeros, zeros)
    assert not np.allclose(y, plain["y"])  # the expectation is not the plain network


@pytest.mark.parametrize("frontend", LAYER_FRONTENDS)
@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        (dict(zoneout=1.0), ValueError, "zoneout"),
        (dict(zoneout=(0.1, -0.2)), ValueError, "zoneout"),
        (dict(recurrent_dropout=-0.1), ValueError, "recurrent_dropout"),
        (dict(input_dropout="0.2"), TypeError, "input_dropout"),
        (dict(dropconnect=True), TypeError, "dropconnect"),
    ],
)
def test_layers_refuse_bad_rates(frontend, kwargs, error, name):
    with pytest.raises(error, match=name):
        _Layer(frontend, **kwargs)


def test_equinox_training_needs_a_key_and_inference_ignores_it():
    """As ``eqx.nn.Dropout``: a training call without a key is a RuntimeError naming
    ``key``; ``inference=True`` is evaluation whatever the key (``dropout`` alone keeps
    its rule, no key no dropout: test_layer_equinox)."""
    layer = _Layer("equinox", **LAYER_RATES)
    jax = layer.jax
    x = _layer_x()
    with pytest.raises(RuntimeError, match="key: .*zoneout, recurrent_dropout, dropconnect"):
        layer.model(x)
    np.testing.assert_array_equal(
        np.asarray(layer.model(x, key=jax.random.key(3), inference=True)[0]),
        np.asarray(layer.evaluate(x)),
    )
    with pytest.raises(TypeError, match="inference"):
        layer.model(x, key=jax.random.key(3), inference=None)
    from lstm_multi.equinox import LSTM

    again = LSTM.from_params(layer.params, zoneout=0.2, input_dropout=0.1)
    assert again.zoneout == (0.2, 0.2) and again.recurrent_dropout == 0.0
    assert again.cell.input_dropout == 0.1  # input dropout reaches the cell too


def test_flax_deterministic_is_evaluation():
    """NNX: ``model.eval()`` (the module's ``deterministic``) is evaluation; Linen: with a
    regularizer, ``deterministic`` must be said, as on ``linen.Dropout``."""
    layer = _Layer("nnx", **LAYER_RATES)
    x = _layer_x()
    layer.model.eval()
    np.testing.assert_array_equal(np.asarray(layer.model(x)[0]), np.asarray(layer.evaluate(x)))
    linen = _Layer("linen", **LAYER_RATES)
    variables = {"params": {"layers": linen.params}}
    with pytest.raises(Exception, match="deterministic"):
        linen.model.apply(variables, x)
