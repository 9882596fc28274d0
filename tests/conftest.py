"""Shared test setup: hypothesis profiles, JAX float64, backend fixtures, tolerances.

Two runs (docs/verification.md, "The tests"; CI runs both, .ci/run):

- the default, ``python -m pytest``: every test, each property test with
  ``DEFAULT_EXAMPLES`` hypothesis examples (the "default" profile) besides the edge
  cases it pins with ``@example``;
- the thorough run, ``--thorough``: the "thorough" profile, ``THOROUGH_EXAMPLES``
  examples a property test, and what a test that takes the ``thorough`` fixture
  does only then (a heavy repetition of a path the default run goes through too).
  Property tests are marked ``property`` and those tests ``thorough``, so that CI
  runs just them a second time: ``--thorough -m "property or thorough"``.

``HYPOTHESIS_PROFILE`` still names a profile ("default", "thorough", and "ci" and
"dev", both the default's counts); ``--thorough`` wins over it.

Every JAX compilation of the run goes through JAX's persistent compilation
cache, in a directory the pytest process makes and removes at exit, shared by its
pytest-xdist workers: a program compiled once (the same cell and shapes, built
again by another test, parameter or worker) is loaded, not compiled again.
Nothing is kept between runs.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, is_hypothesis_test, settings

import lstm_multi

#: the examples a property test gets in the default run and in the thorough run
DEFAULT_EXAMPLES = 6
THOROUGH_EXAMPLES = 30
#: the count a test's own ``scaled(n)`` is written against (the former "ci" profile's)
BASE_EXAMPLES = 30

_QUIET = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("default", max_examples=DEFAULT_EXAMPLES, **_QUIET)
for _name in ("ci", "dev"):  # the former profiles' names, kept for HYPOTHESIS_PROFILE
    settings.register_profile(_name, settings.get_profile("default"))
settings.register_profile(
    "thorough",
    max_examples=THOROUGH_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def pytest_addoption(parser):
    parser.addoption(
        "--thorough",
        action="store_true",
        help=f"the thorough run: {THOROUGH_EXAMPLES} hypothesis examples a property test "
        f"(default {DEFAULT_EXAMPLES}) and the checks run only then",
    )


def pytest_configure(config):
    """Loads the profile before any test module is imported (``scaled`` reads it)."""
    global _THOROUGH
    name = os.environ.get("HYPOTHESIS_PROFILE", "default")
    if config.getoption("thorough"):
        name = "thorough"
    settings.load_profile(name)
    _THOROUGH = name == "thorough"
    if config.pluginmanager.hasplugin("xdist") and config.getoption("numprocesses", None):
        one_thread_pool_a_worker()


#: the thread pools a test process would start a thread a core in
THREAD_POOL_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def one_thread_pool_a_worker():
    """One thread in each pool (OpenMP: torch and the C++ kernels; MKL; OpenBLAS: NumPy)
    of every pytest-xdist worker, which ``-n auto`` starts a core each: a worker's torch
    with a thread a core spins its OpenMP threads on the core the other worker computes
    on (the whole run 5% slower on 2 cores). Set here, in the controller, before it
    starts the workers, which inherit it (and the subprocesses they start, unless a test
    sets its own); a test of more threads sets them itself (torch.set_num_threads, as
    test_cpu_split does). A value already in the environment is kept."""
    for name in THREAD_POOL_VARIABLES:
        os.environ.setdefault(name, "1")


_THOROUGH = False


@pytest.fixture(scope="session")
def thorough():
    """Whether this is the thorough run (``--thorough`` or HYPOTHESIS_PROFILE=thorough)."""
    return _THOROUGH


def _jax_except(*kept):
    return lambda p: p.get("backend") == "jax" and p.get("variant") not in kept


#: the parametrisations that run only under --thorough, by test name: (a rule over the
#: test's parameters, what covers their path in the default run). Mostly JAX's: each case
#: compiles a program (seconds), and the variants share one generated scan, so the default
#: run takes the JAX path with one variant there and every variant on numpy and torch
#: (every variant reaches JAX in the default run through test_compile and test_agreement).
THOROUGH_ONLY = {
    "test_half_precision_within_derived_bound": (
        lambda p: (
            _jax_except("peephole")(p) or (p["backend"] == "jax" and p["dtype"] == "bfloat16")
        ),
        "JAX takes peephole in float16; numpy and torch every variant and type",
    ),
    "test_huge_preactivations_stay_finite": (
        _jax_except("peephole"),
        "JAX takes peephole; numpy and torch every variant",
    ),
    "test_steps_equal_the_sequence_call": (
        _jax_except("peephole"),
        "JAX takes peephole; numpy and torch every variant",
    ),
    "test_example_runs_under_torchrun_and_resumes": (
        lambda p: True,
        "test_ddp_two_processes_equal_one_process takes DDP's path; this runs the example",
    ),
    "test_keras_program_on_another_backend": (
        lambda p: True,
        "the program runs on this process's Keras backend, and test_layer_keras checks the "
        "layer on the others",
    ),
    "test_keras_loaded_on_another_backend_is_refused_with_the_reason": (
        lambda p: True,
        "the Keras peer's other refusals are tested in-process; this starts Keras on torch",
    ),
    "test_load_model_needs_lstm_multi_keras_when_keras_comes_after": (
        lambda p: True,
        "test_load_model_in_a_fresh_process_after_import_lstm_multi loads in a fresh process",
    ),
    "test_a_damaged_library_is_rebuilt_never_loaded": (
        lambda p: p["damage"].__name__ != "_damage_truncated_40000",
        "the truncated library (the damage that crashed the process) takes the path",
    ),
    "test_jax_mesh_of_two_devices_equals_one_device": (
        lambda p: True,
        "test_ddp_two_processes_equal_one_process takes the data-parallel path (PyTorch's); "
        "the JAX cell under jit and shard_map is the cell the other JAX tests run",
    ),
    "test_checks_on_another_backend": (
        lambda p: p["other"] == "numpy",
        "the torch backend takes the path (Keras on a backend other than this process's, "
        "in a child process)",
    ),
    "test_backend_matches_oracle": (
        lambda p: p["backend"] == "jax" and p["dtype"] == "float32",
        "JAX runs the same program in float64 on every draw, and its float32 engines are "
        "compared with the oracle in test_engines, test_padding and test_fast_paths",
    ),
    "test_numpy_backward_matches_finite_differences": (
        lambda p: p["variant"] not in ("lstm", "peephole", "peephole_full", "cifg"),
        "the other variants' backward is the same generated code (their gradients meet the "
        "oracle's in test_agreement on every draw)",
    ),
    "test_greff_variant_matches_oracle": (
        lambda p: p["backend"] == "jax" and p["name"] != "cifg",
        "JAX runs each Greff variant's generated array code as numpy and torch do here; "
        "cifg takes JAX's path",
    ),
    "test_outputs_and_gradients_match_the_oracle_and_the_cell": (
        lambda p: p["variant"] == "cifg",
        "the Equinox layer runs the cell, whose variants test_agreement checks; lstm and "
        "peephole take the layer's path",
    ),
    "test_kernels_match_the_oracle": (
        lambda p: p["variant"] in ("nig", "nfg", "nog", "niaf", "noaf"),
        "the other Greff variants' C++ is peephole's with one gate changed; lstm, peephole, "
        "peephole_full, cifg and the layer-normalised variants take the kernels' paths",
    ),
    "test_the_layer_normalised_lstm_with_every_regularizer_agrees_with_the_oracle": (
        lambda p: p["backend"] == "jax",
        "numpy (the hand-written backward) and torch take the path; JAX differentiates the "
        "same regularized step in its scan",
    ),
    "test_backend_matches_nn_lstm": (
        lambda p: p["backend"] == "jax",
        "the JAX cell meets the oracle on every draw (test_backend_matches_oracle) and the "
        "oracle meets nn.LSTM (test_oracle_matches_nn_lstm)",
    ),
    "test_degenerate_variants_compile_and_are_checked": (
        lambda p: p["name"] not in ("c_independent_of_c_prev", "both_constant"),
        "c independent of c_prev and both outputs constant take the degenerate paths of the "
        "emitters (an unread input, an output with no operation)",
    ),
    "test_consistent_forward_and_backward_mutation_fails_the_oracle": (
        lambda p: p["backend"] == "jax",
        "the suite's power is shown on numpy and torch; JAX's cell runs the same oracle check",
    ),
    "test_backward_only_mutation_fails_the_oracle": (
        lambda p: p["backend"] == "jax",
        "the suite's power is shown on numpy and torch; JAX's cell runs the same oracle check",
    ),
    "test_projection_backward_mutation_fails_the_oracle": (
        lambda p: p["backend"] == "jax",
        "the suite's power is shown on numpy and torch; JAX's cell runs the same oracle check",
    ),
    "test_a_half_precision_cell_state_fails_the_check": (
        lambda p: p["backend"] == "jax" and p["dtype"] == "bfloat16",
        "JAX's float16 case shows the check's power; bfloat16 is the same rule",
    ),
    "test_half_precision_running_sums_fail_the_check": (
        lambda p: p["backend"] == "jax" and p["dtype"] == "bfloat16",
        "JAX's float16 case shows the check's power; bfloat16 is the same rule",
    ),
    "test_outputs_and_gradients_equal_the_oracle": (
        lambda p: p["variant"] == "nig",
        "the Flax layers run the cell, whose Greff variants test_agreement checks; lstm and "
        "peephole take the layers' path",
    ),
    "test_jax_unrolled_scan_equals_plain_scan_and_numpy": (
        lambda p: p["variant"] != "peephole",
        "the unrolled scan runs every variant's generated step alike; peephole takes it",
    ),
    "test_every_engine_name_runs_and_matches_the_oracle": (
        lambda p: p["backend"] == "jax" and p["engine"] == "pallas_persistent",
        "test_pallas compares the Pallas kernels, interpreted, with the oracle",
    ),
    "test_garbage_in_the_padding_changes_nothing": (
        lambda p: p["path"][0] == "jax" and p["path"][1].get("autodiff"),
        "the JAX cell's default (its custom VJP) takes the padding path; autodiff=True "
        "differentiates the same forward",
    ),
    "test_keras_in_float64_on_its_torch_backend": (
        lambda p: True,
        "the Keras converters' float32 tests take the same path",
    ),
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Marks the property tests ``property`` and the tests that take the ``thorough``
    fixture ``thorough`` (before ``-m`` selects by them)."""
    for item in items:
        if is_hypothesis_test(getattr(item, "obj", None)):
            item.add_marker(pytest.mark.property)
        if "thorough" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.thorough)
        rule = THOROUGH_ONLY.get(getattr(item, "originalname", item.name))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if rule is not None and rule[0](params):
            item.add_marker(pytest.mark.thorough_only(rule[1]))
        only = item.get_closest_marker("thorough_only")
        if only is not None:
            item.add_marker(pytest.mark.thorough)
            if not _THOROUGH:
                why = only.args[0] if only.args else "a repetition of a path the default covers"
                item.add_marker(pytest.mark.skip(reason=f"runs under --thorough only: {why}"))


def thorough_params(values, default, why="the default run takes the others' path with"):
    """pytest params over ``values``: those in ``default`` run in every run, the rest only
    under ``--thorough`` (skipped in the default run, saying which value covers their
    path). For parametrisations whose values all go through one path (the variants of a
    generated kernel, say), so that the default run keeps the path and the thorough run
    the product."""
    values, default = list(values), list(default)
    missing = [v for v in default if v not in values]
    if missing:
        raise ValueError(f"thorough_params: default values {missing} are not among {values}")
    shown = ", ".join(str(v) for v in default)
    mark = pytest.mark.thorough_only(f"{why} {shown}")
    return [
        v if v in default else pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=mark)
        for v in values
    ]


def pytest_report_header(config):
    run = "thorough" if _THOROUGH else "default"
    return f"lstm_multi tests: the {run} run, hypothesis max_examples={settings().max_examples}"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pytest-xdist): a worker a core, but no more than the memory holds at
    3 GiB a worker (each imports torch, JAX, Flax, Equinox and Keras: up to 2.7 GiB seen)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return cores
    return max(1, min(cores, memory // (3 << 30)))


def scaled(examples):
    """``examples`` (a test's count at ``BASE_EXAMPLES`` a test) scaled by the loaded
    profile's max_examples, at least 1: a test that needs fewer examples than the rest
    (each one slow) still gets more in the thorough run and fewer in the default."""
    return max(1, round(examples * settings().max_examples / BASE_EXAMPLES))


#: XLA compiles the tests' programs with LLVM's optimisation off (about a fifth less of
#: the JAX tests' time, which is mostly compilation; subprocesses inherit it). The numbers
#: agree to the same bounds; the benchmark and users compile at XLA's default level.
if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0"

#: the directory of the run's JAX compilation cache, for the pytest-xdist workers
_JAX_CACHE_VARIABLE = "LSTM_MULTI_TESTS_JAX_CACHE"

if importlib.util.find_spec("jax") is not None:
    import jax

    # float64 agreement needs JAX's 64-bit mode; the error without it is tested in a subprocess.
    jax.config.update("jax_enable_x64", True)
    # the persistent compilation cache, for this test run only (see the module docstring):
    # every executable is written, however small or quick, so that a second compilation
    # of the same program anywhere in the run loads it. The pytest process makes the
    # directory and removes it at exit; pytest-xdist's workers, which it starts, inherit
    # the variable and share the directory (JAX writes each entry whole, atomically)
    if os.environ.get(_JAX_CACHE_VARIABLE) is None or "PYTEST_XDIST_WORKER" not in os.environ:
        _JAX_CACHE = tempfile.mkdtemp(prefix="lstm_multi-tests-jax-cache-")
        os.environ[_JAX_CACHE_VARIABLE] = _JAX_CACHE
        atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", os.environ[_JAX_CACHE_VARIABLE])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

CPU_BACKENDS = [b for b in lstm_multi.known_backends() if b != "cupy"]


def backend_params(names=CPU_BACKENDS):
    """pytest params over backends, each skipped with the reason when it cannot run here."""
    params = []
    for name in names:
        try:
            lstm_multi.registry.load_backend(name)
            marks = ()
        except (ImportError, RuntimeError) as error:
            marks = pytest.mark.skip(reason=str(error))
        params.append(pytest.param(name, id=name, marks=marks))
    return params


@pytest.fixture(scope="session", params=backend_params())
def backend(request):
    return request.param


#: the agreement bound in units of the dtype's machine epsilon: K * eps is 2.2e-14 in
#: float64 and 1.2e-5 in float32. The suite's problems (T <= 6 steps, <= 3 layers, H <= 5,
#: so a few dozen roundings along any path, each of at most eps/2, plus the sigmoid's and
#: tanh's few ulp) show worst disagreements of ~6 eps (float64, 1.3e-15) and ~4 eps (float32,
#: 4.1e-7) relative to max(1, max|reference|); K = 100 leaves a margin of ~15-25x for the
#: error's growth with T and layers, and fails on any error of the size of a wrong term.
K_EPS = 100


def tolerance(dtype, k=K_EPS):
    """k machine epsilons of ``dtype`` (a dtype or its name)."""
    return k * float(np.finfo(np.dtype(dtype)).eps)


#: (rtol, atol relative to the reference's largest magnitude) by the dtype computed in
TOLERANCES = {name: (tolerance(name), tolerance(name)) for name in ("float64", "float32")}
#: a layer norm divides by sigma = sqrt(var + 1e-5), which reaches 3e-3, so a rounding
#: made before it can grow by 1/sigma (up to about 300) after it: a variant with row
#: reductions (``has_reductions``) is held to this many times the float64 bound (its worst
#: seen: 5e-13 relative, the layer-normalised variants with dropout masks, in float64)
LAYER_NORM_FACTOR = 100
TOLERANCES["float64 layer norm"] = tuple(LAYER_NORM_FACTOR * t for t in TOLERANCES["float64"])


def float64_key(variant):
    """The ``TOLERANCES`` key of a float64 comparison of ``variant`` (a name or Variant)."""
    reductions = lstm_multi.spec.get_variant(variant).programs.has_reductions
    return "float64 layer norm" if reductions else "float64"


#: the worst disagreement seen, |actual - expected| / max(1, max|expected|), by dtype and
#: by (label, dtype) for the comparisons that carry a label (such as "numpy/peephole")
WORST_DISAGREEMENT: dict = {}


def assert_close(actual, expected, dtype, what, label=None):
    """actual == expected within ``TOLERANCES[dtype]``, relative to max(1, max|expected|).

    The disagreement is recorded for the end-of-run summary unless ``label`` is
    False (comparisons that are meant to fail, such as the mutation checks).
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    if expected.size and label is not False:
        worst = float(np.max(np.abs(actual - expected))) / scale
        for key in (dtype,) if label is None else (dtype, (label, dtype)):
            _record_worst(key, worst)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=what)


def _record_worst(key, worst):
    WORST_DISAGREEMENT[key] = max(WORST_DISAGREEMENT.get(key, 0.0), worst)


def pytest_sessionfinish(session):
    """A pytest-xdist worker hands its worst disagreements to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["worst_disagreement"] = [
            [list(key) if isinstance(key, tuple) else key, worst]
            for key, worst in WORST_DISAGREEMENT.items()
        ]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """The pytest-xdist controller: each worker's worst disagreements, merged by key."""
    for key, worst in getattr(node, "workeroutput", {}).get("worst_disagreement", []):
        _record_worst(tuple(key) if isinstance(key, list) else key, worst)


def to_numpy(x):
    """Any backend's array (or a nested structure of them) as float64-capable NumPy."""
    if isinstance(x, (list, tuple)):
        return type(x)(to_numpy(v) for v in x)
    if isinstance(x, dict):
        return {k: to_numpy(v) for k, v in x.items()}
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    if hasattr(x, "get") and not isinstance(x, dict):  # cupy
        x = x.get()
    return np.asarray(x)


def pytest_terminal_summary(terminalreporter):
    if WORST_DISAGREEMENT:
        terminalreporter.section("agreement with the reference")
        overall = {k: v for k, v in WORST_DISAGREEMENT.items() if isinstance(k, str)}
        labelled = {k: v for k, v in WORST_DISAGREEMENT.items() if not isinstance(k, str)}
        for dtype, worst in sorted(overall.items()):
            terminalreporter.write_line(
                f"{dtype}: worst |actual - reference| / max(1, max|reference|) = {worst:.3e}"
            )
        for (label, dtype), worst in sorted(labelled.items()):
            terminalreporter.write_line(f"  {label} {dtype}: {worst:.3e}")
