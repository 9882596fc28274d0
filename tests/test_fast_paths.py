"""The optimised paths equal the reference paths they replace.

- NumPy: ``InPlaceOps`` (one contiguous projection GEMM, in-place adds) against
  the plain ``ArrayModuleOps`` on the same loop;
- torch: ``torch_bptt`` (one autograd node per direction, oneDNN GEMMs in
  float32 on the CPU) against autograd over ``network.loop_direction``,
  including double backward;
- JAX: the unrolled scan (projection inside the step) against a plain scan and
  against the NumPy backend.

Property tests in float64 to 100 machine epsilons (the same arithmetic in another order),
float32 and float16 to the usual tolerances.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, scaled, tolerance
from hypothesis import given, settings
from hypothesis import strategies as st

from lstm_multi import network
from lstm_multi.ops import ArrayModuleOps

VARIANTS = ("lstm", "peephole", "peephole_full")


@st.composite
def problems(draw):
    cfg = {
        "variant": draw(st.sampled_from(VARIANTS)),
        "batch": draw(st.integers(1, 4)),
        "steps": draw(st.integers(1, 6)),
        "input_size": draw(st.integers(1, 5)),
        "hidden_size": draw(st.integers(1, 6)),
        "num_layers": draw(st.integers(1, 2)),
        "bidirectional": draw(st.booleans()),
        "with_state": draw(st.booleans()),
        "with_lengths": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }
    return cfg


#: a fixed two-layer, bidirectional problem with states and lengths (add variant and seed)
DEEP = {
    "batch": 3,
    "steps": 7,
    "input_size": 5,
    "hidden_size": 4,
    "num_layers": 2,
    "bidirectional": True,
    "with_state": True,
    "with_lengths": True,
}


def make_inputs(cfg, dtype="float64"):
    rng = np.random.default_rng(cfg["seed"])
    d = 2 if cfg["bidirectional"] else 1
    b, t, h = cfg["batch"], cfg["steps"], cfg["hidden_size"]
    x = rng.standard_normal((b, t, cfg["input_size"])).astype(dtype)
    dy = rng.standard_normal((b, t, d * h)).astype(dtype)
    shape = (cfg["num_layers"] * d, b, h)
    state = None
    if cfg["with_state"]:
        state = tuple(rng.standard_normal(shape).astype(dtype) for _ in range(2))
    final = tuple(rng.standard_normal(shape).astype(dtype) for _ in range(2))
    lengths = rng.integers(1, t + 1, size=b) if cfg["with_lengths"] else None
    return x, dy, state, final, lengths


def run(cell, cfg, dtype="float64", convert=lambda a: a):
    x, dy, state, (dh_n, dc_n), lengths = make_inputs(cfg, dtype)
    params = cell.init(seed=cfg["seed"], dtype=dtype)
    state = None if state is None else tuple(convert(s) for s in state)
    y, (h_n, c_n) = cell(params, convert(x), state=state, lengths=lengths)
    grads, dx, (dh0, dc0) = cell.vjp(
        params,
        convert(x),
        convert(dy),
        state=state,
        lengths=lengths,
        dh_n=convert(dh_n),
        dc_n=convert(dc_n),
    )
    flat = [y, h_n, c_n, dx, dh0, dc0]
    flat += [g[k] for layer in grads for g in layer for k in sorted(g)]
    return [
        np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, dtype=np.float64) for a in flat
    ]


def assert_all_close(got, want, rtol, atol):
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape, k
        scale = max(1.0, float(np.abs(b).max()) if b.size else 1.0)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale, err_msg=f"output {k}")


def cell_kwargs(cfg):
    return dict(
        variant=cfg["variant"], num_layers=cfg["num_layers"], bidirectional=cfg["bidirectional"]
    )


# NumPy -------------------------------------------------------------------------


def numpy_cells():
    from lstm_multi.backends import numpy_backend

    class ReferenceCell(numpy_backend.Cell):
        ops = ArrayModuleOps(np)

    return numpy_backend.Cell, ReferenceCell


@given(cfg=problems())
def test_numpy_in_place_ops_equal_reference_float64(cfg):
    fast, ref = numpy_cells()
    i, h = cfg["input_size"], cfg["hidden_size"]
    got = run(fast(i, h, **cell_kwargs(cfg)), cfg)
    want = run(ref(i, h, **cell_kwargs(cfg)), cfg)
    assert_all_close(got, want, tolerance("float64"), tolerance("float64"))


# float16 (eps 9.8e-4) rounds every stored intermediate: 20 eps, not the derived 100 eps
@pytest.mark.parametrize("dtype,tol", [("float32", tolerance("float32")), ("float16", 2e-2)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_numpy_in_place_ops_equal_reference_low_precision(variant, dtype, tol):
    fast, ref = numpy_cells()
    cfg = {**DEEP, "variant": variant, "seed": 3}
    got = run(fast(5, 4, **cell_kwargs(cfg)), cfg, dtype)
    want = run(ref(5, 4, **cell_kwargs(cfg)), cfg, dtype)
    assert_all_close(got, want, tol, tol)


def test_numpy_cell_uses_the_in_place_ops():
    from lstm_multi.backends import numpy_backend
    from lstm_multi.backends.numpy_fast import InPlaceOps

    assert isinstance(numpy_backend.Cell.ops, InPlaceOps)


# torch -------------------------------------------------------------------------


def torch_cells():
    pytest.importorskip("torch")
    from lstm_multi.backends import torch_backend

    class ReferenceCell(torch_backend.Cell):
        generic_direction = staticmethod(network.loop_direction)

    return torch_backend.Cell, ReferenceCell


@given(cfg=problems())
def test_torch_bptt_equals_autograd_reference_float64(cfg):
    fast, ref = torch_cells()
    import torch

    i, h = cfg["input_size"], cfg["hidden_size"]
    got = run(fast(i, h, native=False, **cell_kwargs(cfg)), cfg, convert=torch.as_tensor)
    want = run(ref(i, h, native=False, **cell_kwargs(cfg)), cfg, convert=torch.as_tensor)
    assert_all_close(got, want, tolerance("float64"), tolerance("float64"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_bptt_onednn_float32_equals_reference(variant, monkeypatch):
    """float32 on the CPU with the oneDNN GEMMs (where this torch has them; by default
    they run only where they beat the BLAS, ``onednn_beats_blas``)."""
    fast, ref = torch_cells()
    import torch

    from lstm_multi.backends import torch_bptt
    from lstm_multi.backends.torch_bptt import OneDnnTorchOps

    monkeypatch.setattr(OneDnnTorchOps, "ONEDNN_MIN_MACS", 0)  # oneDNN even for these sizes
    monkeypatch.setattr(torch_bptt.FAST_OPS, "linear", torch_bptt._mkldnn_linear())

    cfg = {
        "variant": variant,
        "batch": 5,
        "steps": 9,
        "input_size": 7,
        "hidden_size": 16,
        "num_layers": 2,
        "bidirectional": True,
        "with_state": True,
        "with_lengths": False,
        "seed": 1,
    }
    got = run(fast(7, 16, native=False, **cell_kwargs(cfg)), cfg, "float32", torch.as_tensor)
    want = run(ref(7, 16, native=False, **cell_kwargs(cfg)), cfg, "float32", torch.as_tensor)
    assert_all_close(got, want, 2e-5, 2e-5)


@pytest.mark.parametrize("min_macs", [0, 1 << 40], ids=["onednn", "addmm"])
def test_torch_bptt_ops_gemms_match_torch_mm(min_macs, monkeypatch):
    pytest.importorskip("torch")
    import torch

    from lstm_multi.backends.torch_bptt import OneDnnTorchOps

    monkeypatch.setattr(OneDnnTorchOps, "ONEDNN_MIN_MACS", min_macs)

    fused, plain = OneDnnTorchOps(use_mkldnn=True), OneDnnTorchOps(use_mkldnn=False)
    g = torch.Generator().manual_seed(0)
    r, U = torch.randn(6, 8, generator=g), torch.randn(8, 32, generator=g)
    zx, dz = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g)
    xs, W, b = torch.randn(4, 6, 5, generator=g), torch.randn(5, 32, generator=g), torch.randn(32)
    for ops in (fused, plain):
        torch.testing.assert_close(
            ops.step_gemm(r, ops.prepare_step_weight(U), zx.clone()), zx + r @ U
        )
        torch.testing.assert_close(ops.step_gemm_t(dz, ops.prepare_step_weight_t(U)), dz @ U.T)
        torch.testing.assert_close(ops.project(xs, W, b), xs @ W + b)
        x2, r2 = xs.reshape(24, 5), torch.randn(24, 8, generator=g)
        dz2 = torch.randn(24, 32, generator=g)
        for a, e in zip(
            ops.sequence_grads(x2, r2, dz2, W), (x2.T @ dz2, r2.T @ dz2, dz2 @ W.T), strict=True
        ):
            torch.testing.assert_close(a, e)


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_bptt_double_backward_equals_reference(variant):
    """create_graph=True through the fused node gives the reference's second derivatives."""
    pytest.importorskip("torch")
    import torch

    from lstm_multi import init, spec
    from lstm_multi.backends import torch_bptt
    from lstm_multi.backends.torch_backend import OPS

    var = spec.get_variant(variant)
    raw = init.init_params(variant, 3, 4, 1, 1, 0, "float64")[0][0]
    g = torch.Generator().manual_seed(2)
    xs, h0, c0 = (
        torch.randn(s, generator=g, dtype=torch.float64) for s in ((5, 2, 3), (2, 4), (2, 4))
    )
    w = torch.randn(5, 2, 4, generator=g, dtype=torch.float64)

    def second(run):
        p = {k: torch.tensor(v, requires_grad=True) for k, v in raw.items()}
        x = xs.clone().requires_grad_(True)
        ys, h, c, _ = run(OPS, var, p, x, h0, c0, None)
        loss = (ys * w).sum() + (h * c).sum()
        first = torch.autograd.grad(loss, [p["U"], x], create_graph=True)
        total = sum((f * f).sum() for f in first)
        return [
            t.detach() for t in (*first, *torch.autograd.grad(total, [p["W"], p["U"], p["b"], x]))
        ]

    for a, b in zip(second(torch_bptt.run_direction), second(network.loop_direction), strict=True):
        # the fused node's backward against the loop's autograd: rounding only (6.7e-16 seen)
        assert_close(a, b, "float64", "second-order gradient")


def test_torch_module_generic_path_uses_fused_node():
    pytest.importorskip("torch")
    import torch

    from lstm_multi.torch import LSTM

    module = LSTM(3, 4, variant="peephole", batch_first=True)
    y, _ = module(torch.randn(2, 5, 3))
    assert _has_node(y.grad_fn, "BpttDirection")


def _has_node(fn, name, depth=6):
    if fn is None or depth == 0:
        return False
    if name in type(fn).__name__:
        return True
    return any(_has_node(f[0], name, depth - 1) for f in fn.next_functions)


# JAX ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_jax_unrolled_scan_equals_plain_scan_and_numpy(variant):
    """Unrolled 1, 2 and 3 steps an iteration over 7 steps (a remainder for 2 and 3), both
    directions, one layer: the unrolled scan is a direction's (a layer above runs it again
    on the layer below's output), and each compiled scan is the test's time."""
    pytest.importorskip("jax")
    from lstm_multi.backends import jax_backend, numpy_backend

    cfg = {**DEEP, "num_layers": 1, "variant": variant, "seed": 5}
    reference = run(numpy_backend.Cell(5, 4, **cell_kwargs(cfg)), cfg)
    for unroll in (1, 2, 3):
        cell = jax_backend.Cell(5, 4, **cell_kwargs(cfg), scan_unroll=unroll)
        assert_all_close(run(cell, cfg), reference, tolerance("float64"), tolerance("float64"))


@pytest.mark.parametrize("dtype,tol", [(d, tolerance(d)) for d in ("float64", "float32")])
@settings(max_examples=scaled(10))  # each example compiles two cells anew
@given(cfg=problems())
def test_jax_custom_vjp_equals_autodiff(dtype, tol, cfg):
    """The hand-written backward in a reverse scan equals JAX's own derivative."""
    pytest.importorskip("jax")
    from lstm_multi.backends import jax_backend

    i, h = cfg["input_size"], cfg["hidden_size"]
    got = run(jax_backend.Cell(i, h, **cell_kwargs(cfg)), cfg, dtype)
    want = run(jax_backend.Cell(i, h, **cell_kwargs(cfg), autodiff=True), cfg, dtype)
    assert_all_close(got, want, tol, tol)
