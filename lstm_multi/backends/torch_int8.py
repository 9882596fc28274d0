"""int8 dynamic quantisation of a layer-direction's products, for CPU inference.

The weights are quantised once, symmetric, per output channel (one scale per gate
unit, zero point 0)::

    s_j = max_i |w_ij| / 127        q_ij = round(w_ij / s_j) in [-127, 127]

and each product's activation a (rows of x, of r, of m) is quantised dynamically,
per tensor and per call, by PyTorch's fbgemm/x86 kernel (``quantized::linear_dynamic``,
what ``torch.ao.nn.quantized.dynamic.LSTM`` runs): unsigned, asymmetric, over
[min(a, 0), max(a, 0)] in 7 bits on fbgemm, x86 and onednn (``reduce_range``: their int16
accumulation would saturate with 8; measured 0.3 against 0.01 error on a (8, 256)
product), so ``s_a = (max - min) / 127``. The product is exact in int32 and scaled
back to float32. So, per entry of a product (activation error <= s_a / 2, weight
error <= s_j / 2)::

    |a w_j - (a w_j)_int8| <= (s_a / 2) sum_i |w_ij| + (s_j / 2) sum_i |a_i| + n s_a s_j / 4

A direction runs, with float32 everywhere else:

    zx = int8(x W) + b           (T, B, 4H): one int8 GEMM for the whole sequence,
                                 the bias added in float
    z_t = zx_t + int8(r U)       per step; r = h_{t-1} (or c_{t-1}, as the variant
                                 says); U's unused gate blocks zeroed before quantising
    m_t, c_t = gates(z_t, ...)   the variant's GENERATED gate code: the CPU kernels'
                                 step function (``compile/emit_cpu``), or the
                                 variant's array code where no kernels are built here
    h_t = int8(m_t W_hr)         with a projection (P, H); else h_t = m_t

For a split-halves variant (the layer norms: ``Variant.halves == "split"``) zx is
int8(x W) alone and the gate math reads [zx_t, int8(r U)] apart, with b one of its
float parameters (as ``step.step_forward`` in float). A layer norm divides each row
of a product by that row's deviation, so a row of small activations, quantised on
the scale of the tensor's largest, would have its rounding error blown up (0.47 off
the float module seen): there each product quantises its activation rows scaled to
a max of 1 and scales the rows of the result back (``row_scaled``: exact in float,
so each row keeps 7 bits of its own).

The variant's own per-unit parameters (peepholes) and the biases stay float32. No
gradient: the products are not differentiable (inference only). The network
around the directions (layers, bidirectional, lengths and masks, states) is
``network.forward``'s, as in the float module.

PyTorch 2.13 marks ``torch.quantize_per_channel`` (used here to hand fbgemm its int8
weights) and ``torch.ao.quantization`` deprecated in favour of torchao; this module
keeps the first's warning quiet where it calls it, and says so in docs/deployment.md.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch

from .. import network, spec
from ..kernels.cpu_kernels import cpu_kernels
from ..step import gate_params, recurrent_weight
from . import kernel_direction
from .torch_ops import OPS

#: the quantised engines whose int8 activations take 7 bits (``reduce_range``), as
#: PyTorch's own default dynamic qconfig does on x86: with 8 bits a (8, 256) x (256, 1024)
#: product was off by 0.26 on fbgemm, x86 and onednn alike on the AMD EPYC (0.018 with 7);
#: qnnpack ignores the flag (and warns that it does)
REDUCE_RANGE_ENGINES = ("fbgemm", "x86", "onednn")

#: the int8 product's op; the tests count its calls (a silent float path would make none)
LINEAR_DYNAMIC = "quantized::linear_dynamic"


class Int8Weight(NamedTuple):
    """One weight (out, in) in int8: ``weight`` the per-channel qint8 tensor (what
    ``state_dict`` holds), ``packed`` fbgemm's prepacked form (with the bias, if any),
    ``reduce_range`` whether activations take 7 bits."""

    weight: Any
    packed: Any
    reduce_range: bool

    def __call__(self, a):
        """a (N, in) float32 -> a w^T (+ bias) (N, out) float32 through int8."""
        return torch.ops.quantized.linear_dynamic(a.contiguous(), self.packed, self.reduce_range)


def quantize_weight(weight_out_in):
    """(out, in) float -> (out, in) qint8 per output channel, symmetric (see the module doc);
    an all-zero row keeps a tiny scale and quantises to zeros."""
    weight = weight_out_in.detach().to(torch.float32).contiguous()
    scale = (weight.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.zeros(weight.shape[0], dtype=torch.int64)
    with warnings.catch_warnings():  # deprecated in torch 2.13 in favour of torchao (module doc)
        warnings.filterwarnings("ignore", message=".*quantize_per_channel.*", category=Warning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
        return torch.quantize_per_channel(weight, scale.double(), zero, 0, torch.qint8)


def pack(qweight, bias=None):
    """A qint8 (out, in) weight (and a float bias (out,)) -> ``Int8Weight`` on the current
    quantised engine (``torch.backends.quantized.engine``)."""
    engine = torch.backends.quantized.engine
    packed = torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach())
    return Int8Weight(qweight, packed, engine in REDUCE_RANGE_ENGINES)


def quantize_direction(variant, p):
    """A layer-direction's canonical float parameters -> its int8 parameters: "W" (the
    input projection, bias b inside, float), "U" (the recurrent weight with its unused
    blocks zeroed), "W_hr" (with a projection) as ``Int8Weight``; the variant's own
    parameters float32 as they are."""
    variant = spec.get_variant(variant)
    U = recurrent_weight(OPS, variant, p["U"].detach())
    b = p["b"].detach().to(torch.float32).contiguous()
    out = {
        # split halves: x W without b, which the gate math reads as a parameter
        "W": pack(quantize_weight(p["W"].T), None if variant.split else b),
        "U": pack(quantize_weight(U.T)),
    }
    if variant.split:
        out["b"] = b
    for key in variant.params:
        out[key] = p[key].detach().to(torch.float32).contiguous()
    if spec.PROJECTION in p:
        out[spec.PROJECTION] = pack(quantize_weight(p[spec.PROJECTION].T))
    return out


def dequantized(variant, q):
    """The float parameters that the int8 ones stand for (weights dequantised; the bias
    and the variant's own as kept): {"W", "U", "b", ...} canonical, for comparisons."""
    W, b = torch.ops.quantized.linear_unpack(q["W"].packed)
    b = q["b"] if spec.get_variant(variant).split else b
    out = {"W": W.dequantize().T, "U": q["U"].weight.dequantize().T, "b": b}
    for key in spec.get_variant(variant).params:
        out[key] = q[key]
    if spec.PROJECTION in q:
        out[spec.PROJECTION] = q[spec.PROJECTION].weight.dequantize().T
    return out


def row_scaled(product, a):
    """``product(a)`` (a bias-free int8 product) with each row of a (..., n) quantised on
    its own scale: product(a / s) * s, s = max |a_row| (rows of zeros kept as they are)."""
    scale = a.abs().amax(-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return product(a / scale) * scale


def run_direction(ops, variant, q, xs, h0, c0, valid):
    """``network.loop_direction``'s contract with int8 products (see the module doc):
    xs (T, B, in), h0 (B, H or P), c0 (B, H), valid (T, B, 1) or None; ``q`` from
    ``quantize_direction``. Returns (ys, h_T, c_T, None)."""
    steps, batch, hidden = xs.shape[0], c0.shape[0], c0.shape[-1]
    rows = xs.reshape(steps * batch, xs.shape[2])
    zx = row_scaled(q["W"], rows) if variant.split else q["W"](rows)
    zx = zx.view(steps, batch, 4 * hidden)
    kernels = cpu_kernels(variant, "float")
    if kernels is None:
        return _array_direction(variant, q, zx, h0, c0, valid)
    return _kernel_direction(kernels, variant, q, zx, h0, c0, valid)


def _kernel_direction(kernels, variant, q, zx, h0, c0, valid):
    """The per-step loop on the variant's generated CPU step kernel: it reads z_t's two
    halves, zx_t and the int8 product r U, and writes m_t (as its y), h and c. With a
    projection the kernel's h is scratch (m held), and h_t = int8(m_t W_hr), held
    past the length, as ``kernel_direction._forward_projected`` does in float."""
    steps, batch, hidden = zx.shape[0], c0.shape[0], c0.shape[-1]
    projected = spec.PROJECTION in q
    width = h0.shape[-1]
    P = kernel_direction.packed_params(OPS, variant, q, c0)
    hs = c0.new_empty((steps + 1, batch, width))
    cs = c0.new_empty((steps + 1, batch, hidden))
    ms = c0.new_empty((steps, batch, hidden))  # m_t, zero past the length
    ys = c0.new_empty((steps, batch, width)) if projected else ms
    hs[0], cs[0] = h0, c0
    held = c0.new_empty((batch, hidden))  # the kernel's own h under a projection: scratch
    no_h = c0.new_zeros((batch, hidden))
    v_bytes = None if valid is None else valid.reshape(steps, batch).contiguous()
    # the step's operands as views made once and addresses by arithmetic: a tensor index a
    # step costs microseconds, which at B=1 is a fair share of the step
    rs = (cs if variant.recurrent_state == "c" else hs).unbind(0)
    state, gates = 4 * batch * hidden, 4 * 4 * batch * hidden  # bytes of (B, H), (B, 4H)
    z_at, c_at, m_at = zx.data_ptr(), cs.data_ptr(), ms.data_ptr()
    h_at, h_step = hs.data_ptr(), 4 * batch * width
    v_at = None if v_bytes is None else v_bytes.data_ptr()
    held_at, no_h_at, p_at = held.data_ptr(), no_h.data_ptr(), P.data_ptr()
    step, linear, U = kernels.step_forward, torch.ops.quantized.linear_dynamic, q["U"]
    W_hr = q.get(spec.PROJECTION)
    h_steps, m_steps, y_steps = hs.unbind(0), ms.unbind(0), ys.unbind(0)
    for t in range(steps):
        if variant.split:  # r U (B, 4H) float32, each row on its own scale (module doc)
            product = row_scaled(U, rs[t])
        else:
            product = linear(rs[t], U.packed, U.reduce_range)
        h_in, h_out = (no_h_at, held_at) if projected else (h_at, h_at + h_step)
        step(
            batch, hidden, z_at + t * gates, product.data_ptr(), h_in, c_at + t * state,
            p_at, None if v_at is None else v_at + t * batch, h_out, c_at + (t + 1) * state,
            m_at + t * state, None,
        )  # fmt: skip
        h_at += h_step
        if projected:
            y = W_hr(m_steps[t])  # zero past the length, as m_t is
            y_steps[t].copy_(y)
            h_steps[t + 1].copy_(y if valid is None else torch.where(valid[t], y, h_steps[t]))
    return ys, hs[steps], cs[steps], None


def _array_direction(variant, q, zx, h0, c0, valid):
    """The same loop on the variant's generated array code (``ops.gates_forward``), where
    no CPU kernels are built here (no compiler, or ``LSTM_MULTI_CPU_KERNELS=0``)."""
    W_hr = q.get(spec.PROJECTION)
    extra = gate_params(network.extra_params(q))
    if variant.split:
        extra["b"] = q["b"]
    h, c, ys = h0, c0, []
    for t in range(zx.shape[0]):
        r = c if variant.recurrent_state == "c" else h
        zr = row_scaled(q["U"], r) if variant.split else q["U"](r)
        z = torch.cat([zx[t], zr], -1) if variant.split else zx[t] + zr
        m, c_new, _ = OPS.gates_forward(variant, z, c, extra)
        h_new = m if W_hr is None else W_hr(m)
        if valid is None:
            h, c, y = h_new, c_new, h_new
        else:
            y = torch.where(valid[t], h_new, torch.zeros_like(h_new))
            h, c = torch.where(valid[t], h_new, h), torch.where(valid[t], c_new, c)
        ys.append(y)
    return torch.stack(ys), h, c, None


def forward(variant, qparams, x, h0, c0, lengths):
    """The whole network in int8 (``network.forward`` over ``run_direction``): x (T, B, in)
    float32, h0 (L * D, B, H or P), c0 (L * D, B, H), lengths (B,) or a (T, B) mask or
    None; ``qparams[layer][direction]`` from ``quantize_direction``. Returns
    (y (T, B, D * (H or P)), h_n, c_n)."""
    variant = spec.get_variant(variant)
    with torch.no_grad():
        y, h_n, c_n, _, _ = network.forward(
            OPS, variant, qparams, x, h0, c0, lengths, run_direction
        )
    return y, h_n, c_n
