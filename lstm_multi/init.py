"""Initial parameters: where the randomness comes from, and the named schemes.

``seed_from(value)`` turns what each ecosystem uses for randomness into one
integer seed for NumPy's generator, so that the same seed, generator or key
gives the same numbers on every backend:

* a non-negative ``int``: itself;
* a ``numpy.random.Generator``: one draw from it (the generator advances);
* a ``torch.Generator``: one draw from it (it advances);
* a JAX PRNG key (``jax.random.key(n)`` or the raw ``jax.random.PRNGKey(n)``):
  64 bits drawn with ``jax.random.bits``; different keys give different
  parameters, and a key split off another gives its own.

Schemes, per layer and direction (``W (in, 4H)``, ``U (H, 4H)``, ``b (4H,)``
and the variant's own rows):

``"uniform"``
    ``torch.nn.LSTM``'s: every entry from U(-1/sqrt(H), 1/sqrt(H)).
``"keras"``
    Keras's ``LSTM`` defaults: W glorot-uniform, U(-l, l) with
    l = sqrt(6 / (in + 4H)); U orthogonal (its H rows orthonormal, the sign
    fixed by R's diagonal as Keras does); b zero but the forget gate's block,
    1 (``unit_forget_bias``); the variant's own rows (peepholes) zero; a
    projection's ``W_hr`` (H, P) glorot-uniform (Keras has no projection: this is
    its default for a ``Dense`` kernel).

``"flax"``
    Flax's ``OptimizedLSTMCell`` (and ``LSTMCell``) defaults: W lecun-normal (a
    normal truncated to two standard deviations, scaled to variance 1 / in, as
    ``jax.nn.initializers.lecun_normal`` draws it), U orthogonal per gate block
    (each (H, H) block of the four, as Flax's per-gate recurrent kernels), b zero
    (no forget-gate bias); the variant's own rows zero; a projection's ``W_hr``
    lecun-normal (Flax's ``Dense`` kernel default).
``"equinox"``
    ``eqx.nn.LSTMCell``'s: every entry, the bias included, from U(-1/sqrt(H),
    1/sqrt(H)): the same distribution, and the same numbers, as ``"uniform"``.

Each framework layer defaults to its framework's scheme (``lstm_multi.flax``:
"flax", ``lstm_multi.equinox``: "equinox", ``lstm_multi.keras``: "keras"; the
torch module draws as ``nn.LSTM`` itself), and every backend's cell takes every
scheme (``cell.init(seed, scheme=...)``).

With a projection, U has P rows (``lstm_multi.spec.param_shapes``); the
schemes draw it as above at that shape.

A variant's ``param_init`` overrides every scheme for the parameters it names:
the layer-normalised variants' gains ``gamma_*`` start at 1 and their shifts
``beta_*`` at 0 whatever the scheme (drawn first and then replaced, so the other
parameters get the scheme's numbers for the seed).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import spec

SCHEMES = ("uniform", "keras", "flax", "equinox")


def seed_from(value, name="seed") -> int:
    """An integer seed from an int, a NumPy or torch generator, or a JAX key (see above)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
        return int(value)
    if isinstance(value, np.random.Generator):
        return int(value.integers(0, 2**63 - 1))
    kind = type(value)
    if kind.__module__.split(".")[0] == "torch" and kind.__name__ == "Generator":
        import torch

        return int(torch.randint(0, 2**62, (1,), generator=value).item())
    if kind.__module__.split(".")[0] in ("jax", "jaxlib"):
        return _seed_from_jax_key(value, name)
    raise TypeError(
        f"{name}: expected a non-negative int, a numpy.random.Generator, a torch.Generator "
        f"or a JAX PRNG key, got {kind.__name__}"
    )


def _seed_from_jax_key(key, name):
    import jax
    import jax.numpy as jnp

    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not typed and not (key.dtype == jnp.uint32 and key.shape == (2,)):
        raise TypeError(
            f"{name}: expected a JAX PRNG key (jax.random.key(n) or jax.random.PRNGKey(n)), "
            f"got an array of dtype {key.dtype} and shape {key.shape}"
        )
    if typed and key.shape != ():
        raise TypeError(f"{name}: expected one JAX PRNG key, got an array of {key.shape} keys")
    high, low = (int(v) for v in jax.random.bits(key, (2,), jnp.uint32))
    return ((high << 32) | low) & (2**63 - 1)


def check_scheme(scheme) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    return scheme


def init_params(
    variant,
    input_size,
    hidden_size,
    num_layers,
    num_directions,
    seed,
    dtype,
    scheme="uniform",
    proj_size=0,
):
    """Canonical NumPy parameters of a whole network drawn under ``scheme`` ("uniform" or
    "keras", above), at the shapes of ``spec.network_param_shapes``.

    Returns ``params[layer][direction] = {"W": (in, 4H), "U": (H or P, 4H), "b": (4H,),
    ...}`` in ``dtype``, ``in`` being input_size for layer 0 and (P or H) * num_directions
    after. The same integer seed gives the same numbers on every backend: one NumPy
    generator draws every layer and direction in order.
    """
    rng = np.random.default_rng(seed)
    return [
        [draw(scheme, rng, shapes, hidden_size, dtype, variant) for shapes in directions]
        for directions in spec.network_param_shapes(
            variant, input_size, hidden_size, num_layers, num_directions, proj_size
        )
    ]


def draw(scheme, rng, shapes, hidden_size, dtype, variant=None):
    """One layer-direction's parameters ``{name: array}`` for ``shapes`` under ``scheme``,
    with ``variant``'s ``param_init`` constants (when a variant is given) in place."""
    params = _draw(scheme, rng, shapes, hidden_size, dtype)
    if variant is not None:
        for key, value in spec.get_variant(variant).param_init.items():
            params[key] = np.full(shapes[key], value, dtype=dtype)
    return params


def _draw(scheme, rng, shapes, hidden_size, dtype):
    if scheme in ("uniform", "equinox"):
        bound = 1.0 / math.sqrt(hidden_size)
        return {k: rng.uniform(-bound, bound, s).astype(dtype) for k, s in shapes.items()}
    if scheme == "flax":
        return _draw_flax(rng, shapes, hidden_size, dtype)
    inputs = shapes["W"][0]
    limit = math.sqrt(6.0 / (inputs + 4 * hidden_size))
    bias = np.zeros(4 * hidden_size)
    bias[hidden_size : 2 * hidden_size] = 1.0  # the forget gate (order i, f, g, o)
    params = {
        "W": rng.uniform(-limit, limit, shapes["W"]),
        "U": _orthogonal(rng, shapes["U"]),
        "b": bias,
    }
    if "W_hr" in shapes:
        rows, cols = shapes["W_hr"]
        bound = math.sqrt(6.0 / (rows + cols))
        params["W_hr"] = rng.uniform(-bound, bound, shapes["W_hr"])
    params.update({k: np.zeros(s) for k, s in shapes.items() if k not in params})
    return {k: params[k].astype(dtype) for k in shapes}


def _draw_flax(rng, shapes, hidden_size, dtype):
    """One layer-direction under the "flax" scheme (module doc)."""
    params = {
        "W": _lecun_normal(rng, shapes["W"]),
        "U": np.concatenate(
            [_orthogonal(rng, (shapes["U"][0], hidden_size)) for _ in range(4)], axis=1
        ),
        "b": np.zeros(shapes["b"]),
    }
    if "W_hr" in shapes:
        params["W_hr"] = _lecun_normal(rng, shapes["W_hr"])
    params.update({k: np.zeros(s) for k, s in shapes.items() if k not in params})
    return {k: params[k].astype(dtype) for k in shapes}


#: the standard deviation of a unit normal truncated to [-2, 2], by which
#: ``jax.nn.initializers.variance_scaling`` divides so that the variance is the one asked
_TRUNCATED_STD = 0.87962566103423978


def _lecun_normal(rng, shape):
    """(fan_in, fan_out) entries of variance 1 / fan_in from a normal truncated to two
    standard deviations, as ``jax.nn.initializers.lecun_normal`` draws them."""
    values = rng.standard_normal(shape)
    outside = np.abs(values) > 2.0
    while outside.any():  # redraw what falls outside [-2, 2]: the truncated normal
        values[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(values) > 2.0
    return values * (math.sqrt(1.0 / shape[0]) / _TRUNCATED_STD)


def _orthogonal(rng, shape):
    """A (rows, cols) matrix whose rows (rows <= cols) or columns are orthonormal, as
    Keras's ``Orthogonal`` draws it: QR of a normal matrix, signs fixed by diag(R)."""
    rows, cols = shape
    q, r = np.linalg.qr(rng.standard_normal((max(rows, cols), min(rows, cols))))
    q = q * np.sign(np.diag(r))
    return q.T if rows < cols else q
