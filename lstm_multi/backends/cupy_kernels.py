"""The fused gate kernels of the CuPy backend: one source per variant, two runners.

The gate math of ``lstm_multi.spec`` is restated here once more, because a GPU
kernel needs it as C. To keep that second statement honest, each variant's
forward and backward is written below as straight-line assignments copied from
``spec.py`` (names, ``+ - *``, integer literals and calls of ``sigmoid`` and
``tanh`` only), text that is valid Python and valid C++ alike, and it runs
two ways:

* ``CudaKernels``: the text becomes the body of one ``cupy.ElementwiseKernel``
  per step and direction (loads of the gate blocks, the body, the stores), so a
  step's whole elementwise math is one kernel launch on the GPU;
* ``NumpyKernels``: the very same text is executed by Python on NumPy arrays,
  which is how the tests check it against the spec on machines without a GPU
  (and ``c_function_source`` compiles the same generated C++ with a host
  compiler for the same check).

Names inside a body: forward reads ``zi zf zg zo`` (the gate blocks of z),
``c_prev`` and, for "peephole", ``p_i p_f p_o`` (rows of p); it assigns the
GateCache fields. Backward reads ``dh dc``, the cache fields and the peephole
rows, and assigns ``dzi dzf dzg dzo dc_prev`` and, for "peephole", the
per-element peephole gradient terms ``dp_i dp_f dp_o`` (summed over the batch
by the caller, as the spec's ``ops.sum(..., 0)``).

Precision: loads are converted to the state type ``S`` (float32 for float16
inputs, else the input type ``T``), the math runs in ``S``, h is stored as
``T`` and everything the backward sums over time and batch (dz, the peephole
terms) as ``S`` (``ArrayModuleOps.state_dtype``).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from .. import spec
from ..ops import ArrayModuleOps


class StepSource(NamedTuple):
    reads: tuple[str, ...]  # names the body reads, loaded before it runs
    body: str  # the assignments, one per line
    writes: tuple[str, ...]  # names the caller takes after it


class VariantSource(NamedTuple):
    forward: StepSource
    backward: StepSource
    act: str  # which forward name is GateCache.act
    peephole: bool  # reads p_i, p_f, p_o and writes dp_i, dp_f, dp_o


_CACHE = ("i", "f", "g", "o", "c_prev", "c")
_PEEP = ("p_i", "p_f", "p_o")
_DZ = ("dzi", "dzf", "dzg", "dzo")

SOURCES: dict[str, VariantSource] = {
    # spec.PlainLSTM
    "lstm": VariantSource(
        forward=StepSource(
            ("zi", "zf", "zg", "zo", "c_prev"),
            """
            i = sigmoid(zi)
            f = sigmoid(zf)
            g = tanh(zg)
            o = sigmoid(zo)
            c = f * c_prev + i * g
            tanh_c = tanh(c)
            h = o * tanh_c
            """,
            ("h", "c", "i", "f", "g", "o", "tanh_c"),
        ),
        backward=StepSource(
            ("dh", "dc", *_CACHE, "tanh_c"),
            """
            dc = dc + dh * o * (1 - tanh_c * tanh_c)
            dzi = dc * g * i * (1 - i)
            dzf = dc * c_prev * f * (1 - f)
            dzg = dc * i * (1 - g * g)
            dzo = dh * tanh_c * o * (1 - o)
            dc_prev = dc * f
            """,
            (*_DZ, "dc_prev"),
        ),
        act="tanh_c",
        peephole=False,
    ),
    # spec.PeepholeLSTM
    "peephole": VariantSource(
        forward=StepSource(
            ("zi", "zf", "zg", "zo", "c_prev", *_PEEP),
            """
            i = sigmoid(zi + p_i * c_prev)
            f = sigmoid(zf + p_f * c_prev)
            g = tanh(zg)
            c = f * c_prev + i * g
            o = sigmoid(zo + p_o * c)
            tanh_c = tanh(c)
            h = o * tanh_c
            """,
            ("h", "c", "i", "f", "g", "o", "tanh_c"),
        ),
        backward=StepSource(
            ("dh", "dc", *_CACHE, "tanh_c", *_PEEP),
            """
            dzo = dh * tanh_c * o * (1 - o)
            dc = dc + dh * o * (1 - tanh_c * tanh_c) + dzo * p_o
            dzi = dc * g * i * (1 - i)
            dzf = dc * c_prev * f * (1 - f)
            dzg = dc * i * (1 - g * g)
            dc_prev = dc * f + dzi * p_i + dzf * p_f
            dp_i = dzi * c_prev
            dp_f = dzf * c_prev
            dp_o = dzo * c
            """,
            (*_DZ, "dc_prev", "dp_i", "dp_f", "dp_o"),
        ),
        act="tanh_c",
        peephole=True,
    ),
    # spec.FullPeepholeLSTM
    "peephole_full": VariantSource(
        forward=StepSource(
            ("zi", "zf", "zg", "zo", "c_prev"),
            """
            i = sigmoid(zi)
            f = sigmoid(zf)
            g = sigmoid(zg)
            o = sigmoid(zo)
            c = f * c_prev + i * g
            h = tanh(o * c)
            """,
            ("h", "c", "i", "f", "g", "o"),
        ),
        backward=StepSource(
            ("dh", "dc", *_CACHE, "h"),
            """
            d_oc = dh * (1 - h * h)
            dc = dc + d_oc * o
            dzi = dc * g * i * (1 - i)
            dzf = dc * c_prev * f * (1 - f)
            dzg = dc * i * g * (1 - g)
            dzo = d_oc * c * o * (1 - o)
            dc_prev = dc * f
            """,
            (*_DZ, "dc_prev"),
        ),
        act="h",
        peephole=False,
    ),
}

_FUNCTIONS = ("sigmoid", "tanh")
_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*) = (.+)$")
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+|[-+*(), ]")


def parse_body(body):
    """``body`` -> [(name, expression)], checking it uses only the common subset."""
    lines = []
    for raw in body.strip().splitlines():
        line = raw.strip()
        match = _ASSIGNMENT.match(line)
        if match is None:
            raise ValueError(f"kernel body: expected 'name = expression', got {line!r}")
        name, expression = match.groups()
        if "".join(_TOKEN.findall(expression)) != expression:
            raise ValueError(
                f"kernel body: {line!r} leaves the subset shared by Python and C "
                "(names, integers, + - *, parentheses, sigmoid(), tanh())"
            )
        lines.append((name, expression))
    return lines


# ---------------------------------------------------------------------------
# NumPy runner: the body executed as Python


def run_body(step: StepSource, values: dict):
    """Execute ``step.body`` on the arrays in ``values``; returns the written names."""
    namespace = {"sigmoid": ArrayModuleOps(np).sigmoid, "tanh": np.tanh}
    local = dict(values)
    missing = set(step.reads) - set(local)
    if missing:
        raise KeyError(f"kernel body reads {sorted(missing)}, which were not given")
    code = "\n".join(f"{name} = {expression}" for name, expression in parse_body(step.body))
    exec(compile(code, "<kernel body>", "exec"), namespace, local)
    return {name: local[name] for name in step.writes}


def _blocks(z, hidden):
    return [z[:, k * hidden : (k + 1) * hidden] for k in range(4)]


class NumpyKernels:
    """The kernel bodies run by NumPy (for tests on machines without a GPU)."""

    xp = np

    def forward(self, name, z, c_prev, p):
        """-> (h in z's dtype, c, i, f, g, o, act) with the rest in c_prev's dtype."""
        source = SOURCES[name]
        state = c_prev.dtype
        blocks = [b.astype(state) for b in _blocks(z, c_prev.shape[-1])]
        values = dict(zip(("zi", "zf", "zg", "zo"), blocks, strict=True))
        values["c_prev"] = c_prev
        if source.peephole:
            values.update(zip(_PEEP, p.astype(state), strict=True))
        out = run_body(source.forward, values)
        return (
            out["h"].astype(z.dtype),
            out["c"],
            out["i"],
            out["f"],
            out["g"],
            out["o"],
            out[source.act],
        )

    def backward(self, name, dh, dc, cache, p):
        """-> (dz (B, 4H), dc_prev, dp_terms (B, 3, H) or None), all in dc's dtype."""
        source = SOURCES[name]
        state = dc.dtype
        values = dict(zip(_CACHE, cache[:6], strict=True))
        values.update({source.act: cache.act, "dh": dh.astype(state), "dc": dc})
        if source.peephole:
            values.update(zip(_PEEP, p.astype(state), strict=True))
        out = run_body(source.backward, values)
        dz = np.concatenate([out[k] for k in _DZ], -1)
        terms = None
        if source.peephole:
            terms = np.stack([out["dp_i"], out["dp_f"], out["dp_o"]], 1)
        return dz, out["dc_prev"], terms

    def gemm_accumulate(self, z, a, b):
        """z += a @ b in place; returns z."""
        z += a @ b
        return z


# ---------------------------------------------------------------------------
# C++ / CUDA: the body as the operation of an ElementwiseKernel

_PREAMBLE = """
// 1 / (1 + exp(-x)) to a few ulp in both tails (as ArrayModuleOps.sigmoid):
// e = exp(-|x|) never overflows; x < 0 gives e / (1 + e), not 1 - 1 / (1 + e)
template <typename F> __device__ __forceinline__ F sigmoid(F x) {
  const F e = exp(-fabs(x));
  const F r = F(1) / (F(1) + e);
  return x >= F(0) ? r : e * r;
}
"""


def _c_expression(expression):
    def rename(match):
        word = match.group(0)
        return word if word in _FUNCTIONS or word.isdigit() else f"v_{word}"

    return re.sub(r"[A-Za-z_][A-Za-z0-9_]*", rename, expression)


def _c_body(step: StepSource, declared):
    lines = []
    for name, expression in parse_body(step.body):
        prefix = "" if name in declared else "S "
        declared.add(name)
        lines.append(f"{prefix}v_{name} = {_c_expression(expression)};")
    return lines


def _c_used(step: StepSource):
    """The names the body's expressions read."""
    names = set()
    for _, expression in parse_body(step.body):
        names.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expression))
    return names - set(_FUNCTIONS)


def _c_loads(step: StepSource, loads):
    """The load lines (name -> C line) of the names the body reads."""
    used = _c_used(step)
    return [line for name, line in loads if name in used]


def _c_index_lines():
    # i is the ElementwiseKernel's element index over the (B, H) arrays
    return [
        "const ptrdiff_t lm_b = i / H;",
        "const ptrdiff_t lm_j = i - lm_b * H;",
        "const ptrdiff_t lm_row = lm_b * 4 * H + lm_j;",
    ]


def _c_peephole_loads():
    return [
        ("p_i", "const S v_p_i = (S)p[lm_j];"),
        ("p_f", "const S v_p_f = (S)p[H + lm_j];"),
        ("p_o", "const S v_p_o = (S)p[2 * H + lm_j];"),
    ]


def forward_kernel_params(name):
    """(in_params, out_params) of variant ``name``'s forward ElementwiseKernel."""
    source = SOURCES[name]
    ins = "raw T z, S c_prev" + (", raw T p" if source.peephole else "") + ", int64 H"
    # act is written even where it is h: the cache keeps it in the state type
    return ins, "T h, S c, S gi, S gf, S gg, S go, S act"


def forward_operation(name):
    """The C++ operation of variant ``name``'s forward kernel."""
    source = SOURCES[name]
    lines = _c_index_lines()
    loads = [
        (gate, f"S v_{gate} = (S)z[{k} * H + lm_row];")
        for k, gate in enumerate(("zi", "zf", "zg", "zo"))
    ]
    loads.append(("c_prev", "S v_c_prev = (S)c_prev;"))
    if source.peephole:
        loads += _c_peephole_loads()
    lines += _c_loads(source.forward, loads)
    lines += _c_body(source.forward, set(source.forward.reads))
    lines += [
        "h = (T)v_h;",
        "c = v_c;",
        "gi = v_i;",
        "gf = v_f;",
        "gg = v_g;",
        "go = v_o;",
    ]
    lines.append(f"act = v_{source.act};")
    return "\n".join(lines)


def backward_kernel_params(name):
    """(in_params, out_params) of variant ``name``'s backward ElementwiseKernel."""
    source = SOURCES[name]
    ins = "T dh, S dc, S gi, S gf, S gg, S go, S c_prev, S c, S act"
    ins += (", raw T p" if source.peephole else "") + ", int64 H"
    outs = "raw S dz, S dc_prev" + (", raw S dp" if source.peephole else "")
    return ins, outs


def backward_operation(name):
    """The C++ operation of variant ``name``'s backward kernel."""
    source = SOURCES[name]
    lines = _c_index_lines()
    loads = [
        ("dh", "const S v_dh = (S)dh;"),
        ("dc", "S v_dc = dc;"),
        ("i", "const S v_i = gi;"),
        ("f", "const S v_f = gf;"),
        ("g", "const S v_g = gg;"),
        ("o", "const S v_o = go;"),
        ("c_prev", "const S v_c_prev = c_prev;"),
        ("c", "const S v_c = c;"),
        (source.act, f"const S v_{source.act} = act;"),
    ]
    if source.peephole:
        loads += _c_peephole_loads()
    lines += _c_loads(source.backward, loads)
    lines += _c_body(source.backward, set(source.backward.reads))
    for k, gate in enumerate(_DZ):
        lines.append(f"dz[{k} * H + lm_row] = v_{gate};")
    lines.append("dc_prev = v_dc_prev;")
    if source.peephole:
        # dp is (B, 3, H): row lm_b, then the peephole row, then lm_j
        for k, term in enumerate(("dp_i", "dp_f", "dp_o")):
            lines.append(f"dp[(lm_b * 3 + {k}) * H + lm_j] = v_{term};")
    return "\n".join(lines)


def c_function_source(name, t_type, s_type):
    """Variant ``name``'s two kernel operations inside plain C++ loops, for a host compiler.

    Exports ``forward(n, H, z, c_prev, p, h, c, gi, gf, gg, go, act)`` and
    ``backward(n, H, dh, dc, gi, gf, gg, go, c_prev, c, act, p, dz, dc_prev, dp)``
    over contiguous arrays, with ``T`` = ``t_type`` and ``S`` = ``s_type``
    (``p``, ``act`` and ``dp`` are read or written only where the variant has
    them). The operation text is exactly what the GPU kernels run; the loop
    stands in for the ElementwiseKernel's, with ``i`` its element index.
    """
    if name not in SOURCES:
        raise KeyError(f"no kernel source for variant {name!r}")
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
        _PREAMBLE,
    ]
    forward = f"""
extern "C" void forward(ptrdiff_t n, long long H, const T* z, const S* c_prev_a, const T* p,
                        T* h_a, S* c_a, S* gi_a, S* gf_a, S* gg_a, S* go_a, S* act_a) {{
  for (ptrdiff_t i = 0; i < n; ++i) {{
    const S& c_prev = c_prev_a[i];
    T& h = h_a[i]; S& c = c_a[i]; S& gi = gi_a[i]; S& gf = gf_a[i]; S& gg = gg_a[i];
    S& go = go_a[i]; S& act = act_a[i];  // act is unused where it is h
    (void)c_prev; (void)h; (void)c; (void)gi; (void)gf; (void)gg; (void)go; (void)act; (void)p;
{forward_operation(name)}
  }}
}}
"""
    backward = f"""
extern "C" void backward(ptrdiff_t n, long long H, const T* dh_a, const S* dc_a, const S* gi_a,
                         const S* gf_a, const S* gg_a, const S* go_a, const S* c_prev_a,
                         const S* c_a, const S* act_a, const T* p, S* dz, S* dc_prev_a, S* dp) {{
  for (ptrdiff_t i = 0; i < n; ++i) {{
    const T& dh = dh_a[i]; const S& dc = dc_a[i]; const S& gi = gi_a[i]; const S& gf = gf_a[i];
    const S& gg = gg_a[i]; const S& go = go_a[i]; const S& c_prev = c_prev_a[i];
    const S& c = c_a[i]; const S& act = act_a[i]; S& dc_prev = dc_prev_a[i];
    (void)dh; (void)dc; (void)gi; (void)gf; (void)gg; (void)go; (void)c_prev; (void)c;
    (void)act; (void)dc_prev; (void)p; (void)dp;
{backward_operation(name)}
  }}
}}
"""
    return "\n".join(head) + forward + backward


class CudaKernels:
    """The kernel bodies as ``cupy.ElementwiseKernel``s (built on first use)."""

    def __init__(self, cupy):
        self.xp = cupy
        self._kernels = {}

    def _kernel(self, name, direction):
        key = (name, direction)
        if key not in self._kernels:
            if direction == "forward":
                ins, outs = forward_kernel_params(name)
                operation = forward_operation(name)
            else:
                ins, outs = backward_kernel_params(name)
                operation = backward_operation(name)
            self._kernels[key] = self.xp.ElementwiseKernel(
                ins, outs, operation, f"lstm_multi_{name}_{direction}", preamble=_PREAMBLE
            )
        return self._kernels[key]

    def forward(self, name, z, c_prev, p):
        cp = self.xp
        source = SOURCES[name]
        z = cp.ascontiguousarray(z)
        hidden = c_prev.shape[-1]
        shape = c_prev.shape
        h = cp.empty(shape, dtype=z.dtype)
        c, i, f, g, o, act = (cp.empty(shape, dtype=c_prev.dtype) for _ in range(6))
        args = [z, c_prev]
        if source.peephole:
            args.append(cp.ascontiguousarray(p, dtype=z.dtype))
        self._kernel(name, "forward")(*args, hidden, h, c, i, f, g, o, act)
        return h, c, i, f, g, o, act

    def backward(self, name, dh, dc, cache, p):
        cp = self.xp
        source = SOURCES[name]
        shape = dc.shape
        batch, hidden = shape
        dz = cp.empty((batch, 4 * hidden), dtype=dc.dtype)
        dc_prev = cp.empty(shape, dtype=dc.dtype)
        state = dc.dtype
        args = [dh, dc, *(cp.asarray(a, dtype=state) for a in (*cache[:6], cache.act))]
        if source.peephole:
            args.append(cp.ascontiguousarray(p, dtype=dh.dtype))
        args.append(hidden)
        outs = [dz, dc_prev]
        terms = None
        if source.peephole:
            terms = cp.empty((batch, 3, hidden), dtype=dc.dtype)
            outs.append(terms)
        self._kernel(name, "backward")(*args, *outs)
        return dz, dc_prev, terms

    def gemm_accumulate(self, z, a, b):
        """z += a @ b in place (one cuBLAS gemm with beta = 1 for float32/float64)."""
        cp = self.xp
        if (
            z.dtype.char in "fd"
            and a.dtype == b.dtype == z.dtype
            and z.ndim == 2
            and z.flags.c_contiguous
        ):
            import cupy.cublas

            cupy.cublas.gemm("N", "N", a, b, out=z, beta=1.0)
            return z
        z += cp.matmul(a, b)  # float16: cuBLAS through cupy.matmul, then one add
        return z


# ---------------------------------------------------------------------------
# the ops that route a step through the kernels


class FusedOps(ArrayModuleOps):
    """``ArrayModuleOps`` whose per-step work goes through ``kernels``.

    ``gates_forward`` / ``gates_backward`` run one fused kernel each for the
    variants in ``SOURCES`` (anything else falls back to the spec's math), and
    ``add_matmul`` accumulates ``r @ U`` into the step's slice of the hoisted
    input projection in place. With ``CudaKernels`` this is the CuPy backend's
    ops; with ``NumpyKernels`` the same plumbing runs on the CPU for tests.
    """

    def __init__(self, kernels, name="fused"):
        super().__init__(kernels.xp)
        self.kernels = kernels
        self.name = name

    @staticmethod
    def _fused(variant):
        return spec.VARIANTS.get(variant.name) is variant and variant.name in SOURCES

    def gates_forward(self, variant, z, c_prev, extra):
        if not self._fused(variant):
            return super().gates_forward(variant, z, c_prev, extra)
        c_prev = self.cast(c_prev, self.state_dtype(self.dtype_name(z)))
        h, c, i, f, g, o, act = self.kernels.forward(variant.name, z, c_prev, extra.get("p"))
        return h, c, spec.GateCache(i, f, g, o, c_prev, c, act)

    def gates_backward(self, variant, dh, dc, cache, extra):
        if not self._fused(variant):
            return super().gates_backward(variant, dh, dc, cache, extra)
        dc = self.cast(dc, self.dtype_name(cache.c))
        dz, dc_prev, terms = self.kernels.backward(variant.name, dh, dc, cache, extra.get("p"))
        # summed over time in the state dtype, rounded to p's dtype once (bptt)
        dextra = {} if terms is None else {"p": self.sum(terms, 0)}
        return dz, dc_prev, dextra

    def add_matmul(self, z, a, b):
        return self.kernels.gemm_accumulate(z, self.cast(a, self.dtype_name(b)), b)
