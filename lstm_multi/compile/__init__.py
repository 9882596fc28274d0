"""The gate-math compiler: forward math traced once, backward derived, code emitted.

* ``trace``: per-unit gate math -> a hash-consed expression DAG;
* ``derive``: reverse-mode differentiation of that DAG (``gate_programs``);
* ``evaluate``: the reference NumPy interpreter of a program;
* ``emit_array``: Python over an ``ops`` object (NumPy, CuPy, PyTorch, JAX);
* ``emit_cuda``: CUDA C for CuPy's ElementwiseKernel, and row kernels (RawKernel, a
  thread block a row) for programs with row reductions (the same text runs on a host
  C++ compiler in tests);
* ``row_phases``: the passes over a row that its reductions need (C++ and CUDA C);
* ``emit_triton``: the same kernels as a Triton module (run by its interpreter in
  the tests);

Nothing here imports an array framework or runs a compiler: building and loading
the generated C++ is ``lstm_multi.kernels``.
"""

from .derive import GatePrograms, gate_programs
from .trace import mean, rsqrt, sigmoid, tanh

__all__ = ["GatePrograms", "gate_programs", "mean", "rsqrt", "sigmoid", "tanh"]
