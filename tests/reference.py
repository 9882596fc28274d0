"""The reference every backend is checked against: the PyTorch module in float64.

For the "lstm" variant the reference is ``torch.nn.LSTM`` itself (with packed
sequences when lengths are given); for the other variants it is
``lstm_multi.torch.LSTM`` on its generic path, itself checked against the
independent ``NaiveLSTM`` and the article's modules (test_torch_module.py,
test_article.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

import lstm_multi


@dataclass(frozen=True)
class Config:
    variant: str
    batch: int
    steps: int
    input_size: int
    hidden_size: int
    num_layers: int
    bidirectional: bool
    with_state: bool
    with_lengths: bool
    batch_first: bool
    seed: int

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    def cell(self, backend, **kwargs):
        Cell = lstm_multi.get_cell(backend)
        return Cell(
            self.input_size,
            self.hidden_size,
            variant=self.variant,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            batch_first=self.batch_first,
            **kwargs,
        )


@st.composite
def configs(draw, variants=tuple(lstm_multi.VARIANTS), max_layers=3):
    return Config(
        variant=draw(st.sampled_from(variants)),
        batch=draw(st.integers(1, 4)),
        steps=draw(st.integers(1, 6)),
        input_size=draw(st.integers(1, 5)),
        hidden_size=draw(st.integers(1, 5)),
        num_layers=draw(st.integers(1, max_layers)),
        bidirectional=draw(st.booleans()),
        with_state=draw(st.booleans()),
        with_lengths=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@dataclass
class Problem:
    """Float64 NumPy inputs of one config, time-major (T, B, ...)."""

    params: list
    x: np.ndarray
    h0: np.ndarray
    c0: np.ndarray
    lengths: np.ndarray | None
    dy: np.ndarray
    dh_n: np.ndarray
    dc_n: np.ndarray


def make_problem(config: Config) -> Problem:
    rng = np.random.default_rng(config.seed)
    cell = config.cell("numpy")
    params = cell.init(seed=config.seed, dtype="float64")
    # peepholes start like the rest, in U(-1/sqrt(H), 1/sqrt(H)); scale them up so they matter
    for layer in params:
        for p in layer:
            if "p" in p:
                p["p"] = p["p"] * 3
    state_shape = cell.state_shape(config.batch)
    t, b = config.steps, config.batch
    lengths = None
    if config.with_lengths:
        lengths = rng.integers(1, t + 1, size=b)
        lengths[rng.integers(0, b)] = t  # packing needs one full-length sequence
    return Problem(
        params=params,
        x=rng.standard_normal((t, b, config.input_size)),
        h0=0.5 * rng.standard_normal(state_shape),
        c0=0.5 * rng.standard_normal(state_shape),
        lengths=lengths,
        dy=rng.standard_normal((t, b, config.num_directions * config.hidden_size)),
        dh_n=rng.standard_normal(state_shape),
        dc_n=rng.standard_normal(state_shape),
    )


def batch_layout(config: Config, time_major):
    """Move the time axis first -> config's layout."""
    return np.swapaxes(time_major, 0, 1) if config.batch_first else time_major


def reference(config: Config, problem: Problem):
    """Outputs and gradients (float64 NumPy, time-major) from the PyTorch module."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from lstm_multi.torch import LSTM

    module = LSTM(
        config.input_size,
        config.hidden_size,
        config.num_layers,
        bidirectional=config.bidirectional,
        variant=config.variant,
        native=False,
        dtype=torch.float64,
    ).load_numpy_params(problem.params)
    if config.variant == "lstm":
        module = module.to_torch()
    x = torch.tensor(problem.x, requires_grad=True)
    h0 = torch.tensor(problem.h0 if config.with_state else 0 * problem.h0, requires_grad=True)
    c0 = torch.tensor(problem.c0 if config.with_state else 0 * problem.c0, requires_grad=True)
    if problem.lengths is None:
        y, (h_n, c_n) = module(x, (h0, c0))
    else:
        packed = pack_padded_sequence(x, torch.tensor(problem.lengths), enforce_sorted=False)
        y, (h_n, c_n) = module(packed, (h0, c0))
        y, _ = pad_packed_sequence(y, total_length=config.steps)
    loss = (
        (y * torch.tensor(problem.dy)).sum()
        + (h_n * torch.tensor(problem.dh_n)).sum()
        + (c_n * torch.tensor(problem.dc_n)).sum()
    )
    loss.backward()
    grads = []
    for layer in range(config.num_layers):
        directions = []
        for direction in range(config.num_directions):
            sfx = f"l{layer}{'_reverse' if direction else ''}"
            g = {
                "W": getattr(module, f"weight_ih_{sfx}").grad.T,
                "U": getattr(module, f"weight_hh_{sfx}").grad.T,
                "b": getattr(module, f"bias_ih_{sfx}").grad,
            }
            if config.variant == "peephole":
                g["p"] = getattr(module, f"weight_peephole_{sfx}").grad
            directions.append({k: v.detach().numpy() for k, v in g.items()})
        grads.append(directions)
    # "peephole_full" never reads h_{t-1}: h0 then has no gradient, which is zero
    h0_grad = torch.zeros_like(h0) if h0.grad is None else h0.grad
    as_np = [a.detach().numpy() for a in (y, h_n, c_n, x.grad, h0_grad, c0.grad)]
    return {
        "y": as_np[0],
        "h_n": as_np[1],
        "c_n": as_np[2],
        "grads": grads,
        "dx": as_np[3],
        "dh0": as_np[4],
        "dc0": as_np[5],
    }
