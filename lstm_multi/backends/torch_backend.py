"""PyTorch backend: the spec in a Python time loop, differentiable with autograd.

Paths, chosen per call:

* native: for the plain variant, PyTorch's own LSTM kernel (``torch._VF.lstm``,
  what ``torch.nn.LSTM`` calls, cuDNN on CUDA), an optional capability tested
  equal to the generic path;
* generic: the spec's loop with each direction one autograd node
  (``torch_bptt``);
* under ``torch.func`` transforms: the spec's loop as plain autograd ops,
  which every transform understands (``torch_bptt.run_direction``).

PyTorch machinery: under ``torch.autocast`` the generic path casts its inputs
and parameters to the autocast dtype once and runs the half-precision policy
of ``lstm_multi.ops`` (float32 cell state and gate math) with autocast off
inside, so a bfloat16/float16 autocast region gives outputs in that dtype and
float32 parameter gradients, as ``nn.LSTM`` does. ``torch.compile`` does not
trace into the cell (``torch.compiler.disable``): the call is one graph break
that runs eagerly, as ``torch.compile`` treats ``nn.LSTM``.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from .. import environment, network, validation
from ..cell import FunctionalCell
from . import torch_bptt, torch_native
from .torch_ops import OPS, TorchOps

__all__ = ["OPS", "Cell", "TorchOps", "generic_forward", "unavailable_reason"]


def unavailable_reason():
    return None


def autocast_dtype(x):
    """The dtype ``torch.autocast`` would compute x's products in, or None.

    None outside an autocast region and for float64 inputs, which autocast
    leaves alone.
    """
    device = x.device.type
    if x.dtype == torch.float64 or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return None if dtype == x.dtype else dtype


def generic_forward(
    variant,
    params,
    x,
    h0,
    c0,
    lengths,
    run_direction=None,
    between_layers=None,
    layer_masks=None,
):
    """The spec's network on the generic path, autocast honoured (see the module doc).

    Time-major x (T, B, in); returns (y, h_n, c_n). ``run_direction`` defaults
    to ``torch_bptt.run_direction``; ``between_layers`` and ``layer_masks`` as in
    ``network.forward``.
    """
    run_direction = run_direction or torch_bptt.run_direction
    dtype = autocast_dtype(x)
    if dtype is not None:
        params = [[{k: v.to(dtype) for k, v in p.items()} for p in layer] for layer in params]
        x, h0, c0 = x.to(dtype), h0.to(dtype), c0.to(dtype)
        if layer_masks is not None:
            layer_masks = [None if m is None else m.to(dtype) for m in layer_masks]
    if x.shape[1] == 0:
        return empty_batch(params, x, h0, c0)
    with torch.autocast(x.device.type, enabled=False):
        y, h_n, c_n, _, _ = network.forward(
            OPS, variant, params, x, h0, c0, lengths, run_direction, between_layers, layer_masks
        )
    return y, h_n, c_n


def empty_batch(params, x, h0, c0):
    """What ``nn.LSTM`` returns for no sequences (x of shape (T, 0, in)): y (T, 0, D * P or
    D * H), h_n = (L * D, 0, P or H) and c_n = (L * D, 0, H), all empty.

    Differentiable as the loop would be: each output is zeros plus one scalar that sums
    every parameter, x, h0 and c0, so that backward reaches each of them with a zero
    gradient (the sum of an empty cotangent), as ``nn.LSTM``'s does; the scalar's value
    is never seen, every output being empty. (The loop itself cannot run: oneDNN's
    products refuse an empty batch.)
    """
    leaves = [a for layer in params for p in layer for a in p.values()] + [x, h0, c0]
    anchor = torch.stack([a.sum().to(x.dtype) for a in leaves]).sum()
    width = h0.shape[-1] * len(params[-1])
    return (
        x.new_zeros((x.shape[0], 0, width)) + anchor,
        h0.new_zeros(h0.shape) + anchor.to(h0.dtype),
        c0.new_zeros(c0.shape) + anchor.to(c0.dtype),
    )


GATE_KERNELS = (None, "array", "triton", "triton_persistent")


def check_gate_kernel(gate_kernel):
    """``gate_kernel`` checked: one of ``GATE_KERNELS``, and triton installed for its kernels."""
    if gate_kernel not in GATE_KERNELS:
        raise ValueError(
            "gate_kernel: expected None, 'array', 'triton' or 'triton_persistent', "
            f"got {gate_kernel!r}"
        )
    if gate_kernel in ("triton", "triton_persistent") and (
        importlib.util.find_spec("triton") is None
    ):
        raise ImportError(
            f"gate_kernel={gate_kernel!r} needs triton, which is not installed: "
            "pip install 'lstm_multi[triton]'"
        )
    return gate_kernel


#: the options ``warn_unused_device_options`` has warned about in this process
_WARNED_OPTIONS = set()


def warn_unused_device_options(gate_kernel, cuda_graphs, x):
    """One ``UserWarning`` per process and option where an option that acts on CUDA tensors
    only is given others (x on the CPU): ``gate_kernel="triton"`` / ``"triton_persistent"``
    (the generated array code runs instead; not under ``TRITON_INTERPRET=1``, where Triton's
    interpreter runs the kernels on the CPU) and ``cuda_graphs=True`` (the loop runs
    directly). Not an error: a module made for a GPU keeps working when moved to the CPU.
    """
    if x.is_cuda:
        return
    device = x.device.type
    if gate_kernel in ("triton", "triton_persistent") and not environment.triton_interpret():
        _warn_once(
            f"gate_kernel={gate_kernel!r}",
            f"has no effect on {device} tensors (Triton runs CUDA tensors, or any under "
            "TRITON_INTERPRET=1): the generated array code runs instead",
        )
    if cuda_graphs:
        _warn_once(
            "cuda_graphs=True",
            f"has no effect on {device} tensors (CUDA graphs replay CUDA work only): the "
            "loop runs directly, as with cuda_graphs=False",
        )


def _warn_once(option, consequence):
    if option in _WARNED_OPTIONS:
        return
    _WARNED_OPTIONS.add(option)
    warnings.warn(
        f"lstm_multi: {option} {consequence}. Warned once per process.",
        UserWarning,
        stacklevel=4,
    )


def direction_runner_for(gate_kernel=None, cuda_graphs=False):
    """The generic path's ``run_direction`` for a ``gate_kernel`` and ``cuda_graphs``.

    None: the CPU kernels for CPU tensors, the array code elsewhere; "array":
    the array code everywhere; "triton": the per-step Triton gate kernels;
    "triton_persistent": the persistent Triton kernels where they fit, else the
    per-step ones. ``cuda_graphs``: CUDA tensors' per-step loops replayed from
    CUDA graphs (``torch_graphs``).
    """
    if gate_kernel in (None, "array"):
        ops, engine_for = torch_bptt.FAST_OPS, None
    else:
        from . import torch_triton

        ops = torch_triton.TRITON_OPS
        persistent = gate_kernel == "triton_persistent"
        engine_for = torch_triton.persistent_engine if persistent else None
    cpu_kernels = gate_kernel is None
    if cuda_graphs:
        from . import torch_graphs

        return torch_graphs.graphed_runner(ops, cpu_kernels, engine_for)
    return torch_bptt.direction_runner_for(ops, cpu_kernels, engine_for)


class Cell(FunctionalCell):
    __doc__ = (
        (FunctionalCell.__doc__ or "")
        + """
    Torch only: ``native=True`` (the default) runs the plain variant on PyTorch's
    own LSTM kernel; ``native=False`` always runs the generic spec loop.
    The generic path runs CPU float32/float64 tensors on the variant's
    compiled CPU kernels (``lstm_multi.backends.kernel_direction``; built with the host
    C++ compiler on first use and cached) and everything else on the
    generated array code. ``gate_kernel="array"`` asks for the array code on
    the CPU too; ``gate_kernel="triton"`` runs each step's gate math as one
    generated Triton kernel (CUDA tensors; float64 keeps the array code; see
    ``torch_triton``); ``gate_kernel="triton_persistent"`` runs each direction's
    whole time loop in one launch of the generated persistent Triton kernels
    (H <= 64, no projection; else the per-step kernels). ``cuda_graphs=True``
    replays each direction's per-step loop on CUDA tensors, forward and
    backward, from a CUDA graph captured on the second call of each shape
    (``torch_graphs``): one host call a direction instead of a few a step;
    it changes nothing on the CPU or on the native path. Given CPU tensors,
    ``gate_kernel="triton"``/``"triton_persistent"`` (outside
    ``TRITON_INTERPRET=1``) and ``cuda_graphs=True`` have no effect: each warns
    once per process (a ``UserWarning`` naming the path that runs instead) and
    the call runs as without it, so that a cell made for a GPU still runs on the CPU.
    Outputs are differentiable with autograd (repeated backward, double
    backward, ``torch.func`` transforms); tensors may live on any device.
    ``device`` (such as "cuda") is where the tensors the cell makes from NumPy
    go (``init``, ``from_numpy``, NumPy inputs); tensors passed in stay where
    they are, and states and gradients the cell creates follow x.
    """
    )

    backend = "torch"
    ops = OPS

    def __init__(
        self, *args, native=True, device=None, gate_kernel=None, cuda_graphs=False, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.native = validation.check_bool("native", native)
        self.cuda_graphs = validation.check_bool("cuda_graphs", cuda_graphs)
        self.device = None if device is None else torch.device(device)
        self.gate_kernel = check_gate_kernel(gate_kernel)

    @property
    def uses_native(self):
        """Whether calls run PyTorch's own kernel (the plain variant, outside torch.func)."""
        return (
            self.native
            and torch_native.supports(self.variant)
            and not torch_bptt.functorch_active()
        )

    # torch.compile: one graph break around the whole call, which runs eagerly
    @torch.compiler.disable
    def __call__(self, params, x, state=None, lengths=None, *, dropout_key=None):
        return super().__call__(params, x, state, lengths, dropout_key=dropout_key)

    __call__.__doc__ = FunctionalCell.__call__.__doc__

    @torch.compiler.disable
    def step(self, params, x_t, state=None):
        return super().step(params, x_t, state)

    step.__doc__ = FunctionalCell.step.__doc__

    @torch.compiler.disable
    def vjp(
        self, params, x, dy, state=None, lengths=None, dh_n=None, dc_n=None, *, dropout_key=None
    ):
        return super().vjp(params, x, dy, state, lengths, dh_n, dc_n, dropout_key=dropout_key)

    vjp.__doc__ = FunctionalCell.vjp.__doc__

    def _to_backend(self, array, name):
        if isinstance(array, torch.Tensor):
            return array
        try:
            return torch.as_tensor(array, device=self.device)
        except (TypeError, RuntimeError) as error:
            raise TypeError(f"{name}: expected a torch tensor or numpy array ({error})") from None

    #: the generic path's time loop; None: ``torch_bptt.run_direction`` (one autograd
    #: node per direction, tested equal to ``network.loop_direction``)
    generic_direction = None

    def _forward(self, params, x, h0, c0, lengths, layer_masks=None):
        warn_unused_device_options(self.gate_kernel, self.cuda_graphs, x)
        if self.uses_native and layer_masks is None:
            return torch_native.forward(params, x, h0, c0, lengths)
        return generic_forward(
            self.variant,
            params,
            x,
            h0,
            c0,
            lengths,
            self._direction_runner(),
            layer_masks=layer_masks,
        )

    def _direction_runner(self):
        """The generic path's ``run_direction`` for this cell's options."""
        if self.gate_kernel is None and not self.cuda_graphs:
            return type(self).generic_direction
        return direction_runner_for(self.gate_kernel, self.cuda_graphs)

    def _vjp(self, params, x, h0, c0, lengths, dy, dh_n, dc_n, layer_masks=None):
        with torch.enable_grad():
            params = self._map(lambda name, a: a.detach().requires_grad_(True), params)
            x, h0, c0 = (a.detach().requires_grad_(True) for a in (x, h0, c0))
            y, h_n, c_n = self._forward(params, x, h0, c0, lengths, layer_masks)
            leaves = [v for layer in params for p in layer for v in p.values()]
            grads = torch.autograd.grad(
                (y, h_n, c_n), [*leaves, x, h0, c0], (dy, dh_n, dc_n), allow_unused=True
            )
        grads = [
            torch.zeros_like(a) if g is None else g
            for a, g in zip([*leaves, x, h0, c0], grads, strict=True)
        ]
        it = iter(grads)
        param_grads = self._map(lambda name, a: next(it), params)
        return param_grads, next(it), next(it), next(it)
