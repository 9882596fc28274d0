"""Every backend agrees with the PyTorch module: outputs and every gradient.

Property tests over variants, sizes, layers 1-3, directions, initial states,
lengths and batch_first; float64 to 1e-10, float32 to 1e-4 (relative).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, to_numpy
from hypothesis import given
from reference import batch_layout, configs, make_problem, reference


def run_backend(backend, config, problem, dtype, **cell_kwargs):
    """Forward and vjp on ``backend`` in ``dtype``; results as float64 NumPy, time-major."""
    cell = config.cell(backend, **cell_kwargs)
    cast = (lambda a: a.astype(dtype)) if dtype != "float64" else (lambda a: a)
    params = cell.from_numpy(
        [[{k: cast(v) for k, v in p.items()} for p in layer] for layer in problem.params]
    )
    x = cast(batch_layout(config, problem.x))
    state = (cast(problem.h0), cast(problem.c0)) if config.with_state else None
    y, (h_n, c_n) = cell(params, x, state=state, lengths=problem.lengths)
    grads, dx, (dh0, dc0) = cell.vjp(
        params,
        x,
        cast(batch_layout(config, problem.dy)),
        state=state,
        lengths=problem.lengths,
        dh_n=cast(problem.dh_n),
        dc_n=cast(problem.dc_n),
    )
    return {
        "y": batch_layout(config, to_numpy(y)),
        "h_n": to_numpy(h_n),
        "c_n": to_numpy(c_n),
        "grads": to_numpy(grads),
        "dx": batch_layout(config, to_numpy(dx)),
        "dh0": to_numpy(dh0),
        "dc0": to_numpy(dc0),
    }


def assert_matches_reference(result, expected, dtype, with_state):
    for key in ("y", "h_n", "c_n", "dx"):
        assert_close(result[key], expected[key], dtype, key)
    if with_state:
        assert_close(result["dh0"], expected["dh0"], dtype, "dh0")
        assert_close(result["dc0"], expected["dc0"], dtype, "dc0")
    for layer, (got_layer, want_layer) in enumerate(zip(result["grads"], expected["grads"])):
        for direction, (got, want) in enumerate(zip(got_layer, want_layer)):
            assert set(got) == set(want)
            for k in want:
                assert_close(got[k], want[k], dtype, f"grads[{layer}][{direction}][{k!r}]")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@given(config=configs())
def test_backend_matches_torch_module(backend, dtype, config):
    problem = make_problem(config)
    result = run_backend(backend, config, problem, dtype)
    assert_matches_reference(result, reference(config, problem), dtype, config.with_state)


@given(config=configs(variants=("lstm",)))
def test_torch_generic_path_matches_native(config):
    """The torch cell's spec loop and its native (nn.LSTM kernel) path agree."""
    pytest.importorskip("torch")
    problem = make_problem(config)
    generic = run_backend("torch", config, problem, "float64", native=False)
    native = run_backend("torch", config, problem, "float64", native=True)
    assert_matches_reference(generic, native, "float64", True)


def test_without_state_initial_state_gradient_is_that_of_zeros(backend):
    """With state=None the initial state is zeros, and vjp still returns its gradient."""
    from reference import Config

    config = Config("peephole", 2, 3, 2, 3, 2, True, False, False, True, 0)
    problem = make_problem(config)
    expected = reference(config, problem)
    result = run_backend(backend, config, problem, "float64")
    assert_close(result["dh0"], expected["dh0"], "float64", "dh0")
    assert_close(result["dc0"], expected["dc0"], "float64", "dc0")
    assert np.any(result["dc0"] != 0)
