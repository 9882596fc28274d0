"""The ONNX emitter (``compile/emit_onnx``) against the NumPy evaluation of the same program.

Each variant's forward step, emitted as ONNX nodes, is run by onnx's reference evaluator
(pure Python, no runtime) in float64 and compared with ``compile.evaluate``.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the onnx extra: pip install 'lstm_multi[onnx]'")
from onnx import helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

import lstm_multi  # noqa: E402
from lstm_multi import Variant, sigmoid, tanh  # noqa: E402
from lstm_multi.compile import emit_onnx, evaluate  # noqa: E402


def _odd(z, c_prev, q):  # constants, a subtraction, a negation, h = an input
    c = (1 - sigmoid(z.i)) * c_prev - 0.25 * tanh(-z.g + q.a)
    return c_prev, c


def _row_valued(z, c_prev):  # a row's mean and rsqrt; h_t a per-row value (B, 1) widened
    c = sigmoid(z.f) * c_prev + sigmoid(z.i) * tanh(z.g)
    centred = c - lstm_multi.mean(c)
    return lstm_multi.mean(sigmoid(z.o)), centred * lstm_multi.rsqrt(
        lstm_multi.mean(centred * centred) + 1e-5
    )


VARIANTS = [
    *lstm_multi.spec.VARIANTS.values(),
    Variant("odd", _odd, params={"q": ("a",)}),
    Variant("row_valued", _row_valued),
]


def run_step(variant, inputs):
    step = emit_onnx.forward_step(variant.programs, {"h": "h_t", "c": "c_t"}, prefix="x_")
    double = onnx.TensorProto.DOUBLE
    nodes = [
        helper.make_node(
            "Constant", [], [name], value=helper.make_tensor(name + "_v", double, [], [value])
        )
        for name, value in step.constants.items()
    ]
    axes = helper.make_tensor("axes_v", onnx.TensorProto.INT64, [1], [-1])
    nodes.append(helper.make_node("Constant", [], [emit_onnx.AXES], value=axes))
    nodes += [helper.make_node(n.op_type, list(n.inputs), [n.output]) for n in step.nodes]
    graph = helper.make_graph(
        nodes,
        "step",
        [helper.make_tensor_value_info(name, double, [3, 5]) for name in step.inputs],
        [helper.make_tensor_value_info(name, double, [3, 5]) for name in ("h_t", "c_t")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return ReferenceEvaluator(model).run(None, {name: inputs[name] for name in step.inputs})


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_emitted_step_equals_the_evaluated_program(variant):
    rng = np.random.default_rng(0)
    inputs = {name: rng.standard_normal((3, 5)) for name in variant.programs.forward_inputs}
    h, c = run_step(variant, inputs)
    h_ref, c_ref, _ = evaluate.evaluate_forward(variant.programs, inputs)
    np.testing.assert_allclose(h, h_ref, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(c, c_ref, rtol=1e-14, atol=1e-15)


def test_row_reductions_are_reduce_mean_and_rsqrt_sqrt_then_reciprocal():
    """A row's mean is one ReduceMean over the last axis, rsqrt a Sqrt and a Reciprocal."""
    step = emit_onnx.forward_step(
        lstm_multi.spec.VARIANTS["layernorm"].programs, {"h": "h", "c": "c"}
    )
    ops = [n.op_type for n in step.nodes]
    assert ops.count("ReduceMean") >= 2 and ops.count("Sqrt") == ops.count("Reciprocal") >= 1
    assert all(emit_onnx.AXES in n.inputs for n in step.nodes if n.op_type == "ReduceMean")


def test_every_primitive_has_an_onnx_operator():
    trace = lstm_multi.compile.trace
    assert set(emit_onnx.ONNX_OPS) == set(trace.PRIMITIVES) - set(trace.ARRAY_ONLY)
