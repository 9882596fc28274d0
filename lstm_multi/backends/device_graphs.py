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
  capturer's context (torch: the autocast state). A new signature runs ``fn``
  directly ``warmup_calls`` times (the first call compiles kernels and creates
  library handles, which a capture must not do), and is captured on the next;
* a replay copies the arguments into the graph's static inputs, replays, and
  returns **copies** of the static outputs, so that what one call returned is
  not overwritten by the next (the tape of one forward must survive a second
  forward before its backward, as with gradient accumulation);
* a capture that fails (an operation the framework cannot record, a host
  synchronisation inside ``fn``) is remembered for that signature, reported
  once with a ``RuntimeWarning`` naming the reason, and ``fn`` runs directly
  from then on: a graph is an optimisation, never a new way to fail;
* called while the caller is itself capturing a graph (``torch.cuda.graph``
  around a training step, ``torch.compile(mode="reduce-overhead")``), ``fn``
  runs directly and is recorded into the caller's graph: a capture cannot
  nest, and a failed one would spoil the caller's;
* at most ``max_graphs`` graphs are kept (least recently used dropped first):
  each holds its own memory (its inputs, outputs and temporaries), so a
  workload with many sequence lengths does not grow without bound.

Graphs replay the arithmetic bit for bit: a replay's outputs equal a direct
call's (tested with ``tests/doubles.py``'s ``EagerCapturer``, which stands in for a device on
the CPU).
"""

from __future__ import annotations

import collections
import warnings


class Capturer:
    """What a framework supplies to ``GraphedFunction``.

    ``is_array(x)``, ``leaf_signature(x)`` (hashable: shape, dtype, device),
    ``clone(x)``, ``copy_into(dst, src)``, ``context()`` (hashable state that
    changes what ``fn`` launches, e.g. autocast) and ``capture(thunk) ->
    (replay, outputs)``: run ``thunk()`` under capture and return a function
    that replays it and the tree of outputs that the replay rewrites in place.
    """

    def context(self):
        return ()

    def capturing(self):
        """Whether the caller is itself recording a graph now (then ``GraphedFunction``
        neither captures nor replays: ``fn`` runs into the caller's graph)."""
        return False


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


class GraphedFunction:
    """``fn`` replayed from one captured graph per argument signature (module doc)."""

    def __init__(self, fn, capturer, warmup_calls=1, max_graphs=8):
        if warmup_calls < 1:
            raise ValueError(
                f"warmup_calls: expected at least 1 (a capture must follow a direct call "
                f"that compiled the kernels), got {warmup_calls}"
            )
        if max_graphs < 1:
            raise ValueError(f"max_graphs: expected at least 1, got {max_graphs}")
        self.fn, self.capturer = fn, capturer
        self.warmup_calls, self.max_graphs = warmup_calls, max_graphs
        self.graphs = collections.OrderedDict()  # signature -> _Graph
        self.direct_calls = collections.Counter()  # signature -> calls run directly so far
        self.failures = {}  # signature -> why its capture failed
        self.replays = 0

    def _signature(self, leaves, structure):
        is_array, sig = self.capturer.is_array, self.capturer.leaf_signature
        parts = tuple(("array", sig(x)) if is_array(x) else ("value", x) for x in leaves)
        return _freeze(structure), parts, self.capturer.context()

    def __call__(self, *args):
        if self.capturer.capturing():  # inside the caller's own capture: be recorded by it
            return self.fn(*args)
        leaves, structure = flatten(args)
        key = self._signature(leaves, structure)
        graph = self.graphs.get(key)
        if graph is None:
            if key in self.failures or self.direct_calls[key] < self.warmup_calls:
                self.direct_calls[key] += 1
                return self.fn(*args)
            graph = self._capture(key, leaves, structure)
            if graph is None:
                return self.fn(*args)
        self.graphs.move_to_end(key)
        return self._replay(graph, leaves)

    def _capture(self, key, leaves, structure):
        capturer = self.capturer
        static = [capturer.clone(x) if capturer.is_array(x) else x for x in leaves]
        static_args = unflatten(static, structure)
        try:
            replay, outputs = capturer.capture(lambda: self.fn(*static_args))
        except Exception as error:  # any failure to record: run directly from now on
            self.failures[key] = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"lstm_multi: capturing a device graph failed ({self.failures[key]}); "
                "this shape runs without one",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        out_leaves, out_structure = flatten(outputs)
        graph = _Graph(replay, static, out_leaves, out_structure)
        self.graphs[key] = graph
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
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
