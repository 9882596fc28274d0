"""A variant is known by what it computes, not by its name (issue 22, items 1).

``Variant.fingerprint`` hashes the traced gate math, the parameters, the recurrence and
``extends_lstm``: the same math written another way (or named otherwise) is the built-in,
any change is another variant. A Variant bearing a built-in's name must compute it;
PyTorch's own kernel, the torch module's state_dict checks and ``from_torch`` /
``to_torch`` decide by fingerprint.
"""

from __future__ import annotations

import numpy as np
import pytest
from oracle import oracle

from lstm_multi import Variant, sigmoid, spec, tanh


def _lstm_rewritten(z, c_prev):
    """The built-in "lstm", written in another order, with the commutative operands swapped."""
    o = sigmoid(z.o)
    g = tanh(z.g)
    f = sigmoid(z.f)
    i = sigmoid(z.i)
    c = g * i + c_prev * f
    return tanh(c) * o, c


def _peephole_rewritten(z, c_prev, p):
    g = tanh(z.g)
    f = sigmoid(c_prev * p.f + z.f)
    i = sigmoid(p.i * c_prev + z.i)
    c = i * g + f * c_prev
    return tanh(c) * sigmoid(c * p.o + z.o), c


def _lstm_scaled(z, c_prev):
    """Not "lstm": its output differs by a factor one ulp above 1."""
    i, f, g, o = sigmoid(z.i), sigmoid(z.f), tanh(z.g), sigmoid(z.o)
    c = f * c_prev + i * g
    return o * tanh(c) * 1.0000000000000002, c


def _lstm_tanh_output_gate(z, c_prev):
    """Not "lstm": the output gate is a tanh (what the audit's user variant computed)."""
    i, f, g, o = sigmoid(z.i), sigmoid(z.f), tanh(z.g), tanh(z.o)
    c = f * c_prev + i * g
    return o * tanh(c), c


def _peephole_no_output_peephole(z, c_prev, p):
    """Not "peephole": the same parameter layout, p.o unused."""
    i = sigmoid(z.i + p.i * c_prev)
    f = sigmoid(z.f + p.f * c_prev)
    c = f * c_prev + i * tanh(z.g)
    return sigmoid(z.o) * tanh(c), c


PEEPHOLES = {"p": ("i", "f", "o")}


# the fingerprint -----------------------------------------------------------------------


def test_the_same_math_under_another_name_has_the_builtins_fingerprint():
    mine = Variant("mylstm", _lstm_rewritten, extends_lstm=True)
    assert mine.fingerprint == spec.VARIANTS["lstm"].fingerprint
    assert spec.computes_lstm(mine) and spec.builtin_name(mine) == "lstm"
    peep = Variant("mypeep", _peephole_rewritten, params=PEEPHOLES, extends_lstm=True)
    assert peep.fingerprint == spec.VARIANTS["peephole"].fingerprint
    assert spec.builtin_name(peep) == "peephole" and not spec.computes_lstm(peep)


def test_any_change_in_what_is_computed_changes_the_fingerprint():
    lstm = spec.VARIANTS["lstm"]
    others = [
        Variant("scaled", _lstm_scaled, extends_lstm=True),
        Variant("tanh_o", _lstm_tanh_output_gate, extends_lstm=True),
        Variant("undeclared", _lstm_rewritten),  # extends_lstm differs
        Variant("reads_c", _lstm_rewritten, extends_lstm=True, recurrent_state="c"),
        Variant("masked", _lstm_rewritten, extends_lstm=True, unused_recurrent_gates=("g",)),
        Variant("unused_param", _lstm_rewritten_with_p, params={"p": ("i",)}, extends_lstm=True),
    ]
    peephole = spec.VARIANTS["peephole"]
    others += [
        Variant("rows_swapped", _peephole, params={"p": ("f", "i", "o")}, extends_lstm=True),
        Variant("renamed_param", _peephole_q, params={"q": ("i", "f", "o")}, extends_lstm=True),
        Variant("no_p_o", _peephole_no_output_peephole, params=PEEPHOLES, extends_lstm=True),
    ]
    prints = [v.fingerprint for v in (*spec.VARIANTS.values(), *others)]
    assert len(set(prints)) == len(prints)
    assert all(isinstance(p, str) and len(p) == 64 and int(p, 16) >= 0 for p in prints)
    assert lstm.fingerprint not in [v.fingerprint for v in others]
    assert peephole.fingerprint not in [v.fingerprint for v in others]


def _lstm_rewritten_with_p(z, c_prev, p):
    return _lstm_rewritten(z, c_prev)


def _peephole(z, c_prev, p):
    return _peephole_rewritten(z, c_prev, p)


def _peephole_q(z, c_prev, q):
    return _peephole_rewritten(z, c_prev, q)


def test_the_fingerprint_survives_pickling():
    import pickle

    mine = Variant("mylstm", _lstm_rewritten, extends_lstm=True)
    again = pickle.loads(pickle.dumps(mine))
    assert again.fingerprint == mine.fingerprint == spec.VARIANTS["lstm"].fingerprint


# a built-in's name ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, forward, kwargs, differs",
    [
        ("lstm", _lstm_tanh_output_gate, {"extends_lstm": True}, "gate math"),
        ("lstm", _lstm_scaled, {"extends_lstm": True}, "gate math"),
        ("np", _lstm_tanh_output_gate, {"extends_lstm": True}, "gate math"),
        ("lstm", _lstm_rewritten, {}, "extends_lstm"),
        (
            "peephole",
            _peephole_no_output_peephole,
            {"params": PEEPHOLES, "extends_lstm": True},
            "gate math",
        ),
        ("vanilla", _peephole_rewritten, {"params": {"p": ("i", "f", "o")}}, "extends_lstm"),
        ("cifg", _lstm_rewritten, {}, "params"),
    ],
)
def test_a_builtins_name_with_other_math_is_refused(name, forward, kwargs, differs):
    with pytest.raises(ValueError, match=rf"name: '{name}' is the name of the built-in.*{differs}"):
        Variant(name, forward, **kwargs)


def test_a_builtins_name_with_its_exact_math_is_that_builtin():
    mine = Variant("lstm", _lstm_rewritten, extends_lstm=True)
    assert mine.fingerprint == spec.VARIANTS["lstm"].fingerprint
    peep = Variant("peephole", _peephole_rewritten, params=PEEPHOLES, extends_lstm=True)
    assert peep.fingerprint == spec.VARIANTS["peephole"].fingerprint
    assert spec.is_registered(mine) and spec.is_registered(peep)


# PyTorch ---------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
from lstm_multi import torch as lm_torch  # noqa: E402
from lstm_multi.backends import torch_native  # noqa: E402

IN, H, B, T = 3, 4, 2, 5


def _oracle_y(variant_name, module, x):
    """The oracle's float64 y (T, B, D*H) for ``module``'s canonical parameters."""
    params = module.to_numpy_params()
    layers = module.num_layers * module.num_directions
    h0 = np.zeros((layers, x.shape[1], H))
    dy = np.zeros((x.shape[0], x.shape[1], module.num_directions * H))
    out = oracle(variant_name, params, x, h0, h0, None, dy, h0, h0)
    return out["y"]


def test_torch_native_is_decided_by_fingerprint_not_by_name():
    mine = Variant("mylstm", _lstm_rewritten, extends_lstm=True)
    assert torch_native.supports(spec.VARIANTS["lstm"]) and torch_native.supports(mine)
    assert not torch_native.supports(Variant("custom", _lstm_tanh_output_gate, extends_lstm=True))
    torch.manual_seed(0)
    module = lm_torch.LSTM(IN, H, num_layers=2, variant=mine, dtype=torch.float64)
    assert module.runs_native
    x = np.random.default_rng(1).standard_normal((T, B, IN))
    y, _ = module(torch.tensor(x))
    np.testing.assert_allclose(y.detach().numpy(), _oracle_y("lstm", module, x), atol=1e-10)


def test_a_user_variant_runs_its_own_math_on_torch():
    custom = Variant("custom", _lstm_tanh_output_gate, extends_lstm=True)
    torch.manual_seed(0)
    module = lm_torch.LSTM(IN, H, variant=custom, dtype=torch.float64)
    assert not module.runs_native
    x = torch.tensor(np.random.default_rng(2).standard_normal((T, B, IN)))
    reference = lm_torch.LSTM(IN, H, variant="lstm", dtype=torch.float64)
    reference.load_state_dict(module.state_dict(), strict=False)
    assert not np.allclose(module(x)[0].detach(), reference(x)[0].detach(), atol=1e-3)


def test_state_dicts_of_same_named_variants_that_compute_different_things_do_not_mix():
    one = Variant("custom", _lstm_tanh_output_gate, extends_lstm=True)
    other = Variant("custom", _lstm_scaled, extends_lstm=True)
    source = lm_torch.LSTM(IN, H, variant=one)
    target = lm_torch.LSTM(IN, H, variant=other)
    with pytest.raises(RuntimeError, match="variant: this module computes the 'custom' variant"):
        target.load_state_dict(source.state_dict())
    # inside a larger model the record shows as an unexpected key
    with pytest.raises(RuntimeError, match="_extra_state"):
        torch.nn.Sequential(target).load_state_dict(torch.nn.Sequential(source).state_dict())
    target.load_state_dict(source.state_dict(), strict=False)  # asked for: loads the weights
    same = lm_torch.LSTM(
        IN, H, variant=Variant("custom", _lstm_tanh_output_gate, extends_lstm=True)
    )
    same.load_state_dict(source.state_dict())  # the same math in another object: accepted


def test_user_and_builtin_state_dicts_are_refused_both_ways():
    peep_like = Variant("mypeep", _peephole_no_output_peephole, params=PEEPHOLES, extends_lstm=True)
    user = lm_torch.LSTM(IN, H, variant=peep_like)
    builtin = lm_torch.LSTM(IN, H, variant="peephole")
    with pytest.raises(RuntimeError, match="'peephole' variant"):
        builtin.load_state_dict(user.state_dict())
    with pytest.raises(RuntimeError, match="'mypeep' variant"):
        user.load_state_dict(builtin.state_dict())
    custom = lm_torch.LSTM(IN, H, variant=Variant("custom", _lstm_tanh_output_gate))
    with pytest.raises(RuntimeError, match="_extra_state"):
        torch.nn.LSTM(IN, H).load_state_dict(custom.state_dict())
    with pytest.raises(RuntimeError, match="torch.nn.LSTM's or a 'lstm' module's"):
        custom.load_state_dict(torch.nn.LSTM(IN, H).state_dict())
    # the same math as the built-in, under another name: interchangeable with it
    twin = lm_torch.LSTM(
        IN, H, variant=Variant("mypeep2", _peephole_rewritten, params=PEEPHOLES, extends_lstm=True)
    )
    builtin.load_state_dict(twin.state_dict())
    twin.load_state_dict(builtin.state_dict())


def test_to_torch_and_from_torch_decide_by_what_is_computed():
    mine = Variant("mylstm", _lstm_rewritten, extends_lstm=True)
    torch.manual_seed(3)
    module = lm_torch.LSTM(IN, H, variant=mine, dtype=torch.float64)
    assert set(module.state_dict()) == set(torch.nn.LSTM(IN, H).state_dict())
    plain = module.to_torch()
    x = torch.tensor(np.random.default_rng(4).standard_normal((T, B, IN)))
    np.testing.assert_array_equal(plain(x)[0].detach(), module(x)[0].detach())
    back = lm_torch.LSTM.from_torch(plain, variant=mine)
    assert back._variant_spec is mine
    custom = Variant("custom", _lstm_tanh_output_gate, extends_lstm=True)
    other = lm_torch.LSTM(IN, H, variant=custom)
    with pytest.raises(ValueError, match="variant: torch.nn.LSTM can only hold the 'lstm'"):
        other.to_torch()
    with pytest.raises(
        ValueError, match="variant: 'lstm' does not compute the function of a 'custom' LSTM"
    ):
        lm_torch.LSTM.from_torch(other, variant="lstm")
    # a user variant's module converted: its own math is kept, its record too
    again = lm_torch.LSTM.from_torch(other, variant=custom)
    assert again._variant_spec is custom
    assert again.state_dict()["_extra_state"]["fingerprint"] == custom.fingerprint


def test_from_torch_refuses_to_broadcast_a_parameter_into_another_shape():
    source = lm_torch.LSTM(IN, H, variant="nig")  # weight_peephole (2, H)
    moved = lm_torch.LSTM.from_torch(source, variant="nfg", strict=False)  # (2, H): copied
    np.testing.assert_array_equal(
        moved.weight_peephole_l0.detach(), source.weight_peephole_l0.detach()
    )
    one_row = Variant("one_row", _lstm_rewritten_with_p, params={"p": ("i",)})
    source = lm_torch.LSTM(IN, H, variant=one_row)  # weight_peephole (1, H)
    with pytest.raises(ValueError, match=r"weight_peephole_l0 has shape \(1, 4\)"):
        lm_torch.LSTM.from_torch(source, variant="peephole", strict=False)  # (3, H)


def test_naive_lstm_runs_a_users_variant_on_its_own_math():
    """NaiveLSTM runs the gate math of the Variant it is given (generated from it), whatever
    its name: the same math under another name computes what the built-in does, and other
    math computes something else."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, IN, dtype=torch.float64)
    builtin = lm_torch.NaiveLSTM(IN, H, variant="lstm").double()
    same = lm_torch.NaiveLSTM(IN, H, variant=Variant("mylstm", _lstm_rewritten, extends_lstm=True))
    other = lm_torch.NaiveLSTM(IN, H, variant=Variant("custom", _lstm_tanh_output_gate))
    for module in (same, other):
        module.double().load_state_dict(builtin.state_dict())
    np.testing.assert_array_equal(same(x)[0].detach(), builtin(x)[0].detach())
    assert not torch.allclose(other(x)[0], builtin(x)[0])
