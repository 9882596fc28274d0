"""The generated Triton kernels, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1).

Each variant's forward and backward kernel against the NumPy evaluation of the
same programs in float64 (what the CUDA C is checked against too), half inputs,
the kernels' own sigmoid and tanh against float64 references, and a user's
variant. Row reductions and split halves: the layer-normalised built-ins on both
engines against the oracle, a user's RMS norm against the array code, and that
check's power (a row mean over H + 1 fails it). On a GPU the same kernels run compiled (tests/test_gpu.py does not
cover them yet).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="the Triton kernels need triton (pip install triton)")

from conftest import thorough_params  # noqa: E402
from doubles import ProgramKernels  # noqa: E402
from reference import KERNEL_VARIANTS  # noqa: E402

from lstm_multi import Variant, mean, rsqrt, sigmoid, spec, tanh  # noqa: E402

VARIANTS = list(KERNEL_VARIANTS)  # reductions and split halves: the layer-norm tests below


@pytest.fixture
def kernels(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when a generated module is imported
    monkeypatch.setenv("LSTM_MULTI_CACHE", str(tmp_path))
    from lstm_multi.backends.triton_kernels import TritonKernels

    return TritonKernels()


def _inputs(variant, rng, batch=3, hidden=5, dtype=np.float32):
    z = (rng.normal(size=(batch, 4 * hidden)) * 2).astype(dtype)
    c_prev, dh, dc = (rng.normal(size=(batch, hidden)).astype(dtype) for _ in range(3))
    extra = {
        k: rng.normal(size=s).astype(dtype) for k, s in variant.extra_param_shapes(hidden).items()
    }
    return z, c_prev, extra, dh, dc


def _t(array):
    return torch.from_numpy(np.ascontiguousarray(array))


def _wide(array):
    return np.asarray(array, dtype=np.float64)


def _check(kernels, variant, z, c_prev, extra, dh, dc, tol):
    """The Triton kernels against the program's float64 evaluation on the same inputs."""
    reference = ProgramKernels()
    wide_extra = {k: _wide(v) for k, v in extra.items()}
    h, c, saved = kernels.forward(variant, _t(z), _t(c_prev), {k: _t(v) for k, v in extra.items()})
    rh, rc, rsaved = reference.forward(variant, _wide(z), _wide(c_prev), wide_extra)
    assert h.dtype == _t(z).dtype and c.dtype == torch.float32
    for got, want in zip((h, c, *saved), (rh, rc, *rsaved), strict=True):
        np.testing.assert_allclose(got.float().numpy(), want, rtol=tol, atol=tol)
    dz, dc_prev, terms = kernels.backward(
        variant, _t(dh), _t(dc).float(), saved, {k: _t(v) for k, v in extra.items()}
    )
    rdz, rdc_prev, rterms = reference.backward(
        variant, _wide(dh), _wide(dc), tuple(_wide(s.numpy()) for s in saved), wide_extra
    )
    np.testing.assert_allclose(dz.numpy(), rdz, rtol=tol, atol=tol)
    np.testing.assert_allclose(dc_prev.numpy(), rdc_prev, rtol=tol, atol=tol)
    assert set(terms) == set(rterms) == set(variant.params)
    for k in terms:
        np.testing.assert_allclose(terms[k].numpy(), rterms[k], rtol=tol, atol=tol)


@pytest.mark.parametrize("name", VARIANTS)
def test_triton_kernels_equal_the_program(kernels, name):
    variant = spec.VARIANTS[name]
    _check(kernels, variant, *_inputs(variant, np.random.default_rng(1)), tol=2e-6)


@pytest.mark.parametrize("name", ["layernorm", "layernorm_peephole"])
def test_triton_kernels_with_row_reductions_equal_the_array_code(kernels, name):
    """The per-step kernels of a split-halves variant with row means (whole rows a program:
    3 rows of 5 units in an (8, 8)... tile of 32 rows by 8 columns, padding both ways)
    against the array code in float64: h, c, the saved values (a per-row one stored at
    every unit), dz (B, 8H) = [dzx, dzr], dc_{t-1} and each parameter's terms, b's
    included (B, 4, H)."""
    from lstm_multi.ops import ArrayModuleOps

    variant, ops = spec.VARIANTS[name], ArrayModuleOps(np)
    rng = np.random.default_rng(6)
    batch, hidden = 3, 5
    z = (rng.normal(size=(batch, 8 * hidden)) * 1.5).astype(np.float32)
    c_prev, dh, dc = (rng.normal(size=(batch, hidden)).astype(np.float32) for _ in range(3))
    shapes = {**variant.extra_param_shapes(hidden), "b": (4 * hidden,)}
    extra = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    wide = {k: _wide(v) for k, v in extra.items()}
    h, c, saved = kernels.forward(variant, _t(z), _t(c_prev), {k: _t(v) for k, v in extra.items()})
    rh, rc, rsaved = variant.gates_forward(ops, _wide(z), _wide(c_prev), wide)
    for got, want in zip((h, c, *saved), (rh, rc, *rsaved), strict=True):
        want = np.broadcast_to(want, (batch, hidden))
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    dz, dc_prev, terms = kernels.backward(
        variant, _t(dh), _t(dc), saved, {k: _t(v) for k, v in extra.items()}
    )
    rdz, rdc_prev, rgrads = variant.gates_backward(ops, _wide(dh), _wide(dc), rsaved, wide)
    assert dz.shape == (batch, 8 * hidden)
    np.testing.assert_allclose(dz.numpy(), rdz, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dc_prev.numpy(), rdc_prev, rtol=1e-5, atol=1e-5)
    assert set(terms) == set(rgrads) == set(variant.gate_params)
    for k, term in terms.items():
        got = term.sum(0).reshape(rgrads[k].shape).numpy()
        np.testing.assert_allclose(got, rgrads[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_triton_kernels_take_half_inputs(kernels):
    """float16 in: the math in float32, h rounded to float16 (a half ulp of it)."""
    variant = spec.VARIANTS["peephole"]
    z, c_prev, extra, dh, dc = _inputs(variant, np.random.default_rng(2), dtype=np.float16)
    h, c, _ = kernels.forward(variant, _t(z), _t(c_prev), {k: _t(v) for k, v in extra.items()})
    assert h.dtype == torch.float16 and c.dtype == torch.float32
    _check(kernels, variant, z, c_prev, extra, dh, dc, tol=2**-10)


def test_triton_nonlinearities_are_accurate(kernels):
    """The kernels' own sigmoid and tanh (from tl.exp) within a few float32 ulps over
    both tails and the switch of tanh's two formulas at 0.625."""
    probe = Variant("probe", lambda z, c_prev: (tanh(z.g), sigmoid(z.i)))
    grid = np.concatenate(
        [np.linspace(-30, 30, 2001), np.geomspace(1e-6, 1, 200), -np.geomspace(1e-6, 1, 200)]
    )
    grid = np.concatenate([grid, [0.0, 0.625, -0.625, 0.6249999, -0.6250001, 88.0, -88.0, -103.0]])
    z = np.zeros((len(grid), 4), np.float32)
    z[:, 0], z[:, 2] = grid, grid
    x = z[:, 0].astype(np.float64)
    h, c, _ = kernels.forward(probe, _t(z), torch.zeros(len(grid), 1), {})
    for got, want in ((h[:, 0].numpy(), np.tanh(x)), (c[:, 0].numpy(), 1 / (1 + np.exp(-x)))):
        ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
        ulps = np.abs(got.astype(np.float64) - want) / np.maximum(ulp, np.finfo(np.float32).tiny)
        assert ulps.max() <= 4, (ulps.max(), x[np.argmax(ulps)])


def test_a_user_variant_gets_triton_kernels(kernels):
    def coupled(z, c_prev, p):
        i = sigmoid(z.i + p.i * c_prev)
        c = (1 - i) * c_prev + i * tanh(z.g)
        return sigmoid(z.o + p.o * c) * tanh(c), c

    variant = Variant("coupled", coupled, params={"p": ("i", "o")})
    _check(kernels, variant, *_inputs(variant, np.random.default_rng(3)), tol=2e-6)


def test_triton_kernels_refuse_float64(kernels):
    variant = spec.VARIANTS["lstm"]
    z, c_prev, extra, _, _ = _inputs(variant, np.random.default_rng(0), dtype=np.float64)
    with pytest.raises(TypeError, match="z: the Triton gate kernels compute in float32"):
        kernels.forward(variant, _t(z), _t(c_prev), {})


@pytest.mark.gpu
@pytest.mark.parametrize("name", VARIANTS)
def test_triton_kernels_compiled_on_cuda_equal_the_program(name, monkeypatch, tmp_path):
    """On a GPU: the same kernels compiled by Triton (no interpreter)."""
    if not torch.cuda.is_available():
        pytest.skip("torch: no CUDA device (torch.cuda.is_available() is False)")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("LSTM_MULTI_CACHE", str(tmp_path))
    from lstm_multi.backends.triton_kernels import TritonKernels

    variant = spec.VARIANTS[name]
    z, c_prev, extra, dh, dc = _inputs(variant, np.random.default_rng(4), batch=37, hidden=300)
    reference = ProgramKernels()
    kernels = TritonKernels()
    cuda = {k: _t(v).cuda() for k, v in extra.items()}
    h, c, saved = kernels.forward(variant, _t(z).cuda(), _t(c_prev).cuda(), cuda)
    rh, rc, rsaved = reference.forward(
        variant, _wide(z), _wide(c_prev), {k: _wide(v) for k, v in extra.items()}
    )
    for got, want in zip((h, c, *saved), (rh, rc, *rsaved), strict=True):
        np.testing.assert_allclose(got.float().cpu().numpy(), want, rtol=2e-6, atol=2e-6)
    dz, dc_prev, terms = kernels.backward(variant, _t(dh).cuda(), _t(dc).cuda(), saved, cuda)
    rdz, rdc_prev, rterms = reference.backward(
        variant, _wide(dh), _wide(dc), tuple(_wide(s.cpu().numpy()) for s in saved),
        {k: _wide(v) for k, v in extra.items()},
    )  # fmt: skip
    np.testing.assert_allclose(dz.cpu().numpy(), rdz, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(dc_prev.cpu().numpy(), rdc_prev, rtol=2e-6, atol=2e-6)
    for k in terms:
        np.testing.assert_allclose(terms[k].cpu().numpy(), rterms[k], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("variant", ["lstm", "peephole", "cifg"])
def test_torch_cell_with_triton_gates_equals_the_array_code(kernels, variant, monkeypatch):
    """gate_kernel="triton": the generic path with one generated kernel per step gives the
    array code's outputs and gradients (float32), and float64 falls back to the array code."""
    import lstm_multi
    from lstm_multi.backends.triton_kernels import TritonKernels

    launches = {"forward": 0, "backward": 0}
    for direction in launches:
        original = getattr(TritonKernels, direction)

        def counted(self, *args, _original=original, _direction=direction):
            launches[_direction] += 1
            return _original(self, *args)

        monkeypatch.setattr(TritonKernels, direction, counted)

    Cell = lstm_multi.get_cell("torch")
    sizes = dict(input_size=3, hidden_size=4, variant=variant, num_layers=2, bidirectional=True)
    reference = Cell(**sizes, native=False, gate_kernel="array")
    fused = Cell(**sizes, native=False, gate_kernel="triton")
    rng = np.random.default_rng(5)
    lengths = [3, 2]  # 3 steps: a launch a step, each interpreted; one sequence ends early
    for dtype, tol in (("float32", 2e-5), ("float64", 0.0)):
        params = reference.init(seed=1, dtype=dtype)
        x = rng.normal(size=(2, 3, 3)).astype(dtype)
        dy = rng.normal(size=(2, 3, 8)).astype(dtype)
        want = reference(params, x, lengths=lengths), reference.vjp(params, x, dy, lengths=lengths)
        got = fused(params, x, lengths=lengths), fused.vjp(params, x, dy, lengths=lengths)
        flat = (
            [torch.as_tensor(a) for a in _leaves(got)],
            [torch.as_tensor(a) for a in _leaves(want)],
        )
        for a, b in zip(*flat, strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        if dtype == "float32":  # 2 layers x 2 directions x 3 steps; call and vjp
            assert launches == {"forward": 24, "backward": 12}, launches
            launches.update(forward=0, backward=0)
        assert fused.last_choice.engine == ("triton" if dtype == "float32" else "array")
    assert launches == {"forward": 0, "backward": 0}  # float64: the array code


@pytest.fixture
def persistent_launches(monkeypatch):
    """Counts of the persistent kernels' launches (a fallback launches none)."""
    from lstm_multi.backends.triton_kernels import TritonKernels

    launches = {"sequence_forward": 0, "sequence_backward": 0}
    for name in launches:
        original = getattr(TritonKernels, name)

        def counted(self, *args, _original=original, _name=name):
            launches[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(TritonKernels, name, counted)
    return launches


@pytest.mark.parametrize("variant", VARIANTS)
def test_persistent_kernels_match_the_oracle(kernels, variant, persistent_launches):
    """gate_kernel="triton_persistent": each direction's whole time loop in one launch of
    the generated persistent kernels (tl.dot with U held, the derived gate math), forward
    and backward, against the independent oracle: 2 layers, both directions, an initial
    state and lengths, float32; float64 falls back to the array code (still the oracle's)."""
    from reference import Config, make_problem, reference
    from test_agreement import assert_matches_reference, run_backend

    launches = persistent_launches
    # 3 steps (the interpreter runs each step of each program instance: few steps), and a
    # seed whose lengths (1, 3, 2) end two sequences early (seed 13 drew all full lengths)
    config = Config(variant, 3, 3, 2, 5, 2, True, True, True, True, 14)
    problem = make_problem(config)
    assert sorted(problem.lengths) == [1, 2, 3]
    expected = reference(config, problem)
    result = run_backend(
        "torch", config, problem, "float32", native=False, gate_kernel="triton_persistent"
    )
    assert_matches_reference(result, expected, "float32", f"oracle vs persistent/{variant}")
    # call and vjp (whose forward records a tape) x 2 layers x 2 directions
    assert launches == {"sequence_forward": 8, "sequence_backward": 4}, launches
    result = run_backend(
        "torch", config, problem, "float64", native=False, gate_kernel="triton_persistent"
    )
    assert_matches_reference(result, expected, "float64", f"oracle vs fallback/{variant}")
    assert launches == {"sequence_forward": 8, "sequence_backward": 4}, launches


#: the layer-normalised built-ins (row reductions, split halves) on both engines: the default
#: run takes each engine with one of them, the thorough run the product
LAYER_NORM_CASES = thorough_params(
    [(e, v) for e in ("triton", "triton_persistent") for v in ("layernorm", "layernorm_peephole")],
    [("triton", "layernorm"), ("triton_persistent", "layernorm_peephole")],
)


@pytest.mark.parametrize(("engine_name", "variant"), LAYER_NORM_CASES)
def test_triton_engines_run_layer_norm_against_the_oracle(
    kernels, engine_name, variant, persistent_launches
):
    """The layer-normalised variants on the per-step kernels (whole rows a program) and the
    persistent ones (a row mean over the tile), against the oracle in float32: outputs and
    every gradient (W, U, b, the gains and shifts, p, x, h0, c0), both directions, lengths
    and an initial state; H = 6, so the tiles have padding columns the means must skip."""
    from reference import Config, make_problem, reference
    from test_agreement import assert_matches_reference, run_cell

    config = Config(variant, 2, 3, 2, 6, 1, True, True, True, False, 13)
    problem = make_problem(config)
    cell = config.cell("torch", native=False, engine=engine_name)
    result = run_cell(cell, config, problem, "float32")
    assert cell.last_choice.engine == engine_name
    assert_matches_reference(result, reference(config, problem), "float32", engine_name)
    persistent = engine_name == "triton_persistent"  # call and vjp's forward, 2 directions
    want = (
        {"sequence_forward": 4, "sequence_backward": 2}
        if persistent
        else dict.fromkeys(persistent_launches, 0)
    )
    assert persistent_launches == want


def _rms_norm_cell(z, c_prev, g):
    """A user's reduction: h = o tanh(g c / rms(c)), the RMS over the row of c."""
    c = sigmoid(z.f) * c_prev + sigmoid(z.i) * tanh(z.g)
    return sigmoid(z.o) * tanh(g.c * c * rsqrt(mean(c * c) + 1e-5)), c


@pytest.mark.parametrize("perturbed", [False, True], ids=["mean", "sum over H+1"])
@pytest.mark.parametrize("engine_name", ["triton", "triton_persistent"])
def test_a_user_reduction_variant_runs_on_the_triton_engines(
    kernels, engine_name, perturbed, monkeypatch
):
    """A user's RMS norm of c on both Triton engines equals the array code (float32 against
    float64, 1e-4), outputs and every gradient; and the check has power: the kernels' row
    mean divided by H + 1 instead of H fails it."""
    import lstm_multi
    from lstm_multi.compile import emit_triton

    if perturbed:
        wrong = emit_triton.PRELUDE.replace("[:, None] / H\n", "[:, None] / (H + 1)\n")
        assert wrong != emit_triton.PRELUDE
        monkeypatch.setattr(emit_triton, "PRELUDE", wrong)
    # a new Variant each run: the engine's kernels are cached per variant object
    variant = Variant("rms_c", _rms_norm_cell, params={"g": ("c",)}, param_init={"g": 1.0})
    Cell = lstm_multi.get_cell("torch")
    sizes = dict(input_size=3, hidden_size=6, variant=variant, bidirectional=True, native=False)
    reference, fused = Cell(**sizes, engine="array"), Cell(**sizes, engine=engine_name)
    params = reference.init(seed=1, dtype="float64")
    rng = np.random.default_rng(0)
    x, dy = rng.normal(size=(2, 3, 3)), rng.normal(size=(2, 3, 12))
    want = reference(params, x, lengths=[3, 2]), reference.vjp(params, x, dy, lengths=[3, 2])
    single = [[{k: v.float() for k, v in d.items()} for d in layer] for layer in params]
    x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
    got = fused(single, x32, lengths=[3, 2]), fused.vjp(single, x32, dy32, lengths=[3, 2])
    assert fused.last_choice.engine == engine_name

    def compare():
        for a, b in zip(_leaves(got), _leaves(want), strict=True):
            a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach()
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    if perturbed:
        with pytest.raises(AssertionError):
            compare()
    else:
        compare()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_persistent_kernels_take_half_inputs(kernels, dtype, monkeypatch):
    """Half-precision tensors: float32 math inside, outputs and gradients in the input's
    dtype, within the half type's rounding of the float32 array code."""
    import lstm_multi
    from lstm_multi.backends.triton_kernels import TritonKernels

    launched = []
    original = TritonKernels.sequence_backward
    monkeypatch.setattr(
        TritonKernels, "sequence_backward", lambda *a: launched.append(1) or original(*a)
    )
    Cell = lstm_multi.get_cell("torch")
    sizes = dict(input_size=3, hidden_size=8, variant="peephole", num_layers=2, native=False)
    reference = Cell(**sizes, gate_kernel="array")
    persistent = Cell(**sizes, gate_kernel="triton_persistent")
    params = reference.init(seed=0)
    half = [[{k: v.to(dtype).requires_grad_(True) for k, v in p.items()} for p in layer]
            for layer in params]  # fmt: skip
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    y, (h_n, c_n) = persistent(half, x.to(dtype), lengths=[5, 3])
    y.float().square().sum().backward()
    assert y.dtype == h_n.dtype == c_n.dtype == half[0][0]["W"].grad.dtype == dtype
    want, _ = reference(params, x, lengths=[5, 3])
    tolerance = 8e-3 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(y.float(), want, rtol=tolerance, atol=tolerance)
    assert launched and persistent.last_choice.engine == "triton_persistent"


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["lstm", "peephole", "peephole_full", "cifg"])
def test_persistent_kernels_compiled_on_cuda_match_the_oracle(
    variant, monkeypatch, tmp_path, persistent_launches
):
    """On a GPU: the persistent kernels compiled by Triton (no interpreter), a batch that is
    not a multiple of the tile (37 rows) and H = 64, against the oracle in float32; and
    they ran (not a fallback to the per-step path)."""
    if not torch.cuda.is_available():
        pytest.skip("torch: no CUDA device (torch.cuda.is_available() is False)")
    from reference import Config, make_problem, reference
    from test_agreement import assert_matches_reference, run_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("LSTM_MULTI_CACHE", str(tmp_path))
    config = Config(variant, 37, 20, 16, 64, 2, True, True, True, True, 3)
    problem = make_problem(config)
    result = run_backend(
        "torch", config, problem, "float32", native=False, gate_kernel="triton_persistent",
        device="cuda",
    )  # fmt: skip
    assert_matches_reference(result, reference(config, problem), "float32", f"cuda/{variant}")
    # call and vjp (whose forward records a tape) x 2 layers x 2 directions
    assert persistent_launches == {"sequence_forward": 8, "sequence_backward": 4}


def _leaves(tree):
    if isinstance(tree, dict):
        return [leaf for k in sorted(tree) for leaf in _leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree]


def test_gate_kernel_option_is_checked(monkeypatch):
    import importlib.util

    import lstm_multi

    Cell = lstm_multi.get_cell("torch")
    with pytest.raises(
        ValueError,
        match="gate_kernel: expected None, 'array', 'triton' or 'triton_persistent', got 'cuda'",
    ):
        Cell(3, 4, gate_kernel="cuda")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "triton" else find_spec(name)
    )
    for kernel in ("triton", "triton_persistent"):
        with pytest.raises(ImportError, match=r"pip install 'lstm_multi\[triton\]'"):
            Cell(3, 4, gate_kernel=kernel)
