"""The modules of "Building a LSTM by hand on PyTorch": its products, the spec's gate math.

Its naive module (one matrix per gate) and its optimized module (one fused W, U,
bias) must agree with the "lstm" variant, and its peephole form (the optimized
module with ``peephole=True``) with "peephole_full", on every backend, outputs
and gradients, after weight conversion. The article's weights are already in the
canonical layout (W (in, 4H), U (H, 4H), bias (4H,)); its naive module names
the input matrices U_* and the recurrent ones V_*, with the g gate called c.

The modules state no gate equation (``lstm_multi.bench.article``): their gate
math is the spec's. So they are also checked against the independent oracle
(``oracle.py``, the README's equations, which ``nn.LSTM`` agrees with for
"lstm"), and shown to follow a variant changed in the spec.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from conftest import assert_close, to_numpy  # noqa: E402
from reference import Config, make_problem, reference  # noqa: E402

import lstm_multi  # noqa: E402
from lstm_multi import spec  # noqa: E402
from lstm_multi.bench.article import article_modules  # noqa: E402

NaiveCustomLSTM, CustomLSTM = article_modules()


def naive_to_canonical(m):
    """Naive module -> canonical {"W", "U", "b"} (NumPy)."""
    cat = lambda names: torch.cat([getattr(m, n) for n in names], -1).detach().numpy()  # noqa: E731
    return {
        "W": cat(["U_i", "U_f", "U_c", "U_o"]),
        "U": cat(["V_i", "V_f", "V_c", "V_o"]),
        "b": cat(["b_i", "b_f", "b_c", "b_o"]),
    }


def naive_grads_to_canonical(m):
    """The naive module's gradients, canonical; a parameter the gate math never read
    (a gate the variant lacks) has gradient zero."""

    def grad(name):
        weight = getattr(m, name)
        return torch.zeros_like(weight) if weight.grad is None else weight.grad

    cat = lambda names: torch.cat([grad(n) for n in names], -1).numpy()  # noqa: E731
    return {
        "W": cat(["U_i", "U_f", "U_c", "U_o"]),
        "U": cat(["V_i", "V_f", "V_c", "V_o"]),
        "b": cat(["b_i", "b_f", "b_c", "b_o"]),
    }


def fused_to_canonical(m, grads=False):
    get = (lambda p: p.grad.numpy()) if grads else (lambda p: p.detach().numpy())
    return {"W": get(m.W), "U": get(m.U), "b": get(m.bias)}


CASES = {
    "naive": ("lstm", lambda: NaiveCustomLSTM(3, 5), naive_to_canonical, naive_grads_to_canonical),
    "optimized": (
        "lstm",
        lambda: CustomLSTM(3, 5),
        fused_to_canonical,
        lambda m: fused_to_canonical(m, grads=True),
    ),
    "peephole": (
        "peephole_full",
        lambda: CustomLSTM(3, 5, peephole=True),
        fused_to_canonical,
        lambda m: fused_to_canonical(m, grads=True),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_article_module_agrees(backend, case):
    variant, make, to_canonical, grads_to_canonical = CASES[case]
    torch.manual_seed(0)
    article = make().double()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 7, 3))
    h0, c0 = 0.5 * rng.standard_normal((2, 4, 5))
    dy = rng.standard_normal((4, 7, 5))
    dh, dc = rng.standard_normal((2, 4, 5))

    xt = torch.tensor(x, requires_grad=True)
    h0t, c0t = torch.tensor(h0, requires_grad=True), torch.tensor(c0, requires_grad=True)
    y_ref, (h_ref, c_ref) = article(xt, (h0t, c0t))
    (
        (y_ref * torch.tensor(dy)).sum()
        + (h_ref * torch.tensor(dh)).sum()
        + (c_ref * torch.tensor(dc)).sum()
    ).backward()

    cell = lstm_multi.get_cell(backend)(3, 5, variant=variant, batch_first=True)
    params = cell.from_numpy([[to_canonical(article)]])
    state = (h0[None], c0[None])
    y, (h_n, c_n) = cell(params, x, state=state)
    grads, dx, (dh0, dc0) = cell.vjp(params, x, dy, state=state, dh_n=dh[None], dc_n=dc[None])

    assert_close(to_numpy(y), y_ref.detach(), "float64", "y")
    assert_close(to_numpy(h_n)[0], h_ref.detach(), "float64", "h_n")
    assert_close(to_numpy(c_n)[0], c_ref.detach(), "float64", "c_n")
    assert_close(to_numpy(dx), xt.grad, "float64", "dx")
    assert_close(to_numpy(dc0)[0], c0t.grad, "float64", "dc0")
    want = grads_to_canonical(article)
    got = to_numpy(grads)[0][0]
    for k in want:
        assert_close(got[k], want[k], "float64", k)
    if variant == "peephole_full":
        # the article never reads h_{t-1} in this form (no gradient), and the g block of U is unused
        assert h0t.grad is None and np.all(to_numpy(dh0) == 0)
        assert np.all(got["U"][:, 10:15] == 0)
    else:
        assert_close(to_numpy(dh0)[0], h0t.grad, "float64", "dh0")


def load_canonical(module, p):
    """Copy one canonical layer-direction {"W", "U", "b"} (NumPy) into an article module."""
    with torch.no_grad():
        if isinstance(module, NaiveCustomLSTM):
            h = module.hidden_size
            for k, gate in enumerate("ifco"):
                block = slice(k * h, (k + 1) * h)
                getattr(module, f"U_{gate}").copy_(torch.tensor(p["W"][:, block]))
                getattr(module, f"V_{gate}").copy_(torch.tensor(p["U"][:, block]))
                getattr(module, f"b_{gate}").copy_(torch.tensor(p["b"][block]))
        else:
            module.W.copy_(torch.tensor(p["W"]))
            module.U.copy_(torch.tensor(p["U"]))
            module.bias.copy_(torch.tensor(p["b"]))
    return module


def run_article(case, config, problem):
    """The case's article module, loaded with the problem's parameters, on the problem
    (batch first, the state passed), as the oracle gives it: y (T, B, H), h_n, c_n (1, B, H),
    dx (T, B, in), dh0, dc0 (1, B, H) and the canonical gradients."""
    _, make, _, grads_to_canonical = CASES[case]
    torch.manual_seed(0)
    module = load_canonical(make().double(), problem.params[0][0])
    x = torch.tensor(np.swapaxes(problem.x, 0, 1), requires_grad=True)
    h0 = torch.tensor(problem.h0[0], requires_grad=True)
    c0 = torch.tensor(problem.c0[0], requires_grad=True)
    y, (h_n, c_n) = module(x, (h0, c0))
    (
        (y.transpose(0, 1) * torch.tensor(problem.dy)).sum()
        + (h_n * torch.tensor(problem.dh_n[0])).sum()
        + (c_n * torch.tensor(problem.dc_n[0])).sum()
    ).backward()
    never_read = torch.zeros_like(h0)  # the peephole form never reads h_{t-1}
    return {
        "y": y.detach().transpose(0, 1).numpy(),
        "h_n": h_n.detach().numpy()[None],
        "c_n": c_n.detach().numpy()[None],
        "dx": np.swapaxes(x.grad.numpy(), 0, 1),
        "dh0": (never_read if h0.grad is None else h0.grad).numpy()[None],
        "dc0": c0.grad.numpy()[None],
        "grads": grads_to_canonical(module),
    }


def article_config(variant):
    """One layer, one direction, batch first, with a state: the article's modules' case."""
    return Config(variant, 4, 7, 3, 5, 1, False, True, False, True, 5)


@pytest.mark.parametrize("case", list(CASES))
def test_article_module_matches_the_oracle(case):
    """The article's products around the spec's gate math compute the README's equations
    (the oracle, which imports nothing from lstm_multi): outputs, states and gradients."""
    config = article_config(CASES[case][0])
    problem = make_problem(config)
    got, want = run_article(case, config, problem), reference(config, problem)
    for key in ("y", "h_n", "c_n", "dx", "dh0", "dc0"):
        assert_close(got[key], want[key], "float64", f"{case} {key}")
    for key in ("W", "U", "b"):
        assert_close(got["grads"][key], want["grads"][0][0][key], "float64", f"{case} d{key}")


def _lstm_with_coupled_forget_gate(z, c_prev):
    """The plain LSTM with f = 1 - i (z_f unused): a changed spec."""
    i, g, o = lstm_multi.sigmoid(z.i), lstm_multi.tanh(z.g), lstm_multi.sigmoid(z.o)
    c = (1 - i) * c_prev + i * g
    return o * lstm_multi.tanh(c), c


def _peephole_full_squashing_c_alone(z, c_prev):
    """The article's peephole form with h_t = o tanh(c_t) instead of tanh(o c_t)."""
    i, f, g = lstm_multi.sigmoid(z.i), lstm_multi.sigmoid(z.f), lstm_multi.sigmoid(z.g)
    c = f * c_prev + i * g
    return lstm_multi.sigmoid(z.o) * lstm_multi.tanh(c), c


CHANGED = {
    "lstm": lambda: spec.Variant("article_changed_lstm", _lstm_with_coupled_forget_gate),
    "peephole_full": lambda: spec.Variant(
        "article_changed_peephole_full",
        _peephole_full_squashing_c_alone,
        recurrent_state="c",
        unused_recurrent_gates=("g",),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_article_module_follows_a_change_to_the_spec(case, monkeypatch):
    """The article's modules state no gate equation: a variant changed in the spec changes
    what they compute, to what the library computes with the changed variant."""
    variant = CASES[case][0]
    config = article_config(variant)
    problem = make_problem(config)
    before = run_article(case, config, problem)
    changed = CHANGED[variant]()
    monkeypatch.setitem(spec.VARIANTS, variant, changed)  # the spec, deliberately changed
    after = run_article(case, config, problem)
    assert not np.allclose(after["y"], before["y"])
    # the array code: the library's function of the changed spec without a C++ build of
    # each changed variant (a second of the compiler each, in a fresh cache; the kernels of
    # a user's variant are checked against the array code in test_kernel_cache.py)
    cell = lstm_multi.get_cell("numpy")(3, 5, variant=changed, batch_first=False, engine="array")
    params = cell.from_numpy(problem.params)
    state = (problem.h0, problem.c0)
    y, (h_n, c_n) = cell(params, problem.x, state=state)
    grads, dx, _ = cell.vjp(
        params, problem.x, problem.dy, state=state, dh_n=problem.dh_n, dc_n=problem.dc_n
    )
    for key, value in (("y", y), ("h_n", h_n), ("c_n", c_n), ("dx", dx)):
        assert_close(after[key], to_numpy(value), "float64", f"{case} {key}")
    for key in ("W", "U", "b"):
        assert_close(after["grads"][key], to_numpy(grads)[0][0][key], "float64", f"d{key}")


def test_article_module_refuses_a_variant_with_parameters_it_lacks(monkeypatch):
    """The article's modules have only W, U and bias: a spec whose "lstm" read peephole
    rows is an error naming them, not a call with arguments missing."""
    monkeypatch.setitem(spec.VARIANTS, "lstm", spec.VARIANTS["peephole"])
    with pytest.raises(ValueError, match=r"no \['p'\] parameters"):
        CustomLSTM(3, 5)(torch.zeros(2, 4, 3))
