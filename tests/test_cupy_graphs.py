"""CUDA-graph replay of the CuPy backend (``cuda_graphs=True``, ``cupy_graphs``).

On the CPU the CuPy cell's plumbing runs with NumPy arrays: its ops are
``FusedOps`` over ``ProgramKernels`` (the generated kernels' programs
evaluated by NumPy), and a ``doubles.EagerCapturer`` stands in for the
device graph (it replays by rerunning the captured function on the static
inputs and rewriting the static outputs in place, which is what a CUDA graph
does). So everything around the graph is tested here: the stacked tape, the
signatures, copies in and out, failures, and the cell's hooks. The real
capture (``CupyCapturer``) runs in the ``gpu`` test at the end.
"""

from __future__ import annotations

import ast
import copy
import inspect
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_close  # noqa: E402
from doubles import EagerCapturer, ProgramKernels  # noqa: E402

import lstm_multi  # noqa: E402
from lstm_multi import bptt, network, spec  # noqa: E402
from lstm_multi.backends import cupy_graphs, device_graphs  # noqa: E402
from lstm_multi.backends.cupy_kernels import FusedOps  # noqa: E402
from lstm_multi.backends.numpy_backend import ArrayModuleCell  # noqa: E402
from lstm_multi.cell import FunctionalCell  # noqa: E402


def _numpy_capturer(kind=EagerCapturer):
    """A CPU stand-in for the device graph, over NumPy arrays."""
    return kind(
        is_array=lambda x: isinstance(x, np.ndarray),
        clone=lambda x: np.array(x, order="C", copy=True),
        copy_into=np.copyto,
        leaf_signature=lambda x: (x.shape, x.dtype.str),
    )


class _FailingCapturer(EagerCapturer):
    def capture(self, thunk):
        raise RuntimeError("operation not permitted when stream is capturing")


class DeviceLikeOps(FusedOps):
    """The CuPy cell's ops over NumPy, and like CuPy's without raw host memory:
    ``kernel_direction`` then falls through to the array loop (``loop_direction``
    and ``bptt.backward_direction``), the path a cell without graphs takes on
    CuPy arrays, instead of the compiled CPU kernels."""

    def cpu_scalar(self, x):
        return None


OPS = DeviceLikeOps(ProgramKernels(), "program")


class ProgramCell(cupy_graphs.GraphedDirectionsCell, ArrayModuleCell):
    """The CuPy backend's cell with NumPy in place of CuPy, graphs captured eagerly."""

    backend = "cupy"  # the engine table's rows for the CuPy cell (cupy_graphed)
    ops = OPS

    def _to_backend(self, array, name):
        if not isinstance(array, np.ndarray):
            raise TypeError(f"{name}: expected a numpy array, got {type(array).__name__}")
        return array

    def _make_graphed_directions(self):
        return cupy_graphs.GraphedArrayDirections(_numpy_capturer())


def _cell_problem(variant, proj_size=0, seed=0, T=6, B=3, dtype="float64"):
    kw = dict(
        input_size=4,
        hidden_size=5,
        variant=variant,
        num_layers=2,
        bidirectional=True,
        batch_first=False,
        proj_size=proj_size,
    )
    direct, graphed = ProgramCell(**kw), ProgramCell(**kw, cuda_graphs=True)
    params = direct.init(seed, dtype)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, B, 4)).astype(dtype)
    state = tuple(rng.normal(size=s).astype(dtype) for s in direct.state_shapes(B))
    lengths = np.array([T, T - 2, 1][:B])
    return direct, graphed, params, x, state, lengths


def _outputs(cell, params, x, state, lengths, seed=1, key=None):
    """Forward outputs, then every gradient of a fixed weighting of them (flat list);
    ``key``: the call's ``dropout_key``."""
    y, (h_n, c_n) = cell(params, x, state, lengths, dropout_key=key)
    rng = np.random.default_rng(seed)
    dy, dh_n, dc_n = (rng.normal(size=a.shape).astype(a.dtype) for a in (y, h_n, c_n))
    grads, dx, (dh0, dc0) = cell.vjp(params, x, dy, state, lengths, dh_n, dc_n, dropout_key=key)
    flat = [g[k] for layer in grads for g in layer for k in sorted(g)]
    return [y, h_n, c_n, dx, dh0, dc0, *flat]


def _assert_all_equal(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "variant, proj_size",
    [
        ("lstm", 0),
        ("peephole", 0),
        ("peephole_full", 0),
        ("peephole", 3),
        ("layernorm_peephole", 0),
    ],  # fmt: skip
)
def test_graphed_cell_equals_the_cell_without_graphs(variant, proj_size):
    """Forward and vjp through replayed graphs give exactly the direct results, with
    lengths (some sequences shorter), two layers, both directions, and a projection; a
    layer-normalised variant (row reductions, split halves) is graphed too."""
    direct, graphed, params, x, state, lengths = _cell_problem(variant, proj_size)
    want = _outputs(direct, params, x, state, lengths)
    for _ in range(3):
        _assert_all_equal(_outputs(graphed, params, x, state, lengths), want)
    graphs = graphed._graphs
    # forward: layer 0 and layer 1 (other input width), with and without a tape;
    # backward: the two layers. Both directions of a layer share their graph.
    assert len(graphs.graphed_forward.graphs) == 4
    assert len(graphs.graphed_backward.graphs) == 2
    # each signature: called twice a call, run directly once, captured on its second call
    assert graphs.graphed_forward.replays == 4 * 5 and graphs.graphed_backward.replays == 2 * 5
    assert direct._graphs is None


def test_graphed_cell_without_lengths_and_in_float32():
    """Full sequences (direction 1 reads a flipped view) and float32."""
    direct, graphed, params, x, state, _ = _cell_problem("peephole", dtype="float32")
    want = _outputs(direct, params, x, state, None)
    for _ in range(3):
        _assert_all_equal(_outputs(graphed, params, x, state, None), want)
    assert graphed._graphs.graphed_backward.replays > 0


# ---------------------------------------------------------------------------
# one direction, through GraphedArrayDirections itself


def _direction_problem(variant="peephole", T=5, B=3, seed=0, proj_size=0):
    """One layer-direction's arguments: (ops, variant, p, xs, h0, c0, valid)."""
    cell = ProgramCell(3, 4, variant, proj_size=proj_size)
    p = cell.init(seed, "float64")[0][0]
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(T, B, 3))
    h_shape, c_shape = cell.state_shapes(B)
    h0, c0 = rng.normal(size=h_shape[1:]), rng.normal(size=c_shape[1:])
    lengths = np.array([T, max(T - 2, 1), 1][:B])
    valid = network.TimeLayout(OPS, T, lengths).valid
    return OPS, spec.get_variant(variant), p, xs, h0, c0, valid


def _cotangents(ys, h, c, seed=3):
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(size=a.shape) for a in (ys, h, c))


def _direct(args):
    """The ungraphed forward (with tape) and backward of one direction."""
    ops, variant, p, xs, h0, c0, valid = args
    ys, h, c, tape = network.loop_direction(ops, variant, p, xs, h0, c0, valid, True)
    dys, dh, dc = _cotangents(ys, h, c)
    grads, dxs, dh0, dc0 = bptt.backward_direction(ops, variant, p, tape, dys, dh, dc, valid)
    return [ys, h, c, dxs, dh0, dc0, *(grads[k] for k in sorted(grads))]


def _graphed(directions, args):
    ops, variant, p, xs, h0, c0, valid = args
    ys, h, c, tape = directions.run_direction(ops, variant, p, xs, h0, c0, valid, record=True)
    assert isinstance(tape, cupy_graphs.StackedTape) and tape.xs is xs
    dys, dh, dc = _cotangents(ys, h, c)
    grads, dxs, dh0, dc0 = directions.backward_direction(ops, variant, p, tape, dys, dh, dc, valid)
    return [ys, h, c, dxs, dh0, dc0, *(grads[k] for k in sorted(grads))]


def test_the_graph_is_captured_on_the_second_call_and_replayed_after():
    capturer = _numpy_capturer()
    directions = cupy_graphs.GraphedArrayDirections(capturer)
    forward, backward = directions.graphed_forward, directions.graphed_backward
    args = _direction_problem()
    want = _direct(args)
    counts = []
    for _ in range(3):
        _assert_all_equal(_graphed(directions, args), want)
        counts.append((capturer.captures, forward.replays, backward.replays))
    # call 1 runs directly, call 2 captures (forward and backward) and replays, call 3 replays
    assert counts == [(0, 0, 0), (2, 1, 1), (2, 2, 2)]


def test_a_new_shape_captures_a_new_graph():
    capturer = _numpy_capturer()
    directions = cupy_graphs.GraphedArrayDirections(capturer)
    for T in (5, 5, 7, 7, 7):
        args = _direction_problem(T=T)
        _assert_all_equal(_graphed(directions, args), _direct(args))
    assert capturer.captures == 4  # forward and backward, for each of the two shapes
    assert len(directions.graphed_forward.graphs) == len(directions.graphed_backward.graphs) == 2
    assert directions.graphed_forward.replays == 3


def test_consecutive_results_do_not_alias():
    """A replay returns copies: what one call returned (its tape included) is unchanged
    by the next call with other inputs, and its backward still gives its own gradients."""
    directions = cupy_graphs.GraphedArrayDirections(_numpy_capturer())
    first, second = _direction_problem(seed=0), _direction_problem(seed=1)
    for _ in range(2):
        _graphed(directions, first)  # run directly, then capture
    ops, variant, p, xs, h0, c0, valid = first
    out1 = directions.run_direction(ops, variant, p, xs, h0, c0, valid, record=True)
    kept = [a.copy() for a in (*out1[:3], out1[3].rs, *out1[3].fields)]
    out2 = directions.run_direction(*second, record=True)
    for a, b, k in zip(
        (*out1[:3], out1[3].rs, *out1[3].fields),
        (*out2[:3], out2[3].rs, *out2[3].fields),
        kept,
        strict=True,
    ):
        assert not np.shares_memory(a, b)
        np.testing.assert_array_equal(a, k)
    assert not np.array_equal(out1[0], out2[0])
    # the first tape's backward, after the second forward, is the first problem's
    ys, h, c, tape = out1
    dys, dh, dc = _cotangents(ys, h, c)
    grads, dxs, dh0, dc0 = directions.backward_direction(ops, variant, p, tape, dys, dh, dc, valid)
    got = [ys, h, c, dxs, dh0, dc0, *(grads[k] for k in sorted(grads))]
    _assert_all_equal(got, _direct(first))
    assert directions.graphed_forward.replays >= 3


def test_projection_and_full_sequences_through_one_direction():
    for args in (
        _direction_problem("peephole_full", proj_size=2),
        _direction_problem("lstm")[:-1] + (None,),  # valid None: every sequence full
    ):
        directions = cupy_graphs.GraphedArrayDirections(_numpy_capturer())
        want = _direct(args)
        for _ in range(3):
            _assert_all_equal(_graphed(directions, args), want)
        assert directions.graphed_backward.replays == 2


def test_forward_without_a_tape_returns_none():
    directions = cupy_graphs.GraphedArrayDirections(_numpy_capturer())
    args = _direction_problem()
    want = network.loop_direction(*args, record=False)
    for _ in range(3):
        ys, h, c, tape = directions.run_direction(*args)
        assert tape is None
        _assert_all_equal([ys, h, c], list(want[:3]))
    assert directions.graphed_forward.replays == 2


def test_a_tape_from_elsewhere_is_walked_back_without_a_graph():
    directions = cupy_graphs.GraphedArrayDirections(_numpy_capturer())
    ops, variant, p, xs, h0, c0, valid = _direction_problem()
    ys, h, c, tape = network.loop_direction(ops, variant, p, xs, h0, c0, valid, True)
    dys, dh, dc = _cotangents(ys, h, c)
    got = directions.backward_direction(ops, variant, p, tape, dys, dh, dc, valid)
    want = bptt.backward_direction(ops, variant, p, tape, dys, dh, dc, valid)
    _assert_all_equal([*got[1:], *got[0].values()], [*want[1:], *want[0].values()])
    assert directions.graphed_backward.replays == 0


def test_a_failed_capture_warns_once_and_runs_directly():
    capturer = _numpy_capturer(_FailingCapturer)
    directions = cupy_graphs.GraphedArrayDirections(capturer)
    args = _direction_problem()
    want = _direct(args)
    _assert_all_equal(_graphed(directions, args), want)  # direct: nothing captured yet
    with pytest.warns(RuntimeWarning, match="capturing a device graph failed") as record:
        _assert_all_equal(_graphed(directions, args), want)
    assert len(record) == 2  # once for the forward, once for the backward
    assert all("operation not permitted" in str(w.message) for w in record)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            _assert_all_equal(_graphed(directions, args), want)
    assert len(directions.graphed_forward.failures) == 1
    assert directions.graphed_forward.replays == directions.graphed_backward.replays == 0


# ---------------------------------------------------------------------------
# what a training loop relies on


def _graphed_cell_class(make_capturer=_numpy_capturer):
    class Graphed(ProgramCell):
        def _make_graphed_directions(self):
            return cupy_graphs.GraphedArrayDirections(make_capturer())

    return Graphed


def _train_against_direct(make_capturer=_numpy_capturer, steps=4, lr=0.1):
    """A training loop through the graphed cell beside the cell without graphs: fresh
    inputs, lengths, initial states and cotangents at every step, parameters updated in
    place (SGD) between steps; outputs and every gradient equal at every step, and the
    graphed cell replayed. Returns its ``graph_stats()``."""
    kw = dict(input_size=4, hidden_size=5, variant="peephole", num_layers=2,
              bidirectional=True, batch_first=False)  # fmt: skip
    direct, graphed = ProgramCell(**kw), _graphed_cell_class(make_capturer)(**kw, cuda_graphs=True)
    params = direct.init(0, "float64")
    twins = {id(graphed): params, id(direct): copy.deepcopy(params)}
    rng = np.random.default_rng(1)
    for step in range(steps):
        x = rng.normal(size=(6, 3, 4))
        lengths = np.array([6, rng.integers(1, 6), rng.integers(1, 7)])
        state = tuple(rng.normal(size=s) for s in direct.state_shapes(3))
        dy, dh_n, dc_n = (rng.normal(size=s) for s in ((6, 3, 10), *direct.state_shapes(3)))
        results = []
        for cell in (graphed, direct):
            p = twins[id(cell)]
            y, (h_n, c_n) = cell(p, x, state, lengths)
            grads, dx, (dh0, dc0) = cell.vjp(p, x, dy, state, lengths, dh_n, dc_n)
            flat = [g[k] for layer in grads for g in layer for k in sorted(g)]
            results.append([y, h_n, c_n, dx, dh0, dc0, *flat])
            for layer, layer_grads in zip(p, grads, strict=True):
                for direction, direction_grads in zip(layer, layer_grads, strict=True):
                    for k, g in direction_grads.items():
                        direction[k] -= lr * g  # in place: the arrays the graph copies from
        for a, b in zip(*results, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"step {step}")
    stats = graphed.graph_stats()
    # a step: the call's forward, the vjp's forward with a tape and its backward, each over
    # 2 layers x 2 directions and 2 signatures (the layers' input widths): at step 1 each
    # direction 0 runs directly and each direction 1 captures; every later call replays
    assert stats["replays"] == 12 * steps - 6, stats
    assert (stats["captures"], stats["direct_calls"], stats["graphs"]) == (6, 6, 6), stats
    return stats


def test_a_training_loop_replays_fresh_inputs_and_updated_parameters():
    _train_against_direct()


def test_a_stale_replay_fails_the_training_loop():
    """Mutation: a capturer that does not copy the call's arrays into the graph replays
    the captured inputs and parameters; the loop's comparison catches it."""

    def stale():
        capturer = _numpy_capturer()
        capturer.copy_into = lambda dst, src: None
        return capturer

    with pytest.raises(AssertionError, match="step 1"):
        _train_against_direct(stale)


def test_a_silent_direct_run_fails_the_training_loop():
    """Mutation: graphs that are never replayed give right numbers; the count catches it."""

    class NeverReplays(EagerCapturer):
        def capturing(self):
            return True

    with pytest.raises(AssertionError, match="'replays': 0"):
        _train_against_direct(lambda: _numpy_capturer(NeverReplays))


def test_the_cell_reads_and_frees_its_graphs():
    direct, graphed, params, x, state, lengths = _cell_problem("peephole")
    assert direct.graph_stats() == graphed.graph_stats() == device_graphs.empty_stats()
    for _ in range(2):
        _outputs(graphed, params, x, state, lengths)
    stats = graphed.graph_stats()
    assert stats["graphs"] == 6 and stats["replays"] > 0 and stats["failed_captures"] == 0
    graphed.free_graphs()
    assert graphed.graph_stats()["graphs"] == 0
    _assert_all_equal(
        _outputs(graphed, params, x, state, lengths), _outputs(direct, params, x, state, lengths)
    )
    assert graphed.graph_stats()["captures"] == stats["captures"] + 6
    direct.free_graphs()  # nothing to free


def test_varying_lengths_stop_capturing_with_one_warning_for_both_ways():
    capturer = _numpy_capturer()
    directions = cupy_graphs.GraphedArrayDirections(capturer, max_graphs=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for steps in range(1, 11):
            args = _direction_problem(T=steps)
            for _ in range(2):
                _assert_all_equal(_graphed(directions, args), _direct(args))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "max_graphs=3" in messages[0], messages
    assert capturer.captures == 6 and directions.stats()["graphs"] == 6


def test_out_of_memory_in_a_capture_is_raised():
    class OutOfMemory(EagerCapturer):
        def capture(self, thunk):
            raise MemoryError("Out of memory allocating 1073741824 bytes")

    directions = cupy_graphs.GraphedArrayDirections(_numpy_capturer(OutOfMemory))
    args = _direction_problem()
    _graphed(directions, args)  # direct
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(MemoryError, match="Out of memory"):
            _graphed(directions, args)
    assert directions.stats()["failed_captures"] == 0


def test_the_cupy_capturer_raises_cupys_out_of_memory_errors():
    cupy = pytest.importorskip("cupy")
    from cupy_backends.cuda.api.runtime import CUDARuntimeError

    capturer = cupy_graphs.CupyCapturer()
    assert capturer.is_out_of_memory(cupy.cuda.memory.OutOfMemoryError(1 << 30, 0))
    assert capturer.is_out_of_memory(CUDARuntimeError(2))  # cudaErrorMemoryAllocation
    assert not capturer.is_out_of_memory(RuntimeError("operation not permitted when capturing"))
    # arrays of no device: no device guard
    with capturer.on_device([np.zeros(2), 1]):
        pass


# ---------------------------------------------------------------------------
# the cell's argument


def _cupy_backend():
    pytest.importorskip("cupy", reason="the CuPy backend needs cupy (pip install cupy-cuda12x)")
    from lstm_multi.backends import cupy_backend

    return cupy_backend


# ---------------------------------------------------------------------------
# zoneout, recurrent and input dropout, DropConnect: the NumPy backend's loop on the CuPy ops

REGULARIZERS = dict(zoneout=(0.3, 0.2), recurrent_dropout=0.3, input_dropout=0.2, dropconnect=0.25)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_regularized_calls_are_the_numpy_cells(cuda_graphs):
    """The CuPy cell's plumbing (``FusedOps``: the generated gate kernels, here their
    programs on NumPy) runs ``regularize``'s loop and hand-written backward: training
    (masks from the key, the NumPy cell's draws) and evaluation (zoneout's expectation),
    forward and vjp, equal the NumPy cell's ("array"), lengths, two layers, both
    directions; on ``cupy_kernels`` (the graphed engine refuses such a call, and a cell
    with graphs runs it directly, capturing nothing)."""
    kw = dict(num_layers=2, bidirectional=True, batch_first=False, **REGULARIZERS)
    cell = ProgramCell(4, 5, "peephole", cuda_graphs=cuda_graphs, **kw)
    reference = lstm_multi.get_cell("numpy")(4, 5, "peephole", engine="array", **kw)
    params = cell.init(0, "float64")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 4))
    state = tuple(rng.normal(size=s) for s in cell.state_shapes(3))
    lengths = np.array([6, 4, 1])
    for key in (7, None):
        got = _outputs(cell, params, x, state, lengths, key=key)
        want = _outputs(reference, params, x, state, lengths, key=key)
        for k, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_close(a, b, "float64", f"output {k} with key {key}")
        assert cell.last_choice.engine == "cupy_kernels"
    if cuda_graphs:
        (passed,) = cell.explain(x, dropout_key=7).passed_over
        assert passed[0] == "cupy_graphed" and "zoneout" in passed[1]
    other = cell(params, x, state, lengths, dropout_key=8)[0]
    assert not np.allclose(other, cell(params, x, state, lengths, dropout_key=7)[0])
    assert cell.graph_stats()["captures"] == 0


def test_the_cupy_cell_takes_every_functional_cell_keyword():
    """The CuPy ``Cell`` spells out its constructor: every keyword of ``FunctionalCell``
    (the regularizers included) must be there and reach it (read from the source, so
    that it is checked without CuPy; ``test_the_cupy_cell_takes_cuda_graphs`` builds one
    where CuPy imports)."""
    source = (Path(lstm_multi.__file__).parent / "backends" / "cupy_backend.py").read_text()
    (init,) = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef) and node.name == "__init__"
    ]
    taken = {a.arg for a in init.args.args + init.args.kwonlyargs}
    wanted = set(inspect.signature(FunctionalCell.__init__).parameters)
    assert wanted <= taken, sorted(wanted - taken)
    (call,) = [
        node
        for node in ast.walk(init)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "__init__"
    ]
    passed = {k.arg for k in call.keywords} | {a.id for a in call.args}
    assert wanted - {"self"} <= passed, sorted(wanted - {"self"} - passed)


def test_cuda_graphs_must_be_a_bool():
    for value in ("yes", 1, None):
        with pytest.raises(TypeError, match="cuda_graphs: expected True or False"):
            ProgramCell(3, 4, cuda_graphs=value)


def test_the_cupy_cell_takes_cuda_graphs():
    cupy_backend = _cupy_backend()
    for value in ("yes", 1, None):
        with pytest.raises(TypeError, match="cuda_graphs: expected True or False"):
            cupy_backend.Cell(3, 4, cuda_graphs=value)
    # building the graph cache touches no device (the first capture does)
    cell = cupy_backend.Cell(3, 4, cuda_graphs=True)
    assert cell.cuda_graphs is True
    assert isinstance(cell._graphs.graphed_forward.capturer, cupy_graphs.CupyCapturer)
    assert cupy_backend.Cell(3, 4).cuda_graphs is False
    rates = dict(zoneout=(0.2, 0.1), recurrent_dropout=0.1, input_dropout=0.3, dropconnect=0.4)
    regularized = cupy_backend.Cell(3, 4, **rates)
    assert {name: getattr(regularized, name) for name in rates} == rates
    with pytest.raises(ValueError, match="recurrent_dropout"):
        cupy_backend.Cell(3, 4, recurrent_dropout=1.0)
    assert "cuda_graphs=True" in cupy_backend.Cell.__doc__


# ---------------------------------------------------------------------------
# on a GPU: the real capture


@pytest.mark.gpu
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("variant, proj_size", [("lstm", 0), ("peephole", 0), ("peephole", 3)])
def test_cuda_graphs_on_the_gpu_equal_direct_calls(variant, proj_size):
    """CuPy's stream capture: four calls with fresh inputs, the parameters updated in
    place between them, equal the same cell without graphs (the same kernels: equal up
    to the products' nondeterminism), forward and every gradient, in float32; and they
    were replayed, not run directly (the replays counted)."""
    cupy_backend = _cupy_backend()
    reason = cupy_backend.unavailable_reason()
    if reason is not None:
        pytest.skip(f"cupy: {reason}")
    import cupy

    kw = dict(
        input_size=4,
        hidden_size=8,
        variant=variant,
        num_layers=2,
        bidirectional=True,
        batch_first=False,
        proj_size=proj_size,
    )
    direct = cupy_backend.Cell(**kw)
    graphed = cupy_backend.Cell(**kw, cuda_graphs=True)
    params = direct.init(0, "float32")
    rng = np.random.default_rng(0)
    lengths = np.array([9, 3, 6, 1])
    for call in range(4):  # fresh inputs every call; parameters updated in place between
        x = cupy.asarray(rng.normal(size=(9, 4, 4)).astype(np.float32))
        state = tuple(
            cupy.asarray(rng.normal(size=s).astype(np.float32)) for s in direct.state_shapes(4)
        )
        want = [cupy.asnumpy(a) for a in _outputs(direct, params, x, state, lengths, seed=call)]
        got = [cupy.asnumpy(a) for a in _outputs(graphed, params, x, state, lengths, seed=call)]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f"call {call}")
        for layer in params:
            for p in layer:
                for k in p:
                    p[k] *= 0.99  # in place: the arrays the graphs copy from
    stats = graphed.graph_stats()
    assert stats["failed_captures"] == 0, stats
    # per call 3 functions (forward, forward with a tape, backward) x 4 directions over 2
    # signatures each: at the first call 2 direct and 2 captured and replayed each
    assert stats["replays"] == 12 * 4 - 6, stats
