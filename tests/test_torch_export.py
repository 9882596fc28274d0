"""``torch.export`` of the drop-in ``lstm_multi.torch.LSTM`` and of the functional torch cell.

Every variant exports on the CPU kernels' path: each direction is one call of the custom
op ``lstm_multi::direction`` (``lstm_multi/backends/torch_library.py``), so the sequence
length stays symbolic. The exported program equals eager at another length than the
traced one, survives ``torch.export.save`` and ``torch.export.load`` in a fresh process
(which imports ``lstm_multi.torch`` first, registering the op), and its autograd formula
passes ``torch.library.opcheck``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from cell_module import CellModel  # noqa: E402
from conftest import assert_close  # noqa: E402
from oracle import VARIANTS  # noqa: E402

import lstm_multi  # noqa: E402
from lstm_multi import sigmoid, tanh  # noqa: E402
from lstm_multi.torch import LSTM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: (variant, module options): every built-in variant, with layers, directions, projection,
#: batch_first and the native flag spread over them
CASES = {
    "lstm": {"native": False, "num_layers": 2, "bidirectional": True},
    "peephole": {"num_layers": 2},
    "peephole_full": {"proj_size": 2, "batch_first": True},
    "nig": {"bidirectional": True},
    "nfg": {"proj_size": 3},
    "nog": {"batch_first": True, "bidirectional": True},
    "niaf": {},
    "noaf": {"num_layers": 2, "bidirectional": True, "proj_size": 2},
    "cifg": {"num_layers": 2, "bidirectional": True},
    "layernorm": {"num_layers": 2, "bidirectional": True},
    "layernorm_peephole": {"proj_size": 2, "batch_first": True},
}


def make(variant, dtype=torch.float32):
    torch.manual_seed(0)
    return LSTM(3, 4, variant=variant, dtype=dtype, **CASES[variant]).eval()


def example(module, steps, dtype=torch.float32, seed=1):
    """(x, (h0, c0)) for ``module`` with ``steps`` steps and a batch of 2."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, steps, 3) if module.batch_first else (steps, 2, 3)
    layers = module.num_layers * module.num_directions
    h0 = torch.randn(layers, 2, module.proj_size or 4, generator=g, dtype=dtype)
    c0 = torch.randn(layers, 2, 4, generator=g, dtype=dtype)
    return torch.randn(shape, generator=g, dtype=dtype), (h0, c0)


def export(module, x, hx):
    time_axis = 1 if module.batch_first else 0
    steps = torch.export.Dim("T", min=1)
    return torch.export.export(module, (x, hx), dynamic_shapes=({time_axis: steps}, (None, None)))


def flat(outputs):
    y, (h, c) = outputs
    return y, h, c


def test_every_variant_is_covered():
    assert set(CASES) == set(VARIANTS)


@pytest.mark.parametrize("variant", list(CASES))
def test_export_equals_eager_at_another_length(variant):
    module = make(variant)
    program = export(module, *example(module, 5))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "lstm_multi.direction.default" in ops, ops
    x, hx = example(module, 7, seed=2)  # not the traced length
    with torch.no_grad():
        for got, want, what in zip(
            flat(program.module()(x, hx)), flat(module(x, hx)), ("y", "h_n", "c_n"), strict=True
        ):
            assert_close(got, want, "float32", what)


def test_native_lstm_exports_through_the_op_at_any_length():
    """nn.LSTM's kernel exports with the traced length only: under torch.export the
    module runs the custom op in its place."""
    torch.manual_seed(0)
    module = LSTM(3, 4, bidirectional=True, batch_first=True).eval()  # native=True
    assert module.runs_native
    x = torch.randn(2, 5, 3)
    program = torch.export.export(module, (x,), dynamic_shapes=({1: torch.export.Dim("T")},))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "lstm_multi.direction.default" in ops and "aten.lstm.input" not in ops, ops
    x2 = torch.randn(2, 9, 3)
    with torch.no_grad():
        for got, want, what in zip(
            flat(program.module()(x2)), flat(module(x2)), ("y", "h_n", "c_n"), strict=True
        ):
            assert_close(got, want, "float32", what)


def test_saved_programs_load_in_a_fresh_process(tmp_path):
    """Saved, loaded by a process that imports lstm_multi.torch and nothing of the test."""
    expected = {}
    for variant in ("peephole", "cifg", "noaf"):
        module = make(variant, torch.float64)
        program = export(module, *example(module, 4, torch.float64))
        torch.export.save(program, tmp_path / f"{variant}.pt2")
        x, hx = example(module, 6, torch.float64, seed=3)
        torch.save((x, hx), tmp_path / f"{variant}.inputs.pt")
        with torch.no_grad():
            expected[variant] = [t.tolist() for t in flat(module(x, hx))]
    script = f"""
import json, sys, torch
import lstm_multi.torch  # registers the custom op lstm_multi::direction
out = {{}}
for variant in {sorted(expected)!r}:
    program = torch.export.load(sys.argv[1] + f"/{{variant}}.pt2")
    x, hx = torch.load(sys.argv[1] + f"/{{variant}}.inputs.pt")
    y, (h, c) = program.module()(x, hx)
    out[variant] = [t.tolist() for t in (y, h, c)]
print(json.dumps(out))
"""
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.splitlines()[-1])
    for variant, want in expected.items():
        for got, ref, what in zip(loaded[variant], want, ("y", "h_n", "c_n"), strict=True):
            assert_close(torch.tensor(got), torch.tensor(ref), "float64", f"{variant} {what}")


def test_export_of_the_functional_cell_with_lengths():
    cell = lstm_multi.get_cell("torch")(
        3, 4, variant="peephole", num_layers=2, bidirectional=True, proj_size=2
    )
    model = CellModel(cell, cell.init(seed=0))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 3, generator=g)  # batch_first, the cell's default
    h0, c0 = torch.randn(4, 3, 2, generator=g), torch.randn(4, 3, 4, generator=g)
    lengths = torch.tensor([5, 2, 4])
    program = torch.export.export(
        model,
        (x, h0, c0, lengths),
        dynamic_shapes=({1: torch.export.Dim("T", min=1)}, None, None, None),
    )
    x2, lengths2 = torch.randn(3, 8, 3, generator=g), torch.tensor([3, 8, 1])
    got = program.module()(x2, h0, c0, lengths2)
    want = model(x2, h0, c0, lengths2)
    for a, b, what in zip(got, want, ("y", "h_n", "c_n"), strict=True):
        assert_close(a.detach(), b.detach(), "float32", what)


def _doubled(z, c_prev):  # a user's variant: "lstm" with its cell input doubled
    i, f, g, o = sigmoid(z.i), sigmoid(z.f), tanh(z.g), sigmoid(z.o)
    c = f * c_prev + 2.0 * i * g
    return o * tanh(c), c


def test_a_users_variant_registered_or_not():
    """Registered: the custom op, any length; not registered: the spec's loop as plain
    ops, exact at the traced length (a loading process could not find it by name)."""
    variant = lstm_multi.Variant("doubled_export_test", _doubled)
    for registered in (True, False):
        if registered:
            lstm_multi.register_variant(variant)
        try:
            torch.manual_seed(0)
            module = LSTM(3, 4, variant=variant).eval()
            x = torch.randn(5, 2, 3)
            program = torch.export.export(module, (x,))
            ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
            assert ("lstm_multi.direction.default" in ops) == registered, ops
            with torch.no_grad():
                assert_close(program.module()(x)[0], module(x)[0], "float32", "y")
        finally:
            lstm_multi.spec.VARIANTS.pop(variant.name, None)


@pytest.mark.parametrize("variant", ["peephole_full"])
def test_the_custom_op_passes_opcheck(variant):
    """The fake implementation's shapes, the schema and the autograd formula (its
    gradients against finite differences are torch.library.opcheck's own checks)."""
    v = lstm_multi.spec.get_variant(variant)
    g = torch.Generator().manual_seed(5)
    h, steps, batch = 3, 4, 2
    shapes = lstm_multi.spec.param_shapes(v, 2, h)
    values = [
        torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
        for s in shapes.values()
    ]
    xs = torch.randn(steps, batch, 2, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(batch, h, generator=g, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(batch, h, generator=g, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, True], [True, True], [True, False], [True, False]])[..., None]
    args = (v.name, v.fingerprint, True, xs, h0, c0, valid, values)
    torch.library.opcheck(torch.ops.lstm_multi.direction.default, args)
    assert torch.autograd.gradcheck(
        lambda *t: torch.ops.lstm_multi.direction(*args[:3], *t[:3], valid, list(t[3:])),
        (xs, h0, c0, *values),
    )


def test_a_variant_registered_with_other_math_is_refused():
    v = lstm_multi.spec.get_variant("peephole")
    values = [torch.zeros(s) for s in lstm_multi.spec.param_shapes(v, 2, 3).values()]
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="computes something else"):
        torch.ops.lstm_multi.direction(
            "peephole", "0" * 64, True, torch.zeros(4, 2, 2), z, z, None, values
        )


@pytest.mark.parametrize("variant", ["nog", "peephole_full"])
def test_gradients_through_the_op_equal_the_eager_ones(variant, monkeypatch):
    """With a projection, two layers, both directions and lengths: the op's autograd
    formula (direction_backward) gives the gradients of the eager path."""
    from lstm_multi.backends import torch_bptt

    cell = lstm_multi.get_cell("torch")(
        3, 4, variant=variant, num_layers=2, bidirectional=True, proj_size=2
    )
    params = [
        [{k: torch.as_tensor(v, dtype=torch.float64) for k, v in p.items()} for p in layer]
        for layer in cell.init(seed=0)
    ]
    leaves = [v.requires_grad_() for layer in params for p in layer for v in p.values()]
    x = torch.randn(3, 5, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 2, 4])

    def grads():
        y, (h, c) = cell(params, x, lengths=lengths)
        loss = (y * y.detach().cos()).sum() + h.sum() + (c * c).sum()
        return torch.autograd.grad(loss, [x, *leaves])

    eager = grads()
    monkeypatch.setattr(torch_bptt, "exporting", lambda tensors: True)  # the op, eagerly
    through_op = grads()
    for a, b in zip(through_op, eager, strict=True):
        assert_close(a, b, "float64", "gradient")


def test_the_op_refuses_wrong_shapes():
    v = lstm_multi.spec.get_variant("peephole")
    values = [torch.zeros(s) for s in lstm_multi.spec.param_shapes(v, 2, 3).values()]
    xs, c0 = torch.zeros(4, 2, 2), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="expects h0"):
        torch.ops.lstm_multi.direction(
            v.name, v.fingerprint, True, xs, torch.zeros(2, 5), c0, None, values
        )
    with pytest.raises(ValueError, match="parameters"):
        torch.ops.lstm_multi.direction(
            v.name, v.fingerprint, True, xs, c0, c0, None, values[:3] + [torch.zeros(2, 3)]
        )


@pytest.mark.parametrize("missing", ["onnx", "onnxscript"])
def test_onnx_export_without_the_onnx_extra_names_it(missing, monkeypatch):
    import lstm_multi.onnx

    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'lstm_multi\[onnx\]'"):
        lstm_multi.onnx.export(LSTM(3, 4), torch.zeros(2, 1, 3), None)
