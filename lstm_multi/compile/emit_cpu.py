"""C++ for the CPU from gate programs: one row's fused gate math, forward and backward.

``cpu_source(programs, scalar)`` writes the variant's translation unit in one
scalar type ``S`` (``float`` or ``double``): the part generated from the
programs, which is

* ``lm_forward_row<RECORD, SUM>(H, z, zr, c_prev, P, h, c, y, saved, stride)``:
  one batch row's forward gate math over its H units, on z + zr (4H) (z alone
  unless ``SUM``), writing h, c, y and, when ``RECORD``, the values the
  backward reads (``saved[k * stride + j]``);
* ``lm_backward_row(H, dy, dh, dc, c_prev, c, saved, stride, P, dz, dP)``: its
  backward, writing dz (4H) and the gradients of h_{t-1}, c_{t-1} into dh, dc
  and adding the parameter gradients into dP;
* the constants around them: ``typedef S``, ``LM_NS`` (the saved values besides
  c_{t-1} and c_t, ``len(emit_cuda.forward_stored(programs))``), ``LM_R`` (the
  parameter rows, in ``programs.param_rows`` order), ``LM_RECURRENT`` and
  ``LM_RECURRENT_GRAD`` (the state the sequence loop multiplies by U, and its
  gradient),

and ``#include`` lines for the fixed C++ around it, which is no part of this
package: ``lm_math.h`` (the nonlinearities) and ``lm_scratch.h`` (the row functions'
per-thread scratch, ``lm_row_scratch``), before the rows, and
``lm_kernels.h`` (the step, sequence and batch-split loops and the BLAS
binding, after them), in ``lstm_multi/kernels/cpp``; ``lm_loops.h`` there
states the exported functions' contracts. The text compiles with ``-I`` that
folder (``kernels.cpu_kernels`` does); nothing here reads it.

The row loops are ``#pragma omp simd`` loops over the H units, so the compiler
vectorises the gate math, with ``lm_sigmoid`` and ``lm_tanh`` vectorisable
polynomials in float and libm in double (``lm_math.h``).
"""

from __future__ import annotations

from . import derive
from .derive import GATES, GatePrograms
from .emit_cuda import c_name, c_statements, forward_stored
from .row_phases import row_phases, saved_loads
from .trace import live_nodes

_FUNCTIONS = {"sigmoid": "lm_sigmoid", "tanh": "lm_tanh", "rsqrt": "lm_rsqrt"}


def _param_load(programs: GatePrograms, key):
    """The load of one parameter row's unit j from the packed P (R, H)."""
    return f"P[{programs.param_rows.index(key)} * H + j]"


def _mean_of(accumulator):
    """A row mean from the sum of its H units (what ``numpy.mean`` divides)."""
    return f"{accumulator} / S(H)"


#: the operations worth storing a value for rather than computing it again in a later loop
#: (a call of a polynomial or libm function, against a load from a row of scratch)
_COSTLY = frozenset(_FUNCTIONS)


def _row_loops(programs: GatePrograms, roots, unit_loads, row_loads, final):
    """The body of a row function computing ``roots``: ``#pragma omp simd`` loops over the
    H units of the row, as many as the program's row reductions need.

    ``unit_loads``: node id -> (variable name, C expression of unit j) of the per-unit
    values given (z, c_{t-1}, parameter rows, saved values); ``row_loads``: node id ->
    (name, C expression) of the per-row values given (saved row means). ``final(names)``
    -> the lines of the last loop after its statements (stores), ``names`` (node id ->
    name) giving every row value.

    The row-wise layout: a ``mean`` needs its argument at every unit of the row before
    any unit can read it, so each node gets a phase: a per-unit operation runs in the
    loop of its arguments' latest phase, a row mean is available one loop after its
    argument (loop k sums the arguments of the means of phase k + 1, ``reduction(+)``),
    and a per-row operation is one scalar statement between the loops. A per-unit value
    a later loop needs again is computed there again when that is cheap (sums and
    products of loaded values: the same expression, the same bits), and kept otherwise:
    a value whose computation calls a nonlinearity (``_COSTLY``: c_t under a layer norm
    is two sigmoids and a tanh away from the row's z) is stored by the loop that
    computes it into a row of scratch (``lm_row_scratch``, per thread, H values per kept
    node, in L1 or L2) and loaded from there by the later loops (benchmarks/NOTES.md
    section 23). Without a reduction this is the one loop it always was.
    """
    graph = programs.graph
    given = {n: name for n, (name, _) in {**unit_loads, **row_loads}.items()}
    phases = row_phases(graph, roots, given, row_loads)
    phase, per_row, last = phases.phase, phases.per_row, phases.last
    means = {k: phases.means(k + 1) for k in range(last)}
    loop_roots = {k: [graph.nodes[n].args[0] for n in means[k]] for k in range(last)}
    loop_roots[last] = [r for r in roots if r in unit_loads or r not in per_row]
    kept = _kept_values(graph, loop_roots, phase, given, per_row)
    slot = {n: q for q, n in enumerate(sorted(kept))}
    lines = [f"const S v_{name} = {load};" for name, load in row_loads.values()]
    if kept:
        lines.append(f"S* const lm_scratch = lm_row_scratch({len(kept)} * H);")
    known = dict(given)  # node id -> name of what is available as a variable

    def loop(k, reduce, tail):
        earlier = {n: f"k{n}" for n in kept if phase[n] < k}
        inputs = {**known, **earlier}
        roots_k = loop_roots[k] + sorted(n for n in kept if phase[n] == k)
        needed = set(live_nodes(graph, roots_k, inputs))
        body = [
            f"const S v_{name} = {load};" for n, (name, load) in unit_loads.items() if n in needed
        ]
        body += [f"const S v_k{n} = lm_scratch[{slot[n]} * H + j];"
                 for n in sorted(earlier) if n in needed]  # fmt: skip
        body += c_statements(programs, roots_k, inputs, _FUNCTIONS)
        body += [f"lm_scratch[{slot[n]} * H + j] = v{n};" for n in sorted(kept) if phase[n] == k]
        pragma = "#pragma omp simd"
        if reduce:
            pragma += f" reduction(+:{', '.join(reduce)})"
        return [pragma, "for (long j = 0; j < H; ++j) {", *("  " + b for b in body + tail), "}"]

    for k in range(last + 1):
        # the per-row scalars of phase k (beyond the means, set after loop k - 1)
        for n in phases.row_scalars(k, known):
            lines += [s for s in c_statements(programs, [n], known, _FUNCTIONS)]
            known[n] = f"r{n}"
            lines.append(f"const S v_r{n} = v{n};")
        if k == last:
            break
        sums = [f"lm_sum{n}" for n in means[k]]
        lines += [f"S {acc} = S(0);" for acc in sums]
        adds = [f"{acc} += {c_name(programs, graph.nodes[n].args[0], known)};"
                for acc, n in zip(sums, means[k], strict=True)]  # fmt: skip
        lines += loop(k, sums, adds)
        for acc, n in zip(sums, means[k], strict=True):
            lines.append(f"const S v_r{n} = {_mean_of(acc)};")
            known[n] = f"r{n}"
    earlier = {n: f"k{n}" for n in kept if phase[n] < last}
    return lines + loop(last, [], final({**known, **earlier}))


def _kept_values(graph, loop_roots, phase, given, per_row):
    """The per-unit values kept in scratch rather than computed again (see ``_row_loops``):
    walking each loop's roots down from the last loop, a value of an earlier phase is
    kept when a row mean sums it or computing it calls a nonlinearity, and computed
    again otherwise; a kept value becomes a root of its own phase's loop, whose walk
    comes later."""
    costly: dict[int, bool] = {}

    def is_costly(n):  # its computation from the loads and row values calls a function
        if n not in costly:
            node = graph.nodes[n]
            if n in given or n in per_row or node.op in ("const", "input"):
                costly[n] = False
            else:
                costly[n] = node.op in _COSTLY or any(is_costly(a) for a in node.args)
        return costly[n]

    # a value a row mean sums, read again later, is always kept: formed again, its bits
    # could differ (the compiler contracts a * b + c into one rounding in one loop and
    # not in another), and v - mean(v) must be exactly zero where the row is one unit
    last = max(loop_roots)
    summed = {n for k in loop_roots if k < last for n in loop_roots[k]}
    kept: set[int] = set()
    for k in sorted(loop_roots, reverse=True):
        stack, seen = list(loop_roots[k]) + [n for n in kept if phase[n] == k], set()
        while stack:
            n = stack.pop()
            node = graph.nodes[n]
            if n in seen or n in given or n in per_row or node.op in ("const", "input"):
                continue
            seen.add(n)
            if phase[n] < k and (n in summed or is_costly(n)):
                kept.add(n)
                continue
            stack.extend(node.args)
    # a kept value that is cheap to form from other kept ones (c_t - mean(c_t) from c_t)
    # is formed from them again: in order, so that each test sees the earlier decisions
    for n in sorted(kept - summed):
        if not _calls_from(graph, n, given, per_row, kept - {n}):
            kept.discard(n)
    return kept


def _calls_from(graph, node_id, given, per_row, known):
    """Whether computing ``node_id`` from the loads, row values and ``known`` calls a
    nonlinearity (``_COSTLY``)."""
    stack, seen = [node_id], set()
    while stack:
        n = stack.pop()
        node = graph.nodes[n]
        if n in seen or n in given or n in per_row or n in known or node.op in ("const", "input"):
            continue
        seen.add(n)
        if node.op in _COSTLY:
            return True
        stack.extend(node.args)
    return False


def _forward_row(programs: GatePrograms) -> str:
    inputs = {programs.inputs[n]: n for n in programs.forward_inputs}
    stored = forward_stored(programs)
    roots = [*programs.forward_outputs.values(), *stored]
    if programs.halves == "split":  # z is x_t W, zr is r U (always given): apart
        unit_loads = {
            programs.inputs[f"{half}_{gate}"]: (f"{half}_{gate}", f"{array}[{k} * H + j]")
            for half, array in (("zx", "z"), ("zr", "zr"))
            for k, gate in enumerate(GATES)
        }
    else:
        unit_loads = {
            programs.inputs[f"z_{gate}"]: (
                f"z_{gate}",
                f"SUM ? z[{k} * H + j] + zr[{k} * H + j] : z[{k} * H + j]",
            )
            for k, gate in enumerate(GATES)
        }
    unit_loads[programs.inputs["c_prev"]] = ("c_prev", "c_prev[j]")
    unit_loads.update(
        (programs.inputs[key], (key, _param_load(programs, key))) for key in programs.param_rows
    )

    def final(known):
        def name(n):
            return c_name(programs, n, {**inputs, **known})

        h = name(programs.forward_outputs["h"])
        lines = [f"h[j] = {h};", f"y[j] = {h};"]
        lines.append(f"c[j] = {name(programs.forward_outputs['c'])};")
        stores = [f"  saved[{k} * stride + j] = {name(n)};" for k, n in enumerate(stored)]
        return [*lines, "if (RECORD) {", *stores, "}"]

    body = "\n  ".join(_row_loops(programs, roots, unit_loads, {}, final))
    return f"""
template <bool RECORD, bool SUM>
static inline void lm_forward_row(long H, const S* __restrict z, const S* __restrict zr,
                                  const S* __restrict c_prev, const S* __restrict P,
                                  S* __restrict h, S* __restrict c, S* __restrict y,
                                  S* __restrict saved, long stride) {{
  (void)zr; (void)P; (void)saved; (void)stride;
  {body}
}}
"""


def _backward_row(programs: GatePrograms) -> str:
    inputs = programs.backward_given()
    outputs = programs.backward_outputs
    # c_{t-1} and c_t are read from the carried states, the rest from the tape; a saved
    # per-row value (a row mean) is read once, from the row's first unit (the forward
    # stores it at every unit)
    tape = {programs.inputs["c_prev"]: "c_prev[j]", programs.forward_outputs["c"]: "c[j]"}
    tape.update((n, f"saved[{k} * stride + j]") for k, n in enumerate(forward_stored(programs)))
    unit_loads = {programs.inputs["dh"]: ("dh", "dh[j] + dy[j]"),
                  programs.inputs["dc"]: ("dc", "dc[j]")}  # fmt: skip
    saved_units, row_loads = saved_loads(
        programs, lambda node, name: tape[node], lambda node, name: tape[node].replace("+ j]", "]")
    )
    unit_loads.update(saved_units)
    unit_loads.update(
        (programs.inputs[key], (key, _param_load(programs, key))) for key in programs.param_rows
    )
    used = set(live_nodes(programs.graph, outputs.values(), inputs))
    row_loads = {n: v for n, v in row_loads.items() if n in used}  # -Werror: no unused ones

    def final(known):
        def name(n):
            return c_name(programs, n, {**inputs, **known})

        lines = [
            f"dz[{k} * H + j] = {name(outputs[f'd{z}'])};" for k, z in enumerate(programs.z_inputs)
        ]
        lines += [f"dc[j] = {name(outputs['dc_prev'])};", "dh[j] = S(0);"]
        lines += [
            f"dP[{r} * H + j] += {name(outputs[f'd{key}'])};"
            for r, key in enumerate(programs.param_rows)
        ]
        return lines

    body = "\n  ".join(_row_loops(programs, list(outputs.values()), unit_loads, row_loads, final))
    return f"""
static inline void lm_backward_row(long H, const S* __restrict dy, S* __restrict dh,
                                   S* __restrict dc, const S* __restrict c_prev,
                                   const S* __restrict c, const S* __restrict saved, long stride,
                                   const S* __restrict P, S* __restrict dz, S* __restrict dP) {{
  (void)dy; (void)c_prev; (void)c; (void)P; (void)dP; (void)saved; (void)stride;
  {body}
}}
"""


def cpu_source(programs: GatePrograms, scalar: str, recurrent_state: str = "h") -> str:
    """The translation unit described in the module doc, in ``scalar`` ("float" or "double").

    ``recurrent_state`` ("h" or "c") is the state the sequence loop multiplies by U.
    """
    derive.check_kernel_programs(programs, "C++ kernel emitter", reductions=True, split=True)
    if scalar not in ("float", "double"):
        raise ValueError(f"scalar: expected 'float' or 'double', got {scalar!r}")
    if recurrent_state not in ("h", "c"):
        raise ValueError(f"recurrent_state: expected 'h' or 'c', got {recurrent_state!r}")
    head = [
        "// generated by lstm_multi.compile.emit_cpu; do not edit",
        "// compile with -I lstm_multi/kernels/cpp (the headers included below)",
        f"typedef {scalar} S;",
        f"#define LM_NS {len(forward_stored(programs))}",
        f"#define LM_RECURRENT {recurrent_state}s",
        f"#define LM_RECURRENT_GRAD d{recurrent_state}",
        f"#define LM_R {len(programs.param_rows)}",
        f"#define LM_G {len(programs.z_inputs)}",
        '#include "lm_math.h"',
        '#include "lm_scratch.h"',
    ]
    rows = _forward_row(programs) + _backward_row(programs)
    return "\n".join(head) + rows + '\n#include "lm_kernels.h"\n'
