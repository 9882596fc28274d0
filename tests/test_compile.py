"""The gate-math compiler (trace, derive, emit), the Greff et al. family and user variants.

* the tracer shares subexpressions and refuses what no kernel could express;
* the derived backward equals the old hand-written one (``handwritten.py``) in
  value and needs no more operations;
* the generated array code's step equals the oracle's gate math (``oracle.step``; the
  CUDA C is checked the same way in test_gpu.py, compiled by the host compiler);
* every variant of the family against the independent oracle on every CPU
  backend, and by finite differences (``check_variant``);
* a user-defined variant through the public API, on every backend, and
  ``check_variant``'s own power: a wrong derivation rule fails it.
"""

from __future__ import annotations

import copy

import handwritten
import numpy as np
import oracle
import pytest
from conftest import assert_close
from reference import Config, make_problem, reference
from test_agreement import assert_matches_reference, run_backend

import lstm_multi
from lstm_multi import Variant, sigmoid, spec, tanh
from lstm_multi.compile import derive, emit_array, evaluate, trace
from lstm_multi.ops import ArrayModuleOps

NP_OPS = ArrayModuleOps(np)
GREFF = ("nig", "nfg", "nog", "niaf", "noaf", "cifg")


# the tracer ---------------------------------------------------------------------------


def test_trace_shares_subexpressions_and_applies_identities():
    graph = trace.Graph()
    a, b = graph.input("a"), graph.input("b")
    assert (a * b).id == (b * a).id
    assert (sigmoid(a) + 1).id == (1 + sigmoid(a)).id
    negated = -a
    assert (a * 1).id == (a + 0).id == (a - 0).id == (-negated).id == a.id
    assert graph.value_of((a * 0).id) == 0 and graph.value_of((a - a).id) == 0
    assert (0 - a).id == (-a).id
    assert graph.value_of((graph.const(2) * 3 + 1).id) == 7
    assert sigmoid(0.0) == 0.5 and tanh(0.0) == 0.0


@pytest.mark.parametrize(
    ("gate_math", "match"),
    [
        (lambda x: x / 2, "division"),
        (lambda x: x**2, r"\*\*"),
        (lambda x: x if x else -x, "branching"),
        (lambda x: x if x < 1 else -x, "comparison"),
        (lambda x: np.exp(x), "NumPy function"),
        (lambda x: sigmoid("x"), "expected a traced gate-math value"),
    ],
)
def test_trace_refuses_what_a_kernel_cannot_express(gate_math, match):
    variant = Variant("bad", lambda z, c_prev: (gate_math(z.i), c_prev))
    with pytest.raises(TypeError, match=match):
        variant.programs  # noqa: B018


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "two words"}, ValueError, "name: expected an identifier"),
        ({"forward": 3}, TypeError, "forward: expected a function"),
        ({"params": {"p": "io"}}, ValueError, r"params\['p'\]: expected a non-empty tuple"),
        ({"params": {"W": ("i",)}}, ValueError, "params: expected new identifier names"),
        ({"params": {"p": ("i", "i")}}, ValueError, "row names repeat"),
        ({"recurrent_state": "x"}, ValueError, "recurrent_state: expected 'h' or 'c'"),
        ({"unused_recurrent_gates": ("q",)}, ValueError, "unused_recurrent_gates"),
        ({"extends_lstm": 1}, (TypeError, ValueError), "extends_lstm"),
    ],
)
def test_variant_arguments_are_checked(kwargs, error, match):
    arguments = {"name": "mine", "forward": lambda z, c_prev: (z.o, c_prev), **kwargs}
    with pytest.raises(error, match=match):
        Variant(**arguments)


def test_forward_must_return_h_and_c_and_rows_are_named():
    with pytest.raises(TypeError, match=r"forward must return \(h, c\)"):
        Variant("one", lambda z, c_prev: z.i).programs  # noqa: B018
    with pytest.raises(AttributeError, match=r"no row 'x' here; the rows are \('i', 'o'\)"):
        Variant("row", lambda z, c_prev, p: (p.x, c_prev), params={"p": ("i", "o")}).programs  # noqa: B018


# the derived backward against the hand-written one --------------------------------------


def _np_sigmoid(x):
    return NP_OPS.sigmoid(np.array(x, dtype=np.float64))


@pytest.mark.parametrize("name", sorted(handwritten.BACKWARDS))
def test_derived_backward_equals_handwritten_and_costs_no_more(name):
    variant = spec.VARIANTS[name]
    programs = variant.programs
    rng = np.random.default_rng(3)
    shape = (4, 6)
    z = [rng.normal(size=shape) * 2 for _ in range(4)]
    c_prev, dh, dc = (rng.normal(size=shape) for _ in range(3))
    rows = [rng.normal(size=shape[1]) for _ in programs.param_rows]
    inputs = dict(zip(("z_i", "z_f", "z_g", "z_o"), z, strict=True))
    inputs.update(c_prev=c_prev, **dict(zip(programs.param_rows, rows, strict=True)))
    _, _, saved = evaluate.evaluate_forward(programs, inputs)
    derived = evaluate.evaluate_backward(
        programs, {"dh": dh, "dc": dc, **dict(zip(programs.param_rows, rows, strict=True))}, saved
    )
    cache = handwritten.cache_of(name, z, c_prev, rows, _np_sigmoid, np.tanh)
    hand = handwritten.BACKWARDS[name](dh, dc, cache, rows)
    for key, want in zip(programs.backward_outputs, hand, strict=True):
        # the same math in another order of operations (worst seen 1 eps): rounding only
        assert_close(derived[key], want, "float64", key)
    # the work: the hand-written backward traced over the same inputs (its cache given)
    graph = trace.Graph()
    traced_cache = [graph.input(f"cache{k}") for k in range(7)]
    traced_rows = [graph.input(r) for r in programs.param_rows]
    traced = handwritten.BACKWARDS[name](
        graph.input("dh"), graph.input("dc"), traced_cache, traced_rows
    )
    hand_ops = trace.operation_count(graph, [t.id for t in traced])
    assert programs.backward_operations() <= hand_ops, (programs.backward_operations(), hand_ops)
    assert len(programs.saved) <= 7  # the old cache kept (i, f, g, o, c_prev, c, act)


# the emitted array code ----------------------------------------------------------------


def oracle_gates(name, z, c_prev, extra, dh, dc):
    """One step's gate math from the independent oracle (``oracle.step``, the README's
    table), on gate pre-activations: x_t = z with W = I (4H, 4H), U = 0, b = 0, so each
    gate's z is its block of z. Backward by autograd of sum(h dh) + sum(c dc).

    z (B, 4H), c_prev, dh, dc (B, H), extra {"p": (rows, H)} -> (h, c, dz, dc_prev,
    {"p": dp summed over the batch}), float64 NumPy.
    """
    import torch

    width = z.shape[-1]
    zt, ct = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (z, c_prev))
    pt = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in extra.items()}
    W = torch.eye(width, dtype=torch.float64)
    U = torch.zeros(c_prev.shape[-1], width, dtype=torch.float64)
    b = torch.zeros(width, dtype=torch.float64)
    if name in oracle.LAYER_NORMS:  # split halves: z = [x_t W, h_{t-1} U], W = U = I (4H)
        half = width // 2
        eye = torch.eye(half, dtype=torch.float64)
        h, c = oracle.layer_norm_step(
            name, zt[..., :half], zt[..., half:], ct, {"W": eye, "U": eye, **pt}
        )
    else:
        h, c = oracle.step(name, zt, torch.zeros_like(ct), ct, W, U, b, pt.get("p"))
    ((h * torch.tensor(dh)).sum() + (c * torch.tensor(dc)).sum()).backward()
    grads = {k: v.grad.numpy() for k, v in pt.items()}
    return h.detach().numpy(), c.detach().numpy(), zt.grad.numpy(), ct.grad.numpy(), grads


@pytest.mark.parametrize("name", sorted(spec.VARIANTS))
def test_array_code_equals_oracle_gates(name):
    """The generated array code's forward and backward of one step against the oracle's
    gate math (not against the program it was generated from)."""
    variant = spec.VARIANTS[name]
    rng = np.random.default_rng(5)
    z = rng.normal(size=(3, (8 if variant.split else 4) * 5)) * 2  # split: [x_t W, r U]
    c_prev, dh, dc = (rng.normal(size=(3, 5)) for _ in range(3))
    extra = {k: rng.normal(size=s) for k, s in variant.extra_param_shapes(5).items()}
    if variant.split:  # the bias is the gate math's
        extra["b"] = rng.normal(size=4 * 5)
    h, c, cache = variant.gates_forward(NP_OPS, z, c_prev, extra)
    dz, dc_prev, dextra = variant.gates_backward(NP_OPS, dh, dc, cache, extra)
    want = oracle_gates(name, z, c_prev, extra, dh, dc)
    names = ("h", "c", "dz", "dc_prev")
    for what, got, expected in zip(names, (h, c, dz, dc_prev), want[:4], strict=True):
        assert_close(got, expected, "float64", f"{name} {what}")
    assert set(dextra) == set(want[4])
    for k in dextra:
        assert_close(dextra[k], want[4][k], "float64", f"{name} d{k}")


def test_generated_source_reads_like_the_math():
    source = emit_array.source_forward(spec.VARIANTS["lstm"].programs)
    assert source.startswith("def forward(ops, z_i, z_f, z_g, z_o, c_prev):")
    assert source.count("ops.sigmoid(") == 3 and source.count("ops.tanh(") == 2


# the variant family -------------------------------------------------------------------


def test_greff_family_and_aliases():
    assert set(GREFF) < set(spec.VARIANTS)
    assert spec.get_variant("vanilla") is spec.VARIANTS["peephole"]
    assert spec.get_variant("np") is spec.VARIANTS["lstm"]
    assert spec.VARIANTS["nig"].extra_param_shapes(4) == {"p": (2, 4)}
    assert spec.VARIANTS["niaf"].extra_param_shapes(4) == {"p": (3, 4)}


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("name", GREFF)
def test_greff_variant_matches_oracle(backend, name):
    """Each of Greff et al.'s variants against the oracle (written from their equations)."""
    pytest.importorskip({"numpy": "numpy", "torch": "torch", "jax": "jax"}[backend])
    config = Config(name, 3, 5, 2, 3, 2, True, True, True, backend == "torch", 17)
    problem = make_problem(config)
    result = run_backend(backend, config, problem, "float64")
    assert_matches_reference(
        result, reference(config, problem), "float64", f"oracle vs {backend}/{name}"
    )


@pytest.mark.parametrize(
    ("name", "lacking"), [("nig", "i"), ("nfg", "f"), ("nog", "o"), ("cifg", "f")]
)
def test_unused_gate_weights_get_zero_gradient(name, lacking):
    """A variant without a gate keeps the gate's weights (same layout) with zero gradient."""
    cell = lstm_multi.get_cell("numpy")(2, 3, variant=name)
    params = cell.init(seed=0, dtype="float64")
    x = np.random.default_rng(0).normal(size=(2, 4, 2))
    grads, _, _ = cell.vjp(params, x, np.ones((2, 4, 3)))
    k = "ifgo".index(lacking)
    for key in ("W", "U", "b"):
        block = grads[0][0][key][..., k * 3 : (k + 1) * 3]
        assert not block.any(), key
        assert grads[0][0][key].any()


# user-defined variants -----------------------------------------------------------------


def _coupled(z, c_prev, p):
    i = sigmoid(z.i + p.i * c_prev)
    c = (1 - i) * c_prev + i * tanh(z.g)
    return sigmoid(z.o + p.o * c) * tanh(c), c


def test_user_variant_on_every_backend_and_check_variant():
    """The worked example of docs/variants.md: a user's variant, unregistered, on every backend."""
    variant = Variant("coupled", _coupled, params={"p": ("i", "o")})
    report = lstm_multi.testing.check_variant(variant)
    statuses = {r.name: r.status for r in report.results}
    assert statuses["gates"] == statuses["network"] == "passed"
    for name in ("torch", "jax"):
        assert statuses[name] == "passed", report
    assert statuses["kernels"] in ("passed", "skipped")
    # and the torch module takes it too, with its own parameter
    torch = pytest.importorskip("torch")
    from lstm_multi.torch import LSTM

    module = LSTM(2, 3, variant=variant, batch_first=True)
    assert tuple(module.weight_peephole_l0.shape) == (2, 3)
    x = torch.randn(4, 5, 2)
    y, _ = module(x)
    y.sum().backward()
    assert module.weight_peephole_l0.grad is not None
    copied = copy.deepcopy(module)  # the generated code is rebuilt, not copied
    torch.testing.assert_close(copied(x)[0], module(x)[0])


def test_register_variant_makes_the_name_known(monkeypatch):
    monkeypatch.setattr(spec, "VARIANTS", dict(spec.VARIANTS))
    variant = lstm_multi.register_variant(Variant("coupled", _coupled, params={"p": ("i", "o")}))
    assert lstm_multi.get_variant("coupled") is variant
    assert lstm_multi.get_cell("numpy")(2, 3, variant="coupled").variant is variant
    with pytest.raises(ValueError, match="the name 'coupled' is taken"):
        lstm_multi.register_variant(Variant("coupled", _coupled, params={"p": ("i", "o")}))
    with pytest.raises(
        ValueError, match="'vanilla' is the name of the built-in variant 'peephole'"
    ):
        Variant("vanilla", _coupled, params={"p": ("i", "o")})  # an alias: refused when made


def test_check_variant_fails_on_a_wrong_derivation_rule(monkeypatch):
    """The power of check_variant: tanh' = 1 + t^2 instead of 1 - t^2 must fail it."""
    rule = derive._backward_rule

    def wrong(graph, node, node_id, g):
        if node.op == "tanh":
            t = trace.Expr(graph, node_id)
            return [(node.args[0], g * (1 + t * t))]
        return rule(graph, node, node_id, g)

    monkeypatch.setattr(derive, "_backward_rule", wrong)
    variant = Variant("coupled", _coupled, params={"p": ("i", "o")})
    with pytest.raises(AssertionError, match=r"gates +FAILED"):
        lstm_multi.testing.check_variant(variant, backends=["numpy"])
    report = lstm_multi.testing.check_variant(variant, backends=["numpy"], raise_on_failure=False)
    assert {r.name for r in report.failed} == {"gates", "network"}


def test_host_kernels_say_what_is_missing(monkeypatch, request):
    from lstm_multi.kernels import build, host_kernels

    # the kernels looked for without a compiler are forgotten afterwards (later tests build)
    request.addfinalizer(build.forget_loaded)
    with pytest.raises(ValueError, match="types: expected 'double' or 'float'"):
        host_kernels.HostKernels(spec.VARIANTS["lstm"], "half", "float")
    monkeypatch.setattr(build, "host_compiler", lambda: None)
    with pytest.raises(RuntimeError, match="no host C\\+\\+ compiler found"):
        host_kernels.HostKernels(spec.VARIANTS["lstm"])
    report = lstm_multi.testing.check_variant("lstm", backends=["numpy"])
    kernels = {r.name: r for r in report.results}["kernels"]
    assert kernels.status == "skipped" and "no host C++ compiler" in kernels.note
