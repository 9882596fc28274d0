"""Test problems and the references every backend is checked against.

The reference is the independent oracle (``oracle.py``: the README's equations,
float64, one sequence at a time, no ``lstm_multi`` import), for every variant.
For "lstm", ``torch.nn.LSTM`` itself with packed sequences is a second
reference (``nn_lstm_reference``), loaded directly from the canonical
parameters without going through ``lstm_multi``.

Problems are drawn from the shapes of docs/model.md (``oracle.param_shapes``), not
from the library's initialiser, so a layout the library got wrong is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st
from oracle import oracle, param_shapes

import lstm_multi

#: the variants a test of framework machinery (not of the gate math) runs over: the
#: plain LSTM, a variant with its own parameter, and one with the c_{t-1} recurrence.
#: Tests of the math itself run over every variant (``VARIANTS``).
CORE_VARIANTS = ("lstm", "peephole", "peephole_full")
#: the built-in variants the one-thread-a-unit kernel emitters (CUDA C, Triton, Pallas)
#: write: all but those with row reductions (the layer-normalised ones, which the C++ CPU
#: kernels, the Triton kernels (tests/test_triton.py) and the array engines run;
#: tests/test_layernorm.py checks that the others refuse them by name)
KERNEL_VARIANTS = tuple(
    sorted(n for n, v in lstm_multi.spec.VARIANTS.items() if v.programs.kernel_refusal() is None)
)


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
    proj_size: int = 0

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    @property
    def output_size(self):
        """The width of h: P with a projection, else H."""
        return self.proj_size or self.hidden_size

    def state_shape(self):
        """The shape of c (and of h without a projection)."""
        return (self.num_layers * self.num_directions, self.batch, self.hidden_size)

    def h_shape(self):
        return (self.num_layers * self.num_directions, self.batch, self.output_size)

    def cell(self, backend, **kwargs):
        Cell = lstm_multi.get_cell(backend)
        return Cell(
            self.input_size,
            self.hidden_size,
            variant=self.variant,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            batch_first=self.batch_first,
            **({"proj_size": self.proj_size} if self.proj_size else {}),
            **kwargs,
        )


@st.composite
def configs(draw, variants=CORE_VARIANTS, max_layers=3, projections=True):
    """Problem configurations; with ``projections`` a third of them project h to
    a width P in 1..H-1 (proj_size)."""
    hidden_size = draw(st.integers(1, 5))
    proj_size = 0
    if projections and hidden_size > 1 and draw(st.integers(0, 2)) == 0:
        proj_size = draw(st.integers(1, hidden_size - 1))
    return Config(
        variant=draw(st.sampled_from(variants)),
        batch=draw(st.integers(1, 4)),
        steps=draw(st.integers(1, 6)),
        input_size=draw(st.integers(1, 5)),
        hidden_size=hidden_size,
        proj_size=proj_size,
        num_layers=draw(st.integers(1, max_layers)),
        bidirectional=draw(st.booleans()),
        with_state=draw(st.booleans()),
        with_lengths=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@dataclass
class Problem:
    """Float64 NumPy inputs of one config, time-major (T, B, ...).

    h0, c0 are zeros when the config has no state (the cell is then called
    with ``state=None``).
    """

    params: list
    x: np.ndarray
    h0: np.ndarray
    c0: np.ndarray
    lengths: np.ndarray | None
    dy: np.ndarray
    dh_n: np.ndarray
    dc_n: np.ndarray


def random_params(rng, config: Config):
    """Canonical float64 parameters from U(-1/sqrt(H), 1/sqrt(H)); peepholes 3x wider
    so that they matter."""
    bound = 1 / np.sqrt(config.hidden_size)
    shapes = param_shapes(
        config.variant,
        config.input_size,
        config.hidden_size,
        config.num_layers,
        config.num_directions,
        config.proj_size,
    )
    return [
        [
            {
                k: rng.uniform(-bound, bound, shape) * (3 if k == "p" else 1)
                for k, shape in p.items()
            }
            for p in layer
        ]
        for layer in shapes
    ]


def make_problem(config: Config) -> Problem:
    rng = np.random.default_rng(config.seed)
    c_shape, h_shape = config.state_shape(), config.h_shape()
    t, b = config.steps, config.batch
    lengths = rng.integers(1, t + 1, size=b) if config.with_lengths else None
    h0, c0 = 0.5 * rng.standard_normal(h_shape), 0.5 * rng.standard_normal(c_shape)
    if not config.with_state:
        h0, c0 = np.zeros(h_shape), np.zeros(c_shape)
    return Problem(
        params=random_params(rng, config),
        x=rng.standard_normal((t, b, config.input_size)),
        h0=h0,
        c0=c0,
        lengths=lengths,
        dy=rng.standard_normal((t, b, config.num_directions * config.output_size)),
        dh_n=rng.standard_normal(h_shape),
        dc_n=rng.standard_normal(c_shape),
    )


def batch_layout(config: Config, time_major):
    """Move the time axis first -> config's layout."""
    return np.swapaxes(time_major, 0, 1) if config.batch_first else time_major


def reference(config: Config, problem: Problem):
    """Outputs and gradients (float64 NumPy, time-major) from the oracle."""
    p = problem
    return oracle(config.variant, p.params, p.x, p.h0, p.c0, p.lengths, p.dy, p.dh_n, p.dc_n)


def nn_lstm_reference(config: Config, problem: Problem):
    """The same from ``torch.nn.LSTM`` (packed sequences when there are lengths); "lstm" only.

    nn.LSTM's weights are the canonical ones transposed (weight_ih = W^T,
    weight_hh = U^T), its two biases b and 0.
    """
    import torch

    assert config.variant == "lstm"
    module = torch.nn.LSTM(
        config.input_size,
        config.hidden_size,
        config.num_layers,
        batch_first=config.batch_first,
        bidirectional=config.bidirectional,
        proj_size=config.proj_size,
        dtype=torch.float64,
    )
    with torch.no_grad():
        for layer, layer_params in enumerate(problem.params):
            for direction, p in enumerate(layer_params):
                sfx = f"l{layer}{'_reverse' if direction else ''}"
                getattr(module, f"weight_ih_{sfx}").copy_(torch.tensor(p["W"].T))
                getattr(module, f"weight_hh_{sfx}").copy_(torch.tensor(p["U"].T))
                getattr(module, f"bias_ih_{sfx}").copy_(torch.tensor(p["b"]))
                getattr(module, f"bias_hh_{sfx}").zero_()
                if config.proj_size:
                    getattr(module, f"weight_hr_{sfx}").copy_(torch.tensor(p["W_hr"].T))
    return run_lstm_module(module, config, problem)


def run_lstm_module(module, config: Config, problem: Problem):
    """An nn.LSTM-like module (``batch_first`` as the config's) on a problem, packed
    sequences for lengths, the state (zeros without one) always passed; outputs and
    gradients as the oracle gives them (float64 NumPy, time-major, canonical)."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    x = torch.tensor(batch_layout(config, problem.x), requires_grad=True)
    h0 = torch.tensor(problem.h0, requires_grad=True)
    c0 = torch.tensor(problem.c0, requires_grad=True)
    if problem.lengths is None:
        out, (h_n, c_n) = module(x, (h0, c0))
        y = out.transpose(0, 1) if config.batch_first else out
    else:
        packed = pack_padded_sequence(
            x, torch.tensor(problem.lengths), batch_first=config.batch_first, enforce_sorted=False
        )
        out, (h_n, c_n) = module(packed, (h0, c0))
        y, _ = pad_packed_sequence(out, total_length=config.steps)
    loss = (
        (y * torch.tensor(problem.dy)).sum()
        + (h_n * torch.tensor(problem.dh_n)).sum()
        + (c_n * torch.tensor(problem.dc_n)).sum()
    )
    loss.backward()
    as_np = [a.detach().numpy() for a in (y, h_n, c_n, h0.grad, c0.grad)]
    result = dict(zip(("y", "h_n", "c_n", "dh0", "dc0"), as_np, strict=True))
    result["dx"] = batch_layout(config, x.grad.numpy())
    result["grads"] = canonical_grads(module, config)
    return result


def canonical_grads(module, config: Config):
    """The gradients of an nn.LSTM-like module's parameters in the canonical layout
    (dW = weight_ih.grad^T, dU = weight_hh.grad^T, db = bias_ih.grad, dp = the
    peephole weights' gradient), as NumPy."""
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
            if hasattr(module, f"weight_peephole_{sfx}"):
                g["p"] = getattr(module, f"weight_peephole_{sfx}").grad
            if getattr(module, "proj_size", 0):
                g["W_hr"] = getattr(module, f"weight_hr_{sfx}").grad.T
            directions.append({k: v.detach().numpy() for k, v in g.items()})
        grads.append(directions)
    return grads
