"""Streaming inference: a trained network fed one step, or one chunk, at a time.

A stream holds the recurrent state ``(h, c)`` between calls, so that feeding a
sequence x (B, T, F) in pieces x[:, 0:t1], x[:, t1:t2], ... (or one step x[:, t]
(B, F) at a time) gives the outputs and final state of the whole-sequence call::

    y_k, (h_k, c_k) = network(x_k, (h_{k-1}, c_{k-1}))      chunk k, state carried
    concat(y_1, ..., y_K) == network(x)[0]                  to rounding (tested)

It wraps either a functional cell with its parameters (``Stream(cell, params)``,
any backend: NumPy, torch, JAX, CuPy) or a module called as
``module(x, hx) -> y, (h, c)`` (``Stream(lstm_multi.torch.LSTM(...))`` or a plain
``torch.nn.LSTM``: the same wrapper times the two against each other).

Shapes follow the wrapped network's layout: a chunk is (B, t, F) when it is
batch-first and (t, B, F) when it is time-major; a single step is (B, F) either
way, and its output is (B, D * H) (P with a projection). The batch size is fixed by
the first call until ``reset``. A bidirectional network cannot stream: its reverse
direction reads the future, so the constructor refuses it.

The stream runs what the network runs: a torch module in training mode applies its
dropout, so call ``module.eval()`` first; gradients are recorded if the framework
records them (wrap calls in ``torch.inference_mode()`` to serve).
"""

from __future__ import annotations

from typing import Any


class Stream:
    """Carry ``(h, c)`` across calls of a network on consecutive pieces of a sequence.

    Arguments:
        network: a functional cell (``lstm_multi.get_cell(backend)(...)``) or a
            module called as ``module(x, hx)`` returning ``y, (h, c)`` (an
            ``lstm_multi.torch.LSTM`` or a ``torch.nn.LSTM``).
        params: the cell's parameters; required with a cell, refused with a module
            (a module holds its own).
        state: the initial ``(h, c)`` ((L, B, H) each, P for h with a projection), or
            None for zeros.

    ``stream(x)`` returns the outputs of the piece x: y (B, t, D * H) for a chunk
    in the network's layout, (B, D * H) for one step (B, F). ``stream.state`` is
    the state after the last piece, ``stream.steps`` how many steps it has read,
    and ``stream.reset()`` starts a new sequence.
    """

    def __init__(self, network: Any, params: Any = None, state: tuple[Any, Any] | None = None):
        self._is_cell = hasattr(network, "param_shapes") and hasattr(network, "vjp")
        if not self._is_cell and not callable(network):
            raise TypeError(
                "network: expected a functional cell or a module called as "
                f"module(x, hx), got {type(network).__name__}"
            )
        if self._is_cell and params is None:
            raise TypeError("params: a stream over a functional cell needs its parameters")
        if not self._is_cell and params is not None:
            raise TypeError(
                f"params: a module holds its own parameters; got params with "
                f"{type(network).__name__}"
            )
        for name in ("batch_first", "bidirectional", "input_size"):
            if not hasattr(network, name):
                raise TypeError(
                    f"network: expected an LSTM with a {name!r} attribute, got "
                    f"{type(network).__name__}"
                )
        if network.bidirectional:
            raise ValueError(
                "network: a bidirectional network cannot stream (its reverse direction "
                "reads the future); run it on whole sequences"
            )
        self.network = network
        self.params = params
        self._initial = state
        self.reset(state)

    def reset(self, state: tuple[Any, Any] | None = None) -> None:
        """Start a new sequence from ``state`` (None: zeros); the batch size is free again."""
        self.state = state
        self.steps = 0

    def __call__(self, x: Any) -> Any:
        shape = getattr(x, "shape", None)
        if shape is None or not hasattr(x, "dtype"):
            raise TypeError(f"x: expected an array, got {type(x).__name__}")
        single_step = len(shape) == 2
        if len(shape) not in (2, 3):
            layout = "(B, t, F)" if self.network.batch_first else "(t, B, F)"
            raise ValueError(
                f"x: expected one step (B, {self.network.input_size}) or a chunk {layout}, "
                f"got shape {tuple(shape)}"
            )
        if single_step:  # (B, F) -> a chunk of one step in the network's layout
            x = x[:, None] if self.network.batch_first else x[None]
        steps = x.shape[1] if self.network.batch_first else x.shape[0]
        if steps == 0:
            raise ValueError(f"x: expected at least one step, got shape {tuple(shape)}")
        batch = x.shape[0] if self.network.batch_first else x.shape[1]
        if self.state is not None and self.state[0].shape[1] != batch:
            raise ValueError(
                f"x: expected batch size {self.state[0].shape[1]}, the stream's, got {batch} "
                "(call reset() to start streams of another batch size)"
            )
        if self._is_cell:
            y, state = self.network(self.params, x, self.state)
        else:
            y, state = self.network(x, self.state)
        self.state = tuple(state)
        self.steps += steps
        if single_step:
            return y[:, 0] if self.network.batch_first else y[0]
        return y

    def __repr__(self):
        return f"Stream({self.network!r}, steps={self.steps})"
