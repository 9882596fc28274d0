"""The modules of "Building a LSTM by hand on PyTorch", transcribed, as references.

Its naive module (one matrix per gate) and its optimized module (one fused W, U,
bias) must agree with the "lstm" variant, and its peephole form (the optimized
module with ``peephole=True``) with "peephole_full", on every backend, outputs
and gradients, after weight conversion. The article's weights are already in the
canonical layout (W (in, 4H), U (H, 4H), bias (4H,)); its naive module names
the input matrices U_* and the recurrent ones V_*, with the g gate called c.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from conftest import assert_close, to_numpy  # noqa: E402

import lstm_multi  # noqa: E402
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
    cat = lambda names: torch.cat([getattr(m, n).grad for n in names], -1).numpy()  # noqa: E731
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
