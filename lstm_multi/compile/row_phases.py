"""The phases of a program with row reductions: which value a row function computes when.

A ``mean`` needs its argument at every unit of the row before any unit can read it,
so a kernel that computes a row (the C++ row functions of ``emit_cpu``, the CUDA C
row kernels of ``emit_cuda``) runs in phases, one pass over the row's units each:

* a given value (a load) and a constant are in phase 0;
* a row mean is in phase p + 1 where p is its argument's phase: pass p sums its
  argument over the row, and from pass p + 1 on the mean is a known number;
* any other operation is in the latest phase of its arguments;
* a per-row operation (``trace.row_valued``: of means, per-row loads and constants
  only) is one scalar computed between the passes, not per unit.

Pass k (k = 0 .. ``last``) computes what phase k holds: the arguments of the means of
phase k + 1 for k < ``last``, the roots in the last pass. Without a reduction there is
one phase, and one pass. How a pass keeps or recomputes the per-unit values an earlier
pass computed is the emitter's choice: the CUDA C row kernels recompute them from the
loads; the C++ row functions keep a value whose computation calls a nonlinearity, or
that a mean summed, in a per-thread scratch row (``emit_cpu``).
"""

from __future__ import annotations

from typing import NamedTuple

from .trace import Graph, live_nodes, row_valued


class RowPhases(NamedTuple):
    """The phase analysis of ``roots`` given the loaded nodes (``row_phases``)."""

    graph: Graph
    order: list  # the live nodes, arguments first
    phase: dict  # node id -> its phase
    per_row: set  # the per-row nodes (means, their per-row functions, per-row loads)
    last: int  # the last phase (0 without a reduction)

    def means(self, k: int) -> list[int]:
        """The means of phase ``k`` (summed by pass k - 1), in node order."""
        return [n for n in self.order if self.graph.nodes[n].op == "mean" and self.phase[n] == k]

    def all_means(self) -> list[int]:
        """Every mean, by phase then node order (the order their sums are numbered in)."""
        return [n for k in range(1, self.last + 1) for n in self.means(k)]

    def row_scalars(self, k: int, known) -> list[int]:
        """The per-row operations of phase ``k`` not in ``known`` (means, loads and
        constants are not operations here), in node order."""
        return [
            n
            for n in self.order
            if n in self.per_row
            and n not in known
            and self.phase[n] == k
            and self.graph.nodes[n].op not in ("mean", "const", "input")
        ]


def saved_loads(programs, load_unit, load_row):
    """The backward's saved values as a row function loads them: (unit loads, row loads),
    node id -> (name, load). A per-row saved value (a row mean, stored at every unit by
    the forward) is read once a row, ``load_row(node, name)``; the others per unit,
    ``load_unit(node, name)``."""
    per_row = row_valued(programs.graph, list(programs.saved))
    units, rows = {}, {}
    for node in programs.saved:
        name = programs.saved_name(node)
        if node in per_row:
            rows[node] = (name, load_row(node, name))
        else:
            units[node] = (name, load_unit(node, name))
    return units, rows


def row_phases(graph: Graph, roots, given, per_row_given=()) -> RowPhases:
    """The phases (module doc) of computing ``roots`` from the nodes ``given`` (loaded:
    phase 0), of which ``per_row_given`` are per-row values (a saved mean)."""
    order = live_nodes(graph, roots, given)
    per_row = row_valued(graph, roots) | set(per_row_given)
    phase: dict[int, int] = {}
    for node_id in order:
        node = graph.nodes[node_id]
        if node_id in given or node.op in ("const", "input"):
            phase[node_id] = 0
        elif node.op == "mean":
            phase[node_id] = phase[node.args[0]] + 1
        else:
            phase[node_id] = max(phase[a] for a in node.args)
    last = max([phase[n] for n in order], default=0)
    return RowPhases(graph, order, phase, per_row, last)
