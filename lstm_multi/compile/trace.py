"""Tracing gate math into a straight-line program (an expression DAG).

A variant's gate math is an ordinary Python function of per-unit quantities
(the preactivations ``z.i z.f z.g z.o``, the previous cell state ``c_prev`` and
the rows of the variant's own per-unit parameters). Called on ``Expr`` values
instead of numbers, it records each operation as a node of a ``Graph``:

    i = sigmoid(z.i + p.i * c_prev)        add(z_i, mul(p_i, c_prev)) -> sigmoid

The graph is hash-consed: an operation applied to the same arguments twice is
one node (``a * b`` and ``b * a`` too, both operations being commutative in
IEEE arithmetic), so common subexpressions are shared by construction. Small
identities are applied as nodes are made (``x + 0``, ``x * 1``, ``x * 0``,
``0 - x``, ``-(-x)``, ``a + (-b)`` as ``a - b``, constants folded), which keeps derived programs free of
work on known zeros.

The operations are ``+ - *``, unary ``-``, ``sigmoid``, ``tanh`` and ``rsqrt``
(1 / sqrt(x)), with finite float constants, and one reduction: ``mean(x)``, the
mean of the per-unit value ``x`` over the H units of the row (of one sequence's
state), a per-row value that then reads as the same number at every unit (so
``x - mean(x)`` centres a row, and ``mean(x * x)`` is its mean square). A node
is *per-row* when it is a ``mean`` or an operation of per-row values and
constants only (``row_valued``); the emitters hold such a value once a row
((B, 1) in array code) and broadcast it where it meets per-unit values.

Every emitter writes the element-wise operations, ``mean`` and ``rsqrt``: the
array code (NumPy, PyTorch, JAX, CuPy arrays), the C++ CPU kernels (a row
function in phases, ``emit_cpu``) and CuPy's CUDA C (row kernels, ``emit_cuda``;
both phase the row as ``row_phases`` says), Triton (a program takes whole rows;
a mean is a masked sum over the row, ``emit_triton``), the Pallas kernels (whole
rows a program, ``jax_pallas``) and ONNX (``emit_onnx``). An emitter that meets
an operation it does not write refuses it by name (``GatePrograms.kernel_refusal``).
A constant is held as the Python float (a double) it was written as; every
target writes it exactly and rounds it once to its computation type, as NumPy's
``np.full_like(x, k)`` does (``evaluate``): in a float32 kernel 1e60 is inf and
5e-324 is 0, as in float32 arithmetic. A constant that is not finite (nan, inf,
or one that folding makes infinite, ``1e200 * 1e200``) is refused here with a
ValueError naming it: it would be a silent nan in every output.
Anything else (division, comparisons, ``if`` on a traced value) raises a
TypeError naming what was used, because a kernel could not express it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

#: operation name -> number of arguments
PRIMITIVES = {
    "add": 2,
    "sub": 2,
    "mul": 2,
    "neg": 1,
    "sigmoid": 1,
    "tanh": 1,
    "rsqrt": 1,
    "mean": 1,
}
#: operations that reduce over the units of a row
REDUCTIONS = ("mean",)
#: operations only the array emitter writes so far (the kernel emitters refuse them)
ARRAY_ONLY = ("mean", "rsqrt")
_COMMUTATIVE = ("add", "mul")


class Node(NamedTuple):
    """One node: an input (``op == "input"``, ``name``), a constant (``value``) or an operation."""

    op: str
    args: tuple[int, ...] = ()
    value: float | None = None
    name: str | None = None


class Graph:
    """Nodes in creation order (every node after its arguments: a topological order)."""

    def __init__(self):
        self.nodes: list[Node] = []
        self._index: dict[Node, int] = {}

    def _add(self, node: Node) -> Expr:
        found = self._index.get(node)
        if found is None:
            found = len(self.nodes)
            self.nodes.append(node)
            self._index[node] = found
        return Expr(self, found)

    def input(self, name: str) -> Expr:
        return self._add(Node("input", name=name))

    def const(self, value, origin=None) -> Expr:
        """The constant ``value`` (finite, as a float); ``origin`` describes where it came
        from, for the error when it is not finite."""
        try:
            number = float(value)
        except OverflowError:  # an int beyond the doubles
            number = math.inf
        if not math.isfinite(number):
            raise ValueError(
                f"gate math: constant {origin or repr(value)}: expected a finite number, "
                f"got {number!r} (nan and inf constants are refused: every output would be "
                "nan or inf)"
            )
        return self._add(Node("const", value=number))

    def value_of(self, node_id):
        """The constant a node holds, or None when it is not a constant."""
        node = self.nodes[node_id]
        return node.value if node.op == "const" else None

    def apply(self, op: str, *args: Expr) -> Expr:
        """``op`` of ``args`` with the identities above applied, as a (shared) node."""
        ids = tuple(a.id for a in args)
        consts = [self.value_of(i) for i in ids]
        if all(v is not None for v in consts):
            origin = f"{op}({', '.join(map(repr, consts))})"
            return self.const(_fold(op, consts), origin)
        simpler = self._simplify(op, args, consts)
        if simpler is not None:
            return simpler
        if op in _COMMUTATIVE:
            ids = tuple(sorted(ids))
        return self._add(Node(op, ids))

    def _simplify(self, op, args, consts):
        if op == "add":
            a, b = args
            if consts[0] == 0:
                return b
            if consts[1] == 0:
                return a
            # a + (-b) = a - b exactly in IEEE arithmetic: one operation, not two
            if self.nodes[b.id].op == "neg":
                return self.apply("sub", a, Expr(self, self.nodes[b.id].args[0]))
            if self.nodes[a.id].op == "neg":
                return self.apply("sub", b, Expr(self, self.nodes[a.id].args[0]))
        elif op == "sub":
            a, b = args
            if consts[1] == 0:
                return a
            if consts[0] == 0:
                return self.apply("neg", b)
            if a.id == b.id:
                return self.const(0)
            if self.nodes[b.id].op == "neg":  # a - (-b) = a + b
                return self.apply("add", a, Expr(self, self.nodes[b.id].args[0]))
        elif op == "mul":
            a, b = args
            for k, other in ((0, b), (1, a)):
                if consts[k] == 0:
                    return self.const(0)
                if consts[k] == 1:
                    return other
                if consts[k] == -1:
                    return self.apply("neg", other)
        elif op == "neg":
            node = self.nodes[args[0].id]
            if node.op == "neg":
                return Expr(self, node.args[0])
        elif op == "mean":  # the mean of a row's mean is that mean
            if self.nodes[args[0].id].op == "mean":
                return args[0]
        return None


def _fold(op, values):
    if op == "add":
        return values[0] + values[1]
    if op == "sub":
        return values[0] - values[1]
    if op == "mul":
        return values[0] * values[1]
    if op == "neg":
        return -values[0]
    if op == "sigmoid":  # e = exp(-|x|) cannot overflow (math.exp would raise)
        e = math.exp(-abs(values[0]))
        return 1.0 / (1.0 + e) if values[0] >= 0 else e / (1.0 + e)
    if op == "tanh":
        return math.tanh(values[0])
    if op == "rsqrt":
        if values[0] <= 0:
            raise ValueError(
                f"gate math: rsqrt({values[0]!r}): expected a positive number (1 / sqrt of "
                "zero or a negative number is inf or nan)"
            )
        return 1.0 / math.sqrt(values[0])
    if op == "mean":  # the mean of a constant over the row is the constant
        return values[0]
    raise ValueError(f"unknown operation {op!r}")


class Expr:
    """A traced per-unit value: arithmetic on it records nodes in its graph."""

    __slots__ = ("graph", "id")

    def __init__(self, graph: Graph, node_id: int):
        self.graph = graph
        self.id = node_id

    def _lift(self, other):
        if isinstance(other, Expr):
            if other.graph is not self.graph:
                raise ValueError("gate math: values from two different traces were mixed")
            return other
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return self.graph.const(other)
        raise TypeError(
            f"gate math: expected a traced value or a number, got {type(other).__name__}"
        )

    def __add__(self, other):
        return self.graph.apply("add", self, self._lift(other))

    def __radd__(self, other):
        return self.graph.apply("add", self._lift(other), self)

    def __sub__(self, other):
        return self.graph.apply("sub", self, self._lift(other))

    def __rsub__(self, other):
        return self.graph.apply("sub", self._lift(other), self)

    def __mul__(self, other):
        return self.graph.apply("mul", self, self._lift(other))

    def __rmul__(self, other):
        return self.graph.apply("mul", self._lift(other), self)

    def __neg__(self):
        return self.graph.apply("neg", self)

    def __pos__(self):
        return self

    def _refuse(self, what):
        raise TypeError(
            f"gate math: {what} is not in the traced subset (+, -, *, unary -, sigmoid, "
            "tanh, rsqrt, float constants and the row mean lstm_multi.mean); not allowed: "
            "division (write x * rsqrt(y * y) or a constant's inverse), **, comparisons, "
            "branches on traced values, other functions, and reductions other than the "
            "mean over a row's units"
        )

    def __truediv__(self, other):
        self._refuse("division")

    __rtruediv__ = __floordiv__ = __rfloordiv__ = __truediv__

    def __pow__(self, other):
        self._refuse("** (write x * x)")

    __rpow__ = __pow__

    def __bool__(self):
        self._refuse("branching on a traced value (if/and/or/comparison)")

    def __lt__(self, other):
        self._refuse("comparison")

    __le__ = __gt__ = __ge__ = __lt__

    def __array__(self, *args, **kwargs):
        self._refuse("a NumPy function (use lstm_multi.sigmoid / lstm_multi.tanh)")

    def __repr__(self):
        node = self.graph.nodes[self.id]
        return f"Expr(#{self.id} {node.name or node.op})"


def _unary(op, x, on_number):
    if isinstance(x, Expr):
        return x.graph.apply(op, x)
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return on_number(float(x))
    raise TypeError(
        f"{op}: expected a traced gate-math value or a number, got {type(x).__name__} "
        "(lstm_multi.sigmoid, tanh, rsqrt and mean are for a Variant's gate math; "
        "on arrays use the array library's own)"
    )


def sigmoid(x):
    """The logistic function 1 / (1 + exp(-x)), for gate math."""
    return _unary("sigmoid", x, lambda v: _fold("sigmoid", [v]))


def tanh(x):
    """The hyperbolic tangent, for gate math."""
    return _unary("tanh", x, math.tanh)


def rsqrt(x):
    """1 / sqrt(x), for gate math (x must be positive: add an epsilon, ``rsqrt(v + 1e-5)``).
    Its derivative is -x^(-3/2) / 2, written with its output y as -y^3 / 2."""
    return _unary("rsqrt", x, lambda v: _fold("rsqrt", [v]))


def mean(x):
    """The mean over the H units of the row of the per-unit value ``x``, for gate math.

    The result is one number per row (per sequence of the batch), read as the same
    value at every unit: ``x - mean(x)`` centres the row, ``mean(d * d)`` of a centred
    ``d`` is its (biased) variance. A mean over the 4H preactivations of a step is the
    mean of the gates' sum over 4: ``0.25 * mean(z.i + z.f + z.g + z.o)``. The
    derivative spreads each row's gradient sum evenly: d mean(x) / d x_j = 1 / H.
    """
    return _unary("mean", x, float)


def row_valued(graph: Graph, node_ids) -> set[int]:
    """The nodes among ``node_ids`` (and what they depend on) that are per-row values: a
    ``mean``, or an operation whose arguments are all per-row values or constants. A
    constant alone is not listed (it is neither: every emitter writes it in place)."""
    found: set[int] = set()
    for node_id in live_nodes(graph, node_ids):
        node = graph.nodes[node_id]
        if node.op == "mean":
            found.add(node_id)
        elif node.op in PRIMITIVES and all(
            a in found or graph.nodes[a].op == "const" for a in node.args
        ):
            found.add(node_id)
    return found


def has_reductions(graph: Graph, roots) -> bool:
    """Whether computing ``roots`` reduces over a row (a ``mean`` node)."""
    return any(graph.nodes[n].op in REDUCTIONS for n in live_nodes(graph, roots))


def array_only_operations(graph: Graph, roots) -> list[str]:
    """The operations among those ``roots`` depend on that only the array emitter writes
    (``ARRAY_ONLY``), sorted; empty where every kernel emitter can write them all."""
    return sorted({graph.nodes[n].op for n in live_nodes(graph, roots)} & set(ARRAY_ONLY))


def live_nodes(graph: Graph, roots, given=()) -> list[int]:
    """Ids of the nodes ``roots`` depend on (themselves included), in topological order.

    Nodes in ``given`` are known values: they are listed, what they depend on is not.
    """
    given = set(given)
    seen = set()
    stack = list(roots)
    while stack:
        node_id = stack.pop()
        if node_id in seen:
            continue
        seen.add(node_id)
        if node_id not in given:
            stack.extend(graph.nodes[node_id].args)
    return sorted(seen)


def operation_count(graph: Graph, roots, given=()) -> int:
    """Operations computed to obtain ``roots`` when the nodes in ``given`` are known."""
    given = set(given)
    count = 0
    seen = set()
    stack = list(roots)
    while stack:
        node_id = stack.pop()
        if node_id in seen or node_id in given:
            continue
        seen.add(node_id)
        node = graph.nodes[node_id]
        if node.op in PRIMITIVES:
            count += 1
            stack.extend(node.args)
    return count
