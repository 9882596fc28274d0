"""The registry of runners: every lstm_multi backend (and its generic path) plus the peers.

A runner builds, for one case (size, variant, mode, dtype, device), a callable
that runs the computation once and waits for it to finish (the framework's
synchronisation). Building may raise ``Unavailable`` with the reason. This is
the only place that knows which runners exist; the suite treats them alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .. import init
from . import frameworks, peers
from .frameworks import Unavailable


@dataclass(frozen=True)
class Case:
    size: object  # config.Size
    variant: str
    mode: str  # "forward" or "forward_backward"
    dtype: str
    device: str
    seed: int = 0

    def data(self):
        """x (B, T, I) and dy (B, T, H), float32 NumPy (each runner casts)."""
        rng = np.random.default_rng(self.seed + 1)
        s = self.size
        x = rng.standard_normal((s.batch, s.steps, s.input_size)).astype("float32")
        dy = rng.standard_normal((s.batch, s.steps, s.hidden_size)).astype("float32")
        return x, dy

    def params(self):
        """Canonical float32 NumPy parameters of one layer and direction."""
        s = self.size
        return init.init_params(
            self.variant, s.input_size, s.hidden_size, 1, 1, self.seed, "float32"
        )


@dataclass(frozen=True)
class Runner:
    name: str
    framework: str
    role: str  # "backend" (lstm_multi), "reference" (torch.nn.LSTM), "peer", "floor"
    build: Callable  # build(runner, case) -> callable running one iteration, synchronised
    variants: tuple | None = None  # None: every variant
    description: str = ""
    backend: str | None = None  # lstm_multi backend name for role "backend"
    options: dict = field(default_factory=dict)
    per_variant: bool = True  # False: the same computation for every variant (run once)
    #: the devices it runs on (None: every device the framework has); others leave it out
    devices: tuple | None = None
    #: the path equals the default runner's where the variant has no native kernel
    #: (``native=False``): then it is not measured twice
    same_as_default_without_native: bool = False

    def supports(self, variant):
        return self.variants is None or variant in self.variants


# lstm_multi backends ---------------------------------------------------------


def build_backend(runner, case):
    import lstm_multi

    fw = frameworks.get(runner.framework)
    fw.check(case.device, case.dtype)
    Cell = lstm_multi.get_cell(runner.backend)
    s = case.size
    cell = Cell(
        s.input_size, s.hidden_size, variant=case.variant, batch_first=True, **runner.options
    )
    if runner.devices is not None and case.device not in runner.devices:
        raise Unavailable(f"runs on {', '.join(runner.devices)} only (use --device cuda)")
    if runner.same_as_default_without_native:
        native = Cell(s.input_size, s.hidden_size, variant=case.variant, native=True)
        if not getattr(native, "uses_native", False):
            raise Unavailable(
                "no native path for this variant: the default runner is the generic path"
            )
    x_np, dy_np = case.data()
    x, dy = (
        fw.to_device(x_np, case.dtype, case.device),
        fw.to_device(dy_np, case.dtype, case.device),
    )
    params = [
        [{k: fw.to_device(v, case.dtype, case.device) for k, v in p.items()} for p in layer]
        for layer in case.params()
    ]
    if case.mode == "step":
        steps = [x[:, t] for t in range(s.steps)]

        def run():
            state = None
            for x_t in steps:
                y_t, state = cell.step(params, x_t, state)
            fw.sync((y_t, *state))
    elif case.mode == "forward":

        def run():
            y, (h_n, c_n) = cell(params, x)
            fw.sync((y, h_n, c_n))
    else:

        def run():
            fw.sync(cell.vjp(params, x, dy))

    return run


def backend_runners():
    """One runner per available backend, plus its generic path where it has a native one."""
    import inspect

    import lstm_multi

    runners = []
    for name in lstm_multi.available_backends():
        framework = frameworks.framework_of_backend(name)
        Cell = lstm_multi.get_cell(name)
        runners.append(
            Runner(
                name,
                framework,
                "backend",
                build_backend,
                backend=name,
                description=f"lstm_multi {name} backend (default path)",
            )
        )
        if "native" in inspect.signature(Cell.__init__).parameters:
            runners.append(
                Runner(
                    f"{name}[generic]",
                    framework,
                    "backend",
                    build_backend,
                    backend=name,
                    options={"native": False},
                    description=f"lstm_multi {name} backend, generic spec path (native=False)",
                    same_as_default_without_native=True,
                )
            )
        accepted = inspect.signature(Cell.__init__).parameters
        for path, options, description in GPU_PATHS.get(name, ()):
            if all(k in accepted for k in options):
                runners.append(
                    Runner(
                        f"{name}[{path}]",
                        framework,
                        "backend",
                        build_backend,
                        backend=name,
                        options=options,
                        description=f"lstm_multi {name} backend, {description} (GPU)",
                        devices=("cuda",),
                    )
                )
    return runners


#: backend -> the GPU paths measured beside its default with --device cuda:
#: (name, Cell options, description)
GPU_PATHS = {
    "torch": (
        ("triton", {"native": False, "gate_kernel": "triton"}, "per-step Triton gate kernels"),
        (
            "triton+graphs",
            {"native": False, "gate_kernel": "triton", "cuda_graphs": True},
            "per-step Triton gate kernels replayed from CUDA graphs",
        ),
        (
            "persistent",
            {"native": False, "gate_kernel": "triton_persistent"},
            "persistent Triton kernels (H <= 64; per-step kernels above)",
        ),
    ),
    "cupy": (("graphs", {"cuda_graphs": True}, "replayed from CUDA graphs"),),
}


def all_runners():
    """Every runner this machine could run, lstm_multi backends first."""
    runners = backend_runners()
    runners += [
        Runner(
            "torch.nn.LSTM",
            "torch",
            "reference",
            peers.build_torch_lstm,
            ("lstm",),
            "torch.nn.LSTM (PyTorch's own kernel)",
        ),
        Runner(
            "article",
            "torch",
            "peer",
            peers.build_article,
            ("lstm", "peephole_full"),
            "the article's optimized module: x_t @ W + h_t @ U + b in a Python loop, autograd",
        ),
        Runner(
            "flax",
            "jax",
            "peer",
            peers.build_flax,
            ("lstm",),
            "Flax OptimizedLSTMCell in nn.RNN, jitted",
        ),
        Runner(
            "equinox",
            "jax",
            "peer",
            peers.build_equinox,
            ("lstm",),
            "Equinox LSTMCell in lax.scan (vmapped over the batch), jitted",
        ),
        Runner(
            "keras",
            "jax",
            "peer",
            peers.build_keras,
            ("lstm",),
            "Keras 3 LSTM layer on the JAX backend (stateless_call), jitted",
        ),
        Runner(
            "numpy.matmuls",
            "numpy",
            "floor",
            peers.build_matmuls,
            None,
            "NumPy: the LSTM's matrix products alone (no gate math)",
            per_variant=False,
        ),
        Runner(
            "cupy.matmuls",
            "cupy",
            "floor",
            peers.build_matmuls,
            None,
            "CuPy: the LSTM's matrix products alone (no gate math)",
            per_variant=False,
        ),
    ]
    return runners


REFERENCE = "torch.nn.LSTM"


def peer_names():
    return [r.name for r in all_runners() if r.role != "backend"]
