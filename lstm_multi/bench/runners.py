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
    # (which runner each framework's ratios are to is REFERENCES, below)
    build: Callable  # build(runner, case) -> callable running one iteration, synchronised
    variants: tuple | None = None  # None: every variant
    description: str = ""
    backend: str | None = None  # lstm_multi backend name for role "backend"
    options: dict = field(default_factory=dict)
    per_variant: bool = True  # False: the same computation for every variant (run once)
    #: the devices it runs on (None: every device the framework has); others leave it out
    devices: tuple | None = None
    #: the engine this runner names (``lstm_multi.engines``); None: the cell's "auto".
    #: Left out (``Unavailable``) where that engine would fall back, or where auto runs it
    #: already (the default runner measures it then)
    engine: str | None = None
    #: measured by default (True), or only when named (``--peer``) or in ``--full`` runs
    #: (False: a peer that adds minutes and no framework's reference)
    in_default: bool = True

    def supports(self, variant):
        return self.variants is None or variant in self.variants


# lstm_multi backends ---------------------------------------------------------


def build_backend(runner, case):
    import lstm_multi

    fw = frameworks.get(runner.framework)
    fw.check(case.device, case.dtype)
    Cell = lstm_multi.get_cell(runner.backend)
    s = case.size
    if runner.devices is not None and case.device not in runner.devices:
        raise Unavailable(f"runs on {', '.join(runner.devices)} only (use --device cuda)")
    options = dict(runner.options)
    if runner.engine is not None:
        options["engine"] = runner.engine
    cell = Cell(s.input_size, s.hidden_size, variant=case.variant, batch_first=True, **options)
    x_np, dy_np = case.data()
    x, dy = (
        fw.to_device(x_np, case.dtype, case.device),
        fw.to_device(dy_np, case.dtype, case.device),
    )
    if runner.engine is not None:
        _check_engine_runs(cell, Cell(s.input_size, s.hidden_size, variant=case.variant), x)
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


def _check_engine_runs(cell, default_cell, x):
    """``Unavailable`` unless ``cell``'s named engine runs x itself and the default cell
    (auto) runs another: a fallback or a repeat of the default row is not measured."""
    choice = cell.explain(x)
    if choice.engine != choice.requested:
        why = dict(choice.passed_over).get(choice.requested, "")
        raise Unavailable(f"engine {choice.requested!r} falls back to {choice.engine!r} ({why})")
    if default_cell.explain(x).engine == choice.engine:
        raise Unavailable(f"the default runner runs engine {choice.engine!r} already")


def installed_backends():
    """The backends whose framework is installed, found without importing any framework
    (a backend that still cannot run, as CuPy without a GPU, says why when built)."""
    import importlib.util

    from .. import registry

    return [
        name
        for name in registry.known_backends()
        if importlib.util.find_spec(registry.framework_of(name)) is not None
    ]


def backend_runners():
    """One runner per installed backend (its "auto" engine), plus its ``BENCH_ENGINES``."""
    import lstm_multi.engine

    runners = []
    for name in installed_backends():
        framework = frameworks.framework_of_backend(name)
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
        for engine, devices in BENCH_ENGINES.get(name, ()):
            runners.append(
                Runner(
                    f"{name}[{engine}]",
                    framework,
                    "backend",
                    build_backend,
                    backend=name,
                    engine=engine,
                    description=f"lstm_multi {name} backend, engine={engine!r}: "
                    f"{lstm_multi.engine.get_engine(engine).summary}",
                    devices=devices,
                )
            )
    return runners


#: backend -> (engine, devices or None for every device) measured beside its default
#: (auto), where the engine runs the case and auto picks another
BENCH_ENGINES = {
    "torch": (
        ("native", None),
        ("cpu_kernels", None),
        ("triton", ("cuda",)),
        ("graphed_triton", ("cuda",)),
        ("triton_persistent", ("cuda",)),
    ),
    "cupy": (("cupy_graphed", ("cuda",)),),
    "jax": (("pallas_persistent", ("cuda",)),),
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
            in_default=False,
        ),
        Runner(
            "layernorm.torch_ops",
            "torch",
            "peer",
            peers.build_layernorm_ops,
            ("layernorm",),
            "the layer norm LSTM as a user writes it in torch: nn.LayerNorm, a Python loop "
            "over time, autograd (run with -v layernorm)",
        ),
        Runner(
            "layernorm.torch_compile",
            "torch",
            "peer",
            peers.build_layernorm_ops_compiled,
            ("layernorm",),
            "the same, its step under torch.compile (its compile, ~15 s a size and mode, is "
            "the first call's, not timed)",
            in_default=False,
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


#: each framework's reference: its rows are timed alternately with it, in the framework's
#: own process, and their ratio is to it (a ratio to a runner of another process would
#: compare times taken at other moments of the machine)
REFERENCES = {
    "torch": "torch.nn.LSTM",
    "jax": "flax",
    "numpy": "numpy.matmuls",
    "cupy": "cupy.matmuls",
}
#: the column a reference's ratios are printed in
REFERENCE_COLUMNS = {
    "torch.nn.LSTM": "x nn.LSTM",
    "flax": "x Flax",
    "numpy.matmuls": "x GEMM floor",
    "cupy.matmuls": "x GEMM floor",
}
REFERENCE = REFERENCES["torch"]


def peer_names():
    return [r.name for r in all_runners() if r.role != "backend"]
