"""Replaying a direction's whole time loop from a captured device graph (CUDA graphs).

A per-step GPU path launches a few small kernels a step (a product and the
fused gate kernel), and from Python each launch costs more host time than the
GPU needs to run it: at T=512 the host, not the GPU, sets the pace. A CUDA
graph records the launches once and replays them with one call. This module
holds what is the same for every framework; the framework's capture itself
is a ``Capturer`` (``torch_graphs.TorchCudaCapturer``,
``cupy_graphs.CupyCapturer``).

``GraphedFunction(fn, capturer)`` replays ``fn(*args) -> outputs`` where the
arguments and outputs are trees (tuples, lists, dicts, None) of arrays:

* one graph per **signature**: every array leaf's shape, dtype and device, the
  tree's structure, the non-array leaves (a variant, a flag) by value, and the
  capturer's context (torch: the autocast state, the TF32 and matmul-precision
  settings, the current stream; CuPy: the current device and stream). A new
  signature runs ``fn`` directly ``warmup_calls`` times (the first call compiles
  kernels and creates library handles, which a capture must not do), and is
  captured on the next;
* on the arrays' own device: the warm-up, the capture and every replay run under
  ``capturer.on_device(leaves)`` (torch: ``torch.cuda.device`` of the CUDA
  tensors), so tensors on a GPU that is not the current one are captured and
  replayed where they live;
* a replay copies the arguments into the graph's static inputs, replays, and
  returns **copies** of the static outputs, so that what one call returned is
  not overwritten by the next (the tape of one forward must survive a second
  forward before its backward, as with gradient accumulation);
* thread-safe: the bookkeeping, each capture and each replay (copy in, replay,
  copy out) hold the function's lock, so two threads never write one graph's
  static inputs at once; direct calls run outside it. Calls on different streams
  have different signatures (the stream is in the context), so each stream
  replays its own graph and static inputs, ordered on that stream;
* a capture that fails (an operation the framework cannot record, a host
  synchronisation inside ``fn``) is remembered for that signature, reported
  once with a ``RuntimeWarning`` naming the reason, and ``fn`` runs directly
  from then on: a graph is an optimisation, never a new way to fail. Running
  out of device memory is not such a failure: it is raised
  (``capturer.is_out_of_memory``), as it would be without graphs;
* called while the caller is itself capturing a graph (``torch.cuda.graph``
  around a training step, ``torch.compile(mode="reduce-overhead")``), ``fn``
  runs directly and is recorded into the caller's graph: a capture cannot
  nest, and a failed one would spoil the caller's;
* **no thrash**: at most ``max_graphs`` graphs are captured (each holds its own
  memory: its inputs, outputs and temporaries). Past that, a signature not yet
  captured runs directly, and one ``RuntimeWarning`` (per ``notices`` set: one
  per cell) says so and how to avoid it. Graphs are never evicted to make room,
  since evicting and recapturing is the thrash: with sequence lengths that
  vary, each length a new signature, a least-recently-used cache recaptures on
  nearly every call, each capture costing more than the direct call it
  replaces. Pad or bucket the lengths to a few values instead;
* ``stats`` counts captures, replays, direct calls, failed captures, signatures
  seen and graphs held (a benchmark reads them to show that it replayed), and
  ``free()`` drops the graphs (their memory goes when the last reference does)
  and the limit's count: later calls capture again.

Graphs replay the arithmetic of a direct call on copies of its arguments: the
outputs are a direct call's (bit for bit where the arguments are laid out as
their copies are; tested with ``tests/doubles.py``'s ``EagerCapturer``, which
stands in for a device on the CPU).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import warnings

#: the counters of ``GraphedFunction.stats``, in order
STAT_NAMES = ("captures", "replays", "direct_calls", "failed_captures", "signatures", "graphs")


#: what an error's message says where a CUDA library ran out of device memory (cudaMalloc,
#: cuBLAS's workspace) without raising a ``MemoryError``
OUT_OF_MEMORY_MARKS = ("out of memory", "cudaErrorMemoryAllocation", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(error):
    """Whether ``error`` is running out of memory: a ``MemoryError`` (CuPy's
    ``OutOfMemoryError`` is one) or an error whose message says so."""
    return isinstance(error, MemoryError) or any(m in str(error) for m in OUT_OF_MEMORY_MARKS)


def empty_stats():
    """Every counter of ``GraphedFunction.stats`` at zero (what a cell without graphs reports)."""
    return dict.fromkeys(STAT_NAMES, 0)


def sum_stats(functions):
    """The ``stats`` of several ``GraphedFunction``s added up (a cell's forward and backward)."""
    total = empty_stats()
    for function in functions:
        for name, value in function.stats.items():
            total[name] += value
    return total


class Capturer:
    """What a framework supplies to ``GraphedFunction``.

    ``is_array(x)``, ``leaf_signature(x)`` (hashable: shape, dtype, device),
    ``clone(x)``, ``copy_into(dst, src)``, ``context()`` (hashable state that
    changes what ``fn`` launches or where: autocast, TF32, the current stream),
    ``on_device(leaves)`` (a context manager that makes the arrays' device the
    current one), ``is_out_of_memory(error)`` and ``capture(thunk) ->
    (replay, outputs)``: run ``thunk()`` under capture and return a function
    that replays it and the tree of outputs that the replay rewrites in place.
    """

    def context(self):
        return ()

    def capturing(self):
        """Whether the caller is itself recording a graph now (then ``GraphedFunction``
        neither captures nor replays: ``fn`` runs into the caller's graph)."""
        return False

    def on_device(self, leaves):
        """A context manager making the device of the array ``leaves`` current (none here)."""
        return contextlib.nullcontext()

    def is_out_of_memory(self, error):
        """Whether a capture's ``error`` is the device (or host) running out of memory,
        which ``GraphedFunction`` raises instead of running ``fn`` without a graph."""
        return is_out_of_memory(error)


def flatten(tree):
    """A tree of tuples, lists and dicts -> (leaves, structure)."""
    if isinstance(tree, dict):
        keys = tuple(tree)
        pairs = [flatten(tree[k]) for k in keys]
        return [x for leaves, _ in pairs for x in leaves], ("dict", keys, [s for _, s in pairs])
    if isinstance(tree, tuple | list):
        pairs = [flatten(x) for x in tree]
        kind = "tuple" if isinstance(tree, tuple) else "list"
        return [x for leaves, _ in pairs for x in leaves], (kind, len(tree), [s for _, s in pairs])
    return [tree], None


def unflatten(leaves, structure):
    """Inverse of ``flatten``."""
    it = iter(leaves)

    def build(node):
        if node is None:
            return next(it)
        kind, head, children = node
        items = [build(child) for child in children]
        if kind == "dict":
            return dict(zip(head, items, strict=True))
        return tuple(items) if kind == "tuple" else items

    return build(structure)


def _freeze(structure):
    """A hashable form of a ``flatten`` structure."""
    if structure is None:
        return None
    kind, head, children = structure
    return kind, head, tuple(_freeze(c) for c in children)


def stack_steps(stack, rs, caches):
    """A per-step tape stacked over time, so that it crosses a graph's boundary as a
    few arrays instead of several per step.

    rs: T recurrent inputs; caches: T tuples of a step's cached values;
    ``stack(list) -> array`` stacks along a new leading axis. Returns (rs (T, ...),
    fields: one (T, ...) array per cache entry, None where the entry is None).
    """
    width = len(caches[0]) if caches else 0
    fields = []
    for j in range(width):
        column = [cache[j] for cache in caches]
        fields.append(None if column[0] is None else stack(column))
    return stack(list(rs)), tuple(fields)


def unstack_steps(rs, fields):
    """Inverse of ``stack_steps``, as views: (rs list, caches list of tuples)."""
    steps = rs.shape[0]
    caches = [tuple(None if f is None else f[t] for f in fields) for t in range(steps)]
    return [rs[t] for t in range(steps)], caches


class _Graph:
    def __init__(self, replay, static_inputs, static_outputs, output_structure):
        self.replay = replay
        self.static_inputs = static_inputs
        self.static_outputs = static_outputs
        self.output_structure = output_structure


#: the ``notices`` entry of the warning that ``max_graphs`` was reached
LIMIT_NOTICE = "max_graphs"


class GraphedFunction:
    """``fn`` replayed from one captured graph per argument signature (module doc).

    warmup_calls: the direct calls of a new signature before it is captured (at least
    1); max_graphs: the most graphs captured until ``free()``; notices: a set shared
    by the functions of one cell (its forward and backward), so that the limit is
    warned about once for all of them.
    """

    def __init__(self, fn, capturer, warmup_calls=1, max_graphs=8, notices=None):
        if warmup_calls < 1:
            raise ValueError(
                f"warmup_calls: expected at least 1 (a capture must follow a direct call "
                f"that compiled the kernels), got {warmup_calls}"
            )
        if max_graphs < 1:
            raise ValueError(f"max_graphs: expected at least 1, got {max_graphs}")
        self.fn, self.capturer = fn, capturer
        self.warmup_calls, self.max_graphs = warmup_calls, max_graphs
        self.notices = set() if notices is None else notices
        self.graphs = {}  # signature -> _Graph
        self.failures = {}  # signature -> why its capture failed
        self.calls = collections.Counter()  # signature -> calls so far
        self.captures = self.replays = self.direct_calls = 0
        self._lock = threading.RLock()

    def __getstate__(self):
        """Pickled and copied without its graphs (device state) and its counts: a copy
        captures its own."""
        state = dict(self.__dict__, graphs={}, failures={}, calls=collections.Counter())
        state.update(captures=0, replays=0, direct_calls=0)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    @property
    def stats(self):
        """{"captures", "replays", "direct_calls", "failed_captures", "signatures", "graphs"}:
        graphs captured and replays since this function was made, calls run without a
        graph (warm-ups, failed or refused captures, inside the caller's capture),
        signatures whose capture failed, signatures seen, graphs held now."""
        with self._lock:
            return {
                "captures": self.captures,
                "replays": self.replays,
                "direct_calls": self.direct_calls,
                "failed_captures": len(self.failures),
                "signatures": len(self.calls),
                "graphs": len(self.graphs),
            }

    def free(self):
        """Drop every graph (its device memory is released with the last reference to it:
        in torch, ``torch.cuda.empty_cache()`` then returns it to the device). The
        counters stay; a signature seen before is captured again on its next call."""
        with self._lock:
            self.graphs.clear()
            self.notices.discard(LIMIT_NOTICE)

    def _signature(self, leaves, structure):
        is_array, sig = self.capturer.is_array, self.capturer.leaf_signature
        parts = tuple(("array", sig(x)) if is_array(x) else ("value", x) for x in leaves)
        return _freeze(structure), parts, self.capturer.context()

    def __call__(self, *args):
        leaves, structure = flatten(args)
        with self.capturer.on_device(leaves):
            if self.capturer.capturing():  # inside the caller's own capture: be recorded by it
                with self._lock:
                    self.direct_calls += 1
                return self.fn(*args)
            key = self._signature(leaves, structure)
            with self._lock:
                self.calls[key] += 1
                graph = self.graphs.get(key)
                if graph is None and self._may_capture(key):
                    graph = self._capture(key, leaves, structure)
                if graph is not None:
                    return self._replay(graph, leaves)
                self.direct_calls += 1
            return self.fn(*args)

    def _may_capture(self, key):
        """Whether ``key`` (not captured) is captured now: past its warm-up, not failed
        before, and under the limit (warned about once where it is reached)."""
        if key in self.failures or self.calls[key] <= self.warmup_calls:
            return False
        if len(self.graphs) < self.max_graphs:
            return True
        if LIMIT_NOTICE not in self.notices:
            self.notices.add(LIMIT_NOTICE)
            warnings.warn(
                f"lstm_multi: {len(self.graphs)} device graphs captured, the most kept "
                f"(max_graphs={self.max_graphs}), and {len(self.calls)} argument signatures "
                "seen: calls of a shape without a graph now run directly. The sequence "
                "lengths or batch sizes vary: pad or bucket them to a few values so that "
                "each is replayed, or free the graphs (free_graphs()) to capture the next "
                "shapes. Warned once.",
                RuntimeWarning,
                stacklevel=4,
            )
        return False

    def _capture(self, key, leaves, structure):
        capturer = self.capturer
        static = [capturer.clone(x) if capturer.is_array(x) else x for x in leaves]
        static_args = unflatten(static, structure)
        try:
            replay, outputs = capturer.capture(lambda: self.fn(*static_args))
        except Exception as error:  # any failure to record: run directly from now on
            if capturer.is_out_of_memory(error):
                raise  # as a direct call would: not a reason to give up the graph
            self.failures[key] = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"lstm_multi: capturing a device graph failed ({self.failures[key]}); "
                "this shape runs without one",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        out_leaves, out_structure = flatten(outputs)
        graph = _Graph(replay, static, out_leaves, out_structure)
        self.graphs[key] = graph
        self.captures += 1
        return graph

    def _replay(self, graph, leaves):
        capturer = self.capturer
        for dst, src in zip(graph.static_inputs, leaves, strict=True):
            if capturer.is_array(src):
                capturer.copy_into(dst, src)
        graph.replay()
        self.replays += 1
        out = [capturer.clone(x) if capturer.is_array(x) else x for x in graph.static_outputs]
        return unflatten(out, graph.output_structure)
