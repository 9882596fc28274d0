"""Dropout between layers in the functional cells (``dropout=``, ``dropout_key=``).

Placement is ``torch.nn.LSTM``'s: the input of every layer after the first,
inverted (kept entries scaled by 1 / (1 - p)). Checked on every CPU backend:
the same key gives the same network and different keys different ones; no key
is the network without dropout; the output equals running the layers one by
one with the mask applied by hand; ``vjp`` with the key agrees with finite
differences of the call with it (float64), torch's with the oracle run layer by
layer with the masks applied by hand, and JAX's with ``jax.grad`` through the call; keys are traceable under ``jax.jit``; padding does not leak.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, tolerance

import lstm_multi

BACKENDS = ("numpy", "torch", "jax")
SIZES = dict(input_size=2, hidden_size=4, variant="peephole", bidirectional=True)


def _numpy(a):
    return np.asarray(a.detach() if hasattr(a, "detach") else a)


def _cells(backend, num_layers=None, dropout=0.4, **kwargs):
    """The cell with dropout, of ``num_layers`` or, by default, three layers (two masks)
    on numpy and torch and two (one mask) on JAX: JAX's compilations are most of its time
    (a scan forward and backward a layer-direction), and the masks' places, the point of
    a third layer, are test_placement_is_between_layers's, which runs three everywhere."""
    if backend not in lstm_multi.available_backends():
        pytest.skip(f"{backend} is not installed")
    if num_layers is None:
        num_layers = 2 if backend == "jax" else 3
    Cell = lstm_multi.get_cell(backend)
    return Cell(num_layers=num_layers, dropout=dropout, **SIZES, **kwargs)


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_choose_the_masks(backend):
    cell = _cells(backend)
    params = cell.init(seed=1, dtype="float64")
    x = np.random.default_rng(0).standard_normal((3, 5, 2))
    plain = lstm_multi.get_cell(backend)(num_layers=cell.num_layers, **SIZES)
    y_eval = _numpy(cell(params, x)[0])
    np.testing.assert_array_equal(y_eval, _numpy(plain(params, x)[0]))  # no key: no dropout
    a, b, c = (_numpy(cell(params, x, dropout_key=_key(backend, n))[0]) for n in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, y_eval) and not np.allclose(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_are_inverted_dropout_of_the_given_rate(backend):
    cell = _cells(backend, dropout=0.3)
    like = _array(backend, np.zeros(1, np.float32))
    (mask,) = cell.ops.dropout_masks(_key(backend, 3), [(200, 50, 8)], 0.3, like)
    mask = _numpy(mask).astype(np.float64)
    # 1 / 0.7 rounded once to float32: within one eps
    np.testing.assert_allclose(np.unique(mask), [0.0, 1 / 0.7], rtol=tolerance("float32", k=1))
    assert abs(np.mean(mask == 0) - 0.3) < 0.01 and abs(mask.mean() - 1) < 0.02


@pytest.mark.parametrize("backend", BACKENDS)
def test_placement_is_between_layers(backend):
    """Layer by layer by hand, with the cell's own masks: layer 0 reads x as it is, and
    the input of layers 1 and 2 is multiplied by mask 1 and mask 2 (nn.LSTM's places)."""
    cell = _cells(backend, num_layers=3, batch_first=False)
    params = cell.init(seed=2, dtype="float64")
    x = _array(backend, np.random.default_rng(1).standard_normal((5, 3, 2)))
    key = _key(backend, 9)
    y, _ = cell(params, x, dropout_key=key)
    width = 2 * cell.output_size
    masks = cell.ops.dropout_masks(key, [(5, 3, width)] * 2, cell.dropout, x)
    one = lstm_multi.get_cell(backend)
    layer_input = x
    for layer in range(3):
        size = 2 if layer == 0 else width
        single = one(size, 4, variant="peephole", bidirectional=True, batch_first=False)
        if layer > 0:
            layer_input = layer_input * masks[layer - 1]
        layer_input, _ = single([params[layer]], layer_input)
    if backend == "jax":  # XLA compiles the stack and each layer apart: it may fuse otherwise
        assert_close(_numpy(y), _numpy(layer_input), "float64", "y")
    else:  # the same operations on the same numbers
        np.testing.assert_array_equal(_numpy(y), _numpy(layer_input))


@pytest.mark.parametrize("proj_size", [0, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_vjp_with_a_key_matches_finite_differences(backend, proj_size):
    cell = _cells(backend, proj_size=proj_size)
    params = cell.init(seed=4, dtype="float64")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 5, 2))
    dy = rng.standard_normal((3, 5, 2 * cell.output_size))
    key = _key(backend, 11)
    grads, dx, _ = cell.vjp(params, x, dy, lengths=[5, 2, 4], dropout_key=key)

    def f(params, x):
        y, _ = cell(params, x, lengths=[5, 2, 4], dropout_key=key)
        return float(np.sum(_numpy(y) * dy))

    np_params = cell.to_numpy(params)
    for _ in range(2):
        vx = rng.standard_normal(x.shape)
        vp = [[{k: rng.standard_normal(v.shape) for k, v in p.items()} for p in layer]
              for layer in np_params]  # fmt: skip

        def at(s, vx=vx, vp=vp):
            shifted = [[{k: p[k] + s * d[k] for k in p} for p, d in zip(layer, dl, strict=True)]
                       for layer, dl in zip(np_params, vp, strict=True)]  # fmt: skip
            return f(cell.from_numpy(shifted), x + s * vx)

        numeric = (at(1e-6) - at(-1e-6)) / 2e-6  # truncation ~1e-12, cancellation ~1e-10
        analytic = float(np.sum(_numpy(dx) * vx))
        analytic += sum(
            float(np.sum(_numpy(g[k]) * d[k]))
            for gl, dl in zip(grads, vp, strict=True)
            for g, d in zip(gl, dl, strict=True)
            for k in d
        )
        assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(analytic))


def test_torch_vjp_through_dropout_matches_oracle():
    """Outputs and vjp with a key against the oracle (``oracle.run_sequence``, autograd of
    its plain computation) run layer by layer with the cell's own masks applied by hand
    between the layers: three layers, so two masks, and each must be in its place."""
    torch = pytest.importorskip("torch")
    import oracle

    cell = _cells("torch", batch_first=False)
    params = cell.init(seed=6, dtype="float64")
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 3, 2))
    y, _ = cell(params, torch.as_tensor(x), dropout_key=torch.Generator().manual_seed(3))
    dy = rng.standard_normal(tuple(y.shape))
    grads, dx, _ = cell.vjp(
        params,
        torch.as_tensor(x),
        torch.as_tensor(dy),
        dropout_key=torch.Generator().manual_seed(3),
    )
    width = 2 * cell.output_size
    masks = cell.ops.dropout_masks(
        torch.Generator().manual_seed(3), [(5, 3, width)] * 2, cell.dropout, torch.as_tensor(x)
    )
    leaves = [
        [{k: torch.tensor(v, requires_grad=True) for k, v in p.items()} for p in layer]
        for layer in cell.to_numpy(params)
    ]
    xt = torch.tensor(x, requires_grad=True)
    zeros = torch.zeros(2, 4, dtype=torch.float64)
    outputs, loss = [], 0.0
    for n in range(3):
        layer_input = xt[:, n]
        for layer in range(3):
            if layer > 0:
                layer_input = layer_input * masks[layer - 1][:, n]
            layer_input, _, _ = oracle.run_sequence(
                "peephole", [leaves[layer]], layer_input, zeros, zeros
            )
        outputs.append(layer_input.detach().numpy())
        loss = loss + (layer_input * torch.tensor(dy[:, n])).sum()
    loss.backward()
    assert_close(_numpy(y), np.stack(outputs, 1), "float64", "y")
    assert_close(_numpy(dx), xt.grad.numpy(), "float64", "dx")
    for got_layer, want_layer in zip(grads, leaves, strict=True):
        for got, want in zip(got_layer, want_layer, strict=True):
            for k in want:
                assert_close(_numpy(got[k]), want[k].grad.numpy(), "float64", f"d{k}")


def test_jax_key_is_traceable():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    cell = _cells("jax")
    params = cell.init(seed=7)
    x = jnp.ones((2, 4, 2), jnp.float32)

    def loss(params, key):
        return jnp.sum(cell(params, x, dropout_key=key)[0] ** 2)

    key = jax.random.key(0)
    # jit fuses the reduction that eager runs op by op: float32 rounding only (equal here)
    assert_close(jax.jit(loss)(params, key), loss(params, key), "float32", "loss")
    keys = jax.random.split(jax.random.key(1), 3)
    losses = jax.jit(jax.vmap(loss, in_axes=(None, 0)))(params, keys)
    assert len(set(np.asarray(losses).round(6))) == 3  # each key its own masks
    grads = jax.jit(jax.grad(loss))(params, key)
    assert np.all(np.isfinite(np.asarray(grads[1][0]["W"])))


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_does_not_leak_with_dropout(backend):
    cell = _cells(backend)
    params = cell.init(seed=8, dtype="float64")
    x = np.random.default_rng(2).standard_normal((3, 5, 2))
    poisoned = x.copy()
    poisoned[1, 2:] = np.nan
    key = _key(backend, 4)
    clean = cell(params, x, lengths=[5, 2, 5], dropout_key=key)
    dirty = cell(params, poisoned, lengths=[5, 2, 5], dropout_key=key)
    for a, b in zip((clean[0], *clean[1]), (dirty[0], *dirty[1]), strict=True):
        np.testing.assert_array_equal(_numpy(a), _numpy(b))


def test_bad_dropout_is_refused():
    Cell = lstm_multi.get_cell("numpy")
    with pytest.raises(ValueError, match=r"dropout: expected a number in \[0, 1\), got 1.0"):
        Cell(2, 3, num_layers=2, dropout=1.0)
    with pytest.raises(TypeError, match="dropout: expected a number in .* got str"):
        Cell(2, 3, num_layers=2, dropout="0.5")
    with pytest.warns(UserWarning, match="num_layers=1 does nothing"):
        Cell(2, 3, dropout=0.5)
    cell = Cell(2, 3, num_layers=2, dropout=0.5)
    with pytest.raises(TypeError, match="dropout_key: expected a non-negative int"):
        cell(cell.init(), np.zeros((1, 2, 2), np.float32), dropout_key="seven")
    if "jax" in lstm_multi.available_backends():
        jax_cell = lstm_multi.get_cell("jax")(2, 3, num_layers=2, dropout=0.5)
        with pytest.raises(TypeError, match="dropout_key: expected a JAX PRNG key"):
            jax_cell(jax_cell.init(), np.zeros((1, 2, 2), np.float32),
                     dropout_key=np.random.default_rng(0))  # fmt: skip
