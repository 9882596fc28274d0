"""CUDA C from gate programs: the operations of two ``cupy.ElementwiseKernel``s per variant.

One kernel thread per element of the (B, H) state. The forward kernel reads the
(B, 4H) preactivations and the parameter rows through raw pointers, c_{t-1}
elementwise, and writes h, c and the saved values; the backward kernel reads
dh, dc, the saved values and the parameter rows and writes dz (B, 4H),
dc_{t-1} and, per parameter, its per-element gradient terms (B, rows, H),
which the caller sums over the batch.

Types: ``T`` is the input type (z, h, dh, the parameters), ``S`` the state type
(float32 for float16 inputs, else T: ``ArrayModuleOps.state_dtype``). Every
load is converted to S, the math runs in S, h is stored as T and everything
else (c, the saved values, dz, the gradient terms) as S. Constants are written
``S(value)``, so no double literal promotes float math; ``value`` is the
decimal literal that reads back to the constant's double exactly (``1e+30``,
``5e-324``, ``4000000000.0``), rounded once to S by the compiler (in float, 1e60
is inf and 5e-324 is 0, as in float arithmetic).

``host_source`` wraps a kernel's operation in a plain C++ loop for a host
compiler, which is how the tests run this exact text on machines without a GPU.
"""

from __future__ import annotations

from typing import NamedTuple

from . import derive
from .derive import GATES, GatePrograms
from .emit_array import literal
from .trace import PRIMITIVES, live_nodes

PREAMBLE = """
// 1 / (1 + exp(-x)) to a few ulp in both tails (as ArrayModuleOps.sigmoid):
// e = exp(-|x|) never overflows; x < 0 gives e / (1 + e), not 1 - 1 / (1 + e)
template <typename F> __device__ __forceinline__ F sigmoid(F x) {
  const F e = exp(-fabs(x));
  const F r = F(1) / (F(1) + e);
  return x >= F(0) ? r : e * r;
}
"""

_INFIX = {"add": "+", "sub": "-", "mul": "*"}


class KernelSource(NamedTuple):
    """An ElementwiseKernel's parameters and operation (what ``cupy.ElementwiseKernel`` takes)."""

    in_params: str
    out_params: str
    operation: str
    name: str


def c_name(programs: GatePrograms, node_id, inputs):
    """The C expression for a node: its input variable, a typed constant or its own variable."""
    node = programs.graph.nodes[node_id]
    if node_id in inputs:
        return f"v_{inputs[node_id]}"
    if node.op == "const":
        return f"S({literal(node.value)})"
    return f"v{node_id}"


def c_statements(programs: GatePrograms, roots, inputs, functions=None):
    """One ``const S v{id} = ...;`` per operation node the roots need, in order.

    ``functions`` renames the nonlinearities (``{"tanh": "lm_tanh"}``); by
    default they are called by their own names.
    """
    functions = functions or {}
    lines = []
    for node_id in live_nodes(programs.graph, roots, inputs):
        node = programs.graph.nodes[node_id]
        if node_id in inputs or node.op not in PRIMITIVES:
            continue
        args = [c_name(programs, a, inputs) for a in node.args]
        if node.op in _INFIX:
            text = f"{args[0]} {_INFIX[node.op]} {args[1]}"
        elif node.op == "neg":
            text = f"-{args[0]}"
        else:
            text = f"{functions.get(node.op, node.op)}({args[0]})"
        lines.append(f"const S v{node_id} = {text};")
    return lines


_INDEX = [
    # i is the ElementwiseKernel's element index over the (B, H) arrays
    "const ptrdiff_t lm_b = i / H;",
    "const ptrdiff_t lm_j = i - lm_b * H;",
    "const ptrdiff_t lm_row = lm_b * 4 * H + lm_j;",
    "(void)lm_row;",  # unread where the program reads no input (constant h and c)
]


def _param_loads(programs: GatePrograms, used):
    """Loads of the parameter rows the program uses (the element's column ``lm_j``)."""
    lines = []
    for name, rows in programs.params.items():
        for r, row in enumerate(rows):
            key = f"{name}_{row}"
            if programs.inputs[key] in used:
                lines.append(f"const S v_{key} = (S){name}[{r} * H + lm_j];")
    return lines


def forward_stored(programs: GatePrograms):
    """Saved node ids the forward kernel writes (c_{t-1} and c are the caller's already)."""
    skip = {programs.inputs["c_prev"], programs.forward_outputs["c"]}
    return [n for n in programs.saved if n not in skip]


def forward_kernel(programs: GatePrograms, label: str) -> KernelSource:
    """The forward kernel: outputs ``h, c`` and one ``S`` array per stored saved value."""
    derive.check_kernel_programs(programs, "CUDA C kernel emitter")
    inputs = {programs.inputs[n]: n for n in programs.forward_inputs}
    stored = forward_stored(programs)
    roots = [*programs.forward_outputs.values(), *stored]
    used = set(live_nodes(programs.graph, roots, inputs))
    ins = "raw T z, S c_prev"
    ins += "".join(f", raw T {name}" for name in programs.params) + ", int64 H"
    outs = "T h, S c" + "".join(f", S {programs.saved_name(n)}" for n in stored)
    lines = list(_INDEX)
    for k, gate in enumerate(GATES):
        if programs.inputs[f"z_{gate}"] in used:
            lines.append(f"const S v_z_{gate} = (S)z[{k} * H + lm_row];")
    if programs.inputs["c_prev"] in used:
        lines.append("const S v_c_prev = c_prev;")
    lines += _param_loads(programs, used)
    lines += c_statements(programs, roots, inputs)
    lines.append(f"h = (T)({c_name(programs, programs.forward_outputs['h'], inputs)});")
    lines.append(f"c = {c_name(programs, programs.forward_outputs['c'], inputs)};")
    for n in stored:
        lines.append(f"{programs.saved_name(n)} = {c_name(programs, n, inputs)};")
    return KernelSource(ins, outs, "\n".join(lines), f"lstm_multi_{label}_forward")


def backward_kernel(programs: GatePrograms, label: str) -> KernelSource:
    """The backward kernel: ``dz`` (raw, B x 4H), ``dc_prev`` and ``d{param}`` terms (raw)."""
    derive.check_kernel_programs(programs, "CUDA C kernel emitter")
    inputs = {programs.inputs[n]: n for n in programs.backward_inputs}
    saved_names = [programs.saved_name(n) for n in programs.saved]
    inputs.update(zip(programs.saved, saved_names, strict=True))
    outputs = programs.backward_outputs
    used = set(live_nodes(programs.graph, outputs.values(), inputs))
    ins = "T dh, S dc" + "".join(f", S {name}" for name in saved_names)
    ins += "".join(f", raw T {name}" for name in programs.params) + ", int64 H"
    outs = "raw S dz, S dc_prev" + "".join(f", raw S d{name}" for name in programs.params)
    lines = list(_INDEX)
    if programs.inputs["dh"] in used:
        lines.append("const S v_dh = (S)dh;")
    if programs.inputs["dc"] in used:
        lines.append("const S v_dc = dc;")
    for node_id, name in zip(programs.saved, saved_names, strict=True):
        if node_id in used:
            lines.append(f"const S v_{name} = {name};")
    lines += _param_loads(programs, used)
    lines += c_statements(programs, outputs.values(), inputs)
    for k, gate in enumerate(GATES):
        lines.append(f"dz[{k} * H + lm_row] = {c_name(programs, outputs[f'dz_{gate}'], inputs)};")
    lines.append(f"dc_prev = {c_name(programs, outputs['dc_prev'], inputs)};")
    for name, rows in programs.params.items():
        for r, row in enumerate(rows):
            value = c_name(programs, outputs[f"d{name}_{row}"], inputs)
            lines.append(f"d{name}[(lm_b * {len(rows)} + {r}) * H + lm_j] = {value};")
    return KernelSource(ins, outs, "\n".join(lines), f"lstm_multi_{label}_backward")


def _parse_params(text):
    """``"raw T z, S c, int64 H"`` -> [(raw, type, name)]."""
    params = []
    for item in text.split(","):
        words = item.split()
        raw = words[0] == "raw"
        words = words[1:] if raw else words
        params.append((raw, words[0], words[1]))
    return params


def host_source(kernels, t_type: str, s_type: str) -> str:
    """Each kernel's operation inside a C++ loop over ``n`` elements, for a host compiler.

    Each is exported as ``extern "C" void {kernel.name}(ptrdiff_t n, <params in
    order>)``: an array parameter is a pointer (``const`` for inputs), an
    ``int64`` a ``long long``; elementwise parameters are bound to element ``i``
    by reference and raw ones indexed by the operation itself, as
    ElementwiseKernel does.
    """
    head = [
        "#include <cmath>",
        "#include <cstddef>",
        "using std::exp;",
        "using std::fabs;",
        "using std::tanh;",
        "#define __device__",
        "#define __forceinline__ inline",
        f"typedef {t_type} T;",
        f"typedef {s_type} S;",
        PREAMBLE,
    ]
    return "\n".join(head) + "".join(_host_function(k) for k in kernels)


def _host_function(kernel: KernelSource) -> str:
    signature, bind = [], []
    for is_out, params in ((False, _parse_params(kernel.in_params)),
                           (True, _parse_params(kernel.out_params))):  # fmt: skip
        for raw, type_, name in params:
            if type_ == "int64":
                signature.append(f"long long {name}")
                continue
            const = "" if is_out else "const "
            if raw:
                signature.append(f"{const}{type_}* {name}")
            else:
                signature.append(f"{const}{type_}* {name}_a")
                bind.append(f"{const}{type_}& {name} = {name}_a[i]; (void){name};")
    body = "\n    ".join([*bind, *kernel.operation.splitlines()])
    return (
        f'\nextern "C" void {kernel.name}(ptrdiff_t n, {", ".join(signature)}) {{\n'
        f"  for (ptrdiff_t i = 0; i < n; ++i) {{\n    {body}\n  }}\n}}\n"
    )
