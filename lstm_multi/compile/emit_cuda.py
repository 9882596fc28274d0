"""CUDA C from gate programs: two ``cupy.ElementwiseKernel``s per variant, or two row
kernels (``cupy.RawKernel``) where the programs have row reductions.

Element layout (``row_layout(programs)`` false: no ``mean``). One kernel thread per
element of the (B, H) state. The forward kernel reads the (B, G H) preactivations (G = 4;
G = 8 for split halves: x_t W then r U, ``GatePrograms.z_inputs``) and the parameter rows
through raw pointers, c_{t-1} elementwise, and writes h, c and the saved values; the
backward kernel reads dh, dc, the saved values and the parameter rows and writes dz
(B, G H), dc_{t-1} and, per parameter, its per-element gradient terms (B, rows, H), which
the caller sums over the batch. (For split halves the bias ``b`` is a parameter like the
others, rows i f g o: the (4H,) bias read as (4, H).)

Row layout (``row_layout(programs)`` true: a ``mean`` over a row's H units). One thread
block per batch row, its ``lm_nt`` threads (a power of two, ``row_threads``) striding over
the row's units (thread t takes units t, t + lm_nt, ...). The program runs in the passes
of ``row_phases`` (a mean needs its whole row): pass k computes, per unit, the arguments
of the means of phase k + 1, each thread summing its units into a register; the block
then adds the threads' partial sums in shared memory as a tree (log2(lm_nt) levels, a
``__syncthreads()`` after each) and thread 0 writes the mean (the sum / H) into the
block's ``lm_mean`` slots, read by every thread from the next pass on. A per-row value
(a function of means) is computed by every thread (the same scalar statements, the
same bits); a per-unit value a later pass needs again is recomputed from the loads there,
not stored. The last pass computes the outputs and stores them: the same arrays, in the
same layout, as the element kernels (a per-row saved value is stored at every unit of
its row; the backward reads it at the row's first unit). Shared memory:
``shared_bytes``: the widest pass's partial sums (``sums`` x lm_nt) and one slot per mean.

Types: ``T`` is the input type (z, h, dh, the parameters), ``S`` the state type
(float32 for float16 inputs, else T: ``ArrayModuleOps.state_dtype``). Every
load is converted to S, the math runs in S, h is stored as T and everything
else (c, the saved values, dz, the gradient terms) as S. Constants are written
``S(value)``, so no double literal promotes float math; ``value`` is the
decimal literal that reads back to the constant's double exactly (``1e+30``,
``5e-324``, ``4000000000.0``), rounded once to S by the compiler (in float, 1e60
is inf and 5e-324 is 0, as in float arithmetic).

On the host: ``host_source`` wraps an element kernel's operation in a plain C++ loop;
a row kernel's text (``row_source``) is one translation unit that compiles as CUDA (under
NVRTC, for CuPy) and as host C++ (for a host compiler): its few macros (``ROW_PRELUDE``)
make each pass between two barriers a loop over the block's threads, and the kernel a
loop over the rows. Threads run one after another within a pass and every pass ends
before the next begins, which is what ``__syncthreads()`` guarantees on the GPU; so the
tests run this exact text without a GPU. A race within a pass (one thread reading what
another writes in the same pass) is what a sequential run could hide: the host runs the
threads in order or, on request, in reverse order, and the tests require the same bits
both ways (a race shows as a difference in most cases, not in every one: two orders of
many). The emitter writes each partial sum's slot from its own thread only, and the mean
from thread 0 in a pass of its own after the tree. Nothing about speed, registers or
occupancy shows on the host.
"""

from __future__ import annotations

from typing import NamedTuple

from . import derive
from .derive import GatePrograms
from .emit_array import literal
from .row_phases import row_phases, saved_loads
from .trace import PRIMITIVES, live_nodes

PREAMBLE = """
// 1 / (1 + exp(-x)) to a few ulp in both tails (as ArrayModuleOps.sigmoid):
// e = exp(-|x|) never overflows; x < 0 gives e / (1 + e), not 1 - 1 / (1 + e)
template <typename F> __device__ __forceinline__ F sigmoid(F x) {
  const F e = exp(-fabs(x));
  const F r = F(1) / (F(1) + e);
  return x >= F(0) ? r : e * r;
}
// the gate math's rsqrt, 1 / sqrt(x) as ArrayModuleOps.rsqrt (not CUDA's approximate rsqrt)
template <typename F> __device__ __forceinline__ F lm_rsqrt(F x) {
  return F(1) / sqrt(x);
}
"""

_INFIX = {"add": "+", "sub": "-", "mul": "*"}
#: the nonlinearities called by another name than their op's
_FUNCTIONS = {"rsqrt": "lm_rsqrt"}


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


def _index(groups):
    """The element's row and unit (``i`` is the ElementwiseKernel's index over (B, H));
    ``lm_row`` is the unit's offset in the row's first block of z (B, groups * H)."""
    return [
        "const ptrdiff_t lm_b = i / H;",
        "const ptrdiff_t lm_j = i - lm_b * H;",
        f"const ptrdiff_t lm_row = lm_b * {groups} * H + lm_j;",
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


def check_programs(programs: GatePrograms):
    """A NotImplementedError where the programs hold something this emitter cannot write
    (``GatePrograms.kernel_refusal``: it writes reductions, rsqrt and split halves)."""
    derive.check_kernel_programs(programs, "CUDA C kernel emitter", reductions=True, split=True)


def row_layout(programs: GatePrograms) -> bool:
    """Whether the programs run as row kernels (they reduce over a row), not element ones."""
    return programs.has_reductions


def forward_kernel(programs: GatePrograms, label: str) -> KernelSource:
    """The forward element kernel: outputs ``h, c`` and one ``S`` array per stored saved
    value (programs without reductions: ``row_layout``)."""
    check_programs(programs)
    _check_layout(programs, row=False)
    inputs = {programs.inputs[n]: n for n in programs.forward_inputs}
    stored = forward_stored(programs)
    roots = [*programs.forward_outputs.values(), *stored]
    used = set(live_nodes(programs.graph, roots, inputs))
    ins = "raw T z, S c_prev"
    ins += "".join(f", raw T {name}" for name in programs.params) + ", int64 H"
    outs = "T h, S c" + "".join(f", S {programs.saved_name(n)}" for n in stored)
    lines = _index(len(programs.z_inputs))
    for k, z in enumerate(programs.z_inputs):
        if programs.inputs[z] in used:
            lines.append(f"const S v_{z} = (S)z[{k} * H + lm_row];")
    if programs.inputs["c_prev"] in used:
        lines.append("const S v_c_prev = c_prev;")
    lines += _param_loads(programs, used)
    lines += c_statements(programs, roots, inputs, _FUNCTIONS)
    lines.append(f"h = (T)({c_name(programs, programs.forward_outputs['h'], inputs)});")
    lines.append(f"c = {c_name(programs, programs.forward_outputs['c'], inputs)};")
    for n in stored:
        lines.append(f"{programs.saved_name(n)} = {c_name(programs, n, inputs)};")
    return KernelSource(ins, outs, "\n".join(lines), f"lstm_multi_{label}_forward")


def backward_kernel(programs: GatePrograms, label: str) -> KernelSource:
    """The backward element kernel: ``dz`` (raw, B x G H), ``dc_prev`` and ``d{param}``
    terms (raw) (programs without reductions: ``row_layout``)."""
    check_programs(programs)
    _check_layout(programs, row=False)
    inputs = programs.backward_given()
    saved_names = [programs.saved_name(n) for n in programs.saved]
    outputs = programs.backward_outputs
    used = set(live_nodes(programs.graph, outputs.values(), inputs))
    ins = "T dh, S dc" + "".join(f", S {name}" for name in saved_names)
    ins += "".join(f", raw T {name}" for name in programs.params) + ", int64 H"
    outs = "raw S dz, S dc_prev" + "".join(f", raw S d{name}" for name in programs.params)
    lines = _index(len(programs.z_inputs))
    if programs.inputs["dh"] in used:
        lines.append("const S v_dh = (S)dh;")
    if programs.inputs["dc"] in used:
        lines.append("const S v_dc = dc;")
    for node_id, name in zip(programs.saved, saved_names, strict=True):
        if node_id in used:
            lines.append(f"const S v_{name} = {name};")
    lines += _param_loads(programs, used)
    lines += c_statements(programs, outputs.values(), inputs, _FUNCTIONS)
    for k, z in enumerate(programs.z_inputs):
        lines.append(f"dz[{k} * H + lm_row] = {c_name(programs, outputs[f'd{z}'], inputs)};")
    lines.append(f"dc_prev = {c_name(programs, outputs['dc_prev'], inputs)};")
    for name, rows in programs.params.items():
        for r, row in enumerate(rows):
            value = c_name(programs, outputs[f"d{name}_{row}"], inputs)
            lines.append(f"d{name}[(lm_b * {len(rows)} + {r}) * H + lm_j] = {value};")
    return KernelSource(ins, outs, "\n".join(lines), f"lstm_multi_{label}_backward")


def _check_layout(programs, row):
    if row_layout(programs) != row:
        want, other = ("row", "element") if row else ("element", "row")
        raise ValueError(
            f"programs: the {want} kernels are for programs "
            f"{'with' if row else 'without'} row reductions; these take the {other} kernels "
            "(emit_cuda.row_layout)"
        )


# ---------------------------------------------------------------------------
# the row kernels (programs with row reductions)

#: the macros that make a row kernel's text CUDA under NVRTC and a loop nest for a host
#: compiler (module doc). A pass: ``LM_THREADS { ... } LM_BARRIER``.
ROW_PRELUDE = """
#if defined(__CUDACC__)
#define LM_KERNEL extern "C" __global__ void
#define LM_LAUNCH_ARGS
#define LM_BLOCK_THREADS const int lm_nt = blockDim.x;
#define LM_ROWS for (long long lm_b = blockIdx.x; lm_b < lm_rows; lm_b += gridDim.x)
#define LM_THREADS for (int lm_t = threadIdx.x, lm_once = 1; lm_once; lm_once = 0)
#define LM_BARRIER __syncthreads();
#define LM_SHARED(count) \\
  extern __shared__ __align__(16) unsigned char lm_smem[]; \\
  S* lm_part = reinterpret_cast<S*>(lm_smem);
#else
// host: the block's threads one after another within each pass, in order or (lm_reverse)
// in reverse order; the shared memory (as many bytes as the launch gives, lm_shared_bytes)
// is fresh and NaN for each row, and a launch that gives too little writes nothing (the
// outputs keep what they held)
#include <cmath>
#include <vector>
using std::exp;
using std::fabs;
using std::sqrt;
using std::tanh;
#define __device__
#define __forceinline__ inline
#define LM_KERNEL extern "C" void
#define LM_LAUNCH_ARGS int lm_nt, long long lm_shared_bytes, int lm_reverse,
#define LM_BLOCK_THREADS
#define LM_ROWS for (long long lm_b = 0; lm_b < lm_rows; ++lm_b)
#define LM_THREADS \\
  for (int lm_i = 0, lm_t = 0; \\
       lm_i < lm_nt && ((lm_t = lm_reverse ? lm_nt - 1 - lm_i : lm_i), 1); ++lm_i)
#define LM_BARRIER
#define LM_SHARED(count) \\
  if ((long long)((count) * sizeof(S)) > lm_shared_bytes) return; \\
  std::vector<S> lm_shared(lm_shared_bytes / sizeof(S), S(NAN)); \\
  S* lm_part = lm_shared.data();
#endif
"""

#: C types of T and S for ``row_source`` (float16 only under NVRTC: CuPy's ``float16``)
ROW_TYPES = ("double", "float", "float16")


class RowKernelSource(NamedTuple):
    """A row kernel (``cupy.RawKernel``): its name, its parameters ((C type, name) in
    call order; the launch is grid (B,), block (lm_nt,), ``shared_bytes`` of shared
    memory), its body, the partial sums its widest pass holds and its number of means."""

    name: str
    params: tuple
    body: str
    sums: int
    means: int


def shared_bytes(kernel: RowKernelSource, threads: int, itemsize: int) -> int:
    """The shared memory a launch of ``kernel`` with ``threads`` threads a block needs:
    ``sums`` partial sums per thread and one slot per mean, of ``itemsize`` bytes (S's)."""
    return (kernel.sums * threads + kernel.means) * itemsize


#: shared memory a block may use without opting in (CUDA's static limit, every GPU)
SHARED_LIMIT = 48 * 1024


def row_threads(hidden: int, kernels, itemsize: int, max_threads: int = 1024) -> int:
    """The threads of a row kernel's block for rows of ``hidden`` units: one unit a thread
    (the power of two at or above H, at least a warp, 32) up to ``max_threads`` (a power of
    two: 1024, or fewer where the compiled kernel's registers allow fewer), and fewer where
    the shared memory of any of ``kernels`` would pass 48 KiB; past that each thread strides
    over several units. Raises ValueError where even 2 threads need too much."""
    if max_threads < 2:  # the tree adds the last two partial sums
        raise ValueError(f"max_threads: expected at least 2, got {max_threads}")
    threads = 32
    while threads < hidden and threads < max_threads:
        threads *= 2
    threads = min(threads, max_threads)
    while threads > 2 and any(shared_bytes(k, threads, itemsize) > SHARED_LIMIT for k in kernels):
        threads //= 2
    if any(shared_bytes(k, threads, itemsize) > SHARED_LIMIT for k in kernels):
        raise ValueError(
            f"programs: too many row means for a CUDA block's shared memory ({SHARED_LIMIT} "
            f"bytes), even with {threads} threads"
        )
    return threads


def _row_body(programs: GatePrograms, roots, unit_loads, row_loads, final):
    """The passes of a row kernel computing ``roots`` (module doc) -> (lines, sums, means).

    ``unit_loads``: node id -> (variable name, C expression of unit ``lm_j``; ``lm_u`` is
    its (B, H) index, ``lm_row`` its offset in the row's first z block) of the per-unit
    values given; ``row_loads``: the same of the per-row values given (saved means).
    ``final(known)`` -> the store lines of the last pass, ``known`` (node id -> variable
    name) naming every per-row value.
    """
    graph = programs.graph
    given = {n: name for n, (name, _) in {**unit_loads, **row_loads}.items()}
    phases = row_phases(graph, roots, given, row_loads)
    slots = {m: k for k, m in enumerate(phases.all_means())}
    widest = max((len(phases.means(k)) for k in range(1, phases.last + 1)), default=0)
    lines = []
    for k in range(phases.last + 1):
        known = dict(given)
        known.update((m, f"r{m}") for m in slots if phases.phase[m] <= k)
        means = phases.means(k + 1)
        roots_k = [graph.nodes[m].args[0] for m in means] if means else list(roots)
        before = set(live_nodes(graph, roots_k, known))
        body = [
            f"const S v_{name} = {load};" for n, (name, load) in row_loads.items() if n in before
        ]
        body += [
            f"const S v_r{m} = lm_mean[{slots[m]}];" for m in slots if m in before and m in known
        ]
        # the per-row values of phases <= k this pass reads: nothing but shared memory
        # outlives a pass, so each pass computes its own (one scalar statement a thread)
        scalars = [n for j in range(k + 1) for n in phases.row_scalars(j, known) if n in before]
        for n in scalars:
            body += c_statements(programs, [n], known, _FUNCTIONS)
            known[n] = f"r{n}"
            body.append(f"const S v_r{n} = v{n};")
        needed = set(live_nodes(graph, roots_k, known))
        loop = ["const long long lm_u = lm_b * H + lm_j;", "(void)lm_u;"]
        loop.append(f"const long long lm_row = lm_b * {len(programs.z_inputs)} * H + lm_j;")
        loop.append("(void)lm_row;")
        loop += [f"const S v_{name} = {load};" for n, (name, load) in unit_loads.items()
                 if n in needed]  # fmt: skip
        loop += c_statements(programs, roots_k, known, _FUNCTIONS)
        if means:
            body += [f"S lm_acc{m} = S(0);" for m in means]
            loop += [f"lm_acc{m} += {c_name(programs, graph.nodes[m].args[0], known)};"
                     for m in means]  # fmt: skip
        else:
            loop += final(known)
        body += ["for (long long lm_j = lm_t; lm_j < H; lm_j += lm_nt) {",
                 *("  " + line for line in loop), "}"]  # fmt: skip
        body += [f"lm_part[{i} * lm_nt + lm_t] = lm_acc{m};" for i, m in enumerate(means)]
        lines += _pass(body)
        if not means:
            break
        # the block's sum of each partial: a tree over the threads, then thread 0's mean
        adds = [f"  lm_part[{i} * lm_nt + lm_t] += lm_part[{i} * lm_nt + lm_t + lm_s];"
                for i in range(len(means))]  # fmt: skip
        tree = _pass([f"if ({_TREE_ADDERS}) {{", *adds, "}"])
        lines += [_TREE, *("  " + t for t in tree), "}"]
        stores = [
            f"  lm_mean[{slots[m]}] = {_mean_of(f'lm_part[{i} * lm_nt] + lm_part[{i} * lm_nt + 1]')};"
            for i, m in enumerate(means)
        ]
        lines += _pass(["if (lm_t == 0) {", *stores, "}"])
    return lines, widest, len(slots)


#: the tree's levels: lm_s threads add the partial lm_s above theirs, down to the last two
_TREE = "for (int lm_s = lm_nt / 2; lm_s > 1; lm_s /= 2) {"
#: the threads that add at a level (the others' partials are what they read)
_TREE_ADDERS = "lm_t < lm_s"


def _mean_of(total):
    """A row mean from the sum of its H units (the C expression of ``total``)."""
    return f"({total}) / S(H)"


def _pass(body):
    """One pass: every thread runs ``body``, then the block waits for all (a barrier)."""
    return ["LM_THREADS {", *("  " + line for line in body), "}", "LM_BARRIER"]


def _row_param_loads(programs: GatePrograms):
    """node id -> (name, load of unit ``lm_j``) of every parameter row."""
    return {
        programs.inputs[f"{name}_{row}"]: (f"{name}_{row}", f"(S){name}[{r} * H + lm_j]")
        for name, rows in programs.params.items()
        for r, row in enumerate(rows)
    }


def forward_row_kernel(programs: GatePrograms, label: str) -> RowKernelSource:
    """The forward row kernel (programs with reductions): what ``forward_kernel`` writes,
    in the row layout: ``(z, c_prev, params..., H, rows, h, c, stored...)``."""
    check_programs(programs)
    _check_layout(programs, row=True)
    inputs = {programs.inputs[n]: n for n in programs.forward_inputs}
    stored = forward_stored(programs)
    roots = [*programs.forward_outputs.values(), *stored]
    unit_loads = {
        programs.inputs[z]: (z, f"(S)z[{k} * H + lm_row]") for k, z in enumerate(programs.z_inputs)
    }
    unit_loads[programs.inputs["c_prev"]] = ("c_prev", "c_prev[lm_u]")
    unit_loads.update(_row_param_loads(programs))

    def final(known):
        def name(n):
            return c_name(programs, n, {**inputs, **known})

        lines = [f"h[lm_u] = (T)({name(programs.forward_outputs['h'])});",
                 f"c[lm_u] = {name(programs.forward_outputs['c'])};"]  # fmt: skip
        return lines + [f"{programs.saved_name(n)}[lm_u] = {name(n)};" for n in stored]

    body, sums, means = _row_body(programs, roots, unit_loads, {}, final)
    params = [("const T*", "z"), ("const S*", "c_prev")]
    params += [("const T*", name) for name in programs.params]
    params += [("long long", "H"), ("long long", "lm_rows"), ("T*", "h"), ("S*", "c")]
    params += [("S*", programs.saved_name(n)) for n in stored]
    return RowKernelSource(
        f"lstm_multi_{label}_forward_rows", tuple(params), "\n".join(body), sums, means
    )


def backward_row_kernel(programs: GatePrograms, label: str) -> RowKernelSource:
    """The backward row kernel: what ``backward_kernel`` writes, in the row layout:
    ``(dh, dc, saved..., params..., H, rows, dz, dc_prev, dparams...)``; a per-row saved
    value is read at its row's first unit."""
    check_programs(programs)
    _check_layout(programs, row=True)
    inputs = programs.backward_given()
    outputs = programs.backward_outputs
    unit_loads = {programs.inputs["dh"]: ("dh", "(S)dh[lm_u]"),
                  programs.inputs["dc"]: ("dc", "dc[lm_u]")}  # fmt: skip
    saved_units, row_loads = saved_loads(
        programs, lambda node, name: f"{name}[lm_u]", lambda node, name: f"{name}[lm_b * H]"
    )
    unit_loads.update(saved_units)
    unit_loads.update(_row_param_loads(programs))

    def final(known):
        def name(n):
            return c_name(programs, n, {**inputs, **known})

        lines = [f"dz[{k} * H + lm_row] = {name(outputs[f'd{z}'])};"
                 for k, z in enumerate(programs.z_inputs)]  # fmt: skip
        lines.append(f"dc_prev[lm_u] = {name(outputs['dc_prev'])};")
        for pname, rows in programs.params.items():
            for r, row in enumerate(rows):
                value = name(outputs[f"d{pname}_{row}"])
                lines.append(f"d{pname}[(lm_b * {len(rows)} + {r}) * H + lm_j] = {value};")
        return lines

    body, sums, means = _row_body(programs, list(outputs.values()), unit_loads, row_loads, final)
    params = [("const T*", "dh"), ("const S*", "dc")]
    params += [("const S*", name) for name in map(programs.saved_name, programs.saved)]
    params += [("const T*", name) for name in programs.params]
    params += [("long long", "H"), ("long long", "lm_rows"), ("S*", "dz"), ("S*", "dc_prev")]
    params += [("S*", f"d{name}") for name in programs.params]
    return RowKernelSource(
        f"lstm_multi_{label}_backward_rows", tuple(params), "\n".join(body), sums, means
    )


def row_source(kernels, t_type: str, s_type: str) -> str:
    """The translation unit of row ``kernels`` in types T = ``t_type``, S = ``s_type``
    (``ROW_TYPES``): the text CuPy's ``RawKernel`` compiles with NVRTC, and a host C++
    compiler compiles as loops (module doc). On the host each kernel is ``extern "C" void
    {name}(int lm_nt, long long lm_shared_bytes, int lm_reverse, <params>)`` (the block's
    threads, the launch's shared memory, whether a pass runs its threads last to first),
    run once for all rows."""
    for given in (t_type, s_type):
        if given not in ROW_TYPES:
            raise ValueError(f"types: expected one of {ROW_TYPES}, got {given!r}")
    head = ["// generated by lstm_multi.compile.emit_cuda; do not edit", ROW_PRELUDE]
    if "float16" in (t_type, s_type):
        head.append("#include <cupy/float16.cuh>")  # CuPy's float16 (NVRTC only)
    head += [f"typedef {t_type} T;", f"typedef {s_type} S;", PREAMBLE]
    return "\n".join(head) + "".join(_row_function(k) for k in kernels)


def _row_function(kernel: RowKernelSource) -> str:
    signature = ", ".join(f"{type_} {name}" for type_, name in kernel.params)
    shared = []
    if kernel.means:
        shared = [f"LM_SHARED({kernel.sums} * lm_nt + {kernel.means})",
                  f"S* lm_mean = lm_part + {kernel.sums} * lm_nt;"]  # fmt: skip
    body = "\n    ".join([*shared, *kernel.body.splitlines()])
    return (
        f"\nLM_KERNEL {kernel.name}(LM_LAUNCH_ARGS {signature}) {{\n"
        f"  LM_BLOCK_THREADS\n  LM_ROWS {{\n    {body}\n  }}\n}}\n"
    )


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
        "using std::sqrt;",
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
