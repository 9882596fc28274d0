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
* CuPy's CUDA C row kernels compiled on the host (each pass's threads one after
  another) against the programs, at several block sizes, and their power (a wrong mean,
  a tree missing a level); the whole networks against the oracle are in test_gpu.py;
* the engine table: the C++, CUDA C, Triton and Pallas engines take such a variant, the
  one that does not (``graphed_array``) refuses naming what it lacks, "auto" picks the
  array engine on the GPU (scan on JAX) and says why (the Triton engines on the oracle:
  tests/test_triton.py, and here under --thorough; Pallas's: tests/test_pallas.py);
* the parameters: names, shapes, gains 1 and shifts 0 under every scheme.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
from conftest import assert_close, to_numpy
from doubles import ProgramKernels
from reference import Config, batch_layout, make_problem, reference
from test_agreement import (
    assert_gradients_match,
    assert_matches_reference,
    assert_outputs_match,
    run_cell,
)

import lstm_multi
from lstm_multi import Variant, engine, sigmoid, spec, tanh
from lstm_multi.backends import cupy_kernels, kernel_direction
from lstm_multi.compile import derive, emit_array, emit_cpu, emit_cuda, evaluate, trace
from lstm_multi.compile.trace import mean, rsqrt
from lstm_multi.kernels import build
from lstm_multi.kernels.host_kernels import HostKernels
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


def split_lstm(zx, zr, c_prev, b):
    """The plain LSTM written with split halves and no reduction (the element kernels)."""
    i, f, o = (sigmoid(x + r + bb) for x, r, bb in ((zx.i, zr.i, b.i), (zx.f, zr.f, b.f),
                                                    (zx.o, zr.o, b.o)))  # fmt: skip
    c = f * c_prev + i * tanh(zx.g + zr.g + b.g)
    return o * tanh(c), c


SPLIT = Variant("split_lstm", split_lstm, halves="split")


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
    again in the loops after it (emit_cpu._row_loops; benchmarks/NOTES.md section 23):
    three sigmoids and two tanh, as a plain LSTM's row."""
    source = emit_cpu.cpu_source(spec.VARIANTS[variant].programs, "float")
    forward = source[source.index("lm_forward_row(") : source.index("lm_backward_row(")]
    assert forward.count("#pragma omp simd") == 5
    assert forward.count("lm_sigmoid(") == 3 and forward.count("lm_tanh(") == 2
    assert "lm_row_scratch(" in forward


def test_user_reduction_variant_passes_check_variant():
    """Traced, derived and checked: finite differences of one step and of a network, the
    array loop, the C++ kernels, the CUDA C row kernels on the host and the Triton kernels
    (interpreted), which all write reductions, and torch against NumPy."""
    report = lstm_multi.testing.check_variant(RMS, backends=["numpy", "torch"])
    status = {r.name: r for r in report.results}
    assert status["gates"].status == status["network"].status == "passed"
    assert status["array"].status == status["torch"].status == "passed"
    for name in ("cpu", "kernels"):
        assert status[name].status == ("passed" if build.host_compiler() else "skipped")
    triton = importlib.util.find_spec("triton") is not None
    assert status["triton"].status == ("passed" if triton else "skipped")


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


# the CUDA C row kernels, compiled on the host ---------------------------------------


@pytest.fixture(scope="module")
def host_rows():
    """``host_rows(variant, c_type)``: the variant's CUDA C kernels compiled for the host
    (``HostKernels``, T = S = c_type), once a module (each compile takes a second)."""
    if build.host_compiler() is None:
        pytest.skip("no host C++ compiler")
    built = {}

    def make(variant, c_type="double"):
        if (variant.name, c_type) not in built:
            built[variant.name, c_type] = HostKernels(variant, c_type, c_type)
        return built[variant.name, c_type]

    return make


def _host_step(kernels, variant, threads, seed=5, reverse=False):
    """(kernel, program) pairs of one step, forward then backward from the kernel's own
    saved values, the row kernels run with ``threads`` threads a block (each pass's last
    to first with ``reverse``); the program is evaluated in float64 on the inputs rounded
    to the kernels' type."""
    kernels.threads, kernels.reverse = threads, reverse
    z, c_prev, dh, dc, extra = _step_inputs(variant, np.random.default_rng(seed))
    rounded = [np.asarray(a, kernels.T).astype(np.float64) for a in (z, c_prev, dh, dc)]
    z, c_prev, dh, dc = rounded
    extra = {k: np.asarray(v, kernels.T).astype(np.float64) for k, v in extra.items()}
    program = ProgramKernels()
    h, c, saved = program.forward(variant, z, c_prev, extra)
    k_h, k_c, k_saved = kernels.forward(z, c_prev, extra)
    dz, dc_prev, terms = program.backward(
        variant, dh, dc, tuple(a.astype(np.float64) for a in k_saved), extra
    )
    k_dz, k_dc_prev, k_terms = kernels.backward(dh, dc, k_saved, extra)
    pairs = [("h", k_h, h), ("c", k_c, c), ("dz", k_dz, dz), ("dc_prev", k_dc_prev, dc_prev)]
    pairs += [(f"saved {i}", k, a) for i, (k, a) in enumerate(zip(k_saved, saved, strict=True))]
    return pairs + [(f"d{name}", k_terms[name], terms[name]) for name in terms]


#: block sizes for H = 5: threads striding over three and two units, and the GPU's choice
#: (``emit_cuda.row_threads``: 32, most of them idle)
ROW_THREADS = (2, 4, None)


#: "layernorm" (a compile of its own) under --thorough: the default run takes the row
#: kernels' path with "layernorm_peephole", and "layernorm" through whole networks (test_gpu)
HOST_ROW_VARIANTS = [
    RMS,
    SPLIT,
    pytest.param(
        spec.VARIANTS["layernorm"],
        marks=pytest.mark.thorough_only(
            "the default run takes the row kernels' path with layernorm_peephole"
        ),
    ),
    spec.VARIANTS["layernorm_peephole"],
]


@pytest.mark.parametrize("variant", HOST_ROW_VARIANTS, ids=str)
def test_cuda_row_kernels_on_the_host_equal_the_program(host_rows, variant):
    """The CUDA C row kernels (one block a batch row; each pass's threads one after
    another, the host's reading of the barriers) against the program's evaluation in
    float64: h, c, the saved values, dz (dzx and dzr for split halves), dc_prev and every
    parameter's per-element terms (b's among them), at several block sizes; split halves
    without a reduction take the element kernels, z (B, 8H)."""
    kernels = host_rows(variant)
    assert kernels.rows == (variant is not SPLIT)
    for threads in ROW_THREADS:
        pairs = _host_step(kernels, variant, threads)
        for what, got, want in pairs:
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13,
                                       err_msg=f"{what}, {threads} threads")  # fmt: skip
        # each pass's threads last to first: the same bits (no thread reads what another
        # writes in the same pass)
        for (what, got, _), (_, again, _) in zip(
            pairs, _host_step(kernels, variant, threads, reverse=True), strict=True
        ):
            np.testing.assert_array_equal(again, got, err_msg=f"{what} reversed, {threads}")


def test_cuda_row_kernels_in_float_on_the_host(host_rows):
    """The same in float (T = S = float; float16 runs only under NVRTC)."""
    variant = spec.VARIANTS["layernorm"]
    kernels = host_rows(variant, "float")
    for threads in ROW_THREADS:
        for what, got, want in _host_step(kernels, variant, threads):
            assert got.dtype == np.float32, what
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5,
                                       err_msg=f"{what}, {threads} threads")  # fmt: skip


def test_row_threads_take_a_unit_a_thread_within_the_limits():
    """A block of the power of two at or above H (a warp at least, 1024 at most, fewer where
    registers or 48 KiB of shared memory bound it): past those a thread strides."""
    programs = spec.VARIANTS["layernorm"].programs
    kernels = (emit_cuda.forward_row_kernel(programs, "x"),
               emit_cuda.backward_row_kernel(programs, "x"))  # fmt: skip
    assert [emit_cuda.row_threads(h, kernels, 4) for h in (1, 5, 33, 128, 1024, 5000)] == [
        32, 32, 64, 128, 1024, 1024]  # fmt: skip
    assert emit_cuda.row_threads(1000, kernels, 8, max_threads=256) == 256
    wide = kernels[0]._replace(sums=40)  # 40 sums of 8 bytes: 48 KiB holds 128 threads' worth
    assert emit_cuda.row_threads(1000, [wide], 8) == 128
    assert emit_cuda.shared_bytes(wide, 128, 8) <= emit_cuda.SHARED_LIMIT
    with pytest.raises(ValueError, match="too many row means"):
        emit_cuda.row_threads(10, [wide._replace(means=7000)], 8)


def _mismatch(kernels, variant, threads, reverse=False):
    """The outputs where the host kernels differ from the program (names)."""
    pairs = _host_step(kernels, variant, threads, reverse=reverse)
    return [what for what, got, want in pairs if not np.allclose(got, want, 1e-9, 1e-9)]


@needs_compiler
def test_a_wrong_row_mean_in_the_cuda_kernels_fails(monkeypatch):
    """The host tests' power over the CUDA C: a row mean dividing by H - 1 fails them."""
    monkeypatch.setattr(emit_cuda, "_mean_of", lambda total: f"({total}) / S(H - 1)")
    kernels = HostKernels(RMS)
    assert {"h", "dz"} <= set(_mismatch(kernels, RMS, 4))


@needs_compiler
def test_a_tree_missing_a_level_fails_the_cuda_row_kernels(monkeypatch, thorough):
    """A block sum whose tree starts a level low (half the partial sums lost) passes with
    2 threads a block, where there is no level to lose, and fails with 4: why the host
    tests run several block sizes."""
    if not thorough:
        pytest.skip("runs under --thorough only: the mean's power test runs by default")
    monkeypatch.setattr(emit_cuda, "_TREE", emit_cuda._TREE.replace("lm_nt / 2", "lm_nt / 4"))
    kernels = HostKernels(RMS)
    assert _mismatch(kernels, RMS, 2) == []
    assert {"h", "dz"} <= set(_mismatch(kernels, RMS, 4))


@needs_compiler
def test_a_race_in_the_tree_fails_the_reversed_host_run(monkeypatch, thorough):
    """A tree level where threads lm_s .. 2 lm_s - 2 add too (a race: thread t - lm_s reads
    the partial thread t writes in the same pass) is right when the host runs a pass's
    threads in order, and fails run last to first: why the tests run both orders."""
    if not thorough:
        pytest.skip("runs under --thorough only: the mean's power test runs by default")
    monkeypatch.setattr(emit_cuda, "_TREE_ADDERS", "lm_t < 2 * lm_s - 1")
    kernels = HostKernels(RMS)
    assert _mismatch(kernels, RMS, 8) == []
    assert {"h", "dz"} <= set(_mismatch(kernels, RMS, 8, reverse=True))


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


#: (backend, engine): the array engines, JAX's scan, the C++ kernels and the Triton ones
#: (interpreted, float32; the default run's cases are tests/test_triton.py's)
ENGINES = [("numpy", "array"), ("numpy", "cpu_kernels"), ("torch", "array"),
           ("torch", "cpu_kernels"), ("jax", "auto"), ("torch", "triton"),
           ("torch", "triton_persistent")]  # fmt: skip
TRITON_ENGINES = ("triton", "triton_persistent")


def _run_jax(cell, config, problem):
    """``run_cell``'s float64 results for a JAX cell, from one jitted ``jax.vjp`` of its
    call (test_zoneout's ``_jax_outputs_and_gradients``, which says why), for a config
    with an initial state (the gradients of the state are taken from it)."""
    from test_zoneout import _jax_outputs_and_gradients

    params = cell.from_numpy(problem.params)
    x, dy = (batch_layout(config, a) for a in (problem.x, problem.dy))
    state = (problem.h0, problem.c0)
    cotangents = (dy, problem.dh_n, problem.dc_n)
    outputs, gradients = _jax_outputs_and_gradients(
        cell, params, x, state, cotangents, {"lengths": problem.lengths}
    )
    (y, (h_n, c_n)), (grads, dx, dh0, dc0) = to_numpy(outputs), to_numpy(gradients)
    return {"y": batch_layout(config, y), "h_n": h_n, "c_n": c_n, "grads": grads,
            "dx": batch_layout(config, dx), "dh0": dh0, "dc0": dc0}  # fmt: skip


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("variant", LAYER_NORMS)
@pytest.mark.parametrize(("backend", "engine_name"), ENGINES)
def test_layernorm_matches_the_oracle(backend, engine_name, variant, case, thorough, monkeypatch):
    """Outputs and every gradient (W, U, b, p, the gains and shifts, x, h0, c0), float64
    (the Triton kernels: float32, interpreted). JAX compiles each case (seconds, a scan
    forward and backward a layer-direction): the default run takes its path with "layers"
    of "layernorm_peephole" in one layer, both directions (the layers' plumbing is the
    network's, which numpy and torch run here in two; "layernorm" in the mask test); the
    thorough run every case as written. The Triton interpreter takes seconds a case too:
    the default run takes its path in tests/test_triton.py (smaller sizes)."""
    if backend == "jax" and (case, variant) != ("layers", "layernorm_peephole") and not thorough:
        pytest.skip("runs under --thorough only: JAX takes its path with layernorm_peephole")
    if engine_name in TRITON_ENGINES:
        if not thorough:
            pytest.skip("runs under --thorough only: tests/test_triton.py takes the path")
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    _backend(backend)
    if engine_name == "cpu_kernels" and build.host_compiler() is None:
        pytest.skip("no host C++ compiler")
    config = _config(variant, **CONFIGS[case])
    if backend == "jax" and not thorough:
        config = dataclasses.replace(config, num_layers=1)
    problem = make_problem(config)
    expected = reference(config, problem)
    dtypes = {"cpu_kernels": ("float64", "float32"), "triton": ("float32",),
              "triton_persistent": ("float32",)}.get(engine_name, ("float64",))  # fmt: skip
    for dtype in dtypes:
        cell = _cell_for(backend, config, engine=engine_name)
        if backend == "jax" and config.with_state:  # one compiled program (``_run_jax``)
            result = _run_jax(cell, config, problem)
        else:
            result = run_cell(cell, config, problem, dtype)
        # (the persistent kernels take no projection: the per-step Triton kernels run it)
        ran = "triton" if (engine_name, case) == ("triton_persistent", "projection") else None
        if engine_name != "auto":
            assert cell.last_choice.engine == (ran or engine_name)
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


def test_every_engine_but_native_takes_row_reductions_and_split_halves():
    """Every engine of the table writes (or runs the array code of) "layernorm" and a
    user's RMS norm: none refuses it for its gate math; only PyTorch's own kernel, which
    computes plain "lstm", does (the Triton engines need triton; their test follows)."""
    devices = {"cuda": "cuda", "cpu": "cpu", "gpu (interpreted on cpu)": "gpu", "any": "cpu"}
    for candidate in engine.engines():
        if candidate.name == "native" or "triton" in candidate.name:
            continue
        device = devices.get(candidate.devices.split(",")[0].split(" (")[0], "cuda")
        for backend in candidate.backends:
            for variant in (spec.VARIANTS["layernorm"], RMS):
                case = engine.Case(backend, device, candidate.dtypes[-1], variant, 16)
                why = candidate.refusal(case)
                assert why is None or "compiler" in why, (candidate.name, backend, why)


@pytest.mark.parametrize(
    "name", ["triton", "triton_persistent", "graphed_triton", "graphed_triton_persistent"]
)
def test_triton_engines_take_reductions_and_split_halves(name, monkeypatch):
    """The Triton kernels write row reductions, rsqrt and split halves: the Triton engines
    (and their graph replays) take "layernorm" and a user's RMS norm on CUDA tensors."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    triton = importlib.util.find_spec("triton") is not None
    for case in (_case("torch", "cuda"), engine.Case("torch", "cuda", "float32", RMS, 16)):
        why = engine.get_engine(name).refusal(case)
        assert (why is None) if triton else ("triton" in why), why


def test_cpu_kernels_take_reductions_and_split_halves():
    """The C++ kernels write row reductions and split halves: they run "layernorm" (where a
    compiler is found)."""
    cpu = engine.get_engine("cpu_kernels")
    for case in (_case("numpy", "cpu"), engine.Case("torch", "cpu", "float64", RMS, 16)):
        why = cpu.refusal(case)
        assert why is None or "compiler" in why, why


def test_pallas_takes_reductions_and_split_halves():
    """The Pallas kernels hold whole rows: they run "layernorm" when named (its limits
    apply as to any variant); auto stays with the scan."""
    pallas = engine.get_engine("pallas_persistent")
    for variant in (*LAYER_NORMS, RMS):
        case = engine.Case("jax", "gpu", "float32", spec.get_variant(variant), 16)
        assert pallas.refusal(case) is None
    wide = engine.Case("jax", "gpu", "float32", spec.VARIANTS["layernorm"], 65)
    assert "hidden_size up to 64" in pallas.refusal(wide)
    assert engine.select_engine(_case("jax", "gpu"), "pallas_persistent").engine == (
        "pallas_persistent"
    )


def test_cupy_engines_take_reductions_and_split_halves():
    """The CUDA C emitter writes row reductions and split halves: both CuPy engines run
    "layernorm" and a user's reduction, fused (row kernels), in every dtype they take."""
    for name in ("cupy_kernels", "cupy_graphed"):
        for dtype in ("float16", "float32", "float64"):
            for variant in (spec.VARIANTS["layernorm"], RMS):
                case = engine.Case("cupy", "cuda", dtype, variant, 16)
                assert engine.get_engine(name).refusal(case) is None, (name, dtype, variant)


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
    for name in ("graphed_array", "triton", "graphed_triton"):  # each runs it when named
        assert engine.select_engine(_case("torch", "cuda"), name).engine == name


def test_explain_says_why_the_array_engine_runs():
    """On the GPU (the case, no device needed) auto passes over PyTorch's kernel, which
    computes plain "lstm" only, and says so."""
    choice = engine.select_engine(_case("torch", "cuda"), "auto")
    assert choice.engine == "array"
    assert "not 'layernorm'" in dict(choice.passed_over)["native"]


def test_fused_ops_run_a_reduction_through_the_kernels():
    """The CuPy backend's ops (here over NumPy, kernels evaluated by NumPy): a variant with
    reductions and split halves goes through the kernels (z (B, 8H), b a gate parameter,
    its gradient (4H,) again), with the array code's numbers."""
    variant = spec.VARIANTS["layernorm_peephole"]

    class Counting(ProgramKernels):
        calls = 0

        def forward(self, *args):
            Counting.calls += 1
            return super().forward(*args)

    fused = cupy_kernels.FusedOps(Counting())
    z, c_prev, dh, dc, extra = _step_inputs(variant, np.random.default_rng(2))
    h, c, cache = fused.gates_forward(variant, z, c_prev, extra)
    assert Counting.calls == 1
    want_h, want_c, want_cache = variant.gates_forward(NP_OPS, z, c_prev, extra)
    assert_close(h, want_h, "float64", "h")
    assert_close(c, want_c, "float64", "c")
    dz, dc_prev, dextra = fused.gates_backward(variant, dh, dc, cache, extra)
    want_dz, want_dc, want_extra = variant.gates_backward(NP_OPS, dh, dc, want_cache, extra)
    assert dz.shape == z.shape and dextra["b"].shape == extra["b"].shape
    assert_close(dz, want_dz, "float64", "dz")
    assert_close(dc_prev, want_dc, "float64", "dc_prev")
    assert set(dextra) == set(want_extra)
    for name in want_extra:
        assert_close(dextra[name], want_extra[name], "float64", f"d{name}")


def test_every_kernel_emitter_writes_the_layer_norm():
    from lstm_multi.compile import emit_triton

    programs = spec.VARIANTS["layernorm"].programs
    assert "LM_G 8" in emit_cpu.cpu_source(programs, "double")  # the C++ one writes it
    assert "__syncthreads" in emit_cuda.ROW_PRELUDE  # and CUDA C, as row kernels
    assert emit_cuda.forward_row_kernel(programs, "x").means == 6
    # the Triton one too: six row means (of the three LNs) a step, forward and persistent
    assert emit_triton.forward_source(programs).count("_lm_mean(mask, H, ") == 6
    assert emit_triton.sequence_forward_source(programs).count("_lm_mean(mask, H, ") == 6
    # CUDA C's element kernels are for programs without reductions: asked, they say so
    with pytest.raises(ValueError, match="the element kernels are for programs without row"):
        emit_cuda.forward_kernel(programs, "x")


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
