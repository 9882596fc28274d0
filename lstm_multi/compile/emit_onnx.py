"""ONNX nodes for a variant's forward gate math: the body of an ONNX ``Scan`` step.

Pure, like the other emitters: the traced forward program in, a list of node
descriptions out, with no ONNX package imported (``lstm_multi.onnx`` turns them
into ``onnx`` nodes). Each operation of the program is one elementwise ONNX node::

    add -> Add   sub -> Sub   mul -> Mul   neg -> Neg   sigmoid -> Sigmoid   tanh -> Tanh

and each constant one scalar the caller materialises in the computation's dtype
(rounded once to it, as every other target does). Values are named after the
program's inputs (``z_i z_f z_g z_o c_prev`` and ``{param}_{row}``) and, inside,
``{prefix}v{node id}``; the outputs h_t and c_t are named by the caller.
"""

from __future__ import annotations

from typing import NamedTuple

from . import derive
from .derive import GatePrograms
from .trace import ARRAY_ONLY, PRIMITIVES, live_nodes

#: the program's operation -> the ONNX operator computing it elementwise
ONNX_OPS = {
    "add": "Add",
    "sub": "Sub",
    "mul": "Mul",
    "neg": "Neg",
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
}
# the row reductions and rsqrt are not written here yet (``derive.check_kernel_programs``)
assert set(ONNX_OPS) == set(PRIMITIVES) - set(ARRAY_ONLY)


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
    derive.check_kernel_programs(programs, "ONNX emitter")
    graph = programs.graph
    input_ids = {node_id: name for name, node_id in programs.inputs.items()}
    roots = [programs.forward_outputs["h"], programs.forward_outputs["c"]]
    final = {programs.forward_outputs[key]: outputs[key] for key in ("h", "c")}
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
            nodes.append(OnnxNode(ONNX_OPS[node.op], tuple(names[a] for a in node.args), out))
            names[node_id] = out
    for key in ("h", "c"):  # an output that no operation computes
        node_id = programs.forward_outputs[key]
        if names[node_id] != outputs[key]:
            nodes.append(OnnxNode("Identity", (names[node_id],), outputs[key]))
    used = {name for node in nodes for name in node.inputs}
    inputs = tuple(name for name in programs.forward_inputs if name in used)
    return OnnxStep(inputs, constants, tuple(nodes), dict(outputs))
