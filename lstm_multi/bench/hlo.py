"""What XLA makes of the JAX cell's time loop: kernels per step, read from optimized HLO.

The JAX cell's direction is a ``lax.scan``, which XLA compiles to a ``while``
loop whose body is one (or, unrolled, several) time steps. Each instruction of
the body's computation that launches work is counted by kind:

* ``gemm``: a ``dot``, a GEMM ``custom-call`` (cuBLAS/cuBLASLt on a GPU), or a
  fusion whose computation contains a ``dot`` (XLA-CPU's library fusions);
* ``elementwise``: any other fusion or compute op (the gate math);
* ``data``: fusions and ops that only move data (slices, dynamic-update-slice
  of the outputs, bitcasts, copies, the loop counter).

``scan_kernels(hlo_text)`` gives those counts per ``while`` loop;
``cell_report(cell, params, x)`` compiles the cell's forward and its VJP and
reports each loop's counts divided by the steps one iteration runs. The issue
"Peephole at cuDNN speed" asks whether a step is one GEMM and one fusion on a
GPU; ``benchmarks/gpu_check.py`` records the answer.
"""

from __future__ import annotations

import re

_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) (\w[\w\-]*)\((.*)$")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_BODY = re.compile(r"body=%([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')

#: ops that do no arithmetic worth a kernel of their own
_BOOKKEEPING = {
    "parameter", "get-tuple-element", "tuple", "constant", "bitcast", "copy", "reshape",
    "slice", "dynamic-slice", "dynamic-update-slice", "broadcast", "transpose", "iota",
    "convert", "compare", "select", "add", "after-all", "opt-barrier",
}  # fmt: skip
_MOVES = {"slice", "dynamic-slice", "dynamic-update-slice", "bitcast", "copy", "reshape",
          "broadcast", "transpose", "parameter", "constant", "tuple", "get-tuple-element",
          "convert", "concatenate", "pad"}  # fmt: skip


def computations(hlo_text):
    """{name: [(instruction name, op, "result type :: rest of the line")]} of an HLO
    module's text."""
    found, current = {}, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = found.setdefault(header.group(1), [])
            continue
        if line.strip() == "}":
            current = None
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction and current is not None:
            name, shape, op, rest = instruction.groups()
            current.append((name, op, f"{shape} :: {rest}"))
    return found


def _kind(op, rest, comps):
    """The kind of one instruction: "gemm", "elementwise", "data", or None (bookkeeping)."""
    if op == "dot" or (op == "custom-call" and _is_gemm_call(rest)):
        return "gemm"
    if op == "fusion":
        called = _CALLS.search(rest)
        ops = {o for _, o, _ in comps.get(called.group(1), [])} if called else set()
        if "dot" in ops:
            return "gemm"
        counter = not rest.startswith(("f", "bf", "c"))  # an integer or predicate result
        if ops <= _MOVES or (counter and ops <= _MOVES | {"add", "compare"}):
            return "data"
        return "elementwise"
    if op == "custom-call":
        return "elementwise"
    if op in _BOOKKEEPING or op in ("while", "call", "conditional"):
        return None
    return "elementwise"


def _is_gemm_call(rest):
    target = _TARGET.search(rest)
    return bool(target) and any(k in target.group(1).lower() for k in ("gemm", "matmul", "dot"))


def scan_kernels(hlo_text):
    """Per ``while`` loop of the module (in text order): {"body": name, "gemm": n,
    "elementwise": n, "data": n}, counting the loop body's instructions."""
    comps = computations(hlo_text)
    loops = []
    for instructions in comps.values():
        for _, op, rest in instructions:
            if op != "while":
                continue
            body = _BODY.search(rest)
            if body is None:
                continue
            counts = {"body": body.group(1), "gemm": 0, "elementwise": 0, "data": 0}
            for _, inner_op, inner_rest in comps.get(body.group(1), []):
                kind = _kind(inner_op, inner_rest, comps)
                if kind is not None:
                    counts[kind] += 1
            loops.append(counts)
    return loops


def cell_report(cell, params, x):
    """The JAX cell's forward and VJP loops, compiled for ``x`` (time-major (T, B, in)):
    {"forward": [...], "vjp": [...]} with each loop's counts per time step (divided by
    the steps one iteration runs: the cell's ``scan_unroll`` in the forward, 1 elsewhere)."""
    texts = cell.compiled_text(params, x)
    forward, vjp = texts["forward"], texts["vjp"]
    report = {}
    for name, text, unroll in (
        ("forward", forward, cell.scan_unroll),
        ("vjp", vjp, 1),
    ):
        loops = scan_kernels(text)
        report[name] = [
            {**loop, **{k: loop[k] / unroll for k in ("gemm", "elementwise", "data")}}
            if name == "forward"
            else loop
            for loop in loops
        ]
    return report
