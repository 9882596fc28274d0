"""The LSTM specification: every variant's gate math, written once, forward only.

Every backend runs the equations in this module; none restates them. A step is
split in two: the preactivation ``z = x_t W + b + r U`` (the input half
``x_t W + b`` is computed for all steps at once by the caller) and the gate
math that turns ``z`` and the previous cell state into the new state.

A variant's gate math is a plain Python function of per-unit values, written
with ``+ - *``, ``sigmoid``, ``tanh``, ``rsqrt`` and the row mean ``mean``
(``lstm_multi.compile``)::

    def lstm(z, c_prev):
        i, f, g, o = sigmoid(z.i), sigmoid(z.f), tanh(z.g), sigmoid(z.o)
        c = f * c_prev + i * g
        return o * tanh(c), c

It is traced once into an expression DAG; the backward is derived from it by
reverse-mode differentiation with shared subexpressions, and the code every
backend runs is generated from the two programs (array code for NumPy, PyTorch
and JAX; CUDA C for CuPy's fused kernels). Nothing else states a gate equation.

Gate order is (i, f, g, o): ``z`` has shape (B, 4H) and its column blocks
``z[:, k*H:(k+1)*H]`` are the gates in that order. ``sigma`` is the logistic
sigmoid. The built-in variants (``VARIANTS``)::

    "lstm"           i=σ(z_i) f=σ(z_f) g=tanh(z_g) o=σ(z_o)
                     c_t = f c_{t-1} + i g;  h_t = o tanh(c_t)     (= torch.nn.LSTM)
    "peephole"       i=σ(z_i + p_i c_{t-1}) f=σ(z_f + p_f c_{t-1}) g=tanh(z_g)
                     c_t = f c_{t-1} + i g;  o=σ(z_o + p_o c_t);  h_t = o tanh(c_t)
    "peephole_full"  r = c_{t-1}; i=σ(z_i) f=σ(z_f) o=σ(z_o) g=σ(x_t W_g + b_g)
                     c_t = f c_{t-1} + i g;  h_t = tanh(o c_t)

the layer-normalised LSTM of Ba, Kiros & Hinton, "Layer Normalization" (2016),
each LN over the whole row of its argument (the biased variance, eps = 1e-5)::

    "layernorm"           z   = LN(x_t W; γ_x, β_x) + LN(h_{t-1} U; γ_h, β_h) + b   (4H)
                          c_t = σ(z_f) c_{t-1} + σ(z_i) tanh(z_g)
                          h_t = σ(z_o) tanh(LN(c_t; γ_c, β_c))                    (H)
    "layernorm_peephole"  the same z, and the gates of "peephole":
                          i=σ(z_i + p_i c_{t-1}) f=σ(z_f + p_f c_{t-1}) o=σ(z_o + p_o c_t)
                          h_t = o tanh(LN(c_t; γ_c, β_c))

    LN(v; γ, β) = γ (v - mean(v)) / sqrt(var(v) + eps) + β      (``layer_norm``)

and the variants of Greff et al., "LSTM: A Search Space Odyssey" (2017), each
the peephole LSTM (their "vanilla", ``"peephole"`` here) with one change::

    "nig"   no input gate:                 i = 1      (p rows f, o)
    "nfg"   no forget gate:                f = 1      (p rows i, o)
    "nog"   no output gate:                o = 1      (p rows i, f)
    "niaf"  no input activation function:  g = z_g
    "noaf"  no output activation function: h_t = o c_t
    "cifg"  coupled input and forget gate: f = 1 - i  (p rows i, o)

(their "NP", no peepholes, is ``"lstm"``). A variant without a gate keeps that
gate's block of W, U and b, so every variant has the same layout and weights
move between them; the block is unused and its gradient is zero.

"peephole" has diagonal peepholes p of shape (3, H), rows (i, f, o) (Gers &
Schmidhuber 2000); the Greff variants have one row per gate they keep that
reads the cell. "peephole_full" (the peephole form of "Building a LSTM by hand
on PyTorch") feeds c_{t-1} instead of h_{t-1} through the full matrix U, with
the g block of U unused (masked to zero, so its gradient is zero). Its
recurrence never reads h_{t-1}: an initial h0 is accepted (so a previous
chunk's (h_n, c_n) can be passed on unchanged) but does not enter the
computation, and its gradient is zero.

Split halves. LN(x_t W) needs x_t W without b, and r U apart from it, where
every other variant takes their sum: a variant declares ``halves="split"`` and
its step contract becomes::

    zx_t = x_t W                 (B, 4H), still one GEMM for the whole sequence,
                                 only without b folded in
    zr_t = r U                   (B, 4H), the step's recurrent product
    h_t, c_t = gates(zx_t, zr_t, c_{t-1}, b, params)

with the gate math written ``forward(zx, zr, c_prev, b, **params)``: ``zx.i``
... ``zr.o`` are the halves' gate blocks and ``b`` (rows i, f, g, o) is the
bias, now an ordinary per-unit parameter of the gate math (the same (4H,)
numbers in gate order, so b's layout and converters are unchanged). The
backward gives dzx and dzr apart: dW and dx read dzx, dU and dr read dzr, and
db is the gate math's own parameter gradient (``lstm_multi.step``).

Row reductions. ``mean(v)`` is the mean of the per-unit value v over the H
units of its row (one sequence's state), read as the same number at every
unit; a mean over the 4H preactivations is ``0.25 * mean(v.i + v.f + v.g +
v.o)``. The derived backward spreads a row mean's gradient evenly
(d mean(v) / d v_j = 1 / H). Every target runs reductions, ``rsqrt`` and split
halves: the array code (NumPy, PyTorch, JAX, CuPy arrays), the C++ CPU kernels
(a row function in phases, in every loop including the batch split), CuPy's CUDA C (row kernels: a thread block a row),
Triton (per-step and persistent: whole rows a program), Pallas (whole rows a
program) and ONNX (``ReduceMean``).

Canonical parameters of one layer and direction (``in`` is input_size for
layer 0 and H * num_directions after)::

    W (in, 4H)   U (H, 4H)   b (4H,)   [p (rows, H) for the peephole variants]
    [gamma_x, beta_x, gamma_h, beta_h (4, H), rows (i, f, g, o): the (4H,) gains and
     shifts of LN(x_t W) and LN(r U) in gate order; gamma_c, beta_c (1, H), row c: those
     of LN(c_t) -- for the layer-normalised variants; gains start at 1, shifts at 0]
"""

from __future__ import annotations

import functools
import hashlib

from . import validation
from .compile import derive, emit_array, trace
from .compile.trace import mean, rsqrt, sigmoid, tanh

GATE_ORDER = ("i", "f", "g", "o")
STATE_ORDER = ("h", "c")
#: the key of the projection weight W_hr (H, P) of an LSTM with ``proj_size`` P (LSTMP)
PROJECTION = "W_hr"
#: the built-in variants and their aliases, by name (filled once ``VARIANTS`` is made; a
#: Variant bearing one of these names must compute that one)
_BUILTINS: dict[str, Variant] = {}


def split_gates(z, hidden_size):
    """Split (B, kH) preactivations into their k (B, H) blocks, in order: the four gates
    (B, 4H), or for split halves (B, 8H) the four of x_t W, then the four of r U."""
    h = hidden_size
    return tuple(z[..., k * h : (k + 1) * h] for k in range(z.shape[-1] // h))


class Variant:
    """An LSTM variant: its gate math (forward only), its parameters and its recurrence.

    ``forward(z, c_prev, **params) -> (h, c)`` is the per-unit gate math: ``z.i``
    ... ``z.o`` are the gate preactivations, ``c_prev`` the previous cell state,
    and each entry of ``params`` (name -> row names) arrives as an object whose
    attributes are that parameter's rows, e.g. ``params={"p": ("i", "f", "o")}``
    gives ``p.i, p.f, p.o``, a parameter of shape (3, H). Only ``+ - *``,
    unary minus, float constants, ``lstm_multi.sigmoid`` / ``tanh`` / ``rsqrt``
    and the row mean ``lstm_multi.mean`` may be used; anything else is a TypeError
    when the variant is first traced.

    ``halves="split"`` (the module doc): the gate math is ``forward(zx, zr, c_prev,
    b, **params)``, the input half x_t W and the recurrent half r U apart and the
    bias b (rows i, f, g, o) among its parameters. ``param_init`` (name -> number)
    gives parameters a fixed initial value under every initialisation scheme (the
    layer norms' gains 1, shifts 0); the others are drawn as the scheme says.

    ``recurrent_state`` says which state feeds the recurrent product r @ U:
    ``"h"`` (h_{t-1}, the usual LSTM) or ``"c"`` (c_{t-1}).
    ``unused_recurrent_gates`` lists gates whose block of U is masked to zero.
    ``extends_lstm`` declares that with its own parameters at zero the variant
    computes ``torch.nn.LSTM``'s function (so nn.LSTM's weights mean the same
    thing in it; ``lstm_multi.torch.LSTM.from_torch`` relies on it).

    The backward is derived (``lstm_multi.compile.derive``): ``gates_backward``
    runs generated code, and the CuPy backend compiles both into fused kernels.

    A variant is known by what it computes, not by its name: ``fingerprint`` hashes
    the traced gate math, the parameters (names and rows, in order), the recurrence
    and ``extends_lstm``, and every decision that depends on the variant (PyTorch's
    own kernel, state_dict checks, converters) compares fingerprints. So the same
    math written by a user is the built-in, and a Variant may bear a built-in's name
    (or an alias of one, ``ALIASES``) only if it computes exactly that built-in: any
    other ``Variant("lstm", ...)`` is a ValueError at construction.
    """

    def __init__(
        self,
        name,
        forward,
        *,
        params=None,
        recurrent_state="h",
        unused_recurrent_gates=(),
        extends_lstm=False,
        halves="fused",
        param_init=None,
    ):
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"name: expected an identifier-like string, got {name!r}")
        if not callable(forward):
            raise TypeError(f"forward: expected a function, got {type(forward).__name__}")
        params = dict(params or {})
        for key, rows in params.items():
            if not (isinstance(key, str) and key.isidentifier()) or key in ("W", "U", "b"):
                raise ValueError(f"params: expected new identifier names, got {key!r}")
            if (
                isinstance(rows, str)
                or not rows
                or not all(isinstance(r, str) and r.isidentifier() for r in rows)
            ):
                raise ValueError(
                    f"params[{key!r}]: expected a non-empty tuple of row names, got {rows!r}"
                )
            if len(set(rows)) != len(rows):
                raise ValueError(f"params[{key!r}]: row names repeat: {rows!r}")
        if recurrent_state not in STATE_ORDER:
            raise ValueError(f"recurrent_state: expected 'h' or 'c', got {recurrent_state!r}")
        unused = tuple(unused_recurrent_gates)
        if not set(unused) <= set(GATE_ORDER):
            raise ValueError(
                f"unused_recurrent_gates: expected gates among {GATE_ORDER}, got {unused!r}"
            )
        validation.check_bool("extends_lstm", extends_lstm)
        if halves not in derive.HALVES:
            raise ValueError(f"halves: expected one of {derive.HALVES}, got {halves!r}")
        param_init = dict(param_init or {})
        for key, value in param_init.items():
            if key not in params:
                raise ValueError(
                    f"param_init: expected names among the variant's params {sorted(params)}, "
                    f"got {key!r}"
                )
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(
                    f"param_init[{key!r}]: expected a number, got {type(value).__name__}"
                )
        self.name = name
        self.forward = forward
        self.params = {k: tuple(v) for k, v in params.items()}
        self.recurrent_state = recurrent_state
        self.unused_recurrent_gates = unused
        self.extends_lstm = extends_lstm
        self.halves = halves
        self.param_init = {k: float(v) for k, v in param_init.items()}
        builtin = _BUILTINS.get(name)
        if builtin is not None and self.fingerprint != builtin.fingerprint:
            mine, theirs = fingerprint_fields(self), fingerprint_fields(builtin)
            differ = [
                {"h": "gate math (h_t)", "c": "gate math (c_t)"}.get(key, key)
                for key in mine
                if mine[key] != theirs[key]
            ]
            raise ValueError(
                f"name: {name!r} is the name of the built-in variant {builtin.name!r}, and "
                f"this Variant computes something else (it differs in: {', '.join(differ)}); "
                "a variant is known by what it computes, so give it another name, e.g. "
                f"{name + '_custom'!r}"
            )

    @functools.cached_property
    def fingerprint(self) -> str:
        """What the variant computes, as a hex SHA-256 (``variant_fingerprint``): equal for
        the same math however it is written or named, different for any other."""
        return variant_fingerprint(self)

    @functools.cached_property
    def programs(self) -> derive.GatePrograms:
        """The traced forward and the derived backward (``lstm_multi.compile``)."""
        return derive.gate_programs(self.forward, self.params, self.halves)

    @functools.cached_property
    def array_code(self):
        """(forward, backward): the generated array code of the programs
        (``compile.emit_array``), functions of an ``ops`` object:
        ``forward(ops, z_i, z_f, z_g, z_o, c_prev, *param_rows) -> (h, c, saved)`` and
        ``backward(ops, dh, dc, *param_rows, *saved) -> (dz_i, dz_f, dz_g, dz_o, dc_prev,
        *row grads)``; ``param_rows`` gives the rows in their order."""
        return emit_array.compile_programs(self.programs, self.name)

    def extra_param_shapes(self, hidden_size: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the parameters beyond W, U, b: (rows, H) each."""
        return {name: (len(rows), hidden_size) for name, rows in self.params.items()}

    @property
    def split(self) -> bool:
        """Whether the step takes x_t W and r U apart, with the bias among the gate math's
        parameters (``halves="split"``; see the module doc)."""
        return self.halves == "split"

    @property
    def gate_params(self) -> dict[str, tuple[str, ...]]:
        """The per-unit parameters the gate math reads: ``params``, and for split halves
        the bias ``b`` first, rows (i, f, g, o) (its (4H,) in gate order)."""
        return derive.gate_params(self.params, self.halves)

    def param_rows(self, extra):
        """The rows of the gate math's parameters, ``extra[name][r]`` (each (H,)), in the
        order the generated code takes them (``array_code``); for split halves the
        bias's four (H,) blocks ``extra["b"]`` first."""
        rows = []
        if self.split:
            b = extra["b"]
            h = b.shape[-1] // 4
            rows += [b[k * h : (k + 1) * h] for k in range(4)]
        rows += [extra[name][r] for name, names in self.params.items() for r in range(len(names))]
        return rows

    def gates_forward(self, ops, z, c_prev, extra):
        """(B, 4H) preactivations (split halves: (B, 8H), x_t W then r U, without b) and
        c_{t-1} -> (h_t, c_t, cache).

        The cache is the tuple of forward values the derived backward reads.
        """
        forward, _ = self.array_code
        return forward(ops, *split_gates(z, c_prev.shape[-1]), c_prev, *self.param_rows(extra))

    def gates_backward(self, ops, dh, dc, cache, extra):
        """Gradients at (h_t, c_t) -> (dz (B, 4H) or for split halves (B, 8H), dc_{t-1}
        excluding r @ U, extra grads).

        The extra grads are a dict like ``extra`` holding this step's contribution
        (already summed over the batch); for split halves it has the bias's ``b`` (4H,).
        """
        _, backward = self.array_code
        out = backward(ops, dh, dc, *self.param_rows(extra), *cache)
        count = len(self.programs.z_inputs)
        grads, k = {}, count + 1
        for name, rows in self.gate_params.items():  # each row's gradient, summed over B
            join = ops.concat if name == "b" and self.split else ops.stack
            grads[name] = join(list(out[k : k + len(rows)]), 0)
            k += len(rows)
        return ops.concat(list(out[:count]), -1), out[count], grads

    def __getstate__(self):
        # the traced programs and the generated code are rebuilt on first use
        return {k: v for k, v in self.__dict__.items() if k not in ("programs", "array_code")}

    def __repr__(self) -> str:
        return f"Variant({self.name!r})"


def _node_digests(graph, roots) -> dict[int, str]:
    """A digest of each node ``roots`` depend on, from what it computes alone (Merkle):
    an input's name, a constant's exact value (``float.hex``), an operation's name and its
    arguments' digests (sorted for ``+`` and ``*``, which are commutative in IEEE
    arithmetic). Node ids, creation order and Python names play no part."""
    digests: dict[int, str] = {}
    for node_id in trace.live_nodes(graph, roots):  # arguments before their users
        node = graph.nodes[node_id]
        if node.op == "input":
            text = f"input:{node.name}"
        elif node.op == "const":
            text = f"const:{float(node.value).hex()}"
        else:
            args = [digests[a] for a in node.args]
            if node.op in ("add", "mul"):
                args.sort()
            text = f"{node.op}(" + ",".join(args) + ")"
        digests[node_id] = hashlib.sha256(text.encode()).hexdigest()
    return digests


def fingerprint_fields(variant: Variant) -> dict[str, str]:
    """What ``variant`` computes, field by field (``variant_fingerprint`` hashes them):
    ``h`` and ``c``, the digests of its traced forward's outputs (``_node_digests``; the
    backward is derived from them), ``params``, its own parameters with their rows in
    order (the layout), ``recurrent_state``, ``unused_recurrent_gates`` and
    ``extends_lstm``. Not its name, nor how its Python function is written."""
    graph, _, h, c = derive.trace_forward(variant.forward, variant.gate_params, variant.halves)
    digests = _node_digests(graph, [h.id, c.id])
    halves = {"halves": variant.halves} if variant.split else {}  # fused: as before
    return {
        **halves,
        "h": digests[h.id],
        "c": digests[c.id],
        "params": ";".join(f"{name}:{','.join(rows)}" for name, rows in variant.params.items()),
        "recurrent_state": variant.recurrent_state,
        "unused_recurrent_gates": ",".join(sorted(variant.unused_recurrent_gates)),
        "extends_lstm": str(bool(variant.extends_lstm)),
    }


def variant_fingerprint(variant: Variant) -> str:
    """SHA-256 (hex) of ``fingerprint_fields(variant)``."""
    fields = fingerprint_fields(variant)
    text = "lstm_multi.Variant fingerprint 1\n" + "\n".join(f"{k}={v}" for k, v in fields.items())
    return hashlib.sha256(text.encode()).hexdigest()


def same_computation(a: Variant, b: Variant) -> bool:
    """Whether the variants ``a`` and ``b`` compute the same function (same fingerprint)."""
    return a is b or a.fingerprint == b.fingerprint


def computes_lstm(variant: Variant) -> bool:
    """Whether ``variant`` computes the built-in ``"lstm"`` (``torch.nn.LSTM``'s function),
    whatever its name: what decides PyTorch's own kernel and nn.LSTM interchange."""
    return same_computation(variant, _BUILTINS["lstm"])


def builtin_name(variant: Variant) -> str | None:
    """The name of the built-in variant that computes what ``variant`` does, or None."""
    for name, builtin in VARIANTS.items():
        if _BUILTINS.get(name) is builtin and same_computation(variant, builtin):
            return name
    return None


def is_registered(variant: Variant) -> bool:
    """Whether ``get_variant(variant.name)`` gives back what ``variant`` computes (so a
    saved name finds it again)."""
    known = VARIANTS.get(ALIASES.get(variant.name, variant.name))
    return known is not None and same_computation(variant, known)


# ---------------------------------------------------------------------------
# the built-in variants: their gate math, forward only


def _lstm(z, c_prev):
    i, f, g, o = sigmoid(z.i), sigmoid(z.f), tanh(z.g), sigmoid(z.o)
    c = f * c_prev + i * g
    return o * tanh(c), c


def _peephole(z, c_prev, p):
    i = sigmoid(z.i + p.i * c_prev)
    f = sigmoid(z.f + p.f * c_prev)
    g = tanh(z.g)
    c = f * c_prev + i * g
    o = sigmoid(z.o + p.o * c)
    return o * tanh(c), c


def _peephole_full(z, c_prev):
    i, f, g, o = sigmoid(z.i), sigmoid(z.f), sigmoid(z.g), sigmoid(z.o)
    c = f * c_prev + i * g
    return tanh(o * c), c


def _nig(z, c_prev, p):
    f = sigmoid(z.f + p.f * c_prev)
    c = f * c_prev + tanh(z.g)
    o = sigmoid(z.o + p.o * c)
    return o * tanh(c), c


def _nfg(z, c_prev, p):
    i = sigmoid(z.i + p.i * c_prev)
    c = c_prev + i * tanh(z.g)
    o = sigmoid(z.o + p.o * c)
    return o * tanh(c), c


def _nog(z, c_prev, p):
    i = sigmoid(z.i + p.i * c_prev)
    f = sigmoid(z.f + p.f * c_prev)
    c = f * c_prev + i * tanh(z.g)
    return tanh(c), c


def _niaf(z, c_prev, p):
    i = sigmoid(z.i + p.i * c_prev)
    f = sigmoid(z.f + p.f * c_prev)
    c = f * c_prev + i * z.g
    o = sigmoid(z.o + p.o * c)
    return o * tanh(c), c


def _noaf(z, c_prev, p):
    i = sigmoid(z.i + p.i * c_prev)
    f = sigmoid(z.f + p.f * c_prev)
    c = f * c_prev + i * tanh(z.g)
    o = sigmoid(z.o + p.o * c)
    return o * c, c


def _cifg(z, c_prev, p):
    i = sigmoid(z.i + p.i * c_prev)
    c = (1 - i) * c_prev + i * tanh(z.g)
    o = sigmoid(z.o + p.o * c)
    return o * tanh(c), c


#: the layer normalisation's epsilon (Ba, Kiros & Hinton 2016; PyTorch's LayerNorm default)
LN_EPS = 1e-5


def layer_norm(values, gamma, beta, eps=LN_EPS):
    """LN(v; gamma, beta) = gamma (v - mean(v)) / sqrt(var(v) + eps) + beta over a whole row,
    the biased variance; ``values``, ``gamma``, ``beta`` are parallel lists of per-unit
    values, one per block of H units (four blocks: a row of 4H preactivations; one: H
    units). Gate math: the row's mean is the blocks' mean of ``mean``."""
    k = len(values)
    total = values[0]
    for v in values[1:]:
        total = total + v
    mu = (1.0 / k) * mean(total)
    centred = [v - mu for v in values]
    square = centred[0] * centred[0]
    for d in centred[1:]:
        square = square + d * d
    scale = rsqrt((1.0 / k) * mean(square) + eps)
    return [g * (d * scale) + b for d, g, b in zip(centred, gamma, beta, strict=True)]


def _layernorm_z(zx, zr, b, gamma_x, beta_x, gamma_h, beta_h):
    """z = LN(x_t W; gamma_x, beta_x) + LN(r U; gamma_h, beta_h) + b, each LN over the 4H."""
    x = layer_norm(list(zx), list(gamma_x), list(beta_x))
    r = layer_norm(list(zr), list(gamma_h), list(beta_h))
    return [xk + rk + bk for xk, rk, bk in zip(x, r, b, strict=True)]


def _layernorm(zx, zr, c_prev, b, gamma_x, beta_x, gamma_h, beta_h, gamma_c, beta_c):
    zi, zf, zg, zo = _layernorm_z(zx, zr, b, gamma_x, beta_x, gamma_h, beta_h)
    c = sigmoid(zf) * c_prev + sigmoid(zi) * tanh(zg)
    (c_norm,) = layer_norm([c], [gamma_c.c], [beta_c.c])
    return sigmoid(zo) * tanh(c_norm), c


def _layernorm_peephole(zx, zr, c_prev, b, p, gamma_x, beta_x, gamma_h, beta_h, gamma_c, beta_c):
    zi, zf, zg, zo = _layernorm_z(zx, zr, b, gamma_x, beta_x, gamma_h, beta_h)
    i = sigmoid(zi + p.i * c_prev)
    f = sigmoid(zf + p.f * c_prev)
    c = f * c_prev + i * tanh(zg)
    o = sigmoid(zo + p.o * c)
    (c_norm,) = layer_norm([c], [gamma_c.c], [beta_c.c])
    return o * tanh(c_norm), c


_PEEPHOLES = {"p": ("i", "f", "o")}
#: the layer-normalised variants' own parameters: gains and shifts of the three LNs
_LAYER_NORMS = {
    "gamma_x": GATE_ORDER,
    "beta_x": GATE_ORDER,
    "gamma_h": GATE_ORDER,
    "beta_h": GATE_ORDER,
    "gamma_c": ("c",),
    "beta_c": ("c",),
}
#: gains start at 1, shifts at 0, under every initialisation scheme
_LAYER_NORM_INIT = {"gamma_x": 1.0, "beta_x": 0.0, "gamma_h": 1.0, "beta_h": 0.0,
                    "gamma_c": 1.0, "beta_c": 0.0}  # fmt: skip

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("lstm", _lstm, extends_lstm=True),
        Variant("peephole", _peephole, params=_PEEPHOLES, extends_lstm=True),
        Variant(
            "peephole_full", _peephole_full, recurrent_state="c", unused_recurrent_gates=("g",)
        ),
        Variant("nig", _nig, params={"p": ("f", "o")}),
        Variant("nfg", _nfg, params={"p": ("i", "o")}),
        Variant("nog", _nog, params={"p": ("i", "f")}),
        Variant("niaf", _niaf, params=_PEEPHOLES),
        Variant("noaf", _noaf, params=_PEEPHOLES),
        Variant("cifg", _cifg, params={"p": ("i", "o")}),
        Variant(
            "layernorm",
            _layernorm,
            params=_LAYER_NORMS,
            halves="split",
            param_init=_LAYER_NORM_INIT,
        ),
        Variant(
            "layernorm_peephole",
            _layernorm_peephole,
            params={**_PEEPHOLES, **_LAYER_NORMS},
            halves="split",
            param_init=_LAYER_NORM_INIT,
        ),
    )
}
#: other names of built-in variants (Greff et al.'s)
ALIASES = {"vanilla": "peephole", "np": "lstm"}
_BUILTINS.update(VARIANTS)
_BUILTINS.update({alias: VARIANTS[name] for alias, name in ALIASES.items()})


def register_variant(variant: Variant) -> Variant:
    """Make ``variant`` known by its name (to ``get_variant``, the modules' state_dicts
    and everything that takes a variant name). Returns it, so it can decorate."""
    if not isinstance(variant, Variant):
        raise TypeError(f"variant: expected a lstm_multi.Variant, got {type(variant).__name__}")
    known = VARIANTS.get(variant.name)
    if (known is not None and known is not variant) or variant.name in ALIASES:
        raise ValueError(f"variant: the name {variant.name!r} is taken")
    VARIANTS[variant.name] = variant
    return variant


def get_variant(name) -> Variant:
    """The Variant called ``name``; a ValueError listing the known ones otherwise."""
    if isinstance(name, Variant):
        return name
    try:
        return VARIANTS[ALIASES.get(name, name)]
    except (KeyError, TypeError):
        raise ValueError(f"variant: expected one of {sorted(VARIANTS)}, got {name!r}") from None


def param_shapes(
    variant, layer_input_size: int, hidden_size: int, proj_size: int = 0
) -> dict[str, tuple[int, ...]]:
    """Canonical shapes of one layer-direction's parameters, in canonical key order.

    With a projection (``proj_size`` P > 0) the recurrence reads the projected
    h_{t-1} of width P, so U is (P, 4H) (for variants whose recurrence reads h),
    and ``W_hr`` (H, P) comes last.
    """
    variant = get_variant(variant)
    h4 = 4 * hidden_size
    recurrent = proj_size if proj_size and variant.recurrent_state == "h" else hidden_size
    shapes = {"W": (layer_input_size, h4), "U": (recurrent, h4), "b": (h4,)}
    shapes.update(variant.extra_param_shapes(hidden_size))
    if proj_size:
        shapes[PROJECTION] = (hidden_size, proj_size)
    return shapes


def output_size(hidden_size: int, proj_size: int = 0) -> int:
    """Width of h (each direction's output): P with a projection, else H."""
    return proj_size or hidden_size


def layer_input_size(
    layer: int, input_size: int, hidden_size: int, num_directions: int, proj_size: int = 0
) -> int:
    """Feature size a layer reads: input_size for layer 0, (P or H) * num_directions after."""
    return input_size if layer == 0 else output_size(hidden_size, proj_size) * num_directions


def network_param_shapes(variant, input_size, hidden_size, num_layers, num_directions, proj_size=0):
    """Canonical shapes of a whole network: ``shapes[layer][direction] = {"W": ..., ...}``."""
    return [
        [
            param_shapes(
                variant,
                layer_input_size(layer, input_size, hidden_size, num_directions, proj_size),
                hidden_size,
                proj_size,
            )
            for _ in range(num_directions)
        ]
        for layer in range(num_layers)
    ]
