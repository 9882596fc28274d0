"""``torch.compile`` graph breaks around methods, without importing TorchDynamo first.

``torch.compiler.disable`` makes ``torch.compile`` stop at a function and run it
eagerly (one graph break), but applying it imports ``torch._dynamo``, which took
1.3 s of the 3.1 s of ``import lstm_multi.torch`` on the reference machine
(``python -X importtime``, 2-core AMD EPYC) in every process, compiled or not.

``break_graph_at(cls, names)`` applies it when TorchDynamo is first imported
instead: at once if it is loaded already, else from a finder on ``sys.meta_path``
that waits for the ``torch._dynamo`` module to finish loading (``torch.compile``
imports it before it traces anything), then replaces each named method of
``cls`` with ``torch.compiler.disable(method)``. Until then the methods are the
plain ones, which only eager code can call.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading

_DYNAMO = "torch._dynamo"
#: (class, method names) waiting for TorchDynamo
_PENDING: list[tuple[type, tuple[str, ...]]] = []
_LOCK = threading.RLock()


def break_graph_at(cls: type, names: tuple[str, ...]) -> None:
    """Make ``torch.compile`` run ``cls``'s methods ``names`` eagerly, as one graph break
    each (``torch.compiler.disable``), from the moment TorchDynamo is imported."""
    with _LOCK:
        if _DYNAMO in sys.modules and not _loading(sys.modules[_DYNAMO]):
            _disable(cls, names)
            return
        _PENDING.append((cls, tuple(names)))
        if not any(isinstance(f, _DynamoFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _DynamoFinder())


def _loading(module) -> bool:
    spec = getattr(module, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def _disable(cls: type, names: tuple[str, ...]) -> None:
    import torch

    for name in names:
        method = cls.__dict__[name]
        if getattr(method, "_torchdynamo_disable", False):
            continue
        disabled = torch.compiler.disable(method)
        disabled.__doc__ = method.__doc__
        setattr(cls, name, disabled)


def _flush() -> None:
    with _LOCK:
        pending = list(_PENDING)
        _PENDING.clear()
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _DynamoFinder)]
    for cls, names in pending:
        _disable(cls, names)


class _DynamoFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for ``torch._dynamo`` it returns the spec the other finders
    give, with a loader that runs ``_flush`` once the module has loaded."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _DYNAMO:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenFlush(spec.loader)
                return spec
        return None


class _ThenFlush(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _flush()

    def __getattr__(self, name):  # the wrapped loader's other methods (get_source, ...)
        return getattr(self._loader, name)
