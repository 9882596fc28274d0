"""``lstm_multi.equinox.LSTM``: the Equinox layer over the JAX cell.

Its numbers are checked against independent computations: the float64 oracle
(``tests/oracle.py``, torch autograd), Equinox's own ``eqx.nn.LSTMCell``
scanned over time, and the NumPy backend; and against the functional JAX cell
it wraps. Float64 comes from the conftest, which turns on JAX's 64-bit mode.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
eqx = pytest.importorskip("equinox")
jnp = jax.numpy

from conftest import assert_close  # noqa: E402

import lstm_multi  # noqa: E402
from lstm_multi.equinox import LSTM  # noqa: E402

B, T, IN, H = 3, 5, 3, 4
LENGTHS = np.array([T, 3, 1])


def _normal(seed, shape, dtype="float64"):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _leaves_close(actual, expected, dtype, what):
    for k, (a, e) in enumerate(
        zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    ):
        assert_close(a, e, dtype, f"{what} leaf {k}")


# agreement --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant, dtype",
    [("lstm", "float64"), ("peephole", "float64"), ("cifg", "float64"), ("peephole", "float32")],
)
def test_outputs_and_gradients_match_the_oracle_and_the_cell(variant, dtype):
    """2 layers, bidirectional, initial state and lengths, under filter_jit + filter_grad."""
    oracle = pytest.importorskip("oracle")  # the float64 reference, by torch autograd
    model = LSTM(IN, H, variant=variant, num_layers=2, bidirectional=True, dtype=dtype,
                 key=jax.random.key(1))  # fmt: skip
    x = _normal(0, (B, T, IN), dtype)
    h0, c0 = _normal(1, (2, 4, B, H), dtype)
    dy, dh, dc = _normal(2, (B, T, 2 * H), dtype), *_normal(3, (2, 4, B, H), dtype)

    def loss(run, params, x, state):
        y, (h_n, c_n) = run(params, x, state)
        return jnp.sum(y * dy) + jnp.sum(h_n * dh) + jnp.sum(c_n * dc), (y, h_n, c_n)

    def of_module(args):
        model, x, state = args
        return loss(lambda m, x, s: m(x, s, LENGTHS), model, x, state)

    cell = lstm_multi.get_cell("jax")(IN, H, variant=variant, num_layers=2, bidirectional=True)
    run = lambda p, x, s: cell(p, x, s, LENGTHS)  # noqa: E731
    of_cell = jax.value_and_grad(
        lambda p, x, s: loss(run, p, x, s), argnums=(0, 1, 2), has_aux=True
    )

    # the module and the cell differentiated in one program: one compilation, not two (each
    # is traced on its own, so a module computing anything but the cell differs below)
    @eqx.filter_jit
    def both(model, x, state):
        module = eqx.filter_value_and_grad(of_module, has_aux=True)((model, x, state))
        return module, of_cell(model.params, x, state)

    ((_, outputs), (grads, dx, dstate)), ((_, cell_outputs), cell_grads) = both(model, x, (h0, c0))

    want = oracle.oracle(
        variant,
        [[{k: np.asarray(v, np.float64) for k, v in p.items()} for p in l] for l in model.params],
        x.transpose(1, 0, 2).astype(np.float64),
        h0.astype(np.float64),
        c0.astype(np.float64),
        LENGTHS,
        dy.transpose(1, 0, 2).astype(np.float64),
        dh.astype(np.float64),
        dc.astype(np.float64),
    )
    for got, key in zip(outputs, ("y", "h_n", "c_n"), strict=True):
        expected = want[key].transpose(1, 0, 2) if key == "y" else want[key]
        assert_close(got, expected, dtype, key)
    assert_close(dx, want["dx"].transpose(1, 0, 2), dtype, "dx")
    assert_close(dstate[0], want["dh0"], dtype, "dh0")
    assert_close(dstate[1], want["dc0"], dtype, "dc0")
    _leaves_close(grads.params, want["grads"], dtype, "grads")

    _leaves_close(outputs, cell_outputs, dtype, "outputs against the cell")
    _leaves_close((grads.params, dx, dstate), cell_grads, dtype, "grads against the cell")


def _scan_equinox(cells, x):
    """Equinox's own cells, stacked, scanned over time, one sequence at a time (vmap)."""

    def one(xs):
        finals = []
        for cell in cells:
            zeros = jnp.zeros(cell.hidden_size, xs.dtype)

            def step(state, x_t, cell=cell):
                h, c = cell(x_t, state)
                return (h, c), h

            state, xs = jax.lax.scan(step, (zeros, zeros), xs)
            finals.append(state)
        return xs, jnp.stack([h for h, _ in finals]), jnp.stack([c for _, c in finals])

    y, h_n, c_n = jax.vmap(one)(x)
    return y, h_n.transpose(1, 0, 2), c_n.transpose(1, 0, 2)  # states (L, B, H)


def test_imported_equinox_cells_compute_what_they_computed():
    keys = jax.random.split(jax.random.key(2))
    cells = [eqx.nn.LSTMCell(IN, H, dtype=jnp.float64, key=keys[0]),
             eqx.nn.LSTMCell(H, H, dtype=jnp.float64, key=keys[1])]  # fmt: skip
    model = LSTM.from_equinox(cells)
    assert (model.num_layers, model.bidirectional, model.variant.name) == (2, False, "lstm")
    x = _normal(4, (B, T, IN))
    dy = _normal(5, (B, T, H))
    peephole = LSTM.from_equinox(cells, variant="peephole")  # zero peepholes: the same function

    def loss(run, weights, x):
        return jnp.sum(run(weights, x)[0] * dy)

    # every computation of the check in one program (one compilation; eager, each call and
    # each operation around the scans was compiled on its own)
    @eqx.filter_jit
    def computed(model, peephole, cells, x):
        grads = jax.grad(lambda m, x: loss(lambda m, x: m(x), m, x), argnums=(0, 1))(model, x)
        want_grads = eqx.filter_grad(lambda a: loss(_scan_equinox, *a))((cells, x))
        return model(x), _scan_equinox(cells, x), peephole(x)[0], grads, want_grads

    got, want, got_peephole, (grads, dx), (want_grads, want_dx) = computed(
        model, peephole, cells, x
    )
    _leaves_close(got, (want[0], want[1:]), "float64", "outputs")
    assert_close(dx, want_dx, "float64", "dx")
    for layer, cell in enumerate(want_grads):
        g = grads.params[layer][0]
        assert_close(g["W"], cell.weight_ih.T, "float64", f"layer {layer} W")
        assert_close(g["U"], cell.weight_hh.T, "float64", f"layer {layer} U")
        assert_close(g["b"], cell.bias, "float64", f"layer {layer} b")

    back = model.to_equinox()
    for cell, (again,) in zip(cells, back, strict=True):
        for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(cell), strict=True):
            np.testing.assert_array_equal(a, b)
    assert_close(got_peephole, want[0], "float64", "peephole from Equinox cells")
    reverse = eqx.nn.LSTMCell(IN, H, dtype=jnp.float64, key=jax.random.key(3))
    pair = LSTM.from_equinox([(cells[0], reverse)])  # one layer, both directions
    assert pair.bidirectional and pair.num_layers == 1
    np.testing.assert_array_equal(pair.params[0][1]["W"], reverse.weight_ih.T)


def test_from_params_takes_another_backends_parameters():
    np_cell = lstm_multi.get_cell("numpy")(IN, H, variant="cifg", num_layers=2, batch_first=False)
    np_params = np_cell.init(seed=3, dtype="float64")
    model = LSTM.from_params(np_params, variant="cifg", batch_first=False)
    assert model.cell_arguments() == {
        "input_size": IN,
        "hidden_size": H,
        "variant": lstm_multi.get_variant("cifg"),
        "num_layers": 2,
        "bidirectional": False,
        "proj_size": 0,
        "dropout": 0.0,
        "batch_first": False,
        "zoneout": (0.0, 0.0),
        "recurrent_dropout": 0.0,
        "input_dropout": 0.0,
        "dropconnect": 0.0,
    }
    _leaves_close(model.params, np_params, "float64", "params")
    x = _normal(6, (T, B, IN))
    want = np_cell(np_params, x, lengths=LENGTHS)
    _leaves_close(model(x, lengths=LENGTHS), want, "float64", "outputs against numpy")
    again = LSTM.from_params(model.params, variant="cifg", batch_first=False)
    assert jax.tree.structure(again) == jax.tree.structure(model)


# Equinox and JAX machinery ----------------------------------------------------------


def test_every_array_is_a_leaf_and_keys_decide_the_parameters():
    model = LSTM(IN, H, variant="peephole", num_layers=2, bidirectional=True,
                 key=jax.random.key(0))  # fmt: skip
    arrays = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    assert len(arrays) == len(jax.tree.leaves(model)) == 2 * 2 * 4  # W, U, b, p
    assert all(a.dtype == jnp.float32 for a in arrays)
    same = LSTM(IN, H, variant="peephole", num_layers=2, bidirectional=True,
                key=jax.random.key(0))  # fmt: skip
    other = LSTM(IN, H, variant="peephole", num_layers=2, bidirectional=True,
                 key=jax.random.key(1))  # fmt: skip
    assert jax.tree.structure(same) == jax.tree.structure(model)
    for a, b, c in zip(arrays, jax.tree.leaves(same), jax.tree.leaves(other), strict=True):
        np.testing.assert_array_equal(a, b)
        assert not np.any(np.asarray(a) == np.asarray(c))
    # the key draws what every backend's cell.init draws from it
    np_cell = lstm_multi.get_cell("numpy")(IN, H, variant="peephole", num_layers=2,
                                           bidirectional=True)  # fmt: skip
    for a, b in zip(arrays, jax.tree.leaves(np_cell.init(seed=jax.random.key(0))), strict=True):
        np.testing.assert_array_equal(a, b)
    keras = LSTM(IN, H, scheme="keras", key=jax.random.key(0))
    np.testing.assert_array_equal(keras.params[0][0]["b"][H : 2 * H], np.ones(H))


def test_one_sequence_vmap_step_and_time_major_match_the_batch():
    model = LSTM(IN, H, num_layers=2, dtype=jnp.float64, key=jax.random.key(0))
    x = _normal(7, (B, T, IN))
    h0, c0 = _normal(8, (2, 2, B, H))
    y, (h_n, c_n) = model(x, (h0, c0), LENGTHS)
    for n in range(B):  # one sequence, its batch axis left out
        got = model(x[n], (h0[:, n], c0[:, n]), int(LENGTHS[n]))
        _leaves_close(got, (y[n], (h_n[:, n], c_n[:, n])), "float64", f"sequence {n}")
    mapped = jax.vmap(model, in_axes=(0, (1, 1), 0))(x, (h0, c0), jnp.asarray(LENGTHS))
    _leaves_close(mapped, (y, (h_n.transpose(1, 0, 2), c_n.transpose(1, 0, 2))), "float64", "vmap")
    time_major = LSTM(IN, H, num_layers=2, batch_first=False, dtype=jnp.float64,
                      key=jax.random.key(0))  # fmt: skip
    assert_close(time_major(x[0])[0], model(x[0])[0], "float64", "batch_first=False, one sequence")

    y, (h_n, c_n) = model(x)
    state, one_state = None, None
    for t in range(T):  # step through the stack, batched and one sequence
        y_t, state = model.step(x[:, t], state)
        y0_t, one_state = model.step(x[0, t], one_state)
        assert_close(y_t, y[:, t], "float64", f"step {t}")
        assert_close(y0_t, y[0, t], "float64", f"one sequence's step {t}")
    _leaves_close(state, (h_n, c_n), "float64", "final state of the steps")
    _leaves_close(one_state, (h_n[:, 0], c_n[:, 0]), "float64", "one sequence's final state")


def test_a_stacked_ensemble_runs_under_filter_vmap():
    models = [LSTM(IN, H, key=k) for k in jax.random.split(jax.random.key(0), 2)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *models)
    x = _normal(9, (B, T, IN), "float32")
    ys = eqx.filter_vmap(lambda m: m(x)[0])(stacked)
    for y, model in zip(ys, models, strict=True):
        assert_close(y, model(x)[0], "float32", "ensemble member")


def test_serialisation_round_trip(tmp_path):
    model = LSTM(IN, H, variant="peephole", bidirectional=True, key=jax.random.key(0))
    path = tmp_path / "lstm.eqx"
    eqx.tree_serialise_leaves(path, model)
    like = LSTM(IN, H, variant="peephole", bidirectional=True, key=jax.random.key(5))
    loaded = eqx.tree_deserialise_leaves(path, like)
    x = _normal(10, (B, T, IN), "float32")
    assert not np.array_equal(like(x)[0], model(x)[0])
    for a, b in zip(jax.tree.leaves(loaded(x)), jax.tree.leaves(model(x)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_optax_training_under_filter_jit_reduces_the_loss():
    optax = pytest.importorskip("optax")
    model = LSTM(IN, H, variant="cifg", key=jax.random.key(0))
    x = _normal(11, (B, T, IN), "float32")
    target = jnp.tanh(0.5 * x.sum(axis=(1, 2)))  # (B,), read from the last output's unit 0

    def loss(model, x):
        return jnp.mean((model(x)[0][:, -1, 0] - target) ** 2)

    optimiser = optax.adam(0.05)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def train_step(model, opt_state, x):
        value, grads = eqx.filter_value_and_grad(loss)(model, x)
        updates, opt_state = optimiser.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, value

    losses = []
    for _ in range(30):
        model, opt_state, value = train_step(model, opt_state, x)
        losses.append(float(value))
    assert losses[-1] < 0.2 * losses[0], losses
    assert isinstance(model, LSTM) and model.variant.name == "cifg"


# errors -------------------------------------------------------------------------------


def test_bad_arguments_are_clear_errors():
    key = jax.random.key(0)
    model = LSTM(IN, H, key=key)
    x = jnp.zeros((B, T, IN), jnp.float32)
    cells = [eqx.nn.LSTMCell(IN, H, key=key)]
    cases = [
        (lambda: LSTM(IN, H), TypeError, r"key: expected a JAX PRNG key \(jax.random.key\(n\)\)"),
        (lambda: LSTM(IN, H, key=0), TypeError, "key: expected a JAX PRNG key .* got int"),
        (
            lambda: eqx.filter_vmap(lambda k: LSTM(IN, H, key=k))(jax.random.split(key)),
            TypeError,
            "key: expected a concrete JAX PRNG key, got a traced one",
        ),
        (lambda: LSTM(0, H, key=key), ValueError, "input_size: expected a positive integer"),
        (lambda: LSTM(IN, H, variant="gru", key=key), ValueError, "variant: expected one of"),
        (lambda: LSTM(IN, H, scheme="xavier", key=key), ValueError, "scheme: expected one of"),
        (lambda: model("x"), TypeError, "x: expected an array, got str"),
        (
            lambda: model(x[0, 0]),
            ValueError,
            r"x: expected a 3-d array \(batch, time, input_size\) or one sequence "
            r"\(time, input_size\), got shape \(3,\)",
        ),
        (lambda: model(x[None]), ValueError, r"x: expected a 3-d array .* got shape \(1, 3, 5, 3\)"),
        (lambda: model(x[0, :, :2]), ValueError, r"x: expected one sequence \(time, input_size\) "
                                                 r"with input_size 3 .* got shape \(5, 2\)"),
        (lambda: model(x[..., :2]), ValueError, "x: expected input_size 3 on the last axis"),
        (lambda: model(x[0], (x[0, :1, :4],) * 2), ValueError,
         r"state h0: expected shape \(1, 4\), got \(1, 3\)"),
        (lambda: model(x[0], lengths=[2]), ValueError,
         r"lengths: expected one integer for one sequence \(time, input_size\), got list"),
        (lambda: model(x, lengths=[T, 0, 1]), ValueError, r"lengths: expected every value in 1..5"),
        (lambda: model.step(x[0, 0, :2]), ValueError, r"x_t: expected one sequence \(input_size,\)"),
        (lambda: LSTM(IN, H, bidirectional=True, key=key).step(x[:, 0]), ValueError,
         "step: a bidirectional cell cannot run one step at a time"),
        (lambda: LSTM.from_params("W"), ValueError, r"params: expected params\[layer\]\[direction\]"),
        (lambda: LSTM.from_params(model.params, variant="peephole"), ValueError,
         r"params\[0\]\[0\]: expected a dict with keys \['U', 'W', 'b', 'p'\]"),
        (lambda: LSTM.from_equinox(cells, variant="peephole_full"), ValueError,
         "variant: eqx.nn.LSTMCell computes the 'lstm' variant, and 'peephole_full' does not"),
        (lambda: LSTM.from_equinox([cells[0], cells * 2]), ValueError,
         r"cells: expected a cell, or one entry per layer.* got \[1, 2\] cells per layer"),
        (lambda: LSTM.from_equinox([eqx.nn.GRUCell(IN, H, key=key)]), TypeError,
         "cell: expected an equinox.nn.LSTMCell, got GRUCell"),
        (lambda: LSTM(IN, H, variant="peephole", key=key).to_equinox(), ValueError,
         "variant: eqx.nn.LSTMCell computes the 'lstm' variant only, this module is 'peephole'"),
    ]  # fmt: skip
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_a_missing_equinox_names_the_extra():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['equinox'] = None\n"
        "try:\n    import lstm_multi.equinox\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'lstm_multi[equinox]'" in out.stdout, out.stdout + out.stderr


# projection and dropout -------------------------------------------------------------


def test_projection_and_dropout_are_the_cells():
    """proj_size and dropout reach the functional cell: the module's call with a key is
    the cell's with that dropout_key, without one the cell's without dropout;
    from_params reads the projection back from W_hr."""
    model = LSTM(IN, H, variant="peephole", num_layers=2, proj_size=2, dropout=0.5,
                 key=jax.random.key(3))  # fmt: skip
    assert model.params[0][0]["W_hr"].shape == (H, 2) and model.params[1][0]["U"].shape == (
        2,
        4 * H,
    )
    cell = lstm_multi.get_cell("jax")(IN, H, variant="peephole", num_layers=2, proj_size=2,
                                      dropout=0.5)  # fmt: skip
    x = jnp.asarray(_normal(4, (B, T, IN), "float32"))
    key = jax.random.key(5)

    # the module's calls and the cell's, with and without a key, in one program (one
    # compilation; the module's eager calls are the other tests')
    @eqx.filter_jit
    def computed(model, x, key):
        return [(model(x, key=k), cell(model.params, x, dropout_key=k)[0]) for k in (None, key)]

    outputs = computed(model, x, key)
    for (y, (h_n, c_n)), want in outputs:
        np.testing.assert_array_equal(y, want)
        assert h_n.shape == (2, B, 2) and c_n.shape == (2, B, H)
    assert not np.allclose(outputs[0][0][0], outputs[1][0][0])  # the key drops units
    again = LSTM.from_params(model.params, variant="peephole", dropout=0.5)
    assert again.proj_size == 2 and again.dropout == 0.5


def test_lstm_cell_scanned_is_the_sequence_call():
    """lstm_multi.equinox.LSTMCell with eqx.nn.LSTMCell's interface, scanned over time and
    vmapped over the batch, gives the functional cell's outputs and gradients."""
    from lstm_multi.equinox import LSTMCell

    cell = LSTMCell(IN, H, variant="nog", proj_size=2, dtype=jnp.float32, key=jax.random.key(4))
    functional = lstm_multi.get_cell("jax")(IN, H, variant="nog", proj_size=2)
    x = jnp.asarray(_normal(7, (B, T, IN), "float32"))

    def run_cell(cell, xs):  # one sequence (T, in)
        def step(hidden, x_t):
            hidden = cell(x_t, hidden)
            return hidden, hidden[0]

        start = (jnp.zeros(2, jnp.float32), jnp.zeros(H, jnp.float32))
        return jax.lax.scan(step, start, xs)[1]

    def loss_cell(cell):
        return jnp.sum(jax.vmap(run_cell, in_axes=(None, 0))(cell, x) ** 2)

    def loss_functional(params):
        return jnp.sum(functional(params, x)[0] ** 2)

    # both ways, outputs and gradients, in one program (one compilation)
    @eqx.filter_jit
    def computed(cell):
        y = jax.vmap(run_cell, in_axes=(None, 0))(cell, x)
        grads = eqx.filter_grad(loss_cell)(cell).params
        params = [[cell.params]]
        return y, functional(params, x)[0], grads, jax.grad(loss_functional)(params)[0][0]

    y, y_functional, got, want = computed(cell)
    # the cell under lax.scan and vmap against the layer's own scan: float32 rounding only
    assert_close(y, y_functional, "float32", "y")
    for k in want:
        assert_close(got[k], want[k], "float32", f"d{k}")
    with pytest.raises(TypeError, match="key"):
        LSTMCell(IN, H)


@pytest.mark.parametrize("x64", [True, False], ids=["64-bit mode", "32-bit mode"])
def test_cell_dtype_defaults_as_equinox_lstm_cells(x64):
    """dtype=None follows eqx.nn.LSTMCell: float64 in JAX's 64-bit mode (on in this suite),
    float32 without it, so that the swap keeps a program's precision (found by
    tests/third_party/train_rnn.py: the cell used to hold float32 in a float64 program);
    a dtype asked for is kept."""
    from lstm_multi.equinox import LSTMCell

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", x64)
    try:
        theirs = eqx.nn.LSTMCell(IN, H, key=jax.random.key(5))
        ours = LSTMCell(IN, H, variant="peephole", key=jax.random.key(5))
        assert theirs.weight_ih.dtype == (jnp.float64 if x64 else jnp.float32)
        assert {str(p.dtype) for p in ours.params.values()} == {str(theirs.weight_ih.dtype)}
        asked = LSTMCell(IN, H, dtype=jnp.float32, key=jax.random.key(5))
        assert {str(p.dtype) for p in asked.params.values()} == {"float32"}
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_cell_has_equinox_lstm_cells_attributes():
    """input_size, hidden_size, use_bias, weight_ih, weight_hh, bias with
    ``eqx.nn.LSTMCell``'s shapes and meanings: Equinox's own step, run on our cell's
    attributes, is our step (plain variant)."""
    from lstm_multi.equinox import LSTMCell

    ours = LSTMCell(IN, H, key=jax.random.key(5))
    theirs = eqx.nn.LSTMCell(IN, H, key=jax.random.key(5))
    for name in ("input_size", "hidden_size", "use_bias"):
        assert getattr(ours, name) == getattr(theirs, name), name
    for name in ("weight_ih", "weight_hh", "bias"):
        assert getattr(ours, name).shape == getattr(theirs, name).shape, name
    x = jnp.linspace(-1.0, 1.0, IN)
    h, c = jnp.linspace(0.5, -0.5, H), jnp.linspace(-0.3, 0.3, H)
    want = eqx.nn.LSTMCell.__call__(ours, x, (h, c))  # Equinox's math, our attributes
    got = ours(x, (h, c))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    no_bias = LSTMCell(IN, H, use_bias=False, key=jax.random.key(5))
    assert no_bias.bias is None and not no_bias.use_bias
    got = no_bias(x, (h, c))
    want = eqx.nn.LSTMCell.__call__(no_bias, x, (h, c))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    grads = jax.grad(lambda cell: cell(x, (h, c))[0].sum())(no_bias)
    assert not np.any(np.asarray(grads.params["b"]))
