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
package: ``lm_math.h`` (the nonlinearities, before the rows) and
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
from .trace import live_nodes

_FUNCTIONS = {"sigmoid": "lm_sigmoid", "tanh": "lm_tanh"}


def _param_loads(programs: GatePrograms, used):
    """Loads of the parameter rows the program uses, from the packed P (R, H)."""
    lines = []
    for r, key in enumerate(programs.param_rows):
        if programs.inputs[key] in used:
            lines.append(f"const S v_{key} = P[{r} * H + j];")
    return lines


def _forward_row(programs: GatePrograms) -> str:
    inputs = {programs.inputs[n]: n for n in programs.forward_inputs}
    stored = forward_stored(programs)
    roots = [*programs.forward_outputs.values(), *stored]
    used = set(live_nodes(programs.graph, roots, inputs))
    lines = [
        f"const S v_z_{gate} = SUM ? z[{k} * H + j] + zr[{k} * H + j] : z[{k} * H + j];"
        for k, gate in enumerate(GATES)
        if programs.inputs[f"z_{gate}"] in used
    ]
    if programs.inputs["c_prev"] in used:
        lines.append("const S v_c_prev = c_prev[j];")
    lines += _param_loads(programs, used)
    lines += c_statements(programs, roots, inputs, _FUNCTIONS)
    h = c_name(programs, programs.forward_outputs["h"], inputs)
    lines += [f"h[j] = {h};", f"y[j] = {h};"]
    lines.append(f"c[j] = {c_name(programs, programs.forward_outputs['c'], inputs)};")
    stores = [
        f"saved[{k} * stride + j] = {c_name(programs, n, inputs)};" for k, n in enumerate(stored)
    ]
    body = "\n    ".join(lines)
    record = "\n      ".join(stores)
    return f"""
template <bool RECORD, bool SUM>
static inline void lm_forward_row(long H, const S* __restrict z, const S* __restrict zr,
                                  const S* __restrict c_prev, const S* __restrict P,
                                  S* __restrict h, S* __restrict c, S* __restrict y,
                                  S* __restrict saved, long stride) {{
  (void)zr; (void)P; (void)saved; (void)stride;
#pragma omp simd
  for (long j = 0; j < H; ++j) {{
    {body}
    if (RECORD) {{
      {record}
    }}
  }}
}}
"""


def _backward_row(programs: GatePrograms) -> str:
    inputs = {programs.inputs[n]: n for n in programs.backward_inputs}
    saved_names = [programs.saved_name(n) for n in programs.saved]
    inputs.update(zip(programs.saved, saved_names, strict=True))
    outputs = programs.backward_outputs
    used = set(live_nodes(programs.graph, outputs.values(), inputs))
    # only what the program reads: an unused variable fails the build under -Werror (a
    # variant whose h or c is a constant, or whose gradients do not depend on them)
    lines = []
    if programs.inputs["dh"] in used:
        lines.append("const S v_dh = dh[j] + dy[j];")
    if programs.inputs["dc"] in used:
        lines.append("const S v_dc = dc[j];")
    # c_{t-1} and c_t are read from the carried states, the rest from the tape
    tape = {programs.inputs["c_prev"]: "c_prev[j]", programs.forward_outputs["c"]: "c[j]"}
    tape.update((n, f"saved[{k} * stride + j]") for k, n in enumerate(forward_stored(programs)))
    lines += [
        f"const S v_{name} = {tape[node]};"
        for node, name in zip(programs.saved, saved_names, strict=True)
        if node in used
    ]
    lines += _param_loads(programs, used)
    lines += c_statements(programs, outputs.values(), inputs, _FUNCTIONS)
    lines += [
        f"dz[{k} * H + j] = {c_name(programs, outputs[f'dz_{gate}'], inputs)};"
        for k, gate in enumerate(GATES)
    ]
    lines += [f"dc[j] = {c_name(programs, outputs['dc_prev'], inputs)};", "dh[j] = S(0);"]
    lines += [
        f"dP[{r} * H + j] += {c_name(programs, outputs[f'd{key}'], inputs)};"
        for r, key in enumerate(programs.param_rows)
    ]
    body = "\n    ".join(lines)
    return f"""
static inline void lm_backward_row(long H, const S* __restrict dy, S* __restrict dh,
                                   S* __restrict dc, const S* __restrict c_prev,
                                   const S* __restrict c, const S* __restrict saved, long stride,
                                   const S* __restrict P, S* __restrict dz, S* __restrict dP) {{
  (void)dy; (void)c_prev; (void)c; (void)P; (void)dP; (void)saved; (void)stride;
#pragma omp simd
  for (long j = 0; j < H; ++j) {{
    {body}
  }}
}}
"""


def cpu_source(programs: GatePrograms, scalar: str, recurrent_state: str = "h") -> str:
    """The translation unit described in the module doc, in ``scalar`` ("float" or "double").

    ``recurrent_state`` ("h" or "c") is the state the sequence loop multiplies by U.
    """
    derive.check_kernel_programs(programs, "C++ kernel emitter")
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
        '#include "lm_math.h"',
    ]
    rows = _forward_row(programs) + _backward_row(programs)
    return "\n".join(head) + rows + '\n#include "lm_kernels.h"\n'
