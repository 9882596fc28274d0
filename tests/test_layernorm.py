"""Row reductions in the gate math and the layer-normalised LSTM (issue 26, first stage).

* the tracer: ``mean`` (over a row's units) and ``rsqrt`` nodes, their identities, and
  the restriction message naming what is still not allowed;
* the derived backward through a reduction: the array code against the program's own
  evaluation and against finite differences, on a user-written variant (an RMS norm of
  c) and on the built-ins;
* "layernorm" and "layernorm_peephole" against the independent oracle (``oracle.py``,
  written from Ba, Kiros & Hinton's equations) on NumPy, PyTorch and JAX in float64:
  outputs and every gradient (the gains and shifts included), with layers, both
  directions, lengths, a per-step mask, initial state and projection;
* the suite's power: a layer norm with the unbiased variance, or with eps 1e-3, fails it;
* the engine table: every kernel engine refuses such a variant naming what it lacks,
  "auto" picks the array engine (scan on JAX) and says why;
* the parameters: names, shapes, gains 1 and shifts 0 under every scheme.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import assert_close
from doubles import ProgramKernels
from reference import Config, make_problem, reference
from test_agreement import (
    assert_gradients_match,
    assert_matches_reference,
    assert_outputs_match,
    run_cell,
)

import lstm_multi
from lstm_multi import Variant, engine, sigmoid, spec, tanh
from lstm_multi.backends import cupy_kernels, kernel_direction
from lstm_multi.compile import derive, emit_array, emit_cpu, evaluate, trace
from lstm_multi.compile.trace import mean, rsqrt
from lstm_multi.kernels import build
from lstm_multi.ops import ArrayModuleOps

NP_OPS = ArrayModuleOps(np)
needs_compiler = pytest.mark.skipif(build.host_compiler() is None, reason="no host C++ compiler")
#: forces one CPU-kernel loop or the other whatever the size (as tests/test_cpu_kernels.py)
LOOPS = {"sequence in C": 1 << 62, "per step": 0}
LAYER_NORMS = ("layernorm", "layernorm_peephole")
BACKENDS = ("numpy", "torch", "jax")


def _backend(name):
    try:
        lstm_multi.registry.load_backend(name)
    except (ImportError, RuntimeError) as error:
        pytest.skip(str(error))


# the tracer ---------------------------------------------------------------------------


def test_mean_and_rsqrt_are_nodes_with_their_identities():
    graph = trace.Graph()
    a = graph.input("a")
    m = mean(a)
    assert graph.nodes[m.id].op == "mean" and mean(m).id == m.id  # a row mean's mean
    assert mean(a).id == m.id  # shared
    assert graph.value_of(mean(graph.const(3.0)).id) == 3.0  # a constant's mean
    assert rsqrt(4.0) == 0.5 and graph.value_of(rsqrt(graph.const(0.25)).id) == 2.0
    centred = a - m
    assert trace.row_valued(graph, [centred.id, (m * m + 1).id]) == {
        m.id,
        (m * m).id,
        (m * m + 1).id,
    }
    with pytest.raises(ValueError, match=r"rsqrt\(-1.0\): expected a positive number"):
        rsqrt(graph.const(-1.0))
    with pytest.raises(TypeError, match="mean: expected a traced gate-math value"):
        mean("x")


def test_the_restriction_message_names_what_is_not_allowed():
    variant = Variant("divides", lambda z, c_prev: (z.i / mean(z.f), c_prev))
    with pytest.raises(TypeError) as error:
        variant.programs  # noqa: B018
    message = str(error.value)
    assert "rsqrt" in message and "row mean lstm_multi.mean" in message
    assert "not allowed: division" in message and "reductions other than the mean" in message


def test_split_halves_are_checked_and_declared():
    with pytest.raises(ValueError, match="halves: expected one of"):
        Variant("bad", lambda z, c_prev: (z.i, c_prev), halves="both")
    with pytest.raises(ValueError, match="param_init: expected names among"):
        Variant("bad", lambda z, c_prev: (z.i, c_prev), param_init={"g": 1.0})
    programs = spec.VARIANTS["layernorm"].programs
    assert programs.z_inputs[:5] == ("zx_i", "zx_f", "zx_g", "zx_o", "zr_i")
    assert programs.param_rows[:4] == ("b_i", "b_f", "b_g", "b_o")
    assert "dzr_o" in programs.backward_outputs and "db_g" in programs.backward_outputs


# the derived backward through a reduction ----------------------------------------------


def rms_norm_cell(z, c_prev, g):
    """A user's variant with a reduction: h = o * tanh(g * c / rms(c)), rms over the row."""
    i, f, gg, o = sigmoid(z.i), sigmoid(z.f), tanh(z.g), sigmoid(z.o)
    c = f * c_prev + i * gg
    return o * tanh(g.c * c * rsqrt(mean(c * c) + 1e-5)), c


RMS = Variant("rms_cell", rms_norm_cell, params={"g": ("c",)}, param_init={"g": 1.0})


def _step_inputs(variant, rng, batch=3, hidden=5):
    z = rng.normal(size=(batch, len(variant.programs.z_inputs) * hidden)) * 1.5
    c_prev, dh, dc = (rng.normal(size=(batch, hidden)) for _ in range(3))
    extra = {k: rng.normal(size=s) for k, s in variant.extra_param_shapes(hidden).items()}
    if variant.split:
        extra["b"] = rng.normal(size=4 * hidden)
    return z, c_prev, dh, dc, extra


@pytest.mark.parametrize("variant", [RMS, *(spec.VARIANTS[n] for n in LAYER_NORMS)], ids=str)
def test_array_code_equals_the_evaluated_program(variant):
    """The emitted array code (``ops.row_mean``, (B, 1) per-row values) against the node-by-
    node interpreter of the same programs: forward, saved values and backward."""
    programs = variant.programs
    z, c_prev, dh, dc, extra = _step_inputs(variant, np.random.default_rng(1))
    h, c, cache = variant.gates_forward(NP_OPS, z, c_prev, extra)
    dz, dc_prev, dextra = variant.gates_backward(NP_OPS, dh, dc, cache, extra)
    rows = dict(zip(programs.param_rows, variant.param_rows(extra), strict=True))
    blocks = spec.split_gates(z, c_prev.shape[-1])
    inputs = {**dict(zip(programs.z_inputs, blocks, strict=True)), "c_prev": c_prev, **rows}
    want_h, want_c, saved = evaluate.evaluate_forward(programs, inputs)
    out = evaluate.evaluate_backward(programs, {"dh": dh, "dc": dc, **rows}, saved)
    assert_close(h, want_h, "float64", "h")
    assert_close(c, want_c, "float64", "c")
    for got, want in zip(cache, saved, strict=True):
        assert_close(np.broadcast_to(got, want.shape), want, "float64", "saved")
    want_dz = np.concatenate([out[f"d{n}"] for n in programs.z_inputs], -1)
    assert_close(dz, want_dz, "float64", "dz")
    assert_close(dc_prev, out["dc_prev"], "float64", "dc_prev")
    for name, row_names in variant.gate_params.items():
        want = [out[f"d{name}_{r}"].sum(0) for r in row_names]
        expected = np.concatenate(want) if name == "b" else np.stack(want)
        assert_close(dextra[name], expected, "float64", f"d{name}")


def test_row_mean_is_written_once_a_row():
    source = emit_array.source_forward(spec.VARIANTS["layernorm"].programs)
    assert source.count("ops.row_mean(") == 6  # the mean and the variance of each of 3 LNs
    assert source.count("ops.rsqrt(") == 3


@pytest.mark.parametrize("variant", LAYER_NORMS)
def test_cpu_forward_row_computes_each_nonlinearity_once(variant):
    """The C++ forward row runs in five loops (three layer norms); the gates' sigmoids and
    tanh, which c_t needs, are kept in scratch by the loop that computes them, not called
    again in the loops after it (emit_cpu._row_loops; benchmarks/NOTES.md section 20):
    three sigmoids and two tanh, as a plain LSTM's row."""
    source = emit_cpu.cpu_source(spec.VARIANTS[variant].programs, "float")
    forward = source[source.index("lm_forward_row(") : source.index("lm_backward_row(")]
    assert forward.count("#pragma omp simd") == 5
    assert forward.count("lm_sigmoid(") == 3 and forward.count("lm_tanh(") == 2
    assert "lm_row_scratch(" in forward


def test_user_reduction_variant_passes_check_variant():
    """Traced, derived and checked: finite differences of one step and of a network, the
    array loop, the C++ kernels (which write reductions) and torch against NumPy; the
    CUDA C and Triton kernels say they do not write it."""
    report = lstm_multi.testing.check_variant(RMS, backends=["numpy", "torch"])
    status = {r.name: r for r in report.results}
    assert status["gates"].status == status["network"].status == "passed"
    assert status["array"].status == status["torch"].status == "passed"
    assert status["cpu"].status == ("passed" if build.host_compiler() else "skipped")
    for name in ("kernels", "triton"):
        assert status[name].status == "skipped" and "row reductions (mean)" in status[name].note


@needs_compiler
@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_reduction_on_the_cpu_kernels_equals_the_array_engine(backend, loop, monkeypatch):
    """A user's reduction (two loops a row: the mean square, then the rest) on the C++
    kernels, both loops, against the array engine: outputs and every gradient, float64
    and float32; auto picks the kernels."""
    _backend(backend)
    monkeypatch.setattr(kernel_direction, "SEQUENCE_LOOP_MAX_MACS", LOOPS[loop])
    config = _config(RMS.name)
    problem = make_problem(config)
    rng = np.random.default_rng(3)
    for layer in problem.params:  # the gain, which make_problem does not know
        for p in layer:
            p["g"] = 1 + 0.3 * rng.standard_normal((1, config.hidden_size))
    Cell = lstm_multi.get_cell(backend)
    sizes = dict(num_layers=2, bidirectional=True, batch_first=False)
    kernels = Cell(config.input_size, config.hidden_size, variant=RMS, **sizes)
    array = Cell(config.input_size, config.hidden_size, variant=RMS, engine="array", **sizes)
    for dtype in ("float64", "float32"):
        got = run_cell(kernels, config, problem, dtype)
        want = run_cell(array, config, problem, dtype)
        assert kernels.last_choice.engine == "cpu_kernels"
        assert_matches_reference(got, want, dtype, f"{backend} {loop} {dtype}")


def test_a_wrong_row_mean_in_the_cpu_kernels_fails_check_variant(monkeypatch):
    """check_variant's power over the C++ row loops: a mean dividing by H - 1 fails 'cpu'."""
    if build.host_compiler() is None:
        pytest.skip("no host C++ compiler")
    monkeypatch.setattr(emit_cpu, "_mean_of", lambda accumulator: f"{accumulator} / S(H - 1)")
    report = lstm_multi.testing.check_variant(RMS, backends=["numpy"], raise_on_failure=False)
    assert [r.name for r in report.failed] == ["cpu"]


#: reductions at the edges: an output that is a row value (broadcast back to (B, H) by
#: every emitter), a cell state that is one, a mean of a product with a mean
DEGENERATE = {
    "row_h": lambda z, c_prev: (mean(z.i), sigmoid(z.f) * c_prev),
    "row_c": lambda z, c_prev: (sigmoid(z.o), mean(c_prev) + mean(z.g)),
    "mean_of_mean": lambda z, c_prev: (mean(mean(z.i) * z.o), c_prev * sigmoid(z.f)),
}


@pytest.mark.parametrize("name", sorted(DEGENERATE))
def test_degenerate_reductions_are_derived_and_compiled(name):
    report = lstm_multi.testing.check_variant(Variant(name, DEGENERATE[name]), backends=["numpy"])
    assert {r.name for r in report.results if r.status == "passed"} >= {"gates", "network"}


def _rule_mean_without_spread(graph, node, node_id, g):
    """A wrong derivation: the row mean's adjoint passed on unspread (g, not mean(g))."""
    if node.op == "mean":
        return [(node.args[0], g)]
    return RULE(graph, node, node_id, g)


RULE = derive._backward_rule


def test_a_wrong_reduction_rule_fails_check_variant(monkeypatch):
    monkeypatch.setattr(derive, "_backward_rule", _rule_mean_without_spread)
    wrong = Variant("rms_wrong", rms_norm_cell, params={"g": ("c",)})
    report = lstm_multi.testing.check_variant(wrong, backends=["numpy"], raise_on_failure=False)
    assert {r.name for r in report.failed} >= {"gates", "network"}


# against the oracle -------------------------------------------------------------------


def _config(variant, seed=7, **kw):
    base = dict(batch=3, steps=4, input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    flags = dict(with_state=True, with_lengths=True, batch_first=False, seed=seed)
    return Config(variant=variant, **{**base, **flags, **kw})


#: per variant: two layers both ways with lengths and state; a projection; one unit
#: (each LN over c of a single value: zero variance, the epsilon alone)
CONFIGS = {
    "layers": {},
    "projection": dict(proj_size=3, num_layers=1, bidirectional=False, batch_first=True),
    "one unit": dict(hidden_size=1, with_lengths=False, with_state=False),
}


def _cell_for(backend, config, variant=None, **kwargs):
    Cell = lstm_multi.get_cell(backend)
    return Cell(
        config.input_size, config.hidden_size, variant=variant or config.variant,
        num_layers=config.num_layers, bidirectional=config.bidirectional,
        batch_first=config.batch_first, proj_size=config.proj_size, **kwargs,
    )  # fmt: skip


def _run(backend, config, problem, variant=None, **kwargs):
    return run_cell(_cell_for(backend, config, variant, **kwargs), config, problem, "float64")


#: (backend, engine): the array engines, JAX's scan, and the C++ kernels
ENGINES = [("numpy", "array"), ("numpy", "cpu_kernels"), ("torch", "array"),
           ("torch", "cpu_kernels"), ("jax", "auto")]  # fmt: skip


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("variant", LAYER_NORMS)
@pytest.mark.parametrize(("backend", "engine_name"), ENGINES)
def test_layernorm_matches_the_oracle(backend, engine_name, variant, case, thorough):
    """Outputs and every gradient (W, U, b, p, the gains and shifts, x, h0, c0), float64.
    JAX compiles each case (seconds): the default run takes its path with "layers" of
    "layernorm_peephole" (and "layernorm" in the mask test)."""
    if backend == "jax" and (case, variant) != ("layers", "layernorm_peephole") and not thorough:
        pytest.skip("runs under --thorough only: JAX takes its path with layernorm_peephole")
    _backend(backend)
    if engine_name == "cpu_kernels" and build.host_compiler() is None:
        pytest.skip("no host C++ compiler")
    config = _config(variant, **CONFIGS[case])
    problem = make_problem(config)
    expected = reference(config, problem)
    for dtype in ("float64", "float32") if engine_name == "cpu_kernels" else ("float64",):
        cell = _cell_for(backend, config, engine=engine_name)
        result = run_cell(cell, config, problem, dtype)
        if engine_name != "auto":
            assert cell.last_choice.engine == engine_name
        assert_matches_reference(result, expected, dtype, f"{backend}/{engine_name}/{case}")


@pytest.mark.parametrize(
    "engine_name",
    ["numpy-array", "numpy-cpu_kernels", "torch-array", "torch-cpu_kernels", "jax-scan"],
)
def test_layernorm_with_a_step_mask_matches_the_oracle(engine_name):
    """A per-step mask with a gap and a row with no real step: held state, zero outputs."""
    from test_masks import _assert_matches, _cell, _convert, _expected, _layers, _problem, _run

    mask = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]], bool)
    cell = _cell(engine_name, "layernorm")
    p = _problem("layernorm", mask, seed=4, num_layers=_layers(engine_name))
    rng = np.random.default_rng(9)  # gains and shifts away from 1 and 0
    p["params"] = [[{k: v + 0.3 * rng.standard_normal(v.shape) for k, v in d.items()}
                    for d in layer] for layer in p["params"]]  # fmt: skip
    _assert_matches(_run(cell, p, _convert(engine_name), mask),
                    _expected("layernorm", p), "float64", engine_name)  # fmt: skip


def _wrong_layernorm(unbiased=False, eps=spec.LN_EPS, name="ln_changed"):
    """ "layernorm" with its LN changed, consistently forward and backward: the unbiased
    variance (times n / (n - 1), n the units normalised together) or another epsilon."""

    def layer_norm(values, gamma, beta):
        k = len(values)
        mu = (1.0 / k) * mean(sum(values[1:], values[0]))
        centred = [v - mu for v in values]
        square = sum((d * d for d in centred[1:]), centred[0] * centred[0])
        n = k * HIDDEN
        scale = n / (n - 1) if unbiased else 1.0
        inv = rsqrt(scale * (1.0 / k) * mean(square) + eps)
        return [g * (d * inv) + b for d, g, b in zip(centred, gamma, beta, strict=True)]

    def forward(zx, zr, c_prev, b, gamma_x, beta_x, gamma_h, beta_h, gamma_c, beta_c):
        x = layer_norm(list(zx), list(gamma_x), list(beta_x))
        r = layer_norm(list(zr), list(gamma_h), list(beta_h))
        zi, zf, zg, zo = (xk + rk + bk for xk, rk, bk in zip(x, r, b, strict=True))
        c = sigmoid(zf) * c_prev + sigmoid(zi) * tanh(zg)
        (c_norm,) = layer_norm([c], [gamma_c.c], [beta_c.c])
        return sigmoid(zo) * tanh(c_norm), c

    return Variant(name, forward, params=spec._LAYER_NORMS, halves="split")


HIDDEN = 4


def test_the_right_layernorm_written_by_a_user_is_the_built_in():
    """The power test's construction with nothing changed computes the built-in."""
    same = _wrong_layernorm(name="mine")
    assert same.fingerprint == spec.VARIANTS["layernorm"].fingerprint  # known by its math
    config = _config("layernorm", hidden_size=HIDDEN)
    problem = make_problem(config)
    assert_matches_reference(_run("numpy", config, problem, same), reference(config, problem),
                             "float64")  # fmt: skip


@pytest.mark.parametrize(
    "wrong", [_wrong_layernorm(unbiased=True), _wrong_layernorm(eps=1e-3)], ids=["unbiased", "eps"]
)
def test_a_wrong_layer_norm_fails_the_oracle(wrong):
    config = _config("layernorm", hidden_size=HIDDEN)
    problem = make_problem(config)
    result = _run("numpy", config, problem, wrong)
    expected = reference(config, problem)
    with pytest.raises(AssertionError):
        assert_outputs_match(result, expected, "float64", False)
    with pytest.raises(AssertionError):
        assert_gradients_match(result, expected, "float64", False)


# the engine table ---------------------------------------------------------------------


def _case(backend, device, dtype="float32", variant="layernorm", **kw):
    return engine.Case(backend, device, dtype, spec.VARIANTS[variant], 16, **kw)


@pytest.mark.parametrize(
    ("name", "device", "kernels"),
    [
        ("triton", "cuda", "the Triton kernels"),
        ("triton_persistent", "cuda", "the Triton kernels"),
        ("graphed_array", "cuda", "the CUDA-graph engines"),
        ("graphed_triton", "cuda", "the CUDA-graph engines"),
        ("graphed_triton_persistent", "cuda", "the CUDA-graph engines"),
        ("pallas_persistent", "gpu", "the Pallas kernels"),
        ("cupy_graphed", "cuda", "the CUDA-graph engines"),
    ],
)
def test_kernel_engines_refuse_row_reductions_by_name(name, device, kernels):
    backend = engine.get_engine(name).backends[0]
    why = engine.get_engine(name).refusal(_case(backend, device))
    assert why is not None and why.startswith("row reductions (mean), rsqrt and split halves")
    assert f"not yet in {kernels}" in why


def test_cpu_kernels_take_reductions_and_split_halves():
    """The C++ kernels write row reductions and split halves: they run "layernorm" (where a
    compiler is found)."""
    cpu = engine.get_engine("cpu_kernels")
    for case in (_case("numpy", "cpu"), engine.Case("torch", "cpu", "float64", RMS, 16)):
        why = cpu.refusal(case)
        assert why is None or "compiler" in why, why


def test_native_refuses_and_auto_picks_the_array_code():
    assert "not 'layernorm'" in engine.get_engine("native").refusal(_case("torch", "cuda"))
    on_cpu = "cpu_kernels" if build.host_compiler() else "array"
    for backend, device, picked in [
        ("torch", "cpu", on_cpu),
        ("torch", "cuda", "array"),
        ("numpy", "cpu", on_cpu),
        ("jax", "gpu", "scan"),
        ("cupy", "cuda", "cupy_kernels"),
    ]:
        assert engine.select_engine(_case(backend, device)).engine == picked
    named = engine.select_engine(_case("torch", "cuda"), "triton_persistent")
    assert named.engine == "array"
    assert [n for n, _ in named.passed_over] == ["triton_persistent", "triton"]


def test_explain_says_why_the_array_engine_runs():
    """On the GPU (the case, no device needed) every kernel engine refuses by name."""
    choice = engine.select_engine(_case("torch", "cuda"), "graphed_triton")
    assert choice.engine == "array"
    assert "row reductions (mean)" in dict(choice.passed_over)["graphed_triton"]
    assert "row reductions (mean)" in dict(choice.passed_over)["triton"]


def test_fused_ops_run_the_array_code_for_a_reduction():
    """The CuPy backend's ops (here over NumPy, kernels evaluated by NumPy): a variant the
    CUDA C emitter does not write runs its array code, the same numbers."""
    variant = spec.VARIANTS["layernorm_peephole"]
    fused = cupy_kernels.FusedOps(ProgramKernels())
    z, c_prev, dh, dc, extra = _step_inputs(variant, np.random.default_rng(2))
    h, c, cache = fused.gates_forward(variant, z, c_prev, extra)
    want_h, want_c, want_cache = variant.gates_forward(NP_OPS, z, c_prev, extra)
    assert np.array_equal(h, want_h) and np.array_equal(c, want_c)
    dz, _, dextra = fused.gates_backward(variant, dh, dc, cache, extra)
    want_dz, _, want_extra = variant.gates_backward(NP_OPS, dh, dc, want_cache, extra)
    assert np.array_equal(dz, want_dz) and np.array_equal(dextra["gamma_c"], want_extra["gamma_c"])


def test_kernel_emitters_refuse_by_name():
    from lstm_multi.compile import emit_cuda, emit_triton

    programs = spec.VARIANTS["layernorm"].programs
    assert "LM_G 8" in emit_cpu.cpu_source(programs, "double")  # the C++ one writes it
    for make, target, what in [
        (lambda: emit_cuda.forward_kernel(programs, "x"), "CUDA C kernel emitter", "row"),
        (lambda: emit_triton.module_source(programs), "Triton kernel emitter", "row"),
    ]:
        with pytest.raises(
            NotImplementedError, match=re.escape(f"{target}: the gate math has {what}")
        ):
            make()


# parameters ---------------------------------------------------------------------------


def test_parameters_shapes_and_initial_values():
    shapes = spec.param_shapes("layernorm_peephole", 3, 5)
    assert list(shapes) == ["W", "U", "b", "p", "gamma_x", "beta_x", "gamma_h", "beta_h",
                            "gamma_c", "beta_c"]  # fmt: skip
    assert shapes["gamma_x"] == (4, 5) and shapes["gamma_c"] == (1, 5) and shapes["p"] == (3, 5)
    for scheme in lstm_multi.init.SCHEMES:
        p = lstm_multi.get_cell("numpy")(3, 5, variant="layernorm").init(seed=0, scheme=scheme)
        p = p[0][0]
        for key in ("gamma_x", "gamma_h", "gamma_c"):
            assert np.all(p[key] == 1), (scheme, key)
        for key in ("beta_x", "beta_h", "beta_c"):
            assert np.all(p[key] == 0), (scheme, key)
        assert np.any(p["W"] != 0)


def test_torch_module_starts_with_unit_gains():
    torch = pytest.importorskip("torch")
    from lstm_multi.torch import LSTM

    module = LSTM(3, 4, variant="layernorm", bidirectional=True)
    named = dict(module.named_parameters())
    assert torch.all(named["weight_gamma_x_l0_reverse"] == 1)
    assert torch.all(named["weight_beta_c_l0"] == 0)
    y, _ = module(torch.randn(2, 5, 3))
    assert y.shape == (2, 5, 8) and module.last_choice.engine in ("cpu_kernels", "array")
