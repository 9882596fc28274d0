"""The generated CPU kernels (``compile/emit_cpu``, ``kernel_direction``).

* every variant, both loops (the whole time loop in C, and one framework GEMM
  plus one fused gate call per step), NumPy and torch, lengths, two layers,
  both directions: against the independent oracle; with a projection too;
* the kernels' own derivatives by central differences in float64;
* the float32 nonlinearities to a few ulp over the whole range, and inf/NaN;
* the backends use the kernels by default, ``gate_kernel="array"`` does not;
* without a compiler, or with ``LSTM_MULTI_CPU_KERNELS=0``, the array code runs
  (one warning in the first case), with the same results.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import assert_close
from reference import Config, make_problem, reference
from test_agreement import assert_matches_reference, run_backend

import lstm_multi
from lstm_multi import spec
from lstm_multi.backends import kernel_direction
from lstm_multi.backends.numpy_fast import InPlaceOps
from lstm_multi.kernels import build, cpu_kernels

NP_OPS = InPlaceOps(np)

needs_compiler = pytest.mark.skipif(
    build.host_compiler() is None, reason="no host C++ compiler (g++, clang++ or $CXX)"
)

#: forces one loop or the other whatever the size
LOOPS = {"sequence in C": 1 << 62, "per step": 0}


def _config(variant, **overrides):
    values = dict(
        variant=variant, batch=3, steps=5, input_size=4, hidden_size=5, num_layers=2,
        bidirectional=True, with_state=True, with_lengths=True, batch_first=False, seed=7,
    )  # fmt: skip
    values.update(overrides)
    return Config(**values)


@needs_compiler
@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("variant", sorted(spec.VARIANTS))
def test_kernels_match_the_oracle(backend, variant, loop, monkeypatch):
    if backend == "torch":
        pytest.importorskip("torch")
    monkeypatch.setattr(kernel_direction, "SEQUENCE_LOOP_MAX_MACS", LOOPS[loop])
    used = _count_calls(monkeypatch)
    config = _config(variant)
    problem = make_problem(config)
    expected = reference(config, problem)
    for dtype in ("float64", "float32"):
        result = run_backend(backend, config, problem, dtype, **_generic(backend))
        assert_matches_reference(result, expected, dtype, f"oracle vs {backend} kernels/{variant}")
    assert used["forward"] > 0 and used["backward"] > 0


@needs_compiler
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("variant", sorted(spec.VARIANTS))
def test_projected_kernels_match_the_oracle(backend, variant, monkeypatch):
    """With a projection (always the per-step loop: the framework's products for r U and
    m W_hr around the fused gate kernel), against the oracle, float64 and float32."""
    if backend == "torch":
        pytest.importorskip("torch")
    used = {"forward": 0, "backward": 0}
    for name in used:
        original = getattr(kernel_direction, f"_{name}_projected")

        def counted(*args, _original=original, _name=name, **kwargs):
            used[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel_direction, f"_{name}_projected", counted)
    config = _config(variant, proj_size=3)
    problem = make_problem(config)
    expected = reference(config, problem)
    for dtype in ("float64", "float32"):
        result = run_backend(backend, config, problem, dtype, **_generic(backend))
        assert_matches_reference(
            result, expected, dtype, f"oracle vs {backend} projected/{variant}"
        )
    assert used["forward"] > 0 and used["backward"] > 0


def _generic(backend):
    return {"native": False} if backend == "torch" else {}


def _count_calls(monkeypatch):
    used = {"forward": 0, "backward": 0}
    for name in used:
        original = getattr(kernel_direction, f"{name}_direction")

        def counted(*args, _original=original, _name=name, **kwargs):
            used[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel_direction, f"{name}_direction", counted)
    return used


@needs_compiler
@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize("variant", sorted(spec.VARIANTS))
def test_kernel_gradients_by_finite_differences(variant, loop, monkeypatch):
    """d(loss)/d(every input) from the kernels' backward against central differences,
    float64, one direction with lengths; loss = <ys, wy> + <h_T, wh> + <c_T, wc>."""
    monkeypatch.setattr(kernel_direction, "SEQUENCE_LOOP_MAX_MACS", LOOPS[loop])
    monkeypatch.setenv("LSTM_MULTI_CPU_THREADS", "0")
    check_direction_by_finite_differences(NP_OPS, lambda a: a, variant)


def check_direction_by_finite_differences(ops, as_array, variant):
    """One direction with lengths on ``ops`` (``as_array`` views a float64 NumPy array
    as the framework's array, sharing its memory) against central differences."""
    v = spec.get_variant(variant)
    rng = np.random.default_rng(3)
    steps, batch, inputs, hidden = 4, 3, 2, 3
    p = {
        "W": 0.5 * rng.standard_normal((inputs, 4 * hidden)),
        "U": 0.5 * rng.standard_normal((hidden, 4 * hidden)),
        "b": 0.1 * rng.standard_normal(4 * hidden),
        **{k: 0.5 * rng.standard_normal(s) for k, s in v.extra_param_shapes(hidden).items()},
    }
    xs = rng.standard_normal((steps, batch, inputs))
    h0, c0 = 0.5 * rng.standard_normal((2, batch, hidden))
    valid = (np.arange(steps)[:, None] < np.array([4, 2, 3])[None, :])[:, :, None]
    wy = rng.standard_normal((steps, batch, hidden))
    wh, wc = rng.standard_normal((2, batch, hidden))
    views = {k: as_array(a) for k, a in p.items()}
    xs_, h0_, c0_, valid_ = (as_array(a) for a in (xs, h0, c0, valid))
    kernels = kernel_direction.kernels_for(ops, v, xs_)

    def loss():
        ys, h, c, _ = kernel_direction.forward_direction(
            ops, kernels, v, views, xs_, h0_, c0_, valid_
        )
        return float(sum(np.sum(np.asarray(a) * w) for a, w in ((ys, wy), (h, wh), (c, wc))))

    _, _, _, tape = kernel_direction.forward_direction(
        ops, kernels, v, views, xs_, h0_, c0_, valid_, record=True
    )
    grads, dxs, dh0, dc0 = kernel_direction.backward_direction(
        ops, kernels, v, views, tape, *map(as_array, (wy, wh, wc)), valid_
    )
    inputs_and_grads = {**{k: (p[k], np.asarray(grads[k])) for k in p}, "xs": (xs, np.asarray(dxs))}
    inputs_and_grads.update(h0=(h0, np.asarray(dh0)), c0=(c0, np.asarray(dc0)))
    eps = 1e-6  # central differences: truncation ~eps**2, cancellation ~1e-16 / eps
    for name, (array, grad) in inputs_and_grads.items():
        numeric = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            saved = array[index]
            array[index] = saved + eps
            up = loss()
            array[index] = saved - eps
            down = loss()
            array[index] = saved
            numeric[index] = (up - down) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8, err_msg=name)


@needs_compiler
def test_float32_nonlinearities_to_a_few_ulp():
    kernels = cpu_kernels.cpu_kernels(spec.get_variant("lstm"), "float")
    x = np.concatenate(
        [
            np.linspace(-120, 120, 200_001),
            np.geomspace(1e-30, 10, 10_001),
            -np.geomspace(1e-30, 10, 10_001),
            [0.0, -0.0, 0.625, -0.625, 87.0, -87.0, 88.0, -88.0],
        ]
    ).astype(np.float32)
    sig, th = np.empty_like(x), np.empty_like(x)
    kernels.nonlinearities(x.size, x.ctypes.data, sig.ctypes.data, th.ctypes.data)
    exact = x.astype(np.float64)
    with np.errstate(over="ignore"):
        want_sig = 1 / (1 + np.exp(-exact))
    want_th = np.tanh(exact)
    tiny = np.finfo(np.float32).tiny
    # relative error in units of float32's epsilon, where the exact value is a normal float32
    for got, want in ((sig, want_sig), (th, want_th)):
        normal = np.abs(want) > tiny
        ulps = np.abs(got[normal] - want[normal]) / (np.abs(want[normal]) * 2.0**-23)
        assert ulps.max() <= 4, ulps.max()
        assert np.all(np.abs(got[~normal] - want[~normal]) <= 2 * tiny)
    special = np.array([np.inf, -np.inf, np.nan], np.float32)
    sig, th = np.empty_like(special), np.empty_like(special)
    kernels.nonlinearities(3, special.ctypes.data, sig.ctypes.data, th.ctypes.data)
    np.testing.assert_array_equal(sig, [1, 0, np.nan])
    np.testing.assert_array_equal(th, [1, -1, np.nan])


@needs_compiler
def test_torch_cell_uses_the_kernels_unless_asked_for_the_array_code(monkeypatch):
    torch = pytest.importorskip("torch")
    used = _count_calls(monkeypatch)
    Cell = lstm_multi.get_cell("torch")
    cell = Cell(3, 4, variant="peephole", native=False)
    array = Cell(3, 4, variant="peephole", native=False, gate_kernel="array")
    params = cell.init(seed=0, dtype="float64")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    y, _ = cell(params, x)
    assert used["forward"] == 1
    y_array, _ = array(params, x)
    assert used["forward"] == 1
    # the C++ kernels' exp/tanh are libm's, the array code's torch's: not bit-equal (1.1e-16 seen)
    assert_close(y, y_array, "float64", "C++ kernels against the array code")
    # bfloat16 (no kernel for it) runs the array code
    cell(cell.init(seed=0, dtype="bfloat16"), x.to(torch.bfloat16))
    assert used["forward"] == 1


def _fresh_variant():
    """A variant the kernel cache has not seen (variants are remembered per object)."""
    base = spec.get_variant("peephole")
    return lstm_multi.Variant("fresh", base.forward, params=base.params)


def test_without_a_compiler_the_array_code_runs_after_one_warning(monkeypatch):
    monkeypatch.setattr(build, "host_compiler", lambda: None)
    monkeypatch.setattr(cpu_kernels, "_warned", [])
    build.forget_loaded()  # loaded kernels are shared by variants of equal source: none now
    variant = _fresh_variant()
    config = _config("peephole", num_layers=1)
    problem = make_problem(config)
    with pytest.warns(RuntimeWarning, match="fused CPU kernels could not be built") as caught:
        kernels = kernel_direction.kernels_for(NP_OPS, variant, problem.x)
        assert kernels is None
        assert kernel_direction.kernels_for(NP_OPS, _fresh_variant(), problem.x) is None
    assert len([w for w in caught if "could not be built" in str(w.message)]) == 1
    cell = lstm_multi.get_cell("numpy")(
        4, 5, variant=variant, bidirectional=True, batch_first=False
    )
    params = cell.from_numpy(problem.params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        y, (h_n, c_n) = cell(params, problem.x, state=(problem.h0, problem.c0))
    want = lstm_multi.get_cell("numpy")(
        4, 5, variant="peephole", bidirectional=True, batch_first=False
    )
    with monkeypatch.context() as m:
        m.setenv("LSTM_MULTI_CPU_KERNELS", "0")
        y_want, _ = want(params, problem.x, state=(problem.h0, problem.c0))
    np.testing.assert_allclose(y, y_want, rtol=0, atol=0)


def test_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("LSTM_MULTI_CPU_KERNELS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel_direction.kernels_for(NP_OPS, "peephole", np.zeros(3)) is None


def test_kernels_only_take_host_float32_and_float64():
    for dtype in ("float16", "int64"):
        assert kernel_direction.kernels_for(NP_OPS, "lstm", np.zeros(3, dtype)) is None
    mixed = (np.zeros(3, np.float32), np.zeros(3, np.float64))
    assert kernel_direction.kernels_for(NP_OPS, "lstm", *mixed) is None
