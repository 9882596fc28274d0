"""CUDA-graph replay of the torch generic path (``cuda_graphs=True``).

On the CPU a ``doubles.EagerCapturer`` stands in for the device graph:
it replays by rerunning the captured function on the static inputs and
rewriting the static outputs in place, which is what a CUDA graph does, so
everything around the graph (signatures, copies in and out, the stacked
tape, autograd, failures, the cache's bound) is tested here. The real capture
runs in the ``gpu`` tests at the end.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from doubles import EagerCapturer  # noqa: E402

from lstm_multi import get_cell  # noqa: E402
from lstm_multi.backends import torch_backend, torch_bptt, torch_graphs  # noqa: E402
from lstm_multi.backends.device_graphs import (  # noqa: E402
    GraphedFunction,
    flatten,
    unflatten,
)


def _torch_capturer():
    return EagerCapturer(
        is_array=lambda x: isinstance(x, torch.Tensor),
        clone=torch_graphs.TorchCudaCapturer().clone,
        copy_into=lambda dst, src: dst.copy_(src),
        leaf_signature=torch_graphs.TorchCudaCapturer().leaf_signature,
    )


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
    "variant, proj_size", [("lstm", 0), ("peephole", 0), ("peephole_full", 0), ("peephole", 3)]
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
    base = _torch_capturer()
    capturer = _FailingCapturer(base.is_array, base.clone, base.copy_into, base.leaf_signature)
    runner, engine = _graphed_runner(capturer)
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
    """max_graphs=1 with two shapes alternating: each call still right, one graph kept."""
    runner, engine = _graphed_runner(max_graphs=1)
    problems = [_problem("peephole", layers=1, T=5), _problem("peephole", layers=1, T=7)]
    for _ in range(3):
        for cell, *rest in problems:
            got = _run(cell, runner, *rest)
            want = _run(cell, torch_bptt.array_run_direction, *rest)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(engine.graphed_forward.graphs) <= 1


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


# ---------------------------------------------------------------- on a GPU


def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("torch: no CUDA device (torch.cuda.is_available() is False)")


@pytest.mark.gpu
@pytest.mark.parametrize("gate_kernel", [None, "triton"])
@pytest.mark.parametrize("variant", ["lstm", "peephole"])
def test_cuda_graphs_on_the_gpu_equal_direct_calls(variant, gate_kernel, monkeypatch):
    """The real capture: replays equal the same cell without graphs (same kernels, so
    equal up to the products' nondeterminism), forward and every gradient."""
    _cuda_or_skip()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if gate_kernel == "triton":
        pytest.importorskip("triton")
    make = get_cell("torch")
    kwargs = dict(variant=variant, num_layers=2, bidirectional=True, batch_first=False)
    kwargs["native"] = False
    graphed = make(16, 32, gate_kernel=gate_kernel, cuda_graphs=True, **kwargs)
    plain = make(16, 32, gate_kernel=gate_kernel, **kwargs)
    params = plain._map(lambda name, a: a.cuda(), plain.init(0))
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(20, 8, 16)), dtype=torch.float32, device="cuda")
    lengths = torch.tensor([20, 17, 9, 1, 20, 3, 5, 8])
    dy = torch.randn(20, 8, 64, device="cuda")
    want = plain.vjp(params, x, dy, lengths=lengths)
    for _ in range(4):  # direct, capture, replay, replay
        got = graphed.vjp(params, x, dy, lengths=lengths)
    torch.cuda.synchronize()
    flat_got, _ = flatten(got)
    flat_want, _ = flatten(want)
    for a, b in zip(flat_got, flat_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


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


def test_replays_of_the_triton_gate_kernels_equal_direct_calls(monkeypatch, tmp_path):
    """The graphed loop over the per-step Triton kernels (Triton's interpreter on the
    CPU): the tape of the Triton ops crosses the graph like the array code's."""
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
    cell, params, x, h0, c0, lengths = _problem("peephole", layers=1, T=4)
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

    base = _torch_capturer()
    capturer = CallerCapturing(base.is_array, base.clone, base.copy_into, base.leaf_signature)
    runner, engine = _graphed_runner(capturer)
    cell, params, x, h0, c0, lengths = _problem("peephole", layers=1)
    want = _run(cell, torch_bptt.array_run_direction, params, x, h0, c0, lengths)
    for _ in range(3):
        got = _run(cell, runner, params, x, h0, c0, lengths)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert capturer.captures == 0 and engine.graphed_forward.replays == 0
