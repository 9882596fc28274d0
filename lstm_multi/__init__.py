"""lstm_multi: one LSTM specification, run and verified in PyTorch, JAX, NumPy and CuPy.

``import lstm_multi`` imports no array framework; ``get_cell(name)`` imports the
one backend asked for::

    import lstm_multi
    Cell = lstm_multi.get_cell("numpy")
    cell = Cell(input_size=8, hidden_size=16, variant="peephole")
    params = cell.init(seed=0)
    y, (h_n, c_n) = cell(params, x)

A variant of one's own is its forward gate math; the backward, the fused
kernels and every backend follow (``lstm_multi.spec``)::

    from lstm_multi import Variant, sigmoid, tanh

    def coupled(z, c_prev, p):
        i = sigmoid(z.i + p.i * c_prev)
        c = (1 - i) * c_prev + i * tanh(z.g)
        return sigmoid(z.o + p.o * c) * tanh(c), c

    variant = Variant("coupled", coupled, params={"p": ("i", "o")})
    lstm_multi.testing.check_variant(variant)
"""

import importlib
import sys

from . import kernels, testing
from .compile.trace import mean, rsqrt, sigmoid, tanh
from .engine import engine_table, engines
from .registry import available_backends, get_cell, known_backends
from .spec import GATE_ORDER, VARIANTS, Variant, get_variant, register_variant
from .stream import Stream

__all__ = [
    "GATE_ORDER",
    "VARIANTS",
    "Stream",
    "Variant",
    "available_backends",
    "engine_table",
    "engines",
    "get_cell",
    "get_variant",
    "kernels",
    "known_backends",
    "mean",
    "register_variant",
    "rsqrt",
    "sigmoid",
    "tanh",
    "testing",
]
__version__ = "0.1.0"


#: framework -> the lstm_multi module that registers lstm_multi's classes with it on import
_REGISTERING_MODULES = {
    # torch.serialization.add_safe_globals: torch.load (default weights_only=True)
    # restores a whole saved lstm_multi.torch.LSTM
    "torch": "lstm_multi.torch",
    # keras.saving.register_keras_serializable: keras.models.load_model restores a
    # saved lstm_multi.keras.LSTM (Keras imports no module a saved config names but
    # its own, so the registration must have run before load_model)
    "keras": "lstm_multi.keras",
}


def _register_with_frameworks():
    """Import the module of ``_REGISTERING_MODULES`` of each framework already imported,
    so that after a plain ``import lstm_multi`` the framework's loader finds the saved
    layers. No framework is imported that was not already."""
    for framework, module in _REGISTERING_MODULES.items():
        if sys.modules.get(framework) is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError:  # a broken framework: its module says so when imported
            pass


_register_with_frameworks()
