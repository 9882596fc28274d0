"""ONNX export of models holding ``lstm_multi.torch.LSTM`` (or the functional torch cell).

``export(model, args, path)`` runs PyTorch's ONNX exporter (``torch.onnx.export`` with
``dynamo=True``) with a translation for the custom op each LSTM direction is under
``torch.export`` (``lstm_multi::direction``, ``backends/torch_library``), so a whole
model (an embedding, the LSTM, a head) becomes one ONNX graph that onnxruntime runs.
Plain ``torch.onnx.export(model, args, dynamo=True)`` cannot find the translation on
its own: pass ``custom_translation_table=lstm_multi.onnx.translation_table()`` there.

A direction becomes:

* the ONNX ``LSTM`` operator (``direction="forward"``; the directions, layers and the
  reversal of each sequence within its length are the surrounding graph's) where it
  computes the variant exactly: "lstm", "peephole" (``P`` = our peephole rows
  (i, f, o) reordered to ONNX's (i, o, f)) and "cifg" (``input_forget=1``: ONNX's
  f = 1 - i, with ``P`` = (p_i, p_o, 0)), without a projection. ONNX's gate blocks are
  (i, o, f, c) on the rows of ``W`` (1, 4H, in) and ``R`` (1, 4H, H), ours (i, f, g, o)
  on the columns of W (in, 4H) and U (H, 4H); ``B`` is (b, 0), (1, 8H); lengths arrive
  as ``sequence_lens``, the initial state as ``initial_h``/``initial_c``. In float32
  only: onnxruntime's LSTM kernel refuses float64, which goes to the Scan;
* an ONNX ``Scan`` over time otherwise (a projection, "peephole_full", "nig", "nfg",
  "nog", "niaf", "noaf", a registered variant of one's own), whose body is the spec's
  traced forward gate math emitted as ONNX nodes (``compile/emit_onnx``), after one
  ``MatMul`` for the recurrence and before the projection ``MatMul``; a sequence past
  its length keeps its state and outputs zero (``Where``).

Variant "lstm" with ``native=True`` is exported as the others are: under ``torch.export``
the modules run the custom op in place of ``nn.LSTM``'s kernel, which exports with the
traced sequence length only. The ``onnx`` extra installs what this needs:
``pip install 'lstm_multi[onnx]'`` (onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import importlib

__all__ = ["export", "native_form", "translation_table"]

#: the ONNX opset written (Split with ``num_outputs`` needs 18)
OPSET = 18


def _require(module):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise ImportError(
            f"lstm_multi.onnx needs {module.split('.')[0]}, which is not installed: "
            "pip install 'lstm_multi[onnx]'"
        ) from error


#: built-in variant -> (ONNX P's rows (i, o, f): our row name or None for zeros,
#: input_forget) for the variants the ONNX LSTM operator computes exactly
_NATIVE = {
    "lstm": (None, 0),
    "peephole": (("i", "o", "f"), 0),
    "cifg": (("i", "o", None), 1),
}


def native_form(variant, projected=False, float64=False):
    """(peephole rows, input_forget) where the ONNX ``LSTM`` operator computes ``variant``
    exactly, else None (then a ``Scan`` runs it). Decided by what the variant computes
    (``spec.builtin_name``), never by its name. Not with a projection (the operator has
    none), nor in float64: the operator allows double, but onnxruntime's LSTM kernel
    refuses it ("LSTM operator does not support double yet"), so a float64 direction
    is written as the Scan, which it runs."""
    from . import spec

    if projected or float64:
        return None
    return _NATIVE.get(spec.builtin_name(spec.get_variant(variant)) or "")


def translation_table():
    """``{torch.ops.lstm_multi.direction.default: translation}`` for
    ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``."""
    from . import torch as _registers_the_op  # noqa: F401 (else an ImportError naming [torch])

    _require("onnxscript")
    import torch

    return {torch.ops.lstm_multi.direction.default: _direction}


def export(model, args, path=None, *, kwargs=None, dynamic_shapes=None, **options):
    """Export ``model`` called on ``args`` to ONNX at ``path`` (``torch.onnx.export`` with
    ``dynamo=True``, the translation of ``translation_table`` and opset ``OPSET``); returns
    the ``torch.onnx.ONNXProgram``. ``dynamic_shapes`` as for ``torch.export.export``
    (e.g. ``({0: "T"},)`` for a time-major input whose length varies); ``options`` go to
    ``torch.onnx.export`` as they are."""
    table = translation_table()
    _require("onnx")
    import torch

    _check_variants(model)
    table.update(options.pop("custom_translation_table", None) or {})
    return torch.onnx.export(
        model,
        tuple(args) if isinstance(args, (tuple, list)) else (args,),
        path,
        kwargs=kwargs,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        custom_translation_table=table,
        opset_version=options.pop("opset_version", OPSET),
        **options,
    )


def _check_variants(model):
    """A NotImplementedError naming the first lstm_multi module of ``model`` whose variant
    the ONNX step cannot write (``GatePrograms.kernel_refusal`` with row reductions and split
    halves allowed: none today; the check stands for operations the language gains later)."""
    for name, module in getattr(model, "named_modules", lambda: [])():
        variant = getattr(module, "_variant_spec", None)
        why = None if variant is None else variant.programs.kernel_refusal(True, True)
        if why is not None:
            raise NotImplementedError(
                f"model: module {name or '(the model)'!r} runs the variant {variant.name!r}, "
                f"whose gate math has {why}: not yet in the ONNX export (torch.export and "
                "the array engines run it)"
            )


# the translation of lstm_multi::direction --------------------------------------------


def _direction(variant, fingerprint, cpu_kernels, xs, h0, c0, valid=None, values=()):
    """ONNX nodes for one direction: xs (T, B, in), h0 (B, P or H), c0 (B, H), valid
    (T, B, 1) or None, the canonical parameters -> (ys (T, B, P or H), h_n, c_n)."""
    from .backends import torch_bptt, torch_library

    v = torch_library.lookup_variant(variant, fingerprint)
    p = dict(zip(torch_bptt.parameter_keys(v, len(values)), values, strict=True))
    return _one_direction(v, p, xs, h0, c0, valid, c0.shape[-1], xs.dtype)


def _one_direction(variant, p, xs, h0, c0, valid, hidden, dtype):
    """The ONNX LSTM operator where it computes the direction exactly, else the Scan.
    ``hidden``: H; ``dtype``: the ``onnx_ir.DataType`` of xs (values made by ops inside a
    translation carry no shapes or types)."""
    from . import spec

    double = dtype == _require("onnx_ir").DataType.DOUBLE
    form = native_form(variant, spec.PROJECTION in p, double)
    if form is not None:
        return _native_lstm(variant, p, xs, h0, c0, valid, hidden, *form)
    return _scan(variant, p, xs, h0, c0, valid, hidden, dtype)


def _op():
    return _require("onnxscript").opset18


def _gate_blocks(op, matrix, hidden, axis):
    """Our gate blocks (i, f, g, o) of ``matrix`` along ``axis``, as a dict."""
    from .spec import GATE_ORDER

    return {
        gate: op.Slice(matrix, [k * hidden], [(k + 1) * hidden], [axis])
        for k, gate in enumerate(GATE_ORDER)
    }


def _lengths(op, valid):
    """(T, B, 1) booleans -> (B,) int32 valid steps, ONNX's ``sequence_lens``."""
    counts = op.ReduceSum(op.Cast(valid, to=6), [0], keepdims=0)  # 6: INT32
    return op.Reshape(counts, [-1])


def _native_lstm(variant, p, xs, h0, c0, valid, hidden, rows, input_forget):
    op = _op()

    def onnx_order(matrix, axis):  # ours (i, f, g, o) -> ONNX's (i, o, f, c)
        blocks = _gate_blocks(op, matrix, hidden, axis)
        return op.Concat(blocks["i"], blocks["o"], blocks["f"], blocks["g"], axis=axis)

    W = op.Unsqueeze(op.Transpose(onnx_order(p["W"], 1), perm=[1, 0]), [0])
    R = op.Unsqueeze(op.Transpose(onnx_order(p["U"], 1), perm=[1, 0]), [0])
    b = onnx_order(p["b"], 0)
    B = op.Unsqueeze(op.Concat(b, op.Sub(b, b), axis=0), [0])
    inputs = [xs, W, R, B, None if valid is None else _lengths(op, valid)]
    inputs += [op.Unsqueeze(h0, [0]), op.Unsqueeze(c0, [0])]
    if rows is not None:
        ours = variant.params["p"]
        peep = p["p"]
        picked = []
        for row in rows:
            if row is None:
                picked.append(op.Sub(picked[0], picked[0]))  # zeros (H,)
            else:
                k = ours.index(row)
                picked.append(op.Reshape(op.Slice(peep, [k], [k + 1], [0]), [-1]))
        inputs.append(op.Unsqueeze(op.Concat(*picked, axis=0), [0]))
    while inputs[-1] is None:
        inputs.pop()
    y, h_n, c_n = op.LSTM(
        *inputs, hidden_size=hidden, input_forget=input_forget, direction="forward"
    )
    return op.Squeeze(y, [1]), op.Squeeze(h_n, [0]), op.Squeeze(c_n, [0])


def _scan(variant, p, xs, h0, c0, valid, hidden, dtype):
    """A ``Scan`` over time whose body is the variant's gate math (``emit_onnx``)."""
    from . import spec
    from .compile import emit_onnx

    onnx = _require("onnx")
    ir = _require("onnx_ir")
    from torch.onnx._internal.exporter import _core, _tensors

    op = _op()
    elem = dtype.value  # the ONNX TensorProto data type
    # the input half of every step at once (x W + b; x W alone for split halves, whose
    # gate math adds b), and U with the unused blocks zeroed
    zx = op.MatMul(xs, p["W"]) if variant.split else op.Add(op.MatMul(xs, p["W"]), p["b"])
    U = p["U"]
    if variant.unused_recurrent_gates:
        mask = [
            0.0 if gate in variant.unused_recurrent_gates else 1.0
            for gate in spec.GATE_ORDER
            for _ in range(hidden)
        ]
        U = op.Mul(U, op.CastLike(op.Constant(value_floats=mask), U))
    rows = [
        (f"{name}_{row}", name, k)
        for name, names in variant.params.items()
        for k, row in enumerate(names)
    ]
    carried = [("U", U)] + [
        (label, op.Reshape(op.Slice(p[name], [k], [k + 1], [0]), [-1])) for label, name, k in rows
    ]
    if variant.split:  # b's rows (i, f, g, o): the gate blocks of the (4H,) bias
        carried += [
            (f"b_{gate}", op.Slice(p["b"], [k * hidden], [(k + 1) * hidden], [0]))
            for k, gate in enumerate(spec.GATE_ORDER)
        ]
    projected = spec.PROJECTION in p
    if projected:
        carried.append(("W_hr", p[spec.PROJECTION]))

    helper = onnx.helper
    step = emit_onnx.forward_step(
        variant.programs, {"h": "m_new" if projected else "h_new", "c": "c_new"}, prefix="s_"
    )
    r = "h" if variant.recurrent_state == "h" else "c_prev"
    nodes = [helper.make_node("MatMul", [r, "U"], ["rU"])]
    if variant.split:  # the halves apart: zx_i ... zx_o and zr_i ... zr_o
        for half, value in (("zx", "zx_t"), ("zr", "rU")):
            names = [f"{half}_{g}" for g in spec.GATE_ORDER]
            nodes.append(helper.make_node("Split", [value], names, axis=1, num_outputs=4))
    else:
        nodes.append(helper.make_node("Add", ["zx_t", "rU"], ["z"]))
        names = [f"z_{g}" for g in spec.GATE_ORDER]
        nodes.append(helper.make_node("Split", ["z"], names, axis=1, num_outputs=4))
    if any(n.op_type == "ReduceMean" for n in step.nodes):
        axes = helper.make_tensor(emit_onnx.AXES + "_value", onnx.TensorProto.INT64, [1], [-1])
        nodes.append(helper.make_node("Constant", [], [emit_onnx.AXES], value=axes))
    for name, value in step.constants.items():
        tensor = helper.make_tensor(name + "_value", elem, [], [value])
        nodes.append(helper.make_node("Constant", [], [name], value=tensor))
    nodes += [helper.make_node(n.op_type, list(n.inputs), [n.output]) for n in step.nodes]
    if projected:
        nodes.append(helper.make_node("MatMul", ["m_new", "W_hr"], ["h_new"]))
    outputs = ["h_new", "c_new", "h_new"]
    if valid is not None:
        zero = helper.make_tensor("zero_value", elem, [], [0.0])
        nodes += [
            helper.make_node("Constant", [], ["zero"], value=zero),
            helper.make_node("Where", ["v_t", "h_new", "h"], ["h_out"]),
            helper.make_node("Where", ["v_t", "c_new", "c_prev"], ["c_out"]),
            helper.make_node("Where", ["v_t", "h_new", "zero"], ["y_t"]),
        ]
        outputs = ["h_out", "c_out", "y_t"]
    else:
        nodes.append(helper.make_node("Identity", ["h_new"], ["y_t"]))
        outputs = ["h_new", "c_new", "y_t"]
    for label, _ in carried:  # weights carried through the steps unchanged
        nodes.append(helper.make_node("Identity", [label], [label + "_out"]))

    def info(name):
        return helper.make_tensor_value_info(name, elem, None)

    graph_inputs = [info("h"), info("c_prev")] + [info(label) for label, _ in carried]
    graph_inputs.append(info("zx_t"))
    if valid is not None:
        graph_inputs.append(helper.make_tensor_value_info("v_t", onnx.TensorProto.BOOL, None))
    graph_outputs = [info(outputs[0]), info(outputs[1])]
    graph_outputs += [info(label + "_out") for label, _ in carried] + [info(outputs[2])]
    body = helper.make_graph(nodes, f"{variant.name}_step", graph_inputs, graph_outputs)
    scan_inputs = [zx] + ([] if valid is None else [valid])
    state = [h0, c0] + [value for _, value in carried]
    tracer = _core.current_tracer
    results = [_tensors.SymbolicTensor(tracer.opset) for _ in range(len(state) + 1)]
    node = ir.Node(
        "",
        "Scan",
        inputs=[*state, *scan_inputs],
        attributes=[
            ir.AttrGraph("body", ir.serde.deserialize_graph(body)),
            ir.AttrInt64("num_scan_inputs", len(scan_inputs)),
        ],
        outputs=results,
        version=OPSET,
    )
    tracer.nodes.append(node)
    return results[-1], results[0], results[1]
