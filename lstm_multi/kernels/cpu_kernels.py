"""A variant's generated CPU kernels (``emit_cpu``), compiled once per machine and loaded.

``cpu_kernels(variant, scalar)`` returns a ``CpuKernels`` (or None where they
cannot be had, after one warning saying why): the step and sequence functions
(``emit_cpu``'s gate math in the loops of ``cpp/lm_loops.h``, which states their
contracts) called through ctypes on raw addresses, so that any framework's
contiguous CPU arrays can be passed (``ops.address``). The generated text
includes the fixed C++ around the gate math from ``HEADERS`` (``kernels/cpp``,
shipped with the package). Compiled with the host C++ compiler at ``-O2
-march=native`` (the library is cached by source, headers, flags and CPU under
``$LSTM_MULTI_CACHE`` or ``~/.cache/lstm_multi``, checked against its recorded
hash before it is loaded, see ``build``): a second process, or a second run,
loads it in milliseconds.

In the process, the kernels are kept by the SHA-256 of their source (variants
computing the same math share them), and each variant is mapped to its kernels
weakly: a variant that has run is freed with its last reference. A failed build
is remembered per variant (one warning per process says why), except one that
failed for want of a compiler, which looks for one again on the next call;
``lstm_multi.kernels.clear_cache()`` (or ``build.forget_loaded()``) forgets all.

``engine="array"`` on a cell runs the generated array code instead (one
framework call per operation); ``LSTM_MULTI_CPU_KERNELS=0`` turns the kernels
off for the whole process (CI's array-code run).

The batch-split loops (``lm_split_forward``/``lm_split_backward``) run each
thread's rows of the batch through the whole sequence, the step products on
the framework's own BLAS. ``CpuKernels.split_loops(host)`` gives them only
where that is safe: the framework names a loaded library carrying a BLAS
(``ops.host_blas()``: torch's MKL), and that library runs on the OpenMP
runtime the kernels bound to, so that the BLAS sees their parallel region and
runs one thread in each of theirs instead of starting a team of its own in
each (benchmarks/NOTES.md section 12). The BLAS is called with integers of the
width it declares (``blas.integer_bytes``). ``LSTM_MULTI_CPU_THREADS=0`` turns
them off, for CI and benchmarks (no argument: the plan takes them only where
they measured faster, ``kernel_direction._split_plan``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import warnings
import weakref
from pathlib import Path
from typing import NamedTuple

from .. import environment
from ..compile import emit_cpu, emit_cuda
from . import blas, build

#: the C++ the generated text includes (``lm_math.h``, ``lm_kernels.h``): package data
HEADERS = Path(__file__).parent / "cpp"

FLAGS = (
    "-O2",  # as fast as -O3 here (the gate loops are omp simd), in 0.6x the compile time
    "-march=native",
    "-fno-math-errno",  # lets the compiler vectorise; no code here reads errno
    "-fno-trapping-math",  # selects of floating values become blends (vectorisable)
    "-fopenmp",  # the '#pragma omp simd' loops, and the batch-split loops' parallel region
    "-Wall",
    "-Werror",
)
#: where the compiler has no OpenMP runtime (Apple's clang): the simd loops alone,
#: and no batch-split loops
FLAGS_WITHOUT_OPENMP = tuple("-fopenmp-simd" if f == "-fopenmp" else f for f in FLAGS)

#: a translation unit that builds and links only where the compiler has OpenMP
OPENMP_PROBE = (
    '#include <omp.h>\nextern "C" int lm_openmp_threads() { return omp_get_max_threads(); }\n'
)


#: (build.generation, compiler) -> whether that compiler builds OpenMP (``openmp_available``)
_openmp_probes: dict = {}


def openmp_available() -> bool:
    """Whether the host compiler builds and links OpenMP with ``FLAGS`` (Apple's clang
    does not): probed once a process and compiler by building a one-function library
    (cached on disk like the kernels; probed again after ``build.forget_loaded``).
    Without it the kernels are built with ``FLAGS_WITHOUT_OPENMP`` and have no
    batch-split loops."""
    key = (build.generation, build.host_compiler())
    if key not in _openmp_probes:
        try:
            build.compile_library(OPENMP_PROBE, FLAGS)
            _openmp_probes[key] = True
        except build.BuildFailed:
            _openmp_probes[key] = False
    return _openmp_probes[key]


_SIZE = ctypes.c_long
_ADDRESS = ctypes.c_void_p


class CpuKernels:
    """The compiled step and sequence functions of one variant in one scalar type.

    Every array argument is an address (an int, or None for NULL) of a
    C-contiguous array of ``scalar`` (``valid``: of bytes); shapes as in
    ``cpp/lm_loops.h``. ``saved_count`` is NS, ``rows`` R.
    """

    def __init__(self, variant, scalar, source=None):
        self.name, self.scalar = variant.name, scalar  # not the variant: see ``_load``
        programs = variant.programs
        self.saved_count = len(emit_cuda.forward_stored(programs))
        #: the blocks of H a row of dz has: 4, or 8 for split halves ([dzx, dzr], ``LM_G``)
        self.z_blocks = len(programs.z_inputs)
        self.rows = len(programs.param_rows)
        if source is None:
            source = kernel_source(variant, scalar)
        # without OpenMP (Apple's clang) the simd loops alone; any other failure is the
        # kernels' own, raised (not retried without OpenMP, which would hide it)
        flags = FLAGS if openmp_available() else FLAGS_WITHOUT_OPENMP
        library = build.compile_library(source, flags, (HEADERS,))
        self.step_forward = _bind(library.lm_step_forward, 2, 10)
        self.step_backward = _bind(library.lm_step_backward, 2, 11)
        self.sequence_forward = _bind(library.lm_sequence_forward, 3, 8)
        self.sequence_backward = _bind(library.lm_sequence_backward, 3, 10)
        self.nonlinearities = _bind(library.lm_nonlinearities, 1, 3)
        self._advise = library.lm_advise_huge_pages
        self._advise.argtypes, self._advise.restype = [_ADDRESS, _SIZE], ctypes.c_int
        self._library = library
        self._split = {}  # host BLAS library -> SplitLoops or None

    def split_loops(self, host):
        """The batch-split loops on ``host``'s BLAS (a ``HostBlas``), or None where they
        cannot run safely here (see the module doc)."""
        if host is None or not split_enabled():
            return None
        if host.library not in self._split:
            self._split[host.library] = _split_loops(self._library, host.library)
        return self._split[host.library]

    #: buffers below this size are left to the allocator's ordinary pages
    HUGE_PAGE_MIN_BYTES = 4 << 20

    def advise_huge_pages(self, address, nbytes):
        """Huge pages for a fresh buffer of ``nbytes`` at ``address`` (before its first
        write): the tape of a long sequence is tens of MiB, and faulting it in 4 KiB
        pages cost more than the gate math (benchmarks/NOTES.md section 9)."""
        if nbytes >= self.HUGE_PAGE_MIN_BYTES:
            self._advise(address, nbytes)


def kernel_source(variant, scalar) -> str:
    """The C++ text of the variant's kernels in ``scalar`` (``emit_cpu.cpu_source``)."""
    return emit_cpu.cpu_source(variant.programs, scalar, variant.recurrent_state)


def _bind(function, sizes, arrays):
    function.argtypes = [_SIZE] * sizes + [_ADDRESS] * arrays
    function.restype = None
    return function


class HostBlas(NamedTuple):
    """Where a framework's BLAS is (``library``, a loaded shared library's path) and how
    many threads it runs (``threads``): what ``ops.host_blas()`` gives."""

    library: str
    threads: int


class SplitLoops:
    """``lm_split_forward``/``lm_split_backward`` bound to a BLAS (``cpp/lm_split.h``).

    ``packed_bytes(rows, H, transposed)`` is the size of U packed for the products
    of ``rows`` rows (0: no packed GEMM here, pass None for it), ``pack`` fills it.
    """

    def __init__(self, library):
        self.forward = library.lm_split_forward
        self.forward.argtypes = [_SIZE] * 3 + [_ADDRESS] * 9 + [_SIZE]
        self.backward = library.lm_split_backward
        self.backward.argtypes = [_SIZE] * 3 + [_ADDRESS] * 11 + [_SIZE]
        self.forward.restype = self.backward.restype = None
        self.packed_bytes = library.lm_blas_packed_bytes
        self.packed_bytes.argtypes, self.packed_bytes.restype = [_SIZE, _SIZE, ctypes.c_int], _SIZE
        self.pack = library.lm_blas_pack
        self.pack.argtypes, self.pack.restype = (
            [_SIZE, _SIZE, _ADDRESS, ctypes.c_int, _ADDRESS],
            None,
        )


def _split_loops(library, blas_library):
    if not hasattr(library, "lm_same_openmp_runtime"):
        return None  # built without OpenMP
    same = library.lm_same_openmp_runtime
    same.argtypes, same.restype = [ctypes.c_char_p], ctypes.c_int
    if not same(os.fsencode(blas_library)):
        return None
    bind = library.lm_blas_bind
    bind.argtypes, bind.restype = [ctypes.c_char_p, ctypes.c_int], ctypes.c_int
    width = blas.integer_bytes(blas_library)
    return SplitLoops(library) if bind(os.fsencode(blas_library), width) else None


def split_enabled() -> bool:
    """False when ``LSTM_MULTI_CPU_THREADS`` is off (``0``, ``off``, ...) and asks for the
    per-step loop instead of the batch-split loops (``environment.cpu_split_enabled``)."""
    return environment.cpu_split_enabled()


def enabled() -> bool:
    """False when ``LSTM_MULTI_CPU_KERNELS`` is off (``0``, ``off``, ...) and asks for the
    array code everywhere (``environment.cpu_kernels_enabled``)."""
    return environment.cpu_kernels_enabled()


_warned = []  # the first failure, once warned about (one warning per process)

#: the kernels of each library loaded, by the SHA-256 of its source: few, and shared by
#: equal variants
_by_source: dict[str, CpuKernels] = {}
#: variant -> {scalar: its CpuKernels, or a failure}; weak, so that no variant is kept
#: alive by having run (CpuKernels holds no variant)
_by_variant: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_generation = [build.generation]  # the build generation these caches belong to


class _Failed(NamedTuple):
    """A variant's kernels could not be had; ``no_compiler``: for want of a compiler
    (looked for again on the next call: cheap, and one may have appeared)."""

    no_compiler: bool


def _load(variant, scalar):
    """The variant's kernels, from the caches or built; None (after one warning per
    process) where they cannot be built."""
    if _generation[0] != build.generation:  # build.forget_loaded / clear_cache ran
        _by_source.clear()
        _by_variant.clear()
        _generation[0] = build.generation
    known = _by_variant.get(variant)
    if known is None:
        known = _by_variant[variant] = {}
    found = known.get(scalar)
    if isinstance(found, CpuKernels):
        return found
    if found is not None and not (found.no_compiler and build.host_compiler() is not None):
        return None
    try:
        source = kernel_source(variant, scalar)
        digest = hashlib.sha256(source.encode()).hexdigest()
        kernels = _by_source.get(digest)
        if kernels is None:
            kernels = _by_source[digest] = CpuKernels(variant, scalar, source)
    except (RuntimeError, OSError) as error:
        known[scalar] = _Failed(isinstance(error, build.CompilerMissing))
        _warn_once(error)
        return None
    known[scalar] = kernels
    return kernels


def _warn_once(error):
    if _warned:
        return
    _warned.append(str(error))
    # the error says the cause: no compiler (and what to install), the compiler's own
    # messages, or the cache that cannot be used
    cause = _first_lines(str(error)).rstrip(".")
    warnings.warn(
        "lstm_multi: the fused CPU kernels could not be built, so the CPU runs the slower "
        f"per-operation code. {type(error).__name__}: {cause}. "
        "engine='array' on the cell (or LSTM_MULTI_CPU_KERNELS=0, for a whole CI run) "
        "silences this.",
        RuntimeWarning,
        stacklevel=4,
    )


def _first_lines(text, count=6):
    """The first ``count`` lines of ``text`` (a compiler's messages), saying how many follow."""
    lines = text.strip().splitlines()
    if len(lines) <= count:
        return "\n".join(lines)
    return "\n".join(lines[:count]) + f"\n... ({len(lines) - count} more lines)"


def cpu_kernels(variant, scalar):
    """The variant's ``CpuKernels`` in ``scalar`` ("float" or "double"), or None.

    None when they are turned off or cannot be built here (one warning per
    process says why; the callers then run the array code).
    """
    if not enabled():
        return None
    return _load(variant, scalar)
