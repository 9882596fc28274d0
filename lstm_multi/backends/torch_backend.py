"""PyTorch backend: the spec in a Python time loop, gradients by autograd.

For the plain variant a native path runs PyTorch's own LSTM kernel
(``torch._VF.lstm``, what ``torch.nn.LSTM`` calls, cuDNN on CUDA); it is an
optional capability, tested equal to the generic path.
"""

from __future__ import annotations

import torch

from .. import network
from ..cell import FunctionalCell
from ..ops import ArrayModuleOps
from . import torch_native


def unavailable_reason():
    return None


class TorchOps(ArrayModuleOps):
    name = "torch"

    def __init__(self):
        super().__init__(torch)

    def sigmoid(self, z):
        return torch.sigmoid(z)

    def zeros(self, shape, like):
        return torch.zeros(shape, dtype=like.dtype, device=like.device)

    def arange(self, n, like):
        return torch.arange(n, dtype=like.dtype, device=like.device)

    def concat(self, arrays, axis):
        return torch.cat(arrays, dim=axis)

    def stack(self, arrays, axis):
        return torch.stack(arrays, dim=axis)

    def unstack_time(self, x):
        # unbind, not x[t]: indexing inside the loop makes autograd's backward ~5x slower
        return x.unbind(0)

    def swap_batch_time(self, x):
        return x.transpose(0, 1)

    def flip_time(self, x):
        return torch.flip(x, (0,))

    def take_time(self, x, index):
        return torch.take_along_dim(x, index, dim=0)

    def sum(self, x, axis):
        return torch.sum(x, dim=axis)

    def is_array(self, x):
        return isinstance(x, torch.Tensor)

    def asarray(self, x):
        return torch.as_tensor(x)

    def to_numpy(self, x):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()  # NumPy has no bfloat16
        return x.numpy()

    def on_device_of(self, x, like):
        return x.to(like.device)

    def astype(self, x, dtype_name):
        return x.to(getattr(torch, dtype_name))


OPS = TorchOps()


class Cell(FunctionalCell):
    __doc__ = (
        (FunctionalCell.__doc__ or "")
        + """
    Torch only: ``native=True`` (the default) runs the plain variant on PyTorch's
    own LSTM kernel; ``native=False`` always runs the generic spec loop.
    Outputs are differentiable with autograd; tensors may live on any device.
    ``device`` (such as "cuda") is where the tensors the cell makes from NumPy
    go (``init``, ``from_numpy``, NumPy inputs); tensors passed in stay where
    they are, and states and gradients the cell creates follow x.
    """
    )

    backend = "torch"
    ops = OPS

    def __init__(self, *args, native=True, device=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.native = bool(native)
        self.device = None if device is None else torch.device(device)

    @property
    def uses_native(self):
        return self.native and torch_native.supports(self.variant)

    def _to_backend(self, array, name):
        if isinstance(array, torch.Tensor):
            return array
        try:
            return torch.as_tensor(array, device=self.device)
        except (TypeError, RuntimeError) as error:
            raise TypeError(f"{name}: expected a torch tensor or numpy array ({error})") from None

    #: the generic path's time loop; None: ``torch_fused.run_direction`` (one autograd
    #: node per direction, tested equal to ``network.loop_direction``)
    generic_direction = None

    def _forward(self, params, x, h0, c0, lengths):
        if self.uses_native:
            return torch_native.forward(params, x, h0, c0, lengths)
        run = type(self).generic_direction
        if run is None:
            from .torch_fused import run_direction as run
        y, h_n, c_n, _, _ = network.forward(self.ops, self.variant, params, x, h0, c0, lengths, run)
        return y, h_n, c_n

    def _vjp(self, params, x, h0, c0, lengths, dy, dh_n, dc_n):
        with torch.enable_grad():
            params = self._map(lambda name, a: a.detach().requires_grad_(True), params)
            x, h0, c0 = (a.detach().requires_grad_(True) for a in (x, h0, c0))
            y, h_n, c_n = self._forward(params, x, h0, c0, lengths)
            leaves = [v for layer in params for p in layer for v in p.values()]
            grads = torch.autograd.grad(
                (y, h_n, c_n), [*leaves, x, h0, c0], (dy, dh_n, dc_n), allow_unused=True
            )
        grads = [
            torch.zeros_like(a) if g is None else g for a, g in zip([*leaves, x, h0, c0], grads)
        ]
        it = iter(grads)
        param_grads = self._map(lambda name, a: next(it), params)
        return param_grads, next(it), next(it), next(it)
