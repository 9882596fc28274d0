"""A variant's generated CPU kernels (``emit_cpu``), compiled once per machine and loaded.

``cpu_kernels(variant, scalar)`` returns a ``CpuKernels`` (or None where they
cannot be had, after one warning saying why): the four functions of
``emit_cpu`` called through ctypes on raw addresses, so that any framework's
contiguous CPU arrays can be passed (``ops.address``). Compiled with the host
C++ compiler at ``-O3 -march=native`` (the library is cached by source,
flags and CPU under ``$LSTM_MULTI_CACHE`` or ``~/.cache/lstm_multi``, see
``host_kernels``): a second process, or a second run, loads it in
milliseconds.

``LSTM_MULTI_CPU_KERNELS=0`` turns them off (every path then runs the
generated array code, one framework call per operation).
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings

from . import emit_cpu, emit_cuda, host_kernels

FLAGS = (
    "-O3",
    "-march=native",
    "-fno-math-errno",  # lets the compiler vectorise; no code here reads errno
    "-fno-trapping-math",  # selects of floating values become blends (vectorisable)
    "-fopenmp-simd",  # the '#pragma omp simd' loops, without an OpenMP runtime
    "-Wall",
    "-Werror",
)

_SIZE = ctypes.c_long
_ADDRESS = ctypes.c_void_p


class CpuKernels:
    """The compiled step and sequence functions of one variant in one scalar type.

    Every array argument is an address (an int, or None for NULL) of a
    C-contiguous array of ``scalar`` (``valid``: of bytes); shapes as in
    ``emit_cpu``. ``saved_count`` is NS, ``rows`` R.
    """

    def __init__(self, variant, scalar):
        self.variant, self.scalar = variant, scalar
        programs = variant.programs
        self.saved_count = len(emit_cuda.forward_stored(programs))
        self.rows = len(programs.param_rows)
        source = emit_cpu.cpu_source(programs, scalar, variant.recurrent_state)
        library = host_kernels.compile_library(source, FLAGS)
        self.step_forward = _bind(library.lm_step_forward, 2, 10)
        self.step_backward = _bind(library.lm_step_backward, 2, 11)
        self.sequence_forward = _bind(library.lm_sequence_forward, 3, 8)
        self.sequence_backward = _bind(library.lm_sequence_backward, 3, 10)
        self.nonlinearities = _bind(library.lm_nonlinearities, 1, 3)
        self._advise = library.lm_advise_huge_pages
        self._advise.argtypes, self._advise.restype = [_ADDRESS, _SIZE], ctypes.c_int

    #: buffers below this size are left to the allocator's ordinary pages
    HUGE_PAGE_MIN_BYTES = 4 << 20

    def advise_huge_pages(self, address, nbytes):
        """Huge pages for a fresh buffer of ``nbytes`` at ``address`` (before its first
        write): the tape of a long sequence is tens of MiB, and faulting it in 4 KiB
        pages cost more than the gate math (benchmarks/NOTES.md section 9)."""
        if nbytes >= self.HUGE_PAGE_MIN_BYTES:
            self._advise(address, nbytes)


def _bind(function, sizes, arrays):
    function.argtypes = [_SIZE] * sizes + [_ADDRESS] * arrays
    function.restype = None
    return function


def enabled() -> bool:
    """False when ``LSTM_MULTI_CPU_KERNELS=0`` asks for the array code everywhere."""
    return os.environ.get("LSTM_MULTI_CPU_KERNELS", "1") != "0"


_warned = []


@functools.cache
def _load(variant, scalar):
    try:
        return CpuKernels(variant, scalar)
    except (host_kernels.CompilerMissing, RuntimeError, OSError) as error:
        if not _warned:
            _warned.append(error)
            first_line = str(error).strip().splitlines()[0]
            warnings.warn(
                "lstm_multi: the fused CPU kernels could not be built, so the CPU runs the "
                f"slower per-operation code ({first_line}). Install g++ or set CXX to get "
                "them; LSTM_MULTI_CPU_KERNELS=0 silences this.",
                RuntimeWarning,
                stacklevel=3,
            )
        return None


def cpu_kernels(variant, scalar):
    """The variant's ``CpuKernels`` in ``scalar`` ("float" or "double"), or None.

    None when they are turned off or cannot be built here (one warning per
    process says why; the callers then run the array code).
    """
    if not enabled():
        return None
    return _load(variant, scalar)
