"""One LSTM direction as a PyTorch custom op, ``torch.ops.lstm_multi.direction``: what
``torch.export``, the ONNX exporters and ``torch.compile`` see in place of the CPU kernels.

The generated CPU kernels read raw memory (``data_ptr``), which ``torch.export`` and
``torch.compile`` trace with fake tensors that have none. Registered as an opaque op with
a fake implementation (the output shapes) and an autograd formula (a second op,
``direction_backward``, running the derived BPTT), a direction is one node of an exported
program, whatever the sequence length: T stays symbolic (``torch.export.Dim``), which the
spec's loop written out as plain ops (what ``torch.jit.trace`` records) cannot give.

Schema::

    lstm_multi::direction(str variant, str fingerprint, bool cpu_kernels,
                          Tensor xs, Tensor h0, Tensor c0, Tensor? valid, Tensor[] values)
        -> (Tensor ys, Tensor h_n, Tensor c_n)

xs (T, B, in), h0 (B, P or H), c0 (B, H), valid (T, B, 1) booleans or None (every step
valid), ``values`` the canonical parameters in the order ``torch_bptt.parameter_keys`` gives (W, U,
b, the variant's own, W_hr with a projection); ys (T, B, P or H). The variant travels by name and is looked up in the process
that runs the op, so a program exported with a user's variant loads where that variant
is registered (``lstm_multi.register_variant``) under the same name and computes the
same thing (its ``fingerprint`` is checked). The op is registered on import of this
module, which ``import lstm_multi.torch`` (through ``torch_backend``) does: a process loading an exported program
imports ``lstm_multi.torch`` first.
"""

from __future__ import annotations

import torch

from .. import spec
from . import torch_bptt

__all__ = ["backward", "direction", "lookup_variant"]


def lookup_variant(name: str, fingerprint: str) -> spec.Variant:
    """The registered variant ``name``, checked to compute what ``fingerprint`` says."""
    try:
        variant = spec.get_variant(name)
    except ValueError:
        raise ValueError(
            f"lstm_multi::direction: variant {name!r} is not registered in this process; "
            "a program exported with a user's variant runs where that Variant is registered "
            "(lstm_multi.register_variant) under the same name"
        ) from None
    if variant.fingerprint != fingerprint:
        raise ValueError(
            f"lstm_multi::direction: the variant registered as {name!r} here (fingerprint "
            f"{variant.fingerprint[:12]}) computes something else than the one the program "
            f"was made with (fingerprint {fingerprint[:12]})"
        )
    return variant


def _checked(variant, xs, h0, c0, valid, values):
    """The parameters by key, every shape checked (the kernels read raw memory: a wrong
    shape must be an error here, never a read past an array)."""
    keys = torch_bptt.parameter_keys(variant, len(values))
    if xs.dim() != 3 or h0.dim() != 2 or c0.dim() != 2:
        raise ValueError(
            "lstm_multi::direction: expected xs (T, B, in), h0 (B, P or H), c0 (B, H), got "
            f"{tuple(xs.shape)}, {tuple(h0.shape)}, {tuple(c0.shape)}"
        )
    steps, batch, size = xs.shape
    hidden = c0.shape[1]
    proj = h0.shape[1] if spec.PROJECTION in keys else 0
    want = spec.param_shapes(variant, size, hidden, proj)
    got = {key: tuple(v.shape) for key, v in zip(keys, values, strict=True)}
    if list(got.values()) != list(want.values()) or h0.shape != (batch, proj or hidden):
        raise ValueError(
            f"lstm_multi::direction: variant {variant.name!r} with xs {tuple(xs.shape)} and "
            f"c0 {tuple(c0.shape)} expects h0 {(batch, proj or hidden)} and parameters "
            f"{want}, got h0 {tuple(h0.shape)} and {got}"
        )
    if valid is not None and tuple(valid.shape) != (steps, batch, 1):
        raise ValueError(
            f"lstm_multi::direction: expected valid of shape {(steps, batch, 1)}, got "
            f"{tuple(valid.shape)}"
        )
    return dict(zip(keys, values, strict=True))


def _engine(variant, cpu_kernels, p, xs, h0, c0):
    return torch_bptt.engine_for_tensors(variant, p, xs, h0, c0, cpu_kernels)


@torch.library.custom_op("lstm_multi::direction", mutates_args=())
def direction(
    variant: str,
    fingerprint: str,
    cpu_kernels: bool,
    xs: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    valid: torch.Tensor | None,
    values: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One direction forward (see the module doc): -> (ys, h_n, c_n)."""
    v = lookup_variant(variant, fingerprint)
    p = _checked(v, xs, h0, c0, valid, values)
    engine = _engine(v, cpu_kernels, p, xs, h0, c0)
    with torch.no_grad():
        ys, h, c, _ = engine.forward(v, p, xs, h0, c0, valid, record=False)
    # outputs may not alias each other or the inputs (a state carried unchanged may)
    return ys.clone(), h.clone(), c.clone()


@direction.register_fake
def _(variant, fingerprint, cpu_kernels, xs, h0, c0, valid, values):
    return (
        xs.new_empty((xs.shape[0], h0.shape[0], h0.shape[-1])),
        torch.empty_like(h0),
        (torch.empty_like(c0)),
    )


@torch.library.custom_op("lstm_multi::direction_backward", mutates_args=())
def backward(
    variant: str,
    fingerprint: str,
    cpu_kernels: bool,
    xs: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    valid: torch.Tensor | None,
    values: list[torch.Tensor],
    dys: torch.Tensor,
    dh: torch.Tensor,
    dc: torch.Tensor,
) -> list[torch.Tensor]:
    """The gradients of ``direction``: [dxs, dh0, dc0, *dvalues]. The forward runs again
    keeping its tape (an opaque op cannot hand its tape over), then the derived BPTT."""
    v = lookup_variant(variant, fingerprint)
    p = _checked(v, xs, h0, c0, valid, values)
    keys = list(p)
    if dys.shape != (*xs.shape[:2], h0.shape[1]) or dh.shape != h0.shape or dc.shape != c0.shape:
        raise ValueError(
            "lstm_multi::direction_backward: expected dys, dh, dc shaped as ys, h_n, c_n, "
            f"got {tuple(dys.shape)}, {tuple(dh.shape)}, {tuple(dc.shape)}"
        )
    engine = _engine(v, cpu_kernels, p, xs, h0, c0)
    with torch.no_grad():
        _, _, _, tape = engine.forward(v, p, xs, h0, c0, valid, record=True)
        grads, dxs, dh0, dc0 = engine.backward(v, p, tape, dys, dh, dc, valid)
    return [dxs.clone(), dh0.clone(), dc0.clone(), *(grads[k].clone() for k in keys)]


@backward.register_fake
def _(variant, fingerprint, cpu_kernels, xs, h0, c0, valid, values, dys, dh, dc):
    return [torch.empty_like(a) for a in (xs, h0, c0, *values)]


def _setup_context(ctx, inputs, output):
    ctx.inputs = inputs[:3]
    ctx.save_for_backward(inputs[3], inputs[4], inputs[5], inputs[6], *inputs[7])


def _backward(ctx, dys, dh, dc):
    xs, h0, c0, valid, *values = ctx.saved_tensors
    dys, dh, dc = (
        torch.zeros_like(like) if g is None else g for g, like in ((dys, xs), (dh, h0), (dc, c0))
    )
    if dys.shape[-1] != h0.shape[-1]:  # (zeros_like(xs) has the input's width)
        dys = xs.new_zeros((xs.shape[0], h0.shape[0], h0.shape[-1]))
    dxs, dh0, dc0, *dvalues = torch.ops.lstm_multi.direction_backward(
        *ctx.inputs, xs, h0, c0, valid, values, dys.contiguous(), dh, dc
    )
    return None, None, None, dxs, dh0, dc0, None, dvalues


direction.register_autograd(_backward, setup_context=_setup_context)
