"""Framework adapters: move NumPy data to a device, synchronise, multiply matrices.

The one place that knows how each array framework puts data on a device and
waits for its work to finish (``block_until_ready``, ``torch.cuda.synchronize``,
a CuPy stream sync). Runners and the GEMM probe go through these; each adapter
imports its framework only when first used.
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np


class Unavailable(Exception):
    """A runner or framework cannot run in this configuration; the message says why."""


class Framework:
    name = ""
    module = ""  # the top-level package
    devices = ("cpu", "cuda")  # where it can compute at all (known without importing it)
    #: the thread-pool variables of the libraries it computes with (its child process sets
    #: them to the threads it is given; the other libraries' to 1, so that they cannot spin)
    thread_variables = ("OMP_NUM_THREADS",)

    def installed(self):
        return importlib.util.find_spec(self.module) is not None

    def version(self):
        return getattr(importlib.import_module(self.module), "__version__", "?")

    def check(self, device, dtype):
        """Raise Unavailable unless this framework can compute in ``dtype`` on ``device``."""
        if not self.installed():
            raise Unavailable(f"{self.module} is not installed")

    def to_device(self, array, dtype, device):
        raise NotImplementedError

    def sync(self, tree):
        """Wait until the work producing ``tree`` (arrays, nested in tuples/lists/dicts) is done."""

    def matmul(self, a, b):
        return a @ b


class NumpyFramework(Framework):
    name = module = "numpy"
    devices = ("cpu",)
    thread_variables = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")

    def check(self, device, dtype):
        super().check(device, dtype)
        if device != "cpu":
            raise Unavailable("NumPy runs on the CPU only")
        if dtype not in ("float32", "float64", "float16"):
            raise Unavailable(f"NumPy has no {dtype}")

    def to_device(self, array, dtype, device):
        return np.ascontiguousarray(array, dtype=dtype)


class TorchFramework(Framework):
    name = module = "torch"
    thread_variables = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

    def check(self, device, dtype):
        super().check(device, dtype)
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise Unavailable("torch sees no CUDA device")

    def to_device(self, array, dtype, device):
        import torch

        return torch.as_tensor(
            np.asarray(array, dtype="float32" if dtype == "bfloat16" else dtype)
        ).to(device=device, dtype=getattr(torch, dtype))

    def sync(self, tree):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()


class JaxFramework(Framework):
    name = module = "jax"
    thread_variables = ()  # XLA's CPU pool takes every core and reads none of these

    def _device(self, device):
        import jax

        platform = "cpu" if device == "cpu" else "gpu"
        try:
            return jax.devices(platform)[0]
        except RuntimeError as error:
            raise Unavailable(f"JAX has no {platform} device ({error})") from None

    def check(self, device, dtype):
        super().check(device, dtype)
        import jax

        self._device(device)
        if dtype == "float64" and not jax.config.jax_enable_x64:
            # the benchmark asked for float64: turn JAX's 64-bit mode on (it is
            # off by default, and without it JAX would compute in float32)
            jax.config.update("jax_enable_x64", True)

    def to_device(self, array, dtype, device):
        import jax
        import jax.numpy as jnp

        return jax.device_put(
            jnp.asarray(np.asarray(array, dtype="float32"), dtype=dtype), self._device(device)
        )

    def sync(self, tree):
        import jax

        jax.block_until_ready(tree)


class CupyFramework(Framework):
    name = module = "cupy"
    devices = ("cuda",)
    thread_variables = ()

    def check(self, device, dtype):
        super().check(device, dtype)
        if device != "cuda":
            raise Unavailable("CuPy runs on a CUDA device only (use --device cuda)")
        if dtype == "bfloat16":
            raise Unavailable("CuPy has no bfloat16")
        import cupy

        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception as error:  # noqa: BLE001 - any CUDA failure means no device
            raise Unavailable(f"CuPy sees no CUDA device ({error})") from None

    def to_device(self, array, dtype, device):
        import cupy

        return cupy.asarray(np.asarray(array, dtype=dtype))

    def sync(self, tree):
        import cupy

        cupy.cuda.get_current_stream().synchronize()


FRAMEWORKS = {
    f.name: f for f in (NumpyFramework(), TorchFramework(), JaxFramework(), CupyFramework())
}


def get(name) -> Framework:
    return FRAMEWORKS[name]


def framework_of_backend(backend):
    """The framework an lstm_multi backend computes with (from lstm_multi's registry)."""
    from .. import registry

    return registry.framework_of(backend)


#: every thread-pool variable a framework's child process sets
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def gemm_rate(device, dtype, n=1024, repeats=7, names=None):
    """The highest square-GEMM rate (FLOP/s) the installed frameworks (or ``names``) reach.

    Returns (rate, {framework: rate}); each rate is 2 n^3 over the best time of
    ``repeats`` products after one warm-up (the highest rate reached: a limit).
    """
    import time

    rates = {}
    rng = np.random.default_rng(0)
    a_np, b_np = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    for name, fw in FRAMEWORKS.items():
        if names is not None and name not in names:
            continue
        try:
            fw.check(device, dtype)
        except (Unavailable, ImportError):
            continue
        a, b = fw.to_device(a_np, dtype, device), fw.to_device(b_np, dtype, device)
        fw.sync(fw.matmul(a, b))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fw.sync(fw.matmul(a, b))
            times.append(time.perf_counter() - start)
        rates[name] = 2.0 * n**3 / min(times)
    if not rates:
        return None, rates
    return max(rates.values()), rates
