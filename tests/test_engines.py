"""The engine table (``lstm_multi.engines``): one rule picks what runs each direction,
every engine name runs (or falls back, saying why) or is refused with a clear error, and
each cell reports which engine ran.

Every engine's numbers are checked against the independent oracle here, on the CPU:
the Triton engines under Triton's interpreter, Pallas under Pallas's; the graphed and
CuPy engines need a CUDA device (tests/test_gpu.py), and here their fallback is checked.
"""

from __future__ import annotations

import inspect
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from oracle import oracle

import lstm_multi
from lstm_multi import engine as engines
from lstm_multi import spec
from lstm_multi.kernels import build

torch = pytest.importorskip("torch")

SIZES = dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)


def _available(backend):
    return backend in lstm_multi.available_backends()


def _problem(dtype="float64"):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 5, 3)).astype(dtype)
    dy = rng.standard_normal((3, 5, 8)).astype(dtype)
    return x, dy, np.array([5, 2, 4])


def _want(backend, variant):
    """The oracle's y and dx (batch-first) for ``_run``'s problem."""
    cell = lstm_multi.get_cell(backend)(**SIZES, variant=variant)
    params = cell.to_numpy(cell.init(seed=3, dtype="float64"))
    x, dy, lengths = _problem()
    h_shape, c_shape = cell.state_shapes(x.shape[0])
    h0, c0 = np.zeros(h_shape), np.zeros(c_shape)
    out = oracle(
        variant, params, x.transpose(1, 0, 2), h0, c0, lengths, dy.transpose(1, 0, 2), h0, c0
    )
    return out["y"].transpose(1, 0, 2), out["dx"].transpose(1, 0, 2)


def _run(backend, engine, variant, dtype="float64"):
    """(cell, y, dx) for ``engine`` on ``backend``, batch-first, as NumPy."""
    cell = lstm_multi.get_cell(backend)(**SIZES, variant=variant, engine=engine)
    params = cell.init(seed=3, dtype=dtype)
    x, dy, lengths = _problem(dtype)
    if backend == "torch":
        x, dy, lengths = torch.from_numpy(x), torch.from_numpy(dy), torch.from_numpy(lengths)
    y, _ = cell(params, x, lengths=lengths)
    _, dx, _ = cell.vjp(params, x, dy, lengths=lengths)
    return cell, np.asarray(cell.ops.to_numpy(y)), np.asarray(cell.ops.to_numpy(dx))


# the table ------------------------------------------------------------------------------


def test_every_engine_is_well_formed():
    names = [e.name for e in engines.engines()]
    assert len(names) == len(set(names))
    known = set(lstm_multi.known_backends())
    for engine in engines.engines():
        assert set(engine.backends) <= known, engine.name
        assert engine.summary and engine.limits and engine.auto_note
        # the fallback chain ends at auto or at an engine that never refuses
        seen, name = set(), engine.name
        while name not in (None, engines.AUTO):
            assert name not in seen, f"{engine.name}: fallback cycle"
            seen.add(name)
            nxt = engines.get_engine(name)
            assert set(engine.backends) <= set(nxt.backends)
            name = nxt.fallback
    for (backend, _), order in engines.AUTO_ORDER.items():
        for name in order:
            assert backend in engines.get_engine(name).backends
        assert engines.get_engine(order[-1]).fallback is None  # the last runs every case


def test_engine_table_lists_every_engine():
    table = engines.engine_table()
    for name in engines.engine_names():
        if name != engines.AUTO:
            assert f"`{name}`" in table
    assert lstm_multi.engines() == engines.engines()
    assert lstm_multi.engine_table() == table


def test_docs_engine_table_is_the_library_table():
    page = (Path(__file__).resolve().parents[1] / "docs" / "engines.md").read_text()
    assert engines.engine_table() in page, "docs/engines.md's engine table: paste engine_table()"


def test_unknown_and_foreign_engine_names_are_refused():
    Cell = lstm_multi.get_cell("numpy")
    with pytest.raises(ValueError, match=r"engine: expected one of \['auto', .*got 'fast'"):
        Cell(3, 4, engine="fast")
    with pytest.raises(ValueError, match="engine: 'scan' runs on the jax backend, not 'numpy'"):
        Cell(3, 4, engine="scan")
    with pytest.raises(ValueError, match="engine: expected one of"):
        Cell(3, 4, engine=None)


def test_select_engine_falls_back_and_says_why():
    case = engines.Case("torch", "cpu", "float32", spec.get_variant("peephole"), 128)
    choice = engines.select_engine(case, "triton_persistent")
    assert choice.engine in ("array", "triton")  # triton only under TRITON_INTERPRET=1
    assert choice.passed_over[0][0] == "triton_persistent"
    assert choice.requested == "triton_persistent"
    assert "triton_persistent" in str(choice)
    native = engines.select_engine(case, "native")
    assert native.engine == "cpu_kernels" or native.engine == "array"
    assert "plain 'lstm' math" in dict(native.passed_over)["native"]


def test_auto_follows_the_table_order():
    lstm = spec.get_variant("lstm")
    for (backend, device), order in engines.AUTO_ORDER.items():
        case = engines.Case(backend, device, "float32", lstm, 8)
        choice = engines.select_engine(case)
        first = next(n for n in order if engines.get_engine(n).refusal(case) is None)
        assert choice.engine == first, (backend, device)


def test_no_compiler_means_the_array_engine(monkeypatch):
    monkeypatch.setattr(build, "host_compiler", lambda: None)
    cell = lstm_multi.get_cell("numpy")(3, 4, "peephole")
    choice = cell.explain(np.zeros((2, 5, 3), np.float32))
    assert choice.engine == "array"
    assert "C++ compiler" in dict(choice.passed_over)["cpu_kernels"]


def test_half_precision_is_not_the_cpu_kernels():
    choice = lstm_multi.get_cell("numpy")(3, 4).explain(np.zeros((2, 5, 3), np.float16))
    assert choice.engine == "array"
    assert "float16" in dict(choice.passed_over)["cpu_kernels"]


# every name runs, on the oracle's numbers -----------------------------------------------


def _cases():
    for backend in ("numpy", "torch", "jax"):
        for name in engines.engine_names(backend):
            yield backend, name


@pytest.mark.parametrize(("backend", "engine"), list(_cases()))
def test_every_engine_name_runs_and_matches_the_oracle(backend, engine, monkeypatch):
    """Each engine named on each CPU backend runs, or falls back along its chain with the
    reason in ``last_choice``; the numbers are the oracle's either way."""
    if not _available(backend):
        pytest.skip(f"backend {backend} is not available here")
    if engine in ("triton", "triton_persistent", "graphed_triton", "graphed_triton_persistent"):
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    if engine == "pallas_persistent":
        pytest.importorskip("jax.experimental.pallas")

    # the Triton and Pallas kernels compute in float32 (float64 falls back): check them there
    single = "triton" in engine or engine == "pallas_persistent"
    dtype, tolerance = ("float32", 1e-5) if single else ("float64", 1e-12)
    if backend == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            pytest.skip("needs JAX's 64-bit mode")
    variant = "lstm" if engine == "native" else "peephole"
    if engine.startswith("graphed_"):
        with pytest.warns(UserWarning, match="has no effect on cpu tensors"):
            cell, y, dx = _run(backend, engine, variant, dtype)
    else:
        cell, y, dx = _run(backend, engine, variant, dtype)
    choice = cell.last_choice
    assert isinstance(choice, engines.Choice)
    assert choice.requested == engine
    if engine != engines.AUTO and choice.engine != engine:
        # it fell back along its chain, and says why: only where it cannot run here
        assert choice.passed_over and choice.passed_over[0][0] == engine
        assert engine.startswith("graphed_"), choice
    y_want, dx_want = _want(backend, variant)
    for got, want in ((y, y_want), (dx, dx_want)):
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(got - want).max() / scale < tolerance, (engine, choice)


def test_the_chosen_engine_is_what_ran(monkeypatch):
    """engine="array" never reaches the CPU kernels; "cpu_kernels" does (a spy on the
    kernels' lookup), on NumPy and torch."""
    from lstm_multi.backends import kernel_direction

    calls = []
    original = kernel_direction.direction_kernels

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel_direction, "direction_kernels", spy)
    x = np.random.default_rng(0).standard_normal((2, 4, 3))
    for backend, array in (("numpy", x), ("torch", torch.from_numpy(x))):
        Cell = lstm_multi.get_cell(backend)
        for engine, reaches in (("array", False), ("cpu_kernels", True)):
            calls.clear()
            cell = Cell(3, 4, "peephole", engine=engine)
            cell(cell.init(0, "float64"), array)
            assert cell.last_choice.engine == engine
            assert bool(calls) == reaches, (backend, engine)


def test_explain_matches_what_a_call_runs():
    cell = lstm_multi.get_cell("torch")(3, 4, "lstm")
    x = torch.zeros(2, 5, 3)
    choice = cell.explain(x)
    assert cell.last_choice is None  # explain runs nothing
    cell(cell.init(0), x)
    assert cell.last_choice == choice


# torch: native, the older spellings, transforms -----------------------------------------


def test_torch_native_option_and_engine():
    Cell = lstm_multi.get_cell("torch")
    x = torch.zeros(2, 5, 3)
    assert Cell(3, 4, native=True).explain(x).engine == "native"
    assert Cell(3, 4, native=False).explain(x).engine != "native"
    assert Cell(3, 4, engine="native").explain(x).engine == "native"
    # native=True asks for PyTorch's kernel only where it computes the variant
    assert Cell(3, 4, "peephole", native=True).explain(x).engine == "cpu_kernels"
    with pytest.raises(ValueError, match="native: False contradicts engine='native'"):
        Cell(3, 4, native=False, engine="native")
    with pytest.raises(TypeError, match="native: expected True, False or None, got 'yes'"):
        Cell(3, 4, native="yes")


def test_torch_older_spellings_name_engines():
    Cell = lstm_multi.get_cell("torch")
    assert Cell(3, 4, gate_kernel="array").engine == "array"
    assert Cell(3, 4, cuda_graphs=True).engine == "graphed_array"
    if pytest.importorskip("importlib").util.find_spec("triton") is not None:
        assert Cell(3, 4, gate_kernel="triton", cuda_graphs=True).engine == "graphed_triton"
    with pytest.raises(ValueError, match="engine: 'array' and gate_kernel='array'"):
        Cell(3, 4, engine="array", gate_kernel="array")


def test_dropout_masks_keep_native_out():
    cell = lstm_multi.get_cell("torch")(3, 4, num_layers=2, dropout=0.5, native=True)
    x = torch.zeros(2, 5, 3)
    assert cell.explain(x).engine == "native"
    choice = cell.explain(x, dropout_key=0)
    assert choice.engine != "native"
    assert "dropout" in dict(choice.passed_over)["native"]


def test_torch_func_runs_the_array_engine():
    cell = lstm_multi.get_cell("torch")(3, 4, "peephole")
    params = cell.init(0, "float64")
    x = torch.zeros(2, 5, 3, dtype=torch.float64)
    flat = params[0][0]

    def loss(W):
        p = [[{**flat, "W": W}]]
        return cell(p, x)[0].sum()

    torch.func.grad(loss)(flat["W"])
    assert cell.last_choice.engine == "array"
    assert "torch.func" in dict(cell.last_choice.passed_over)["cpu_kernels"]


def test_autocast_dtype_decides():
    cell = lstm_multi.get_cell("torch")(3, 4, "peephole")
    x = torch.zeros(2, 5, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        choice = cell.explain(x)
    assert choice.engine == "array"
    assert "bfloat16" in dict(choice.passed_over)["cpu_kernels"]


def test_drop_in_engine_and_native():
    from lstm_multi.torch import LSTM

    x = torch.zeros(5, 2, 3)
    assert LSTM(3, 4).explain(x).engine == "native"
    assert LSTM(3, 4, engine="array").explain(x).engine == "array"  # named beats native=True
    module = LSTM(3, 4, variant="peephole")
    y, _ = module(x)
    assert module.last_choice.engine == "cpu_kernels"
    assert "engine='array'" in repr(LSTM(3, 4, engine="array"))
    with pytest.raises(ValueError, match="native: False contradicts"):
        LSTM(3, 4, native=False, engine="native")
    with pytest.raises(ValueError, match="engine: 'scan' runs on the jax backend"):
        LSTM(3, 4, engine="scan")


def test_drop_in_pickled_before_engines_still_runs():
    """A module saved before ``engine`` existed (no engine attributes) runs as its options
    said."""
    from lstm_multi.torch import LSTM

    module = LSTM(3, 4, variant="peephole", gate_kernel="array")
    for key in ("engine", "_requested", "_excluded", "last_choice"):
        module.__dict__.pop(key)
    module = pickle.loads(pickle.dumps(module))
    module(torch.zeros(5, 2, 3))
    assert module.last_choice.engine == "array"


def test_jax_kernel_is_the_older_spelling():
    if not _available("jax"):
        pytest.skip("jax is not available here")
    Cell = lstm_multi.get_cell("jax")
    assert Cell(3, 4, kernel="pallas_persistent").engine == "pallas_persistent"
    with pytest.raises(ValueError, match="engine: 'scan' and kernel='pallas_persistent'"):
        Cell(3, 4, engine="scan", kernel="pallas_persistent")


# signatures -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_cell_classes_show_their_real_signatures(backend):
    if not _available(backend):
        pytest.skip(f"backend {backend} is not available here")
    parameters = inspect.signature(lstm_multi.get_cell(backend)).parameters
    assert list(parameters)[:3] == ["input_size", "hidden_size", "variant"]
    assert "engine" in parameters
    assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters.values()), (
        parameters
    )
    assert re.search(r"engine", lstm_multi.get_cell(backend).__doc__ or "")
