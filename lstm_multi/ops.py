"""The array operations the spec and the network code call, per backend.

The array API standard leaves gaps the LSTM needs (no sigmoid, no in-place
updates on JAX, different names for gather and flip), so each backend gives one
small ``Ops`` object that fills them; the math calls only these names and the
operators ``+ - * @``. ``ArrayModuleOps`` serves every NumPy-like module (NumPy
and CuPy); the torch and jax backends subclass it where their names differ.
"""

from __future__ import annotations

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class ArrayModuleOps:
    """Operations over a NumPy-like array module ``xp``."""

    name = "numpy"

    def __init__(self, xp):
        self.xp = xp

    # gate nonlinearities
    def sigmoid(self, z):
        # 0.5 * tanh(z / 2) + 0.5 equals 1 / (1 + exp(-z)) and cannot overflow.
        return 0.5 * self.xp.tanh(0.5 * z) + 0.5

    def tanh(self, z):
        return self.xp.tanh(z)

    # the gate math of one step; a backend overrides these with fused kernels
    def gates_forward(self, variant, z, c_prev, extra):
        """``variant.gates_forward`` (see ``lstm_multi.spec``), or a fused equivalent."""
        return variant.gates_forward(self, z, c_prev, extra)

    def gates_backward(self, variant, dh, dc, cache, extra):
        """``variant.gates_backward``, or a fused equivalent."""
        return variant.gates_backward(self, dh, dc, cache, extra)

    # construction and shape
    def zeros(self, shape, like):
        return self.xp.zeros(shape, dtype=like.dtype)

    def zeros_like(self, x):
        return self.xp.zeros_like(x)

    def arange(self, n, like):
        return self.xp.arange(n, dtype=like.dtype)

    def concat(self, arrays, axis):
        return self.xp.concatenate(arrays, axis=axis)

    def stack(self, arrays, axis):
        return self.xp.stack(arrays, axis=axis)

    def unstack_time(self, x):
        return [x[t] for t in range(x.shape[0])]

    def reshape(self, x, shape):
        return x.reshape(shape)

    def transpose(self, matrix):
        return matrix.T

    def swap_batch_time(self, x):
        return self.xp.swapaxes(x, 0, 1)

    def flip_time(self, x):
        return x[::-1]

    def take_time(self, x, index):
        """x[index[t, n], n, :] for a (T, B, 1) integer index."""
        return self.xp.take_along_axis(x, self.xp.broadcast_to(index, x.shape), axis=0)

    # reductions and selection
    def sum(self, x, axis):
        return self.xp.sum(x, axis=axis)

    def where(self, condition, a, b):
        return self.xp.where(condition, a, b)

    # conversion
    def is_array(self, x):
        return isinstance(x, self.xp.ndarray)

    def asarray(self, x):
        return self.xp.asarray(x)

    def to_numpy(self, x):
        import numpy as np

        return np.asarray(x)

    def on_device_of(self, x, like):
        """x on the device that holds ``like`` (a no-op where there is one device)."""
        return x

    def dtype_name(self, x):
        return str(x.dtype).removeprefix("torch.")

    def astype(self, x, dtype_name):
        return x.astype(dtype_name)
