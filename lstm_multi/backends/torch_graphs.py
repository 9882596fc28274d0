"""The torch generic path's per-step loop replayed from CUDA graphs (``cuda_graphs=True``).

On a GPU the per-step path (``torch_bptt.LoopEngine``: a product and one
fused gate kernel a step, forward and backward) is bound by the host: each
launch from Python costs more than the kernel it launches. ``GraphedLoopEngine``
captures a direction's whole forward (with its tape) and whole backward, each
as one ``torch.cuda.CUDAGraph`` per shape, dtype and variant
(``lstm_multi.backends.device_graphs``), and replays them: one host call per direction
instead of a few per step.

What changes for the caller: nothing but speed. A replay computes what the
direct call computes, bit for bit; outputs are copies (a second forward does
not overwrite the first's tape); autograd, repeated backward and double
backward are those of ``torch_bptt.BpttDirection``. The tape crosses the
graph boundary stacked, a few (T, ...) tensors instead of several per step, so
that copying it in and out is a few launches, not T.

Where it applies: CUDA tensors on the per-step path. The persistent kernels
(``torch_triton.PersistentEngine``: one launch a direction already) and CPU
tensors run as without graphs. The first call of a new shape runs directly
(it compiles the kernels), the second captures, later ones replay; a capture
that fails warns once and that shape runs directly.
"""

from __future__ import annotations

import functools

import torch

from .device_graphs import Capturer, GraphedFunction, stack_steps, unstack_steps
from .torch_bptt import LoopEngine, _flatten_tape, _unflatten_tape, direction_runner


class TorchCudaCapturer(Capturer):
    """``torch.cuda.CUDAGraph`` capture, after a warm-up on a side stream (as
    PyTorch's documentation asks: library handles and workspaces are made
    outside the capture)."""

    def is_array(self, x):
        return isinstance(x, torch.Tensor)

    def leaf_signature(self, x):
        # not the strides: the graph reads its own contiguous copies of the inputs
        return tuple(x.shape), x.dtype, x.device

    def clone(self, x):
        return x.clone(memory_format=torch.contiguous_format)

    def copy_into(self, dst, src):
        dst.copy_(src)

    def context(self):
        return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")

    def capturing(self):
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()

    def capture(self, thunk):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            thunk()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread-local: only this thread's CUDA calls are checked against the capture.
        # In the default "global" mode, another thread's (JAX's runtime threads, a
        # data loader's pinned copies) CUDA calls during the capture fail, and the
        # capture with them: the first GPU run left JAX in the same process broken
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = thunk()
        return graph.replay, outputs


def stack_tape(tape, steps):
    """``LoopEngine``'s flat tape -> (xs, rs (T, B, H), one (T, ...) tensor per cache
    entry); an entry that is None at every step stays None."""
    xs, rs, caches = _unflatten_tape(tape, steps)
    rs, fields = stack_steps(torch.stack, rs, caches)
    return (xs, rs, *fields)


def unstack_tape(stacked):
    """Inverse of ``stack_tape``, as views (no copies)."""
    xs, rs, *fields = stacked
    return _flatten_tape((xs, *unstack_steps(rs, fields)))


class GraphedLoopEngine:
    """``LoopEngine`` (the per-step loop over ``ops``) replayed from device graphs.

    Same interface as ``LoopEngine``; its tape is ``stack_tape``'s.
    ``capturer`` defaults to CUDA's; the tests pass their ``EagerCapturer`` (``tests/doubles.py``).
    """

    def __init__(self, ops, capturer=None, max_graphs=8):
        self.loop = LoopEngine(ops)
        capturer = capturer or TorchCudaCapturer()
        self.graphed_forward = GraphedFunction(self._forward, capturer, max_graphs=max_graphs)
        self.graphed_backward = GraphedFunction(self._backward, capturer, max_graphs=max_graphs)

    def _forward(self, variant, p, xs, h0, c0, valid, record):
        ys, h, c, tape = self.loop.forward(variant, p, xs, h0, c0, valid, record)
        return ys, h, c, (stack_tape(tape, xs.shape[0]) if record else ())

    def _backward(self, variant, p, stacked, dys, dh, dc, valid):
        return self.loop.backward(variant, p, unstack_tape(stacked), dys, dh, dc, valid)

    def forward(self, variant, p, xs, h0, c0, valid, record):
        return self.graphed_forward(variant, p, xs, h0, c0, valid, record)

    def backward(self, variant, p, tape, dys, dh, dc, valid):
        return self.graphed_backward(variant, p, tuple(tape), dys, dh, dc, valid)


def graphed_engine_for(engine, base_engine_for=None, applies=None):
    """An ``engine_for`` for ``torch_bptt.direction_runner``: ``base_engine_for``'s
    engine where it gives one (the persistent kernels), else ``engine`` (a
    ``GraphedLoopEngine``) where ``applies(tensors)`` (default: every tensor on
    CUDA), else None (the runner's own choice)."""

    def on_cuda(tensors):
        return all(t.is_cuda for t in tensors)

    applies = applies or on_cuda

    def engine_for(variant, p, xs, h0, c0):
        if base_engine_for is not None:
            base = base_engine_for(variant, p, xs, h0, c0)
            if base is not None:
                return base
        return engine if applies((xs, h0, c0, *p.values())) else None

    return engine_for


@functools.cache
def graphed_runner(ops, cpu_kernels, base_engine_for=None):
    """``torch_bptt.direction_runner(ops, cpu_kernels, ...)`` with the per-step loop
    of CUDA tensors replayed from CUDA graphs (one ``GraphedLoopEngine``, and so
    one graph cache, per combination: later calls reuse the graphs)."""
    engine = GraphedLoopEngine(ops)
    return direction_runner(
        ops, cpu_kernels=cpu_kernels, engine_for=graphed_engine_for(engine, base_engine_for)
    )
