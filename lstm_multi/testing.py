"""Checks a user runs on their own variant: ``check_variant(variant)``.

Every target the library runs the variant on gets its own result line, on a
small problem (2 layers, bidirectional, lengths, initial state), in float64
unless said otherwise:

1. ``gates``: the derived backward of one step's gate math (the array code)
   against central finite differences of its forward (directional
   derivatives along random directions), row reductions (``mean``) included;
2. ``network``: the NumPy backend's gradients of a whole network (``vjp``)
   against central finite differences of its forward; the note says whether
   it ran on the CPU kernels (what NumPy runs by default) or the array code;
3. ``array``: the same network with every direction on the array code
   (``network.loop_direction`` and ``bptt.backward_direction``, the Python
   loop a backend runs without the CPU kernels, and what PyTorch's
   ``gate_kernel="array"``, JAX and CuPy run) against the NumPy backend's;
4. ``cpu``: the generated CPU C++ (``emit_cpu``), compiled as the library
   compiles it (``CpuKernels(variant, "double")``): its fused step forward
   and backward against the array code, and its whole-sequence loops against
   the array code's time loop and BPTT, with lengths;
5. ``<backend>``: every other installed backend (torch, jax, cupy with a
   GPU) against the NumPy backend: outputs and gradients, in float64 where the
   backend computes it here (JAX only in its 64-bit mode), else in float32
   with a float32 tolerance;
6. ``kernels``: the CUDA C of the fused kernels (CuPy's), compiled on the host
   by a C++ compiler, against the array code (row kernels with 4 threads a block,
   run one after another within each pass, in order and in reverse order);
7. ``triton``: the Triton kernels (where torch and triton are installed), run
   by Triton's interpreter in float32, against the program's evaluation.

A variant whose gate math a kernel emitter does not write yet has that target
reported skipped with the reason: today every emitter writes row reductions,
``rsqrt`` and split halves (the C++ kernels, ``cpu``; the CUDA C row kernels,
``kernels``; Triton, ``triton``), so only an operation none of them writes would be.

Returns a ``VariantReport`` (printable) and raises ``AssertionError`` listing
what failed, unless ``raise_on_failure=False``. A target is never reported
passed unless it ran: one that cannot run here (a backend or triton not
installed, no C++ compiler, an unusable kernel cache) is reported as skipped,
with the reason; a compiler refusing the generated code, or a failure loading
or running what it built, is FAILED with the message, never an exception.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import numpy as np

from . import bptt, environment, network, registry, spec
from .backends import kernel_direction
from .compile import emit_cuda, evaluate
from .kernels.build import CompilerMissing
from .kernels.cpu_kernels import CpuKernels
from .kernels.host_kernels import HostKernels
from .ops import ArrayModuleOps

_NP = ArrayModuleOps(np)


@dataclass
class CheckResult:
    name: str
    status: str  # "passed", "FAILED" or "skipped"
    error: float | None = None  # worst relative error found
    tolerance: float | None = None
    note: str = ""


@dataclass
class VariantReport:
    variant: str
    results: list = field(default_factory=list)

    @property
    def failed(self):
        return [r for r in self.results if r.status == "FAILED"]

    def __str__(self):
        lines = [f"check_variant({self.variant!r}):"]
        for r in self.results:
            error = (
                ""
                if r.error is None
                else f" worst error {r.error:.2e} (tolerance {r.tolerance:.0e})"
            )
            note = f" {r.note}" if r.note else ""
            lines.append(f"  {r.name:<8} {r.status}{error}{note}")
        return "\n".join(lines)


def _relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return np.inf
    scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
    return float(np.max(np.abs(a - b), initial=0.0)) / scale


def _record(report, name, error, tolerance, note=""):
    ok = error <= tolerance  # NaN fails
    report.results.append(CheckResult(name, "passed" if ok else "FAILED", error, tolerance, note))


def _flat(tree):
    """Leaves of nested lists/tuples/dicts (dict values in key order) as a list."""
    if isinstance(tree, dict):
        return [leaf for k in sorted(tree) for leaf in _flat(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in _flat(item)]
    return [tree]


# 1. one step's gate math ------------------------------------------------------------


def _gate_extra(variant, rng, hidden):
    """Random gate-math parameters of ``variant`` (with the bias ``b`` for split halves)."""
    extra = {k: rng.normal(size=s) for k, s in variant.extra_param_shapes(hidden).items()}
    if variant.split:
        extra["b"] = rng.normal(size=4 * hidden)
    return extra


def _check_gates(variant, rng, report, directions=3, eps=1e-6):
    batch, hidden = 3, 4
    z = rng.normal(size=(batch, len(variant.programs.z_inputs) * hidden)) * 1.5
    c_prev = rng.normal(size=(batch, hidden))
    extra = _gate_extra(variant, rng, hidden)
    dh, dc = rng.normal(size=(batch, hidden)), rng.normal(size=(batch, hidden))

    def loss(z, c_prev, extra):
        h, c, _ = variant.gates_forward(_NP, z, c_prev, extra)
        return float(np.sum(h * dh) + np.sum(c * dc))

    _, _, cache = variant.gates_forward(_NP, z, c_prev, extra)
    dz, dc_prev, dextra = variant.gates_backward(_NP, dh, dc, cache, extra)
    worst = 0.0
    for _ in range(directions):
        vz, vc = rng.normal(size=z.shape), rng.normal(size=c_prev.shape)
        ve = {k: rng.normal(size=v.shape) for k, v in extra.items()}

        def at(s, vz=vz, vc=vc, ve=ve):
            return loss(z + s * vz, c_prev + s * vc, {k: extra[k] + s * ve[k] for k in extra})

        numeric = (at(eps) - at(-eps)) / (2 * eps)
        analytic = np.sum(dz * vz) + np.sum(dc_prev * vc)
        analytic += sum(np.sum(dextra[k] * ve[k]) for k in extra)
        worst = max(worst, abs(numeric - analytic) / max(1.0, abs(analytic)))
    _record(report, "gates", worst, 1e-7, "(derived backward vs finite differences)")


# 2. a whole network on NumPy ----------------------------------------------------------

_SIZES = dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True, batch_first=False)
_STEPS, _BATCH = 5, 3


def _problem(variant, rng):
    cell = registry.get_cell("numpy")(variant=variant, **_SIZES)
    params = cell.init(seed=int(rng.integers(1 << 30)), dtype="float64")
    x = rng.normal(size=(_STEPS, _BATCH, _SIZES["input_size"]))
    state = tuple(rng.normal(size=shape) for shape in cell.state_shapes(_BATCH))
    lengths = np.array([_STEPS, 2, 4])
    y, _ = cell(params, x, state, lengths)
    dy = rng.normal(size=y.shape)
    dh_n, dc_n = (rng.normal(size=shape) for shape in cell.state_shapes(_BATCH))
    return cell, dict(params=params, x=x, state=state, lengths=lengths, dy=dy, dh_n=dh_n, dc_n=dc_n)


def _check_network(variant, rng, report, directions=3, eps=1e-6):
    cell, p = _problem(variant, rng)

    def loss(params, x, state):
        y, (h_n, c_n) = cell(params, x, state, p["lengths"])
        return float(np.sum(y * p["dy"]) + np.sum(h_n * p["dh_n"]) + np.sum(c_n * p["dc_n"]))

    grads, dx, (dh0, dc0) = cell.vjp(
        p["params"], p["x"], p["dy"], p["state"], p["lengths"], p["dh_n"], p["dc_n"]
    )
    worst = 0.0
    for _ in range(directions):
        vp = [[{k: rng.normal(size=v.shape) for k, v in d.items()} for d in layer]
              for layer in p["params"]]  # fmt: skip
        vx = rng.normal(size=p["x"].shape)
        vs = tuple(rng.normal(size=s.shape) for s in p["state"])

        def at(s, vp=vp, vx=vx, vs=vs):
            params = [
                [{k: d[k] + s * vd[k] for k in d} for d, vd in zip(layer, vlayer, strict=True)]
                for layer, vlayer in zip(p["params"], vp, strict=True)
            ]
            state = tuple(a + s * v for a, v in zip(p["state"], vs, strict=True))
            return loss(params, p["x"] + s * vx, state)

        numeric = (at(eps) - at(-eps)) / (2 * eps)
        analytic = sum(float(np.sum(g * v)) for g, v in zip(_flat(grads), _flat(vp), strict=True))
        analytic += float(np.sum(dx * vx) + np.sum(dh0 * vs[0]) + np.sum(dc0 * vs[1]))
        worst = max(worst, abs(numeric - analytic) / max(1.0, abs(analytic)))
    on_kernels = kernel_direction.kernels_for(cell.ops, variant, p["x"]) is not None
    path = "the CPU kernels" if on_kernels else "the array code: no CPU kernels here"
    if variant.programs.kernel_refusal(reductions=True, split=True) is not None:
        path = "the array code: the C++ kernels do not write this variant yet"
    _record(report, "network", worst, 1e-6, f"(numpy vjp on {path}, vs finite differences)")
    return cell, p


def _array_code_cell(variant):
    """The NumPy cell with every direction on the array code (never the CPU kernels)."""
    return registry.get_cell("numpy")(variant=variant, engine="array", **_SIZES)


def _check_array(variant, reference_cell, p, report):
    """The array code's network (outputs and every gradient) against the NumPy backend's."""
    found = _run(_array_code_cell(variant), p, "float64")
    expected = _run(reference_cell, p, "float64")
    worst = max(_relative(a, b) for a, b in zip(found, expected, strict=True))
    on_kernels = kernel_direction.kernels_for(reference_cell.ops, variant, p["x"]) is not None
    against = "numpy on the CPU kernels" if on_kernels else "the network check (array code too)"
    _record(report, "array", worst, 1e-10, f"(numpy array-code loop vs {against})")


# 3. every other backend against NumPy ---------------------------------------------------


def _run(cell, p, dtype):
    cast = (lambda a: np.asarray(a, dtype=dtype)) if dtype != "float64" else np.asarray
    params = cell.from_numpy([[{k: cast(v) for k, v in d.items()} for d in layer]
                              for layer in p["params"]])  # fmt: skip
    x, state = cast(p["x"]), tuple(cast(s) for s in p["state"])
    y, (h_n, c_n) = cell(params, x, state, p["lengths"])
    grads, dx, (dh0, dc0) = cell.vjp(
        params, x, cast(p["dy"]), state, p["lengths"], cast(p["dh_n"]), cast(p["dc_n"])
    )
    leaves = _flat([y, h_n, c_n, dx, dh0, dc0, grads])
    return [np.asarray(cell.ops.to_numpy(a), dtype=np.float64) for a in leaves]


def _check_backends(variant, reference_cell, p, report, backends):
    expected = _run(reference_cell, p, "float64")
    for name in backends:
        if name == "numpy":
            continue
        try:
            Cell = registry.get_cell(name)
        except (ImportError, RuntimeError) as why:
            report.results.append(CheckResult(name, "skipped", note=f"({why})"))
            continue
        cell = Cell(variant=variant, **_SIZES)
        dtype, tolerance = "float64", 1e-10
        try:
            cell.init(dtype="float64")
        except TypeError:  # no float64 here (JAX without its 64-bit mode): float32
            dtype, tolerance = "float32", 1e-4
        found = _run(cell, p, dtype)
        worst = max(_relative(a, b) for a, b in zip(found, expected, strict=True))
        _record(report, name, worst, tolerance, f"(vs numpy, {dtype})")


# 4. the CPU C++, compiled as the library compiles it --------------------------------------


def _build(report, name, make):
    """``make()``, or None after recording why ``name`` cannot be checked: skipped for a
    missing compiler or an unusable cache (the target cannot run here), FAILED for a
    compiler refusing the code or a library that does not load (it is wrong)."""
    try:
        return make()
    except CompilerMissing as why:
        report.results.append(CheckResult(name, "skipped", note=f"({why})"))
    except OSError as why:  # an unwritable or noexec cache, a full disk
        note = f"(could not build or load here: {type(why).__name__}: {why})"
        report.results.append(CheckResult(name, "skipped", note=note))
    except Exception as why:  # noqa: BLE001 -- the compiler refused the code, a missing symbol
        note = f"({type(why).__name__}: {why})"
        report.results.append(CheckResult(name, "FAILED", note=note))
    return None


def _address(array):
    return None if array is None else array.ctypes.data


def _cpu_step_pairs(variant, kernels, rng):
    """(kernel result, array code result) pairs of one fused step, forward and backward."""
    programs = variant.programs
    batch, hidden = 3, 5
    z = rng.normal(size=(batch, len(programs.z_inputs) * hidden)) * 1.5
    h_prev, c_prev, dy, dh, dc = (rng.normal(size=(batch, hidden)) for _ in range(5))
    extra = _gate_extra(variant, rng, hidden)
    rows = variant.param_rows(extra)  # (H,) each, b's blocks first for split halves
    P = np.ascontiguousarray(np.stack(rows, 0) if rows else np.zeros((1, hidden)))
    stored = emit_cuda.forward_stored(programs)
    h, c, y = (np.full((batch, hidden), np.nan) for _ in range(3))
    saved = np.full((max(len(stored), 1), batch, hidden), np.nan)
    # split halves: x_t W and r U in their own arrays (z, zr); else z whole, zr NULL
    zx, zr = (np.ascontiguousarray(a) for a in np.split(z, 2, -1)) if variant.split else (z, None)
    kernels.step_forward(batch, hidden, _address(zx), _address(zr), _address(h_prev),
                         _address(c_prev), _address(P), None, _address(h), _address(c),
                         _address(y), _address(saved))  # fmt: skip
    want_h, want_c, cache = variant.gates_forward(_NP, z, c_prev, extra)
    known = {programs.inputs["c_prev"]: c_prev, programs.forward_outputs["c"]: c}
    known.update(zip(stored, saved, strict=False))
    pairs = [(h, want_h), (y, want_h), (c, want_c)]
    # a saved row mean is (B, 1) in the array code and stored at every unit by the kernels
    pairs += [(k, np.broadcast_to(a, np.shape(k)))
              for k, a in zip((known[n] for n in programs.saved), cache, strict=True)]  # fmt: skip
    dz = np.full(z.shape, np.nan)
    dP = np.zeros_like(P)
    dh_io, dc_io = dh.copy(), dc.copy()
    kernels.step_backward(batch, hidden, _address(dy), None, _address(dh_io), _address(dc_io),
                          _address(c_prev), _address(c), _address(saved), _address(P), None,
                          _address(dz), _address(dP))  # fmt: skip
    want_dz, want_dc, want_extra = variant.gates_backward(_NP, dh + dy, dc, cache, extra)
    pairs += [(dz, want_dz), (dc_io, want_dc), (dh_io, np.zeros_like(dh))]
    if rows:
        want_dP = [np.reshape(want_extra[name], (-1, hidden)) for name in variant.gate_params]
        pairs.append((dP, np.concatenate(want_dP, 0)))
    return pairs


def _cpu_sequence_pairs(variant, kernels, rng):
    """(kernel result, array code result) pairs of one direction (the loops in C) with
    lengths: outputs, final states and every gradient."""
    ops = registry.get_cell("numpy").ops
    steps, batch, inputs, hidden = 4, 3, 2, 3
    p = {
        "W": 0.5 * rng.normal(size=(inputs, 4 * hidden)),
        "U": 0.5 * rng.normal(size=(hidden, 4 * hidden)),
        "b": 0.1 * rng.normal(size=4 * hidden),
        **{k: 0.5 * rng.normal(size=s) for k, s in variant.extra_param_shapes(hidden).items()},
    }
    xs = rng.normal(size=(steps, batch, inputs))
    h0, c0 = rng.normal(size=(2, batch, hidden))
    valid = (np.arange(steps)[:, None] < np.array([4, 2, 3])[None, :])[:, :, None]
    dys = rng.normal(size=(steps, batch, hidden))
    dh, dc = rng.normal(size=(2, batch, hidden))
    *k_out, k_tape = kernel_direction.forward_direction(
        ops, kernels, variant, p, xs, h0, c0, valid, record=True
    )
    *a_out, a_tape = network.loop_direction(ops, variant, p, xs, h0, c0, valid, record=True)
    k_grads = kernel_direction.backward_direction(
        ops, kernels, variant, p, k_tape, dys, dh.copy(), dc.copy(), valid
    )
    a_grads = bptt.backward_direction(ops, variant, p, a_tape, dys, dh.copy(), dc.copy(), valid)
    return list(zip(_flat([k_out, k_grads]), _flat([a_out, a_grads]), strict=True))


def _not_written(variant, report, name, kernels, cpu=False):
    """Whether ``kernels`` do not write ``variant`` yet (row reductions and the like:
    ``GatePrograms.kernel_refusal``); then ``name`` is reported skipped with the reason
    (the engine table keeps the variant off them)."""
    why = variant.programs.kernel_refusal(reductions=cpu, split=cpu)
    if why is not None:
        note = f"({why}: not yet in {kernels}; the engine table runs the array code)"
        report.results.append(CheckResult(name, "skipped", note=note))
    return why is not None


def _check_cpu(variant, rng, report):
    if _not_written(variant, report, "cpu", "the C++ kernels", cpu=True):
        return
    kernels = _build(report, "cpu", lambda: CpuKernels(variant, "double"))
    if kernels is None:
        return
    try:
        pairs = _cpu_step_pairs(variant, kernels, rng) + _cpu_sequence_pairs(variant, kernels, rng)
    except Exception as why:  # noqa: BLE001 -- report, never raise, a kernel that misbehaves
        report.results.append(CheckResult("cpu", "FAILED", note=f"({type(why).__name__}: {why})"))
        return
    worst = max(_relative(a, b) for a, b in pairs)
    _record(report, "cpu", worst, 1e-12, "(C++ step and sequence loops vs array code)")


# 5. the fused kernels' CUDA C, compiled on the host -------------------------------------


def _check_kernels(variant, rng, report):
    if _not_written(variant, report, "kernels", "the CUDA C kernels", cpu=True):
        return
    make = lambda: HostKernels(variant, "double", "double", threads=4)  # noqa: E731
    kernels = _build(report, "kernels", make)
    if kernels is None:
        return
    batch, hidden = 3, 5
    z = rng.normal(size=(batch, len(variant.programs.z_inputs) * hidden)) * 1.5
    c_prev = rng.normal(size=(batch, hidden))
    extra = _gate_extra(variant, rng, hidden)
    dh, dc = rng.normal(size=(batch, hidden)), rng.normal(size=(batch, hidden))
    h, c, cache = variant.gates_forward(_NP, z, c_prev, extra)
    dz, dc_prev, dextra = variant.gates_backward(_NP, dh, dc, cache, extra)
    pairs = []
    # row kernels: each pass's threads in order, then last to first (a race shows)
    for reverse in (False, True) if kernels.rows else (False,):
        kernels.reverse = reverse
        kh, kc, k_cache = kernels.forward(z, c_prev, extra)
        k_dz, k_dc_prev, terms = kernels.backward(dh, dc, k_cache, extra)
        # a saved row mean is (B, 1) in the array code and stored at every unit by the kernels
        pairs += [(kh, h), (kc, c), (k_dz, dz), (k_dc_prev, dc_prev)]
        pairs += [(k, np.broadcast_to(a, np.shape(k))) for k, a in zip(k_cache, cache, strict=True)]
        pairs += [(np.reshape(terms[k].sum(0), np.shape(dextra[k])), dextra[k]) for k in dextra]
    worst = max(_relative(a, b) for a, b in pairs)
    threads = " (row kernels: 4 threads a block, in order and reversed)" if kernels.rows else ""
    _record(report, "kernels", worst, 1e-12, f"(CUDA C on the host vs array code{threads})")


# 6. the Triton kernels, in Triton's interpreter -----------------------------------------


def _triton_kernels(make, variant):
    """The kernels with the variant's module generated and imported (a cache that cannot
    hold it raises here, as a build failure, not while the kernels run)."""
    kernels = make()
    kernels.module(variant)
    return kernels


def _check_triton(variant, rng, report):
    # (no _not_written: the Triton kernels write row reductions, rsqrt and split halves)
    missing = [m for m in ("torch", "triton") if importlib.util.find_spec(m) is None]
    if missing:
        note = f"({' and '.join(missing)} not installed: pip install {' '.join(missing)})"
        report.results.append(CheckResult("triton", "skipped", note=note))
        return
    import torch

    from .backends.triton_kernels import TritonKernels

    programs = variant.programs
    batch, hidden = 3, 5
    width = len(programs.z_inputs)  # 4 blocks of z, or 8 (x_t W, r U) for split halves
    z = (rng.normal(size=(batch, width * hidden)) * 1.5).astype(np.float32)
    c_prev, dh, dc = (rng.normal(size=(batch, hidden)).astype(np.float32) for _ in range(3))
    shapes = variant.extra_param_shapes(hidden)
    if variant.split:
        shapes["b"] = (4 * hidden,)
    extra = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    t_extra = {k: torch.from_numpy(v) for k, v in extra.items()}
    with environment.temporarily("TRITON_INTERPRET", "1"):
        kernels = _build(report, "triton", lambda: _triton_kernels(TritonKernels, variant))
        if kernels is None:
            return
        try:
            h, c, saved = kernels.forward(variant, torch.from_numpy(z), torch.from_numpy(c_prev),
                                          t_extra)  # fmt: skip
            dz, dc_prev, terms = kernels.backward(
                variant, torch.from_numpy(dh), torch.from_numpy(dc), saved, t_extra
            )
        except Exception as why:  # noqa: BLE001 -- report, never raise
            note = f"({type(why).__name__}: {why})"
            report.results.append(CheckResult("triton", "FAILED", note=note))
            return
    wide = {
        name: np.asarray(extra[name], np.float64).reshape(len(rows), hidden)
        for name, rows in variant.gate_params.items()
    }
    inputs = dict(zip(programs.z_inputs, np.split(z.astype(np.float64), width, -1),
                      strict=True))  # fmt: skip
    inputs["c_prev"] = c_prev.astype(np.float64)
    for name, rows in variant.gate_params.items():
        inputs.update((f"{name}_{row}", wide[name][r]) for r, row in enumerate(rows))
    want_h, want_c, want_saved = evaluate.evaluate_forward(programs, inputs)
    back = {"dh": dh.astype(np.float64), "dc": dc.astype(np.float64)}
    back.update((k, v) for k, v in inputs.items() if k in programs.param_rows)
    saved64 = [np.asarray(s.numpy(), np.float64) for s in saved]
    out = evaluate.evaluate_backward(programs, back, saved64)
    want_dz = np.concatenate([out[f"d{name}"] for name in programs.z_inputs], -1)
    pairs = [(h.numpy(), want_h), (c.numpy(), want_c), (dz.numpy(), want_dz)]
    pairs += [(s.numpy(), w) for s, w in zip(saved, want_saved, strict=True)]
    pairs.append((dc_prev.numpy(), out["dc_prev"]))
    for name, rows in variant.gate_params.items():
        want = np.stack([out[f"d{name}_{row}"] for row in rows], 1)
        pairs.append((terms[name].numpy(), want))
    worst = max(_relative(a, b) for a, b in pairs)
    _record(report, "triton", worst, 1e-5, "(interpreted, float32, vs the program's evaluation)")


def check_variant(variant, backends=None, *, seed=0, raise_on_failure=True) -> VariantReport:
    """Check ``variant`` (a ``lstm_multi.Variant`` or a registered name); see the module doc.

    ``backends``: the backends to compare with NumPy (default: every known one;
    those not installed are reported as skipped).
    """
    variant = spec.get_variant(variant)
    rng = np.random.default_rng(seed)
    report = VariantReport(variant.name)
    variant.programs  # noqa: B018 -- tracing errors surface here, before any number
    _check_gates(variant, rng, report)
    reference_cell, problem = _check_network(variant, rng, report)
    _check_array(variant, reference_cell, problem, report)
    _check_cpu(variant, rng, report)
    _check_backends(variant, reference_cell, problem, report, backends or registry.known_backends())
    _check_kernels(variant, rng, report)
    _check_triton(variant, rng, report)
    if raise_on_failure and report.failed:
        raise AssertionError(f"{report}\n{len(report.failed)} check(s) failed")
    return report
