"""Invariants every backend must keep, independent of any reference implementation.

- Running a padded batch with ``lengths`` equals running each sequence truncated
  to its length on its own (outputs past the length are zero, final states are
  those at the last valid step), and so do the gradients.
- A bidirectional layer equals a forward run concatenated with a run over the
  reversed sequence (reversed back), using the reverse direction's parameters.
"""

from __future__ import annotations

import functools

import numpy as np
from conftest import assert_close, scaled, to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import CORE_VARIANTS

import lstm_multi


@settings(max_examples=scaled(12))  # each example compiles every per-sequence shape anew under JAX
@given(
    variant=st.sampled_from(CORE_VARIANTS),
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    num_layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_lengths_equal_per_sequence_truncation(
    backend, variant, lengths, num_layers, bidirectional, seed
):
    rng = np.random.default_rng(seed)
    steps, batch, hidden = max(lengths), len(lengths), 3
    cell = lstm_multi.get_cell(backend)(
        2, hidden, variant=variant, num_layers=num_layers, bidirectional=bidirectional
    )
    params = cell.init(seed=seed, dtype="float64")
    x = rng.standard_normal((batch, steps, 2))
    h0, c0 = rng.standard_normal((2, *cell.state_shape(batch)))
    dy = rng.standard_normal((batch, steps, cell.num_directions * hidden))
    dh, dc = rng.standard_normal((2, *cell.state_shape(batch)))
    lengths = np.array(lengths)

    y, (h_n, c_n) = cell(params, x, state=(h0, c0), lengths=lengths)
    grads, dx, (dh0, dc0) = cell.vjp(
        params, x, dy, state=(h0, c0), lengths=lengths, dh_n=dh, dc_n=dc
    )
    y, h_n, c_n, dx = to_numpy((y, h_n, c_n, dx))
    grads = to_numpy(grads)

    summed = None
    for n, length in enumerate(lengths):
        one = slice(n, n + 1)
        state = (h0[:, one], c0[:, one])
        y1, (h1, c1) = cell(params, x[one, :length], state=state)
        g1, dx1, (dh01, dc01) = cell.vjp(
            params, x[one, :length], dy[one, :length], state=state, dh_n=dh[:, one], dc_n=dc[:, one]
        )
        assert_close(y[n, :length], to_numpy(y1)[0], "float64", f"y[{n}]")
        assert np.all(y[n, length:] == 0), "outputs past the length must be zero"
        assert_close(h_n[:, n], to_numpy(h1)[:, 0], "float64", f"h_n[{n}]")
        assert_close(c_n[:, n], to_numpy(c1)[:, 0], "float64", f"c_n[{n}]")
        assert_close(dx[n, :length], to_numpy(dx1)[0], "float64", f"dx[{n}]")
        assert np.all(dx[n, length:] == 0), "inputs past the length get no gradient"
        assert_close(to_numpy(dh0)[:, n], to_numpy(dh01)[:, 0], "float64", f"dh0[{n}]")
        assert_close(to_numpy(dc0)[:, n], to_numpy(dc01)[:, 0], "float64", f"dc0[{n}]")
        g1 = to_numpy(g1)
        summed = (
            g1
            if summed is None
            else [
                [{k: a[k] + b[k] for k in a} for a, b in zip(la, lb, strict=True)]
                for la, lb in zip(summed, g1, strict=True)
            ]
        )
    for la, lb in zip(grads, summed, strict=True):
        for a, b in zip(la, lb, strict=True):
            for k in a:
                assert_close(a[k], b[k], "float64", f"param grad {k}")


@given(
    variant=st.sampled_from(CORE_VARIANTS),
    batch=st.integers(1, 3),
    steps=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_bidirectional_equals_forward_and_reversed_runs(backend, variant, batch, steps, seed):
    rng = np.random.default_rng(seed)
    Cell = lstm_multi.get_cell(backend)
    bi = Cell(2, 3, variant=variant, bidirectional=True)
    uni = Cell(2, 3, variant=variant)
    params = bi.init(seed=seed, dtype="float64")
    np_params = bi.to_numpy(params)
    forward_params = uni.from_numpy([[np_params[0][0]]])
    backward_params = uni.from_numpy([[np_params[0][1]]])
    x = rng.standard_normal((batch, steps, 2))
    h0, c0 = rng.standard_normal((2, 2, batch, 3))

    y, (h_n, c_n) = bi(params, x, state=(h0, c0))
    yf, (hf, cf) = uni(forward_params, x, state=(h0[:1], c0[:1]))
    yb, (hb, cb) = uni(backward_params, x[:, ::-1].copy(), state=(h0[1:], c0[1:]))
    expected = np.concatenate([to_numpy(yf), to_numpy(yb)[:, ::-1]], axis=-1)
    assert_close(to_numpy(y), expected, "float64", "y")
    assert_close(to_numpy(h_n), np.concatenate([to_numpy(hf), to_numpy(hb)]), "float64", "h_n")
    assert_close(to_numpy(c_n), np.concatenate([to_numpy(cf), to_numpy(cb)]), "float64", "c_n")


def test_same_seed_gives_same_parameters_on_every_backend(backend):
    cell = lstm_multi.get_cell(backend)(3, 4, variant="peephole", num_layers=2, bidirectional=True)
    reference = lstm_multi.get_cell("numpy")(
        3, 4, variant="peephole", num_layers=2, bidirectional=True
    )
    got, want = (
        cell.to_numpy(cell.init(seed=7, dtype="float64")),
        reference.init(seed=7, dtype="float64"),
    )
    for la, lb in zip(got, want, strict=True):
        for a, b in zip(la, lb, strict=True):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    bound = 1 / np.sqrt(4)
    assert all(np.abs(v).max() <= bound for layer in want for p in layer for v in p.values())


def test_from_numpy_to_numpy_round_trip(backend):
    cell = lstm_multi.get_cell(backend)(3, 4, variant="peephole")
    np_params = lstm_multi.get_cell("numpy")(3, 4, variant="peephole").init(seed=1, dtype="float32")
    back = cell.to_numpy(cell.from_numpy(np_params))
    for k in np_params[0][0]:
        assert back[0][0][k].dtype == np.float32
        np.testing.assert_array_equal(back[0][0][k], np_params[0][0][k])


@functools.cache
def _peephole_full_cell(backend, bidirectional):
    """One cell per configuration for every example (a JAX cell compiles once)."""
    return lstm_multi.get_cell(backend)(
        2, 3, variant="peephole_full", num_layers=2, bidirectional=bidirectional
    )


@given(seed=st.integers(0, 1000), bidirectional=st.booleans())
def test_peephole_full_ignores_h0_and_gives_it_no_gradient(backend, seed, bidirectional):
    """Its recurrence reads c_{t-1} only: h0 is accepted (a previous chunk's (h_n, c_n)
    can be passed on) but changes nothing, and its gradient is exactly zero."""
    rng = np.random.default_rng(seed)
    cell = _peephole_full_cell(backend, bidirectional)
    params = cell.init(seed=seed, dtype="float64")
    x = rng.standard_normal((2, 4, 2))
    dy = rng.standard_normal((2, 4, 3 * cell.num_directions))
    c0 = rng.standard_normal(cell.state_shape(2))
    results = []
    for h0 in (np.zeros(cell.state_shape(2)), 10 * rng.standard_normal(cell.state_shape(2))):
        y, (h_n, c_n) = cell(params, x, state=(h0, c0), lengths=[4, 2])
        grads, dx, (dh0, dc0) = cell.vjp(params, x, dy, state=(h0, c0), lengths=[4, 2])
        assert np.all(to_numpy(dh0) == 0)
        results.append(to_numpy([y, h_n, c_n, dx, dc0, grads[0][0]["U"]]))
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)
