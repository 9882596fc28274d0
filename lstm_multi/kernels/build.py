"""Building, caching and loading the generated C++ kernels: the one place a compiler runs.

``compile_library(source, flags, include_dirs)`` compiles C++ text with the host
compiler (``$CXX``, ``g++`` or ``clang++``) into a shared library and loads it; the
text may ``#include`` headers from ``include_dirs`` (passed as ``-I``: the kernels'
support headers in ``kernels/cpp``). Libraries are cached on disk, named by the hash
of the compiler, the flags, the source, the contents of every file in
``include_dirs`` (a changed header is a new library, never a stale one loaded) and
(for ``-march=native``) the CPU (``library_digest``), in ``cache_dir()``:
``$LSTM_MULTI_CACHE/kernels`` or ``~/.cache/lstm_multi/kernels``.

The cache is safe against crashes, concurrent builders and damage:

* a library is built in a private build directory inside the cache, fsynced and
  renamed into place (``gates_<digest>.so``), then its SHA-256 is written beside
  it the same way (``gates_<digest>.sha256``), then the directory is fsynced;
* before a cached library is loaded its bytes are hashed and compared with that
  record. A missing or different record (a truncated, emptied or overwritten
  file, or one from a crash) is never ``dlopen``-ed: the library is rebuilt, once,
  and the rebuilt one loaded (a library that still fails is a ``BuildFailed``);
* several processes building the same library each build under their own name
  and rename over one another; every version renamed into place is complete.

Where the cache cannot be used (it cannot be created or written, or libraries
there cannot be mapped executable, as on a ``noexec`` mount) one
``RuntimeWarning`` names it and the reason, and this process builds in a private
temporary directory instead (``tempfile.mkdtemp(prefix="lstm_multi-")``, removed
at exit). ``clear_cache()`` removes the built libraries and forgets the loaded ones.

Errors, all ``RuntimeError``:

* ``CompilerMissing``: no host C++ compiler (not an error in the kernels);
* ``BuildFailed``: the compiler refused the code (its messages follow), or what it
  built cannot be loaded;
* ``CacheUnusable``: neither the cache nor a private temporary directory can hold
  and load the libraries (the message names them and says why).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from .. import environment


class CompilerMissing(RuntimeError):
    """No host C++ compiler: the kernels cannot be built here (not an error in them)."""


class BuildFailed(RuntimeError):
    """The compiler refused the generated code (its messages follow), or what it built
    cannot be loaded."""


class CacheUnusable(RuntimeError):
    """A kernel cache directory cannot hold or load the libraries: ``directory`` and
    ``reason`` say which and why."""

    def __init__(self, directory, reason):
        self.directory, self.reason = Path(directory), reason
        super().__init__(f"the kernel cache {directory} cannot be used: {reason}")


def host_compiler():
    """Path of the host C++ compiler, or None: ``$CXX`` where it is set (None where that
    is no command here: the compiler asked for is never silently replaced), else g++,
    else clang++."""
    asked = environment.compiler()
    candidates = (asked,) if asked else ("g++", "clang++")
    return _first_command(candidates, environment.search_path())


@functools.lru_cache(maxsize=16)
def _first_command(candidates: tuple[str, ...], search_path: str | None) -> str | None:
    """The path of the first of ``candidates`` found on ``search_path``, or None.
    Cached by the names and the search path: the engine table asks on every call, and
    a PATH search stats a file in each directory (a third of a one-step call's time)."""
    for candidate in candidates:
        found = shutil.which(candidate, path=search_path)
        if found:
            return found
    return None


def cache_dir() -> Path:
    """The configured kernel cache: ``$LSTM_MULTI_CACHE/kernels`` or
    ``~/.cache/lstm_multi/kernels``."""
    root = environment.cache_root() or Path.home() / ".cache" / "lstm_multi"
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

#: what this module writes in a cache directory (and all ``clear_cache`` removes)
LIBRARY_GLOB, RECORD_GLOB, BUILD_PREFIX = "gates_*.so", "gates_*.sha256", "build-"

#: dlopen's words for a file system that refuses to map a library executable (noexec)
_NOT_EXECUTABLE = ("failed to map segment", "permission denied", "operation not permitted")

#: (directory, digest) -> the library loaded from there in this process
_loaded: dict[tuple[Path, str], ctypes.CDLL] = {}
#: configured cache directory -> why it cannot be used (this process builds privately)
_unusable: dict[Path, CacheUnusable] = {}
#: cache directories already warned about (one warning per directory per process)
_warned_directories: set[Path] = set()
_private: list[Path] = []  # this process's temporary cache, once made

#: bumped by ``forget_loaded``: callers holding loaded kernels compare and drop theirs
generation = 0


def _dlopen(path: Path) -> ctypes.CDLL:
    """Loads a library (the one place; tests replace it to simulate a noexec mount)."""
    return ctypes.CDLL(str(path))


def library_digest(cxx, source: str, flags, include_dirs=()) -> str:
    """The name of ``source``'s library in the cache: the hash of the compiler ``cxx``,
    the flags, the CPU where the flags target it, the source, and every file under
    ``include_dirs`` (its path there and its bytes), which the source may include."""
    key = hashlib.sha256(f"{cxx}\n{' '.join(flags)}\n{_machine_identity(flags)}\n{source}".encode())
    for folder in map(Path, include_dirs):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key.update(f"\n{path.relative_to(folder).as_posix()}\n".encode())
            key.update(path.read_bytes())
    return key.hexdigest()[:24]


def compile_library(source: str, flags=DEFAULT_FLAGS, include_dirs=()) -> ctypes.CDLL:
    """``source`` compiled with ``flags`` into a shared library, headers included from
    ``include_dirs`` (folders, passed as ``-I``); cached by ``library_digest``; loaded.

    Raises ``CompilerMissing``, ``BuildFailed`` or ``CacheUnusable`` (module doc).
    """
    cxx = host_compiler()
    if cxx is None:
        asked = environment.compiler()
        raise CompilerMissing(
            f"CXX: expected a C++ compiler command on PATH, got {asked!r}, which is not one"
            if asked
            else "no host C++ compiler found (set CXX, or install g++ or clang++) to compile "
            "the generated kernels for the CPU"
        )
    digest = library_digest(cxx, source, flags, include_dirs)
    flags = (*flags, *(f"-I{folder}" for folder in include_dirs))
    configured = cache_dir()
    if configured not in _unusable:
        try:
            return _cached_library(configured, digest, cxx, source, flags)
        except CacheUnusable as why:
            _unusable[configured] = why
    why = _unusable[configured]
    try:
        private = _private_directory()
        library = _cached_library(private, digest, cxx, source, flags)
    except CacheUnusable as also:
        raise CacheUnusable(
            configured, f"{why.reason}; nor can the private temporary cache: {also}"
        ) from also
    if configured not in _warned_directories:
        _warned_directories.add(configured)
        warnings.warn(
            f"lstm_multi: the kernel cache {configured} cannot be used ({why.reason}); this "
            f"process builds the compiled kernels in the temporary directory {private} "
            "instead. Point LSTM_MULTI_CACHE at a writable directory on a file system that "
            "allows executables to keep them between runs.",
            RuntimeWarning,
            stacklevel=2,
        )
    return library


def _cached_library(directory: Path, digest: str, cxx, source, flags) -> ctypes.CDLL:
    """The library ``gates_<digest>.so`` in ``directory``: loaded if intact there, else
    (re)built there once and loaded."""
    found = _loaded.get((directory, digest))
    if found is not None:
        return found
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CacheUnusable(directory, f"it cannot be created ({error})") from error
    library = directory / f"gates_{digest}.so"
    loaded = None
    if _intact(library):
        # intact but unloadable (a record written beside someone else's file): rebuilt
        with contextlib.suppress(OSError):
            loaded = _load_from(directory, library)
    if loaded is None:
        _build_into(directory, library, cxx, source, flags)
        try:
            loaded = _load_from(directory, library)
        except OSError as error:
            raise BuildFailed(f"the freshly built {library} cannot be loaded: {error}") from error
    _loaded[directory, digest] = loaded
    return loaded


def _load_from(directory: Path, library: Path) -> ctypes.CDLL:
    """``library`` loaded; a file system that refuses to map it executable (noexec) is a
    ``CacheUnusable`` naming ``directory``, any other failure the ``OSError`` itself."""
    try:
        return _dlopen(library)
    except OSError as error:
        if _not_executable(error):
            why = f"libraries there cannot be loaded ({error})"
            raise CacheUnusable(directory, why) from error
        raise


def _record_of(library: Path) -> Path:
    return library.with_suffix(".sha256")


def _intact(library: Path) -> bool:
    """Whether ``library`` exists and its bytes hash to its recorded SHA-256."""
    try:
        expected = _record_of(library).read_text().strip()
        actual = hashlib.sha256(library.read_bytes()).hexdigest()
    except OSError:
        return False
    return expected == actual


def _not_executable(error: OSError) -> bool:
    message = str(error).lower()
    return any(words in message for words in _NOT_EXECUTABLE)


def _build_into(directory: Path, library: Path, cxx, source, flags):
    """Compiles ``source`` in a fresh build directory inside ``directory``, then renames
    the library into place and after it its SHA-256 record (each fsynced first)."""
    try:
        work = Path(tempfile.mkdtemp(prefix=BUILD_PREFIX, dir=directory))
    except OSError as error:
        raise CacheUnusable(directory, f"files cannot be created there ({error})") from error
    try:
        src, built, record = work / "gates.cpp", work / "gates.so", work / "gates.sha256"
        try:
            src.write_text(source)
        except OSError as error:
            raise CacheUnusable(directory, f"files cannot be written there ({error})") from error
        command = [cxx, *flags, "-shared", "-fPIC", "-o", str(built), str(src)]
        try:
            done = subprocess.run(command, capture_output=True, text=True)
        except OSError as error:
            raise BuildFailed(f"the C++ compiler {cxx} could not be run: {error}") from error
        if done.returncode != 0:
            raise BuildFailed(
                f"compiling the generated kernels failed ({cxx}):\n{done.stderr or done.stdout}"
            )
        try:
            _write_durably(record, hashlib.sha256(built.read_bytes()).hexdigest() + "\n")
            _fsync(built)
            os.replace(built, library)  # atomic: readers see the old file or the whole new one
            os.replace(record, _record_of(library))  # after the library it describes
            _fsync_directory(directory)
        except OSError as error:
            raise CacheUnusable(directory, f"files cannot be written there ({error})") from error
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_durably(path: Path, text: str):
    with open(path, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _fsync(path: Path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_directory(directory: Path):
    """Makes the renames durable where the platform can fsync a directory."""
    try:
        _fsync(directory)
    except OSError:
        pass  # not supported here (Windows, some file systems): the renames still happened


def _private_directory() -> Path:
    """This process's temporary cache (made on first use, removed at exit)."""
    if not _private:
        try:
            made = Path(tempfile.mkdtemp(prefix="lstm_multi-"))
        except OSError as error:
            raise CacheUnusable(tempfile.gettempdir(), f"no directory there ({error})") from error
        atexit.register(shutil.rmtree, made, ignore_errors=True)
        _private.append(made)
    return _private[0]


def forget_loaded():
    """Drops this process's record of loaded libraries and of unusable caches, so that
    the next ``compile_library`` looks at the disk again (loaded libraries stay mapped
    while anything uses them). ``cpu_kernels`` drops its kernels too (``generation``)."""
    global generation
    _loaded.clear()
    _unusable.clear()
    generation += 1


def clear_cache(directory=None) -> list[Path]:
    """Removes the compiled kernels this library built on this machine; -> the paths removed.

    ``directory``: a cache root as ``LSTM_MULTI_CACHE`` names one (its ``kernels``
    folder is cleared); by default the configured one (``cache_dir()``), and this
    process's private temporary cache if it made one. Only what this module writes
    is removed: the libraries ``gates_*.so``, their records ``gates_*.sha256`` and
    build directories ``build-*`` (a build running in another process at that moment
    fails and is retried by its next call). This process's loaded kernels are
    forgotten too (``forget_loaded``): the next call rebuilds them.
    """
    if directory is None:
        folders = [cache_dir(), *_private]
    else:
        root = Path(directory)
        if not root.is_dir():
            raise ValueError(f"directory: expected an existing cache directory, got {root}")
        folders = [root / "kernels"]
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted([*folder.glob(LIBRARY_GLOB), *folder.glob(RECORD_GLOB)]):
            path.unlink(missing_ok=True)
            removed.append(path)
        for path in sorted(folder.glob(BUILD_PREFIX + "*")):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    forget_loaded()
    return removed
