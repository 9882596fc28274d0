"""Backend names -> backend modules, imported on first use.

This is the one place that knows which backends exist. A backend module
imports its framework at its top and exposes ``Cell`` and ``unavailable_reason()``
(None when it can run here, else a sentence saying why not).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cell import FunctionalCell


class BackendEntry:
    def __init__(self, module: str, framework: str, extra: str):
        self.module = module  # the backend module's import path
        self.framework = framework  # the top-level package it needs
        self.extra = extra  # the pip extra that installs it


_BACKENDS = {
    "numpy": BackendEntry("lstm_multi.backends.numpy_backend", "numpy", "numpy"),
    "torch": BackendEntry("lstm_multi.backends.torch_backend", "torch", "torch"),
    "jax": BackendEntry("lstm_multi.backends.jax_backend", "jax", "jax"),
    "cupy": BackendEntry("lstm_multi.backends.cupy_backend", "cupy", "cupy"),
}


def known_backends() -> list[str]:
    """Every backend name, usable here or not."""
    return sorted(_BACKENDS)


def _entry(name: str) -> BackendEntry:
    try:
        return _BACKENDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"backend: expected one of {known_backends()}, got {name!r}") from None


def framework_of(name: str) -> str:
    """The top-level package backend ``name`` computes with ("torch" for "torch", ...)."""
    return _entry(name).framework


def load_backend(name: str) -> ModuleType:
    """Import and return the backend module ``name``.

    Raises ValueError for an unknown name, ImportError naming the pip extra when
    the framework is missing, and RuntimeError when it cannot run here (such as
    CuPy with no CUDA device).
    """
    entry = _entry(name)
    if importlib.util.find_spec(entry.framework) is None:
        raise ImportError(
            f"backend {name!r} needs {entry.framework}, which is not installed: "
            f"pip install 'lstm_multi[{entry.extra}]'"
        )
    try:
        module = importlib.import_module(entry.module)
    except ImportError as error:
        raise ImportError(
            f"backend {name!r}: importing {entry.framework} failed ({error}); "
            f"reinstall it with pip install 'lstm_multi[{entry.extra}]'"
        ) from error
    reason = module.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run here: {reason}")
    return module


def get_cell(name: str) -> type[FunctionalCell]:
    """The functional cell class of backend ``name`` (see ``lstm_multi.cell.FunctionalCell``)."""
    return load_backend(name).Cell


def shared_cell(name: str, **config: Any) -> FunctionalCell:
    """The functional cell of backend ``name`` built from ``config`` (its constructor's
    keyword arguments), one per configuration: the framework layers (Flax, Equinox,
    Keras) share a cell between layers of equal configuration, so that a JAX cell's
    compiled calls serve them all instead of each layer tracing and compiling its own.
    Cells hold no parameters or state, so sharing one changes no number. Values equal but
    of another type (1 and 1.0, True and 1) are other configurations; a configuration
    with a value that cannot be a key (a list) gets a cell of its own, whose constructor
    checks it as always."""
    key = tuple((argument, type(value), value) for argument, value in sorted(config.items()))
    try:
        hash(key)
    except TypeError:
        return get_cell(name)(**config)
    return _shared_cell(name, key)


@functools.lru_cache(maxsize=128)
def _shared_cell(name: str, key: tuple) -> FunctionalCell:
    return get_cell(name)(**{argument: value for argument, _, value in key})


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, sorted."""
    names = []
    for name in known_backends():
        try:
            load_backend(name)
        except (ImportError, RuntimeError):
            continue
        names.append(name)
    return names
