"""ONNX nodes for a variant's forward gate math: the body of an ONNX ``Scan`` step.

Pure, like the other emitters: the traced forward program in, a list of node
descriptions out, with no ONNX package imported (``lstm_multi.onnx`` turns them
into ``onnx`` nodes). Each operation of the program is one elementwise ONNX node::

    add -> Add   sub -> Sub   mul -> Mul   neg -> Neg   sigmoid -> Sigmoid   tanh -> Tanh

and the two operations beyond them: ``rsqrt`` -> ``Sqrt`` then ``Reciprocal``, and a row's
``mean`` -> ``ReduceMean`` over the last axis kept as (B, 1) (the axes read from the value
``AXES``, an int64 [-1] the caller defines once), which the elementwise nodes broadcast
against (B, H). Each constant is one scalar the caller materialises in the computation's
dtype (rounded once to it, as every other target does). Values are named after the
program's inputs (``z_i z_f z_g z_o c_prev`` and ``{param}_{row}``) and, inside,
``{prefix}v{node id}``; the outputs h_t and c_t are named by the caller.
"""

from __future__ import annotations

from typing import NamedTuple

from . import derive
from .derive import GatePrograms
from .trace import ARRAY_ONLY, PRIMITIVES, has_reductions, live_nodes

#: the program's operation -> the ONNX operator computing it elementwise
ONNX_OPS = {
    "add": "Add",
    "sub": "Sub",
    "mul": "Mul",
    "neg": "Neg",
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
}
assert set(ONNX_OPS) == set(PRIMITIVES) - set(ARRAY_ONLY)
#: the value holding ``ReduceMean``'s axes (an int64 tensor [-1]; the caller defines it)
AXES = "axes_last"


class OnnxNode(NamedTuple):
    """One ONNX node: ``op_type`` reading ``inputs`` and writing ``output`` (value names)."""

    op_type: str
    inputs: tuple[str, ...]
    output: str


class OnnxStep(NamedTuple):
    """The forward gate math as ONNX nodes.

    ``inputs``: the program's input names the nodes read, in ``forward_inputs`` order;
    ``constants``: value name -> float, scalars to materialise in the step's dtype;
    ``nodes``: in topological order; ``outputs``: ("h", "c") -> value name. An output that
    is an input or a constant itself (``h_t = c_prev``) gets an ``Identity`` node, so
    every output is written by a node of its own.
    """

    inputs: tuple[str, ...]
    constants: dict[str, float]
    nodes: tuple[OnnxNode, ...]
    outputs: dict[str, str]


def forward_step(programs: GatePrograms, outputs: dict[str, str], prefix: str = "") -> OnnxStep:
    """The nodes computing the forward program's h_t and c_t into ``outputs["h"]`` and
    ``outputs["c"]`` (value names chosen by the caller); ``prefix`` prefixes every
    internal name (so two steps can share a graph)."""
    derive.check_kernel_programs(programs, "ONNX emitter", reductions=True, split=True)
    graph = programs.graph
    input_ids = {node_id: name for name, node_id in programs.inputs.items()}
    roots = [programs.forward_outputs["h"], programs.forward_outputs["c"]]
    # with row reductions an output may be a per-row value (B, 1): it is computed under a
    # name of its own and expanded to c_prev's shape (B, H) into the caller's name
    widen = has_reductions(graph, roots)
    final = {
        programs.forward_outputs[key]: f"{prefix}{key}_row" if widen else outputs[key]
        for key in ("h", "c")
    }
    names: dict[int, str] = {}
    constants: dict[str, float] = {}
    nodes: list[OnnxNode] = []
    for node_id in live_nodes(graph, roots):
        node = graph.nodes[node_id]
        if node.op == "input":
            names[node_id] = input_ids[node_id]
        elif node.op == "const":
            names[node_id] = f"{prefix}k{node_id}"
            constants[names[node_id]] = float(node.value)
        else:
            out = final.get(node_id, f"{prefix}v{node_id}")
            args = tuple(names[a] for a in node.args)
            if node.op == "rsqrt":
                nodes.append(OnnxNode("Sqrt", args, f"{prefix}sqrt{node_id}"))
                nodes.append(OnnxNode("Reciprocal", (f"{prefix}sqrt{node_id}",), out))
            elif node.op == "mean":
                nodes.append(OnnxNode("ReduceMean", (*args, AXES), out))
            else:
                nodes.append(OnnxNode(ONNX_OPS[node.op], args, out))
            names[node_id] = out
    if widen:
        nodes.append(OnnxNode("Shape", ("c_prev",), f"{prefix}c_shape"))
    for key in ("h", "c"):  # an output that no operation computes, or a widened one
        node_id = programs.forward_outputs[key]
        if widen:
            nodes.append(OnnxNode("Expand", (names[node_id], f"{prefix}c_shape"), outputs[key]))
        elif names[node_id] != outputs[key]:
            nodes.append(OnnxNode("Identity", (names[node_id],), outputs[key]))
    used = {name for node in nodes for name in node.inputs}
    inputs = tuple(name for name in programs.forward_inputs if name in used)
    return OnnxStep(inputs, constants, tuple(nodes), dict(outputs))
