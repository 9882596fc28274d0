"""The torch backend's generic path: each direction one ``torch.autograd.Function`` around BPTT.

The whole direction is one autograd node (``BpttDirection``), run by one of two
engines:

* ``KernelEngine`` (CPU tensors of float32 or float64, where the host C++
  compiler built the variant's kernels): the generated CPU kernels of
  ``kernel_direction``, one fused gate call per step (or the whole time loop in
  C for small steps), BLAS/oneDNN for the products;
* ``LoopEngine`` (everything else, and ``gate_kernel="array"``): the spec's
  generated array code over ``ops`` in a Python loop (``network.loop_direction``
  forward, ``bptt.backward_direction`` backward: one ``dz U^T`` per step, then
  three whole-sequence GEMMs). On the CPU in float32 its per-step products call
  oneDNN (``torch.ops.mkldnn._linear_pointwise``) where that measured faster.

Autograd over a Python time loop would record a dozen nodes per step and replay
them one by one; here the forward runs with autograd off, keeping a tape.
Double backward (``create_graph=True``) differentiates the reference loop
(``network.loop_direction``) under autograd instead, so higher-order gradients
are exact too. Tested equal to the reference path in tests/test_fast_paths.py
and against the oracle in tests/test_cpu_kernels.py.
"""

from __future__ import annotations

import functools

import torch

from .. import bptt, network, spec
from . import kernel_direction
from .torch_ops import TorchOps


def _mkldnn_linear():
    """``torch.ops.mkldnn._linear_pointwise`` where this torch build has it, else None."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def onednn_beats_blas():
    """Whether oneDNN's products beat torch's BLAS on this CPU.

    Not where torch's BLAS is MKL on an Intel CPU (2-core Xeon, float32: the input
    projection at T100 B64 I128 H256 5.5 against 6.7 ms, the backward's three
    whole-sequence products 20 against 36 ms, a step's product 118 against 150 us;
    benchmarks/NOTES.md section 12). Elsewhere yes (an AMD host: addmm 8.7 against
    oneDNN 3.6 ms, NOTES section 1; CPUs without MKL).
    """
    return not (torch.backends.mkl.is_available() and _cpu_vendor() == "GenuineIntel")


def _cpu_vendor():
    """The CPU's vendor string from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD"), or ""."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _recorded(*tensors):
    """Whether autograd records an op on ``tensors`` now (then no in-place update).

    Inside ``BpttDirection.forward`` grad mode is off, so the same fused
    in-place products run there as without autograd, and the numbers do not
    depend on whether a gradient will be taken.
    """
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class OneDnnTorchOps(TorchOps):
    """TorchOps whose products use oneDNN where it is faster (called with autograd off)."""

    name = "torch_bptt"

    def __init__(self, use_mkldnn=None):
        """``use_mkldnn``: None (oneDNN where it beats the BLAS, ``onednn_beats_blas``),
        True (wherever torch has it) or False (never)."""
        super().__init__()
        if use_mkldnn is None:
            use_mkldnn = onednn_beats_blas()
        self.linear = _mkldnn_linear() if use_mkldnn else None

    def _onednn(self, t):
        return self.linear is not None and t.device.type == "cpu" and t.dtype == torch.float32

    def _lp(self, a, w_out_in, bias=None):
        """a @ w_out_in^T (+ bias) by oneDNN."""
        return self.linear(a, w_out_in, bias, "none", [], "")

    def project(self, xs, W, b):
        t, n, size = xs.shape
        x2 = xs.reshape(t * n, size)
        if self._project_on_onednn(x2, W):
            z = self._lp(x2.contiguous(), W.t().contiguous(), b.contiguous())
        else:
            z = torch.addmm(b, x2, W)
        return z.view(t, n, W.shape[1])

    def project_into(self, xs, W, b, out):
        t, n, size = xs.shape
        x2 = xs.reshape(t * n, size)
        if self._project_on_onednn(x2, W):
            return self.project(xs, W, b)
        torch.addmm(b, x2, W, out=out.view(t * n, W.shape[1]))
        return out

    def _project_on_onednn(self, x2, W):
        large = x2.shape[0] * W.numel() >= self.ONEDNN_MIN_MACS  # oneDNN's call costs ~50 us
        return large and self._onednn(x2) and not _recorded(x2, W)

    #: below this many multiply-adds a step, ``torch.addmm`` beats oneDNN's per-call
    #: overhead (crossover measured near 1M: B4 H64 5 vs 14 us, B64 H256 212 vs 94 us)
    ONEDNN_MIN_MACS = 1 << 20

    def _use_onednn(self, a, w):
        """oneDNN for a @ w^T when w was prepared for it and the product is large enough."""
        return (
            w is not None and a.dtype == w.dtype and a.shape[0] * w.numel() >= self.ONEDNN_MIN_MACS
        )

    def prepare_step_weight(self, U):
        # (U, U^T made contiguous once per call for oneDNN, which takes (out, in) weights)
        return U, (U.t().contiguous() if self._onednn(U) else None)

    def step_gemm(self, r, weight, zx_t):
        U, U_t = weight
        if self._use_onednn(r, U_t):
            return self.linear(r, U_t, None, "none", [], "").add_(zx_t)
        return self.add_matmul(zx_t, r, U)

    def add_matmul(self, z, a, b):
        a = self.cast(a, self.dtype_name(b))
        if _recorded(z, a, b):
            return z + a @ b
        return z.addmm_(a, b)

    def prepare_step_weight_t(self, U):
        # (U^T, U contiguous for oneDNN)
        return U.t(), (U.contiguous() if self._onednn(U) else None)

    def step_gemm_t(self, dz, weight):
        U_t, U = weight
        dz = self.cast(dz, self.dtype_name(U_t))
        if self._use_onednn(dz, U):
            return self.linear(dz.contiguous(), U, None, "none", [], "")
        return dz @ U_t

    def sequence_grads(self, x2, r2, dz2, W):
        """(X^T dZ, R^T dZ, dZ W^T); with oneDNN, dZ^T is made contiguous once for two of them."""
        if self._onednn(dz2) and x2.dtype == r2.dtype == W.dtype == dz2.dtype:
            dz_t = dz2.t().contiguous()
            return (
                self._lp(x2.t().contiguous(), dz_t),
                self._lp(r2.t().contiguous(), dz_t),
                self._lp(dz2.contiguous(), W.contiguous()),
            )
        return super().sequence_grads(x2, r2, dz2, W)


FAST_OPS = OneDnnTorchOps()
REFERENCE_OPS = TorchOps()  # plain products, differentiable by autograd


def _flatten_tape(tape):
    """(xs, rs, caches) -> a flat tuple of tensors (for ``save_for_backward``)."""
    xs, rs, caches = tape
    return (xs, *rs, *(t for cache in caches for t in cache))


def _unflatten_tape(tensors, steps):
    """Inverse of ``_flatten_tape``: every step's cache has the same length."""
    xs, rest = tensors[0], tensors[1:]
    rs, flat = list(rest[:steps]), rest[steps:]
    width = len(flat) // steps
    caches = [tuple(flat[t * width : (t + 1) * width]) for t in range(steps)]
    return xs, rs, caches


class LoopEngine:
    """A direction as the spec's array code in a Python loop over ``ops`` (any device)."""

    def __init__(self, ops):
        self.ops = ops

    def forward(self, variant, p, xs, h0, c0, valid, record):
        ys, h, c, tape = network.loop_direction(self.ops, variant, p, xs, h0, c0, valid, record)
        return ys, h, c, (_flatten_tape(tape) if record else ())

    def backward(self, variant, p, tape, dys, dh, dc, valid):
        tape = _unflatten_tape(tape, tape[0].shape[0])
        return bptt.backward_direction(self.ops, variant, p, tape, dys, dh, dc, valid)


class KernelEngine:
    """A direction on the variant's compiled CPU kernels (``kernel_direction``)."""

    def __init__(self, ops, kernels):
        self.ops, self.kernels = ops, kernels

    def forward(self, variant, p, xs, h0, c0, valid, record):
        ys, h, c, tape = kernel_direction.forward_direction(
            self.ops, self.kernels, variant, p, xs, h0, c0, valid, record
        )
        return ys, h, c, ((*tape[:4], tape.ms) if record else ())

    def backward(self, variant, p, tape, dys, dh, dc, valid):
        xs, hs, cs, saved, ms = tape
        tape = kernel_direction.KernelTape(xs, hs, cs, saved, self.kernels, ms)
        return kernel_direction.backward_direction(
            self.ops, self.kernels, variant, p, tape, dys, dh, dc, valid
        )


class BpttDirection(torch.autograd.Function):
    """One direction of one layer as a single autograd node (see the module doc).

    ``engine`` (a ``LoopEngine`` or ``KernelEngine``) runs the forward, keeping
    its tape, and the backward. Everything the backward needs (the inputs and
    the tape) goes through ``ctx.save_for_backward``, so autograd owns it as it
    owns ``nn.LSTM``'s: a second backward with ``retain_graph=True`` works, and
    one without it raises PyTorch's own "backward through the graph a second
    time".
    """

    @staticmethod
    def forward(ctx, engine, variant, valid, keys, xs, h0, c0, *values):
        p = dict(zip(keys, values, strict=True))
        ys, h, c, tape = engine.forward(variant, p, xs, h0, c0, valid, record=True)
        ctx.engine, ctx.variant, ctx.valid, ctx.keys = engine, variant, valid, keys
        ctx.save_for_backward(h0, c0, *values, *tape)
        return ys, h, c

    @staticmethod
    def backward(ctx, dys, dh, dc):
        h0, c0, *saved = ctx.saved_tensors
        values, tape = saved[: len(ctx.keys)], saved[len(ctx.keys) :]
        xs = tape[0]
        p = dict(zip(ctx.keys, values, strict=True))
        needs = ctx.needs_input_grad[4:]
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the reference loop, so that the
            # gradients are themselves differentiable
            inputs = [xs, h0, c0, *values]
            wanted = [a for a, n in zip(inputs, needs, strict=True) if n]
            with torch.enable_grad():
                ys, h, c, _ = network.loop_direction(
                    REFERENCE_OPS, ctx.variant, p, xs, h0, c0, ctx.valid
                )
                found = iter(
                    torch.autograd.grad(
                        (ys, h, c), wanted, (dys, dh, dc), create_graph=True, allow_unused=True
                    )
                )
            grads = [next(found) if n else None for n in needs]
            return (None, None, None, None, *grads)
        with torch.autocast(xs.device.type, enabled=False):
            grads, dxs, dh0, dc0 = ctx.engine.backward(ctx.variant, p, tape, dys, dh, dc, ctx.valid)
        out = [dxs, dh0, dc0, *(grads[k] for k in ctx.keys)]
        return (
            None,
            None,
            None,
            None,
            *(g if n else None for g, n in zip(out, needs, strict=True)),
        )


def engine_for_tensors(variant, p, xs, h0, c0, cpu_kernels=True, fast_ops=FAST_OPS):
    """The engine that runs a direction on these tensors: the variant's CPU kernels where
    ``cpu_kernels`` and they apply (host float32/float64, a compiler), else the array loop."""
    kernels = (
        kernel_direction.direction_kernels(fast_ops, variant, p, xs, h0, c0)
        if cpu_kernels
        else None
    )
    return LoopEngine(fast_ops) if kernels is None else KernelEngine(fast_ops, kernels)


def parameter_keys(variant: spec.Variant, count: int) -> list[str]:
    """The canonical keys of ``count`` parameter values, in their order: W, U, b, the
    variant's own, and W_hr where there is one more (a projection)."""
    keys = ["W", "U", "b", *variant.params]
    return keys + [spec.PROJECTION] if count == len(keys) + 1 else keys


def _exported_direction(variant, p, xs, h0, c0, valid, cpu_kernels):
    """A direction under ``torch.export`` / ``torch.compile`` (fake tensors): one call of
    the custom op ``lstm_multi::direction`` (``torch_library``), whose sequence length
    stays symbolic. A variant not registered under its name cannot be found again by a
    process loading the program: its loop is recorded as plain ops instead, unrolled
    over the traced length (as ``torch.jit.trace`` records it)."""
    if not spec.is_registered(variant):
        ys, h, c, _ = network.loop_direction(REFERENCE_OPS, variant, p, xs, h0, c0, valid)
        return ys, h, c, None
    keys = parameter_keys(variant, len(p))
    ys, h, c = torch.ops.lstm_multi.direction(
        variant.name, variant.fingerprint, cpu_kernels, xs, h0, c0, valid, [p[k] for k in keys]
    )
    return ys, h, c, None


def exporting(tensors) -> bool:
    """Whether ``tensors`` are being traced with fake tensors (``torch.export``, the ONNX
    exporters, ``torch.compile``): then the kernels, which read memory, cannot run and
    the custom op ``lstm_multi::direction`` (``torch_library``, registered by
    ``torch_backend``) stands in for them."""
    if torch.compiler.is_compiling():
        return True
    from torch._guards import detect_fake_mode  # noqa: PLC0415

    return detect_fake_mode(list(tensors)) is not None


def functorch_active():
    """True inside ``torch.func`` transforms (grad, vmap, jacrev, ...).

    There the autograd.Function above is not used: the transforms need every
    op visible to them, so the direction runs the reference loop under
    autograd instead (``run_direction``).
    """
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def direction_runner(fast_ops, cpu_kernels=True, engine_for=None):
    """``network.loop_direction``'s contract on the fast path (no tape is returned).

    One ``BpttDirection`` node when a gradient is wanted, the loop under
    ``no_grad`` otherwise, and the reference loop (plain torch ops that every
    transform understands) under ``torch.func`` transforms and ``torch.jit.trace``
    (which records the loop unrolled over the traced sequence length). With
    ``cpu_kernels``, CPU float32/float64 tensors run on the variant's compiled
    CPU kernels where they can be built; everything else runs the array code
    over ``fast_ops``. ``engine_for(variant, p, xs, h0, c0)``, where given, may supply
    another engine (``torch_triton``'s persistent kernels) or None.
    """

    def run_direction(ops, variant, p, xs, h0, c0, valid):
        if functorch_active() or torch.jit.is_tracing():
            ys, h, c, _ = network.loop_direction(REFERENCE_OPS, variant, p, xs, h0, c0, valid)
            return ys, h, c, None
        tensors = (xs, h0, c0, *p.values())
        if exporting(tensors):
            return _exported_direction(variant, p, xs, h0, c0, valid, cpu_kernels)
        engine = None if engine_for is None else engine_for(variant, p, xs, h0, c0)
        if engine is None:
            engine = engine_for_tensors(variant, p, xs, h0, c0, cpu_kernels, fast_ops)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            ys, h, c = BpttDirection.apply(engine, variant, valid, tuple(p), *tensors)
            return ys, h, c, None
        with torch.no_grad():
            ys, h, c, _ = engine.forward(variant, p, xs, h0, c0, valid, record=False)
        return ys, h, c, None

    return run_direction


#: one runner per (ops, cpu_kernels, engine_for), made on first use
direction_runner_for = functools.cache(direction_runner)

run_direction = direction_runner_for(FAST_OPS, True, None)
#: the same without the CPU kernels: the array code everywhere (``gate_kernel="array"``)
array_run_direction = direction_runner_for(FAST_OPS, False, None)
