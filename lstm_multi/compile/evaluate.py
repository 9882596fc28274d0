"""The reference evaluation of gate programs: a node-by-node interpreter on NumPy.

Every emitter's output (array code, CUDA C compiled on the host or by NVRTC,
Triton) is tested against this, the most direct reading of the program: walk
the nodes in order and apply each operation with NumPy. The sigmoid is the
two-branch form, exact in both tails, written here independently of
``lstm_multi.ops``.
"""

from __future__ import annotations

import numpy as np

from .derive import GatePrograms
from .trace import live_nodes


def _sigmoid(x):
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


_APPLY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "neg": lambda a: -a,
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "rsqrt": lambda a: 1 / np.sqrt(a),
    # a row's mean over its units (the last axis), kept as (..., 1): it broadcasts
    "mean": lambda a: np.mean(a, axis=-1, keepdims=True),
}


def evaluate(programs: GatePrograms, roots, values):
    """Values of the nodes ``roots`` given ``values`` (node id -> array) for the inputs."""
    known = dict(values)
    like = next(iter(values.values()))
    for node_id in live_nodes(programs.graph, roots, known):
        if node_id in known:
            continue
        node = programs.graph.nodes[node_id]
        if node.op == "const":
            known[node_id] = np.full_like(like, node.value)
        elif node.op == "input":
            raise KeyError(f"gate program: input {node.name!r} was not given")
        else:
            known[node_id] = _APPLY[node.op](*(known[a] for a in node.args))
    # a per-row value (B, 1) reads as the same number at every unit: give it the full shape,
    # as a fresh, writable array (a broadcast view is read-only, and callers write into
    # the results, as a graph replay copies into the captured outputs)
    return [_full_shape(known[r], like.shape) for r in roots]


def _full_shape(value, shape):
    full = np.broadcast_shapes(value.shape, shape)
    return value if value.shape == full else np.array(np.broadcast_to(value, full))


def evaluate_forward(programs: GatePrograms, inputs: dict):
    """``inputs`` by name (``programs.forward_inputs``) -> (h, c, saved tuple)."""
    values = {programs.inputs[name]: inputs[name] for name in programs.forward_inputs}
    h_id, c_id = programs.forward_outputs["h"], programs.forward_outputs["c"]
    h, c, *saved = evaluate(programs, [h_id, c_id, *programs.saved], values)
    return h, c, tuple(saved)


def evaluate_backward(programs: GatePrograms, inputs: dict, saved):
    """``inputs`` by name (``programs.backward_inputs``) and the saved values -> dict of
    ``programs.backward_outputs`` names to arrays."""
    values = {programs.inputs[name]: inputs[name] for name in programs.backward_inputs}
    values.update(zip(programs.saved, saved, strict=True))
    names = list(programs.backward_outputs)
    found = evaluate(programs, [programs.backward_outputs[n] for n in names], values)
    return dict(zip(names, found, strict=True))
