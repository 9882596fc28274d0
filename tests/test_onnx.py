"""ONNX export (``lstm_multi.onnx.export``) run in onnxruntime against the oracle.

Every variant: "lstm", "peephole" and "cifg" become the ONNX ``LSTM`` operator, the
others (and any projection) a ``Scan`` whose body is the spec's gate math
(``compile/emit_onnx``). Layers, both directions, an initial state, lengths (through
the functional cell), batch_first, a length other than the traced one, float32 and
float64, and a whole model (Embedding -> LSTM -> Linear).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx", reason="the onnx extra: pip install 'lstm_multi[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'lstm_multi[onnx]'")
pytest.importorskip("onnxscript", reason="the onnx extra: pip install 'lstm_multi[onnx]'")

from cell_module import CellModel  # noqa: E402
from conftest import assert_close  # noqa: E402
from oracle import VARIANTS, oracle  # noqa: E402

import lstm_multi  # noqa: E402
import lstm_multi.onnx  # noqa: E402
from lstm_multi.torch import LSTM  # noqa: E402

NATIVE = {"lstm", "peephole", "cifg"}

#: module options per variant: layers, directions, projection and batch_first spread over them
CASES = {
    "lstm": {"num_layers": 2, "bidirectional": True},  # native=True: the op under export
    "peephole": {"num_layers": 2, "bidirectional": True},
    "peephole_full": {"proj_size": 2, "batch_first": True},
    "nig": {"bidirectional": True},
    "nfg": {},
    "nog": {"batch_first": True},
    "niaf": {"num_layers": 2},
    "noaf": {"bidirectional": True},
    "cifg": {"num_layers": 2, "bidirectional": True, "batch_first": True},
    "layernorm": {"num_layers": 2, "bidirectional": True},
    "layernorm_peephole": {"proj_size": 2, "batch_first": True},
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def run(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, feeds, strict=True)))


def op_types(path):
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def numpy_params(params):
    return [
        [{k: v.detach().numpy().astype(np.float64) for k, v in p.items()} for p in layer]
        for layer in params
    ]


def expected(variant, params, x, h0, c0, lengths=None):
    """The oracle's (y, h_n, c_n), time-major x."""
    dy_width = h0.shape[-1] * len(params[0])
    zeros = np.zeros
    ref = oracle(
        variant, numpy_params(params), x.astype(np.float64), h0.astype(np.float64),
        c0.astype(np.float64), lengths, zeros((x.shape[0], x.shape[1], dy_width)),
        zeros(h0.shape), zeros(c0.shape),
    )  # fmt: skip
    return ref["y"], ref["h_n"], ref["c_n"]


def test_every_variant_is_covered():
    assert set(CASES) == set(VARIANTS)


class Every(torch.nn.Module):
    """One module per variant (``CASES``), each on its own input: one export, one session."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstms = torch.nn.ModuleList(LSTM(3, 4, variant=v, **CASES[v]) for v in CASES)
        with torch.no_grad():  # layer norm's gains and shifts off their initial 1 and 0
            for name, parameter in self.named_parameters():
                if "gamma" in name or "beta" in name:
                    parameter.add_(0.3 * torch.randn_like(parameter))

    def forward(self, inputs):
        out = []
        for k, module in enumerate(self.lstms):
            x, h0, c0 = inputs[3 * k : 3 * k + 3]
            y, (h, c) = module(x, (h0, c0))
            out += [y, h, c]
        return tuple(out)


def every_inputs(model, steps, seed):
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for module in model.lstms:
        layers = module.num_layers * module.num_directions
        shape = (2, steps, 3) if module.batch_first else (steps, 2, 3)
        inputs += [
            torch.randn(shape, generator=g),
            torch.randn(layers, 2, module.proj_size or 4, generator=g),
            torch.randn(layers, 2, 4, generator=g),
        ]
    return inputs


@pytest.fixture(scope="module")
def every_variant(tmp_path_factory):
    """(model, path of its ONNX export with a dynamic time axis)."""
    model = Every().eval()
    path = tmp_path_factory.mktemp("onnx") / "every.onnx"
    steps = torch.export.Dim("T", min=1)
    shapes = []
    for module in model.lstms:
        shapes += [{1 if module.batch_first else 0: steps}, None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lstm_multi.onnx.export(model, (every_inputs(model, 5, 1),), path, dynamic_shapes=[shapes])
    return model, path


def test_every_variant_in_onnxruntime_equals_the_oracle(every_variant):
    """Layers, directions, projection, batch_first, an initial state, at a length
    other than the traced one."""
    model, path = every_variant
    inputs = every_inputs(model, 7, 2)
    outputs = run(path, [a.numpy() for a in inputs])
    for k, (variant, module) in enumerate(zip(CASES, model.lstms, strict=True)):
        x, h0, c0 = inputs[3 * k : 3 * k + 3]
        y, h_n, c_n = outputs[3 * k : 3 * k + 3]
        xt = x.transpose(0, 1) if module.batch_first else x
        want = expected(variant, module.canonical_params(), xt.numpy(), h0.numpy(), c0.numpy())
        assert_close(
            np.swapaxes(y, 0, 1) if module.batch_first else y, want[0], "float32", f"{variant} y"
        )
        assert_close(h_n, want[1], "float32", f"{variant} h_n")
        assert_close(c_n, want[2], "float32", f"{variant} c_n")


def test_the_lstm_operator_runs_lstm_peephole_and_cifg(every_variant):
    """One ONNX LSTM node per direction of "lstm", "peephole" and "cifg", one Scan per
    direction of the others (no projection among the former here)."""
    model, path = every_variant
    directions = {
        v: m.num_layers * m.num_directions for v, m in zip(CASES, model.lstms, strict=True)
    }
    nodes = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert nodes.count("LSTM") == sum(n for v, n in directions.items() if v in NATIVE)
    assert nodes.count("Scan") == sum(n for v, n in directions.items() if v not in NATIVE)
    lstm_nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "LSTM"]
    forget = sorted(a.i for n in lstm_nodes for a in n.attribute if a.name == "input_forget")
    assert forget.count(1) == directions["cifg"], forget


@pytest.mark.parametrize(
    "variant, dtype",
    [("peephole", torch.float32), ("nog", torch.float64), ("cifg", torch.float64)],
)
def test_cell_with_lengths_in_onnxruntime_equals_the_oracle(variant, dtype, tmp_path, thorough):
    """Bidirectional, two layers, lengths: each direction reverses within its length
    (the LSTM operator's sequence_lens in float32, the Scan's Where in float64)."""
    if variant == "cifg" and not thorough:
        pytest.skip("one more float64 variant under --thorough")
    cell = lstm_multi.get_cell("torch")(
        3, 4, variant=variant, num_layers=2, bidirectional=True, batch_first=False
    )
    params = [
        [{k: torch.as_tensor(v, dtype=dtype) for k, v in p.items()} for p in layer]
        for layer in cell.init(seed=0)
    ]
    model = CellModel(cell, params)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 3, generator=g, dtype=dtype)
    h0, c0 = (torch.randn(4, 3, 4, generator=g, dtype=dtype) for _ in range(2))
    lengths = torch.tensor([6, 2, 4])
    path = tmp_path / "cell.onnx"
    lstm_multi.onnx.export(model, (x, h0, c0, lengths), path)
    # float64: onnxruntime's LSTM kernel is float32 only, so every direction is a Scan
    assert ("LSTM" in op_types(path)) == (variant in NATIVE and dtype == torch.float32)
    y, h_n, c_n = run(path, [a.numpy() for a in (x, h0, c0, lengths)])
    want = expected(variant, params, x.numpy(), h0.numpy(), c0.numpy(), lengths.numpy())
    name = "float64" if dtype == torch.float64 else "float32"
    assert_close(y, want[0], name, "y")
    assert_close(h_n, want[1], name, "h_n")
    assert_close(c_n, want[2], name, "c_n")


class Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 3)
        self.lstm = LSTM(3, 4, variant="peephole", bidirectional=True, batch_first=True)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, tokens):
        return self.head(self.lstm(self.embed(tokens))[0])


def test_a_model_holding_the_lstm_exports_whole(tmp_path):
    torch.manual_seed(0)
    model = Tagger().eval()
    tokens = torch.randint(0, 10, (2, 5))
    path = tmp_path / "tagger.onnx"
    lstm_multi.onnx.export(model, (tokens,), path, dynamic_shapes=({1: "T"},))
    longer = torch.randint(0, 10, (2, 9))
    (got,) = run(path, [longer.numpy()])
    with torch.no_grad():
        want = model(longer).numpy()
    assert "LSTM" in op_types(path)
    assert_close(got, want, "float32", "logits")


def test_plain_torch_onnx_export_with_the_translation_table(tmp_path):
    torch.manual_seed(0)
    module = LSTM(3, 4, variant="noaf").eval()
    x = torch.randn(5, 2, 3)
    path = tmp_path / "plain.onnx"
    torch.onnx.export(
        module, (x,), path, dynamo=True,
        custom_translation_table=lstm_multi.onnx.translation_table(),
    )  # fmt: skip
    y, _, _ = run(path, [x.numpy()])
    with torch.no_grad():
        assert_close(y, module(x)[0].numpy(), "float32", "y")
