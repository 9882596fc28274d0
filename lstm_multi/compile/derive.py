"""From forward gate math to a pair of straight-line programs: forward and derived backward.

``gate_programs(forward, params)`` traces a variant's forward gate math
(``trace``) and differentiates it in reverse mode on the same graph:

* seeds: the gradients ``dh`` and ``dc`` reaching the step's outputs h_t, c_t;
* one adjoint per node, accumulated over its uses, with the rules

      a + b: da += g, db += g          a - b: da += g, db -= g
      a * b: da += g b, db += g a      -a: da -= g
      s = sigmoid(a): da += g (s (1 - s))      t = tanh(a): da += g (1 - t t)
      y = rsqrt(a): da += g (-0.5 y y y)       m = mean(a): da += mean(g)

  (the derivatives of sigmoid, tanh and rsqrt are written with their own
  outputs, so the backward reads the forward's activations instead of
  recomputing them). Every value is read as (B, H), a per-row one (a ``mean``)
  as the same number at each unit, so the mean's rule is the transpose of
  "average, then broadcast": d m_k / d a_j = 1 / H for every unit k, and
  da_j = sum_k g_k / H = mean(g). The rule needs no case for per-row adjoints:
  mean(g) of a per-row g is g itself;
* outputs: the gradients of the preactivations ``dz_i dz_f dz_g dz_o``, of
  ``c_prev`` (the part that does not go through r @ U) and of each parameter
  row, per element (the caller sums these over the batch).

The backward's nodes live in the forward's graph, so hash-consing shares
every subexpression between the two and within the backward (``1 - o`` is made
once however many terms need it). The forward nodes the backward reads are the
**saved** values, what a step keeps on the tape for its backward; the cache a
step returns is exactly these, in node order.
"""

from __future__ import annotations

from dataclasses import dataclass

from .trace import (
    Expr,
    Graph,
    array_only_operations,
    has_reductions,
    live_nodes,
    operation_count,
)

GATES = ("i", "f", "g", "o")


class Rows:
    """Named per-unit values, read as attributes: ``z.i``, ``p.o``."""

    def __init__(self, names, values):
        object.__setattr__(self, "_names", tuple(names))
        for name, value in zip(names, values, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError("gate math: these inputs are read-only")

    def __getattr__(self, name):
        raise AttributeError(f"gate math: no row {name!r} here; the rows are {self._names}")

    def __iter__(self):
        return iter(getattr(self, name) for name in self._names)


#: the halves a variant's step may take: "fused" (one z = x_t W + b + r U) or "split"
HALVES = ("fused", "split")


def z_names(halves="fused"):
    """The names of a step's preactivation inputs: ``z_i .. z_o`` (fused), or
    ``zx_i .. zx_o, zr_i .. zr_o`` (split: x_t W and r U apart, gate order in each)."""
    if halves == "split":
        return tuple(f"zx_{g}" for g in GATES) + tuple(f"zr_{g}" for g in GATES)
    return tuple(f"z_{g}" for g in GATES)


@dataclass(frozen=True)
class GatePrograms:
    """A variant's traced forward and derived backward over one shared graph.

    Input names: ``z_i z_f z_g z_o`` (``halves == "split"``: ``zx_i .. zx_o zr_i ..
    zr_o``), ``c_prev`` and ``{param}_{row}`` for each row of each per-unit parameter
    (for split halves the bias ``b`` comes first among them, rows ``i f g o``); the
    backward also reads ``dh dc``.
    """

    graph: Graph
    params: dict  # parameter name -> its row names (the bias "b" first for split halves)
    inputs: dict  # input name -> node id (forward and backward inputs)
    forward_outputs: dict  # "h", "c" -> node id
    saved: tuple  # node ids the backward reads from the forward, in node order
    backward_outputs: dict  # "dz_i" ... "dz_o" (or dzx_*, dzr_*), "dc_prev", "d{param}_{row}"
    halves: str = "fused"

    @property
    def z_inputs(self):
        """The preactivation inputs' names (``z_names``)."""
        return z_names(self.halves)

    @property
    def param_rows(self):
        """Input names of the parameter rows, in parameter then row order."""
        return tuple(f"{name}_{row}" for name, rows in self.params.items() for row in rows)

    @property
    def forward_inputs(self):
        return (*self.z_inputs, "c_prev", *self.param_rows)

    @property
    def backward_inputs(self):
        return ("dh", "dc", *self.param_rows)

    @property
    def has_reductions(self):
        """Whether the forward or the backward reduces over a row (``trace.mean``)."""
        roots = [*self.forward_outputs.values(), *self.backward_outputs.values()]
        return has_reductions(self.graph, roots)

    def kernel_refusal(self, reductions=False, split=False) -> str | None:
        """Why a kernel emitter cannot write these programs, or None where it can: a row
        reduction or an array-only operation (unless ``reductions``: the emitter writes
        ``mean`` and ``rsqrt``), or split halves (unless ``split``). The C++, ONNX and
        CUDA C (row kernels) and Triton (whole rows a program) emitters write both, and
        so do the Pallas kernels (whole rows a program: never asked); the check remains
        for an operation no emitter writes."""
        roots = [*self.forward_outputs.values(), *self.backward_outputs.values()]
        reasons = []
        if not reductions:
            if has_reductions(self.graph, roots):
                reasons.append("row reductions (mean)")
            reasons += [op for op in array_only_operations(self.graph, roots) if op != "mean"]
        if self.halves == "split" and not split:
            reasons.append("split halves (x_t W and r U apart)")
        if not reasons:
            return None
        return reasons[0] if len(reasons) == 1 else ", ".join(reasons[:-1]) + " and " + reasons[-1]

    def forward_operations(self):
        """Operations of the forward (its outputs and the saved values)."""
        roots = [*self.forward_outputs.values(), *self.saved]
        return operation_count(self.graph, roots)

    def backward_operations(self):
        """Operations of the backward, given the saved values and its inputs."""
        given = [*self.saved, *(self.inputs[n] for n in self.backward_inputs)]
        return operation_count(self.graph, self.backward_outputs.values(), given)

    def saved_name(self, node_id):
        """A stable name for a saved value: its input name, or ``s{id}``."""
        node = self.graph.nodes[node_id]
        return node.name if node.op == "input" else f"s{node_id}"

    def backward_given(self) -> dict:
        """Node id -> name of every value the backward is given: its inputs
        (``backward_inputs``) and the saved values (``saved_name``)."""
        given = {self.inputs[n]: n for n in self.backward_inputs}
        given.update((n, self.saved_name(n)) for n in self.saved)
        return given


def check_kernel_programs(programs: GatePrograms, target: str, reductions=False, split=False):
    """A NotImplementedError naming what ``target`` (a kernel emitter) does not write yet,
    where ``programs.kernel_refusal(reductions, split)`` finds something."""
    why = programs.kernel_refusal(reductions, split)
    if why is not None:
        raise NotImplementedError(
            f"{target}: the gate math has {why}, which the {target} does not write yet; "
            "the array code runs it (engine 'array' or 'scan')"
        )


def gate_params(params, halves="fused"):
    """The per-unit parameters the gate math reads: ``params``, and for split halves the
    bias ``b`` first, rows (i, f, g, o) (the (4H,) bias in gate order)."""
    params = {name: tuple(rows) for name, rows in (params or {}).items()}
    return {"b": GATES, **params} if halves == "split" else params


def trace_forward(forward, params, halves="fused"):
    """Run the gate math on traced inputs; returns (graph, inputs, h, c).

    ``forward(z, c_prev, **params)`` for fused halves; ``forward(zx, zr, c_prev, b,
    **params)`` for split ones (``params`` already holding ``b``: ``gate_params``).
    """
    if halves not in HALVES:
        raise ValueError(f"halves: expected one of {HALVES}, got {halves!r}")
    graph = Graph()
    inputs = {name: graph.input(name) for name in z_names(halves)}
    inputs["c_prev"] = graph.input("c_prev")
    rows = {}
    for name, row_names in params.items():
        values = [graph.input(f"{name}_{row}") for row in row_names]
        inputs.update(zip((f"{name}_{row}" for row in row_names), values, strict=True))
        rows[name] = Rows(row_names, values)
    if halves == "split":
        zx = Rows(GATES, [inputs[f"zx_{gate}"] for gate in GATES])
        zr = Rows(GATES, [inputs[f"zr_{gate}"] for gate in GATES])
        result = forward(zx, zr, inputs["c_prev"], **rows)
    else:
        z = Rows(GATES, [inputs[f"z_{gate}"] for gate in GATES])
        result = forward(z, inputs["c_prev"], **rows)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(
            f"gate math: forward must return (h, c), got {type(result).__name__}"
            + (f" of length {len(result)}" if isinstance(result, tuple) else "")
        )
    h, c = (_as_expr(graph, v, name) for v, name in zip(result, ("h", "c"), strict=True))
    return graph, inputs, h, c


def _as_expr(graph, value, name):
    if isinstance(value, Expr):
        if value.graph is not graph:
            raise ValueError(f"gate math: {name} comes from another trace")
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return graph.const(value)
    raise TypeError(
        f"gate math: forward must return traced values (h, c), got {type(value).__name__} "
        f"for {name}"
    )


def _backward_rule(graph, node, node_id, g):
    """[(argument id, contribution to its adjoint)] of one node with adjoint ``g``."""
    op, args = node.op, node.args
    value = Expr(graph, node_id)
    if op == "add":
        return [(args[0], g), (args[1], g)]
    if op == "sub":
        return [(args[0], g), (args[1], -g)]
    if op == "mul":
        a, b = Expr(graph, args[0]), Expr(graph, args[1])
        if args[0] == args[1]:  # a * a: one contribution, 2 g a
            return [(args[0], g * (2 * a))]
        return [(args[0], g * b), (args[1], g * a)]
    if op == "neg":
        return [(args[0], -g)]
    if op == "sigmoid":
        return [(args[0], g * (value * (1 - value)))]
    if op == "tanh":
        return [(args[0], g * (1 - value * value))]
    if op == "rsqrt":
        return [(args[0], g * (value * value * value * -0.5))]
    if op == "mean":
        return [(args[0], graph.apply("mean", g))]
    return []  # inputs and constants


def gate_programs(forward, params=None, halves="fused") -> GatePrograms:
    """Trace ``forward`` and derive its backward (see the module doc). ``params`` are the
    variant's own; with ``halves="split"`` the bias joins them (``gate_params``)."""
    params = gate_params(params, halves)
    graph, inputs, h, c = trace_forward(forward, params, halves)
    forward_live = live_nodes(graph, [h.id, c.id])
    forward_set = set(forward_live)
    dh, dc = graph.input("dh"), graph.input("dc")
    inputs = {**inputs, "dh": dh, "dc": dc}
    adjoint: dict[int, Expr] = {h.id: dh}
    adjoint[c.id] = adjoint[c.id] + dc if c.id in adjoint else dc
    for node_id in reversed(forward_live):
        g = adjoint.get(node_id)
        if g is None or graph.value_of(g.id) == 0:
            continue
        for arg, contribution in _backward_rule(graph, graph.nodes[node_id], node_id, g):
            previous = adjoint.get(arg)
            adjoint[arg] = contribution if previous is None else previous + contribution
    zero = graph.const(0)
    z_inputs = list(z_names(halves))
    wanted = [*z_inputs, "c_prev"]
    wanted += [f"{name}_{row}" for name, rows in params.items() for row in rows]
    outputs = {}
    for name in wanted:
        key = "dc_prev" if name == "c_prev" else f"d{name}"
        outputs[key] = adjoint.get(inputs[name].id, zero).id
    # what the backward reads from the forward: forward nodes that are arguments of
    # backward-only nodes, or backward outputs themselves (parameters excluded: the
    # backward is given them directly)
    param_ids = {inputs[n].id for n in wanted[len(z_inputs) + 1 :]}
    backward_only = set(live_nodes(graph, outputs.values())) - forward_set
    referenced = {a for n in backward_only for a in graph.nodes[n].args if a in forward_set}
    referenced |= {n for n in outputs.values() if n in forward_set}
    saved = tuple(
        sorted(n for n in referenced if n not in param_ids and graph.nodes[n].op != "const")
    )
    return GatePrograms(
        graph=graph,
        params=params,
        inputs={name: e.id for name, e in inputs.items()},
        forward_outputs={"h": h.id, "c": c.id},
        saved=saved,
        backward_outputs=outputs,
        halves=halves,
    )
