"""The width of a loaded BLAS's integers, so that the kernels pass integers of that type.

The batch-split loops call the framework's BLAS by its plain Fortran and CBLAS names
(``sgemm_``, ``dgemm_``, ``cblas_sgemm_pack``, ...), whose integer arguments are
32-bit ``int`` in an LP64 build and 64-bit in an ILP64 one; nothing in the symbol
says which. ``integer_bytes(library)`` asks the library where it can tell, and
otherwise takes LP64:

* OpenBLAS says how it was built: ``openblas_get_config()`` names ``USE64BITINT``
  in an ILP64 build (one that renames its symbols, ``sgemm_64_``, has no plain
  ``sgemm_`` and is not bound at all);
* anything else is taken as LP64: MKL linked in with its LP64 interface, as in
  torch's x86 wheels (``libtorch_cpu`` exports ``sgemm_`` with a 32-bit
  ``MKL_INT``, and its ILP64 API under other names, ``sgemm_64``), the reference
  BLAS, Accelerate. MKL cannot be asked which interface it was linked with (one
  linked with its ILP64 interface would be misread), and its single dynamic
  library (``libmkl_rt``) picks one at run time, LP64 by default. The only BLAS
  the kernels are given today is torch's (``ops.host_blas``), LP64.

The kernels (``kernels/cpp/lm_blas.h``) then call the BLAS through function types
with integers of exactly that width: no value relies on the byte order to be read.
"""

from __future__ import annotations

import ctypes
import os

#: LP64 and ILP64: the widths ``lm_blas_bind`` takes
LP64, ILP64 = 4, 8


def integer_bytes(library: str) -> int:
    """``ILP64`` (8) or ``LP64`` (4): the width of the integers the BLAS in ``library``
    (a shared library already loaded, by its path or name) takes under its plain names,
    as the module doc determines it; LP64 where the library is not loaded."""
    try:
        handle = ctypes.CDLL(library, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return LP64
    config = getattr(handle, "openblas_get_config", None)
    if config is not None:
        config.argtypes, config.restype = [], ctypes.c_char_p
        return ILP64 if b"USE64BITINT" in (config() or b"") else LP64
    return LP64
