"""The JAX cell under ``jit``, ``grad`` and ``vmap``, and its float64 policy."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from conftest import assert_close, thorough_params  # noqa: E402
from reference import CORE_VARIANTS  # noqa: E402

import lstm_multi  # noqa: E402


@pytest.mark.parametrize("variant", CORE_VARIANTS)
def test_cell_inside_user_jit_and_grad_matches_vjp(variant):
    """One bidirectional layer (its compiling is the test's time): ``cell.vjp`` is itself
    ``jax.vjp`` of the forward under ``jax.jit``, which test_agreement runs over stacks of
    1-3 layers; every parameter's gradient is compared."""
    cell = lstm_multi.get_cell("jax")(3, 4, variant=variant, bidirectional=True)
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
    for direction, want in enumerate(want_grads[0]):
        assert grads[0][direction].keys() == want.keys()
        for k in want:
            assert_close(grads[0][direction][k], want[k], "float64", f"{direction}: {k}")


def test_cell_under_vmap_matches_batch():
    cell = lstm_multi.get_cell("jax")(3, 4, variant="peephole")
    params = cell.init(seed=0, dtype="float64")
    x = np.random.default_rng(0).standard_normal((6, 2, 5, 3))  # reshaped in NumPy, not eagerly
    y = jax.vmap(lambda xi: cell(params, xi)[0])(x)
    want = np.asarray(cell(params, x.reshape(12, 5, 3))[0]).reshape(6, 2, 5, 4)
    assert_close(y, want, "float64", "y")


def test_jitted_calls_are_cached():
    cell = lstm_multi.get_cell("jax")(3, 4)
    params = cell.init(seed=0)
    x = jnp.zeros((2, 5, 3), jnp.float32)
    cell(params, x)
    before = cell._jit_forward._cache_size()
    cell(params, x + 1)
    assert cell._jit_forward._cache_size() == before


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


# forward mode -----------------------------------------------------------------------


def _loss_of_x(cell, params, lengths):
    def loss(x):
        y, (h_n, c_n) = cell(params, x, lengths=lengths)
        return jnp.sum(jnp.sin(y)) + jnp.sum(h_n * c_n)

    return loss


@pytest.mark.parametrize("variant", thorough_params(CORE_VARIANTS, ["peephole"]))
def test_forward_mode_with_autodiff(variant, thorough):
    """jvp, jacfwd and hessian work with autodiff=True and agree with reverse mode (one
    bidirectional layer; two under --thorough)."""
    Cell = lstm_multi.get_cell("jax")
    layers = 2 if thorough else 1
    cell = Cell(2, 3, variant=variant, num_layers=layers, bidirectional=True, autodiff=True)
    fast = Cell(2, 3, variant=variant, num_layers=layers, bidirectional=True)  # custom VJP
    params = cell.init(seed=0, dtype="float64")
    # NumPy inputs, and NumPy arithmetic between the calls: each eager jnp operation would
    # compile a program of its own
    x = np.random.default_rng(1).standard_normal((2, 4, 2))
    lengths = jnp.asarray([4, 2])
    loss = _loss_of_x(cell, params, lengths)
    tangent = np.ones_like(x)
    # the transforms under jit: compiled once (eagerly every call would trace and compile
    # its scans again; the central difference below calls the gradient twice); the three
    # forward-mode ones in one program (a quarter less compiling than three programs)
    forward_modes = jax.jit(
        lambda x, t: (jax.jvp(loss, (x,), (t,))[1], jax.jacfwd(loss)(x), jax.hessian(loss)(x))
    )
    directional, jacobian, hessian = forward_modes(x, tangent)
    gradient = jax.jit(jax.grad(_loss_of_x(fast, params, lengths)))
    reverse = np.asarray(gradient(x))
    assert_close(directional, np.sum(reverse * tangent), "float64", "jvp against grad")
    assert_close(jacobian, reverse, "float64", "jacfwd against grad")
    eps = 1e-6
    e = np.zeros_like(x)
    e[0, 1, 0] = eps
    # the difference of the reverse-mode gradient compiled above (the custom VJP's: the
    # same function as autodiff's to rounding, ~1e-16, which the step's 1/eps makes 1e-10,
    # far below the bound): one program less than differencing autodiff's own gradient
    column = (np.asarray(gradient(x + e)) - np.asarray(gradient(x - e))) / (2 * eps)
    # a central difference with step 1e-6: truncation ~eps**2 and cancellation ~1e-16 / eps
    np.testing.assert_allclose(hessian[..., 0, 1, 0], column, rtol=1e-5, atol=1e-7)
    square = np.asarray(hessian).reshape(16, 16)
    # d2L/dx_i dx_j and d2L/dx_j dx_i are summed in different orders: rounding only
    assert_close(square, square.T, "float64", "hessian symmetry")


def test_forward_mode_through_the_custom_vjp_is_a_clear_error():
    cell = lstm_multi.get_cell("jax")(2, 3, variant="peephole")
    params = cell.init(seed=0, dtype="float64")
    x = jnp.ones((2, 4, 2))
    with pytest.raises(TypeError, match=r"autodiff: forward-mode .* autodiff=True"):
        jax.jvp(_loss_of_x(cell, params, None), (x,), (x,))


@pytest.mark.parametrize("autodiff", [False, True])
def test_checkpoint_gives_the_same_gradient(autodiff):
    cell = lstm_multi.get_cell("jax")(2, 3, variant="peephole", autodiff=autodiff)
    params = cell.init(seed=0, dtype="float64")
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 2)))

    def loss(params):
        return jnp.sum(cell(params, x)[0] ** 2)

    plain = jax.jit(jax.grad(loss))(params)  # one program (eagerly: one per stage)
    remat = jax.jit(jax.grad(jax.checkpoint(loss)))(params)
    for k in plain[0][0]:
        assert_close(remat[0][0][k], plain[0][0][k], "float64", k)


# lengths under jit ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [[6, 2], [0, 3], [-1, 5]])
def test_out_of_range_lengths_are_an_error_under_jit(bad):
    cell = lstm_multi.get_cell("jax")(3, 4)
    params = cell.init(seed=0)
    run = jax.jit(lambda x, n: cell(params, x, lengths=n)[0])
    x = jnp.ones((2, 5, 3), jnp.float32)
    assert run(x, jnp.asarray([5, 2])).shape == (2, 5, 4)  # traced, in range: fine
    with pytest.raises(Exception, match=r"lengths: expected every value in 1\.\.5 \(T\)"):
        jax.block_until_ready(run(x, jnp.asarray(bad)))


def test_lengths_under_vmap_and_grad():
    cell = lstm_multi.get_cell("jax")(3, 4, variant="peephole")
    params = cell.init(seed=0, dtype="float64")
    # NumPy inputs, indexed in NumPy (each eager jnp index would compile a program)
    x = np.random.default_rng(0).standard_normal((3, 2, 5, 3))
    lengths = np.asarray([[5, 1], [3, 4], [2, 5]])
    ys = np.asarray(jax.vmap(lambda xi, ni: cell(params, xi, lengths=ni)[0])(x, lengths))
    for k in range(3):
        assert_close(ys[k], cell(params, x[k], lengths=lengths[k])[0], "float64", "y")
    first = jnp.asarray(lengths[0])  # a concrete JAX array, as before; one jitted program
    grads = jax.jit(jax.grad(lambda p: jnp.sum(cell(p, x[0], lengths=first)[0])))(params)
    assert np.all(np.isfinite(np.asarray(grads[0][0]["p"])))


@pytest.mark.parametrize(
    "variant", thorough_params(["lstm", "peephole", "peephole_full"], ["peephole_full"])
)
def test_the_input_projections_placement_changes_no_result(variant):
    """x W + b inside each step (the CPU's default) or before the scan (elsewhere):
    the same outputs and gradients in float64, with lengths and both directions (one
    layer: a layer above projects its input, the layer below's output, in the same code)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3, 3))
    dy = rng.normal(size=(5, 3, 8))
    lengths = np.array([5, 2, 4])
    results = []
    for in_step in (True, False):
        cell = lstm_multi.get_cell("jax")(
            3, 4, variant, 1, True, batch_first=False, project_in_step=in_step
        )
        params = cell.init(seed=1, dtype="float64")
        y, _ = cell(params, x, lengths=lengths)
        grads = cell.vjp(params, x, dy, lengths=lengths)
        results.append(jax.tree.leaves((y, grads)))
    for a, b in zip(*results, strict=True):
        assert_close(a, b, "float64", "projection in the step against before the scan")


# jax.export ---------------------------------------------------------------------------


def test_jax_export_with_a_symbolic_length_loads_in_a_fresh_process(tmp_path):
    """Serialized with a symbolic T; deserialized and called at T = 7 by a process that
    imports jax only (StableHLO holds everything)."""
    cell = lstm_multi.get_cell("jax")(3, 4, variant="cifg", bidirectional=True)
    params = cell.init(seed=0)

    def run(params, x):
        y, (h, c) = cell(params, x)
        return y, h, c

    (steps,) = jax.export.symbolic_shape("T")
    x_spec = jax.ShapeDtypeStruct((2, steps, 3), np.float32)
    exported = jax.export.export(jax.jit(run))(params, x_spec)
    (tmp_path / "lstm.bin").write_bytes(exported.serialize())
    x = np.random.default_rng(0).standard_normal((2, 7, 3)).astype(np.float32)
    flat = jax.tree_util.tree_leaves(params)
    np.savez(tmp_path / "inputs.npz", x, *[np.asarray(a) for a in flat])
    script = """
import sys, numpy as np, jax
exported = jax.export.deserialize(bytearray(open(sys.argv[1] + "/lstm.bin", "rb").read()))
data = np.load(sys.argv[1] + "/inputs.npz")
x, *flat = [data[f"arr_{k}"] for k in range(len(data.files))]
args, kwargs = exported.in_tree.unflatten([*flat, x])  # ((params, x), {})
y, h, c = exported.call(*args, **kwargs)
np.save(sys.argv[1] + "/y.npy", np.asarray(y))
"""
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close(np.load(tmp_path / "y.npy"), np.asarray(run(params, x)[0]), "float32", "y")
