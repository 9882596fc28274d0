"""The JAX persistent Pallas kernels (``engine="pallas_persistent"``), against the oracle.

Run here by Pallas's interpreter on the CPU (the kernels' own code, each step's
gate math the variant's generated array code), at tiny sizes: every variant in
float64 (the interpreter runs the kernels' math in float64 for kernels built
with ``PallasKernels(interpret_float64=True)``, handed to the cell as
``pallas_kernels``, so their indexing, masking and tape are checked to 1e-10)
and float32 (the kernels' own precision), lengths (one of length 1), both
directions, 2 layers, an initial state, batches that are not a multiple of the
16-row tile, a user's variant, the fallback to the scan, the options' checks,
and ``jit`` / ``grad`` through the cell; row reductions and split halves: the
layer-normalised variants in float32 against the oracle (H padded: each row mean
over the real units only), a user's reduction against the scan, and a row mean
over the padded tile, which must fail. On a GPU
(``@pytest.mark.gpu``) the kernels run compiled through Triton.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("torch", reason="the oracle runs on torch")
jnp = jax.numpy

from conftest import assert_close, float64_key, thorough_params  # noqa: E402
from reference import KERNEL_VARIANTS, Config, batch_layout, make_problem, reference  # noqa: E402
from test_agreement import (  # noqa: E402
    as_results,
    assert_matches_reference,
    assert_outputs_match,
    run_backend,
)

import lstm_multi  # noqa: E402
from lstm_multi import Variant, mean, rsqrt, sigmoid, spec, tanh  # noqa: E402
from lstm_multi.backends import jax_pallas  # noqa: E402

VARIANTS = list(KERNEL_VARIANTS)  # those with row reductions: the layer-norm tests below
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


def run_pallas(config, problem, dtype, kernels):
    """``run_backend``'s results for the cell on ``kernels`` (of a config with an initial
    state), its outputs and every gradient from one jitted ``jax.vjp`` of its call: one
    program to compile (seconds under the interpreter: most of these tests' time), where
    the call and ``vjp`` are two. The kernels run as in ``vjp``: the custom VJP's forward
    (the launch whose outputs and tape are checked), then its backward; the lengths are
    the call's own (NumPy, as given). The cell's call and ``vjp`` outside a jit meet the
    oracle on the kernels in test_masks.py's test_pallas_kernels_run_a_mask and in
    test_pallas_kernels_full_tiles_without_lengths, and the scan's results below."""
    assert config.with_state, "the gradients of the initial state are taken from it"
    cell = config.cell("jax", **pallas_args(kernels))
    cast = (lambda a: a.astype(dtype)) if dtype != "float64" else (lambda a: a)
    params = cell.from_numpy(
        [[{k: cast(v) for k, v in p.items()} for p in layer] for layer in problem.params]
    )
    x, dy = (cast(batch_layout(config, a)) for a in (problem.x, problem.dy))
    h0, c0, dh_n, dc_n = (cast(a) for a in (problem.h0, problem.c0, problem.dh_n, problem.dc_n))

    @jax.jit
    def outputs_and_gradients(params, x, h0, c0, dy, dh_n, dc_n):
        def call(params, x, h0, c0):
            return cell(params, x, state=(h0, c0), lengths=problem.lengths)

        outputs, pullback = jax.vjp(call, params, x, h0, c0)
        return outputs, pullback((dy, (dh_n, dc_n)))

    (y, (h_n, c_n)), gradients = outputs_and_gradients(params, x, h0, c0, dy, dh_n, dc_n)
    return as_results(config, (y, h_n, c_n), gradients)


def scan_reference(scan, params, x, dy, lengths):
    """``(scan(params, x, lengths=lengths), scan.vjp(params, x, dy, lengths=lengths))``,
    the scan cell's results that the tests below hold the kernels to, from one jitted
    ``jax.vjp`` of its call with the zero initial states given (the call's own without a
    state) and zero final-state cotangents (``vjp``'s defaults): one program to compile
    where the call and ``vjp`` are two. The scan's own call and ``vjp`` are checked
    against the oracle throughout the suite (test_agreement, test_jax)."""
    batch = x.shape[0] if scan.batch_first else x.shape[1]
    zeros = tuple(jnp.zeros(shape, jnp.asarray(x).dtype) for shape in scan.state_shapes(batch))

    @jax.jit
    def outputs_and_gradients(params, x, dy):
        def call(params, x, h0, c0):
            return scan(params, x, state=(h0, c0), lengths=lengths)

        (y, (h_n, c_n)), pullback = jax.vjp(call, params, x, *zeros)
        grads, dx, dh0, dc0 = pullback((dy, (jnp.zeros_like(h_n), jnp.zeros_like(c_n))))
        return (y, (h_n, c_n)), (grads, dx, (dh0, dc0))

    return outputs_and_gradients(params, x, dy)


def _lengths(batch, steps):
    """Lengths in 1..T with a 1, a T and shorter ones between."""
    return [(1, steps, 2, steps - 1, 3)[n % 5] for n in range(batch)]


@pytest.mark.parametrize("variant", thorough_params(VARIANTS, ["peephole", "peephole_full"]))
def test_pallas_kernels_match_the_oracle(kernels, variant):
    """Every variant, an initial state and lengths (17 rows: a full tile and a 15-row padded
    one), H = 8 (padded to 16), in float64 (both directions: the tests below)."""
    config = Config(variant, 17, 5, 3, 8, 1, False, True, True, True, 7)
    problem = _problem(config, _lengths(17, 5))
    result = run_pallas(config, problem, "float64", kernels)
    assert_matches_reference(result, reference(config, problem), "float64", f"pallas/{variant}")
    # jax.vjp traces the call (the primal) and the custom VJP's forward, then the backward
    assert kernels.launches == {"sequence_forward": 2, "sequence_backward": 1}, kernels.launches


@pytest.mark.parametrize("dtype", thorough_params(["float32", "float64"], ["float32"]))
def test_pallas_kernels_two_layers_match_the_oracle(kernels, dtype):
    """2 layers x 2 directions, H = 16, 3 rows, batch first, in the kernels' own float32
    and in float64."""
    config = Config("peephole", 3, 6, 4, 16, 2, True, True, True, True, 11)
    problem = _problem(config, [6, 1, 4])
    result = run_pallas(config, problem, dtype, kernels)
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


@pytest.mark.thorough_only(
    "a user's Variant in the kernels: test_a_user_reduction_variant_gets_pallas_kernels"
)
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
    (want_y, _), (want_grads, want_dx, _) = scan_reference(scan, params, x, dy, [5, 1, 3])
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
    """jax.grad of a jitted loss through the cell gives the cell's own vjp, and the scan's.
    One layer both ways: the transforms' path through the kernels is a direction's (the
    layers' plumbing, two layers in the kernels, is the two-layer test's above), and each
    layer is compiled again, in the kernels' program and the scan's."""
    Cell = lstm_multi.get_cell("jax")
    sizes = dict(input_size=3, hidden_size=8, variant="peephole_full", bidirectional=True)
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
    assert kernels.launches["sequence_backward"] == 2
    want_grads, want_dx = jax.grad(
        lambda params, x: _loss(scan, params, x, lengths, dy), argnums=(0, 1)
    )(params, x)
    assert_close(dx, want_dx, "float64", "dx")
    assert len(grads) == len(want_grads) == 1
    for layer in range(1):
        for direction in range(2):
            for k in grads[layer][direction]:
                got, want = grads[layer][direction][k], want_grads[layer][direction][k]
                assert_close(got, want, "float64", f"grads[{layer}][{direction}][{k}]")


def _loss(cell, params, x, lengths, dy):
    y, (h_n, c_n) = cell(params, x, lengths=lengths)
    return jnp.sum(y * dy) + jnp.sum(h_n) + jnp.sum(c_n * c_n)


# row reductions and split halves --------------------------------------------------------

#: (variant, case): "small" T = 3, B = 2, H = 8 (padded to 16), one direction, float32;
#: "wide" 17 rows (a full tile and a padded one), H = 20 (padded to 32), 2 layers both ways,
#: float64 under the interpreter (the kernels' structure to the layer norms' float64 bound)
LAYER_NORM_CASES = {
    "small": (Config("", 2, 3, 3, 8, 1, False, True, True, False, 7), [3, 2], "float32"),
    "wide": (Config("", 17, 4, 3, 20, 2, True, True, True, True, 5), _lengths(17, 4), "float64"),
}


@pytest.mark.parametrize(
    ("variant", "case"),
    thorough_params(
        [("layernorm_peephole", "small"), ("layernorm", "small"), ("layernorm", "wide")],
        [("layernorm_peephole", "small")],
    ),
)
def test_pallas_kernels_run_the_layer_norms(kernels, variant, case):
    """Row reductions and split halves in the kernels: x_t W (without b) and r U apart, b
    among the parameter rows, each LN's mean and variance over the row's real units; with
    lengths and an initial state, against the oracle: outputs and every gradient (W, U, b,
    p, the gains and shifts, x, h0, c0)."""
    config, lengths, dtype = LAYER_NORM_CASES[case]
    config = dataclasses.replace(config, variant=variant)
    problem = _problem(config, lengths)
    result = run_pallas(config, problem, dtype, kernels)
    key = float64_key(variant) if dtype == "float64" else dtype
    assert_matches_reference(result, reference(config, problem), key, f"pallas/{variant}/{dtype}")
    directions = config.num_layers * config.num_directions
    assert kernels.launches == {"sequence_forward": 2 * directions, "sequence_backward": directions}


def test_a_row_mean_over_the_padded_tile_fails_the_oracle(monkeypatch):
    """The power of the test above over the kernels' row mean: a mean over the whole
    16-lane tile (``jnp.mean``), the 8 padded lanes counted, gives outputs that fail it."""
    monkeypatch.setattr(
        jax_pallas._TileOps, "row_mean", lambda self, x: jnp.mean(x, axis=-1, keepdims=True)
    )
    config, lengths, dtype = LAYER_NORM_CASES["small"]
    config = dataclasses.replace(config, variant="layernorm_peephole")
    problem = _problem(config, lengths)
    cell = config.cell("jax", **pallas_args(jax_pallas.PallasKernels(interpret=True)))
    params = cell.from_numpy(
        [[{k: v.astype(dtype) for k, v in p.items()} for p in layer] for layer in problem.params]
    )
    x, h0, c0 = (a.astype(dtype) for a in (problem.x, problem.h0, problem.c0))
    y, (h_n, c_n) = cell(params, x, state=(h0, c0), lengths=problem.lengths)
    result = {"y": np.asarray(y), "h_n": np.asarray(h_n), "c_n": np.asarray(c_n)}
    with pytest.raises(AssertionError):
        assert_outputs_match(result, reference(config, problem), dtype, False)


def scaled_rms(z, c_prev, s):
    """A user's reduction (fused halves): h = o tanh(c / (rms(c) |s|)), the division by |s|
    written as the tracer asks, c rsqrt(s s). s is zero in the padded lanes, where 1/|s|
    is inf and h nan: the kernels must keep that from the real units (the products read r's
    padded lanes as zeros, the means skip them)."""
    i, f, g, o = sigmoid(z.i), sigmoid(z.f), tanh(z.g), sigmoid(z.o)
    c = f * c_prev + i * g
    return o * tanh(c * rsqrt(mean(c * c) + 1e-5) * rsqrt(s.c * s.c)), c


def test_a_user_reduction_variant_gets_pallas_kernels(kernels):
    """A user's Variant with a row mean and rsqrt, H = 8 (padded to 16), lengths: the
    kernels (float64 under the interpreter) give the scan's outputs and gradients."""
    user = Variant("scaled_rms_pallas", scaled_rms, params={"s": ("c",)}, param_init={"s": 1.0})
    Cell = lstm_multi.get_cell("jax")
    pallas = Cell(3, 8, variant=user, **pallas_args(kernels))
    scan = Cell(3, 8, variant=user)
    params = scan.init(seed=0, dtype="float64")
    rng = np.random.default_rng(2)
    params[0][0]["s"] = params[0][0]["s"] + 0.3 * rng.standard_normal((1, 8))
    x = rng.standard_normal((3, 4, 3))
    dy = rng.standard_normal((3, 4, 8))
    lengths = [4, 1, 3]
    got = pallas(params, x, lengths=lengths), pallas.vjp(params, x, dy, lengths=lengths)
    want = scan_reference(scan, params, x, dy, lengths)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(a, b, float64_key(user), "pallas/user reduction")
    assert kernels.launches == {"sequence_forward": 2, "sequence_backward": 1}


@pytest.mark.thorough_only("a lowering for a GPU, with no GPU: the interpreted tests run the math")
def test_layer_norm_kernels_lower_through_triton_without_a_gpu():
    """The forward and backward kernels of "layernorm_peephole" (H = 20, padded to 32;
    lengths) go through Pallas's Triton lowering for CUDA, on the CPU: the lane sums, the
    iota of the padding mask and the (16, 1) row values have Triton lowering rules (not
    compiled to PTX: that needs a GPU)."""
    variant = spec.VARIANTS["layernorm_peephole"]
    kernels = jax_pallas.PallasKernels(interpret=False)
    p = {k: jnp.zeros(s, jnp.float32) for k, s in spec.param_shapes(variant, 3, 20).items()}
    xs, h0 = jnp.zeros((5, 3, 3), jnp.float32), jnp.zeros((3, 20), jnp.float32)
    valid = jnp.ones((5, 3, 1), bool)

    def gradients(p, xs, h0, c0):
        def loss(p, xs, h0, c0):
            ys, h, c = jax_pallas._direction(variant, kernels, p, xs, h0, c0, valid)
            return ys.sum() + h.sum() + c.sum()

        return jax.grad(loss)(p, xs, h0, c0)

    lowered = jax.jit(gradients).trace(p, xs, h0, h0).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("lstm_multi_layernorm_peephole_sequence_") >= 2, "both kernels"


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
