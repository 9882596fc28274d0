"""Checks a user runs on their own variant: ``check_variant(variant)``.

What it checks, on a small problem (2 layers, bidirectional, lengths, initial
state), each in float64:

1. ``gates``: the derived backward of one step's gate math against central
   finite differences of its forward (directional derivatives along random
   directions);
2. ``network``: the NumPy backend's gradients of a whole network (``vjp``)
   against central finite differences of its forward;
3. ``<backend>``: every other installed backend (torch, jax, cupy with a
   GPU) against the NumPy backend: outputs and gradients, in float64 where the
   backend computes it here (JAX only in its 64-bit mode), else in float32
   with a float32 tolerance;
4. ``kernels``: the CUDA C of the fused kernels, compiled on the host by a C++
   compiler when there is one, against the program's own evaluation.

Returns a ``VariantReport`` (printable) and raises ``AssertionError`` listing
what failed, unless ``raise_on_failure=False``. A check that cannot run here
(a backend not installed, no compiler) is reported as skipped, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import registry, spec
from .kernels.build import CompilerMissing
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


def _check_gates(variant, rng, report, directions=3, eps=1e-6):
    batch, hidden = 3, 4
    z = rng.normal(size=(batch, 4 * hidden)) * 1.5
    c_prev = rng.normal(size=(batch, hidden))
    extra = {k: rng.normal(size=s) for k, s in variant.extra_param_shapes(hidden).items()}
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
    _record(report, "network", worst, 1e-6, "(numpy vjp vs finite differences)")
    return cell, p


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


# 4. the fused kernels' C, compiled on the host ------------------------------------------


def _check_kernels(variant, rng, report):
    try:
        kernels = HostKernels(variant, "double", "double")
    except CompilerMissing as why:
        report.results.append(CheckResult("kernels", "skipped", note=f"({why})"))
        return
    except RuntimeError as why:  # the compiler refused the generated code
        report.results.append(CheckResult("kernels", "FAILED", note=f"({why})"))
        return
    batch, hidden = 3, 5
    z = rng.normal(size=(batch, 4 * hidden)) * 1.5
    c_prev = rng.normal(size=(batch, hidden))
    extra = {k: rng.normal(size=s) for k, s in variant.extra_param_shapes(hidden).items()}
    dh, dc = rng.normal(size=(batch, hidden)), rng.normal(size=(batch, hidden))
    h, c, cache = variant.gates_forward(_NP, z, c_prev, extra)
    kh, kc, k_cache = kernels.forward(z, c_prev, extra)
    dz, dc_prev, dextra = variant.gates_backward(_NP, dh, dc, cache, extra)
    k_dz, k_dc_prev, terms = kernels.backward(dh, dc, k_cache, extra)
    pairs = [(kh, h), (kc, c), *zip(k_cache, cache, strict=True), (k_dz, dz), (k_dc_prev, dc_prev)]
    pairs += [(terms[k].sum(0), dextra[k]) for k in dextra]
    worst = max(_relative(a, b) for a, b in pairs)
    _record(report, "kernels", worst, 1e-12, "(CUDA C on the host vs array code)")


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
    _check_backends(variant, reference_cell, problem, report, backends or registry.known_backends())
    _check_kernels(variant, rng, report)
    if raise_on_failure and report.failed:
        raise AssertionError(f"{report}\n{len(report.failed)} check(s) failed")
    return report
