"""``cell.step``: one time step of the whole stack, equal to the sequence call step by step.

* every CPU backend, the core variants, 1 and 3 layers (and 3 with a
  projection), float64 and float32, with and without an initial state: T calls of ``step`` give the sequence
  call's outputs and final state;
* gradients through a loop of steps equal the sequence's (torch autograd,
  ``jax.grad``), and ``step`` works under ``jax.jit``;
* a bidirectional cell and bad inputs are refused with errors naming them.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close
from reference import CORE_VARIANTS

import lstm_multi

CPU_BACKENDS = ("numpy", "torch", "jax")


def _cell(backend, **kwargs):
    if backend not in lstm_multi.available_backends():
        pytest.skip(f"{backend} is not installed")
    return lstm_multi.get_cell(backend)(input_size=3, hidden_size=4, **kwargs)


def _numpy(a):
    return np.asarray(a.detach() if hasattr(a, "detach") else a)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize(
    ("num_layers", "proj_size"), [(1, 0), (3, 0), (3, 2)], ids=["1", "3", "3-projected"]
)
@pytest.mark.parametrize("variant", CORE_VARIANTS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_steps_equal_the_sequence_call(backend, variant, num_layers, proj_size, with_state):
    rng = np.random.default_rng(11)
    for dtype in ("float64", "float32"):
        if backend == "jax" and dtype == "float64":
            from lstm_multi.backends.jax_backend import x64_enabled

            if not x64_enabled():
                continue
        cell = _cell(backend, variant=variant, num_layers=num_layers, proj_size=proj_size)
        params = cell.init(seed=3, dtype=dtype)
        x = rng.standard_normal((2, 6, 3)).astype(dtype)  # batch first
        state = None
        if with_state:
            state = tuple(rng.standard_normal(s).astype(dtype) for s in cell.state_shapes(2))
        y, (h_n, c_n) = cell(params, x, state=state)
        outputs = []
        for t in range(x.shape[1]):
            y_t, state = cell.step(params, x[:, t], state)
            outputs.append(_numpy(y_t))
        # the same math; a backend's sequence path may fuse or order sums differently
        # (torch's native LSTM, XLA's scan): worst seen 1.5 eps
        assert_close(np.stack(outputs, 1), _numpy(y), dtype, "outputs")
        assert_close(_numpy(state[0]), _numpy(h_n), dtype, "h_n")
        assert_close(_numpy(state[1]), _numpy(c_n), dtype, "c_n")


def test_torch_gradients_through_steps_equal_the_sequence_gradients():
    torch = pytest.importorskip("torch")
    cell = _cell("torch", variant="peephole", num_layers=2, native=False)
    params = cell.init(seed=1, dtype="float64")
    leaves = [v.requires_grad_(True) for layer in params for p in layer for v in p.values()]
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    w = torch.randn(2, 5, 4, dtype=torch.float64)
    y, _ = cell(params, x)
    want = torch.autograd.grad((y * w).sum(), leaves)
    state, loss = None, 0
    for t in range(5):
        y_t, state = cell.step(params, x[:, t], state)
        loss = loss + (y_t * w[:, t]).sum()
    got = torch.autograd.grad(loss, leaves)
    for a, b in zip(got, want, strict=True):
        assert_close(_numpy(a), _numpy(b), "float64", "gradient through steps")


def test_jax_step_under_jit_and_grad():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    cell = _cell("jax", variant="peephole_full")
    params = cell.init(seed=2)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 3)), jnp.float32)

    def through_steps(params):
        state, total = None, 0.0
        for t in range(4):
            y_t, state = cell.step(params, x[:, t], state)
            total = total + jnp.sum(y_t**2)
        return total

    def through_sequence(params):
        y, _ = cell(params, x)
        return jnp.sum(y**2)

    assert_close(jax.jit(through_steps)(params), through_sequence(params), "float32", "loss")
    # the gradients jitted: one program each (eagerly, every step's operations compile
    # one by one)
    got = jax.jit(jax.grad(through_steps))(params)
    want = jax.jit(jax.grad(through_sequence))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(a, b, "float32", "gradient through steps")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_step_refuses_what_it_cannot_do(backend):
    bidirectional = _cell(backend, bidirectional=True)
    params = bidirectional.init()
    x_t = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="step: a bidirectional cell cannot run one step"):
        bidirectional.step(params, x_t)
    cell = _cell(backend)
    params = cell.init()
    with pytest.raises(ValueError, match=r"x_t: expected shape \(batch, 3\).*got \(2, 5\)"):
        cell.step(params, np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"x_t: expected shape \(batch, 3\).*got \(1, 2, 3\)"):
        cell.step(params, np.zeros((1, 2, 3), np.float32))
    with pytest.raises(TypeError, match="x_t: expected an array, got list"):
        cell.step(params, [[0.0, 0.0, 0.0]])
    with pytest.raises(TypeError, match="x_t"):
        cell.step(params, np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="state"):
        cell.step(params, x_t, (np.zeros((1, 3, 4), np.float32),) * 2)  # batch 3, not 2
