"""The generated CUDA kernels' operations compiled for the CPU by a host C++ compiler.

``emit_cuda.host_source`` wraps each ElementwiseKernel operation in a plain
loop; ``HostKernels`` compiles that text with ``g++`` or ``clang++`` (``$CXX``
first) into a shared library, cached by the hash of its source under
``$LSTM_MULTI_CACHE`` or ``~/.cache/lstm_multi/kernels``, and calls it through
ctypes on NumPy arrays. This runs the exact operation text the GPU runs, so it
is how that text is checked on machines without a GPU (tests and
``lstm_multi.testing.check_variant``). Without a compiler it raises
``CompilerMissing`` (a ``RuntimeError``) saying so; a compiler that refuses the
generated code raises ``RuntimeError`` with its messages.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from . import emit_cuda

_C_TYPES = {"double": np.float64, "float": np.float32}


class CompilerMissing(RuntimeError):
    """No host C++ compiler: the kernels cannot be built here (not an error in them)."""


def host_compiler():
    """Path of the host C++ compiler ($CXX, g++ or clang++), or None."""
    for candidate in (os.environ.get("CXX"), "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def cache_dir() -> Path:
    root = os.environ.get("LSTM_MULTI_CACHE") or Path.home() / ".cache" / "lstm_multi"
    return Path(root) / "kernels"


def _machine_identity(flags) -> str:
    """What a library built with ``flags`` depends on besides its source: the CPU's
    features when the flags target this machine (``-march=native``)."""
    if not any(f.startswith("-march=native") for f in flags):
        return platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            features = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        features = ""
    return f"{platform.machine()} {platform.processor()} {features}"


DEFAULT_FLAGS = ("-O2", "-Wall", "-Werror")


def compile_library(source: str, flags=DEFAULT_FLAGS) -> ctypes.CDLL:
    """``source`` compiled with ``flags`` into a shared library (cached by the hash of
    the compiler, the flags, the source and, for ``-march=native``, the CPU); loaded."""
    cxx = host_compiler()
    if cxx is None:
        raise CompilerMissing(
            "no host C++ compiler found (set CXX, or install g++ or clang++) to compile "
            "the generated kernels for the CPU"
        )
    key = f"{cxx}\n{' '.join(flags)}\n{_machine_identity(flags)}\n{source}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"gates_{digest}.so"
    if not library.exists():
        with tempfile.TemporaryDirectory(dir=directory) as work:
            src = Path(work) / "gates.cpp"
            src.write_text(source)
            built = Path(work) / "gates.so"
            done = subprocess.run(
                [cxx, *flags, "-shared", "-fPIC", "-o", str(built), str(src)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise RuntimeError(f"compiling the generated kernels failed:\n{done.stderr}")
            os.replace(built, library)  # atomic: a concurrent build cannot leave half a file
    return ctypes.CDLL(str(library))


def _pointer(array):
    return array.ctypes.data_as(ctypes.c_void_p)


class HostKernels:
    """A variant's forward and backward kernels run on the CPU, T and S given as C types."""

    def __init__(self, variant, t_type="double", s_type="double"):
        if t_type not in _C_TYPES or s_type not in _C_TYPES:
            raise ValueError(f"types: expected 'double' or 'float', got {t_type!r}, {s_type!r}")
        self.variant = variant
        self.T, self.S = _C_TYPES[t_type], _C_TYPES[s_type]
        programs = variant.programs
        self.kernels = (
            emit_cuda.forward_kernel(programs, variant.name),
            emit_cuda.backward_kernel(programs, variant.name),
        )
        self.library = compile_library(emit_cuda.host_source(self.kernels, t_type, s_type))

    def _params(self, extra):
        return [np.ascontiguousarray(extra[name], dtype=self.T) for name in self.variant.params]

    def forward(self, z, c_prev, extra):
        """-> (h in T, c in S, saved values in S): what the GPU forward kernel writes."""
        programs = self.variant.programs
        z = np.ascontiguousarray(z, dtype=self.T)
        c_prev = np.ascontiguousarray(c_prev, dtype=self.S)
        shape = c_prev.shape
        h, c = np.empty(shape, self.T), np.empty(shape, self.S)
        stored = {n: np.empty(shape, self.S) for n in emit_cuda.forward_stored(programs)}
        params = self._params(extra)
        getattr(self.library, self.kernels[0].name)(
            ctypes.c_ssize_t(c_prev.size),
            _pointer(z),
            _pointer(c_prev),
            *map(_pointer, params),
            ctypes.c_longlong(shape[-1]),
            _pointer(h),
            _pointer(c),
            *map(_pointer, stored.values()),
        )
        known = {programs.inputs["c_prev"]: c_prev, programs.forward_outputs["c"]: c, **stored}
        return h, c, tuple(known[n] for n in programs.saved)

    def backward(self, dh, dc, saved, extra):
        """-> (dz (B, 4H), dc_prev, {param: per-element terms (B, rows, H)}), all in S."""
        dh = np.ascontiguousarray(dh, dtype=self.T)
        dc = np.ascontiguousarray(dc, dtype=self.S)
        batch, hidden = dc.shape
        saved = [np.ascontiguousarray(a, dtype=self.S) for a in saved]
        dz = np.empty((batch, 4 * hidden), self.S)
        dc_prev = np.empty(dc.shape, self.S)
        terms = {
            name: np.empty((batch, len(rows), hidden), self.S)
            for name, rows in self.variant.params.items()
        }
        params = self._params(extra)
        getattr(self.library, self.kernels[1].name)(
            ctypes.c_ssize_t(dc.size),
            _pointer(dh),
            _pointer(dc),
            *map(_pointer, saved),
            *map(_pointer, params),
            ctypes.c_longlong(hidden),
            _pointer(dz),
            _pointer(dc_prev),
            *map(_pointer, terms.values()),
        )
        return dz, dc_prev, terms
