"""Checks of the half-precision policy with derived bounds (used on the CPU and the GPU).

The policy (``lstm_multi.ops``): a step's matrix products in the input dtype,
the gate math and the cell state c in float32, h rounded to the input dtype
each step; in the backward dz and every sum over time and batch (dW, dU, db,
dp) in float32, each gradient rounded to its dtype once.

The yardstick is a float32 run of the same cell on the same numbers (every
input and weight first rounded to the half dtype, so only the computation
differs). Errors are normwise, ``|got - want| / |want|``, in units of the half
type's unit roundoff u (2^-11 for float16, 2^-8 for bfloat16). The bound is
``BOUND_IN_U`` u, from what the policy rounds:

- each reported array is rounded to the half type once at the end (a normwise
  error of about u / sqrt(3), never more than u);
- the quantities it is computed from carry the roundings of the policy (h and
  the step products each step, dz before the step's product), each at most u,
  which do not accumulate when the problem keeps them from growing over time.

Two problems make the policy's two halves visible:

- ``INTEGRATOR`` (forget bias +8, weak recurrence): c integrates its inputs over
  hundreds of steps. A float32 state averages the per-step gate roundings; a
  half state adds one rounding of c per step and drifts by many u.
- ``FORGETFUL`` (forget bias -3): nothing is remembered long, so the backward is
  well conditioned and the gradients' own errors stay near one rounding, while a
  running sum over T = 400 steps in the half type (the peephole gradient, say)
  gathers several u.

Measured on the CPU (numpy, torch, jax; float16, bfloat16; every variant):
the policy stays within 1.8 u; a half cell state gives c_n 6.8-67 u on the
integrator, half running sums give dp 4.4-5.9 u on the forgetful problem.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from oracle import PEEPHOLE_ROWS

#: the unit roundoff of each half type
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
#: one final rounding (<= u) plus one rounding of the inputs it is computed from (<= u)
BOUND_IN_U = 2.0


@dataclass(frozen=True)
class Problem:
    name: str
    forget_bias: float
    recurrent_scale: float
    checked: tuple  # which results the problem is made to check


INTEGRATOR = Problem("integrator", 8.0, 0.1, ("y", "h_n", "c_n"))
FORGETFUL = Problem(
    "forgetful", -3.0, 1.0, ("y", "h_n", "c_n", "dx", "dh0", "dc0", "dW", "dU", "db", "dp")
)

STEPS, BATCH, INPUT, HIDDEN = 400, 4, 8, 16


def inputs(problem: Problem, variant: str, seed=0):
    """Float64 NumPy inputs of one layer and direction, batch-first, lengths included."""
    rng = np.random.default_rng(seed)
    bound = 1 / np.sqrt(HIDDEN)
    p = {
        "W": rng.uniform(-bound, bound, (INPUT, 4 * HIDDEN)),
        "U": rng.uniform(-bound, bound, (HIDDEN, 4 * HIDDEN)) * problem.recurrent_scale,
        "b": rng.uniform(-bound, bound, 4 * HIDDEN),
    }
    p["b"][HIDDEN : 2 * HIDDEN] += problem.forget_bias
    if variant in PEEPHOLE_ROWS:
        p["p"] = rng.uniform(-3 * bound, 3 * bound, (len(PEEPHOLE_ROWS[variant]), HIDDEN))
    state = (1, BATCH, HIDDEN)
    return {
        "params": [[p]],
        "x": rng.standard_normal((BATCH, STEPS, INPUT)),
        "dy": rng.standard_normal((BATCH, STEPS, HIDDEN)),
        "h0": 0.5 * rng.standard_normal(state),
        "c0": 0.5 * rng.standard_normal(state),
        "dh_n": rng.standard_normal(state),
        "dc_n": rng.standard_normal(state),
        "lengths": np.array([STEPS, STEPS - 50, STEPS // 2, 7]),
    }


def run(cell, data, to, back):
    """Forward and vjp of ``cell`` on ``data`` converted by ``to``; results by ``back``."""
    params = [[{k: to(v) for k, v in p.items()} for p in layer] for layer in data["params"]]
    state = (to(data["h0"]), to(data["c0"]))
    x, lengths = to(data["x"]), data["lengths"]
    y, (h_n, c_n) = cell(params, x, state=state, lengths=lengths)
    grads, dx, (dh0, dc0) = cell.vjp(
        params, x, to(data["dy"]), state=state, lengths=lengths,
        dh_n=to(data["dh_n"]), dc_n=to(data["dc_n"]),
    )  # fmt: skip
    out = {"y": y, "h_n": h_n, "c_n": c_n, "dx": dx, "dh0": dh0, "dc0": dc0}
    out.update({f"d{k}": g for k, g in grads[0][0].items()})
    dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in out.items()}
    return {k: back(v) for k, v in out.items()}, dtypes


def errors_in_u(problem, make_cell, variant, dtype, to, back):
    """Normwise errors of the half run against the float32 run, in units of u.

    ``make_cell(variant)`` builds the cell; ``to(array, dtype)`` converts a
    float64 NumPy array; ``back(array)`` returns float64 NumPy. Also returns the
    dtypes the half run gave back.
    """
    data = inputs(problem, variant)

    def rounded(a):
        return back(to(a, dtype))

    data = {
        k: ([[{n: rounded(v) for n, v in p.items()} for p in layer] for layer in a] if k == "params"
            else (a if k == "lengths" else rounded(a)))
        for k, a in data.items()
    }  # fmt: skip
    cell = make_cell(variant)
    half, dtypes = run(cell, data, lambda a: to(a, dtype), back)
    full, _ = run(cell, data, lambda a: to(a, "float32"), back)
    u = UNIT_ROUNDOFF[dtype]
    errors = {}
    for key in problem.checked:
        if key not in full:
            continue
        scale = np.linalg.norm(full[key])
        diff = np.linalg.norm(half[key] - full[key])
        errors[key] = diff / u / scale if scale > 0 else (0.0 if diff == 0 else np.inf)
    return errors, dtypes


def assert_within_bound(errors, what):
    worst = {k: round(v, 2) for k, v in errors.items() if not v <= BOUND_IN_U}
    assert not worst, f"{what}: normwise errors above {BOUND_IN_U} u (in u): {worst}"
