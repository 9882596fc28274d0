"""JAX backend: the spec in ``jax.lax.scan`` under ``jax.jit``, gradients by autodiff.

Arrays live where JAX puts them: on its default device, the first GPU when
jaxlib has CUDA (``pip install "jax[cuda12]"``) and sees one, else the CPU.

The cell's calls are jitted once per cell and input structure; they are also
pure functions of their arrays, so a cell can sit inside a user's own
``jax.jit``, ``jax.grad`` or ``jax.vmap``. float64 needs JAX's 64-bit mode
(``jax.config.update("jax_enable_x64", True)``); without it a float64 input is
an error, never a silent downcast to float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import network, spec
from ..cell import FunctionalCell
from ..ops import ArrayModuleOps


def unavailable_reason():
    return None


class JaxOps(ArrayModuleOps):
    name = "jax"

    def __init__(self):
        super().__init__(jnp)

    def sigmoid(self, z):
        return jax.nn.sigmoid(z)

    def is_array(self, x):
        return isinstance(x, jax.Array)


OPS = JaxOps()

#: steps per iteration of the compiled loop (``lax.scan``'s ``unroll``)
SCAN_UNROLL = 2


def scan_direction(ops, variant, p, xs, h0, c0, valid):
    """One direction over time with ``lax.scan``; same contract as ``network.loop_direction``.

    Unlike the eager backends, the input projection x_t W + b is computed inside
    the step: on XLA-CPU one (T*B, in) product before the scan was measured about
    2x slower in the forward than T small ones inside it (benchmarks/NOTES.md).
    The scan is unrolled by ``SCAN_UNROLL``.
    """
    U_step = ops.prepare_step_weight(spec.recurrent_weight(ops, variant, p["U"]))
    extra = network.extra_params(p)

    def step(carry, inputs):
        h, c = carry
        x_t, v = inputs
        zx = x_t @ p["W"] + p["b"]
        h_new, c_new, _ = spec.step_forward(ops, variant, zx, h, c, U_step, extra)
        if v is None:
            return (h_new, c_new), h_new
        return (
            (jnp.where(v, h_new, h), jnp.where(v, c_new, c)),
            jnp.where(v, h_new, jnp.zeros_like(h_new)),
        )

    # the cell state is carried in float32 for half-precision inputs (ops.state_dtype)
    c_start = ops.cast(c0, ops.state_dtype(ops.dtype_name(c0)))
    (h, c), ys = jax.lax.scan(step, (h0, c_start), (xs, valid), unroll=SCAN_UNROLL)
    return ys, h, ops.cast(c, ops.dtype_name(c0)), None


def x64_enabled():
    return bool(jax.config.jax_enable_x64)


class Cell(FunctionalCell):
    __doc__ = FunctionalCell.__doc__
    backend = "jax"
    ops = OPS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._jit_forward = jax.jit(self._forward_impl)
        self._jit_vjp = jax.jit(self._vjp_impl)

    def _forward_impl(self, params, x, h0, c0, lengths):
        y, h_n, c_n, _, _ = network.forward(
            OPS, self.variant, params, x, h0, c0, lengths, scan_direction
        )
        return y, h_n, c_n

    def _vjp_impl(self, params, x, h0, c0, lengths, dy, dh_n, dc_n):
        def run(params, x, h0, c0):
            return self._forward_impl(params, x, h0, c0, lengths)

        _, pullback = jax.vjp(run, params, x, h0, c0)
        return pullback((dy, dh_n, dc_n))

    def _forward(self, params, x, h0, c0, lengths):
        return self._jit_forward(params, x, h0, c0, lengths)

    def _vjp(self, params, x, h0, c0, lengths, dy, dh_n, dc_n):
        return self._jit_vjp(params, x, h0, c0, lengths, dy, dh_n, dc_n)

    def _check_dtype_supported(self, name, dtype_name):
        if dtype_name == "float64" and not x64_enabled():
            raise TypeError(
                f"{name}: float64 needs JAX's 64-bit mode, which is off "
                "(jax.config.update('jax_enable_x64', True) turns it on); "
                "without it JAX would silently compute in float32"
            )

    def _to_backend(self, array, name):
        if isinstance(array, jax.Array):
            return array
        if not hasattr(array, "dtype"):
            raise TypeError(f"{name}: expected a jax or numpy array, got {type(array).__name__}")
        dtype_name = str(array.dtype)
        if dtype_name.startswith(("int", "uint")):
            return jnp.asarray(np.asarray(array), dtype=jnp.int64 if x64_enabled() else jnp.int32)
        self._check_dtype_supported(name, dtype_name)
        return jnp.asarray(array)

    def _concrete(self, array):
        try:
            return np.asarray(array)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            return None
