"""Every backend agrees with the independent oracle: outputs and every gradient.

Property tests over variants, sizes, layers 1-3, directions, initial states,
lengths (any in 1..T, not necessarily one full-length sequence) and
batch_first; float64 to 1e-10, float32 to 1e-4 (relative). The oracle is the
README's equations (``oracle.py``); for "lstm", ``torch.nn.LSTM`` with packed
sequences is checked as a second reference, and the oracle against it.

The suite's power is tested too: a deliberately wrong library (a wrong gate
equation, made consistently in forward and backward; a term dropped from the
backward alone) must fail these same checks.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, to_numpy
from hypothesis import given
from reference import (
    Config,
    batch_layout,
    configs,
    make_problem,
    nn_lstm_reference,
    reference,
)

from lstm_multi import spec


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


OUTPUTS = ("y", "h_n", "c_n")
GRADIENTS = ("dx", "dh0", "dc0")


def assert_outputs_match(result, expected, dtype, label=None):
    for key in OUTPUTS:
        assert_close(result[key], expected[key], dtype, key, label)


def assert_gradients_match(result, expected, dtype, label=None):
    for key in GRADIENTS:
        assert_close(result[key], expected[key], dtype, key, label)
    assert len(result["grads"]) == len(expected["grads"]), "number of layers"
    for layer, (got_layer, want_layer) in enumerate(
        zip(result["grads"], expected["grads"], strict=True)
    ):
        assert len(got_layer) == len(want_layer), f"directions of layer {layer}"
        for direction, (got, want) in enumerate(zip(got_layer, want_layer, strict=True)):
            assert set(got) == set(want), f"grads[{layer}][{direction}] keys"
            for k in want:
                where = f"grads[{layer}][{direction}][{k!r}]"
                assert_close(got[k], want[k], dtype, where, label)


def assert_matches_reference(result, expected, dtype, label=None):
    assert_outputs_match(result, expected, dtype, label)
    assert_gradients_match(result, expected, dtype, label)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@given(config=configs())
def test_backend_matches_oracle(backend, dtype, config):
    problem = make_problem(config)
    result = run_backend(backend, config, problem, dtype)
    label = f"oracle vs {backend}/{config.variant}"
    assert_matches_reference(result, reference(config, problem), dtype, label)


@given(config=configs(variants=("lstm",)))
def test_backend_matches_nn_lstm(backend, config):
    """The second reference for "lstm": torch.nn.LSTM itself, packed sequences for lengths."""
    pytest.importorskip("torch")
    problem = make_problem(config)
    result = run_backend(backend, config, problem, "float64")
    assert_matches_reference(result, nn_lstm_reference(config, problem), "float64")


@given(config=configs(variants=("lstm",)))
def test_oracle_matches_nn_lstm(config):
    """The oracle itself is right where PyTorch can say so."""
    pytest.importorskip("torch")
    problem = make_problem(config)
    assert_matches_reference(
        reference(config, problem), nn_lstm_reference(config, problem), "float64"
    )


@given(config=configs(variants=("lstm",)))
def test_torch_generic_path_matches_native(config):
    """The torch cell's spec loop and its native (nn.LSTM kernel) path agree."""
    pytest.importorskip("torch")
    problem = make_problem(config)
    generic = run_backend("torch", config, problem, "float64", native=False)
    native = run_backend("torch", config, problem, "float64", native=True)
    assert_matches_reference(generic, native, "float64")


def test_without_state_initial_state_gradient_is_that_of_zeros(backend):
    """With state=None the initial state is zeros, and vjp still returns its gradient."""
    config = Config("peephole", 2, 3, 2, 3, 2, True, False, False, True, 0)
    problem = make_problem(config)
    expected = reference(config, problem)
    result = run_backend(backend, config, problem, "float64")
    assert_close(result["dh0"], expected["dh0"], "float64", "dh0")
    assert_close(result["dc0"], expected["dc0"], "float64", "dc0")
    assert np.any(result["dc0"] != 0)


# the suite's power: deliberately wrong libraries must fail it ----------------------


class OutputGateReadsPreviousCell(spec.PeepholeLSTM):
    """A wrong "peephole": o = sigma(z_o + p_o * c_{t-1}) instead of c_t, with the
    backward derived correctly *for that wrong forward*. Self-consistent, so finite
    differences of the library against itself cannot see it; only an independent
    statement of the equations can."""

    def gates_forward(self, ops, z, c_prev, extra):
        p = extra["p"]
        zi, zf, zg, zo = spec.split_gates(z, c_prev.shape[-1])
        i = ops.sigmoid(zi + p[0] * c_prev)
        f = ops.sigmoid(zf + p[1] * c_prev)
        g = ops.tanh(zg)
        c = f * c_prev + i * g
        o = ops.sigmoid(zo + p[2] * c_prev)
        tanh_c = ops.tanh(c)
        return o * tanh_c, c, spec.GateCache(i, f, g, o, c_prev, c, tanh_c)

    def gates_backward(self, ops, dh, dc, cache, extra):
        p = extra["p"]
        i, f, g, o, c_prev, c, tanh_c = cache
        dzo = dh * tanh_c * o * (1 - o)
        dc = dc + dh * o * (1 - tanh_c * tanh_c)
        dzi = dc * g * i * (1 - i)
        dzf = dc * c_prev * f * (1 - f)
        dzg = dc * i * (1 - g * g)
        dc_prev = dc * f + dzi * p[0] + dzf * p[1] + dzo * p[2]
        dp = ops.stack(
            [ops.sum(dzi * c_prev, 0), ops.sum(dzf * c_prev, 0), ops.sum(dzo * c_prev, 0)], 0
        )
        return ops.concat([dzi, dzf, dzg, dzo], -1), dc_prev, {"p": dp}


def backward_without_output_peephole_term(self, ops, dh, dc, cache, extra):
    """The "peephole" backward with the ``dz_o * p_o`` term of dc_t dropped."""
    p = extra["p"]
    i, f, g, o, c_prev, c, tanh_c = cache
    dzo = dh * tanh_c * o * (1 - o)
    dc = dc + dh * o * (1 - tanh_c * tanh_c)  # + dzo * p[2] missing
    dzi = dc * g * i * (1 - i)
    dzf = dc * c_prev * f * (1 - f)
    dzg = dc * i * (1 - g * g)
    dc_prev = dc * f + dzi * p[0] + dzf * p[1]
    dp = ops.stack([ops.sum(dzi * c_prev, 0), ops.sum(dzf * c_prev, 0), ops.sum(dzo * c, 0)], 0)
    return ops.concat([dzi, dzf, dzg, dzo], -1), dc_prev, {"p": dp}


MUTATION_CONFIG = Config("peephole", 3, 5, 2, 3, 2, True, True, True, False, 11)


def test_consistent_forward_and_backward_mutation_fails_the_oracle(backend, monkeypatch):
    monkeypatch.setitem(spec.VARIANTS, "peephole", OutputGateReadsPreviousCell())
    problem = make_problem(MUTATION_CONFIG)
    result = run_backend(backend, MUTATION_CONFIG, problem, "float64")
    with pytest.raises(AssertionError):
        assert_outputs_match(result, reference(MUTATION_CONFIG, problem), "float64", False)


def test_backward_only_mutation_fails_the_oracle(backend, monkeypatch):
    monkeypatch.setattr(spec.PeepholeLSTM, "gates_backward", backward_without_output_peephole_term)
    problem = make_problem(MUTATION_CONFIG)
    expected = reference(MUTATION_CONFIG, problem)
    result = run_backend(backend, MUTATION_CONFIG, problem, "float64")
    assert_outputs_match(result, expected, "float64", False)  # the forward is untouched
    with pytest.raises(AssertionError):
        assert_gradients_match(result, expected, "float64", False)
