"""The NumPy backend's hand-written backward agrees with central finite differences (float64)."""

from __future__ import annotations

import numpy as np
import pytest

import lstm_multi


def objective(cell, params, x, state, lengths, dy, dh, dc):
    y, (h_n, c_n) = cell(params, x, state=state, lengths=lengths)
    return float(np.sum(y * dy) + np.sum(h_n * dh) + np.sum(c_n * dc))


def numeric_gradient(f, array, eps=1e-6):
    """Central differences of f() with respect to every entry of ``array`` (changed in place)."""
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        keep = array[index]
        array[index] = keep + eps
        up = f()
        array[index] = keep - eps
        down = f()
        array[index] = keep
        grad[index] = (up - down) / (2 * eps)
    return grad


@pytest.mark.parametrize("variant", sorted(lstm_multi.VARIANTS))
@pytest.mark.parametrize(
    ("num_layers", "bidirectional", "with_lengths", "proj_size"),
    [(1, False, False, 0), (2, True, True, 0), (2, False, True, 0), (2, True, True, 2)],
    ids=["1-layer", "2-layer-bi-lengths", "2-layer-lengths", "2-layer-bi-lengths-projected"],
)
def test_numpy_backward_matches_finite_differences(
    variant, num_layers, bidirectional, with_lengths, proj_size
):
    """Every entry of every input and parameter is perturbed (two evaluations each): hidden
    2 (3 where a projection to 2 needs a wider cell) and 3 steps keep the entries and the
    evaluations few; the lengths still end one sequence early. The input size is never the
    hidden size (a size mixed up still shows)."""
    rng = np.random.default_rng(3)
    input_size, hidden_size = (2, 3) if proj_size else (3, 2)
    cell = lstm_multi.get_cell("numpy")(
        input_size,
        hidden_size,
        variant=variant,
        num_layers=num_layers,
        bidirectional=bidirectional,
        proj_size=proj_size,
    )
    params = cell.init(seed=3, dtype="float64")
    for layer in params:
        for p in layer:
            if "p" in p:
                p["p"] *= 4
    batch, steps = 2, 3
    x = rng.standard_normal((batch, steps, input_size))
    h0, c0 = (0.5 * rng.standard_normal(shape) for shape in cell.state_shapes(batch))
    lengths = np.array([3, 2]) if with_lengths else None
    dy = rng.standard_normal((batch, steps, cell.num_directions * cell.output_size))
    dh, dc = (rng.standard_normal(shape) for shape in cell.state_shapes(batch))

    grads, dx, (dh0, dc0) = cell.vjp(
        params, x, dy, state=(h0, c0), lengths=lengths, dh_n=dh, dc_n=dc
    )

    def f():
        return objective(cell, params, x, (h0, c0), lengths, dy, dh, dc)

    checks = [("x", dx, x), ("h0", dh0, h0), ("c0", dc0, c0)]
    for layer, (g_layer, p_layer) in enumerate(zip(grads, params, strict=True)):
        for direction, (g, p) in enumerate(zip(g_layer, p_layer, strict=True)):
            checks += [(f"params[{layer}][{direction}][{k!r}]", g[k], p[k]) for k in p]
    for name, analytic, array in checks:
        numeric = numeric_gradient(f, array)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8, err_msg=name)
