"""Padding never leaks: nothing past a sequence's length touches any output or gradient.

Property: filling the padding of x and of the output cotangent dy with garbage
(NaN, +-inf, 1e30) gives outputs and gradients bit-identical to zero padding,
on every backend and path (NumPy; torch generic, native and the nn module;
JAX with its custom VJP and with JAX autodiff), and the gradient of the
padding itself is exactly zero.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import to_numpy
from hypothesis import given
from hypothesis import strategies as st
from reference import CORE_VARIANTS

import lstm_multi

GARBAGE = [np.nan, np.inf, -np.inf, 1e30, -1e30]

PATHS = [
    pytest.param(("numpy", {}), id="numpy"),
    pytest.param(("torch", {"native": False}), id="torch-generic"),
    pytest.param(("torch", {"native": True}), id="torch-native"),
    pytest.param(("jax", {}), id="jax-custom-vjp"),
    pytest.param(("jax", {"autodiff": True}), id="jax-autodiff"),
]


#: sizes are fixed (what is drawn is where the padding is, what it holds, and the
#: network): the jitted JAX calls then compile once per network, not per example
STEPS, BATCH, INPUT, HIDDEN = 6, 3, 2, 3


@st.composite
def padded_problems(draw):
    lengths = draw(st.lists(st.integers(1, STEPS), min_size=BATCH, max_size=BATCH))
    if min(lengths) == STEPS:
        lengths[draw(st.integers(0, BATCH - 1))] = draw(st.integers(1, STEPS - 1))
    return {
        "variant": draw(st.sampled_from(CORE_VARIANTS)),
        "steps": STEPS,
        "lengths": np.array(lengths),
        "input_size": INPUT,
        "hidden_size": HIDDEN,
        "num_layers": draw(st.integers(1, 2)),
        "bidirectional": draw(st.booleans()),
        "garbage": draw(st.sampled_from(GARBAGE)),
        "seed": draw(st.integers(0, 2**16)),
    }


def padded(array, lengths, fill):
    """A copy of (B, T, ...) with every step past lengths[n] set to ``fill``."""
    out = array.copy()
    for n, length in enumerate(lengths):
        out[n, length:] = fill
    return out


_CELLS = {}


def run(backend, kwargs, problem, x, dy):
    key = (backend, tuple(sorted(kwargs.items())), problem["variant"], problem["num_layers"],
           problem["bidirectional"])  # fmt: skip
    if key not in _CELLS:  # one cell per network: its jitted calls are reused
        _CELLS[key] = lstm_multi.get_cell(backend)(
            INPUT, HIDDEN, variant=problem["variant"], num_layers=problem["num_layers"],
            bidirectional=problem["bidirectional"], **kwargs,
        )  # fmt: skip
    cell = _CELLS[key]
    params = cell.init(seed=problem["seed"], dtype="float64")
    if backend == "torch":
        import torch

        x, dy = torch.as_tensor(x), torch.as_tensor(dy)
    lengths = problem["lengths"]
    y, (h_n, c_n) = cell(params, x, lengths=lengths)
    grads, dx, (dh0, dc0) = cell.vjp(params, x, dy, lengths=lengths)
    flat = [y, h_n, c_n, dx, dh0, dc0] + [g[k] for layer in grads for g in layer for k in sorted(g)]
    return [to_numpy(a) for a in flat]


@pytest.mark.parametrize("path", PATHS)
@given(problem=padded_problems())
def test_garbage_in_the_padding_changes_nothing(path, problem):
    backend, kwargs = path
    try:
        lstm_multi.registry.load_backend(backend)
    except (ImportError, RuntimeError) as error:
        pytest.skip(str(error))
    rng = np.random.default_rng(problem["seed"])
    batch, steps = len(problem["lengths"]), problem["steps"]
    width = problem["hidden_size"] * (2 if problem["bidirectional"] else 1)
    x = rng.standard_normal((batch, steps, problem["input_size"]))
    dy = rng.standard_normal((batch, steps, width))
    lengths, fill = problem["lengths"], problem["garbage"]
    clean = run(backend, kwargs, problem, padded(x, lengths, 0.0), padded(dy, lengths, 0.0))
    dirty = run(backend, kwargs, problem, padded(x, lengths, fill), padded(dy, lengths, fill))
    for k, (a, b) in enumerate(zip(dirty, clean, strict=True)):
        assert np.all(np.isfinite(a)), f"result {k} is not finite with {fill} in the padding"
        np.testing.assert_array_equal(a, b, err_msg=f"result {k} changed with {fill} padding")
    dx = dirty[3]
    for n, length in enumerate(lengths):
        assert np.all(dx[n, length:] == 0), "the padding must get a zero gradient"


@pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])
def test_module_with_packed_garbage_padding(native):
    """The nn module reads packed sequences, which never hold the padding."""
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence

    from lstm_multi.torch import LSTM

    torch.manual_seed(0)
    variants = ["lstm"] if native else list(CORE_VARIANTS)
    for variant in variants:
        module = LSTM(3, 4, batch_first=True, variant=variant, native=native, dtype=torch.float64)
        lengths = torch.tensor([5, 2, 4])
        base = torch.randn(3, 5, 3, dtype=torch.float64)
        results = []
        for fill in (0.0, float("nan")):
            x = base.clone()
            for n, length in enumerate(lengths):
                x[n, length:] = fill
            x.requires_grad_(True)
            module.zero_grad()
            out, (h, c) = module(
                pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            )
            (out.data.sum() + h.sum() + c.sum()).backward()
            results.append([out.data, h, c, x.grad, *(p.grad for p in module.parameters())])
        for a, b in zip(*results, strict=True):
            assert torch.equal(a, b), variant
