"""Building, caching and loading the generated C++ kernels: the one place a compiler runs.

``compile_library(source, flags)`` compiles C++ text with the host compiler
(``$CXX``, ``g++`` or ``clang++``) into a shared library, cached by the hash of
the compiler, the flags, the source and (for ``-march=native``) the CPU under
``$LSTM_MULTI_CACHE`` or ``~/.cache/lstm_multi``, and loads it. Without a
compiler it raises ``CompilerMissing`` (a ``RuntimeError``); a compiler that
refuses the code raises ``RuntimeError`` with its messages.
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
