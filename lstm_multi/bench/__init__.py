"""``lstm-multi bench``: the cross-framework LSTM benchmark.

Runs every available lstm_multi backend and variant, and the peers users
compare against (``torch.nn.LSTM``, the article's hand-written module, Flax,
Equinox, Keras), at a few sizes, and reports each time as a ratio to
``torch.nn.LSTM`` measured alternately in the same run, and as a percentage of
the machine's limit (the GEMM FLOPs over the GEMM rate measured at the start).
The method is described in ``benchmarks/README.md``.

Importing this package imports no array framework; each runner imports its
own framework when it is built.
"""

from .config import PRESETS, BenchConfig, Size, parse_size
from .suite import run_benchmark

__all__ = ["PRESETS", "BenchConfig", "Size", "parse_size", "run_benchmark"]
