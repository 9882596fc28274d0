"""The CuPy backend's per-step loop replayed from CUDA graphs (``cuda_graphs=True``).

On a GPU the CuPy cell's time loop (``network.loop_direction`` forward,
``bptt.backward_direction`` backward: a gemm and one fused gate kernel a step,
plus a few small ones) is bound by the host: each launch from Python costs more
than the kernel it launches. ``GraphedArrayDirections`` captures a
layer-direction's whole forward (with its tape) and its whole backward, each as
one CUDA graph per signature (shapes, dtypes, devices, variant, ops, whether
the tape is recorded: ``lstm_multi.backends.device_graphs``), and replays them: one host
call per direction instead of a few per step.

What changes for the caller: nothing but speed. A replay computes what the
direct call computes; outputs are copies (a second forward does not overwrite
the first's tape). The tape crosses the graph boundary stacked
(``StackedTape``): the recurrent inputs as one (T, B, R) array and each cache
entry as one (T, ...) array, instead of T arrays each, so that copying it out
of the forward's graph and into the backward's is a few copies, not several a
step. Its ``xs`` is the caller's own array (as in ``loop_direction``'s tape),
not an output of the graph, so it is not copied on the way out.

The capture (``CupyCapturer``), and why each step of it is there:

* it runs on a fresh non-blocking stream: CUDA cannot capture the legacy
  default stream, and the stream waits for the caller's current stream (which
  wrote the graph's static inputs) before anything runs on it;
* the thunk runs once directly on that stream before the capture (a warm-up:
  cuBLAS handles and workspaces, kernel modules and memory are set up outside
  the capture, where set-up calls are legal);
* memory safety: the arrays a capture allocates and frees again (the per-step
  temporaries) are addresses the graph writes to on every replay. Returned to
  CuPy's shared memory pool they could be handed to other arrays while the
  graph still writes there. So every graph gets its own ``cupy.cuda.MemoryPool``,
  used for the warm-up and the capture (so the capture's allocations are
  normally served from the blocks the warm-up freed back into it, without a
  ``cudaMalloc``: CuPy's pools keep free blocks per stream, and both run on the
  capture stream), and kept alive as long as the graph (``_CupyGraphReplay``);
  nothing else ever allocates from it;
* the capture runs in CuPy's default mode for ``begin_capture``
  (``cudaStreamCaptureModeRelaxed``), so that a pool that must still grow during
  the capture may call ``cudaMalloc``; a thunk that raises ends the capture
  before the error propagates (a stream left capturing would break every later
  launch on it); the caller's stream then waits for the capture stream, since
  the warm-up read the static inputs that the first replay rewrites;
* a replay launches the graph on the **current** stream, so that it is ordered
  after the copies into its inputs and before the copies out of its outputs,
  which ``GraphedFunction`` issues on that stream.

What a graph is keyed on besides the arrays' shapes, dtypes and devices: the
current device and stream (``CupyCapturer.context``), so that each stream replays
its own graph. The capture and its replays run under ``cupy.cuda.Device`` of the
arrays (``CupyCapturer.on_device``): arrays on a GPU other than the current one are
captured and replayed on their own.

A failed capture (a host synchronisation, an operation CUDA cannot record)
warns once and that signature runs directly (``GraphedFunction``); running out
of memory (``cupy.cuda.memory.OutOfMemoryError``, cuBLAS's allocation) is raised.
Each cell keeps its own graphs (``GraphedDirectionsCell``): at most ``max_graphs``
each way, past which new shapes run directly, warned once per cell;
``cell.graph_stats()`` counts captures, replays, direct calls, failed captures,
signatures and graphs held, and ``cell.free_graphs()`` drops the graphs.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

from .. import bptt, network, regularize, validation
from . import kernel_direction
from .device_graphs import (
    Capturer,
    GraphedFunction,
    empty_stats,
    stack_steps,
    sum_stats,
    unstack_steps,
)


def _cupy():
    """CuPy, imported where a real capture needs it (the rest of this module runs
    without it: the tests drive it with NumPy and a stand-in capturer)."""
    import cupy

    return cupy


class _CupyGraphReplay:
    """A captured graph and what must outlive it: the private memory pool its
    temporaries and outputs live in, and the stream it was captured on (the key
    of the pool's free blocks)."""

    def __init__(self, graph, pool, stream):
        self.graph, self.pool, self.stream = graph, pool, stream

    def __call__(self):
        self.graph.launch(stream=_cupy().cuda.get_current_stream())


def _abandon_capture(stream):
    """End a capture whose thunk failed; an invalidated capture's own error is not
    the one to report (the thunk's is)."""
    try:
        stream.end_capture()
    except Exception:  # the thunk's error propagates instead
        pass


class CupyCapturer(Capturer):
    """CUDA graphs through CuPy's stream capture (design in the module doc)."""

    def is_array(self, x):
        return isinstance(x, _cupy().ndarray)

    def leaf_signature(self, x):
        # not the strides: the graph reads its own C-contiguous copies of the inputs
        # (``clone``), and ``copy_into`` copies from any layout
        return tuple(x.shape), x.dtype, x.device.id

    def clone(self, x):
        return x.copy(order="C")

    def copy_into(self, dst, src):
        _cupy().copyto(dst, src)

    def context(self):
        """The current device and stream (which ``on_device`` made the arrays')."""
        cupy = _cupy()
        return cupy.cuda.Device().id, cupy.cuda.get_current_stream().ptr

    def on_device(self, leaves):
        array = next((x for x in leaves if self.is_array(x)), None)
        return contextlib.nullcontext() if array is None else array.device

    def capturing(self):
        return _cupy().cuda.get_current_stream().is_capturing()

    def capture(self, thunk):
        cupy = _cupy()
        current = cupy.cuda.get_current_stream()
        stream = cupy.cuda.Stream(non_blocking=True)
        pool = cupy.cuda.MemoryPool()
        stream.wait_event(current.record())  # the static inputs were written on `current`
        with cupy.cuda.using_allocator(pool.malloc), stream:
            thunk()  # warm-up; its arrays are freed back into `pool` here
            stream.begin_capture()
            try:
                outputs = thunk()
            except BaseException:
                _abandon_capture(stream)
                raise
            graph = stream.end_capture()
        current.wait_event(stream.record())  # the warm-up read what the replays rewrite
        return _CupyGraphReplay(graph, pool, stream), outputs


# ---------------------------------------------------------------------------
# the tape across the graph boundary


class StackedTape(NamedTuple):
    """``network.loop_direction``'s tape with its per-step lists stacked over time.

    xs: (T, B, in) the direction's input; rs: (T, B, R) the recurrent input of
    every step (R = H, or P with a projection, for ``recurrent_state == "h"``);
    fields: one (T, ...) array per entry of a step's cache (None where the
    entry is None at every step).
    """

    xs: Any
    rs: Any
    fields: tuple


def stack_tape(ops, tape):
    """``loop_direction``'s tape (xs, rs list, caches list) -> (rs (T, ...), fields)."""
    _, rs, caches = tape
    return stack_steps(lambda arrays: ops.stack(arrays, 0), rs, caches)


def unstack_tape(xs, rs, fields):
    """Inverse of ``stack_tape`` as views (no copies): the (xs, rs list, caches list)
    tape that ``bptt.backward_direction`` walks."""
    return (xs, *unstack_steps(rs, fields))


def _forward_stacked(ops, variant, p, xs, h0, c0, valid, record):
    """The function the forward graph captures: ``loop_direction`` with its tape
    stacked -> (ys, h_T, c_T, (rs, fields) or None)."""
    ys, h, c, tape = network.loop_direction(ops, variant, p, xs, h0, c0, valid, record)
    return ys, h, c, (stack_tape(ops, tape) if record else None)


def _backward_stacked(ops, variant, p, stacked, dys, dh, dc, valid):
    """The function the backward graph captures: ``bptt.backward_direction`` on a
    ``StackedTape`` (as a plain tuple) -> (grads like p, dxs, dh0, dc0)."""
    tape = unstack_tape(*stacked)
    return bptt.backward_direction(ops, variant, p, tape, dys, dh, dc, valid)


class GraphedArrayDirections:
    """A direction's forward and backward, each replayed from a captured graph.

    ``run_direction`` has ``network.loop_direction``'s contract (what
    ``network.forward`` calls; its tape is a ``StackedTape``) and
    ``backward_direction`` has ``bptt.backward_direction``'s (what
    ``bptt.backward`` calls) for that tape; any other tape goes to
    ``kernel_direction.backward_any`` unreplayed. One instance holds one graph
    cache (``max_graphs`` graphs each way): keep it as long as its graphs are
    useful (the CuPy cell keeps one per cell). ``capturer`` defaults to CUDA's
    (``CupyCapturer``); the tests pass their ``EagerCapturer`` (``tests/doubles.py``).
    """

    def __init__(self, capturer=None, max_graphs=8, warmup_calls=1):
        capturer = capturer or CupyCapturer()
        notices = set()  # shared: the limit is warned about once for both ways
        self.graphed_forward, self.graphed_backward = (
            GraphedFunction(fn, capturer, warmup_calls, max_graphs, notices)
            for fn in (_forward_stacked, _backward_stacked)
        )

    def stats(self):
        """The forward's and backward's ``GraphedFunction.stats`` added up."""
        return sum_stats((self.graphed_forward, self.graphed_backward))

    def free(self):
        """Drop the forward's and backward's graphs (``GraphedFunction.free``)."""
        self.graphed_forward.free()
        self.graphed_backward.free()

    def run_direction(self, ops, variant, p, xs, h0, c0, valid, record=False):
        """-> (ys (T, B, H), h_T, c_T, StackedTape or None), as ``loop_direction``."""
        ys, h, c, stacked = self.graphed_forward(ops, variant, p, xs, h0, c0, valid, record)
        return ys, h, c, (StackedTape(xs, *stacked) if record else None)

    def backward_direction(self, ops, variant, p, tape, dys, dh, dc, valid):
        """-> (grads like p, dxs (T, B, in), dh0, dc0), as ``bptt.backward_direction``."""
        if not isinstance(tape, StackedTape):
            return kernel_direction.backward_any(ops, variant, p, tape, dys, dh, dc, valid)
        return self.graphed_backward(ops, variant, p, tuple(tape), dys, dh, dc, valid)


class GraphedDirectionsCell:
    """The ``cuda_graphs`` option of an ``ArrayModuleCell`` (the CuPy cell's), as a mixin:
    with ``cuda_graphs=True`` each cell keeps one ``GraphedArrayDirections`` and routes
    its directions' forward and backward through it (graphs persist across calls)."""

    def __init__(self, *args, engine="auto", cuda_graphs=False, **kwargs):
        cuda_graphs = validation.check_bool("cuda_graphs", cuda_graphs)
        if cuda_graphs:  # the older spelling of engine="cupy_graphed"
            if engine not in ("auto", "cupy_graphed"):
                raise ValueError(
                    f"engine: {engine!r} and cuda_graphs=True both choose the engine; give "
                    "engine='cupy_graphed' alone (cuda_graphs=True is its older spelling)"
                )
            engine = "cupy_graphed"
        super().__init__(*args, engine=engine, **kwargs)
        self.cuda_graphs = self.engine == "cupy_graphed"
        self._graphs = self._make_graphed_directions() if self.cuda_graphs else None

    def _make_graphed_directions(self):
        """This cell's graph cache; the tests override it to capture with a CPU stand-in."""
        return GraphedArrayDirections()

    def graph_stats(self):
        """This cell's CUDA-graph counters, both ways: {"captures", "replays",
        "direct_calls", "failed_captures", "signatures", "graphs"}
        (``device_graphs.GraphedFunction.stats``); all zero without graphs."""
        return empty_stats() if self._graphs is None else self._graphs.stats()

    def free_graphs(self):
        """Drop this cell's CUDA graphs and their memory pools; later calls capture again."""
        if self._graphs is not None:
            self._graphs.free()

    def _run_direction(
        self, ops, variant, p, xs, h0, c0, valid, record=False, engine=None, step_masks=None
    ):
        """Through the graphs where the cell has them and the call's engine is theirs;
        a call with ``step_masks`` (zoneout, recurrent / input dropout, which the graphed
        engine refuses) or on another engine runs the array module cell's loop."""
        graphed = engine in (None, "cupy_graphed") and step_masks is None
        if self._graphs is None or not graphed:
            kwargs = {} if engine is None else {"engine": engine}
            return super()._run_direction(
                ops, variant, p, xs, h0, c0, valid, record, step_masks=step_masks, **kwargs
            )
        return self._graphs.run_direction(ops, variant, p, xs, h0, c0, valid, record)

    def _backward_direction(self, ops, variant, p, tape, dys, dh, dc, valid):
        if self._graphs is None or isinstance(tape, regularize.Tape):
            return super()._backward_direction(ops, variant, p, tape, dys, dh, dc, valid)
        return self._graphs.backward_direction(ops, variant, p, tape, dys, dh, dc, valid)
