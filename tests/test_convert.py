"""Weights of Keras, Flax, Equinox and torch.nn LSTMs in and out (``lstm_multi.convert``).

For each framework installed: random weights in that framework's own layer;
its outputs (and, where it returns them, its final states) reproduced by the
converted weights on every lstm_multi CPU backend, to 10 eps: 1.2e-6 in float32
and 2.2e-15 in float64 where the framework computes in float64 (Flax, Equinox,
torch.nn.LSTM, Keras on its torch backend: Keras 3 on JAX and NumPy demotes
float64 to float32 inside ``ops.tanh``); the round trip gives back identical
arrays; layers that compute something else are refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import tolerance

import lstm_multi
from lstm_multi import convert

BACKENDS = [b for b in ("numpy", "torch", "jax") if b in lstm_multi.available_backends()]
B, T, IN, H = 3, 6, 5, 4
LENGTHS = [6, 4, 1]
#: the largest disagreement allowed with the framework's own layer, by dtype: each framework
#: sums the gates in its own order, so rounding only; worst seen 1.5e-7 (float32, 1.3 eps) and
#: 4.4e-16 (float64, 2 eps), the outputs below 1 in size; 10 eps is a few times that
TOL = {dtype: tolerance(dtype, k=10) for dtype in ("float32", "float64")}
DTYPES = pytest.mark.parametrize("dtype", ["float32", "float64"])


def _inputs(dtype="float32"):
    return np.random.default_rng(0).standard_normal((B, T, IN)).astype(dtype)


def _randomised(tree, seed, dtype="float32"):
    rng = np.random.default_rng(seed)
    return {k: 0.5 * rng.standard_normal(np.shape(v)).astype(dtype) for k, v in tree.items()}


#: one cell per (backend, layers, bidirectional): the tests' parameters (converted from
#: each framework, in either dtype) run through its compiled calls, not each a new cell's
#: (a cell holds no parameters or state: the same numbers as a fresh one)
_CELLS = {}


def _cell(backend, num_layers, bidirectional):
    key = (backend, num_layers, bidirectional)
    if key not in _CELLS:
        _CELLS[key] = lstm_multi.get_cell(backend)(
            IN, H, num_layers=num_layers, bidirectional=bidirectional
        )
    return _CELLS[key]


def _ours(params, x, bidirectional=False, lengths=None):
    """(backend, y, h_n, c_n) of the converted ``params`` on every lstm_multi backend."""
    runs = []
    for backend in BACKENDS:
        cell = _cell(backend, len(params), bidirectional)
        y, (h_n, c_n) = cell(cell.from_numpy(params), x, lengths=lengths)
        runs.append((backend, *(np.asarray(cell.ops.to_numpy(a)) for a in (y, h_n, c_n))))
    return runs


def _close(got, want, dtype, what):
    assert got.dtype == np.dtype(dtype), f"{what}: computed in {got.dtype}, not {dtype}"
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype], err_msg=what)


def _valid(y, lengths):
    """y (B, T, F) with the steps past each sequence's length set to zero (lstm_multi's
    outputs there; Flax keeps computing over the padding)."""
    mask = np.arange(y.shape[1])[None, :] < np.asarray(lengths)[:, None]
    return np.where(mask[..., None], y, 0)


@pytest.fixture
def x64():
    """JAX's 64-bit mode on for the test where JAX is installed (the conftest turns it on
    for the session; this keeps the file right when run alone), restored afterwards."""
    try:
        import jax
    except ImportError:
        yield
        return
    before = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


# Keras -------------------------------------------------------------------------


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
    for backend, got, *_ in _ours(params_bi, x, bidirectional=True):
        _close(got, want_bi, "float32", backend)
    for backend, got, *_ in _ours(params, x):
        _close(got, want, "float32", backend)
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


#: Keras in float64 in its own process: the backend is fixed when keras is first imported,
#: and only its torch backend computes a float64 LSTM in float64 (on JAX and NumPy
#: ``keras.ops.tanh`` returns float32, a 6e-8 error). Prints {dtype: {backend: max error}}.
KERAS_IN_FLOAT64 = f"""
import json, os
os.environ["KERAS_BACKEND"] = "torch"
try:
    import jax
    jax.config.update("jax_enable_x64", True)
except ImportError:
    pass
import keras, numpy as np
import lstm_multi
from lstm_multi import convert

B, T, IN, H = {B}, {T}, {IN}, {H}
errors = {{}}
for dtype in ("float32", "float64"):
    first = keras.layers.Bidirectional(
        keras.layers.LSTM(H, return_sequences=True, dtype=dtype), dtype=dtype
    )
    second = keras.layers.LSTM(H, return_sequences=True, dtype=dtype)
    model = keras.Sequential([keras.Input((T, IN), dtype=dtype), first, second])
    rng = np.random.default_rng(1)
    for w in model.weights:
        w.assign((0.5 * rng.standard_normal(w.shape)).astype(dtype))
    x = rng.standard_normal((B, T, IN)).astype(dtype)
    want = keras.ops.convert_to_numpy(model(x))
    params = convert.from_keras([first, second])  # [[forward, backward], [forward]]
    errors[dtype] = {{}}
    for backend in lstm_multi.available_backends():
        if backend == "cupy":
            continue
        bidirectional = lstm_multi.get_cell(backend)(IN, H, bidirectional=True)
        plain = lstm_multi.get_cell(backend)(2 * H, H)
        y, _ = bidirectional(bidirectional.from_numpy(params[:1]), x)
        y, _ = plain(plain.from_numpy(params[1:]), y)
        got = np.asarray(plain.ops.to_numpy(y))
        assert got.dtype == np.dtype(dtype), (backend, got.dtype)
        errors[dtype][backend] = float(np.max(np.abs(got - want)))
print(json.dumps(errors))
"""


def test_keras_in_float64_on_its_torch_backend():
    for module in ("keras", "torch"):
        pytest.importorskip(module)
    out = subprocess.run(
        [sys.executable, "-c", KERAS_IN_FLOAT64], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    errors = json.loads(out.stdout.strip().splitlines()[-1])
    for dtype, by_backend in errors.items():
        assert set(by_backend) == set(BACKENDS)
        for backend, error in by_backend.items():
            assert error <= TOL[dtype], (dtype, backend, error)


# Flax --------------------------------------------------------------------------


@DTYPES
def test_flax_cells(x64, dtype):
    jax = pytest.importorskip("jax")
    nn = pytest.importorskip("flax.linen")
    x = _inputs(dtype)
    for Cell in (nn.LSTMCell, nn.OptimizedLSTMCell):
        model = nn.RNN(Cell(features=H, param_dtype=dtype))
        cell = jax.eval_shape(model.init, jax.random.key(0), x)["params"]["cell"]
        tree = {
            "params": {
                "cell": {
                    name: _randomised(leaves, seed, dtype)
                    for seed, (name, leaves) in enumerate(sorted(cell.items()))
                }
            }
        }
        want = np.asarray(jax.jit(model.apply)(tree, x))
        p = convert.from_flax(tree)
        for backend, got, *_ in _ours([[p]], x):
            _close(got, want, dtype, f"{Cell.__name__} on {backend}")
        back = convert.to_flax(p)
        for name, leaves in tree["params"]["cell"].items():
            for key, value in leaves.items():
                np.testing.assert_array_equal(back[name][key], value)
    with pytest.raises(ValueError, match="expected a Flax LSTMCell / OptimizedLSTMCell params"):
        convert.from_flax({"params": {"cell": {"kernel": np.zeros(3)}}})


@DTYPES
def test_flax_bidirectional_stack_with_seq_lengths(x64, dtype):
    """Two ``nn.Bidirectional(nn.RNN(cell), nn.RNN(cell))`` layers, each cell's tree
    converted with ``from_flax`` and arranged as ``params[layer][direction]``: Flax's
    backward RNN (``reverse=True, keep_order=True``, which reverses each sequence's first
    ``seq_lengths[n]`` steps) is lstm_multi's direction 1, outputs on the valid steps and
    the final (c, h) carries equal to h_n, c_n."""
    jax = pytest.importorskip("jax")
    nn = pytest.importorskip("flax.linen")

    class Stack(nn.Module):  # layers made in setup: params {"layers_k": {"forward_rnn": ...}}
        def setup(self):
            self.layers = [
                nn.Bidirectional(
                    nn.RNN(Cell(H, param_dtype=dtype)),
                    nn.RNN(Cell(H, param_dtype=dtype)),
                    return_carry=True,
                )
                for Cell in (nn.OptimizedLSTMCell, nn.LSTMCell)  # one of each kind
            ]

        def __call__(self, x, seq_lengths):
            carries = []
            for layer in self.layers:
                carry, x = layer(x, seq_lengths=seq_lengths)
                carries.append(carry)
            return x, carries

    x, lengths = _inputs(dtype), np.asarray(LENGTHS)
    model = Stack()
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, lengths)
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    rng = np.random.default_rng(3)
    tree = jax.tree_util.tree_unflatten(
        treedef, [(0.5 * rng.standard_normal(a.shape)).astype(dtype) for a in leaves]
    )
    want_y, carries = jax.jit(model.apply)(tree, x, lengths)
    layers = [tree["params"][f"layers_{k}"] for k in range(2)]
    params = [[convert.from_flax(t[d]) for d in ("forward_rnn", "backward_rnn")] for t in layers]
    want_c = np.stack([c for layer in carries for (c, _) in layer])  # Flax's carry is (c, h)
    want_h = np.stack([h for layer in carries for (_, h) in layer])
    for backend, y, h_n, c_n in _ours(params, x, bidirectional=True, lengths=LENGTHS):
        _close(y, _valid(np.asarray(want_y), LENGTHS), dtype, f"y on {backend}")
        _close(h_n, want_h, dtype, f"h_n on {backend}")
        _close(c_n, want_c, dtype, f"c_n on {backend}")


# Equinox -----------------------------------------------------------------------


@DTYPES
def test_equinox_cell(x64, dtype):
    jax = pytest.importorskip("jax")
    eqx = pytest.importorskip("equinox")
    x = _inputs(dtype)
    cell = eqx.nn.LSTMCell(IN, H, dtype=dtype, key=jax.random.key(0))
    rng = np.random.default_rng(1)
    cell = eqx.tree_at(
        lambda c: (c.weight_ih, c.weight_hh, c.bias),
        cell,
        tuple(jax.numpy.asarray(0.5 * rng.standard_normal(a.shape), dtype)
              for a in (cell.weight_ih, cell.weight_hh, cell.bias)),
    )  # fmt: skip

    def run(x_one):  # one sequence (T, in) -> (T, H)
        def step(state, x_t):
            h, c = cell(x_t, state)
            return (h, c), h

        zeros = jax.numpy.zeros(H, dtype)
        return jax.lax.scan(step, (zeros, zeros), x_one)[1]

    want = np.asarray(jax.vmap(run)(x))
    p = convert.from_equinox(cell)
    for backend, got, *_ in _ours([[p]], x):
        _close(got, want, dtype, backend)
    again = convert.to_equinox(p, eqx.nn.LSTMCell(IN, H, dtype=dtype, key=jax.random.key(9)))
    for a, b in zip(convert.from_equinox(again).values(), p.values(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="use_bias=False has no canonical form"):
        convert.from_equinox(eqx.nn.LSTMCell(IN, H, use_bias=False, key=jax.random.key(0)))


# torch.nn.LSTM (lstm_multi.torch.LSTM.from_torch) ------------------------------


@DTYPES
def test_torch_nn_lstm_on_every_backend(x64, dtype):
    """A two-layer bidirectional ``nn.LSTM`` with packed sequences: its canonical weights
    (``LSTM.from_torch(m).to_numpy_params()``, the two biases summed) reproduce its
    padded outputs and final states on every backend."""
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from lstm_multi.torch import LSTM

    torch.manual_seed(0)
    reference = torch.nn.LSTM(
        IN, H, num_layers=2, bidirectional=True, batch_first=True, dtype=getattr(torch, dtype)
    )
    x = _inputs(dtype)
    packed = pack_padded_sequence(
        torch.from_numpy(x), torch.tensor(LENGTHS), batch_first=True, enforce_sorted=False
    )
    with torch.no_grad():
        out, (h_n, c_n) = reference(packed)
    want_y = pad_packed_sequence(out, batch_first=True, total_length=T)[0].numpy()
    params = LSTM.from_torch(reference).to_numpy_params()
    for backend, y, got_h, got_c in _ours(params, x, bidirectional=True, lengths=LENGTHS):
        _close(y, want_y, dtype, f"y on {backend}")
        _close(got_h, h_n.numpy(), dtype, f"h_n on {backend}")
        _close(got_c, c_n.numpy(), dtype, f"c_n on {backend}")


# errors ------------------------------------------------------------------------


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


def test_flax_refuses_parameters_its_cells_cannot_hold():
    """A peephole row or a projection has no place in Flax's LSTM cells: refused, not
    dropped."""
    from lstm_multi import convert

    H = 3
    p = {"W": np.zeros((2, 4 * H)), "U": np.zeros((H, 4 * H)), "b": np.zeros(4 * H)}
    assert set(convert.to_flax(p)) == {f"{a}{g}" for a in "ih" for g in "ifgo"}
    for extra in ({"p": np.zeros((3, H))}, {"W_hr": np.zeros((H, 2))}):
        with pytest.raises(ValueError, match="Flax's LSTM cells hold W, U and b only"):
            convert.to_flax({**p, **extra})
