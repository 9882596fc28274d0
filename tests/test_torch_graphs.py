"""CUDA-graph replay of the torch generic path (``cuda_graphs=True``).

On the CPU a ``doubles.EagerCapturer`` stands in for the device graph:
it replays by rerunning the captured function on the static inputs and
rewriting the static outputs in place, which is what a CUDA graph does, so
everything around the graph (signatures, copies in and out, the stacked
tape, autograd, failures, the cache's bound) is tested here. The real capture
runs in the ``gpu`` tests at the end.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
import warnings

import pytest

torch = pytest.importorskip("torch")

from conftest import thorough_params  # noqa: E402
from doubles import EagerCapturer  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

from lstm_multi import engine as engine_table  # noqa: E402
from lstm_multi import get_cell  # noqa: E402
from lstm_multi.backends import (  # noqa: E402
    device_graphs,  # noqa: E402
    torch_backend,
    torch_bptt,
    torch_graphs,
)
from lstm_multi.backends.device_graphs import (  # noqa: E402
    GraphedFunction,
    flatten,
    unflatten,
)
from lstm_multi.torch import LSTM  # noqa: E402


def _torch_capturer(kind=EagerCapturer):
    """The CUDA capturer's signatures, copies, context (precision settings), device guard
    and out-of-memory test, with the double's eager capture."""
    return kind.around(torch_graphs.TorchCudaCapturer())


class _FailingCapturer(EagerCapturer):
    def capture(self, thunk):
        raise RuntimeError("operation not permitted when stream is capturing")


def _graphed_runner(capturer=None, max_graphs=8):
    """A direction runner whose per-step loop is graphed on CPU tensors too."""
    capturer = capturer or _torch_capturer()
    engine = torch_graphs.GraphedLoopEngine(torch_bptt.FAST_OPS, capturer, max_graphs=max_graphs)
    engine_for = torch_graphs.graphed_engine_for(engine, applies=lambda tensors: True)
    runner = torch_bptt.direction_runner(torch_bptt.FAST_OPS, False, engine_for)
    return runner, engine


def _problem(variant="peephole", layers=2, bidirectional=True, proj_size=0, seed=0, T=6, B=3):
    cell = get_cell("torch")(
        4, 5, variant, layers, bidirectional, proj_size=proj_size, native=False
    )
    params = cell.init(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, 4, generator=g)
    h_shape, c_shape = cell.state_shapes(B)
    h0, c0 = torch.randn(h_shape, generator=g), torch.randn(c_shape, generator=g)
    lengths = torch.tensor([T, T - 2, 1][:B])
    return cell, params, x, h0, c0, lengths


def _run(cell, runner, params, x, h0, c0, lengths):
    """Outputs and every gradient of a fixed scalar of them."""
    leaves = [
        v.detach().requires_grad_(True) for layer in params for p in layer for v in p.values()
    ]
    it = iter(leaves)
    params = [[{k: next(it) for k in p} for p in layer] for layer in params]
    x, h0, c0 = (a.detach().requires_grad_(True) for a in (x, h0, c0))
    y, h_n, c_n = torch_backend.generic_forward(cell.variant, params, x, h0, c0, lengths, runner)
    weights = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    loss = (y * weights).sum() + (h_n**2).sum() + c_n.sum()
    grads = torch.autograd.grad(loss, [*leaves, x, h0, c0])
    return [t.detach() for t in (y, h_n, c_n, *grads)]


@pytest.mark.parametrize(
    "variant, proj_size",
    [
        ("lstm", 0),
        ("peephole", 0),
        ("peephole_full", 0),
        ("peephole", 3),
        ("layernorm_peephole", 3),
    ],
)
def test_replays_equal_direct_calls_bit_for_bit(variant, proj_size):
    """Forward and backward replayed from graphs give exactly the direct results, with
    lengths, two layers, both directions and projections; the third call replays."""
    cell, params, x, h0, c0, lengths = _problem(variant, proj_size=proj_size)
    direct = _run(cell, torch_bptt.array_run_direction, params, x, h0, c0, lengths)
    runner, engine = _graphed_runner()
    for _ in range(3):
        got = _run(cell, runner, params, x, h0, c0, lengths)
        for a, b in zip(got, direct, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # layer 0's two directions share a signature, layer 1's another: two graphs each way
    assert len(engine.graphed_forward.graphs) == len(engine.graphed_backward.graphs) == 2
    assert engine.graphed_forward.replays >= 2 and engine.graphed_backward.replays >= 2


def test_replayed_inputs_come_from_the_call_not_the_capture():
    """After the capture, new values of the same shape give their own results."""
    cell, params, x, h0, c0, lengths = _problem(seed=1)
    runner, engine = _graphed_runner()
    for _ in range(2):
        _run(cell, runner, params, x, h0, c0, lengths)
    other = _problem(seed=2)
    got = _run(cell, runner, *other[1:])
    want = _run(cell, torch_bptt.array_run_direction, *other[1:])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert engine.graphed_forward.replays > 0


def test_two_forwards_before_their_backwards_keep_their_own_tapes():
    """Gradient accumulation: the first forward's tape survives the second forward
    (replays return copies of the graph's outputs, not the outputs themselves)."""
    cell, params, x, h0, c0, lengths = _problem("peephole", layers=1, bidirectional=False)
    runner, _ = _graphed_runner()
    for _ in range(2):
        _run(cell, runner, params, x, h0, c0, lengths)  # capture
    xs = [x, x.flip(0) * 0.5]

    def losses(run):
        leaves = [v.detach().requires_grad_(True) for p in params[0] for v in p.values()]
        p = [[dict(zip(params[0][0], leaves, strict=True))]]
        total = 0
        outs = []
        for xi in xs:
            y, _, _ = torch_backend.generic_forward(cell.variant, p, xi, h0, c0, lengths, run)
            outs.append(y.detach().clone())
            total = total + y.sum()
        return outs, torch.autograd.grad(total, leaves)

    (y_graph, g_graph), (y_direct, g_direct) = (
        losses(runner),
        losses(torch_bptt.array_run_direction),
    )
    for a, b in zip([*y_graph, *g_graph], [*y_direct, *g_direct], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_repeated_backward_with_retain_graph():
    cell, params, x, h0, c0, lengths = _problem("peephole_full", layers=1)
    runner, _ = _graphed_runner()
    for _ in range(2):
        _run(cell, runner, params, x, h0, c0, lengths)
    W = params[0][0]["W"].detach().requires_grad_(True)
    p = [[{**params[0][0], "W": W}, params[0][1]]]
    y, _, _ = torch_backend.generic_forward(cell.variant, p, x, h0, c0, lengths, runner)
    (first,) = torch.autograd.grad(y.sum(), W, retain_graph=True)
    (second,) = torch.autograd.grad(y.sum(), W)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_a_failed_capture_warns_once_and_runs_directly():
    cell, params, x, h0, c0, lengths = _problem("lstm", layers=1, bidirectional=False)
    runner, engine = _graphed_runner(_torch_capturer(_FailingCapturer))
    want = _run(cell, torch_bptt.array_run_direction, params, x, h0, c0, lengths)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            got = _run(cell, runner, params, x, h0, c0, lengths)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    # one warning for the forward's signature, one for the backward's; not one per call
    assert len(messages) == 2, messages
    assert all("operation not permitted when stream is capturing" in m for m in messages)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert engine.graphed_forward.graphs == {} and engine.graphed_forward.replays == 0


def test_the_graph_cache_is_bounded():
    """max_graphs=1 with two shapes alternating: each call still right, one graph kept
    (the other shape runs directly, which one warning says)."""
    runner, engine = _graphed_runner(max_graphs=1)
    problems = [_problem("peephole", layers=1, T=5), _problem("peephole", layers=1, T=7)]
    with pytest.warns(RuntimeWarning, match="max_graphs=1") as record:
        for _ in range(3):
            for cell, *rest in problems:
                got = _run(cell, runner, *rest)
                want = _run(cell, torch_bptt.array_run_direction, *rest)
                for a, b in zip(got, want, strict=True):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(record) == 1
    assert len(engine.graphed_forward.graphs) == len(engine.graphed_backward.graphs) == 1


def test_flatten_round_trips_nested_trees():
    tree = (1, [2, {"a": 3, "b": (4, None)}], {}, ())
    leaves, structure = flatten(tree)
    assert leaves == [1, 2, 3, 4, None]
    assert unflatten(leaves, structure) == tree


def test_graphed_function_checks_its_arguments():
    with pytest.raises(ValueError, match="warmup_calls: expected at least 1"):
        GraphedFunction(lambda: (), _torch_capturer(), warmup_calls=0)
    with pytest.raises(ValueError, match="max_graphs: expected at least 1"):
        GraphedFunction(lambda: (), _torch_capturer(), max_graphs=0)


def test_cell_option_is_checked_and_inert_on_the_cpu():
    with pytest.raises(TypeError, match="cuda_graphs"):
        get_cell("torch")(4, 5, variant="peephole", cuda_graphs="yes")
    graphed = get_cell("torch")(4, 5, variant="peephole", cuda_graphs=True)
    plain = get_cell("torch")(4, 5, variant="peephole")
    params = plain.init(0)
    x = torch.randn(6, 2, 4, generator=torch.Generator().manual_seed(0))
    for a, b in zip(graphed(params, x)[:1], plain(params, x)[:1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the graphed engine's fallback on the CPU: auto's choice, as without cuda_graphs
    assert graphed.last_choice.engine == plain.last_choice.engine
    assert graphed.graph_stats() == device_graphs.empty_stats()


# ------------------------------------------- what a training loop relies on (CPU stand-in)


@pytest.fixture
def cpu_counts_as_cuda(monkeypatch):
    """The engine table takes CPU tensors for CUDA ones, so that a cell or module asked
    for a graphed engine runs it on the CPU (its graphs captured by the double)."""
    monkeypatch.setattr(engine_table, "_cuda", lambda case: None)


def _eager(base, make_capturer=_torch_capturer):
    """``base`` (a torch cell or module class) whose graphs the double captures, on CPU
    tensors too (``make_capturer()``: the double)."""

    class Eager(base):
        def _make_graphs(self):
            return torch_graphs.CellGraphs(make_capturer(), applies=lambda tensors: True)

    return Eager


SIZES = dict(input_size=4, hidden_size=5, num_layers=2, bidirectional=True, variant="peephole")

#: a module's graphs against the same module without them: the graph reads contiguous
#: copies of the module's transposed weights, on which a product may round its last
#: bit otherwise; a stale replay is off by far more (fresh inputs every call)
CLOSE = dict(rtol=1e-5, atol=1e-6)


def _train_against_direct(make_capturer=_torch_capturer, steps=4):
    """``_train`` through ``lstm_multi.torch.LSTM(engine="graphed_array")`` with graphs the
    double captures, on the CPU."""
    torch.manual_seed(0)
    graphed = _eager(LSTM, make_capturer)(**SIZES, engine="graphed_array")
    return _train(graphed, LSTM(**SIZES, engine="array"), steps)


def _train(graphed, direct, steps=4, device="cpu", close=CLOSE):
    """A training loop through the module ``graphed`` beside ``direct`` (its engine without
    graphs; given the same weights here): fresh packed inputs (new lengths), initial
    states and cotangents at every step, an in-place SGD step (with momentum) between
    steps; outputs and every gradient equal at every step, and ``graphed`` replayed.
    Returns its ``graph_stats()``."""
    direct.load_state_dict(graphed.state_dict())
    modules = (graphed, direct)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in modules]
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        lengths = torch.cat([torch.tensor([7]), torch.randint(1, 8, (2,), generator=g)])
        x = torch.randn(7, 3, 4, generator=g).to(device)
        hx = tuple(torch.randn(4, 3, 5, generator=g).to(device) for _ in range(2))
        dy = torch.randn(int(lengths.sum()), 10, generator=g).to(device)
        dh, dc = (torch.randn(4, 3, 5, generator=g).to(device) for _ in range(2))
        results = []
        for module, optimizer in zip(modules, optimizers, strict=True):
            optimizer.zero_grad()
            xs = x.clone().requires_grad_(True)
            packed = pack_padded_sequence(xs, lengths, enforce_sorted=False)
            y, (h_n, c_n) = module(packed, hx)
            torch.autograd.backward((y.data, h_n, c_n), (dy, dh, dc))
            grads = [p.grad.clone() for p in module.parameters()]
            results.append([y.data.detach(), h_n.detach(), c_n.detach(), xs.grad, *grads])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, **close, msg=lambda m, step=step: f"step {step}: {m}")
        for optimizer in optimizers:
            optimizer.step()
    assert graphed.last_choice.engine.startswith("graphed_")
    stats = graphed.graph_stats()
    # a step: 2 layers x 2 directions, forward and backward, 2 signatures each way (the
    # layers' input widths; a layer's directions share theirs): at step 1 each
    # direction 0 runs directly and each direction 1 captures, and every later call replays
    assert stats["replays"] == 8 * steps - 4, stats
    assert (stats["captures"], stats["direct_calls"], stats["graphs"]) == (4, 4, 4), stats
    assert stats["failed_captures"] == 0
    return stats


def test_a_training_loop_replays_fresh_inputs_and_updated_parameters(cpu_counts_as_cuda):
    _train_against_direct()


def test_a_stale_replay_fails_the_training_loop(cpu_counts_as_cuda):
    """Mutation: a capturer that does not copy the call's tensors into the graph replays
    the captured inputs and parameters; the loop's comparison catches it."""

    def stale():
        capturer = _torch_capturer()
        capturer.copy_into = lambda dst, src: None
        return capturer

    with pytest.raises(AssertionError, match="step 1"):
        _train_against_direct(stale)


def test_a_silent_direct_run_fails_the_training_loop(cpu_counts_as_cuda):
    """Mutation: a graphed engine that never replays (here: every call taken for one
    inside the caller's own capture) gives right numbers; the replay count catches it."""

    class NeverReplays(EagerCapturer):
        def capturing(self):
            return True

    with pytest.raises(AssertionError, match="'replays': 0"):
        _train_against_direct(lambda: _torch_capturer(NeverReplays))


def test_varying_lengths_through_the_module_stop_capturing_with_one_warning(
    cpu_counts_as_cuda,
):
    """20 sequence lengths, each twice: at most MAX_GRAPHS graphs each way, one warning for
    the module, outputs and gradients still those of the array engine."""
    torch.manual_seed(0)
    sizes = dict(input_size=4, hidden_size=5, variant="peephole")
    graphed = _eager(LSTM)(**sizes, engine="graphed_array")
    direct = LSTM(**sizes, engine="array")
    direct.load_state_dict(graphed.state_dict())
    g = torch.Generator().manual_seed(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for steps in range(1, 21):
            for _ in range(2):
                x = torch.randn(steps, 2, 4, generator=g)
                got, want = (_module_grads(m, x) for m in (graphed, direct))
                for a, b in zip(got, want, strict=True):
                    torch.testing.assert_close(a, b, **CLOSE)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "pad or bucket" in messages[0], messages
    stats = graphed.graph_stats()
    limit = torch_graphs.MAX_GRAPHS
    assert stats["captures"] == stats["graphs"] == 2 * limit, stats  # forward and backward
    assert stats["signatures"] == 2 * 20
    graphed.free_graphs()
    assert graphed.graph_stats()["graphs"] == 0


def _module_grads(module, x):
    """The module's output and the gradients of a fixed function of it."""
    x = x.clone().requires_grad_(True)
    y, (h_n, c_n) = module(x)
    params = list(module.parameters())
    grads = torch.autograd.grad(y.square().sum() + h_n.sum() + c_n.sum(), [x, *params])
    return [y.detach(), *grads]


def test_each_cell_keeps_its_own_graphs_and_frees_them(cpu_counts_as_cuda):
    """Graphs belong to the cell: its counts are its own, ``free_graphs`` drops them (and
    later calls capture again), a copy starts with none."""
    Cell = _eager(torch_backend.Cell)
    one, other = (Cell(**SIZES, engine="graphed_array") for _ in range(2))
    params = one.init(0)
    x = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(0))
    dy = torch.randn(3, 6, 10, generator=torch.Generator().manual_seed(1))
    want = get_cell("torch")(**SIZES, engine="array").vjp(params, x, dy)
    for _ in range(3):
        got = one.vjp(params, x, dy)
        for a, b in zip(flatten(got)[0], flatten(want)[0], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    stats = one.graph_stats()
    assert stats["replays"] > 0 and stats["graphs"] == 4, stats
    assert other.graph_stats() == device_graphs.empty_stats()
    assert copy.deepcopy(one).graph_stats() == device_graphs.empty_stats()
    one.free_graphs()
    assert one.graph_stats()["graphs"] == 0
    one.vjp(params, x, dy)  # the kernels are warm: captured again at once
    assert one.graph_stats()["captures"] == stats["captures"] + 4


def test_a_module_with_graphs_saves_and_loads_without_them(cpu_counts_as_cuda, tmp_path):
    """``torch.save`` of a module that ran a graphed engine, and ``torch.load`` with its
    weights_only default: the graphs (device state) and the last call's choice stay
    behind, the copy captures its own."""
    module = LSTM(**SIZES, engine="graphed_array")
    x = torch.randn(5, 2, 4)
    module(x)
    assert "_graph_cache" in module.__dict__ and module.last_choice is not None
    torch.save(module, tmp_path / "lstm.pt")
    loaded = torch.load(tmp_path / "lstm.pt")
    assert "_graph_cache" not in loaded.__dict__ and loaded.last_choice is None
    torch.testing.assert_close(loaded(x)[0], module(x)[0], rtol=0, atol=0)
    assert copy.deepcopy(module).graph_stats() == device_graphs.empty_stats()


def test_threads_calling_one_module_each_get_their_own_results(cpu_counts_as_cuda):
    """Several threads through one module (as ``nn.DataParallel``'s replicas share it),
    each with its own inputs of one shape: one graph each way, each thread's own results."""
    torch.manual_seed(0)
    graphed = _eager(LSTM)(**SIZES, engine="graphed_array")
    direct = LSTM(**SIZES, engine="array")
    direct.load_state_dict(graphed.state_dict())
    inputs = [torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    wanted = [_module_grads(direct, x) for x in inputs]
    for _ in range(2):
        _module_grads(graphed, inputs[0])  # warm-up, capture
    errors = []
    start = threading.Barrier(len(inputs))

    def work(x, want):
        start.wait()
        for _ in range(3):
            for a, b in zip(_module_grads(graphed, x), want, strict=True):
                if not torch.allclose(a, b, **CLOSE):
                    errors.append("a thread got another's result")

    threads = [
        threading.Thread(target=work, args=pair) for pair in zip(inputs, wanted, strict=False)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert graphed.graph_stats()["replays"] >= 4 * 3 * 8


@pytest.mark.parametrize(
    "setting, value",
    [
        ("matmul.allow_tf32", True),
        ("cudnn.allow_tf32", False),
        ("matmul.allow_fp16_reduced_precision_reduction", False),
        ("float32_matmul_precision", "high"),
        ("autocast", True),
        ("autocast_dtype", torch.bfloat16),
    ],
)
def test_precision_settings_are_part_of_the_signature(setting, value):
    """A graph recorded the kernels its settings chose (TF32 or not, reduced-precision
    reductions, autocast): a call under other settings is a new signature, captured
    anew, and the old settings replay their own graph again."""
    backends = {"matmul": torch.backends.cuda.matmul, "cudnn": torch.backends.cudnn}
    change = {
        "float32_matmul_precision": (
            torch.get_float32_matmul_precision,
            torch.set_float32_matmul_precision,
        ),
        "autocast": (
            lambda: torch.is_autocast_enabled("cuda"),
            lambda v: torch.set_autocast_enabled("cuda", v),
        ),
        "autocast_dtype": (
            lambda: torch.get_autocast_dtype("cuda"),
            lambda v: torch.set_autocast_dtype("cuda", v),
        ),
    }
    if setting in change:
        read, write = change[setting]
    else:
        where, name = setting.split(".")
        read = functools.partial(getattr, backends[where], name)
        write = functools.partial(setattr, backends[where], name)
    old = read()
    assert old != value
    graphed = GraphedFunction(lambda x: x * 2, _torch_capturer())
    x = torch.ones(3)
    for _ in range(2):
        graphed(x)  # captured under the old settings
    try:
        write(value)
        graphed(x)
        assert graphed.stats["signatures"] == 2 and graphed.stats["replays"] == 1
        graphed(x)
        assert graphed.stats["captures"] == 2 and graphed.stats["replays"] == 2
    finally:
        write(old)
    graphed(x)
    assert graphed.stats["replays"] == 3 and graphed.stats["captures"] == 2


def test_the_capture_runs_on_the_cuda_device_of_the_tensors(monkeypatch):
    """``TorchCudaCapturer.on_device``: ``torch.cuda.device`` of the first CUDA tensor
    (here tensors that say they are on cuda:1, and a device guard that records), and
    nothing for CPU tensors."""
    entered = []

    @contextlib.contextmanager
    def device(where):
        entered.append(where)
        yield

    class SaysCuda:
        def __init__(self, index):
            self.is_cuda = index is not None
            self.device = torch.device("cpu" if index is None else f"cuda:{index}")

    class Capturer(torch_graphs.TorchCudaCapturer):
        def is_array(self, x):
            return isinstance(x, SaysCuda)

    monkeypatch.setattr(torch.cuda, "device", device)
    with Capturer().on_device([SaysCuda(None), 3, SaysCuda(1), SaysCuda(0)]):
        pass
    assert entered == [torch.device("cuda:1")]
    with torch_graphs.TorchCudaCapturer().on_device([torch.ones(2), None]):
        pass
    assert entered == [torch.device("cuda:1")]


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
    ],
    ids=["OutOfMemoryError", "cuda error"],
)
def test_out_of_memory_in_a_torch_capture_is_raised(error):
    class OutOfMemory(EagerCapturer):
        def capture(self, thunk):
            raise error

    assert torch_graphs.TorchCudaCapturer().is_out_of_memory(error)
    runner, engine = _graphed_runner(_torch_capturer(OutOfMemory))
    cell, params, x, h0, c0, lengths = _problem("lstm", layers=1, bidirectional=False)
    _run(cell, runner, params, x, h0, c0, lengths)  # warm-up: direct
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(type(error), match="out of memory"):
            _run(cell, runner, params, x, h0, c0, lengths)
    assert engine.stats()["failed_captures"] == 0


# ---------------------------------------------------------------- on a GPU


def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("torch: no CUDA device (torch.cuda.is_available() is False)")


@pytest.mark.gpu
@pytest.mark.parametrize("gate_kernel", [None, "triton"])
@pytest.mark.parametrize("variant", ["lstm", "peephole"])
def test_cuda_graphs_on_the_gpu_equal_direct_calls(variant, gate_kernel, monkeypatch):
    """The real capture: fresh inputs and cotangents at every call and the parameters
    updated in place between calls; replays equal the same cell without graphs (same
    kernels, so equal up to the products' nondeterminism), forward and every gradient;
    and the cell replayed (no failed capture, no silent direct run)."""
    _cuda_or_skip()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    if gate_kernel == "triton":
        pytest.importorskip("triton")
    make = get_cell("torch")
    kwargs = dict(variant=variant, num_layers=2, bidirectional=True, batch_first=False)
    kwargs["native"] = False
    graphed = make(16, 32, gate_kernel=gate_kernel, cuda_graphs=True, **kwargs)
    plain = make(16, 32, gate_kernel=gate_kernel, **kwargs)
    params = plain._map(lambda name, a: a.cuda(), plain.init(0))
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = torch.tensor([20, 17, 9, 1, 20, 3, 5, 8])
    for call in range(4):  # direct and capture (layer by layer), then replays
        x = torch.randn(20, 8, 16, device="cuda", generator=g)
        dy = torch.randn(20, 8, 64, device="cuda", generator=g)
        want = plain.vjp(params, x, dy, lengths=lengths)
        got = graphed.vjp(params, x, dy, lengths=lengths)
        torch.cuda.synchronize()
        for a, b in zip(flatten(got)[0], flatten(want)[0], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"call {call}")
        for layer, layer_grads in zip(params, want[0], strict=True):
            for p, grads in zip(layer, layer_grads, strict=True):
                for k in p:
                    p[k].sub_(0.1 * grads[k])  # in place: what the graphs copy from
    engine = "graphed_array" if gate_kernel is None else "graphed_triton"
    assert graphed.last_choice.engine == engine
    stats = graphed.graph_stats()
    # forward with a tape and backward, 4 directions each, over 2 signatures each (the
    # layers' widths): at the first call 2 direct and 2 captured and replayed each way
    assert stats["replays"] == 8 * 4 - 4 and stats["failed_captures"] == 0, stats


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["graphed_array", "graphed_triton"])
def test_a_training_loop_on_the_gpu(engine, monkeypatch):
    """``_train`` with real CUDA graphs: ``lstm_multi.torch.LSTM(engine=...)`` against the
    same engine without graphs, fresh inputs and an SGD step between calls, replays
    counted; then TF32 turned on is a new signature (not a replay of the float32 graph)."""
    _cuda_or_skip()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    if engine == "graphed_triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    graphed = LSTM(**SIZES, engine=engine).cuda()
    direct = LSTM(**SIZES, engine=engine.removeprefix("graphed_")).cuda()
    _train(graphed, direct, steps=4, device="cuda", close=dict(rtol=1e-5, atol=1e-5))
    x = torch.randn(7, 3, 4, device="cuda")
    for _ in range(3):
        graphed(x)  # captured and replayed with TF32 off
    before = graphed.graph_stats()
    torch.backends.cuda.matmul.allow_tf32 = True  # (monkeypatch turns it off again)
    graphed(x)
    after = graphed.graph_stats()
    assert after["signatures"] == before["signatures"] + 2, after  # the two layers' forwards
    assert after["replays"] == before["replays"], after
    graphed.free_graphs()
    assert graphed.graph_stats()["graphs"] == 0


@pytest.mark.gpu
def test_tensors_on_another_gpu_are_captured_and_replayed_there():
    """The device guard: a module on cuda:1 while cuda:0 is current captures and replays
    on cuda:1, and equals the same module without graphs there."""
    _cuda_or_skip()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    torch.manual_seed(0)
    graphed = LSTM(**SIZES, engine="graphed_array").to("cuda:1")
    direct = LSTM(**SIZES, engine="array").to("cuda:1")
    with torch.cuda.device(0):
        _train(graphed, direct, device="cuda:1", close=dict(rtol=1e-5, atol=1e-5))
        assert torch.cuda.current_device() == 0


def test_the_module_takes_the_options_and_checks_them():
    from lstm_multi.torch import LSTM

    with pytest.raises(TypeError, match="cuda_graphs"):
        LSTM(4, 5, variant="peephole", cuda_graphs=1)
    with pytest.raises(ValueError, match="gate_kernel: expected None, 'array'"):
        LSTM(4, 5, variant="peephole", gate_kernel="cuda")
    torch.manual_seed(0)
    plain = LSTM(4, 5, variant="peephole")
    chosen = LSTM(4, 5, variant="peephole", gate_kernel="array", cuda_graphs=True)
    chosen.load_state_dict(plain.state_dict())
    assert "gate_kernel='array', cuda_graphs=True" in repr(chosen)
    x = torch.randn(7, 2, 4)
    torch.testing.assert_close(chosen(x)[0], plain(x)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "variant", thorough_params(["peephole", "layernorm"], ["peephole"], "the default run takes")
)
def test_replays_of_the_triton_gate_kernels_equal_direct_calls(variant, monkeypatch, tmp_path):
    """The graphed loop over the per-step Triton kernels (Triton's interpreter on the
    CPU): the tape of the Triton ops crosses the graph like the array code's ("layernorm":
    split halves and whole rows a program, engine "graphed_triton")."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LSTM_MULTI_CACHE", str(tmp_path))
    from lstm_multi.backends.torch_triton import TritonTorchOps

    ops = TritonTorchOps()
    launches = []
    kernel_forward = ops.kernels.forward
    monkeypatch.setattr(ops.kernels, "forward", lambda *a: launches.append(1) or kernel_forward(*a))
    engine = torch_graphs.GraphedLoopEngine(ops, _torch_capturer())
    graphed = torch_bptt.direction_runner(
        ops, False, torch_graphs.graphed_engine_for(engine, applies=lambda tensors: True)
    )
    direct = torch_bptt.direction_runner(ops, False, None)
    cell, params, x, h0, c0, lengths = _problem(variant, layers=1, T=4)
    want = _run(cell, direct, params, x, h0, c0, lengths)
    for _ in range(3):
        got = _run(cell, graphed, params, x, h0, c0, lengths)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert engine.graphed_forward.replays >= 1 and engine.graphed_backward.replays >= 1
    assert launches, "the Triton gate kernels did not run"


def test_inside_the_callers_own_capture_nothing_is_captured_or_replayed():
    """A capture cannot nest: while the caller records a graph of its own (a whole
    training step), the loop runs directly, to be recorded in the caller's graph."""

    class CallerCapturing(EagerCapturer):
        def capturing(self):
            return True

    capturer = _torch_capturer(CallerCapturing)
    runner, engine = _graphed_runner(capturer)
    cell, params, x, h0, c0, lengths = _problem("peephole", layers=1)
    want = _run(cell, torch_bptt.array_run_direction, params, x, h0, c0, lengths)
    for _ in range(3):
        got = _run(cell, runner, params, x, h0, c0, lengths)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert capturer.captures == 0 and engine.graphed_forward.replays == 0
