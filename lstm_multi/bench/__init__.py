"""``lstm-multi bench``: the cross-framework LSTM benchmark.

Runs every available lstm_multi backend and variant, and the peers users
compare against (``torch.nn.LSTM``, the article's hand-written module, Flax,
Equinox, Keras), at a few sizes, each framework in a child process of its own,
and reports each time as a ratio to its framework's reference measured
alternately in that process (``torch.nn.LSTM``, Flax, the matrix products
alone), and as a percentage of the machine's limit (the GEMM FLOPs over the
GEMM rate measured in the run). The method is described in
``benchmarks/README.md``.

Importing this package imports no array framework (NumPy aside, which
lstm_multi itself needs), and neither does a run, which computes nothing in the
caller's process: each runner imports its own framework when it is built, in
its child process.
"""

from .config import PRESETS, BenchConfig, Size, parse_size
from .suite import run_benchmark

__all__ = ["PRESETS", "BenchConfig", "Size", "parse_size", "run_benchmark"]
