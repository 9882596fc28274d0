"""Streaming inference: pieces fed to a ``Stream`` give the whole-sequence call."""

from __future__ import annotations

import numpy as np
import pytest

import lstm_multi
from lstm_multi import Stream

CHUNKS = [1, 3, 2, 1]  # T = 7, fed as uneven chunks


def _pieces(x, batch_first, sizes):
    start = 0
    for size in sizes:
        yield x[:, start : start + size] if batch_first else x[start : start + size]
        start += size


@pytest.mark.parametrize("batch_first", [True, False])
def test_chunks_and_steps_equal_the_whole_sequence(backend, batch_first):
    cell = lstm_multi.get_cell(backend)(
        3, 4, variant="peephole", num_layers=2, proj_size=2, batch_first=batch_first
    )
    params = cell.init(seed=1, dtype="float32")
    rng = np.random.default_rng(0)
    shape = (2, sum(CHUNKS), 3) if batch_first else (sum(CHUNKS), 2, 3)
    x = rng.standard_normal(shape).astype(np.float32)
    state = (
        rng.standard_normal((2, 2, 2)).astype(np.float32),
        rng.standard_normal((2, 2, 4)).astype(np.float32),
    )
    y, (h, c) = cell(params, x, state)
    time_axis = 1 if batch_first else 0

    stream = Stream(cell, params, state)
    pieces = [np.asarray(stream(piece)) for piece in _pieces(x, batch_first, CHUNKS)]
    np.testing.assert_allclose(np.concatenate(pieces, axis=time_axis), np.asarray(y), atol=1e-5)
    np.testing.assert_allclose(np.asarray(stream.state[0]), np.asarray(h), atol=1e-5)
    np.testing.assert_allclose(np.asarray(stream.state[1]), np.asarray(c), atol=1e-5)
    assert stream.steps == sum(CHUNKS)

    stream.reset(state)
    steps = [np.asarray(stream(np.take(x, t, axis=time_axis))) for t in range(sum(CHUNKS))]
    assert steps[0].shape == (2, 2)
    np.testing.assert_allclose(np.stack(steps, axis=time_axis), np.asarray(y), atol=1e-5)


def test_a_stream_carries_state_between_calls():
    """Two streams fed the same second chunk differ when their first chunks differ:
    the state really is carried (a stream that restarted would agree)."""
    cell = lstm_multi.get_cell("numpy")(2, 3)
    params = cell.init(seed=0)
    rng = np.random.default_rng(1)
    first_a, first_b, second = (rng.standard_normal((1, 2, 2)).astype(np.float32) for _ in range(3))
    a, b = Stream(cell, params), Stream(cell, params)
    a(first_a)
    b(first_b)
    assert not np.allclose(a(second), b(second))


def test_torch_modules_stream_like_their_whole_sequence_call():
    torch = pytest.importorskip("torch")
    import lstm_multi.torch as lt

    torch.manual_seed(0)
    x = torch.randn(7, 2, 3)  # time-major, as nn.LSTM
    for module in (lt.LSTM(3, 4, num_layers=2, variant="peephole"), torch.nn.LSTM(3, 4)):
        module.eval()
        with torch.no_grad():
            y, (h, c) = module(x)
            stream = Stream(module)
            pieces = torch.cat([stream(piece) for piece in _pieces(x, False, CHUNKS)])
            torch.testing.assert_close(pieces, y)
            torch.testing.assert_close(stream.state[0], h)
            stream.reset()
            steps = torch.stack([stream(x[t]) for t in range(7)])
            torch.testing.assert_close(steps, y)


def test_bad_use_is_refused_by_name():
    cell = lstm_multi.get_cell("numpy")(2, 3)
    params = cell.init()
    with pytest.raises(TypeError, match="params"):
        Stream(cell)
    with pytest.raises(ValueError, match="bidirectional"):
        Stream(lstm_multi.get_cell("numpy")(2, 3, bidirectional=True), params)
    with pytest.raises(TypeError, match="network"):
        Stream(object())
    stream = Stream(cell, params)
    with pytest.raises(ValueError, match=r"x: expected one step \(B, 2\) or a chunk"):
        stream(np.zeros((1, 1, 1, 2), np.float32))
    with pytest.raises(TypeError, match="x: expected an array"):
        stream([[0.0, 0.0]])
    with pytest.raises(ValueError, match="at least one step"):
        stream(np.zeros((1, 0, 2), np.float32))
    stream(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="x: expected batch size 2.*reset"):
        stream(np.zeros((3, 2), np.float32))
    stream.reset()
    assert stream(np.zeros((3, 2), np.float32)).shape == (3, 3)
