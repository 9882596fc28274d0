"""Builders of the peers: torch.nn.LSTM, the article's module, Flax, Equinox, Keras, GEMMs alone.

Each ``build_*(runner, case)`` imports its framework, sets up parameters and
data for the case and returns a callable that runs one iteration and waits for
it (forward: outputs only, no autograd graph; forward_backward: outputs, then
the gradients of every parameter and of x for the output gradient dy).
"""

from __future__ import annotations

import importlib.util
import sys

from .. import environment
from . import frameworks
from .frameworks import Unavailable


def _require(*modules):
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise Unavailable(f"{module} is not installed (pip install 'lstm_multi[bench]')")


# torch ----------------------------------------------------------------------


def _torch_runner(fw, case, module, x, dy, *state):
    """Time ``module(x, *state)`` (forward) or it and its gradients (forward+backward);
    in step mode, T calls of ``module(x[:, t:t+1], state)`` (batch-first modules
    that take and return ``(h, c)``, as ``nn.LSTM``)."""
    import torch

    if case.mode == "step":
        steps = [x[:, t : t + 1] for t in range(x.shape[1])]

        def run():
            carried = state or None
            with torch.no_grad():
                for x_t in steps:
                    y, carried = module(x_t, carried)
            fw.sync(y)

        return run
    if case.mode == "forward":

        def run():
            with torch.no_grad():
                y, _ = module(x, *state)
            fw.sync(y)

        return run
    xg = x.detach().clone().requires_grad_(True)
    leaves = [xg, *module.parameters()]

    def run():
        y, _ = module(xg, *state)
        fw.sync(torch.autograd.grad(y, leaves, dy))

    return run


def build_torch_lstm(runner, case):
    _require("torch")
    import torch

    fw = frameworks.get("torch")
    fw.check(case.device, case.dtype)
    s = case.size
    module = torch.nn.LSTM(
        s.input_size,
        s.hidden_size,
        batch_first=True,
        device=case.device,
        dtype=getattr(torch, case.dtype),
    )
    x_np, dy_np = case.data()
    return _torch_runner(
        fw,
        case,
        module,
        fw.to_device(x_np, case.dtype, case.device),
        fw.to_device(dy_np, case.dtype, case.device),
    )


def build_article(runner, case):
    _require("torch")
    import torch

    from .article import article_module

    fw = frameworks.get("torch")
    fw.check(case.device, case.dtype)
    if case.mode == "step":
        raise Unavailable("no step mode for the article's module (it runs whole sequences)")
    s = case.size
    module = article_module(s.input_size, s.hidden_size, peephole=case.variant == "peephole_full")
    dtype = getattr(torch, case.dtype)
    module = module.to(device=case.device, dtype=dtype)
    # the article makes its default zero state in float32: pass one in the run's dtype
    zeros = torch.zeros(s.batch, s.hidden_size, device=case.device, dtype=dtype)
    x_np, dy_np = case.data()
    return _torch_runner(
        fw,
        case,
        module,
        fw.to_device(x_np, case.dtype, case.device),
        fw.to_device(dy_np, case.dtype, case.device),
        (zeros, zeros),
    )


# jax ------------------------------------------------------------------------


def _jax_runner(fw, case, apply, params, x, dy):
    """apply(params, x) -> y (B, T, H); jitted forward, or jitted vjp for every param and x."""
    import jax

    if case.mode == "step":
        raise Unavailable("no step mode for this peer (its layer runs whole sequences)")
    if case.mode == "forward":
        forward = jax.jit(apply)

        def run():
            fw.sync(forward(params, x))

        return run

    @jax.jit
    def vjp(params, x, dy):
        _, pullback = jax.vjp(apply, params, x)
        return pullback(dy)

    def run():
        fw.sync(vjp(params, x, dy))

    return run


def _jax_data(fw, case):
    x_np, dy_np = case.data()
    return fw.to_device(x_np, case.dtype, case.device), fw.to_device(dy_np, case.dtype, case.device)


def build_flax(runner, case):
    _require("jax", "flax")
    import jax
    from flax import linen as nn

    fw = frameworks.get("jax")
    fw.check(case.device, case.dtype)
    x, dy = _jax_data(fw, case)
    cell = nn.OptimizedLSTMCell(features=case.size.hidden_size, dtype=x.dtype, param_dtype=x.dtype)
    model = nn.RNN(cell)
    params = jax.device_put(model.init(jax.random.key(case.seed), x), x.devices().pop())
    return _jax_runner(fw, case, model.apply, params, x, dy)


def build_equinox(runner, case):
    _require("jax", "equinox")
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    fw = frameworks.get("jax")
    fw.check(case.device, case.dtype)
    x, dy = _jax_data(fw, case)
    s = case.size
    cell = eqx.nn.LSTMCell(
        s.input_size, s.hidden_size, key=jax.random.key(case.seed), dtype=x.dtype
    )
    cell = jax.device_put(cell, x.devices().pop())
    params, static = eqx.partition(cell, eqx.is_array)

    def apply(params, x):
        cell = eqx.combine(params, static)

        def sequence(xs):  # (T, I) -> (T, H)
            def step(carry, x_t):
                h, c = cell(x_t, carry)
                return (h, c), h

            zeros = jnp.zeros((s.hidden_size,), xs.dtype)
            return jax.lax.scan(step, (zeros, zeros), xs)[1]

        return jax.vmap(sequence)(x)

    return _jax_runner(fw, case, apply, params, x, dy)


def require_keras_on_jax():
    """Unavailable unless Keras runs, or will run once imported, on its JAX backend.

    Keras fixes its backend for the whole process at its first import, from
    ``KERAS_BACKEND``. The benchmark never sets it in a caller's process (their own
    Keras code may expect another backend); a run sets it in the child process of
    its JAX rows (``isolation.child_environment``). Unset here counts as not JAX,
    although Keras may also read a backend from its config file: importing Keras
    to find out would fix it.
    """
    if "keras" in sys.modules:
        name = sys.modules["keras"].backend.backend()
        if name != "jax":
            raise Unavailable(
                f"Keras was already loaded with the {name!r} backend; the Keras peer runs "
                "on 'jax' (set KERAS_BACKEND=jax before keras is imported)"
            )
        return
    name = environment.keras_backend()
    if name != "jax":
        found = "unset" if name is None else f"{name!r}"
        raise Unavailable(
            f"the Keras peer runs on Keras's 'jax' backend, and KERAS_BACKEND is {found}; "
            "the benchmark leaves this process's environment alone: set KERAS_BACKEND=jax "
            "before keras is imported (a benchmark run does so in its JAX rows' process)"
        )


def build_keras(runner, case):
    _require("jax", "keras")
    require_keras_on_jax()
    import jax
    import keras

    fw = frameworks.get("jax")
    fw.check(case.device, case.dtype)
    x, dy = _jax_data(fw, case)
    s = case.size
    layer = keras.layers.LSTM(s.hidden_size, return_sequences=True, dtype=case.dtype)
    layer.build((s.batch, s.steps, s.input_size))
    device = x.devices().pop()
    trainable = [jax.device_put(v.value, device) for v in layer.trainable_variables]
    frozen = [jax.device_put(v.value, device) for v in layer.non_trainable_variables]

    def apply(trainable, x):
        y, _ = layer.stateless_call(trainable, frozen, x)
        return y

    return _jax_runner(fw, case, apply, trainable, x, dy)


# the matrix products alone ---------------------------------------------------


def build_matmuls(runner, case):
    """The GEMMs an LSTM layer needs, with preallocated outputs and no gate math.

    Forward: X (T*B, I) @ W once, then T products r_t (B, H) @ U. Backward adds
    T products dz_t @ U^T and the three whole-sequence products X^T dZ, R^T dZ
    and dZ W^T. For an array-module framework (NumPy, CuPy).
    """
    import importlib

    fw = frameworks.get(runner.framework)
    fw.check(case.device, case.dtype)
    xp = importlib.import_module(runner.framework)
    s = case.size
    t, b, i, h = s.steps, s.batch, s.input_size, s.hidden_size
    rng = xp.random.default_rng(case.seed) if hasattr(xp.random, "default_rng") else xp.random

    def rand(*shape):
        return xp.asarray(rng.standard_normal(shape), dtype=case.dtype)

    x, w, u = rand(t * b, i), rand(i, 4 * h), rand(h, 4 * h)
    rs, dz = rand(t, b, h), rand(t, b, 4 * h)
    z = xp.empty((t, b, 4 * h), dtype=case.dtype)
    xw = xp.empty((t * b, 4 * h), dtype=case.dtype)
    dh = xp.empty((b, h), dtype=case.dtype)
    dw, du = xp.empty((i, 4 * h), dtype=case.dtype), xp.empty((h, 4 * h), dtype=case.dtype)
    dx = xp.empty((t * b, i), dtype=case.dtype)
    u_t, w_t = u.T, w.T
    dz2, rs2 = dz.reshape(t * b, 4 * h), rs.reshape(t * b, h)
    backward = case.mode == "forward_backward"

    def run():
        xp.matmul(x, w, out=xw)
        for k in range(t):
            xp.matmul(rs[k], u, out=z[k])
        if backward:
            for k in range(t - 1, -1, -1):
                xp.matmul(dz[k], u_t, out=dh)
            xp.matmul(x.T, dz2, out=dw)
            xp.matmul(rs2.T, dz2, out=du)
            xp.matmul(dz2, w_t, out=dx)
        fw.sync(dx)

    return run
