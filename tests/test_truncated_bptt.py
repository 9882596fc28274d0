"""Long sequences in chunks (truncated backpropagation through time), on every CPU backend.

* chunked forward, the final state carried from chunk to chunk, equals one
  call on the whole sequence, float64: bit for bit on NumPy; on torch and JAX
  to 5 eps (each computes the input projection x W of a whole chunk as one
  matrix product, and the BLAS or XLA kernel chosen for an (B*T, in) product
  rounds differently from the one for another T: a different blocking, or
  a * b + c contracted into one fused multiply-add in one and not the other,
  a last-bit difference in a few elements; worst seen 3.3e-16, 1.5 eps);
* ``cell.stop_gradient`` cuts the carried state: a chunk's gradient does not
  reach the previous chunk's inputs (torch, JAX), and it leaves values alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tolerance
from reference import CORE_VARIANTS

import lstm_multi


def _cell(backend, **kwargs):
    if backend not in lstm_multi.available_backends():
        pytest.skip(f"{backend} is not installed")
    if backend == "jax":
        from lstm_multi.backends.jax_backend import x64_enabled

        if not x64_enabled():
            pytest.skip("float64 needs JAX's 64-bit mode")
    return lstm_multi.get_cell(backend)(input_size=3, hidden_size=5, num_layers=2, **kwargs)


@pytest.mark.parametrize("chunk", [1, 4, 7])
@pytest.mark.parametrize("variant", CORE_VARIANTS)
@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_chunked_forward_equals_the_whole_sequence_exactly(backend, variant, chunk):
    cell = _cell(backend, variant=variant, **({"native": False} if backend == "torch" else {}))
    params = cell.init(seed=4, dtype="float64")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 10, 3))  # (B, T, in)
    start_state = tuple(rng.standard_normal((2, 2, 3, 5)))
    y, (h_n, c_n) = cell(params, x, state=start_state)
    state, pieces = start_state, []
    for start in range(0, x.shape[1], chunk):
        y_chunk, state = cell(params, x[:, start : start + chunk], state=state)
        pieces.append(np.asarray(y_chunk))
        state = cell.stop_gradient(state)
    if backend in ("torch", "jax"):
        # last-bit differences of the chunk-shaped matrix products (see above) in values of
        # size ~1: a few eps, not the suite's 100
        def same(a, b):
            np.testing.assert_allclose(a, b, rtol=0, atol=tolerance("float64", k=5))
    else:
        same = np.testing.assert_array_equal
    same(np.concatenate(pieces, axis=1), np.asarray(y))
    same(np.asarray(state[0]), np.asarray(h_n))
    same(np.asarray(state[1]), np.asarray(c_n))


def test_torch_stop_gradient_keeps_the_backward_within_a_chunk():
    torch = pytest.importorskip("torch")
    cell = _cell("torch", variant="peephole")
    params = cell.init(seed=0, dtype="float64")
    x = torch.randn(2, 8, 3, dtype=torch.float64, requires_grad=True)
    _, state = cell(params, x[:, :4])
    cut = cell.stop_gradient(state)
    assert not any(s.requires_grad for s in cut)
    torch.testing.assert_close(cut[0], state[0], rtol=0, atol=0)
    y2, _ = cell(params, x[:, 4:], state=cut)
    (grad,) = torch.autograd.grad(y2.sum(), x)
    assert torch.all(grad[:, :4] == 0) and torch.any(grad[:, 4:] != 0)
    y2_through, _ = cell(params, x[:, 4:], state=state)  # not cut: reaches the first chunk
    (through,) = torch.autograd.grad(y2_through.sum(), x)
    assert torch.any(through[:, :4] != 0)


def test_jax_stop_gradient_keeps_the_backward_within_a_chunk():
    jax = pytest.importorskip("jax")
    cell = _cell("jax", variant="peephole_full")
    params = cell.init(seed=0, dtype="float64")
    x = jax.numpy.asarray(np.random.default_rng(1).standard_normal((2, 8, 3)))

    def second_chunk(x, cut):
        _, state = cell(params, x[:, :4])
        if cut:
            state = cell.stop_gradient(state)
        y2, _ = cell(params, x[:, 4:], state=state)
        return y2.sum()

    grad = jax.grad(second_chunk)(x, True)
    assert np.all(np.asarray(grad[:, :4]) == 0) and np.any(np.asarray(grad[:, 4:]) != 0)
    assert np.any(np.asarray(jax.grad(second_chunk)(x, False)[:, :4]) != 0)


def test_stop_gradient_wants_a_state_pair():
    cell = lstm_multi.get_cell("numpy")(3, 5)
    with pytest.raises(TypeError, match=r"state: expected a tuple \(h, c\), got list"):
        cell.stop_gradient([np.zeros((1, 2, 5))] * 2)
