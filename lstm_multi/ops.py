"""The array operations the spec and the network code call, per backend.

The array API standard leaves gaps the LSTM needs (no sigmoid, no in-place
updates on JAX, different names for gather and flip), so each backend gives one
small ``Ops`` object that fills them; the math calls only these names and the
operators ``+ - * @``. ``ArrayModuleOps`` serves every NumPy-like module (NumPy
and CuPy); the torch and jax backends subclass it where their names differ.
"""

from __future__ import annotations

import contextlib

import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
#: half-precision dtypes; for these the gate math runs in float32 (see ``state_dtype``)
HALF_DTYPES = ("float16", "bfloat16")


class ArrayModuleOps:
    """Operations over a NumPy-like array module ``xp``."""

    name = "numpy"

    def __init__(self, xp):
        self.xp = xp

    # gate nonlinearities
    def sigmoid(self, z):
        """1 / (1 + exp(-z)), accurate to a few ulp in both tails.

        For z < 0, exp(-z) is large and its reciprocal keeps full relative
        accuracy: sigma(-20) = 2.06e-9 in float32, where 0.5 * tanh(z / 2) + 0.5
        gives 0 (tanh rounds to -1). Past z = -88 (float32) exp(-z) overflows to
        inf and sigma to 0, the correctly rounded float32 result anyway; the
        overflow is expected, so NumPy is asked not to warn of it. (A select
        between two branches would cost 10x more: NumPy's ``where`` on these
        sizes is slower than ``exp``.)
        """
        xp = self.xp
        with self._overflow_allowed():
            e = xp.exp(-z)
            e += 1
            return xp.reciprocal(e, out=e)

    def _overflow_allowed(self):
        """A context in which the array module does not warn of an overflow to inf."""
        errstate = getattr(self.xp, "errstate", None)
        return errstate(over="ignore") if errstate is not None else contextlib.nullcontext()

    def tanh(self, z):
        return self.xp.tanh(z)

    def rsqrt(self, z):
        """1 / sqrt(z) (the gate math's ``rsqrt``; z > 0)."""
        return 1 / self.xp.sqrt(z)

    def row_mean(self, z):
        """The mean over the last axis (a row's H units), kept as (..., 1) so that it
        broadcasts against the row (the gate math's ``mean``)."""
        return self.xp.mean(z, axis=-1, keepdims=True)

    # the gate math of one step; a backend overrides these with fused kernels
    #
    # Half precision (float16, bfloat16): the matrix products of a step run in
    # the input dtype, the gate math in float32, and the cell state c is kept in
    # float32 from step to step (``state_dtype``); h is rounded to the input
    # dtype each step, and c_n at the end of the sequence. In the backward the
    # preactivation gradients dz and every sum over time and batch (dW, dU, db
    # and the variant's own parameters) stay in float32, and each gradient is
    # rounded to its parameter's dtype once, at the end (``bptt``).
    def gates_forward(self, variant, z, c_prev, extra):
        """``variant.gates_forward`` (see ``lstm_multi.spec``), or a fused equivalent.

        Returns h in z's dtype and c (and the cache) in ``state_dtype`` of it.
        """
        io = self.dtype_name(z)
        state = self.state_dtype(io)
        if state == io:
            return variant.gates_forward(self, z, c_prev, extra)
        extra = {k: self.cast(v, state) for k, v in extra.items()}
        h, c, cache = variant.gates_forward(
            self, self.cast(z, state), self.cast(c_prev, state), extra
        )
        return self.cast(h, io), c, cache

    def gates_backward(self, variant, dh, dc, cache, extra):
        """``variant.gates_backward``, or a fused equivalent.

        dz, dc_{t-1} and the extra grads come back in ``state_dtype`` (float32
        for half-precision inputs): they are summed over time and batch later.
        """
        state = self.state_dtype(self.dtype_name(dh))
        if self.dtype_name(dh) == self.dtype_name(dc) == state:
            return variant.gates_backward(self, dh, dc, cache, extra)
        extra = {k: self.cast(v, state) for k, v in extra.items()}
        return variant.gates_backward(
            self, self.cast(dh, state), self.cast(dc, state), cache, extra
        )

    # the matrix products; a backend may route them to faster GEMMs or accumulate
    # in place. Each default is the plain product.
    def project(self, xs, W, b):
        """x_t W + b for every step as one (T*B, in) x (in, 4H) product -> (T, B, 4H).

        The result is fresh: the steps may accumulate into it (``step_gemm``).
        """
        t, n, size = xs.shape
        z = self.reshape(xs, (t * n, size)) @ W + b
        return self.reshape(z, (t, n, W.shape[1]))

    def project_into(self, xs, W, b, out):
        """``project`` written into ``out`` (T, B, 4H), a C-contiguous buffer the caller
        made (the CPU kernels put theirs on huge pages: benchmarks/NOTES.md section
        12). Returns the projection: ``out``, unless a backend's faster product
        makes its own array."""
        t, n, size = xs.shape
        out2 = self.reshape(out, (t * n, W.shape[1]))
        self.xp.matmul(self.reshape(self.contiguous(xs), (t * n, size)), W, out=out2)
        out2 += b
        return out

    def prepare_step_weight(self, U):
        """U in the form ``step_gemm`` takes, made once per direction and call."""
        return U

    def step_gemm(self, r, U_step, zx):
        """zx + r U for one step (zx is one step of ``project``'s result)."""
        return self.add_matmul(zx, r, U_step)

    def prepare_step_weight_t(self, U):
        """U^T in the form ``step_gemm_t`` takes."""
        return self.transpose(U)

    def step_gemm_t(self, dz, U_step_t):
        """dz U^T for one step of the backward, in U's dtype (dz is cast to it)."""
        return self.cast(dz, self.dtype_name(U_step_t)) @ U_step_t

    def sequence_grads(self, x2, r2, dz2, W):
        """(X^T dZ, R^T dZ, dZ W^T) over all T*B rows (2-d arrays), in dz2's dtype.

        dz2 is in ``state_dtype`` (float32 for half-precision inputs): the
        products then run in float32 on exactly converted inputs, so the sums
        over time and batch are never rounded to the half type.
        """
        dtype = self.dtype_name(dz2)
        x2, r2, W = (self.cast(a, dtype) for a in (x2, r2, W))
        return self.transpose(x2) @ dz2, self.transpose(r2) @ dz2, dz2 @ self.transpose(W)

    def add_matmul(self, z, a, b):
        """``z + a @ b``, with ``a`` first cast to b's dtype.

        ``z`` is the caller's scratch (one step's slice of the input
        projection): a backend may accumulate into it in place and return it.
        """
        return z + self.cast(a, self.dtype_name(b)) @ b

    def state_dtype(self, dtype_name):
        """The dtype the cell state and gate math use for inputs of ``dtype_name``."""
        return "float32" if dtype_name in HALF_DTYPES else dtype_name

    def stop_gradient(self, x):
        """``x`` cut from the graph of derivatives (NumPy has none: ``x`` itself)."""
        return x

    def dropout_masks(self, key, shapes, rate, like):
        """Inverted-dropout masks, one per shape: each entry 0 with probability ``rate``,
        else 1 / (1 - rate), in ``like``'s dtype and on its device.

        key: what ``lstm_multi.init.seed_from`` takes (an int, a NumPy or torch
        generator, a JAX key); the masks are drawn in order from one generator
        seeded by it, so the same int or key gives the same masks.
        """
        from . import init

        rng = np.random.default_rng(init.seed_from(key, "dropout_key"))
        scale = 1.0 / (1.0 - rate)
        masks = [(rng.random(shape) >= rate) * scale for shape in shapes]
        return [self.astype(self.asarray(m), self.dtype_name(like)) for m in masks]

    def random_uniform(self, key, shapes, like):
        """Uniform draws in [0, 1), one array per shape, on ``like``'s device, for the
        masks of ``lstm_multi.regularize``: from a stream apart from ``dropout_masks``'
        (NumPy: ``default_rng([seed, 1])`` where that is ``default_rng(seed)``), so the
        same int or key gives the same draws and the inter-layer masks stay as they were.
        """
        from . import init

        rng = np.random.default_rng([init.seed_from(key, "dropout_key"), 1])
        return [self.asarray(rng.random(shape)) for shape in shapes]

    # raw memory, for the compiled CPU kernels (``lstm_multi.backends.kernel_direction``)
    def cpu_scalar(self, x):
        """The C type ("float" or "double") of ``x`` when the CPU kernels can read it
        (a host array of float32 or float64), else None."""
        if not isinstance(x, np.ndarray):
            return None  # a device array (CuPy)
        return {"float32": "float", "float64": "double"}.get(self.dtype_name(x))

    def empty(self, shape, like):
        """An uninitialised C-contiguous array of ``like``'s dtype (and device)."""
        return self.xp.empty(shape, dtype=like.dtype)

    def contiguous(self, x):
        """``x`` in C order (``x`` itself when it already is)."""
        return self.xp.ascontiguousarray(x)

    def matmul_into(self, a, b, out):
        """out = a @ b, written into the preallocated ``out``."""
        self.xp.matmul(a, b, out=out)
        return out

    def address(self, x):
        """The address of a C-contiguous host array's first element."""
        return x.__array_interface__["data"][0]

    def host_blas(self):
        """The framework's BLAS for the CPU kernels' batch-split loops (a
        ``kernels.cpu_kernels.HostBlas``), or None: here None, since NumPy's
        OpenBLAS runs its own thread pool, and an OpenMP region beside it was 20x
        slower (benchmarks/NOTES.md section 9)."""
        return None

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

    def host_values(self, array):
        """The values of an array of any framework as NumPy, or None while traced (JAX)."""
        return host_values(array)

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

    def cast(self, x, dtype_name):
        """``x`` in ``dtype_name``; ``x`` itself when it already is."""
        return x if self.dtype_name(x) == dtype_name else self.astype(x, dtype_name)


def host_values(array):
    """The values of an array of any framework as NumPy, or None while traced (JAX)."""
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "detach"):  # torch, on any device (inside torch.func transforms:
        return np.asarray(array.detach().cpu())  # the torch ops' own ``host_values``)
    if type(array).__module__.split(".")[0] == "cupy":
        return array.get()
    try:
        return np.asarray(array)
    except TypeError:  # a JAX tracer (its conversion errors are TypeErrors)
        return None
