"""Every backend agrees with the independent oracle: outputs and every gradient.

Property tests over variants, sizes, layers 1-3, directions, initial states,
lengths (any in 1..T, not necessarily one full-length sequence) and
batch_first; float64 and float32 to 100 machine epsilons (conftest.TOLERANCES). The oracle is the
README's equations (``oracle.py``); for "lstm", ``torch.nn.LSTM`` with packed
sequences is checked as a second reference, and the oracle against it.

The suite's power is tested too: a deliberately wrong library (a wrong gate
equation, made consistently in forward and backward; a term dropped from the
backward alone) must fail these same checks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import assert_close, to_numpy
from hypothesis import example, given
from reference import (
    Config,
    batch_layout,
    configs,
    make_problem,
    nn_lstm_reference,
    reference,
)

from lstm_multi import spec, step
from lstm_multi.compile import derive


def run_backend(backend, config, problem, dtype, **cell_kwargs):
    """Forward and vjp on ``backend`` in ``dtype``; results as float64 NumPy, time-major."""
    return run_cell(config.cell(backend, **cell_kwargs), config, problem, dtype)


def run_cell(cell, config, problem, dtype):
    """``run_backend`` for a cell built by the caller (of the config's sizes)."""
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
    return as_results(config, (y, h_n, c_n), (grads, dx, dh0, dc0))


def as_results(config, outputs, gradients):
    """A cell's ``(y, h_n, c_n)`` and ``(grads, dx, dh0, dc0)`` as the results the
    comparisons take: float64-capable NumPy, y and dx time-major."""
    (y, h_n, c_n), (grads, dx, dh0, dc0) = outputs, gradients
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


def _edge(variant, **kw):
    """A pinned configuration: two sequences of lengths, initial state, time-major."""
    base = dict(batch=2, steps=3, input_size=2, hidden_size=3, num_layers=1, bidirectional=False)
    flags = dict(with_state=True, with_lengths=True, batch_first=False, seed=3)
    return Config(variant=variant, **{**base, **flags, **kw})


#: the edge configurations every run checks, whatever hypothesis draws: one step; one
#: unit; a projection to H - 1; three bidirectional layers of a variant with peepholes
#: (so a parameter of a later layer's reverse direction read from the wrong place, which
#: a draw reaches only now and then, fails every run)
EDGE_CONFIGS = (
    _edge("peephole", steps=1, num_layers=2, bidirectional=True),
    _edge("lstm", hidden_size=1, num_layers=2, batch_first=True),
    _edge("cifg", hidden_size=4, proj_size=3, num_layers=2, bidirectional=True),
    _edge("peephole", num_layers=3, bidirectional=True, with_lengths=False),
)


def pin_edges(test):
    """``test`` (given ``config``) with an ``@example`` of each of ``EDGE_CONFIGS``."""
    for config in EDGE_CONFIGS:
        test = example(config=config)(test)
    return test


#: the most layers a drawn JAX configuration has in the default run: a JAX example's time
#: is compiling its scans, one a layer and direction, and a third layer runs the code a
#: second runs (it reads the layer below's output); the pinned three-layer bidirectional
#: edge takes it every run, numpy and torch draw 1-3 layers, and so does JAX in the
#: thorough run
JAX_DRAWN_LAYERS = 2


def drawn_for(backend, config, thorough):
    """``config`` as ``backend`` runs it: JAX's draws in the default run with at most
    ``JAX_DRAWN_LAYERS`` layers (the pinned edges as they are)."""
    if backend == "jax" and not thorough and config not in EDGE_CONFIGS:
        return dataclasses.replace(config, num_layers=min(config.num_layers, JAX_DRAWN_LAYERS))
    return config


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pin_edges
@given(config=configs())
def test_backend_matches_oracle(backend, dtype, config, thorough):
    config = drawn_for(backend, config, thorough)
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


def output_gate_reads_previous_cell(z, c_prev, p):
    """A wrong "peephole": o = sigma(z_o + p_o * c_{t-1}) instead of c_t. Its backward is
    derived correctly *for that wrong forward*, so it is self-consistent and finite
    differences of the library against itself cannot see it; only an independent
    statement of the equations can."""
    i = spec.sigmoid(z.i + p.i * c_prev)
    f = spec.sigmoid(z.f + p.f * c_prev)
    c = f * c_prev + i * spec.tanh(z.g)
    o = spec.sigmoid(z.o + p.o * c_prev)
    return o * spec.tanh(c), c


DERIVATION_RULE = derive._backward_rule


def rule_without_output_peephole_term(graph, node, node_id, g):
    """The derivation rules with the product p_o * c_t's contribution to c_t dropped: in
    "peephole" that removes exactly the ``dz_o * p_o`` term of dc_t from the backward."""
    found = DERIVATION_RULE(graph, node, node_id, g)
    p_o = [i for i, n in enumerate(graph.nodes) if n.name == "p_o"]
    if node.op == "mul" and p_o and p_o[0] in node.args:
        return [(a, contribution) for a, contribution in found if a == p_o[0]]
    return found


def peephole_with(forward=None):
    """A fresh "peephole" Variant (its own trace), optionally with another forward: a
    deliberately wrong library, so the built-in's name is freed for it while it is made
    (``Variant`` refuses a built-in's name for other math)."""
    builtin = spec._BUILTINS.pop("peephole")
    try:
        return spec.Variant(
            "peephole", forward or spec._peephole, params={"p": ("i", "f", "o")}, extends_lstm=True
        )
    finally:
        spec._BUILTINS["peephole"] = builtin


MUTATION_CONFIG = Config("peephole", 3, 5, 2, 3, 2, True, True, True, False, 11)


def test_consistent_forward_and_backward_mutation_fails_the_oracle(backend, monkeypatch):
    monkeypatch.setitem(spec.VARIANTS, "peephole", peephole_with(output_gate_reads_previous_cell))
    problem = make_problem(MUTATION_CONFIG)
    result = run_backend(backend, MUTATION_CONFIG, problem, "float64")
    with pytest.raises(AssertionError):
        assert_outputs_match(result, reference(MUTATION_CONFIG, problem), "float64", False)


def test_backward_only_mutation_fails_the_oracle(backend, monkeypatch):
    monkeypatch.setattr(derive, "_backward_rule", rule_without_output_peephole_term)
    monkeypatch.setitem(spec.VARIANTS, "peephole", peephole_with())
    problem = make_problem(MUTATION_CONFIG)
    expected = reference(MUTATION_CONFIG, problem)
    result = run_backend(backend, MUTATION_CONFIG, problem, "float64")
    assert_outputs_match(result, expected, "float64", False)  # the forward is untouched
    with pytest.raises(AssertionError):
        assert_gradients_match(result, expected, "float64", False)


REAL_STEP_BACKWARD = step.step_backward


def step_backward_reading_the_wrong_saved_value(ops, variant, dh, dc, cache, U_step_t, extra):
    """The projection's weight gradient formed from the wrong entry of the step's cache
    (an off-by-one: the last gate value instead of m_t), everything else right."""
    dz, dh_prev, dc_prev, dextra = REAL_STEP_BACKWARD(ops, variant, dh, dc, cache, U_step_t, extra)
    dextra[spec.PROJECTION] = ops.transpose(cache[-2]) @ dh
    return dz, dh_prev, dc_prev, dextra


def test_projection_backward_mutation_fails_the_oracle(backend, monkeypatch):
    """The mutation is in the array code's step (``step.step_backward``), so the CPU kernels
    (whose projected path is checked against the oracle in test_cpu_kernels.py) are
    turned off here."""
    from lstm_multi.backends import kernel_direction

    monkeypatch.setattr(kernel_direction, "kernels_for", lambda *args: None)
    monkeypatch.setattr(step, "step_backward", step_backward_reading_the_wrong_saved_value)
    config = Config("peephole", 3, 5, 2, 4, 2, True, True, True, False, 11, proj_size=2)
    problem = make_problem(config)
    expected = reference(config, problem)
    result = run_backend(backend, config, problem, "float64")
    assert_outputs_match(result, expected, "float64", False)  # the forward is untouched
    with pytest.raises(AssertionError, match="W_hr"):
        assert_gradients_match(result, expected, "float64", False)
