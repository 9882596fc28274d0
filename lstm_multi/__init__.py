"""lstm_multi: one LSTM specification, run and verified in PyTorch, JAX, NumPy and CuPy.

``import lstm_multi`` imports no array framework; ``get_cell(name)`` imports the
one backend asked for::

    import lstm_multi
    Cell = lstm_multi.get_cell("numpy")
    cell = Cell(input_size=8, hidden_size=16, variant="peephole")
    params = cell.init(seed=0)
    y, (h_n, c_n) = cell(params, x)
"""

from .registry import available_backends, get_cell, known_backends
from .spec import GATE_ORDER, VARIANTS

__all__ = ["GATE_ORDER", "VARIANTS", "available_backends", "get_cell", "known_backends"]
__version__ = "0.1.0"
