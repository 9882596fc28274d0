"""PyTorch's own machinery on every path and variant of the torch module and cell.

Repeated backward and repeated ``autograd.grad``, ``gradcheck`` and
``gradgradcheck``, ``torch.compile`` training (inductor), ``torch.autocast``
(bfloat16 on the CPU), the ``torch.func`` transforms, ``torch.save`` /
``torch.load`` of a whole model with the defaults, and the ``nn.LSTM``
attributes third-party code reads.
"""

from __future__ import annotations

import copy
import re

import pytest

torch = pytest.importorskip("torch")

from conftest import assert_close  # noqa: E402
from reference import CORE_VARIANTS  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, jacrev, vmap  # noqa: E402

import lstm_multi  # noqa: E402
from lstm_multi.torch import LSTM  # noqa: E402

#: (variant, native): the native flag matters for "lstm" only
PATHS = [
    pytest.param(("lstm", True), id="lstm-native"),
    pytest.param(("lstm", False), id="lstm-generic"),
    pytest.param(("peephole", True), id="peephole"),
    pytest.param(("peephole_full", True), id="peephole_full"),
]


def module(path, dtype=torch.float64, sizes=(3, 4), **kwargs):
    variant, native = path
    torch.manual_seed(0)
    args = {"num_layers": 2, "bidirectional": True, **kwargs}
    return LSTM(*sizes, variant=variant, native=native, dtype=dtype, **args)


def inputs(dtype=torch.float64, steps=5, batch=2, features=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(steps, batch, features, generator=g, dtype=dtype)


def param_grads(m):
    return [p.grad.clone() for p in m.parameters()]


# repeated backward --------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_repeated_backward_with_retain_graph(path):
    m, x = module(path), inputs()
    out, (h, c) = m(x)
    (out.sum() + c.sum()).backward(retain_graph=True)
    first = param_grads(m)
    (out.square().sum()).backward()
    both = param_grads(m)
    m.zero_grad()
    m(x)[0].square().sum().backward()  # the second loss alone, on a fresh graph
    second = param_grads(m)
    for a, b, s in zip(both, first, second, strict=True):
        torch.testing.assert_close(a, b + s)


@pytest.mark.parametrize("path", PATHS)
def test_repeated_autograd_grad(path):
    m, x = module(path), inputs().requires_grad_(True)
    out, _ = m(x)
    one = torch.autograd.grad(out.sum(), [x, *m.parameters()], retain_graph=True)
    two = torch.autograd.grad(out.sum(), [x, *m.parameters()])
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("path", PATHS)
def test_second_backward_without_retain_graph_is_pytorchs_error(path):
    m = module(path)
    out, _ = m(inputs())
    loss = out.sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


# gradcheck --------------------------------------------------------------------------------


#: gradgradcheck is the slowest check here: the default run takes nn.LSTM's kernel and the
#: generated kernels' path once each, the thorough run every path
GRADGRAD_PATHS = [
    p
    if p.id in ("lstm-native", "peephole")
    else pytest.param(
        *p.values, id=p.id, marks=pytest.mark.thorough_only("lstm-native and peephole cover it")
    )
    for p in PATHS
]


@pytest.mark.parametrize("path", GRADGRAD_PATHS)
def test_gradcheck_and_gradgradcheck(path):
    """Full Jacobians, so every input and weight entry costs a few evaluations: 2 hidden
    units a direction (not the other tests' 4; 158 entries, not 362) beside 3 features
    (input and hidden sizes differ, so a size mixed up still shows), a batch of 2."""
    m = module(path, sizes=(3, 2), num_layers=1, bidirectional=True)
    names = [n for n, _ in m.named_parameters()]
    x = inputs(steps=3).requires_grad_(True)
    h0 = (0.5 * torch.randn(2, 2, 2, dtype=torch.float64)).requires_grad_(True)
    c0 = (0.5 * torch.randn(2, 2, 2, dtype=torch.float64)).requires_grad_(True)
    weights = [p.detach().clone().requires_grad_(True) for p in m.parameters()]

    def f(x, h0, c0, *weights):
        out, (h, c) = functional_call(m, dict(zip(names, weights, strict=True)), (x, (h0, c0)))
        return out, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0, *weights))
    assert torch.autograd.gradgradcheck(f, (x, h0, c0, *weights))


@pytest.mark.parametrize("variant", CORE_VARIANTS)
def test_gradcheck_of_the_functional_cell_with_lengths(variant):
    """Full Jacobians (hidden 2, as in test_gradcheck_and_gradgradcheck: fewer entries;
    3 features, a size other than the hidden one)."""
    cell = lstm_multi.get_cell("torch")(3, 2, variant=variant, native=False)
    params = cell.init(seed=0, dtype="float64")
    keys = list(params[0][0])
    x = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    values = [params[0][0][k].clone().requires_grad_(True) for k in keys]

    def f(x, *values):
        y, (h, c) = cell([[dict(zip(keys, values, strict=True))]], x, lengths=[4, 1, 3])
        return y, h, c

    assert torch.autograd.gradcheck(f, (x, *values))
    assert torch.autograd.gradgradcheck(f, (x, *values))


# torch.compile --------------------------------------------------------------------------


class Regressor(nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm
        self.head = nn.Linear(8, 1, dtype=lstm.weight_ih_l0.dtype)

    def forward(self, x):
        return self.head(self.lstm(x)[0][-1]).squeeze(-1)


@pytest.mark.parametrize("path", PATHS)
def test_torch_compile_trains_like_eager(path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = Regressor(module(path, dtype=torch.float32))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)  # inductor
    x, target = inputs(torch.float32, steps=6, batch=4), torch.randn(4)
    losses = {"eager": [], "compiled": []}
    for name, model, params in (
        ("eager", eager, eager.parameters()),
        ("compiled", compiled, compiled_model.parameters()),
    ):
        opt = torch.optim.SGD(params, lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            loss = (model(x) - target).square().mean()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    # inductor fuses the head and the loss and sums in its own order: float32 rounding only
    assert_close(losses["compiled"], losses["eager"], "float32", "losses")
    for a, b in zip(compiled_model.parameters(), eager.parameters(), strict=True):
        assert_close(a.detach(), b.detach(), "float32", "trained parameters")
    # one graph break at the LSTM (as for nn.LSTM), none inside it
    assert sum(counters["graph_break"].values()) <= 1, dict(counters["graph_break"])


def test_torch_compile_of_a_function_using_the_cell():
    cell = lstm_multi.get_cell("torch")(3, 4, variant="peephole")
    params = cell.init(seed=0)

    def f(x):
        return cell(params, x, lengths=[5, 3])[0].tanh().sum()

    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(torch.compile(f)(x), f(x))


# autocast ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_autocast_bfloat16_on_the_cpu(path):
    """Under autocast the module computes what the cell computes on bfloat16 copies of
    its inputs and canonical weights (outputs in bfloat16), and its float32
    parameters get float32 gradients; native "lstm" behaves exactly as nn.LSTM does."""
    m = module(path, dtype=torch.float32)
    x = inputs(torch.float32)
    if path == ("lstm", True):
        try:  # oneDNN has no bfloat16 LSTM primitive on some CPUs (AMD EPYC without AVX-512)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                m.to_torch()(x)
        except RuntimeError as error:  # nn.LSTM cannot: the drop-in fails as nn.LSTM does
            with pytest.raises(RuntimeError, match=re.escape(str(error)[:60])):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    m(x)
            return
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = m(x)
    assert out.dtype == h.dtype == c.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in m.parameters())
    if path == ("lstm", True):
        reference = m.to_torch()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = reference(x)[0]
    else:
        cell = lstm_multi.get_cell("torch")(
            3,
            4,
            variant=m.variant,
            num_layers=2,
            bidirectional=True,
            batch_first=False,
            native=False,
        )
        params = [
            [{k: v.detach().to(torch.bfloat16) for k, v in p.items()} for p in layer]
            for layer in m.canonical_params()
        ]
        want = cell(params, x.to(torch.bfloat16))[0]
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    full = m(x)[0]  # float32, no autocast: within bfloat16's reach
    assert (out.float() - full).norm() / full.norm() < 2**-6


# torch.func -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_torch_func_transforms_on_the_module(path):
    m, x = module(path), inputs()
    params = dict(m.named_parameters())

    def loss(p, x):
        return functional_call(m, p, (x,))[0].square().sum()

    got = grad(loss)(params, x)
    want = torch.autograd.grad(loss(params, x), list(params.values()))
    for name, w in zip(params, want, strict=True):
        torch.testing.assert_close(got[name], w)
    xs = torch.randn(3, *x.shape, dtype=x.dtype)
    batched = vmap(lambda xi: functional_call(m, params, (xi,))[0])(xs)
    for k in range(3):
        torch.testing.assert_close(batched[k], m(xs[k])[0])
    jac = jacrev(lambda xi: functional_call(m, params, (xi,))[0].sum(0))(x)
    xr = x.clone().requires_grad_(True)
    (m(xr)[0].sum(0)[0, 0]).backward()
    torch.testing.assert_close(jac[0, 0], xr.grad)


@pytest.mark.parametrize("variant", CORE_VARIANTS)
def test_torch_func_transforms_on_the_cell(variant):
    cell = lstm_multi.get_cell("torch")(3, 4, variant=variant, bidirectional=True)
    params = cell.init(seed=0, dtype="float64")
    x = torch.randn(2, 5, 3, dtype=torch.float64)

    def loss(params):
        return cell(params, x, lengths=[5, 2])[0].square().sum()

    got = grad(loss)(params)
    want, _, _ = cell.vjp(params, x, 2 * cell(params, x, lengths=[5, 2])[0], lengths=[5, 2])
    for k in params[0][1]:
        torch.testing.assert_close(got[0][1][k], want[0][1][k])
    xs = torch.randn(3, 2, 5, 3, dtype=torch.float64)
    batched = vmap(lambda xi: cell(params, xi)[0])(xs)
    torch.testing.assert_close(batched[1], cell(params, xs[1])[0])


def test_torch_func_with_lengths_as_a_tensor():
    """Lengths given as a tensor inside grad/vmap (whose values torch.func hides from
    .numpy()); lengths that vary under vmap are refused with a TypeError that says so."""
    cell = lstm_multi.get_cell("torch")(3, 4, variant="peephole")
    params = cell.init(seed=0, dtype="float64")
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    lengths = torch.tensor([5, 2])

    def loss(params):
        return cell(params, x, lengths=lengths)[0].square().sum()

    got = grad(loss)(params)
    want, _, _ = cell.vjp(params, x, 2 * cell(params, x, lengths=[5, 2])[0], lengths=[5, 2])
    torch.testing.assert_close(got[0][0]["W"], want[0][0]["W"])
    xs = torch.randn(3, 2, 5, 3, dtype=torch.float64)
    batched = vmap(lambda xi: cell(params, xi, lengths=lengths)[0])(xs)
    torch.testing.assert_close(batched[2], cell(params, xs[2], lengths=[5, 2])[0])
    with pytest.raises(TypeError, match="lengths: expected the same lengths for every vmapped"):
        vmap(lambda xi, n: cell(params, xi, lengths=n)[0])(xs, torch.tensor([[5, 2]] * 3))


# nn.LSTM compatibility ----------------------------------------------------------------


@pytest.mark.parametrize("variant", CORE_VARIANTS)
def test_torch_save_and_load_a_whole_model_with_the_defaults(variant, tmp_path):
    """torch.load's default weights_only=True restores the module itself, and a user's
    model that holds it once the user allow-lists their own classes (as for nn.LSTM)."""
    lstm = LSTM(3, 4, num_layers=2, variant=variant)
    path = tmp_path / "lstm.pt"
    torch.save(lstm, path)
    loaded = torch.load(path)  # weights_only=True, the default
    assert type(loaded) is LSTM and loaded.variant == variant
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(loaded(x)[0], lstm(x)[0])
    model = nn.Sequential()
    model.add_module("lstm", lstm)
    torch.save(model, path)
    with torch.serialization.safe_globals([nn.Sequential]):
        loaded = torch.load(path)
    torch.testing.assert_close(loaded.lstm(x)[0], lstm(x)[0])
    torch.save(model.state_dict(), path)
    fresh = nn.Sequential()
    fresh.add_module("lstm", LSTM(3, 4, num_layers=2, variant=variant))
    fresh.load_state_dict(torch.load(path))
    torch.testing.assert_close(fresh.lstm(x)[0], model.lstm(x)[0])


def test_is_an_nn_lstm_with_its_attributes():
    m = LSTM(3, 4, num_layers=2, bidirectional=True, variant="peephole")
    reference = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    assert isinstance(m, nn.LSTM) and isinstance(m, nn.RNNBase)
    assert m.mode == "LSTM"
    assert m._flat_weights_names == reference._flat_weights_names
    assert [[w.shape for w in ws] for ws in m.all_weights] == [
        [w.shape for w in ws] for ws in reference.all_weights
    ]
    x = torch.randn(5, 2, 3)
    hx = (torch.randn(4, 2, 4), torch.randn(4, 2, 4))
    m.check_forward_args(x, hx, None)
    with pytest.raises(
        RuntimeError, match=r"Expected hidden\[0\] size \(4, 2, 4\), got \[4, 3, 4\]"
    ):
        m.check_forward_args(x, (torch.zeros(4, 3, 4), torch.zeros(4, 3, 4)), None)
    permuted = m.permute_hidden(hx, torch.tensor([1, 0]))  # reorders the batch axis of h and c
    for got, state in zip(permuted, hx, strict=True):
        assert torch.equal(got, state[:, [1, 0]])
    m.flatten_parameters()
    assert "variant='peephole'" in repr(m)


def test_plain_module_starts_with_nn_lstms_numbers_for_the_same_seed():
    torch.manual_seed(5)
    ours = LSTM(3, 4, num_layers=2)
    torch.manual_seed(5)
    theirs = nn.LSTM(3, 4, num_layers=2)
    for (name, a), (_, b) in zip(
        ours.state_dict().items(), theirs.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
