"""Flax ``nn.RNN`` / ``nn.Bidirectional`` stacks in and out (``convert.from_flax_rnn`` and
``convert.to_flax_rnn``).

A Flax stack with random weights (two bidirectional layers, one ``OptimizedLSTMCell``
and one ``LSTMCell`` layer, sequences of different lengths) is reproduced by its
converted weights on every lstm_multi CPU backend: outputs on the valid steps and the
final carries, to 10 eps (1.2e-6 in float32, 2.2e-15 in float64). The other way, canonical
parameters drawn by lstm_multi run in Flax's own modules and give lstm_multi's outputs.
Every layout Flax gives a stack (``nn.Sequential``, a list made in ``setup``, a top-level
``nn.RNN`` or ``nn.Bidirectional``, cells made in ``@nn.compact``) reads the same.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tolerance

import lstm_multi
from lstm_multi import convert

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
if not hasattr(convert, "from_flax_rnn"):
    pytest.skip("lstm_multi.convert has no from_flax_rnn yet", allow_module_level=True)

BACKENDS = [b for b in ("numpy", "torch", "jax") if b in lstm_multi.available_backends()]
B, T, IN, H = 3, 6, 5, 4
LENGTHS = np.asarray([6, 4, 1])
#: the largest disagreement allowed with Flax's own modules, by dtype: Flax sums the gates in
#: its own order, so rounding only; worst seen 1.5e-7 (float32, 1.3 eps) and 4.4e-16
#: (float64, 2 eps), the outputs below 1 in size; 10 eps is a few times that
TOL = {dtype: tolerance(dtype, k=10) for dtype in ("float32", "float64")}
DTYPES = pytest.mark.parametrize("dtype", ["float32", "float64"])
CELLS = (nn.OptimizedLSTMCell, nn.LSTMCell)  # layer 0, layer 1


@pytest.fixture(autouse=True)
def x64():
    """JAX's 64-bit mode for the float64 cases (the conftest's session setting; kept here
    so that the file is right when run alone), restored afterwards."""
    before = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


class Stack(nn.Module):
    """Two bidirectional layers made in ``setup``: params ``{"layers_k": {"forward_rnn":
    {"cell": ...}, "backward_rnn": {"cell": ...}}}``; returns the outputs and each layer's
    ``(forward, backward)`` carries ``(c, h)``."""

    dtype: str = "float32"

    def setup(self):
        self.layers = [
            nn.Bidirectional(
                nn.RNN(Cell(H, param_dtype=self.dtype)),
                nn.RNN(Cell(H, param_dtype=self.dtype)),
                return_carry=True,
            )
            for Cell in CELLS
        ]

    def __call__(self, x, seq_lengths):
        carries = []
        for layer in self.layers:
            carry, x = layer(x, seq_lengths=seq_lengths)
            carries.append(carry)
        return x, carries


def _inputs(dtype):
    return np.random.default_rng(0).standard_normal((B, T, IN)).astype(dtype)


def _random_like(shapes, seed, dtype):
    """A tree of the structure of ``shapes`` with 0.5 * N(0, 1) leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        treedef, [(0.5 * rng.standard_normal(a.shape)).astype(dtype) for a in leaves]
    )


def _flax_stack(params, x, dtype):
    """The Flax stack's outputs zeroed past each length (lstm_multi's outputs there), and
    h_n, c_n stacked as (layers * 2, B, H)."""
    y, carries = jax.jit(Stack(dtype).apply)(params, x, LENGTHS)
    valid = np.arange(T)[None, :, None] < LENGTHS[:, None, None]
    h_n = np.stack([h for layer in carries for (_, h) in layer])
    c_n = np.stack([c for layer in carries for (c, _) in layer])
    return np.where(valid, np.asarray(y), 0), h_n, c_n


def _ours(params, x, backend, dtype):
    cell = lstm_multi.get_cell(backend)(IN, H, num_layers=len(params), bidirectional=True)
    y, (h_n, c_n) = cell(cell.from_numpy(params), x, lengths=LENGTHS)
    return [np.asarray(cell.ops.to_numpy(a)) for a in (y, h_n, c_n)]


def _close(got, want, dtype, what):
    assert got.dtype == np.dtype(dtype), f"{what}: computed in {got.dtype}, not {dtype}"
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype], err_msg=what)


@DTYPES
def test_a_flax_stack_runs_on_every_backend(dtype):
    x = _inputs(dtype)
    shapes = jax.eval_shape(Stack(dtype).init, jax.random.key(0), x, LENGTHS)
    variables = _random_like(shapes, 1, dtype)
    params = convert.from_flax_rnn(variables)
    assert [len(layer) for layer in params] == [2, 2]
    want = _flax_stack(variables, x, dtype)
    for backend in BACKENDS:
        for name, got, w in zip(
            ("y", "h_n", "c_n"), _ours(params, x, backend, dtype), want, strict=True
        ):
            _close(got, w, dtype, f"{name} on {backend}")


@DTYPES
def test_canonical_params_run_in_flax(dtype):
    """lstm_multi's own parameters, written with to_flax_rnn, run in Flax's modules."""
    cell = lstm_multi.get_cell("numpy")(IN, H, num_layers=2, bidirectional=True)
    params = cell.init(seed=2, dtype=dtype)
    x = _inputs(dtype)
    trees = convert.to_flax_rnn(params)
    assert [set(t) for t in trees] == [{"forward_rnn", "backward_rnn"}] * 2
    tree = {f"layers_{k}": t for k, t in enumerate(trees)}  # the names of Stack's layers
    got = _flax_stack({"params": tree}, x, dtype)
    y, (h_n, c_n) = cell(params, x, lengths=LENGTHS)
    for name, a, b in zip(("y", "h_n", "c_n"), got, (y, h_n, c_n), strict=True):
        _close(np.asarray(a), b, dtype, name)
    back = convert.from_flax_rnn(trees)
    for k, layer in enumerate(params):
        for d, p in enumerate(layer):
            for key, value in p.items():
                np.testing.assert_array_equal(back[k][d][key], value, err_msg=f"[{k}][{d}]")


def test_every_layout_of_one_stack_reads_the_same():
    """The same weights as nn.Sequential's, a top-level nn.Bidirectional's / nn.RNN's,
    a list, pairs of cells (what @nn.compact modules hold) give the same params."""
    x = _inputs("float32")
    layers = [nn.Bidirectional(nn.RNN(Cell(H)), nn.RNN(Cell(H))) for Cell in CELLS]
    shapes = jax.eval_shape(nn.Sequential(layers).init, jax.random.key(0), x)
    sequential = _random_like(shapes, 4, "float32")
    want = convert.from_flax_rnn(sequential)
    first, second = (sequential["params"][f"layers_{k}"] for k in range(2))
    pairs = [[t[d]["cell"] for d in ("forward_rnn", "backward_rnn")] for t in (first, second)]
    compact = {f"LSTMCell_{k}": cell for k, cell in enumerate(pairs[0] + pairs[1])}
    layouts = {
        "list of nn.Bidirectional": [{"params": first}, second],
        "list of pairs of cells": pairs,
        "list of pairs of nn.RNN": [[{"cell": c} for c in pair] for pair in pairs],
        "one nn.Bidirectional": first,
    }
    for name, tree in layouts.items():
        got = convert.from_flax_rnn(tree)
        expected = want if name != "one nn.Bidirectional" else want[:1]
        assert len(got) == len(expected), name
        for a, b in zip(_leaves(got), _leaves(expected), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)
    # cells adopted by an @nn.compact module, one direction each: a stack of 4 layers
    assert [len(layer) for layer in convert.from_flax_rnn(compact)] == [1, 1, 1, 1]
    rnn = nn.RNN(nn.LSTMCell(H))
    one = _random_like(jax.eval_shape(rnn.init, jax.random.key(0), x), 5, "float32")
    got = convert.from_flax_rnn(one)
    np.testing.assert_array_equal(got[0][0]["U"], convert.from_flax(one)["U"])
    y = np.asarray(rnn.apply(one, x))
    for backend in BACKENDS:
        cell = lstm_multi.get_cell(backend)(IN, H)
        _close(
            np.asarray(cell.ops.to_numpy(cell(cell.from_numpy(got), x)[0])), y, "float32", backend
        )


def _leaves(params):
    return [p[key] for layer in params for p in layer for key in sorted(p)]


def test_what_does_not_fit_is_refused():
    params = lstm_multi.get_cell("numpy")(IN, H, num_layers=2).init(seed=0)
    trees = convert.to_flax_rnn(params)
    tree = {f"layers_{k}": t for k, t in enumerate(trees)}
    with_head = {**tree, "Dense_0": {"kernel": np.zeros((H, 2)), "bias": np.zeros(2)}}
    with pytest.raises(ValueError, match=r"tree: expected a Flax LSTMCell / OptimizedLSTMCell"):
        convert.from_flax_rnn(with_head)
    with pytest.raises(ValueError, match=r"tree\[1\]: expected a Flax LSTMCell"):
        convert.from_flax_rnn([trees[0], {"kernel": np.zeros(3)}])
    with pytest.raises(ValueError, match="tree: expected at least one layer"):
        convert.from_flax_rnn([])
    peephole = lstm_multi.get_cell("numpy")(IN, H, variant="peephole").init(seed=0)
    with pytest.raises(
        ValueError, match=r"params\[0\]\[0\]\['p'\]: Flax's LSTM cells hold W, U and b"
    ):
        convert.to_flax_rnn(peephole)
    with pytest.raises(ValueError, match=r"params\[0\]: expected a list of 1 or 2 directions"):
        convert.to_flax_rnn([params[0] * 3])
