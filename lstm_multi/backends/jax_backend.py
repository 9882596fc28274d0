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

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import bptt, network, regularize, validation
from .. import step as step_module
from ..cell import FunctionalCell
from ..ops import ArrayModuleOps
from ..step import recurrent_weight


def unavailable_reason():
    return None


class JaxOps(ArrayModuleOps):
    name = "jax"

    def __init__(self):
        super().__init__(jnp)

    def sigmoid(self, z):
        return jax.nn.sigmoid(z)

    def rsqrt(self, z):
        return jax.lax.rsqrt(z)

    def is_array(self, x):
        return isinstance(x, jax.Array)

    def stop_gradient(self, x):
        return jax.lax.stop_gradient(x)

    def dropout_masks(self, key, shapes, rate, like):
        """As ``ArrayModuleOps.dropout_masks``, drawn by ``jax.random`` (traceable, so a key
        passed into a jitted function works): mask k from ``fold_in(key, k)``. key: a
        JAX PRNG key or a non-negative int (``jax.random.key(n)``)."""
        if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
            key = jax.random.key(key)
        elif not (isinstance(key, jax.Array) and (
            jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
            or (key.dtype == jnp.uint32 and key.shape == (2,))
        )):  # fmt: skip
            raise TypeError(
                "dropout_key: expected a JAX PRNG key (jax.random.key(n)) or a non-negative "
                f"int, got {type(key).__name__}"
            )
        scale = 1.0 / (1.0 - rate)
        return [
            jax.random.bernoulli(jax.random.fold_in(key, k), 1.0 - rate, shape).astype(like.dtype)
            * jnp.asarray(scale, like.dtype)
            for k, shape in enumerate(shapes)
        ]

    def random_uniform(self, key, shapes, like):
        """As ``ArrayModuleOps.random_uniform``, by ``jax.random`` (traceable): draw k from
        ``fold_in(fold_in(key, RANDOM_STREAM), k)``, a stream apart from ``dropout_masks``'
        ``fold_in(key, k)``."""
        if (
            isinstance(key, jax.Array)
            and key.shape == ()
            and jnp.issubdtype(key.dtype, jnp.integer)
        ):
            key = jax.random.key(key)  # an integer seed as an array (traceable): Keras's
        self.dropout_masks(key, [], 0.5, like)  # raises on a key it does not take
        if isinstance(key, int):
            key = jax.random.key(key)
        stream = jax.random.fold_in(key, RANDOM_STREAM)
        dtype = jnp.float64 if like.dtype == jnp.float64 else jnp.float32
        return [
            jax.random.uniform(jax.random.fold_in(stream, k), shape, dtype)
            for k, shape in enumerate(shapes)
        ]


#: the ``fold_in`` tag of ``JaxOps.random_uniform``'s stream
RANDOM_STREAM = 0x20E0

OPS = JaxOps()


class ScanPlan(NamedTuple):
    """How a direction's ``lax.scan`` is compiled (the cell's ``scan_unroll`` and
    ``project_in_step``, the latter resolved for the default backend).

    unroll: steps per iteration of the forward that keeps no residuals (the call
        without a gradient, and the forward JAX differentiates with ``autodiff=True``);
        the forward that keeps them for the custom VJP and the reverse scan always run 1.
    in_step: True computes x_t W + b inside each step; False as one (T*B, in) product
        before the scan, so that a step is one GEMM (r U) and the gate fusion.
    """

    unroll: int
    in_step: bool


def project_in_step(setting=None):
    """Where x_t W + b is computed: ``setting`` when it is True or False, else (None)
    inside each step on the CPU and before the scan on any other default backend."""
    if setting is not None:
        return setting
    return jax.default_backend() == "cpu"


def _varying_axes(array):
    """The mesh axes ``array`` varies over inside ``jax.shard_map`` (empty outside it)."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        return frozenset()
    aval = typeof(array)
    kind = getattr(aval, "manual_axis_type", None)  # jax >= 0.9; before: aval.vma
    return frozenset(getattr(kind, "varying", None) or getattr(aval, "vma", None) or ())


def _varying_like(values, *like):
    """``values`` made to vary over every mesh axis that any of ``like`` varies over.

    Inside ``jax.shard_map`` an array is either the same on every device of a
    mesh axis or varies over it, and a scan's carry must keep its type: a zero
    initial state (the same everywhere) meeting a sharded batch becomes a
    varying state after one step. Casting the initial carry first (``pcast``)
    makes the types agree. Outside ``shard_map`` nothing varies and ``values``
    come back as they are.
    """
    axes = frozenset().union(*(_varying_axes(leaf) for leaf in jax.tree.leaves(like)))
    if not axes:
        return values

    def cast(value):
        missing = tuple(sorted(axes - _varying_axes(value)))
        return jax.lax.pcast(value, missing, to="varying") if missing else value

    return jax.tree.map(cast, values)


def summed_like(cotangents, primals):
    """Each cotangent summed over the mesh axes it varies over and its primal does not.

    Inside ``shard_map`` a parameter replicated over the mesh (the same on
    every device) that meets sharded data contributes on every device; its
    gradient is the sum of the devices' contributions, which is what JAX's own
    derivative gives (the transpose of making a value vary is ``psum``). A
    custom VJP must return that itself, with the primal's type.
    """

    def reduce(cotangent, primal):
        extra = tuple(sorted(_varying_axes(cotangent) - _varying_axes(primal)))
        return jax.lax.psum(cotangent, extra) if extra else cotangent

    return jax.tree.map(reduce, cotangents, primals)


def _forward_scan(variant, p, xs, h0, c0, valid, record, unroll, in_step):
    """The forward of one direction in ``lax.scan``, ``unroll`` steps an iteration.

    ``in_step`` (``ScanPlan``): the input projection x_t W + b inside the step,
    or one product before the scan. Returns (ys, h_T, c_T, residuals);
    residuals (the recurrent inputs r and the gate caches, stacked over time)
    only when ``record``.
    """
    ops = OPS
    U_step = ops.prepare_step_weight(recurrent_weight(ops, variant, p["U"]))
    extra = step_module.step_params(variant, p)

    def step(carry, inputs):
        h, c = carry
        x_t, v = inputs
        r = h if variant.recurrent_state == "h" else c
        zx = step_module.input_half(variant, x_t, p) if in_step else x_t
        h, c, y, cache = network.masked_step(ops, variant, zx, h, c, v, U_step, extra)
        return (h, c), ((y, r, cache) if record else y)

    if not in_step:
        # (T, B, 4H): the steps read z_x from here
        xs = step_module.input_projection(ops, variant, xs, p)

    # the cell state is carried in float32 for half-precision inputs (ops.state_dtype)
    c_start = ops.cast(c0, ops.state_dtype(ops.dtype_name(c0)))
    carry = _varying_like((h0, c_start), xs, p, valid)
    if not isinstance(xs.shape[0], int):
        # a symbolic length (jax.export with jax.export.symbolic_shape): the scan cannot
        # split it into unrolled iterations (T // unroll is not decidable), so one a step
        unroll = 1
    (h, c), out = jax.lax.scan(step, carry, (xs, valid), unroll=unroll)
    c = ops.cast(c, ops.dtype_name(c0))
    if not record:
        return out, h, c, None
    ys, rs, caches = out
    return ys, h, c, (rs, caches)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _direction(variant, plan, p, xs, h0, c0, valid):
    ys, h, c, _ = _forward_scan(variant, p, xs, h0, c0, valid, False, *plan)
    return ys, h, c


def _direction_forward(variant, plan, p, xs, h0, c0, valid):
    ys, h, c, residuals = _forward_scan(variant, p, xs, h0, c0, valid, True, 1, plan.in_step)
    return (ys, h, c), (p, xs, h0, c0, valid, residuals)


def _direction_backward(variant, plan, saved, cotangents):
    """The BPTT (``bptt.masked_step_backward``, the derived gate backward) in a reverse scan,
    then one GEMM each for dW, dU and dx over the whole sequence
    (``bptt.direction_grads``, which also gives each gradient its primal's dtype)."""
    ops = OPS
    p, xs, h0, c0, valid, (rs, caches) = saved
    dys, dh, dc = cotangents
    U_step_t = ops.prepare_step_weight_t(recurrent_weight(ops, variant, p["U"]))
    extra = step_module.step_params(variant, p)
    h0_like, c0_like = dh, dc
    dc = ops.cast(dc, ops.state_dtype(ops.dtype_name(xs)))

    def step(carry, inputs):
        dh, dc, dextra = carry
        dy, cache, v = inputs
        dz, dh, dc, dextra_t = bptt.masked_step_backward(
            ops, variant, dh, dc, dy, cache, v, U_step_t, extra
        )
        return (dh, dc, {k: dextra[k] + g for k, g in dextra_t.items()}), dz

    dextra = bptt.zero_extra_grads(ops, extra, dc)
    carry = _varying_like((dh, dc, dextra), dys, caches, valid, p)
    (dh0, dc0, dextra), dzs = jax.lax.scan(step, carry, (dys, caches, valid), reverse=True)
    grads, dxs, dh0, dc0 = bptt.direction_grads(
        ops, variant, p, xs, rs, dzs, dextra, dh0, dc0, h0_like, c0_like
    )
    grads, dxs, dh0, dc0 = summed_like((grads, dxs, dh0, dc0), (p, xs, h0, c0))
    return grads, dxs, dh0, dc0, None


_direction.defvjp(_direction_forward, _direction_backward)


def scan_direction(ops, variant, p, xs, h0, c0, valid, plan):
    """One direction over time with ``lax.scan``, compiled as ``plan`` (a ``ScanPlan``)
    says; otherwise ``network.loop_direction``'s contract.

    Differentiable through a custom VJP: the spec's derived backward in a
    reverse scan (as the NumPy backend runs it), which measured ~10% faster than
    JAX's transpose of the forward scan. ``autodiff_direction`` is the plain
    autodiff version it is tested against.
    """
    ys, h, c = _direction(variant, plan, p, xs, h0, c0, valid)
    return ys, h, c, None


def autodiff_direction(ops, variant, p, xs, h0, c0, valid, plan):
    """``scan_direction`` differentiated by JAX itself (the reference for the custom VJP)."""
    ys, h, c, _ = _forward_scan(variant, p, xs, h0, c0, valid, False, *plan)
    return ys, h, c, None


def regularized_scan(variant, p, xs, h0, c0, valid, masks):
    """One direction with zoneout / recurrent / input dropout (``regularize.regularized_step``,
    the input's projection ``regularize.input_projection``) in ``lax.scan``, differentiated
    by JAX itself. The per-step zoneout masks are scanned over; probabilities
    (evaluation) and the recurrent-dropout masks are closed over."""
    ops = OPS
    U = recurrent_weight(ops, variant, p["U"])
    extra = step_module.step_params(variant, p)
    per_step = [k if hasattr(k, "shape") and k.ndim == 3 else None for k in masks[:2]]
    fixed = [None if s is not None else k for s, k in zip(per_step, masks[:2], strict=True)]

    def step(carry, inputs):
        h, c = carry
        zx, v, step_h, step_c = inputs
        keep_h = fixed[0] if step_h is None else step_h
        keep_c = fixed[1] if step_c is None else step_c
        h, c, y, _ = regularize.regularized_step(
            ops, variant, zx, h, c, v, U, extra, keep_h, keep_c, masks.recurrent
        )
        return (h, c), y

    b = ops.zeros_like(p["b"]) if variant.split else p["b"]  # split halves: x W alone
    zxs = regularize.input_projection(ops, xs, p["W"], b, masks.inputs)
    c_start = ops.cast(c0, ops.state_dtype(ops.dtype_name(c0)))
    carry = _varying_like((h0, c_start), xs, p, valid)
    (h, c), ys = jax.lax.scan(step, carry, (zxs, valid, *per_step))
    return ys, h, ops.cast(c, ops.dtype_name(c0)), None


def x64_enabled():
    return bool(jax.config.jax_enable_x64)


def checked_lengths(lengths, steps):
    """Traced lengths (under ``jit``), with a run-time error if any lies outside 1..T.

    Why a run-time error: an out-of-range length has no meaning (T + 1 steps
    cannot be read from T, and pack_padded_sequence refuses 0), and silently
    clamping it would give plausible numbers for the wrong sequence. Under
    ``jit`` the values are not known while tracing, so the check runs on the
    device: ``lax.cond`` calls a host callback only when a value is out of
    range (no host round trip otherwise), and the callback raises
    ``ValueError("lengths: expected every value in 1..T ...")`` when the result
    is computed, the way ``equinox.error_if`` reports errors under ``jit``
    (jax 0.10 passes the callback's ValueError to the caller; a runtime that
    wraps it would raise a ``JaxRuntimeError`` carrying the same message).
    Concrete lengths (outside ``jit``) are checked in Python before tracing and
    raise the ``ValueError`` itself.
    """
    lengths = lengths.astype(jnp.int64 if x64_enabled() else jnp.int32)

    def raise_if_out_of_range(values):
        values = np.asarray(values)
        validation.check_lengths_values(values.ravel(), steps)
        return values

    def fail(n):
        shape = jax.ShapeDtypeStruct(n.shape, n.dtype)
        checked = jax.pure_callback(raise_if_out_of_range, shape, n, vmap_method="sequential")
        # the callback returns n itself (or raises); max(n, checked) gives this branch
        # n's type, so that both branches agree inside shard_map too, where n varies
        # over the mesh and a callback's result does not
        return jnp.maximum(n, checked)

    out_of_range = jnp.any((lengths < 1) | (lengths > steps))
    return jax.lax.cond(out_of_range, fail, lambda n: n, lengths)


_FORWARD_MODE_ERROR = "can't apply forward-mode autodiff"


class Cell(FunctionalCell):
    __doc__ = (
        (FunctionalCell.__doc__ or "")
        + """
    JAX only: ``autodiff`` chooses how JAX differentiates the cell.
    ``False`` (the default): a custom VJP that runs the BPTT in a
    reverse scan, measured 7-9% faster than JAX's own derivative at
    T100 B64 H256 and ~2x at T200 B4 H64 (CPU, float32); reverse mode only
    (``grad``, ``vjp``, ``jacrev``), as JAX allows no forward mode through a
    custom VJP, and ``jax.jvp`` on it raises a TypeError that says so.
    ``True``: JAX differentiates the scan itself, so forward mode and every
    higher order work too (``jvp``, ``jacfwd``, ``hessian``, ``linearize``).
    Both work under ``jit``, ``vmap`` and ``checkpoint``.

    JAX only: ``engine`` chooses what runs each direction's time loop
    (``kernel`` is its older spelling). "auto" (the default) or "scan":
    ``lax.scan`` (``scan_direction``). "pallas_persistent": the whole time loop of a direction in one
    Pallas kernel, forward and backward (``jax_pallas.pallas_direction``: U
    held on chip, one program per 16 rows of the batch, the variant's
    generated gate math), for H <= 64, no projection and float32, float16
    or bfloat16; other directions fall back to the scan. Compiled through
    Triton on a GPU, run by Pallas's interpreter on the CPU (slow: for
    tests). Reverse mode only; ``autodiff=True`` cannot be combined with it.
    ``pallas_kernels``: the ``jax_pallas.PallasKernels`` it launches (only with
    that engine); None (the default) is the shared one, compiled on a GPU and
    interpreted on the CPU; ``PallasKernels(interpret=True)`` runs Pallas's
    interpreter on any device (to debug a kernel on a GPU).

    JAX only: how the scan is compiled (the scan engine's, and the Pallas
    engine's where it falls back to the scan). Both change speed, not results
    (beyond rounding).
    ``scan_unroll`` (2 by default): steps per iteration of the forward without
    gradient (``lax.scan``'s ``unroll``), and of the forward JAX differentiates
    with ``autodiff=True``. Unrolling trades compile time and code size for
    fewer loop iterations and more fusion across steps. Measured against Flax
    on XLA-CPU when this forward was also the one differentiated
    (benchmarks/NOTES.md section 2): forward 1.00x at 1, 0.83x at 2, 0.69x at
    4, but forward+backward 1.06x, 1.01x, 1.18x (the transposed scan carries
    more residuals); 8 was worse. The forward that keeps residuals for the
    custom VJP and the reverse scan always run one step an iteration
    (unrolling them measured slower).
    ``project_in_step`` (None by default): True computes x_t W + b inside
    each step; False as one (T*B, in) product before the scan, so that a step
    is one GEMM (r U) and the gate fusion (cuDNN's and haste's design, for
    accelerators); None: inside on the CPU, before the scan on any other
    default backend. On XLA-CPU the product before the scan measured about 2x
    slower in the forward than T small ones inside it (40 against 16 ms at
    medium, 105 against 67 at large: benchmarks/NOTES.md section 2); on an
    H100 it gives a step of 1 GEMM and 1.5 fusions (``bench.hlo``).
    """
    )
    backend = "jax"
    ops = OPS

    #: the values ``kernel`` takes (the older spelling of ``engine``)
    KERNELS = (None, "pallas_persistent")

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        variant="lstm",
        num_layers: int = 1,
        bidirectional: bool = False,
        batch_first: bool = True,
        proj_size: int = 0,
        dropout: float = 0.0,
        *,
        engine: str = "auto",
        autodiff: bool = False,
        kernel: str | None = None,
        scan_unroll: int = 2,
        project_in_step: bool | None = None,
        pallas_kernels=None,
        zoneout: float | tuple[float, float] = 0.0,
        recurrent_dropout: float = 0.0,
        dropconnect: float = 0.0,
        input_dropout: float = 0.0,
    ):
        if not (kernel is None or (isinstance(kernel, str) and kernel in self.KERNELS)):
            raise ValueError(f"kernel: expected None or 'pallas_persistent', got {kernel!r}")
        if kernel is not None:
            if engine not in ("auto", kernel):
                raise ValueError(
                    f"engine: {engine!r} and kernel={kernel!r} both choose the engine; give "
                    f"engine={kernel!r} alone (kernel is its older spelling)"
                )
            engine = kernel
        super().__init__(
            input_size, hidden_size, variant, num_layers, bidirectional, batch_first,
            proj_size, dropout, engine, zoneout=zoneout, recurrent_dropout=recurrent_dropout,
            dropconnect=dropconnect, input_dropout=input_dropout,
        )  # fmt: skip
        self.autodiff = validation.check_bool("autodiff", autodiff)
        if self.engine == "pallas_persistent" and self.autodiff:
            raise ValueError(
                "engine: 'pallas_persistent' differentiates through its own custom VJP; it "
                "cannot be combined with autodiff=True"
            )
        self.kernel = "pallas_persistent" if self.engine == "pallas_persistent" else None
        self.scan_unroll = validation.check_positive_int("scan_unroll", scan_unroll)
        if project_in_step is not None and not isinstance(project_in_step, bool):
            raise TypeError(
                f"project_in_step: expected None, True or False, got {project_in_step!r}"
            )
        self.project_in_step = project_in_step
        self.pallas_kernels = self._checked_pallas_kernels(pallas_kernels)
        self._jit_forward = jax.jit(self._forward_impl)
        self._jit_vjp = jax.jit(self._vjp_impl)

    def _checked_pallas_kernels(self, kernels):
        """The Pallas kernels the "pallas_persistent" engine launches (None otherwise)."""
        if self.engine != "pallas_persistent":
            if kernels is not None:
                raise ValueError(
                    "pallas_kernels: only engine='pallas_persistent' launches Pallas kernels, "
                    f"got engine={self.engine!r}"
                )
            return None
        from . import jax_pallas  # imported on first use: Pallas is loaded only then

        if kernels is None:
            return jax_pallas.KERNELS
        if not isinstance(kernels, jax_pallas.PallasKernels):
            raise TypeError(
                "pallas_kernels: expected None or a jax_pallas.PallasKernels, got "
                f"{type(kernels).__name__}"
            )
        return kernels

    def _direction(self, ops, variant, p, xs, h0, c0, valid, step_masks=None):
        """With ``step_masks`` (zoneout, recurrent dropout): ``regularized_scan``.
        Otherwise The time loop of one direction (``network.loop_direction``'s contract): the
        custom VJP's scan, ``autodiff_direction`` with ``autodiff=True``, or the Pallas
        kernels; the scan compiled as ``scan_unroll`` and ``project_in_step`` say
        (resolved while tracing, for the default backend)."""
        if step_masks is not None:
            return regularized_scan(variant, p, xs, h0, c0, valid, step_masks)
        plan = ScanPlan(self.scan_unroll, project_in_step(self.project_in_step))
        if self.autodiff:
            return autodiff_direction(ops, variant, p, xs, h0, c0, valid, plan)
        if self.pallas_kernels is not None:
            from . import jax_pallas

            return jax_pallas.pallas_direction(
                ops, variant, p, xs, h0, c0, valid, plan, self.pallas_kernels
            )
        return scan_direction(ops, variant, p, xs, h0, c0, valid, plan)

    def _forward_impl(self, params, x, h0, c0, lengths, layer_masks=None, step_masks=None):
        y, h_n, c_n, _, _ = network.forward(
            OPS, self.variant, params, x, h0, c0, lengths, self._direction,
            layer_masks=layer_masks, step_masks=step_masks,
        )  # fmt: skip
        return y, h_n, c_n

    def _vjp_impl(
        self, params, x, h0, c0, lengths, dy, dh_n, dc_n, layer_masks=None, step_masks=None
    ):
        def run(params, x, h0, c0):
            return self._forward_impl(params, x, h0, c0, lengths, layer_masks, step_masks)

        _, pullback = jax.vjp(run, params, x, h0, c0)
        return pullback((dy, dh_n, dc_n))

    def _device_type(self, x):
        return jax.default_backend()

    def compiled_text(self, params, x):
        """The optimized HLO text of the cell's jitted forward and VJP for time-major x
        (T, B, in) with zero initial states: ``{"forward": ..., "vjp": ...}`` (what
        ``lstm_multi.bench.hlo`` counts kernels in)."""
        shapes = self.state_shapes(x.shape[1])
        h0, c0 = (jnp.zeros(s, x.dtype) for s in shapes)
        y_shape = (x.shape[0], x.shape[1], self.num_directions * self.output_size)
        dy = jnp.ones(y_shape, x.dtype)
        return {
            "forward": self._jit_forward.lower(params, x, h0, c0, None, None).compile().as_text(),
            "vjp": self._jit_vjp.lower(params, x, h0, c0, None, dy, h0, c0, None)
            .compile()
            .as_text(),
        }

    def _forward(self, params, x, h0, c0, lengths, layer_masks=None, step_masks=None):
        self.last_choice = self._choose(
            x, layer_masks is not None, network.is_step_mask(lengths), step_masks is not None
        )
        try:
            return self._jit_forward(params, x, h0, c0, lengths, layer_masks, step_masks)
        except TypeError as error:
            if _FORWARD_MODE_ERROR not in str(error) or self.autodiff:
                raise
            raise TypeError(
                "autodiff: forward-mode differentiation (jax.jvp, jax.jacfwd, jax.hessian) "
                "cannot pass the cell's custom VJP (its fast derived backward); build "
                "the cell with autodiff=True to let JAX differentiate the scan itself"
            ) from error

    def _traced_lengths(self, lengths, steps):
        return checked_lengths(lengths, steps)

    def _traced_mask(self, mask):
        return jnp.transpose(mask)

    def _vjp(self, params, x, h0, c0, lengths, dy, dh_n, dc_n, layer_masks=None, step_masks=None):
        return self._jit_vjp(params, x, h0, c0, lengths, dy, dh_n, dc_n, layer_masks, step_masks)

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
