"""Projection (``proj_size``, the LSTMP of Sak, Senior & Beaufays 2014) beyond the oracle.

The property tests (``reference.configs``) draw projected problems for every
backend, the torch module and ``nn.LSTM`` itself against the oracle; the
finite-difference and step tests include a projected case. Here: the layout
(shapes, state shapes, state_dict keys), ``nn.LSTM(proj_size=P)`` state_dicts
loading and running identically, projection with peepholes and with the
c_{t-1} recurrence, the initial schemes, framework machinery (JAX transforms,
torch autocast) and the errors.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, thorough_params

import lstm_multi

H, P = 5, 2


def test_projected_shapes():
    cell = lstm_multi.get_cell("numpy")(3, H, variant="peephole", num_layers=2,
                                        bidirectional=True, proj_size=P)  # fmt: skip
    shapes = cell.param_shapes()
    assert shapes[0][0] == {"W": (3, 4 * H), "U": (P, 4 * H), "b": (4 * H,), "p": (3, H),
                            "W_hr": (H, P)}  # fmt: skip
    assert shapes[1][1]["W"] == (2 * P, 4 * H)  # the next layer reads both projected outputs
    assert cell.state_shapes(7) == ((4, 7, P), (4, 7, H))
    with pytest.raises(ValueError, match="use state_shapes"):
        cell.state_shape(7)
    y, (h_n, c_n) = cell(cell.init(seed=0), np.zeros((7, 4, 3), np.float32))
    assert (y.shape, h_n.shape, c_n.shape) == ((7, 4, 2 * P), (4, 7, P), (4, 7, H))
    assert "proj_size=2" in repr(cell)
    # the c_{t-1} recurrence reads the unprojected cell: U keeps H rows
    full = lstm_multi.get_cell("numpy")(3, H, variant="peephole_full", proj_size=P)
    assert full.param_shapes()[0][0]["U"] == (H, 4 * H)


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_bad_proj_size_is_refused(backend):
    if backend not in lstm_multi.available_backends():
        pytest.skip(f"{backend} is not installed")
    Cell = lstm_multi.get_cell(backend)
    with pytest.raises(ValueError, match=f"proj_size: expected 0 .* below hidden_size={H}, got 5"):
        Cell(3, H, proj_size=5)
    with pytest.raises(ValueError, match="got -1"):
        Cell(3, H, proj_size=-1)
    with pytest.raises(TypeError, match="proj_size: expected an integer, got bool"):
        Cell(3, H, proj_size=True)
    cell = Cell(3, H, proj_size=P)
    params = cell.init(seed=0, dtype="float32")
    x = np.zeros((2, 4, 3), np.float32)
    wrong = (np.zeros((1, 2, H), np.float32), np.zeros((1, 2, H), np.float32))
    with pytest.raises(ValueError, match=rf"state h0: expected shape \(1, 2, {P}\)"):
        cell(params, x, state=wrong)


@pytest.mark.parametrize("scheme", ["uniform", "keras"])
def test_init_draws_the_projection(scheme):
    """Both schemes draw W_hr (nn.LSTM's uniform, Keras's glorot): never zero, which
    would silence the layer; the same seed gives the same numbers on every backend."""
    cells = {b: lstm_multi.get_cell(b)(3, H, proj_size=P) for b in lstm_multi.available_backends()
             if b != "cupy"}  # fmt: skip
    drawn = {b: c.to_numpy(c.init(seed=4, scheme=scheme)) for b, c in cells.items()}
    W_hr = drawn["numpy"][0][0]["W_hr"]
    assert W_hr.shape == (H, P) and np.all(W_hr != 0)
    bound = 1 / np.sqrt(H) if scheme == "uniform" else np.sqrt(6 / (H + P))
    assert np.abs(W_hr).max() <= bound
    for b, params in drawn.items():
        np.testing.assert_array_equal(params[0][0]["W_hr"], W_hr, err_msg=b)


# torch ------------------------------------------------------------------------------


def _run_module(module, x, hx):
    import torch

    for p in module.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    out, (h_n, c_n) = module(x, hx)
    gen = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum()
               for t in (out, h_n, c_n))  # fmt: skip
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return [out.detach(), h_n.detach(), c_n.detach(), x.grad], grads


@pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])
def test_nn_lstm_state_dict_loads_and_runs_identically(native):
    torch = pytest.importorskip("torch")
    from lstm_multi.torch import LSTM

    torch.manual_seed(0)
    reference = torch.nn.LSTM(3, H, 2, bidirectional=True, proj_size=P, dtype=torch.float64)
    module = LSTM(3, H, 2, bidirectional=True, proj_size=P, dtype=torch.float64, native=native)
    module.load_state_dict(reference.state_dict())
    assert module.weight_hr_l1_reverse.shape == (P, H) and module.weight_hh_l0.shape == (4 * H, P)
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    hx = (torch.randn(4, 3, P, dtype=torch.float64), torch.randn(4, 3, H, dtype=torch.float64))
    (got, got_grads), (want, want_grads) = _run_module(module, x, hx), _run_module(reference, x, hx)
    for name, a, b in zip(("output", "h_n", "c_n", "dx"), got, want, strict=True):
        assert_close(a, b, "float64", name)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], "float64", f"grad {name}")
    # and back: to_torch gives an nn.LSTM with the projection
    assert module.to_torch().proj_size == P


def test_functional_torch_cell_and_the_module_match_the_oracle():
    """The functional cell on the module's canonical parameters (W_hr = weight_hr^T) and
    the module itself both compute the oracle's projected peephole LSTM, the oracle given
    the parameters read from the module's state_dict by hand (nn.LSTM's layout)."""
    torch = pytest.importorskip("torch")
    import oracle

    from lstm_multi.torch import LSTM

    torch.manual_seed(1)
    module = LSTM(3, H, proj_size=P, dtype=torch.float64, variant="peephole")
    cell = lstm_multi.get_cell("torch")(3, H, variant="peephole", batch_first=False, proj_size=P)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    y, (h_n, c_n) = cell(module.canonical_params(), x)
    out, (wh, wc) = module(x)
    state = {k: v.detach().numpy() for k, v in module.state_dict().items() if k != "_extra_state"}
    params = {
        "W": state["weight_ih_l0"].T,
        "U": state["weight_hh_l0"].T,
        "b": state["bias_ih_l0"] + state["bias_hh_l0"],
        "p": state["weight_peephole_l0"],
        "W_hr": state["weight_hr_l0"].T,
    }
    zeros_h, zeros_c = np.zeros((1, 2, P)), np.zeros((1, 2, H))
    want = oracle.oracle("peephole", [[params]], x.numpy(), zeros_h, zeros_c, None,
                         np.zeros((4, 2, P)), zeros_h, zeros_c)  # fmt: skip
    for path, got in (("cell", (y, h_n, c_n)), ("module", (out, wh, wc))):
        for what, a in zip(("y", "h_n", "c_n"), got, strict=True):
            assert_close(a.detach(), want[what], "float64", f"{path} {what}")
    np.testing.assert_array_equal(
        module.to_numpy_params()[0][0]["W_hr"], module.weight_hr_l0.detach().numpy().T
    )


@pytest.mark.parametrize("variant", ["peephole", "peephole_full"])
def test_module_projection_with_variants(variant):
    """Peephole + projection (the speech LSTMP) and the c_{t-1} recurrence, whose
    weight_hh keeps H columns: state_dict keys, a training step, and a round trip."""
    torch = pytest.importorskip("torch")
    from lstm_multi.torch import LSTM

    module = LSTM(3, H, 2, proj_size=P, variant=variant)
    keys = set(module.state_dict())
    assert {"weight_hr_l0", "weight_hr_l1"} <= keys
    columns = H if variant == "peephole_full" else P
    assert module.weight_hh_l1.shape == (4 * H, columns)
    assert module.weight_ih_l1.shape == (4 * H, P)
    out, (h_n, c_n) = module(torch.randn(4, 2, 3))
    assert out.shape == (4, 2, P) and h_n.shape == (2, 2, P) and c_n.shape == (2, 2, H)
    out.square().sum().backward()
    assert all(p.grad is not None for n, p in module.named_parameters() if "hr" in n)
    copy = LSTM(3, H, 2, proj_size=P, variant=variant)
    copy.load_state_dict(module.state_dict())
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(copy(x)[0], module(x)[0])


def test_autocast_with_projection():
    torch = pytest.importorskip("torch")
    from lstm_multi.torch import LSTM

    module = LSTM(3, H, proj_size=P, variant="peephole")
    x = torch.randn(4, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h_n, c_n) = module(x)
    assert out.dtype == torch.bfloat16 and c_n.dtype == torch.bfloat16
    out.float().sum().backward()
    assert module.weight_hr_l0.grad.dtype == torch.float32
    reference = module(x)[0]
    # bfloat16 has 8 significant bits (eps 7.8e-3): a few of its roundings, not float32's
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)


# jax --------------------------------------------------------------------------------


def test_jax_transforms_with_projection():
    """jit, grad (the custom VJP and JAX's own autodiff agree with NumPy's BPTT) and vmap."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    np_cell = lstm_multi.get_cell("numpy")(3, H, variant="cifg", proj_size=P)
    params = np_cell.init(seed=2)
    x = np.random.default_rng(0).standard_normal((2, 5, 3)).astype(np.float32)
    dy = np.ones((2, 5, P), np.float32)
    want, _, _ = np_cell.vjp(params, x, dy)
    for autodiff in (False, True):
        cell = lstm_multi.get_cell("jax")(3, H, variant="cifg", proj_size=P, autodiff=autodiff)

        def loss(p, x, cell=cell):
            return cell(p, x)[0].sum()

        def checked(p, x, cell=cell, loss=loss):
            """The gradient, the cell vmapped over the sequences and the whole batch's call:
            one jit, one compilation (each separately, eagerly, compiles its own)."""
            per_sequence = jax.vmap(lambda xs: cell(p, xs[None])[0][0])
            return jax.grad(loss)(p, x), per_sequence(x), cell(p, x)[0]

        got, per_sequence, whole = jax.jit(checked)(cell.from_numpy(params), jnp.asarray(x))
        for key in ("W", "U", "W_hr", "p"):
            assert_close(got[0][0][key], want[0][0][key], "float32", f"d{key}")
        assert_close(per_sequence, whole, "float32", "vmap over sequences")


@pytest.mark.parametrize(
    "variant", thorough_params(["lstm", "peephole", "peephole_full"], ["peephole"])
)
def test_torch_machinery_with_projection(variant):
    """gradcheck and gradgradcheck (the kernels' backward, then the reference loop's double
    backward), repeated backward, and torch.func.grad (the reference loop) with lengths."""
    torch = pytest.importorskip("torch")
    cell = lstm_multi.get_cell("torch")(2, 3, variant=variant, proj_size=2, native=False,
                                        batch_first=False, bidirectional=True)  # fmt: skip
    params = cell.init(seed=1, dtype="float64")
    leaves = [v.requires_grad_(True) for layer in params for p in layer for v in p.values()]
    # 3 steps (the full Jacobians cost evaluations an entry: few steps, the lengths still
    # ending one sequence early)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 2])

    def run(x, *flat):
        it = iter(flat)
        rebuilt = [[{k: next(it) for k in p} for p in layer] for layer in params]
        y, (h_n, c_n) = cell(rebuilt, x, lengths=lengths)
        return y, h_n, c_n

    assert torch.autograd.gradcheck(run, (x, *leaves))
    assert torch.autograd.gradgradcheck(run, (x, *leaves))
    y, h_n, _ = run(x, *leaves)
    loss = y.square().sum() + h_n.sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)

    def total(flat):
        return run(x.detach(), *flat)[0].square().sum()

    functional = torch.func.grad(total)([v.detach() for v in leaves])
    for a, b in zip(functional, torch.autograd.grad(total(leaves), leaves), strict=True):
        torch.testing.assert_close(a, b)
