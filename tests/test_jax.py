"""The JAX cell under ``jit``, ``grad`` and ``vmap``, and its float64 policy."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from conftest import assert_close  # noqa: E402

import lstm_multi  # noqa: E402


@pytest.mark.parametrize("variant", sorted(lstm_multi.VARIANTS))
def test_cell_inside_user_jit_and_grad_matches_vjp(variant):
    cell = lstm_multi.get_cell("jax")(3, 4, variant=variant, num_layers=2, bidirectional=True)
    params = cell.init(seed=0, dtype="float64")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 3)))
    lengths = jnp.asarray([5, 3])
    dy = jnp.asarray(rng.standard_normal((2, 5, 8)))

    @jax.jit
    def loss(params, x, lengths):
        y, (h_n, c_n) = cell(params, x, lengths=lengths)
        return jnp.sum(y * dy)

    grads, dx = jax.grad(loss, argnums=(0, 1))(params, x, lengths)
    want_grads, want_dx, _ = cell.vjp(params, x, dy, lengths=lengths)
    assert_close(dx, want_dx, "float64", "dx")
    for k in grads[1][1]:
        assert_close(grads[1][1][k], want_grads[1][1][k], "float64", k)


def test_cell_under_vmap_matches_batch():
    cell = lstm_multi.get_cell("jax")(3, 4, variant="peephole")
    params = cell.init(seed=0, dtype="float64")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 2, 5, 3)))
    y = jax.vmap(lambda xi: cell(params, xi)[0])(x)
    want = cell(params, x.reshape(12, 5, 3))[0].reshape(6, 2, 5, 4)
    assert_close(y, want, "float64", "y")


def test_jitted_calls_are_cached():
    cell = lstm_multi.get_cell("jax")(3, 4)
    params = cell.init(seed=0)
    x = jnp.zeros((2, 5, 3), jnp.float32)
    cell(params, x)
    before = cell._jit_forward._cache_size()
    cell(params, x + 1)
    assert cell._jit_forward._cache_size() == before


def test_bfloat16_runs():
    cell = lstm_multi.get_cell("jax")(3, 4)
    params = cell.init(seed=0, dtype="bfloat16")
    y, (h, c) = cell(params, jnp.ones((2, 5, 3), jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


X64_OFF = """
import numpy as np, jax, lstm_multi
assert not jax.config.jax_enable_x64
cell = lstm_multi.get_cell("jax")(3, 4)
for call in (lambda: cell.init(dtype="float64"),
             lambda: cell(cell.init(), np.zeros((2, 5, 3), "float64"))):
    try:
        call()
    except TypeError as error:
        print(error)
    else:
        print("no error")
"""


def test_float64_without_x64_is_an_error():
    out = subprocess.run(
        [sys.executable, "-c", X64_OFF], capture_output=True, text=True, check=True
    )
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("dtype: float64 needs JAX's 64-bit mode")
    assert lines[1].startswith("x: float64 needs JAX's 64-bit mode")
    assert all("jax_enable_x64" in line for line in lines)
