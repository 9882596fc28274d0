"""Builders of the peers: torch.nn.LSTM, the article's module, a layer norm LSTM in plain
torch ops, Flax, Equinox, Keras, GEMMs alone.

Each ``build_*(runner, case)`` imports its framework, sets up parameters and
data for the case and returns a callable that runs one iteration and waits for
it (forward: outputs only, no autograd graph; forward_backward: outputs, then
the gradients of every parameter and of x for the output gradient dy).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys

from .. import environment
from . import frameworks
from .frameworks import Unavailable


def _require(*modules):
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise Unavailable(f"{module} is not installed (pip install 'lstm_multi[bench]')")


def _case_data(fw, case):
    """The case's input x and output gradient dy on its device, in its dtype."""
    x_np, dy_np = case.data()
    return fw.to_device(x_np, case.dtype, case.device), fw.to_device(dy_np, case.dtype, case.device)


# torch ----------------------------------------------------------------------


def _torch_runner(fw, case, module, *state):
    """Time ``module(x, *state)`` (forward) or it and its gradients (forward+backward),
    x and the output gradient dy the case's data on its device; in step mode, T calls
    of ``module(x[:, t:t+1], state)`` (batch-first modules that take and return
    ``(h, c)``, as ``nn.LSTM``)."""
    import torch

    x, dy = _case_data(fw, case)

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
    return _torch_runner(fw, case, module)


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
    return _torch_runner(fw, case, module, (zeros, zeros))


# a layer-normalised LSTM written in plain torch ------------------------------


@functools.cache
def layernorm_lstm_module():
    """``LayerNormLSTM``, the class (defined on first use: importing this module imports no
    framework).

    Why it exists: it is the baseline that lstm_multi's "layernorm" variant is measured
    against, what a PyTorch user writes today for the layer-normalised LSTM of Ba, Kiros &
    Hinton (2016), since ``nn.LSTM`` has no layer norm: ``nn.LayerNorm`` modules and a
    Python loop over time under autograd. It is not lstm_multi's math (that is
    ``spec.py``'s "layernorm", generated into the kernels) and does not import it: it is
    the thing being measured, written as a user would, so a change to the spec must not
    change it. tests/test_bench.py checks it against the independent oracle
    (tests/oracle.py), so that the rows compare the same function. Its equations, per
    step t (x_t (B, I), h, c (B, H), the LN over the last axis, eps 1e-5)::

        z   = LN_x(x_t W) + LN_h(h_{t-1} U) + b            (B, 4H), blocks (i, f, g, o)
        c_t = σ(z_f) c_{t-1} + σ(z_i) tanh(z_g)
        h_t = σ(z_o) tanh(LN_c(c_t))

    with W (I, 4H), U (H, 4H), b (4H,) and the three ``nn.LayerNorm``'s gains and shifts.
    As a careful user would, it forms LN_x(x_t W) for every step at once before the loop
    (one GEMM, one layer norm); ``step`` is the rest of a step, which
    ``compile_step=True`` hands to ``torch.compile`` (the loop stays in Python: the whole
    module under ``torch.compile`` unrolls the loop, and its first forward+backward at
    T=100 had not finished after 400 s on 2 loaded cores; the step compiles in ~16 s).
    """
    import torch
    from torch import nn

    class LayerNormLSTM(nn.Module):
        def __init__(self, input_size, hidden_size, compile_step=False):
            super().__init__()
            self.hidden_size = hidden_size
            scale = 1.0 / math.sqrt(hidden_size)
            self.W = nn.Parameter(torch.empty(input_size, 4 * hidden_size).uniform_(-scale, scale))
            self.U = nn.Parameter(torch.empty(hidden_size, 4 * hidden_size).uniform_(-scale, scale))
            self.b = nn.Parameter(torch.zeros(4 * hidden_size))
            self.ln_x = nn.LayerNorm(4 * hidden_size)
            self.ln_h = nn.LayerNorm(4 * hidden_size)
            self.ln_c = nn.LayerNorm(hidden_size)
            self.step = torch.compile(self._step, dynamic=False) if compile_step else self._step

        def _step(self, zx_t, h, c):
            z = zx_t + self.ln_h(h @ self.U) + self.b
            i, f, g, o = z.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.ln_c(c))
            return h, c

        def forward(self, x, state=None):
            """x (B, T, I) -> (y (B, T, H), (h_T, c_T)); state (h_0, c_0), zeros if None."""
            if state is None:
                zeros = x.new_zeros(x.shape[0], self.hidden_size)
                state = (zeros, zeros)
            h, c = state
            zx = self.ln_x(x @ self.W)  # (B, T, 4H), every step at once
            ys = []
            # unbind: one backward for all steps (zx[:, t] would fill a (B, T, 4H) gradient
            # each step, measured 3x the whole forward+backward at medium)
            for zx_t in zx.unbind(1):
                h, c = self.step(zx_t, h, c)
                ys.append(h)
            return torch.stack(ys, 1), (h, c)

    return LayerNormLSTM


def _build_layernorm_ops(case, compile_step):
    _require("torch")
    import torch

    fw = frameworks.get("torch")
    fw.check(case.device, case.dtype)
    if case.mode == "step":
        raise Unavailable("no step mode for the framework-ops layer norm LSTM (whole sequences)")
    s = case.size
    torch.manual_seed(case.seed)
    module = layernorm_lstm_module()(s.input_size, s.hidden_size, compile_step=compile_step)
    module = module.to(device=case.device, dtype=getattr(torch, case.dtype))
    return _torch_runner(fw, case, module)


def build_layernorm_ops(runner, case):
    """The framework-ops layer norm LSTM (``layernorm_lstm_module``), eager."""
    return _build_layernorm_ops(case, compile_step=False)


def build_layernorm_ops_compiled(runner, case):
    """The same with its step under ``torch.compile`` (its compile time is the first call's)."""
    return _build_layernorm_ops(case, compile_step=True)


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


def build_flax(runner, case):
    _require("jax", "flax")
    import jax
    from flax import linen as nn

    fw = frameworks.get("jax")
    fw.check(case.device, case.dtype)
    x, dy = _case_data(fw, case)
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
    x, dy = _case_data(fw, case)
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
    x, dy = _case_data(fw, case)
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
