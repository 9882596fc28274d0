"""The kernel runtime: the generated C++ built by the host compiler, cached and loaded.

* ``build``: compiling C++ text into a shared library, the cache, loading;
* ``cpu_kernels``: a variant's generated CPU kernels (``compile.emit_cpu``), bound
  through ctypes for every framework's CPU arrays;
* ``cpp/``: the fixed C++ the generated CPU kernels include (nonlinearities, step,
  sequence and batch-split loops, the BLAS binding), shipped as package data;
* ``blas``: the integer width of the framework's BLAS, which those loops call;
* ``host_kernels``: the generated CUDA C compiled for the CPU (a correctness tool:
  tests and ``lstm_multi.testing.check_variant``).

``lstm_multi.compile`` writes the source text; this package is the only place a
compiler runs or a library is loaded. Nothing here imports an array framework.

``clear_cache()`` removes the libraries built on this machine and forgets the loaded
ones (``build.clear_cache``).
"""

from .build import clear_cache

__all__ = ["clear_cache"]
