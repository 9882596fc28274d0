"""Initial parameters: seeds, generators and keys from every ecosystem; the named schemes.

* the same int seed, NumPy generator state, torch generator state or JAX key
  gives the same numbers on every backend; different JAX keys (and a key and
  its split) give different parameters; a generator advances;
* "keras": W within the glorot-uniform limit and spread like it, U with
  orthonormal rows, b zero but the forget gate's block (1), peepholes zero;
* "uniform" is nn.LSTM's U(-1/sqrt(H), 1/sqrt(H)).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import assert_close

import lstm_multi

BACKENDS = [b for b in ("numpy", "torch", "jax") if b in lstm_multi.available_backends()]


def _cells(**kwargs):
    return [
        lstm_multi.get_cell(b)(3, 4, num_layers=2, bidirectional=True, **kwargs) for b in BACKENDS
    ]


def _flat(cell, params):
    np_params = cell.to_numpy(params)
    return np.concatenate([np.ravel(p[k]) for layer in np_params for p in layer for k in sorted(p)])


def _same_everywhere(make_seed, **init_kwargs):
    cells = _cells(variant="peephole")
    values = [_flat(cell, cell.init(seed=make_seed(), **init_kwargs)) for cell in cells]
    for other in values[1:]:
        np.testing.assert_array_equal(other, values[0])
    return values[0]


@pytest.mark.parametrize("scheme", ["uniform", "keras"])
def test_int_seed_and_numpy_generator_give_the_same_numbers_on_every_backend(scheme):
    by_int = _same_everywhere(lambda: 7, scheme=scheme)
    by_generator = _same_everywhere(lambda: np.random.default_rng(7), scheme=scheme)
    assert not np.array_equal(by_int, _same_everywhere(lambda: 8, scheme=scheme))
    assert not np.array_equal(by_int, by_generator)  # a generator is drawn from, not reused
    generator = np.random.default_rng(7)
    cell = _cells()[0]
    first, second = (_flat(cell, cell.init(seed=generator)) for _ in range(2))
    assert not np.array_equal(first, second)  # the generator advanced


def test_torch_generator_gives_the_same_numbers_on_every_backend():
    torch = pytest.importorskip("torch")
    values = _same_everywhere(lambda: torch.Generator().manual_seed(3))
    other = _same_everywhere(lambda: torch.Generator().manual_seed(4))
    assert not np.array_equal(values, other)


def test_jax_keys_give_distinct_parameters_the_same_on_every_backend():
    jax = pytest.importorskip("jax")
    key0 = _same_everywhere(lambda: jax.random.key(0))
    key1 = _same_everywhere(lambda: jax.random.key(1))
    assert not np.array_equal(key0, key1)  # keys 0 and 1 once gave identical parameters
    raw = _same_everywhere(lambda: jax.random.PRNGKey(0))  # the legacy uint32[2] key
    np.testing.assert_array_equal(raw, key0)
    _, sub = jax.random.split(jax.random.key(0))
    assert not np.array_equal(_same_everywhere(lambda: sub), key0)
    cell = _cells()[0]
    with pytest.raises(TypeError, match=r"seed: expected one JAX PRNG key, got an array of \(2,\)"):
        cell.init(seed=jax.random.split(jax.random.key(0)))
    with pytest.raises(TypeError, match="seed: expected a JAX PRNG key"):
        cell.init(seed=jax.numpy.zeros(3))


@pytest.mark.parametrize("variant", ["lstm", "peephole", "cifg"])
def test_keras_scheme(variant):
    hidden = 16
    cell = lstm_multi.get_cell("numpy")(5, hidden, variant=variant, num_layers=2)
    params = cell.init(seed=0, dtype="float64", scheme="keras")
    for layer, (p,) in enumerate(params):
        inputs = p["W"].shape[0]
        limit = math.sqrt(6 / (inputs + 4 * hidden))
        assert np.abs(p["W"]).max() <= limit
        assert abs(p["W"].std() - limit / math.sqrt(3)) < 0.15 * limit / math.sqrt(3)
        # orthonormal to the rounding of a QR factorisation and of the product
        assert_close(p["U"] @ p["U"].T, np.eye(hidden), "float64", "U U^T")
        want_b = np.zeros(4 * hidden)
        want_b[hidden : 2 * hidden] = 1
        np.testing.assert_array_equal(p["b"], want_b)
        for name in set(p) - {"W", "U", "b"}:
            assert not np.any(p[name]), name
        assert inputs == (5 if layer == 0 else hidden)


def test_uniform_scheme_is_nn_lstms_bound():
    cell = lstm_multi.get_cell("numpy")(5, 9, variant="peephole")
    values = _flat(cell, cell.init(seed=1, dtype="float64"))
    bound = 1 / 3
    assert np.abs(values).max() <= bound and np.abs(values).max() > 0.95 * bound


def test_flax_scheme_draws_as_flax_optimized_lstm_cell():
    """The "flax" scheme against Flax's own ``OptimizedLSTMCell`` at the same shapes: the
    input kernel's spread and truncation (lecun-normal), each gate's recurrent kernel
    orthogonal, zero biases."""
    flax_linen = pytest.importorskip("flax.linen")
    jax = pytest.importorskip("jax")
    inputs, hidden = 96, 24
    theirs = flax_linen.OptimizedLSTMCell(hidden).init(
        jax.random.key(0), flax_linen.OptimizedLSTMCell(hidden).initialize_carry(
            jax.random.key(1), (1, inputs)
        ), np.zeros((1, inputs), np.float32)
    )["params"]  # fmt: skip
    cell = lstm_multi.get_cell("numpy")(inputs, hidden, variant="peephole")
    ((ours,),) = cell.init(seed=0, dtype="float64", scheme="flax")
    their_W = np.concatenate([np.asarray(theirs[f"i{g}"]["kernel"]) for g in "ifgo"], axis=1)
    sigma = math.sqrt(1 / inputs)  # lecun-normal: variance 1 / fan_in, truncated at 2 sd
    for W in (ours["W"], their_W):
        assert W.shape == (inputs, 4 * hidden)
        assert abs(W.std() - sigma) < 0.05 * sigma
        assert np.abs(W).max() <= 2 * sigma / 0.87962566103423978 + 1e-6
    for k, gate in enumerate("ifgo"):
        block = ours["U"][:, k * hidden : (k + 1) * hidden]
        their_block = np.asarray(theirs[f"h{gate}"]["kernel"], np.float64)
        for U in (block, their_block):
            assert_close(U.T @ U, np.eye(hidden), "float32", f"U block {gate}")
        assert not np.any(np.asarray(theirs[f"h{gate}"]["bias"]))
    assert not np.any(ours["b"]) and not np.any(ours["p"])


def test_equinox_scheme_draws_as_equinox_lstm_cell():
    """The "equinox" scheme (the "uniform" numbers) against ``eqx.nn.LSTMCell``: every
    entry, the bias included, within 1/sqrt(H), uniformly."""
    eqx = pytest.importorskip("equinox")
    jax = pytest.importorskip("jax")
    inputs, hidden = 40, 25
    theirs = eqx.nn.LSTMCell(inputs, hidden, key=jax.random.key(0))
    cell = lstm_multi.get_cell("numpy")(inputs, hidden)
    ((ours,),) = cell.init(seed=0, dtype="float64", scheme="equinox")
    ((uniform,),) = cell.init(seed=0, dtype="float64", scheme="uniform")
    bound = 1 / math.sqrt(hidden)
    pairs = ((ours["W"], theirs.weight_ih), (ours["U"], theirs.weight_hh), (ours["b"], theirs.bias))
    for mine, their in pairs:
        for values in (np.asarray(mine), np.asarray(their)):
            assert np.abs(values).max() <= bound
            assert abs(values.std() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
    for key in ours:
        np.testing.assert_array_equal(ours[key], uniform[key])
