"""``ops`` over PyTorch tensors: the names in which torch differs from NumPy.

Shared by the torch backend's cell, its fused autograd path and the ``nn``
module. Tensors may live on any device; what is made here follows its input.
"""

from __future__ import annotations

import functools
import os

import torch
from torch._subclasses.fake_tensor import is_fake

from ..kernels.cpu_kernels import HostBlas
from ..ops import ArrayModuleOps


@functools.cache
def _mkl_library():
    """The path of torch's ``libtorch_cpu`` when torch was built with MKL (which its
    x86 wheels link into that library, exporting the BLAS), else None."""
    if not torch.backends.mkl.is_available():
        return None
    directory = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


class TorchOps(ArrayModuleOps):
    name = "torch"

    def __init__(self):
        super().__init__(torch)

    def host_values(self, array):
        """As ``ArrayModuleOps.host_values``; a tensor's values also inside ``torch.func``
        transforms (the module's ``host_values``)."""
        if isinstance(array, torch.Tensor):
            return host_values(array)
        return super().host_values(array)

    def sigmoid(self, z):
        return torch.sigmoid(z)

    def rsqrt(self, z):
        return torch.rsqrt(z)

    def row_mean(self, z):
        return torch.mean(z, dim=-1, keepdim=True)

    def stop_gradient(self, x):
        return x.detach()

    def dropout_masks(self, key, shapes, rate, like):
        """As ``ArrayModuleOps.dropout_masks``, drawn by torch on ``like``'s device: key is a
        ``torch.Generator`` on that device (it advances) or anything ``seed_from`` takes."""
        from .. import init

        if isinstance(key, torch.Generator):
            if key.device.type != like.device.type:
                raise ValueError(
                    f"dropout_key: expected a torch.Generator on {like.device.type} (where x "
                    f"is), got one on {key.device.type}"
                )
            generator = key
        else:
            seed = init.seed_from(key, "dropout_key")
            generator = torch.Generator(device=like.device).manual_seed(seed)
        scale = 1.0 / (1.0 - rate)
        return [
            (torch.rand(shape, generator=generator, device=like.device) >= rate).to(like.dtype)
            * scale
            for shape in shapes
        ]

    def random_uniform(self, key, shapes, like):
        """As ``ArrayModuleOps.random_uniform``, drawn by torch on ``like``'s device: a
        ``torch.Generator`` key is drawn from as it stands (it advances); an int or other
        key seeds a generator with the stream (seed, 1)."""
        import numpy as np

        from .. import init

        if isinstance(key, torch.Tensor) and key.numel() == 1 and not key.is_floating_point():
            key = int(key.item())  # an integer seed as a tensor (Keras's)
        if isinstance(key, torch.Generator):
            self.dropout_masks(key, [], 0.0, like)  # the device check
            generator = key
        else:
            seed = init.seed_from(key, "dropout_key")
            state = np.random.SeedSequence([seed, 1]).generate_state(2, np.uint32)
            stream = ((int(state[0]) << 32) | int(state[1])) & (2**63 - 1)
            generator = torch.Generator(device=like.device).manual_seed(stream)
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return [
            torch.rand(shape, generator=generator, device=like.device, dtype=dtype)
            for shape in shapes
        ]

    def cpu_scalar(self, x):
        if x.device.type != "cpu":
            return None
        return {torch.float32: "float", torch.float64: "double"}.get(x.dtype)

    def empty(self, shape, like):
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    def contiguous(self, x):
        return x.contiguous()

    def matmul_into(self, a, b, out):
        return torch.mm(a, b, out=out)

    def address(self, x):
        return x.data_ptr()

    def host_blas(self):
        """torch's MKL, in the library that carries it, and torch's thread count; None
        where torch has no MKL (e.g. ARM builds) or the library is not found."""
        library = _mkl_library()
        return None if library is None else HostBlas(library, torch.get_num_threads())

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
        # gather, not take_along_dim: torch.export of take_along_dim fixes the traced
        # sequence length (its broadcast guards T == the traced T)
        return torch.gather(x, 0, index.expand(x.shape))

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


def host_values(tensor):
    """A tensor's values as NumPy, on any device, also inside ``torch.func`` transforms.

    There even a tensor made outside the transform cannot be read (``.numpy()``:
    "Cannot access data pointer of Tensor that doesn't have storage"); its
    values are read with the transforms set aside. A tensor that varies under
    ``torch.func.vmap`` has no single value: a TypeError says so. None for a tensor
    traced by ``torch.export`` or ``torch.compile`` (a fake tensor, whose values come
    at run time).
    """
    if is_fake(tensor):  # traced by torch.export / torch.compile: no values yet
        return None
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        if functorch.is_batchedtensor(tensor):
            raise TypeError(
                "lengths: expected the same lengths for every vmapped call, got a tensor "
                "mapped over by torch.func.vmap (pass lengths that are not vmapped, with "
                "the batch axis of x holding the sequences)"
            )
        tensor = functorch.get_unwrapped(tensor)
    with torch._C._DisableFuncTorch():
        return tensor.detach().cpu().numpy()
