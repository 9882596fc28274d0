"""The JAX persistent Pallas kernels (``engine="pallas_persistent"``), against the oracle.

Run here by Pallas's interpreter on the CPU (the kernels' own code, each step's
gate math the variant's generated array code), at tiny sizes: every variant in
float64 (the interpreter runs the kernels' math in float64 for kernels built
with ``PallasKernels(interpret_float64=True)``, handed to the cell as
``pallas_kernels``, so their indexing, masking and tape are checked to 1e-10)
and float32 (the kernels' own precision), lengths (one of length 1), both
directions, 2 layers, an initial state, batches that are not a multiple of the
16-row tile, a user's variant, the fallback to the scan, the options' checks,
and ``jit`` / ``grad`` through the cell. On a GPU
(``@pytest.mark.gpu``) the kernels run compiled through Triton.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("torch", reason="the oracle runs on torch")
jnp = jax.numpy

from conftest import assert_close, thorough_params  # noqa: E402
from reference import KERNEL_VARIANTS, Config, make_problem, reference  # noqa: E402
from test_agreement import assert_matches_reference, run_backend  # noqa: E402

import lstm_multi  # noqa: E402
from lstm_multi import Variant, sigmoid, spec, tanh  # noqa: E402
from lstm_multi.backends import jax_pallas  # noqa: E402

VARIANTS = list(KERNEL_VARIANTS)  # reductions: tests/test_layernorm.py
PALLAS = {"engine": "pallas_persistent"}


class CountedKernels(jax_pallas.PallasKernels):
    """Kernels that count their launches (as traced: each jitted call traces once), with
    the interpreter's float64 math on."""

    def __init__(self):
        super().__init__(interpret_float64=True)
        self.launches = {"sequence_forward": 0, "sequence_backward": 0}

    def sequence_forward(self, *args):
        self.launches["sequence_forward"] += 1
        return super().sequence_forward(*args)

    def sequence_backward(self, *args):
        self.launches["sequence_backward"] += 1
        return super().sequence_backward(*args)


@pytest.fixture
def kernels():
    return CountedKernels()


def pallas_args(kernels):
    """The cell arguments that run ``kernels``."""
    return {**PALLAS, "pallas_kernels": kernels}


def _problem(config, lengths=None):
    """The config's problem, with ``lengths`` (B,) in place of the drawn ones."""
    problem = make_problem(config)
    if lengths is not None:
        problem = dataclasses.replace(problem, lengths=np.asarray(lengths))
    return problem


def _lengths(batch, steps):
    """Lengths in 1..T with a 1, a T and shorter ones between."""
    return [(1, steps, 2, steps - 1, 3)[n % 5] for n in range(batch)]


@pytest.mark.parametrize("variant", thorough_params(VARIANTS, ["peephole", "peephole_full"]))
def test_pallas_kernels_match_the_oracle(kernels, variant):
    """Every variant, an initial state and lengths (17 rows: a full tile and a 15-row padded
    one), H = 8 (padded to 16), in float64 (both directions: the tests below)."""
    config = Config(variant, 17, 5, 3, 8, 1, False, True, True, True, 7)
    problem = _problem(config, _lengths(17, 5))
    result = run_backend("jax", config, problem, "float64", **pallas_args(kernels))
    assert_matches_reference(result, reference(config, problem), "float64", f"pallas/{variant}")
    # call, and vjp (forward with the tape, then backward)
    assert kernels.launches == {"sequence_forward": 2, "sequence_backward": 1}, kernels.launches


@pytest.mark.parametrize("dtype", thorough_params(["float32", "float64"], ["float32"]))
def test_pallas_kernels_two_layers_match_the_oracle(kernels, dtype):
    """2 layers x 2 directions, H = 16, 3 rows, batch first, in the kernels' own float32
    and in float64."""
    config = Config("peephole", 3, 6, 4, 16, 2, True, True, True, True, 11)
    problem = _problem(config, [6, 1, 4])
    result = run_backend("jax", config, problem, dtype, **pallas_args(kernels))
    assert_matches_reference(result, reference(config, problem), dtype, f"pallas/2 layers/{dtype}")
    assert kernels.launches == {"sequence_forward": 8, "sequence_backward": 4}, kernels.launches


@pytest.mark.parametrize("variant", ["lstm", "peephole_full"])
def test_pallas_kernels_full_tiles_without_lengths(kernels, variant):
    """16 rows, full sequences and no initial state: the kernels' path without a mask."""
    config = Config(variant, 16, 4, 3, 8, 1, False, False, False, False, 5)
    problem = _problem(config)
    result = run_backend("jax", config, problem, "float64", **pallas_args(kernels))
    assert_matches_reference(result, reference(config, problem), "float64", f"pallas/{variant}")
    assert kernels.launches == {"sequence_forward": 2, "sequence_backward": 1}, kernels.launches


def test_a_user_variant_gets_pallas_kernels(kernels):
    """A user's own Variant (cifg written anew) runs in the kernels its generated code
    gives, and matches the oracle's "cifg"."""

    def coupled(z, c_prev, p):
        i = sigmoid(z.i + p.i * c_prev)
        c = (1 - i) * c_prev + i * tanh(z.g)
        return sigmoid(z.o + p.o * c) * tanh(c), c

    user = Variant("coupled_pallas", coupled, params={"p": ("i", "o")})
    config = Config("cifg", 3, 5, 3, 8, 1, True, True, True, False, 3)
    problem = _problem(config, [5, 1, 3])
    result = run_backend("jax", dataclasses.replace(config, variant=user), problem, "float64", **pallas_args(kernels))  # fmt: skip
    assert_matches_reference(result, reference(config, problem), "float64", "pallas/user")
    assert kernels.launches["sequence_backward"] == 2


def test_pallas_falls_back_to_the_scan_beyond_its_limit(kernels):
    """H = 65 > 64: the scan runs the directions, with the scan cell's results exactly."""
    Cell = lstm_multi.get_cell("jax")
    sizes = dict(input_size=3, hidden_size=65, variant="peephole", bidirectional=True)
    pallas, scan = Cell(**sizes, **pallas_args(kernels)), Cell(**sizes)
    params = scan.init(seed=0, dtype="float32")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 3)).astype("float32")
    dy = rng.standard_normal((3, 4, 130)).astype("float32")
    got = pallas(params, x, lengths=[4, 1, 2]), pallas.vjp(params, x, dy, lengths=[4, 1, 2])
    want = scan(params, x, lengths=[4, 1, 2]), scan.vjp(params, x, dy, lengths=[4, 1, 2])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert kernels.launches == {"sequence_forward": 0, "sequence_backward": 0}


def test_pallas_refuses_float64_without_the_interpreter_flag():
    """float64 is not the kernels' (they compute in float32): the scan runs it. Kernels
    built with ``interpret_float64=True`` take it under the interpreter only."""
    variant = spec.get_variant("lstm")
    p = {"W": jnp.zeros((3, 32)), "U": jnp.zeros((8, 32)), "b": jnp.zeros(32)}
    assert p["W"].dtype == jnp.float64  # (conftest turns JAX's 64-bit mode on)
    xs = jnp.zeros((2, 3, 3))
    assert not jax_pallas.KERNELS.fits(variant, p, xs)
    with pytest.raises(TypeError, match="zx: the Pallas persistent kernels compute in float32"):
        jax_pallas.KERNELS.sequence_forward(
            variant, jnp.zeros((2, 3, 32)), p["U"], jnp.zeros((3, 8)), jnp.zeros((3, 8)), {}, None
        )
    assert jax_pallas.PallasKernels(interpret=True, interpret_float64=True).fits(variant, p, xs)
    compiled = jax_pallas.PallasKernels(interpret=False, interpret_float64=True)
    assert not compiled.fits(variant, p, xs)
    half = {k: v.astype(jnp.bfloat16) for k, v in p.items()}
    assert jax_pallas.KERNELS.fits(variant, half, jnp.zeros((2, 3, 3), jnp.bfloat16))
    projected = {**half, spec.PROJECTION: half["W"]}
    assert not jax_pallas.KERNELS.fits(variant, projected, half["W"][None])


@pytest.mark.parametrize("dtype", thorough_params(["bfloat16", "float16"], ["float16"]))
def test_pallas_kernels_take_half_inputs(kernels, dtype):
    """Half inputs: float32 math inside, outputs and gradients in the input's dtype, within
    the half type's rounding of the float32 scan."""
    Cell = lstm_multi.get_cell("jax")
    sizes = dict(input_size=3, hidden_size=8, variant="peephole")
    pallas, scan = Cell(**sizes, **pallas_args(kernels)), Cell(**sizes)
    params = scan.init(seed=0, dtype="float32")
    half = jax.tree.map(lambda a: a.astype(dtype), params)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 3)).astype("float32")
    dy = rng.standard_normal((3, 5, 8)).astype("float32")
    y, (h_n, c_n) = pallas(half, x.astype(dtype), lengths=[5, 1, 3])
    grads, dx, _ = pallas.vjp(half, x.astype(dtype), dy.astype(dtype), lengths=[5, 1, 3])
    assert y.dtype == h_n.dtype == c_n.dtype == grads[0][0]["W"].dtype == dx.dtype == dtype
    want_y, _ = scan(params, x, lengths=[5, 1, 3])
    want_grads, want_dx, _ = scan.vjp(params, x, dy, lengths=[5, 1, 3])
    tolerance = 2e-2 if dtype == "bfloat16" else 2e-3
    for got, want in ((y, want_y), (dx, want_dx), (grads[0][0]["p"], want_grads[0][0]["p"])):
        np.testing.assert_allclose(
            np.asarray(got, np.float32), want, rtol=tolerance, atol=tolerance
        )
    assert kernels.launches["sequence_backward"] == 1


def test_kernel_option_is_checked():
    Cell = lstm_multi.get_cell("jax")
    with pytest.raises(
        ValueError, match="kernel: expected None or 'pallas_persistent', got 'bogus'"
    ):
        Cell(3, 4, kernel="bogus")
    with pytest.raises(ValueError, match="engine: .pallas_persistent. .* autodiff=True"):
        Cell(3, 4, kernel="pallas_persistent", autodiff=True)
    assert Cell(3, 4, kernel=None).kernel is None


def test_pallas_kernels_option_is_checked():
    """``pallas_kernels`` takes a ``PallasKernels`` for the Pallas engine only; its own
    switches take booleans."""
    Cell = lstm_multi.get_cell("jax")
    assert Cell(3, 4, **PALLAS).pallas_kernels is jax_pallas.KERNELS
    assert Cell(3, 4).pallas_kernels is None
    mine = jax_pallas.PallasKernels(interpret=True)
    assert Cell(3, 4, **pallas_args(mine)).pallas_kernels is mine
    with pytest.raises(ValueError, match="pallas_kernels: only engine='pallas_persistent'"):
        Cell(3, 4, pallas_kernels=mine)
    with pytest.raises(TypeError, match="pallas_kernels: expected None or a jax_pallas"):
        Cell(3, 4, **pallas_args("interpret"))
    with pytest.raises(TypeError, match="interpret: expected None, True or False, got 1"):
        jax_pallas.PallasKernels(interpret=1)
    with pytest.raises(TypeError, match="interpret_float64: expected True or False"):
        jax_pallas.PallasKernels(interpret_float64="yes")


def test_pallas_cell_inside_user_jit_and_grad(kernels):
    """jax.grad of a jitted loss through the cell gives the cell's own vjp, and the scan's."""
    Cell = lstm_multi.get_cell("jax")
    sizes = dict(input_size=3, hidden_size=8, variant="peephole_full", num_layers=2,
                 bidirectional=True)  # fmt: skip
    cell, scan = Cell(**sizes, **pallas_args(kernels)), Cell(**sizes)
    params = cell.init(seed=0, dtype="float64")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 3)))
    lengths = jnp.asarray([5, 3, 1])
    dy = jnp.asarray(rng.standard_normal((3, 5, 16)))

    @jax.jit
    def loss(params, x, lengths):
        return _loss(cell, params, x, lengths, dy)

    grads, dx = jax.grad(loss, argnums=(0, 1))(params, x, lengths)
    assert kernels.launches["sequence_backward"] == 4
    want_grads, want_dx = jax.grad(
        lambda params, x: _loss(scan, params, x, lengths, dy), argnums=(0, 1)
    )(params, x)
    assert_close(dx, want_dx, "float64", "dx")
    for layer in range(2):
        for direction in range(2):
            for k in grads[layer][direction]:
                got, want = grads[layer][direction][k], want_grads[layer][direction][k]
                assert_close(got, want, "float64", f"grads[{layer}][{direction}][{k}]")


def _loss(cell, params, x, lengths, dy):
    y, (h_n, c_n) = cell(params, x, lengths=lengths)
    return jnp.sum(y * dy) + jnp.sum(h_n) + jnp.sum(c_n * c_n)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["lstm", "peephole", "peephole_full", "cifg"])
def test_pallas_kernels_compiled_on_gpu_match_the_oracle(variant, monkeypatch, kernels):
    """On a GPU: the kernels compiled by Pallas's Triton lowering (no interpreter), 37 rows
    (not a multiple of the tile), H = 64 and H = 20 (padded to 32), 2 layers, both
    directions, lengths, in float32, against the oracle; and the scan cell's results;
    and the kernels ran (traced: not a fallback to the scan)."""
    if jax.default_backend() != "gpu":
        pytest.skip(f"jax: no GPU device (jax.default_backend() is {jax.default_backend()!r})")
    monkeypatch.delenv("LSTM_MULTI_PALLAS_INTERPRET", raising=False)
    assert not jax_pallas.default_interpret()
    for hidden in (64, 20):
        config = Config(variant, 37, 12, 16, hidden, 2, True, True, True, True, 3)
        problem = make_problem(config)
        # the products outside the kernels (x W, dW, dU, dx) in float32, not JAX's default
        # TF32 on the GPU; the kernels' own dots are float32 always
        kernels.launches.update(sequence_forward=0, sequence_backward=0)
        with jax.default_matmul_precision("float32"):
            result = run_backend("jax", config, problem, "float32", **pallas_args(kernels))
        assert kernels.launches["sequence_forward"] > 0
        assert kernels.launches["sequence_backward"] > 0
        label = f"gpu pallas/{variant}/H{hidden}"
        assert_matches_reference(result, reference(config, problem), "float32", label)
        scan = run_backend("jax", config, problem, "float64")
        assert_matches_reference(result, scan, "float32", label)
