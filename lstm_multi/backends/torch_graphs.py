"""The torch generic path's per-step loop replayed from CUDA graphs (the ``graphed_*`` engines).

On a GPU the per-step path (``torch_bptt.LoopEngine``: a product and one
fused gate kernel a step, forward and backward) is bound by the host: each
launch from Python costs more than the kernel it launches. ``GraphedLoopEngine``
captures a direction's whole forward (with its tape) and whole backward, each
as one ``torch.cuda.CUDAGraph`` per signature (``lstm_multi.backends.device_graphs``),
and replays them: one host call per direction instead of a few per step.

What changes for the caller: nothing but speed. A replay computes what the
direct call computes, on contiguous copies of its tensors: bit for bit where
they are contiguous; where they are not (``lstm_multi.torch.LSTM`` passes its
weights as transposed views) a product may round its last bit differently, as
a BLAS picks its kernel by layout and alignment. Outputs are copies (a second
forward does not overwrite the first's tape); autograd, repeated backward and
double backward are those of ``torch_bptt.BpttDirection``. The tape crosses the
graph boundary stacked, a few (T, ...) tensors instead of several per step, so
that copying it in and out is a few launches, not T.

What a graph is keyed on, besides the tensors' shapes, dtypes and devices
(``TorchCudaCapturer.context``): ``precision_settings()`` (autocast, TF32 for
cuBLAS and cuDNN, ``torch.get_float32_matmul_precision()``, the reduced-precision
reductions), which choose the kernels a capture records, so that changing them
between calls captures anew instead of replaying the old kernels; and the
current stream, so that each stream replays its own graph. The capture and its
replays run under ``torch.cuda.device`` of the tensors: tensors on a GPU other
than the current one are captured and replayed on their own.

Whose graphs: each cell's (``torch_backend.Cell``) and each module's
(``lstm_multi.torch.LSTM``) own ``CellGraphs``, made on the first call of a
graphed engine, not the process's. So the limit on graphs (``MAX_GRAPHS`` each
way, ``device_graphs``: past it new shapes run directly, warned once per cell)
counts one model's shapes, the memory the graphs hold goes with the cell, and
``cell.graph_stats()`` (captures, replays, direct calls, failed captures,
signatures, graphs held: a benchmark row shows with it that it replayed) and
``cell.free_graphs()`` are the cell's. A copy or an unpickled cell starts with no
graphs. Several threads may call one cell (``nn.DataParallel``'s replicas share
it): each graph's replay holds its lock.

Where it applies: CUDA tensors on the per-step path. The persistent kernels
(``torch_triton.PersistentEngine``: one launch a direction already) and CPU
tensors run as without graphs. The first call of a new shape runs directly
(it compiles the kernels), the second captures, later ones replay; a capture
that fails warns once and that shape runs directly; running out of memory
during a capture raises ``torch.cuda.OutOfMemoryError`` as a direct call would.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from .device_graphs import (
    Capturer,
    GraphedFunction,
    empty_stats,
    is_out_of_memory,
    stack_steps,
    sum_stats,
    unstack_steps,
)
from .torch_bptt import LoopEngine, _flatten_tape, _unflatten_tape, direction_runner

#: the graphs a cell captures each way (forward, backward) per graphed engine before
#: new shapes run directly (``device_graphs.GraphedFunction``'s ``max_graphs``): a
#: two-layer model's training and evaluation calls at one shape take four forward
#: signatures (the first layer's input width, the others'; with and without a tape)
MAX_GRAPHS = 8


def _legacy_or_new(legacy, new):
    """A TF32 setting as the legacy API reads it, or, where torch refuses that read (the
    new ``fp32_precision`` API set it, and the two were mixed), as the new API does."""
    try:
        return legacy()
    except RuntimeError:
        return "fp32_precision", new()


def precision_settings():
    """The process-wide settings that choose which kernels a capture records (hashable):
    autocast on CUDA and its dtype; ``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.get_float32_matmul_precision()``, ``torch.backends.cudnn.allow_tf32`` (read
    through newer torch's ``fp32_precision`` where those refuse to be read), and the
    fp16/bf16 reduced-precision reductions."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn

    def new(backend):
        return lambda: getattr(backend, "fp32_precision", None)

    return (
        torch.is_autocast_enabled("cuda"),
        torch.get_autocast_dtype("cuda"),
        _legacy_or_new(lambda: matmul.allow_tf32, new(matmul)),
        _legacy_or_new(torch.get_float32_matmul_precision, new(matmul)),
        _legacy_or_new(lambda: cudnn.allow_tf32, new(cudnn)),
        matmul.allow_fp16_reduced_precision_reduction,
        matmul.allow_bf16_reduced_precision_reduction,
    )


def cuda_device_of(tensors):
    """The device of the first CUDA tensor among ``tensors``, or None."""
    return next((t.device for t in tensors if t.is_cuda), None)


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
        """``precision_settings()`` and the current stream (of the current device, which
        ``on_device`` made the tensors'); no stream where CUDA is not available."""
        stream = torch.cuda.current_stream() if torch.cuda.is_available() else None
        return (*precision_settings(), None if stream is None else stream.stream_id)

    def on_device(self, leaves):
        device = cuda_device_of([x for x in leaves if self.is_array(x)])
        return contextlib.nullcontext() if device is None else torch.cuda.device(device)

    def is_out_of_memory(self, error):
        return isinstance(error, torch.cuda.OutOfMemoryError) or is_out_of_memory(error)

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

    Same interface as ``LoopEngine``; its tape is ``stack_tape``'s. ``capturer``
    defaults to CUDA's; the tests pass their ``EagerCapturer`` (``tests/doubles.py``).
    ``max_graphs`` bounds the graphs each way; ``notices``: the set, shared by a
    cell's engines, that makes the limit's warning one per cell.
    """

    def __init__(self, ops, capturer=None, max_graphs=MAX_GRAPHS, notices=None):
        self.loop = LoopEngine(ops)
        capturer = capturer or TorchCudaCapturer()
        notices = set() if notices is None else notices
        self.graphed_forward = GraphedFunction(
            self._forward, capturer, max_graphs=max_graphs, notices=notices
        )
        self.graphed_backward = GraphedFunction(
            self._backward, capturer, max_graphs=max_graphs, notices=notices
        )

    def _forward(self, variant, p, xs, h0, c0, valid, record):
        ys, h, c, tape = self.loop.forward(variant, p, xs, h0, c0, valid, record)
        return ys, h, c, (stack_tape(tape, xs.shape[0]) if record else ())

    def _backward(self, variant, p, stacked, dys, dh, dc, valid):
        return self.loop.backward(variant, p, unstack_tape(stacked), dys, dh, dc, valid)

    def forward(self, variant, p, xs, h0, c0, valid, record):
        return self.graphed_forward(variant, p, xs, h0, c0, valid, record)

    def backward(self, variant, p, tape, dys, dh, dc, valid):
        return self.graphed_backward(variant, p, tuple(tape), dys, dh, dc, valid)

    def stats(self):
        """The forward's and backward's ``GraphedFunction.stats`` added up."""
        return sum_stats((self.graphed_forward, self.graphed_backward))

    def free(self):
        """Drop the forward's and backward's graphs (``GraphedFunction.free``)."""
        self.graphed_forward.free()
        self.graphed_backward.free()


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


class CellGraphs:
    """The CUDA graphs of one cell or module (module doc): one ``GraphedLoopEngine``
    per graphed engine the cell has run, made on that engine's first call.

    ``capturer`` (default CUDA's), ``applies`` (default: every tensor on CUDA) and
    ``max_graphs`` are handed to the engines; the tests give a CPU capturer and an
    ``applies`` that takes CPU tensors. Pickled and copied as a new, empty one.
    """

    def __init__(self, capturer=None, applies=None, max_graphs=MAX_GRAPHS):
        self.capturer, self.applies, self.max_graphs = capturer, applies, max_graphs
        self.notices = set()  # shared by the engines: the limit is warned about once a cell
        self.engines = {}  # engine name -> (run_direction, GraphedLoopEngine)
        self._lock = threading.Lock()

    def __reduce__(self):
        return type(self), (self.capturer, self.applies, self.max_graphs)

    def runner(self, name, ops, cpu_kernels, base_engine_for=None):
        """The ``run_direction`` of the graphed engine ``name``: ``torch_bptt``'s runner over
        ``ops`` (with ``cpu_kernels``, ``base_engine_for``) with the per-step loop replayed
        from this cell's graphs."""
        with self._lock:
            entry = self.engines.get(name)
            if entry is None:
                engine = GraphedLoopEngine(ops, self.capturer, self.max_graphs, self.notices)
                engine_for = graphed_engine_for(engine, base_engine_for, self.applies)
                entry = self.engines[name] = (
                    direction_runner(ops, cpu_kernels, engine_for),
                    engine,
                )
        return entry[0]

    def stats(self):
        """``device_graphs.STAT_NAMES`` summed over the engines (all zero before any ran)."""
        return sum_stats(
            function
            for engine in self._engines()
            for function in (engine.graphed_forward, engine.graphed_backward)
        )

    def free(self):
        """Drop every graph (``GraphedFunction.free``); later calls capture again."""
        for engine in self._engines():
            engine.free()

    def _engines(self):
        with self._lock:
            return [engine for _, engine in self.engines.values()]


class GraphOwner:
    """What a torch cell or module with graphed engines has (a mixin): its own
    ``CellGraphs``, made on first use, ``graph_stats()`` and ``free_graphs()``."""

    _graphs_lock = threading.Lock()

    def _make_graphs(self):
        """This cell's graph cache; the tests override it to capture with a CPU stand-in."""
        return CellGraphs()

    def __getstate__(self):
        # pickled (torch.save, copy.deepcopy) without its graphs: device state, which a
        # copy captures anew (and which torch.load's weights_only default would refuse)
        state = dict(super().__getstate__())
        state.pop("_graph_cache", None)
        return state

    def _graphs_for(self, engine):
        """This cell's ``CellGraphs`` where ``engine`` replays graphs, else None."""
        return self._graphs() if engine.startswith("graphed_") else None

    def _graphs(self):
        graphs = self.__dict__.get("_graph_cache")
        if graphs is None:
            with GraphOwner._graphs_lock:
                graphs = self.__dict__.get("_graph_cache")
                if graphs is None:
                    graphs = self.__dict__["_graph_cache"] = self._make_graphs()
        return graphs

    def graph_stats(self):
        """This cell's CUDA-graph counters, summed over its graphed engines and both ways:
        {"captures", "replays", "direct_calls", "failed_captures", "signatures",
        "graphs"} (``device_graphs.GraphedFunction.stats``); all zero where no graphed
        engine ran (a call that ran ``replays`` > 0 replayed)."""
        graphs = self.__dict__.get("_graph_cache")
        return empty_stats() if graphs is None else graphs.stats()

    def free_graphs(self):
        """Drop this cell's CUDA graphs and the memory they hold (once nothing else
        refers to it; ``torch.cuda.empty_cache()`` then returns it to the device).
        Later calls capture again."""
        graphs = self.__dict__.get("_graph_cache")
        if graphs is not None:
            graphs.free()
