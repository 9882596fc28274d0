"""``lstm_multi.flax``: the NNX ``LSTM`` and the Linen ``LinenLSTM``.

Checked against independent computations: the oracle (float64 torch autograd, importing
nothing from lstm_multi; outputs, final states and every parameter gradient of the
float32 modules, for "lstm", "peephole" and "nig" with 2 layers, both directions,
lengths and an initial state), and for "lstm" Flax's own ``nn.RNN(nn.OptimizedLSTMCell)``
stacked in ``nn.Bidirectional`` with its weights imported through ``convert.from_flax``
(outputs, final carries and gradients). Also: initial parameters are those of
``cell.init(seed=key)``, eager, jitted or vmapped (distinct keys differ, equal keys agree);
optax training under ``nnx.jit`` / ``jax.jit`` lowers a loss; checkpoint round trips give
identical outputs; one step at a time equals the sequence; bad arguments are clear errors.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
optax = pytest.importorskip("optax")

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from conftest import assert_close  # noqa: E402
from flax import nnx, serialization  # noqa: E402
from flax.core import freeze  # noqa: E402

import lstm_multi  # noqa: E402
from lstm_multi import convert  # noqa: E402
from lstm_multi.flax import LSTM, LinenLSTM  # noqa: E402

B, T, IN, H = 3, 5, 3, 4
LENGTHS = np.array([5, 2, 4])
FRONTENDS = ["nnx", "linen"]


def _tree_equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(np.array_equal(u, v)), a, b)))


def _build(frontend, dtype=jnp.float32, key=0, **config):
    """A module of either frontend: returns ``run(x, **kwargs) -> (y, (h_n, c_n))``,
    ``grad(loss) -> canonical grads`` (``loss(run) -> scalar``), its canonical params and
    a loader of canonical params. Eager: the module calls the functional cell's compiled
    functions, which both frontends share (the library's own jit)."""
    if frontend == "nnx":
        model = LSTM(IN, H, param_dtype=dtype, rngs=nnx.Rngs(key), **config)

        def grad(loss):
            layers = nnx.to_pure_dict(nnx.grad(lambda m: loss(m))(model))["layers"]
            return [[layers[l][d] for d in sorted(layers[l])] for l in sorted(layers)]

        return model, grad, model.params, model.load_params
    module = LinenLSTM(IN, H, param_dtype=dtype, **config)
    x = jax.ShapeDtypeStruct((B, T, IN), dtype)  # lazy_init: the parameters, no forward
    box = {"variables": module.lazy_init(jax.random.key(key), x)}

    def run(x, **kwargs):
        return module.apply(box["variables"], x, **kwargs)

    def grad(loss):
        def of_variables(variables):
            return loss(lambda x, **kw: module.apply(variables, x, **kw))

        return jax.grad(of_variables)(box["variables"])["params"]["layers"]

    def load(params):
        box["variables"] = module.variables_from(params)

    return run, grad, box["variables"]["params"]["layers"], load


def _loss_of(x, state, lengths, dy, dh_n, dc_n):
    """``loss(run)``: sum(y*dy) + sum(h_n*dh_n) + sum(c_n*dc_n), the oracle's and vjp's."""

    def loss(run):
        y, (h_n, c_n) = run(x, state=state, lengths=lengths)
        return jnp.sum(y * dy) + jnp.sum(h_n * dh_n) + jnp.sum(c_n * dc_n)

    return loss


# agreement ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["lstm", "peephole", "nig"])
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_outputs_and_gradients_equal_the_oracle(frontend, variant):
    pytest.importorskip("torch")
    from oracle import oracle  # float64 torch autograd, imports nothing from lstm_multi

    rng = np.random.default_rng(1)
    run, grad, params, _ = _build(frontend, variant=variant, num_layers=2, bidirectional=True)
    x, h0, c0, dh_n, dc_n = (
        rng.standard_normal(shape).astype(np.float32) for shape in [(B, T, IN)] + [(4, B, H)] * 4
    )
    dy = rng.standard_normal((B, T, 2 * H)).astype(np.float32)
    state = (jnp.asarray(h0), jnp.asarray(c0))
    y, (h_n, c_n) = run(jnp.asarray(x), state=state, lengths=LENGTHS)
    grads = grad(_loss_of(jnp.asarray(x), state, LENGTHS, dy, dh_n, dc_n))
    np_params = jax.tree.map(np.asarray, params)
    want = oracle(
        variant, np_params, x.transpose(1, 0, 2), h0, c0, LENGTHS, dy.transpose(1, 0, 2), dh_n, dc_n
    )
    # float32 against the float64 oracle: float32's rounding (worst seen 2.9e-7, 2.4 eps)
    assert_close(y, want["y"].transpose(1, 0, 2), "float32", "y")
    assert_close(h_n, want["h_n"], "float32", "h_n")
    assert_close(c_n, want["c_n"], "float32", "c_n")
    for l, layer in enumerate(want["grads"]):
        for d, expected in enumerate(layer):
            for key, value in expected.items():
                assert_close(grads[l][d][key], value, "float32", f"[{l}][{d}][{key}]")
    # and it is the functional JAX cell, number for number
    cell = lstm_multi.get_cell("jax")(IN, H, variant=variant, num_layers=2, bidirectional=True)
    y_cell, _ = cell(params, jnp.asarray(x), state=state, lengths=LENGTHS)
    np.testing.assert_array_equal(y, y_cell)


class _FlaxStack(nn.Module):
    """Flax's own 2-layer bidirectional LSTM: nn.RNN(nn.OptimizedLSTMCell) per direction."""

    @nn.compact
    def __call__(self, x, seq_lengths):
        carries = []
        for k in range(2):
            both = nn.Bidirectional(
                nn.RNN(nn.OptimizedLSTMCell(H, name=f"l{k}_forward")),
                nn.RNN(nn.OptimizedLSTMCell(H, name=f"l{k}_backward")),
                return_carry=True,
            )
            (forward, backward), x = both(x, seq_lengths=seq_lengths)
            carries += [forward, backward]  # each (c, h)
        return x, carries


@pytest.fixture(scope="module")
def flax_run():
    """Flax's stack on random weights (biases too; Flax starts them at zero): the inputs,
    the cotangents, its outputs at the valid steps, final states and gradients."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((B, T, IN)), jnp.float32)
    stack = _FlaxStack()
    shapes = jax.eval_shape(stack.init, jax.random.key(0), x, LENGTHS)
    variables = jax.tree.map(
        lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), jnp.float32), shapes
    )
    valid = (np.arange(T)[None, :] < LENGTHS[:, None])[:, :, None]  # (B, T, 1)
    dy = jnp.asarray(rng.standard_normal((B, T, 2 * H)) * valid, jnp.float32)
    dh, dc = (jnp.asarray(rng.standard_normal((4, B, H)), jnp.float32) for _ in range(2))

    @jax.jit
    def loss(variables):
        y, carries = stack.apply(variables, x, LENGTHS)
        c_n, h_n = (jnp.stack([carry[k] for carry in carries]) for k in (0, 1))
        return jnp.sum(y * dy) + jnp.sum(h_n * dh) + jnp.sum(c_n * dc), (y * valid, h_n, c_n)

    (_, outputs), grads = jax.value_and_grad(loss, has_aux=True)(variables)
    cotangents = (dy, dh, dc)
    return x, variables["params"], cotangents, valid, outputs, grads["params"]


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_lstm_equals_flax_optimized_lstm_cell(frontend, flax_run):
    """Flax's weights loaded from ``convert.from_flax``: outputs at the valid steps, final
    states and gradients equal Flax's own recurrent layers (an independent check)."""
    x, cells, (dy, dh, dc), valid, (y_flax, h_flax, c_flax), flax_grads = flax_run
    names = [[f"l{k}_forward", f"l{k}_backward"] for k in range(2)]
    run, grad, _, load = _build(frontend, num_layers=2, bidirectional=True)
    load([[convert.from_flax(cells[n]) for n in layer] for layer in names])
    y, (h_n, c_n) = run(x, lengths=LENGTHS)
    # Flax's OptimizedLSTMCell sums in its own order: float32 rounding (worst seen 1.9e-7)
    assert_close(np.asarray(y) * valid, y_flax, "float32", "y")
    assert_close(h_n, h_flax, "float32", "h_n")
    assert_close(c_n, c_flax, "float32", "c_n")
    grads = grad(_loss_of(x, None, LENGTHS, dy, dh, dc))
    for l, layer in enumerate(names):
        for d, name in enumerate(layer):
            for key, value in convert.from_flax(flax_grads[name]).items():
                assert_close(grads[l][d][key], value, "float32", name + key)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_step_by_step_equals_the_sequence(frontend):
    run, _, params, _ = _build(frontend, variant="peephole", num_layers=2)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((B, T, IN)), jnp.float32)
    y, (h_n, c_n) = run(x)
    state, outputs = None, []
    for t in range(T):
        if frontend == "nnx":
            y_t, state = run.step(x[:, t], state)
        else:
            module = LinenLSTM(IN, H, variant="peephole", num_layers=2)
            y_t, state = module.apply({"params": {"layers": params}}, x[:, t], state, method="step")
        outputs.append(y_t)
    assert_close(jnp.stack(outputs, 1), y, "float32", "y")
    assert_close(state[0], h_n, "float32", "h_n")
    assert_close(state[1], c_n, "float32", "c_n")


# initial parameters -------------------------------------------------------------------


def test_nnx_parameters_come_from_rngs_params():
    config = dict(variant="nig", num_layers=2, bidirectional=True)
    cell = lstm_multi.get_cell("jax")(IN, H, **config)
    model = LSTM(IN, H, rngs=nnx.Rngs(0), **config)
    assert _tree_equal(model.params, cell.init(seed=nnx.Rngs(0).params(), scheme="flax"))
    assert _tree_equal(model.params, LSTM(IN, H, rngs=nnx.Rngs(0), **config).params)
    other = LSTM(IN, H, rngs=nnx.Rngs(1), **config).params
    assert not np.array_equal(other[0][0]["W"], model.params[0][0]["W"])
    # traced keys (a jitted constructor) draw the same numbers; eval_shape draws none
    jitted = nnx.jit(lambda: LSTM(IN, H, rngs=nnx.Rngs(0), **config))()
    assert _tree_equal(jitted.params, model.params)
    abstract = nnx.eval_shape(lambda: LSTM(IN, H, rngs=nnx.Rngs(0), **config))
    assert jax.tree.map(jnp.shape, abstract.params) == jax.tree.map(jnp.shape, model.params)
    keras = LSTM(IN, H, scheme="keras", param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    plain = lstm_multi.get_cell("jax")(IN, H)
    want = plain.init(seed=nnx.Rngs(0).params(), dtype="bfloat16", scheme="keras")
    assert _tree_equal(keras.params, want)
    assert keras.params[0][0]["b"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(keras.params[0][0]["b"][H : 2 * H], 1)  # forget bias 1


def test_nnx_vmapped_constructor_draws_one_model_per_key():
    keys = jax.random.split(jax.random.key(5), 2)
    ensemble = nnx.vmap(lambda key: LSTM(IN, H, rngs=nnx.Rngs(key)), in_axes=0, out_axes=0)(keys)
    for n, key in enumerate(keys):
        one = LSTM(IN, H, rngs=nnx.Rngs(key)).params
        assert _tree_equal(jax.tree.map(lambda a, n=n: a[n], ensemble.params), one)


def test_linen_keys_give_distinct_parameters():
    module = LinenLSTM(IN, H, bidirectional=True)
    x = jnp.zeros((B, T, IN), jnp.float32)
    first, again = (module.init(jax.random.key(0), x)["params"]["layers"] for _ in range(2))
    other = module.init(jax.random.key(1), x)["params"]["layers"]
    assert _tree_equal(first, again)
    for p, q in zip(
        (p for layer in first for p in layer), (q for layer in other for q in layer), strict=True
    ):
        for name in ("W", "U"):  # drawn (Flax's scheme keeps b and the peepholes zero)
            assert not np.array_equal(p[name], q[name])
    assert not np.array_equal(first[0][0]["W"], first[0][1]["W"])  # the directions differ
    assert _tree_equal(jax.jit(module.init)(jax.random.key(0), x)["params"]["layers"], first)
    for p in (p for layer in first for p in layer):  # the default scheme: Flax's own
        assert not np.any(p["b"])
        bound = 2 * np.sqrt(1 / p["W"].shape[0]) / 0.87962566103423978  # lecun-normal's
        assert float(jnp.max(jnp.abs(p["W"]))) <= bound


# training and checkpoints -----------------------------------------------------------------


def _regression(seed=4):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((B, T, IN)), jnp.float32)
    target = jnp.asarray(np.tanh(np.cumsum(np.asarray(x)[..., :1], axis=1)), jnp.float32)
    return x, target


def test_nnx_trains_with_optax():
    x, target = _regression()
    model = LSTM(IN, H, variant="peephole", rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)

    def loss_fn(model):
        y, _ = model(x, lengths=jnp.asarray(LENGTHS))
        return jnp.mean((y[..., :1] - target) ** 2)

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_linen_trains_with_optax():
    x, target = _regression()
    module = LinenLSTM(IN, H, variant="nig")
    params = module.init(jax.random.key(0), x)["params"]
    tx = optax.adam(0.05)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state):
        def loss_fn(params):
            y, _ = module.apply({"params": params}, x)
            return jnp.mean((y[..., :1] - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(30):
        params, opt_state, loss = train_step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_nnx_checkpoint_round_trips():
    x, _ = _regression()
    model = LSTM(IN, H, variant="peephole", bidirectional=True, rngs=nnx.Rngs(0))
    y, _ = model(x)
    graphdef, state = nnx.split(model)
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(state))
    data = serialization.to_bytes(nnx.to_pure_dict(state))
    fresh = LSTM(IN, H, variant="peephole", bidirectional=True, rngs=nnx.Rngs(7))
    assert not np.array_equal(fresh(x)[0], y)
    _, fresh_state = nnx.split(fresh)
    pure = serialization.from_bytes(nnx.to_pure_dict(fresh_state), data)
    nnx.replace_by_pure_dict(fresh_state, pure)
    np.testing.assert_array_equal(nnx.merge(graphdef, fresh_state)(x)[0], y)
    np.testing.assert_array_equal(nnx.merge(graphdef, state)(x)[0], y)
    loaded = LSTM(IN, H, variant="peephole", bidirectional=True, rngs=nnx.Rngs(7))
    np.testing.assert_array_equal(loaded.load_params(model.params)(x)[0], y)


def test_linen_checkpoint_round_trips():
    x, _ = _regression()
    module = LinenLSTM(IN, H, variant="peephole", num_layers=2)
    variables = module.init(jax.random.key(0), x)
    y, _ = module.apply(variables, x)
    target = module.init(jax.random.key(7), x)
    restored = serialization.from_bytes(target, serialization.to_bytes(variables))
    np.testing.assert_array_equal(module.apply(restored, x)[0], y)
    numpy_params = jax.tree.map(np.asarray, variables["params"]["layers"])
    np.testing.assert_array_equal(module.apply(module.variables_from(numpy_params), x)[0], y)
    np.testing.assert_array_equal(module.apply(freeze(variables), x)[0], y)  # FrozenDicts too


# errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"hidden_size": 0}, ValueError, "hidden_size"),
        ({"variant": "nope"}, ValueError, "variant"),
        ({"num_layers": 1.5}, ValueError, "num_layers"),
        ({"bidirectional": 1}, TypeError, "bidirectional"),
        ({"scheme": "xavier"}, ValueError, "scheme"),
        ({"param_dtype": jnp.int32}, TypeError, "param_dtype"),
    ],
)
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_bad_arguments_name_themselves(frontend, kwargs, error, words):
    LSTM(IN, H, bidirectional=True, rngs=nnx.Rngs(0))  # a cached cell must not excuse 1
    config = {"input_size": IN, "hidden_size": H, **kwargs}
    with pytest.raises(error, match=words):
        if frontend == "nnx":
            LSTM(config.pop("input_size"), config.pop("hidden_size"), rngs=nnx.Rngs(0), **config)
        else:
            LinenLSTM(**config)


def test_bad_inputs_and_parameters_are_clear_errors():
    model = LSTM(IN, H, bidirectional=True, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="rngs: expected an nnx.Rngs"):
        LSTM(IN, H, rngs=0)
    with pytest.raises(ValueError, match="x: expected input_size 3"):
        model(jnp.zeros((B, T, IN + 1), jnp.float32))
    with pytest.raises(TypeError, match=r"x: expected the parameters' dtype float32, got float64"):
        model(jnp.zeros((B, T, IN), jnp.float64))  # no silent cast of x or the parameters
    with pytest.raises(ValueError, match="step: a bidirectional cell"):
        model.step(jnp.zeros((B, IN), jnp.float32))
    bad = jax.tree.map(np.asarray, model.params)
    bad[0][1]["U"] = bad[0][1]["U"][:, :-1]
    with pytest.raises(ValueError, match=r"params\[0\]\[1\]\['U'\]: expected shape"):
        model.load_params(bad)
    halves = jax.tree.map(lambda a: np.asarray(a, np.float16), model.params)
    with pytest.raises(
        TypeError, match=r"params\[0\]\[0\]\['\w'\]: expected dtype float32 \(the module's"
    ):
        model.load_params(halves)
    module = LinenLSTM(IN, H, num_layers=2)
    with pytest.raises(ValueError, match="params: expected a list of 2 layer"):
        module.variables_from(model.params[:1])
    with pytest.raises(ValueError, match="lengths: expected every value in 1..5"):
        x = jnp.zeros((1, T, IN), jnp.float32)
        module.apply(module.init(jax.random.key(0), x), x, lengths=[6])


def test_missing_flax_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flax", None)
    monkeypatch.delitem(sys.modules, "lstm_multi.flax")
    with pytest.raises(ImportError, match=r"pip install 'lstm_multi\[flax\]'"):
        importlib.import_module("lstm_multi.flax")


# projection and dropout -------------------------------------------------------------


def test_nnx_projection_and_dropout():
    from flax import nnx

    model = LSTM(3, 4, variant="peephole", num_layers=2, proj_size=2, dropout=0.5,
                 rngs=nnx.Rngs(params=0, dropout=1))  # fmt: skip
    cell = lstm_multi.get_cell("jax")(3, 4, variant="peephole", num_layers=2, proj_size=2,
                                      dropout=0.5)  # fmt: skip
    assert model.params[0][0]["W_hr"].shape == (4, 2)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 3)), jnp.float32)
    first = model(x)[0]
    expected = cell(model.params, x, dropout_key=nnx.Rngs(params=0, dropout=1).dropout())[0]
    np.testing.assert_array_equal(first, expected)  # the module's own "dropout" stream
    assert not np.allclose(model(x)[0], first)  # the stream advances
    model.eval()
    np.testing.assert_array_equal(model(x)[0], cell(model.params, x)[0])  # no dropout
    y, (h_n, c_n) = model(x)
    assert y.shape == (2, 5, 2) and h_n.shape == (2, 2, 2) and c_n.shape == (2, 2, 4)


def test_linen_projection_and_dropout():
    module = LinenLSTM(3, 4, num_layers=2, proj_size=2, dropout=0.5)
    x = jnp.ones((2, 5, 3), jnp.float32)
    variables = module.init(jax.random.key(0), x, deterministic=True)
    assert variables["params"]["layers"][1][0]["U"].shape == (2, 16)
    cell = lstm_multi.get_cell("jax")(3, 4, num_layers=2, proj_size=2)
    quiet = module.apply(variables, x, deterministic=True)[0]
    np.testing.assert_array_equal(quiet, cell(variables["params"]["layers"], x)[0])
    a, b = (module.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(k)})[0]
            for k in (1, 2))  # fmt: skip
    assert not np.allclose(a, quiet) and not np.allclose(a, b)
    with pytest.raises(ValueError, match="deterministic"):
        module.apply(variables, x)  # dropout without saying whether it is training


# a cell for Flax's own recurrent machinery ----------------------------------------------


@pytest.mark.parametrize("variant", ["peephole", "peephole_full", "cifg"])
def test_linen_cell_in_flax_rnn_and_bidirectional_is_the_cell(variant):
    """nn.Bidirectional(nn.RNN(LinenCell), nn.RNN(LinenCell)) with seq_lengths computes the
    functional cell's bidirectional layer on the valid steps, values and gradients."""
    from lstm_multi.flax import LinenCell

    B_, T_, IN_, H_ = 3, 5, 2, 4
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B_, T_, IN_)), jnp.float32)
    lengths = np.array([5, 2, 4])
    cell = lstm_multi.get_cell("jax")(IN_, H_, variant=variant, bidirectional=True)
    params = cell.init(seed=3)
    model = nn.Bidirectional(
        nn.RNN(LinenCell(H_, variant=variant)), nn.RNN(LinenCell(H_, variant=variant))
    )
    variables = {
        "params": {
            "forward_rnn": {"cell": {"lstm": params[0][0]}},
            "backward_rnn": {"cell": {"lstm": params[0][1]}},
        }
    }
    valid = (np.arange(T_)[None, :] < lengths[:, None])[..., None]

    def flax_loss(params):
        y = model.apply(
            {"params": {
                "forward_rnn": {"cell": {"lstm": params[0][0]}},
                "backward_rnn": {"cell": {"lstm": params[0][1]}},
            }},
            x, seq_lengths=lengths,
        )  # fmt: skip
        return jnp.sum(jnp.where(valid, y, 0.0) ** 2), y

    def cell_loss(params):
        y, _ = cell(params, x, lengths=lengths)
        return jnp.sum(y**2), y

    # both in one program: one compilation (eager, the scans and every operation around
    # them were compiled one by one)
    both = jax.jit(
        lambda p: [jax.value_and_grad(f, has_aux=True)(p) for f in (flax_loss, cell_loss)]
    )
    ((got, y_flax), grads_flax), ((want, y_cell), grads_cell) = both(params)
    assert_close(np.where(valid, y_flax, 0.0), y_cell, "float32", "y")
    for a, b in zip(jax.tree.leaves(grads_flax), jax.tree.leaves(grads_cell), strict=True):
        assert_close(a, b, "float32", "gradient")
    # the parameters' structure (jax.eval_shape: Flax's init traced, not run)
    initial = jax.eval_shape(model.init, jax.random.key(0), x)
    assert jax.tree.structure(initial) == jax.tree.structure(variables)


def test_linen_cell_init_carry_and_projection():
    from lstm_multi.flax import LinenCell

    cell = LinenCell(4, variant="peephole", proj_size=2)
    x = jnp.ones((3, 5), jnp.float32)
    carry = cell.initialize_carry(jax.random.key(0), x.shape)
    assert carry[0].shape == (3, 4) and carry[1].shape == (3, 2)
    a, b = (cell.init(jax.random.key(k), carry, x)["params"]["lstm"] for k in (0, 1))
    assert a["W_hr"].shape == (4, 2) and not np.allclose(a["W"], b["W"])
    (c, h), y = cell.apply({"params": {"lstm": a}}, carry, x)
    functional = lstm_multi.get_cell("jax")(5, 4, variant="peephole", proj_size=2)
    want, (h_n, c_n) = functional([[a]], x[:, None, :])
    assert_close(y, want[:, 0], "float32", "y")
    assert_close(c, c_n[0], "float32", "c")
    with pytest.raises(ValueError, match="proj_size"):
        LinenCell(4, proj_size=4)
