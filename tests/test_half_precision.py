"""The half-precision policy on every CPU backend, against derived bounds (``half_precision.py``).

float16 and bfloat16 inputs give outputs and gradients in that dtype; errors
against a float32 run of the same numbers stay within 2 unit roundoffs on the
two problems built to expose a wrong policy; and the wrong policies (a
half-precision cell state, half-precision running sums of the parameter
gradients) are shown to fail the same check.
"""

from __future__ import annotations

import numpy as np
import pytest
from half_precision import FORGETFUL, INTEGRATOR, assert_within_bound, errors_in_u
from reference import CORE_VARIANTS

import lstm_multi
from lstm_multi import bptt
from lstm_multi.ops import ArrayModuleOps

VARIANTS = CORE_VARIANTS  # the policy is the ops', not the gate math's
CASES = [
    pytest.param("numpy", "float16", id="numpy-float16"),
    pytest.param("torch", "float16", id="torch-float16"),
    pytest.param("torch", "bfloat16", id="torch-bfloat16"),
    pytest.param("jax", "float16", id="jax-float16"),
    pytest.param("jax", "bfloat16", id="jax-bfloat16"),
]


def converters(backend):
    """(to(array, dtype), back(array)) between float64 NumPy and the backend."""
    if backend == "numpy":
        return (lambda a, dtype: np.asarray(a).astype(dtype)), (lambda a: np.asarray(a, np.float64))
    if backend == "torch":
        torch = pytest.importorskip("torch")
        return (
            lambda a, dtype: torch.as_tensor(np.asarray(a)).to(getattr(torch, dtype)),
            lambda a: a.detach().double().numpy(),
        )
    pytest.importorskip("jax")
    import jax.numpy as jnp

    return (
        lambda a, dtype: jnp.asarray(np.asarray(a), dtype=dtype),
        lambda a: np.asarray(a.astype("float32"), np.float64),
    )


def cell_factory(backend):
    Cell = lstm_multi.get_cell(backend)
    # torch: the spec's path (the native path is nn.LSTM's kernel, with PyTorch's own policy)
    kwargs = {"native": False} if backend == "torch" else {}
    return lambda variant: Cell(8, 16, variant=variant, **kwargs)


def errors(problem, backend, dtype, variant):
    to, back = converters(backend)
    return errors_in_u(problem, cell_factory(backend), variant, dtype, to, back)


@pytest.mark.parametrize("problem", [INTEGRATOR, FORGETFUL], ids=lambda p: p.name)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("backend", "dtype"), CASES)
def test_half_precision_within_derived_bound(backend, dtype, variant, problem):
    found, dtypes = errors(problem, backend, dtype, variant)
    assert set(dtypes.values()) == {dtype}, f"results must come back in {dtype}: {dtypes}"
    assert_within_bound(found, f"{backend} {dtype} {variant} {problem.name}")


@pytest.mark.parametrize(("backend", "dtype"), CASES)
def test_a_half_precision_cell_state_fails_the_check(backend, dtype, monkeypatch):
    """The check has the power to see the wrong state policy."""
    monkeypatch.setattr(ArrayModuleOps, "state_dtype", lambda self, dtype_name: dtype_name)
    found, _ = errors(INTEGRATOR, backend, dtype, "lstm")
    with pytest.raises(AssertionError, match="c_n"):
        assert_within_bound(found, "half cell state")


@pytest.mark.parametrize(("backend", "dtype"), CASES)
def test_half_precision_running_sums_fail_the_check(backend, dtype, monkeypatch):
    """The check has the power to see gradient sums kept in the half type (the peephole
    gradient summed step by step in float16/bfloat16, as before this policy)."""
    gates_backward = ArrayModuleOps.gates_backward

    def half_extra_grads(self, variant, dh, dc, cache, extra):
        dz, dc_prev, dextra = gates_backward(self, variant, dh, dc, cache, extra)
        return dz, dc_prev, {k: self.cast(g, self.dtype_name(extra[k])) for k, g in dextra.items()}

    monkeypatch.setattr(ArrayModuleOps, "gates_backward", half_extra_grads)
    monkeypatch.setattr(
        bptt,
        "zero_extra_grads",
        lambda ops, extra, like: {k: ops.zeros_like(v) for k, v in extra.items()},
    )
    found, _ = errors(FORGETFUL, backend, dtype, "peephole")
    with pytest.raises(AssertionError, match="dp"):
        assert_within_bound(found, "half running sums")
