"""``lstm_multi.torch.LSTM`` as a drop-in for ``torch.nn.LSTM``, and ``NaiveLSTM`` as its reference."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from conftest import assert_close  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

from lstm_multi.torch import LSTM, NaiveLSTM  # noqa: E402


def grads_of(module):
    return {
        name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for name, p in module.named_parameters()
    }


def run(module, x, hx, dy_seed=1):
    """Forward, then backward of a fixed random projection of every output."""
    for p in module.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    out, (h_n, c_n) = (
        module(x, hx) if not isinstance(x, torch.nn.utils.rnn.PackedSequence) else module(x, hx)
    )
    gen = torch.Generator().manual_seed(dy_seed)
    loss = sum(
        (t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in (out, h_n, c_n)
    )
    loss.backward()
    return out.detach(), h_n.detach(), c_n.detach(), x.grad, grads_of(module)


@st.composite
def module_configs(draw):
    return {
        "input_size": draw(st.integers(1, 5)),
        "hidden_size": draw(st.integers(1, 5)),
        "num_layers": draw(st.integers(1, 3)),
        "bias": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
        "bidirectional": draw(st.booleans()),
    }


@pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])
@given(
    config=module_configs(),
    batch=st.integers(1, 4),
    steps=st.integers(1, 6),
    with_state=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_plain_variant_equals_nn_lstm(native, config, batch, steps, with_state, seed):
    torch.manual_seed(seed)
    reference = nn.LSTM(**config, dtype=torch.float64)
    module = LSTM.from_torch(reference, native=native)
    shape = (batch, steps) if config["batch_first"] else (steps, batch)
    x = torch.randn(*shape, config["input_size"], dtype=torch.float64)
    state_shape = (
        config["num_layers"] * (1 + config["bidirectional"]),
        batch,
        config["hidden_size"],
    )
    hx = (
        (
            torch.randn(state_shape, dtype=torch.float64),
            torch.randn(state_shape, dtype=torch.float64),
        )
        if with_state
        else None
    )
    got, want = run(module, x, hx), run(reference, x, hx)
    for name, a, b in zip(("output", "h_n", "c_n", "dx"), got[:4], want[:4]):
        assert_close(a, b, "float64", name)
    assert got[4].keys() == want[4].keys()
    for name in want[4]:
        assert_close(got[4][name], want[4][name], "float64", f"grad {name}")


@pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])
@given(
    config=module_configs(),
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    enforce_sorted=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_packed_sequences_equal_nn_lstm(native, config, lengths, enforce_sorted, seed):
    torch.manual_seed(seed)
    reference = nn.LSTM(**config, dtype=torch.float64)
    module = LSTM.from_torch(reference, native=native)
    lengths = torch.tensor(sorted(lengths, reverse=True) if enforce_sorted else lengths)
    x = torch.randn(int(lengths.max()), len(lengths), config["input_size"], dtype=torch.float64)
    if config["batch_first"]:
        x = x.transpose(0, 1)
    outputs = []
    for m in (module, reference):
        xr = x.detach().requires_grad_(True)
        packed = pack_padded_sequence(
            xr, lengths, batch_first=config["batch_first"], enforce_sorted=enforce_sorted
        )
        out, (h_n, c_n) = m(packed)
        assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
        padded, _ = pad_packed_sequence(out, batch_first=config["batch_first"])
        (padded.square().sum() + h_n.sin().sum() + c_n.cos().sum()).backward()
        outputs.append((out.data, out.batch_sizes, out.sorted_indices, padded, h_n, c_n, xr.grad))
    for name, a, b in zip(
        ("data", "batch_sizes", "sorted_indices", "padded", "h_n", "c_n", "dx"), *outputs
    ):
        if a is None or b is None:
            assert a is None and b is None, name
        else:
            assert_close(a.detach(), b.detach(), "float64", name)


@pytest.mark.parametrize("variant", ["lstm", "peephole", "peephole_full"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])
def test_naive_module_equals_fused(variant, native):
    """The article's readable 8-matmul form equals the fused module, outputs and gradients."""
    torch.manual_seed(0)
    fused = LSTM(3, 5, batch_first=True, variant=variant, native=native, dtype=torch.float64)
    if variant == "peephole":
        with torch.no_grad():
            fused.weight_peephole_l0.mul_(4)  # large enough to matter
    naive = (
        NaiveLSTM(3, 5, variant=variant).double().load_numpy_params(fused.to_numpy_params()[0][0])
    )
    x = torch.randn(4, 7, 3, dtype=torch.float64)
    hx = (torch.randn(1, 4, 5, dtype=torch.float64), torch.randn(1, 4, 5, dtype=torch.float64))
    got, want = run(fused, x, hx), run(naive, x, hx)
    for name, a, b in zip(("output", "h_n", "c_n", "dx"), got[:4], want[:4]):
        assert_close(a, b, "float64", name)
    h = 5
    for k, gate in enumerate("ifgo"):
        block = slice(k * h, (k + 1) * h)
        assert_close(got[4]["weight_ih_l0"][block].T, want[4][f"W_{gate}"], "float64", f"W_{gate}")
        assert_close(got[4]["weight_hh_l0"][block].T, want[4][f"U_{gate}"], "float64", f"U_{gate}")
        assert_close(got[4]["bias_ih_l0"][block], want[4][f"b_{gate}"], "float64", f"b_{gate}")
    if variant == "peephole":
        for row, gate in enumerate("ifo"):
            assert_close(
                got[4]["weight_peephole_l0"][row], want[4][f"p_{gate}"], "float64", f"p_{gate}"
            )
    if variant == "peephole_full":  # the g block of U is unused: its gradient is zero
        assert torch.all(got[4]["weight_hh_l0"][2 * h : 3 * h] == 0)


def test_state_dict_of_nn_lstm_loads_strictly():
    reference = nn.LSTM(4, 6, num_layers=2, bidirectional=True)
    module = LSTM(4, 6, num_layers=2, bidirectional=True)
    module.load_state_dict(reference.state_dict())  # strict
    assert list(module.state_dict()) == list(reference.state_dict())
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(module(x)[0], reference(x)[0])


def test_peephole_state_dict_adds_its_own_keys():
    keys = list(LSTM(4, 6, bidirectional=True, variant="peephole").state_dict())
    assert "weight_peephole_l0" in keys and "weight_peephole_l0_reverse" in keys
    assert LSTM(4, 6, variant="peephole").weight_peephole_l0.shape == (3, 6)


def test_to_torch_round_trip():
    module = LSTM(3, 4, num_layers=2, bias=False, batch_first=True, dropout=0.25)
    lstm = module.to_torch()
    assert isinstance(lstm, nn.LSTM)
    assert (lstm.num_layers, lstm.bias, lstm.batch_first, lstm.dropout) == (2, False, True, 0.25)
    back = LSTM.from_torch(lstm)
    for (name, a), (_, b) in zip(module.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


def test_from_torch_peephole_starts_equal_to_plain():
    """Zero peepholes: a peephole module made from nn.LSTM computes what nn.LSTM does."""
    torch.manual_seed(0)
    reference = nn.LSTM(3, 4, dtype=torch.float64)
    module = LSTM.from_torch(reference, variant="peephole")
    assert torch.all(module.weight_peephole_l0 == 0)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    assert_close(module(x)[0].detach(), reference(x)[0].detach(), "float64", "output")


def test_unbatched_input_matches_nn_lstm():
    torch.manual_seed(0)
    reference = nn.LSTM(3, 4, num_layers=2, dtype=torch.float64)
    for native in (True, False):
        module = LSTM.from_torch(reference, native=native)
        x = torch.randn(5, 3, dtype=torch.float64)
        hx = (torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
        out, (h, c) = module(x, hx)
        want, (wh, wc) = reference(x, hx)
        assert out.shape == (5, 4) and h.shape == (2, 4)
        assert_close(out.detach(), want.detach(), "float64", "output")
        assert_close(c.detach(), wc.detach(), "float64", "c_n")


def test_defaults_match_nn_lstm():
    module, reference = LSTM(3, 4), nn.LSTM(3, 4)
    for attr in ("num_layers", "bias", "batch_first", "dropout", "bidirectional", "proj_size"):
        assert getattr(module, attr) == getattr(reference, attr), attr
    assert module.variant == "lstm"


def test_initialisation_bounds():
    module = LSTM(3, 16, variant="peephole")
    for name, p in module.named_parameters():
        assert p.abs().max() <= 0.25 + 1e-7, name
        assert p.abs().max() > 0.1, name


@pytest.mark.parametrize("variant", ["lstm", "peephole", "peephole_full"])
def test_dropout_between_layers(variant):
    torch.manual_seed(0)
    module = LSTM(3, 8, num_layers=2, dropout=0.5, variant=variant, native=False)
    x = torch.randn(4, 2, 3)
    module.eval()
    a, b = module(x)[0], module(x)[0]
    torch.testing.assert_close(a, b)  # no dropout in eval mode
    module.train()
    assert not torch.allclose(module(x)[0], a)


def test_native_dropout_matches_nn_lstm_under_same_seed():
    torch.manual_seed(0)
    reference = nn.LSTM(3, 8, num_layers=3, dropout=0.5)
    module = LSTM.from_torch(reference)
    x = torch.randn(4, 2, 3)
    torch.manual_seed(1)
    want = reference(x)[0]
    torch.manual_seed(1)
    torch.testing.assert_close(module(x)[0], want)


def test_dropout_with_one_layer_warns_like_nn_lstm():
    with pytest.warns(UserWarning, match="dropout"):
        LSTM(3, 4, dropout=0.5)


@pytest.mark.parametrize("variant", ["lstm", "peephole", "peephole_full"])
def test_trains_with_an_optimizer(variant):
    """Parameters receive gradients and a few Adam steps lower a regression loss."""
    torch.manual_seed(0)
    module = LSTM(2, 8, batch_first=True, variant=variant, native=False)
    head = nn.Linear(8, 1)
    opt = torch.optim.Adam([*module.parameters(), *head.parameters()], lr=0.02)
    x = torch.randn(16, 10, 2)
    target = x[:, :, 0].sum(1, keepdim=True) / 3
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = (head(module(x)[0][:, -1]) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# bad input -----------------------------------------------------------------------


def test_proj_size_is_refused():
    with pytest.raises(NotImplementedError, match="proj_size: .*expected 0, got 3"):
        LSTM(3, 4, proj_size=3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_size": 0}, "input_size: expected a positive integer, got 0"),
        ({"hidden_size": 2.5}, "hidden_size: expected a positive integer, got 2.5"),
        ({"num_layers": -1}, "num_layers: expected a positive integer, got -1"),
        ({"dropout": 1.5}, r"dropout: expected a number in \[0, 1\], got 1.5"),
        ({"variant": "gru"}, "variant: expected one of .*'lstm'.*got 'gru'"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = {"input_size": 3, "hidden_size": 4, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        LSTM(**args)


def test_bad_bool_argument():
    with pytest.raises(TypeError, match="bidirectional: expected True or False, got 1"):
        LSTM(3, 4, bidirectional=1)


def test_bad_forward_inputs():
    module = LSTM(3, 4, num_layers=2)
    with pytest.raises(
        ValueError,
        match=r"input: expected a 2-D \(unbatched\) or 3-D tensor, got shape \(1, 2, 3, 3\)",
    ):
        module(torch.zeros(1, 2, 3, 3))
    with pytest.raises(
        ValueError,
        match=r"input: expected input_size 3 on the last axis \(time, batch, input_size\), got shape \(5, 2, 7\)",
    ):
        module(torch.zeros(5, 2, 7))
    with pytest.raises(TypeError, match="input: expected dtype torch.float32 .*got torch.float64"):
        module(torch.zeros(5, 2, 3, dtype=torch.float64))
    with pytest.raises(
        ValueError, match=r"hx h_0: expected shape \(2, 2, 4\) for batched input, got \(1, 2, 4\)"
    ):
        module(torch.zeros(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(2, 2, 4)))
    with pytest.raises(TypeError, match="hx: expected a pair"):
        module(torch.zeros(5, 2, 3), torch.zeros(2, 2, 4))
    with pytest.raises(TypeError, match="hx c_0: expected dtype torch.float32"):
        module(
            torch.zeros(5, 2, 3), (torch.zeros(2, 2, 4), torch.zeros(2, 2, 4, dtype=torch.float64))
        )


def test_to_torch_refuses_peephole():
    with pytest.raises(ValueError, match="variant: torch.nn.LSTM can only hold the 'lstm' variant"):
        LSTM(3, 4, variant="peephole").to_torch()


def test_from_torch_refuses_other_modules():
    with pytest.raises(TypeError, match="lstm: expected a torch.nn.LSTM, got GRU"):
        LSTM.from_torch(nn.GRU(3, 4))
