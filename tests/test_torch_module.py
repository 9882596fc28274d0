"""``lstm_multi.torch.LSTM`` as a drop-in for ``torch.nn.LSTM``, and ``NaiveLSTM`` as its reference."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import assert_close  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from oracle import VARIANTS as ORACLE_VARIANTS  # noqa: E402
from reference import (  # noqa: E402
    Config,
    batch_layout,
    configs,
    make_problem,
    reference,
    run_lstm_module,
)
from test_agreement import assert_matches_reference  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import lstm_multi  # noqa: E402
from lstm_multi import spec  # noqa: E402
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
    hidden_size = draw(st.integers(1, 5))
    return {
        "input_size": draw(st.integers(1, 5)),
        "hidden_size": hidden_size,
        "num_layers": draw(st.integers(1, 3)),
        "bias": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
        "bidirectional": draw(st.booleans()),
        "proj_size": draw(st.sampled_from([0, *range(1, hidden_size)])),
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
    layers = config["num_layers"] * (1 + config["bidirectional"])
    h_width = config["proj_size"] or config["hidden_size"]
    hx = (
        (
            torch.randn(layers, batch, h_width, dtype=torch.float64),
            torch.randn(layers, batch, config["hidden_size"], dtype=torch.float64),
        )
        if with_state
        else None
    )
    got, want = run(module, x, hx), run(reference, x, hx)
    for name, a, b in zip(("output", "h_n", "c_n", "dx"), got[:4], want[:4], strict=True):
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
        ("data", "batch_sizes", "sorted_indices", "padded", "h_n", "c_n", "dx"),
        *outputs,
        strict=True,
    ):
        if a is None or b is None:
            assert a is None and b is None, name
        else:
            assert_close(a.detach(), b.detach(), "float64", name)


#: (variant, native): the native flag matters for "lstm" only
PATHS = [
    pytest.param(("lstm", True), id="lstm-native"),
    pytest.param(("lstm", False), id="lstm-generic"),
    pytest.param(("peephole", True), id="peephole"),
    pytest.param(("peephole_full", True), id="peephole_full"),
]


@pytest.mark.parametrize("path", PATHS)
@given(data=st.data())
def test_module_matches_oracle(path, data):
    """Every variant and path of the module against the README's equations, outputs and
    every gradient, with packed sequences for lengths."""
    variant, native = path
    config = data.draw(configs(variants=(variant,)))
    problem = make_problem(config)
    module = LSTM(
        config.input_size,
        config.hidden_size,
        config.num_layers,
        batch_first=config.batch_first,
        bidirectional=config.bidirectional,
        proj_size=config.proj_size,
        variant=variant,
        native=native,
        dtype=torch.float64,
    ).load_numpy_params(problem.params)
    assert_matches_reference(
        run_lstm_module(module, config, problem),
        reference(config, problem),
        "float64",
        f"oracle vs module/{variant}",
    )


@pytest.mark.parametrize("variant", ORACLE_VARIANTS)
def test_naive_module_matches_oracle(variant):
    """The article's readable per-gate-product form, on the spec's gate math, computes the
    README's equations for every variant (the oracle: independent of the spec)."""
    config = Config(variant, 4, 7, 3, 5, 1, False, True, False, True, 3)
    problem = make_problem(config)
    naive = NaiveLSTM(3, 5, variant=variant).double().load_numpy_params(problem.params[0][0])
    x = torch.tensor(batch_layout(config, problem.x), requires_grad=True)
    h0, c0 = (torch.tensor(a, requires_grad=True) for a in (problem.h0, problem.c0))
    y, (h_n, c_n) = naive(x, (h0, c0))
    loss = (
        (y.transpose(0, 1) * torch.tensor(problem.dy)).sum()
        + (h_n * torch.tensor(problem.dh_n)).sum()
        + (c_n * torch.tensor(problem.dc_n)).sum()
    )
    loss.backward()
    expected = reference(config, problem)
    assert_close(y.detach().transpose(0, 1), expected["y"], "float64", "y")
    assert_close(c_n.detach(), expected["c_n"], "float64", "c_n")
    assert_close(batch_layout(config, x.grad.numpy()), expected["dx"], "float64", "dx")
    assert_close(c0.grad, expected["dc0"], "float64", "dc0")
    h = 5
    for k, gate in enumerate("ifgo"):
        block = slice(k * h, (k + 1) * h)
        want = expected["grads"][0][0]
        U = getattr(naive, f"U_{gate}")  # U_g of "peephole_full" is unused: no gradient
        U_grad = torch.zeros_like(U) if U.grad is None else U.grad
        assert_close(U_grad, want["U"][:, block], "float64", f"U_{gate}")
        assert_close(getattr(naive, f"b_{gate}").grad, want["b"][block], "float64", f"b_{gate}")
    for name, rows in spec.get_variant(variant).params.items():
        for r, row in enumerate(rows):
            assert_close(
                getattr(naive, f"{name}_{row}").grad,
                expected["grads"][0][0][name][r],
                "float64",
                f"{name}_{row}",
            )


def _output_gate_reads_the_previous_cell(z, c_prev, p):
    """The peephole LSTM with o reading c_{t-1} instead of c_t: a changed spec."""
    i = lstm_multi.sigmoid(z.i + p.i * c_prev)
    f = lstm_multi.sigmoid(z.f + p.f * c_prev)
    c = f * c_prev + i * lstm_multi.tanh(z.g)
    o = lstm_multi.sigmoid(z.o + p.o * c_prev)
    return o * lstm_multi.tanh(c), c


def test_naive_module_follows_a_change_to_the_spec(monkeypatch):
    """NaiveLSTM states no gate equation of its own: a variant changed in the spec changes
    what it computes, exactly as it changes the fused module."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    before = NaiveLSTM(3, 5, variant="peephole").double()
    y_before = before(x)[0]
    builtin = spec._BUILTINS.pop("peephole")  # a deliberately changed spec
    try:
        changed = spec.Variant(
            "peephole", _output_gate_reads_the_previous_cell, params={"p": ("i", "f", "o")}
        )
    finally:
        spec._BUILTINS["peephole"] = builtin
    monkeypatch.setitem(spec.VARIANTS, "peephole", changed)
    after = NaiveLSTM(3, 5, variant="peephole").double()
    after.load_state_dict(before.state_dict())
    y_after = after(x)[0]
    assert not torch.allclose(y_after, y_before)
    # the fused module's array code: no C++ build of the changed variant (a second of the
    # compiler in a fresh cache; the kernels of a user's variant are test_kernel_cache's)
    fused = LSTM(3, 5, variant="peephole", batch_first=True, dtype=torch.float64, engine="array")
    with torch.no_grad():
        canonical = {
            "W": torch.cat([getattr(before, f"W_{k}") for k in "ifgo"], 1),
            "U": torch.cat([getattr(before, f"U_{k}") for k in "ifgo"], 1),
            "b": torch.cat([getattr(before, f"b_{k}") for k in "ifgo"]),
            "p": torch.stack([getattr(before, f"p_{k}") for k in "ifo"]),
        }
        fused.load_numpy_params([[canonical]])
    assert_close(fused(x)[0].detach(), y_after.detach(), "float64", "changed spec")


def oracle_params_of(state_dict, num_layers, num_directions):
    """The canonical parameters of an nn.LSTM state_dict read by hand for the oracle:
    W = weight_ih^T, U = weight_hh^T, b = bias_ih + bias_hh (float64 NumPy)."""
    state = {k: v.detach().double().numpy() for k, v in state_dict.items()}
    return [
        [
            {
                "W": state[f"weight_ih_{sfx}"].T,
                "U": state[f"weight_hh_{sfx}"].T,
                "b": state[f"bias_ih_{sfx}"] + state[f"bias_hh_{sfx}"],
            }
            for sfx in (f"l{layer}", f"l{layer}_reverse")[:num_directions]
        ]
        for layer in range(num_layers)
    ]


@pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])
def test_state_dict_of_nn_lstm_loads_strictly(native):
    """nn.LSTM's state_dict loads strictly, keys in its order, and the module then computes
    the oracle's LSTM on the parameters read from that state_dict."""
    import oracle

    reference = nn.LSTM(4, 6, num_layers=2, bidirectional=True, dtype=torch.float64)
    module = LSTM(4, 6, num_layers=2, bidirectional=True, dtype=torch.float64, native=native)
    module.load_state_dict(reference.state_dict())  # strict
    assert list(module.state_dict()) == list(reference.state_dict())
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    out, (h_n, c_n) = module(x)
    zeros = np.zeros((4, 3, 6))
    want = oracle.oracle(
        "lstm", oracle_params_of(reference.state_dict(), 2, 2), x.numpy(), zeros, zeros,
        None, np.zeros((5, 3, 12)), zeros, zeros,
    )  # fmt: skip
    for what, got in (("y", out), ("h_n", h_n), ("c_n", c_n)):
        assert_close(got.detach(), want[what], "float64", what)


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
    for (name, a), (_, b) in zip(
        module.state_dict().items(), back.state_dict().items(), strict=True
    ):
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
    """The native module and nn.LSTM, each run after the same seed, both equal the oracle
    run layer by layer with nn.LSTM's dropout applied by hand between the layers: the
    masks drawn from that seed as ATen's CPU dropout draws them (bernoulli(1 - p) on each
    layer's output but the last, kept entries scaled by 1 / (1 - p))."""
    import oracle

    torch.manual_seed(0)
    reference = nn.LSTM(3, 8, num_layers=3, dropout=0.5, dtype=torch.float64)
    module = LSTM.from_torch(reference)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    torch.manual_seed(1)
    masks = [torch.empty(4, 2, 8, dtype=torch.float64).bernoulli_(0.5) / 0.5 for _ in range(2)]
    layers = [
        [{k: torch.tensor(v) for k, v in p.items()} for p in layer]
        for layer in oracle_params_of(reference.state_dict(), 3, 1)
    ]
    zeros = torch.zeros(1, 8, dtype=torch.float64)
    want = []
    for n in range(2):
        layer_input = x[:, n]
        for layer, layer_params in enumerate(layers):
            if layer > 0:
                layer_input = layer_input * masks[layer - 1][:, n]
            layer_input, _, _ = oracle.run_sequence(
                "lstm", [layer_params], layer_input, zeros, zeros
            )
        want.append(layer_input)
    want = torch.stack(want, 1)
    for name, lstm in (("nn.LSTM", reference), ("module", module)):
        torch.manual_seed(1)
        assert_close(lstm(x)[0].detach(), want, "float64", name)


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


def test_proj_size_at_or_above_hidden_size_is_refused():
    with pytest.raises(ValueError, match="proj_size: expected 0 .* below hidden_size=4, got 4"):
        LSTM(3, 4, proj_size=4)
    with pytest.raises(TypeError, match="proj_size: expected an integer, got float"):
        LSTM(3, 4, proj_size=2.0)


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


def test_rates_take_numpy_numbers_as_nn_lstm_does_and_refuse_bools_and_tensors():
    """nn.LSTM takes ``dropout=np.float32(0.1)``; so do its drop-in and the regularizers,
    each rate stored as a Python float. A bool, NumPy's included, or a tensor is no rate."""
    rate = np.float32(0.25)
    module = LSTM(3, 4, num_layers=2, dropout=rate, zoneout=rate, recurrent_dropout=rate)
    assert module.dropout == torch.nn.LSTM(3, 4, num_layers=2, dropout=rate).dropout
    assert type(module.zoneout[0]) is float and module.zoneout == (0.25, 0.25)
    assert type(module.recurrent_dropout) is float
    for bad in (True, np.bool_(True), torch.tensor(0.1)):
        with pytest.raises((TypeError, ValueError), match="dropout: expected a number"):
            LSTM(3, 4, num_layers=2, dropout=bad)
        with pytest.raises(TypeError, match="zoneout: expected a number"):
            LSTM(3, 4, zoneout=bad)


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


# the variant a state_dict holds ------------------------------------------------------


def test_plain_state_dict_keys_are_nn_lstms_and_others_record_their_variant():
    assert list(LSTM(3, 4, num_layers=2).state_dict()) == list(nn.LSTM(3, 4, 2).state_dict())
    state = LSTM(3, 4, variant="peephole_full").state_dict()
    fingerprint = spec.VARIANTS["peephole_full"].fingerprint
    assert state["_extra_state"] == {"variant": "peephole_full", "fingerprint": fingerprint}


def test_nn_lstm_weights_do_not_load_silently_into_another_function():
    state = nn.LSTM(3, 4).state_dict()
    module = LSTM(3, 4, variant="peephole_full")
    with pytest.raises(RuntimeError, match=r"variant: this module computes the 'peephole_full'"):
        module.load_state_dict(state)
    module.load_state_dict(state, strict=False)  # asked for explicitly
    assert torch.equal(module.weight_hh_l0, state["weight_hh_l0"])


def test_a_variant_state_dict_does_not_load_into_another_variant():
    full = LSTM(3, 4, variant="peephole_full").state_dict()
    with pytest.raises(RuntimeError, match="_extra_state"):
        nn.LSTM(3, 4).load_state_dict(full)
    with pytest.raises(
        RuntimeError, match=r"variant: this module computes the 'lstm' .* 'peephole_full'"
    ):
        LSTM(3, 4).load_state_dict(full)
    with pytest.raises(RuntimeError, match="variant: this module computes the 'peephole'"):
        LSTM(3, 4, variant="peephole").load_state_dict(full, strict=True)
    LSTM(3, 4, variant="peephole_full").load_state_dict(full)  # its own kind loads


def test_inside_a_model_a_variant_mismatch_is_a_key_error():
    def model(variant):
        return nn.Sequential(nn.Linear(3, 3), LSTM(3, 4, variant=variant))

    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "1._extra_state"'):
        model("peephole_full").load_state_dict(model("lstm").state_dict())
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "1._extra_state"'):
        model("lstm").load_state_dict(model("peephole_full").state_dict())
    result = model("peephole_full").load_state_dict(model("lstm").state_dict(), strict=False)
    assert result.missing_keys == ["1._extra_state"]
    model("peephole_full").load_state_dict(model("peephole_full").state_dict())


def test_from_torch_refuses_a_variant_with_another_function():
    with pytest.raises(
        ValueError, match=r"variant: 'peephole_full' does not compute .* strict=False"
    ):
        LSTM.from_torch(nn.LSTM(3, 4), variant="peephole_full")
    module = LSTM.from_torch(nn.LSTM(3, 4), variant="peephole_full", strict=False)
    assert module.variant == "peephole_full"
    peephole = LSTM(3, 4, variant="peephole")
    with pytest.raises(ValueError, match="'lstm' does not compute the function of a 'peephole'"):
        LSTM.from_torch(peephole)
    assert LSTM.from_torch(peephole, variant="peephole").variant == "peephole"


# small input defects ------------------------------------------------------------------


def test_native_must_be_a_bool():
    with pytest.raises(TypeError, match="native: expected True or False, got 'no'"):
        LSTM(3, 4, native="no")


@pytest.mark.parametrize("variant", ["lstm", "peephole"])
def test_no_time_steps_is_a_clear_error(variant):
    with pytest.raises(
        ValueError, match=r"input: expected at least one time step .* got \(0, 2, 3\)"
    ):
        LSTM(3, 4, variant=variant)(torch.zeros(0, 2, 3))


@pytest.mark.parametrize("native", [True, False])
def test_unbatched_input_needs_unbatched_state(native):
    module = LSTM(3, 4, native=native)
    state = (torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))
    with pytest.raises(ValueError, match=r"hx h_0: expected shape \(1, 4\) for unbatched input"):
        module(torch.zeros(5, 3), state)
    with pytest.raises(ValueError, match=r"hx h_0: expected shape \(1, 2, 4\) for batched input"):
        module(torch.zeros(5, 2, 3), (torch.zeros(1, 4), torch.zeros(1, 4)))


@pytest.mark.parametrize("variant", ["lstm", "peephole"])
def test_jit_trace_gives_a_module_that_passes_its_own_check(variant):
    """torch.jit.trace records PyTorch's kernel ("lstm") or the spec's loop as plain ops
    (the compiled kernels are opaque to a trace, which would record constants): the
    trace passes its own check, equals the module at the traced length for other batch
    sizes, survives save/load, and another length raises (the loop is unrolled)."""
    import io
    import warnings

    from lstm_multi.torch import LSTM

    torch.manual_seed(0)
    module = LSTM(3, 4, num_layers=2, bidirectional=True, variant=variant)
    x = torch.randn(5, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, (x,))  # check_trace=True: its own sanity check
    for batch in (2, 6):
        x2 = torch.randn(5, batch, 3)
        (y, (h, c)), (y_want, (h_want, c_want)) = traced(x2), module(x2)
        for got, want in ((y, y_want), (h, h_want), (c, c_want)):
            torch.testing.assert_close(got, want)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(x)[0], module(x)[0])
    if variant != "lstm":
        with pytest.raises(Exception):  # noqa: B017 - TorchScript's own error type
            traced(torch.randn(7, 2, 3))


def test_whole_saved_model_loads_in_a_new_process_after_import_lstm_multi(tmp_path):
    """torch.save(module) then, in a fresh process, ``import torch, lstm_multi`` and
    torch.load with its default weights_only=True: the module comes back and runs."""
    import subprocess
    import sys

    from lstm_multi.torch import LSTM

    path = tmp_path / "model.pt"
    module = LSTM(3, 4, variant="peephole")
    torch.save(module, path)
    x = torch.randn(5, 2, 3)
    torch.save(module(x)[0].detach(), tmp_path / "y.pt")
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import torch, lstm_multi\n"
        f"m = torch.load({str(path)!r})\n"
        f"x, y = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'y.pt')!r})\n"
        "torch.testing.assert_close(m(x)[0], y)\n"
        "print(type(m).__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "lstm_multi.torch"
