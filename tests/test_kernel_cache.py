"""The compiled-kernel cache (``lstm_multi.kernels.build``) is safe and heals itself.

* a damaged cached library (truncated to 40000 or 0 bytes, or garbage) is never
  loaded: the next process rebuilds it and computes the array code's numbers (a
  truncated library used to kill every later process with a bus error);
* a library whose recorded SHA-256 differs is rebuilt;
* a cache that cannot be created, or whose libraries cannot be mapped executable
  (noexec), gives one warning naming it, and the kernels are built in a private
  temporary directory instead;
* four processes building the same library at once all load it and compute;
* ``clear_cache()`` removes what was built (and only that) and forgets the loaded
  kernels, failed builds included; a build that failed for want of a compiler is
  not remembered once there is one;
* running a variant does not keep it alive.

Every test points ``LSTM_MULTI_CACHE`` at its own temporary directory.
"""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import types
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest

import lstm_multi
from lstm_multi import sigmoid, spec, tanh
from lstm_multi.kernels import build, cpu_kernels

pytestmark = pytest.mark.skipif(
    build.host_compiler() is None, reason="no host C++ compiler (g++, clang++ or $CXX)"
)

#: a small library: quick to build, and what it computes is known
SOURCE = 'extern "C" double lm_affine(double x) { return 2.0 * x + %r; }\n'

#: a peephole NumPy cell in float32 (the generated CPU kernels) against the array code
#: (LSTM_MULTI_CPU_KERNELS=0), warnings as errors: prints "ran on the kernels", exits 0
CELL_SCRIPT = textwrap.dedent(
    """
    import os, warnings
    warnings.simplefilter("error")
    import numpy as np
    import lstm_multi
    from lstm_multi.kernels import cpu_kernels
    cell = lstm_multi.get_cell("numpy")(input_size=3, hidden_size=4, variant="peephole")
    params = cell.init(seed=0)
    x = np.random.default_rng(0).standard_normal((2, 5, 3)).astype(np.float32)
    y, (h, c) = cell(params, x)
    assert cpu_kernels.cpu_kernels(lstm_multi.get_variant("peephole"), "float") is not None
    os.environ["LSTM_MULTI_CPU_KERNELS"] = "0"
    y_array, (h_array, c_array) = cell(params, x)
    for got, want in ((y, y_array), (h, h_array), (c, c_array)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    print("ran on the kernels")
    """
)


def _run(script, cache, **env):
    environment = {**os.environ, "LSTM_MULTI_CACHE": str(cache), **env}
    environment.pop("LSTM_MULTI_CPU_KERNELS", None)
    return subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True
    )


def _libraries(cache):
    """The kernel libraries in ``cache`` (not the OpenMP probe, ``cpu_kernels.openmp_available``)."""
    probe = build.library_digest(build.host_compiler(), cpu_kernels.OPENMP_PROBE, cpu_kernels.FLAGS)
    found = (Path(cache) / "kernels").glob("gates_*.so")
    return sorted(path for path in found if path.name != f"gates_{probe}.so")


def _intact(library):
    record = library.with_suffix(".sha256")
    return record.read_text().strip() == hashlib.sha256(library.read_bytes()).hexdigest()


#: the libraries the tests below need only to find in a cache, by (variant, scalar)
SEEDS = (("peephole", "float"), ("peephole", "double"), ("lstm", "float"))


@pytest.fixture(scope="module")
def shared_libraries():
    """Libraries of the run's own kernel cache (the configured one, where the rest of the
    suite builds and loads the generated kernels: in CI the other tests build these
    three), by (variant, scalar), and the OpenMP probe's ("probe"), loaded or built there
    now. ``_seed`` copies them into a test's empty cache, where a test would otherwise
    build them (about a second of the compiler each) only to have them there; the builds
    a test is about (a rebuild, a build in a fallback directory or without OpenMP) it
    still does. Those not found there (an unusable cache) are left out: the test then
    builds them, as it did before."""
    found = {}
    for name, scalar in SEEDS:
        variant = spec.get_variant(name)
        if cpu_kernels.cpu_kernels(variant, scalar) is None:
            continue
        openmp = cpu_kernels.openmp_available()
        flags = cpu_kernels.FLAGS if openmp else cpu_kernels.FLAGS_WITHOUT_OPENMP
        source = cpu_kernels.kernel_source(variant, scalar)
        digest = build.library_digest(build.host_compiler(), source, flags, (cpu_kernels.HEADERS,))
        found[name, scalar] = build.cache_dir() / f"gates_{digest}.so"
    probe = build.library_digest(build.host_compiler(), cpu_kernels.OPENMP_PROBE, cpu_kernels.FLAGS)
    found["probe"] = build.cache_dir() / f"gates_{probe}.so"
    return {key: path for key, path in found.items() if path.exists() and _intact(path)}


def _seed(cache, shared, *keys):
    """Copies the ``shared_libraries`` ``keys`` (and the OpenMP probe's) into ``cache``,
    each with its record; -> whether all of ``keys`` were there to copy."""
    folder = Path(cache) / "kernels"
    folder.mkdir(parents=True, exist_ok=True)
    for key in ("probe", *keys):
        if key in shared:
            for path in (shared[key], shared[key].with_suffix(".sha256")):
                shutil.copy2(path, folder / path.name)
    return all(key in shared for key in keys)


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory, shared_libraries):
    """A cache holding the peephole float32 kernels (and the OpenMP probe): copied from
    the run's own cache, else built once by another process."""
    cache = tmp_path_factory.mktemp("built_cache")
    if not _seed(cache, shared_libraries, ("peephole", "float")):
        done = _run(CELL_SCRIPT, cache)
        assert done.returncode == 0, done.stderr
    assert len(_libraries(cache)) == 1
    return cache


@pytest.fixture
def fresh_state(tmp_path, monkeypatch):
    """An empty cache of its own, and this process's loaded kernels forgotten before and
    after (so that they are looked for in this cache, and afterwards in the real one)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LSTM_MULTI_CACHE", str(cache))
    forget = getattr(build, "forget_loaded", None)
    if forget is not None:
        forget()
    yield cache
    if forget is not None:
        forget()


def _damage_truncated_40000(library):
    os.truncate(library, 40000)


def _damage_truncated_0(library):
    os.truncate(library, 0)


def _damage_garbage(library):
    size = library.stat().st_size
    library.write_bytes(np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes())


@pytest.mark.parametrize(
    "damage",
    [_damage_truncated_40000, _damage_truncated_0, _damage_garbage],
    ids=lambda damage: damage.__name__.removeprefix("_damage_"),
)
def test_a_damaged_library_is_rebuilt_never_loaded(damage, built_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    (library,) = _libraries(cache)
    damage(library)
    done = _run(CELL_SCRIPT, cache)
    # a dlopen of the truncated file dies of SIGBUS (returncode -7); garbage used to warn
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "ran on the kernels" in done.stdout
    assert _libraries(cache) == [library] and _intact(library)
    assert library.stat().st_size == (_libraries(built_cache)[0]).stat().st_size


def _affine(offset):
    library = build.compile_library(SOURCE % offset)
    function = library.lm_affine
    function.argtypes, function.restype = [build.ctypes.c_double], build.ctypes.c_double
    return function(3.0)


def test_a_library_whose_record_differs_is_rebuilt(fresh_state):
    assert _affine(0.5) == 6.5
    (library,) = _libraries(fresh_state)
    record = library.with_suffix(".sha256")
    assert _intact(library)
    before = library.stat().st_ino
    record.write_text("0" * 64 + "\n")
    build.forget_loaded()
    assert _affine(0.5) == 6.5
    assert library.stat().st_ino != before and _intact(library)  # a new file, renamed in
    record.unlink()  # a missing record: rebuilt as well
    build.forget_loaded()
    before = library.stat().st_ino
    assert _affine(0.5) == 6.5
    assert library.stat().st_ino != before and _intact(library)


def _cache_warnings(caught):
    return [w for w in caught if "kernel cache" in str(w.message)]


def test_an_uncreatable_cache_falls_back_with_one_warning_naming_it(tmp_path, monkeypatch):
    """A cache under a regular file cannot be made, not even by root."""
    (tmp_path / "afile").write_text("")
    cache = tmp_path / "afile" / "cache"
    monkeypatch.setenv("LSTM_MULTI_CACHE", str(cache))
    build.forget_loaded()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _affine(1.25) == 7.25
            assert _affine(2.25) == 8.25
            # the CPU kernels of a variant too, equal to the array code
            variant = _fresh_variant("uncreatable")
            kernels = cpu_kernels.cpu_kernels(variant, "double")
            assert kernels is not None
            _assert_kernels_compute(variant)
            _assert_host_kernels_compute(variant)  # what check_variant runs (issue 22 item 8)
        (warning,) = _cache_warnings(caught)
        message = str(warning.message)
        assert str(cache / "kernels") in message and "cannot be created" in message
        assert "g++" not in message and "CXX=" not in message
        assert not [w for w in caught if "could not be built" in str(w.message)]
    finally:
        build.forget_loaded()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_cache_falls_back(fresh_state):
    fresh_state.mkdir()
    fresh_state.chmod(0o500)
    try:
        with pytest.warns(RuntimeWarning, match=f"kernel cache {fresh_state}"):
            assert _affine(4.0) == 10.0
    finally:
        fresh_state.chmod(0o700)


def test_a_noexec_cache_falls_back_with_one_warning_naming_it(fresh_state, monkeypatch):
    """dlopen on a noexec mount: 'failed to map segment from shared object'."""
    loads = []
    real = build._dlopen

    def noexec(path):
        loads.append(Path(path))
        if Path(path).parent == fresh_state / "kernels":
            raise OSError(f"{path}: failed to map segment from shared object")
        return real(path)

    monkeypatch.setattr(build, "_dlopen", noexec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _affine(-1.0) == 5.0
        assert _affine(-2.0) == 4.0
    (warning,) = _cache_warnings(caught)
    message = str(warning.message)
    assert str(fresh_state / "kernels") in message and "failed to map segment" in message
    assert "g++" not in message
    assert loads[0].parent == fresh_state / "kernels"  # tried there first
    assert all(p.parent != fresh_state / "kernels" for p in loads[1:])  # then not again


def test_a_library_that_will_not_load_when_rebuilt_is_a_build_failure(fresh_state, monkeypatch):
    def broken(path):
        raise OSError(f"{path}: undefined symbol: lm_missing")

    monkeypatch.setattr(build, "_dlopen", broken)
    with pytest.raises(build.BuildFailed, match="cannot be loaded: .*undefined symbol"):
        _affine(0.0)


def test_the_compilers_own_message_is_shown(fresh_state):
    with pytest.raises(build.BuildFailed, match="compiling the generated kernels failed") as why:
        build.compile_library('extern "C" int lm_broken( { return 0; }\n')
    assert "error" in str(why.value)  # the compiler's words
    assert not list((fresh_state / "kernels").glob("build-*"))  # its build folder removed


def test_a_changed_header_is_a_new_library_never_the_stale_one(fresh_state, tmp_path):
    """The source includes a header: changing the header (not the source) builds and
    loads a new library, in the same process and beside the old one in the cache."""
    headers = tmp_path / "headers"
    headers.mkdir()
    source = '#include "lm_probe.h"\nextern "C" double lm_probe() { return LM_PROBE; }\n'
    values = []
    for value in (1.5, 2.5):
        (headers / "lm_probe.h").write_text(f"#define LM_PROBE {value}\n")
        probe = build.compile_library(source, include_dirs=(headers,)).lm_probe
        probe.restype = build.ctypes.c_double
        values.append(probe())
    assert values == [1.5, 2.5]
    assert len(_libraries(fresh_state)) == 2


def test_the_kernels_library_name_covers_every_support_header(tmp_path):
    """Each file the generated kernels include (``cpu_kernels.HEADERS``) is part of the
    library's name: one changed comment in any of them is another library."""
    headers = tmp_path / "cpp"
    shutil.copytree(cpu_kernels.HEADERS, headers)
    source = cpu_kernels.kernel_source(spec.get_variant("peephole"), "float")

    def name(folder=headers):
        return build.library_digest("g++", source, cpu_kernels.FLAGS, (folder,))

    before = name()
    assert before == name(cpu_kernels.HEADERS)  # the contents count, not the folder's path
    assert before != build.library_digest("g++", source, cpu_kernels.FLAGS)
    files = sorted(headers.iterdir())
    assert {f.name for f in files} >= {"lm_math.h", "lm_kernels.h", "lm_loops.h", "lm_blas.h"}
    for path in files:
        original = path.read_text()
        path.write_text(original + "// changed\n")
        assert name() != before, path.name
        path.write_text(original)
    assert name() == before


def test_the_support_headers_ship_with_the_package():
    """pyproject's package data names every file in ``kernels/cpp`` (a header left out
    would be missing from the wheel, and every build of the kernels would fail)."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(lstm_multi.__file__).parent.parent / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("an installed lstm_multi, not a source tree")
    data = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
    kernels = Path(cpu_kernels.__file__).parent
    shipped = {p for pattern in data["lstm_multi.kernels"] for p in kernels.glob(pattern)}
    assert set(cpu_kernels.HEADERS.iterdir()) <= shipped


CONCURRENT_SCRIPT = textwrap.dedent(
    """
    import ctypes, sys
    from lstm_multi.kernels import build
    source = sys.argv[1]
    library = build.compile_library(source)
    function = library.lm_affine
    function.argtypes, function.restype = [ctypes.c_double], ctypes.c_double
    print(function(3.0))
    """
)


def test_concurrent_builders_all_load_the_library(tmp_path):
    cache = tmp_path / "cache"
    # a source that takes the compiler a while, so that the four builds overlap
    filler = "".join(
        f'extern "C" double lm_filler{i}(double x) {{ return x * {i}.5 + {i}; }}\n'
        for i in range(400)
    )
    source = SOURCE % 0.75 + filler
    environment = {**os.environ, "LSTM_MULTI_CACHE": str(cache)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_SCRIPT, source],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        assert float(out) == 6.75
    (library,) = _libraries(cache)
    assert _intact(library)
    names = {p.name for p in (cache / "kernels").iterdir()}
    assert names == {library.name, library.with_suffix(".sha256").name}  # no build-* left


def test_clear_cache_removes_what_was_built_and_forgets_the_loaded(fresh_state):
    assert _affine(0.0) == 6.0 and _affine(1.0) == 7.0
    folder = fresh_state / "kernels"
    libraries = _libraries(fresh_state)
    assert len(libraries) == 2
    (folder / "build-leftover").mkdir()
    (folder / "notes.txt").write_text("not ours")
    removed = lstm_multi.kernels.clear_cache()
    expected = {*libraries, *(p.with_suffix(".sha256") for p in libraries)}
    # (and whatever this process built in a private temporary cache, if it made one)
    assert {p for p in removed if p.parent == folder} == expected | {folder / "build-leftover"}
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert _affine(0.0) == 6.0  # rebuilt: not the forgotten library
    assert _libraries(fresh_state) == [libraries[0]] or _libraries(fresh_state) == [libraries[1]]
    # by path: the cache root, as LSTM_MULTI_CACHE names it
    removed = lstm_multi.kernels.clear_cache(fresh_state)
    assert len(removed) == 2 and _libraries(fresh_state) == []
    with pytest.raises(ValueError, match="directory: expected an existing cache directory"):
        lstm_multi.kernels.clear_cache(fresh_state / "no such folder")


def _fresh_variant(name):
    """The peephole math under a new name (the CPU kernels, keyed by their source, may be
    shared with the built-in's)."""
    base = spec.get_variant("peephole")
    return lstm_multi.Variant(name, base.forward, params=base.params)


def _unseen_variant():
    """A variant whose generated text no test has made before in this process: its gate
    math carries a constant drawn at random (so no module of it is in sys.modules, nor in
    any cache)."""
    k = 1.0 + float(np.random.default_rng().integers(1, 2**40)) * 2.0**-44

    def forward(z, c_prev):
        c = sigmoid(z.f) * c_prev + sigmoid(z.i) * tanh(z.g * k)
        return sigmoid(z.o) * tanh(c), c

    return lstm_multi.Variant("unseen", forward)


def _assert_kernels_compute(variant):
    """The NumPy cell on the variant's kernels equals its array code (float64)."""
    cell = lstm_multi.get_cell("numpy")(input_size=3, hidden_size=4, variant=variant)
    params = cell.init(seed=1, dtype="float64")
    x = np.random.default_rng(1).standard_normal((2, 5, 3))
    y, _ = cell(params, x)
    os.environ["LSTM_MULTI_CPU_KERNELS"] = "0"
    try:
        y_array, _ = cell(params, x)
    finally:
        del os.environ["LSTM_MULTI_CPU_KERNELS"]
    np.testing.assert_allclose(y, y_array, rtol=1e-12, atol=1e-12)


def _assert_host_kernels_compute(variant):
    """The generated CUDA C compiled for the CPU equals the variant's array code."""
    from lstm_multi.backends.numpy_fast import InPlaceOps
    from lstm_multi.kernels.host_kernels import HostKernels

    rng = np.random.default_rng(2)
    batch, hidden = 3, 4
    z, c_prev = rng.standard_normal((batch, 4 * hidden)), rng.standard_normal((batch, hidden))
    extra = {k: rng.standard_normal(s) for k, s in variant.extra_param_shapes(hidden).items()}
    h, c, _ = HostKernels(variant).forward(z, c_prev, extra)
    h_want, c_want, _ = variant.gates_forward(InPlaceOps(np), z, c_prev, extra)
    np.testing.assert_allclose(h, h_want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(c, c_want, rtol=1e-12, atol=1e-12)


def test_clear_cache_forgets_loaded_kernels_and_failed_builds(
    fresh_state, monkeypatch, shared_libraries
):
    variant = _fresh_variant("cleared")  # peephole's source: the library seeded here
    _seed(fresh_state, shared_libraries, ("peephole", "double"))
    first = cpu_kernels.cpu_kernels(variant, "double")
    assert first is not None and cpu_kernels.cpu_kernels(variant, "double") is first
    lstm_multi.kernels.clear_cache()
    assert _libraries(fresh_state) == []
    _seed(fresh_state, shared_libraries)  # the OpenMP probe only: the kernels are rebuilt
    second = cpu_kernels.cpu_kernels(variant, "double")
    assert second is not None and second is not first and len(_libraries(fresh_state)) == 1
    # a failed build is remembered (no rebuild every call) until clear_cache
    other = _fresh_variant("failing")
    monkeypatch.setattr(cpu_kernels, "_warned", ["warned already"])
    real = build.compile_library

    def refuse(source, flags=build.DEFAULT_FLAGS, include_dirs=()):
        raise build.BuildFailed("compiling the generated kernels failed: refused")

    monkeypatch.setattr(build, "compile_library", refuse)
    assert cpu_kernels.cpu_kernels(other, "float") is None
    monkeypatch.setattr(build, "compile_library", real)
    assert cpu_kernels.cpu_kernels(other, "float") is None
    lstm_multi.kernels.clear_cache()
    # the library there to load (a remembered failure would return None without looking)
    _seed(fresh_state, shared_libraries, ("peephole", "float"))
    assert cpu_kernels.cpu_kernels(other, "float") is not None


def test_a_missing_compiler_is_not_remembered_once_there_is_one(
    fresh_state, monkeypatch, shared_libraries
):
    """What made tests/test_cpu_split.py crash after a test without a compiler. (The
    library is in the cache: with a compiler the kernels are looked for again and load.)"""
    _seed(fresh_state, shared_libraries, ("lstm", "float"))
    monkeypatch.setattr(cpu_kernels, "_warned", ["warned already"])
    variant = spec.get_variant("lstm")
    with monkeypatch.context() as patch:
        patch.setattr(build, "host_compiler", lambda: None)
        assert cpu_kernels.cpu_kernels(variant, "float") is None
    assert cpu_kernels.cpu_kernels(variant, "float") is not None


def test_the_warning_for_a_failed_build_says_its_cause(fresh_state, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_warned", [])

    def refuse(source, flags=build.DEFAULT_FLAGS, include_dirs=()):
        raise build.BuildFailed("compiling the generated kernels failed:\ngates.cpp:1: error: no")

    monkeypatch.setattr(build, "compile_library", refuse)
    with pytest.warns(RuntimeWarning, match="could not be built") as caught:
        assert cpu_kernels.cpu_kernels(_fresh_variant("refused"), "float") is None
    (message,) = [str(w.message) for w in caught]
    assert "gates.cpp:1: error: no" in message and "Install g++" not in message


def test_running_a_variant_does_not_keep_it_alive(built_cache, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    monkeypatch.setenv("LSTM_MULTI_CACHE", str(cache))
    build.forget_loaded()
    try:
        base = spec.get_variant("peephole")
        x = np.zeros((2, 5, 3), np.float32)
        alive = []
        for i in range(300):
            variant = lstm_multi.Variant(f"lifetime{i}", base.forward, params=base.params)
            cell = lstm_multi.get_cell("numpy")(input_size=3, hidden_size=4, variant=variant)
            cell(cell.init(seed=0), x)
            assert cpu_kernels.cpu_kernels(variant, "float") is not None  # ran on the kernels
            alive.append(weakref.ref(variant))
            del variant, cell
        gc.collect()
        assert [ref() for ref in alive if ref() is not None] == []
        assert len(_libraries(cache)) == 1  # one library shared by them all
    finally:
        build.forget_loaded()


def test_a_damaged_generated_triton_module_is_rewritten(tmp_path, monkeypatch):
    """The Triton modules (``triton_modules.load``) in the cache: a truncated file is
    written again, whole, before it is imported."""
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    from lstm_multi.compile import emit_triton
    from lstm_multi.kernels import triton_modules

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    programs = _unseen_variant().programs
    module = triton_modules.load(programs, tmp_path, interpret=True)
    path = Path(module.__file__)
    whole = path.read_text()
    assert whole == emit_triton.module_source(programs, True)
    monkeypatch.delitem(sys.modules, module.__name__)
    os.truncate(path, len(whole) // 2)  # cut inside a kernel
    again = triton_modules.load(programs, tmp_path, interpret=True)
    assert path.read_text() == whole and again is not module
    assert callable(again.forward) and callable(again.sequence_backward)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


def test_a_failed_kernel_build_is_not_retried_without_openmp(fresh_state, monkeypatch):
    """Only a compiler without OpenMP (the probe fails) builds the kernels without it; a
    failure of the kernels' own text is raised and warned about, not hidden by a second
    build without OpenMP (whose kernels would silently lose the batch split)."""
    monkeypatch.setattr(cpu_kernels, "_warned", [])
    real, asked = build.compile_library, []

    def kernels_fail(source, flags=build.DEFAULT_FLAGS, include_dirs=()):
        asked.append(tuple(flags))
        if "lm_openmp_threads" in source:
            return real(source, flags, include_dirs)
        raise build.BuildFailed("compiling the generated kernels failed:\ngates.cpp:9: error: x")

    monkeypatch.setattr(build, "compile_library", kernels_fail)
    with pytest.warns(RuntimeWarning, match="gates.cpp:9: error: x"):
        assert cpu_kernels.cpu_kernels(_fresh_variant("own_failure"), "float") is None
    assert asked == [cpu_kernels.FLAGS, cpu_kernels.FLAGS]  # the probe, then the kernels


def test_a_compiler_without_openmp_builds_simd_loops_without_the_batch_split(
    fresh_state, monkeypatch
):
    real, asked = build.compile_library, []

    def no_openmp(source, flags=build.DEFAULT_FLAGS, include_dirs=()):
        asked.append(tuple(flags))
        if "-fopenmp" in flags:
            raise build.BuildFailed("fatal error: omp.h: No such file or directory")
        return real(source, flags, include_dirs)

    monkeypatch.setattr(build, "compile_library", no_openmp)
    kernels = cpu_kernels.cpu_kernels(_fresh_variant("no_openmp"), "float")
    assert kernels is not None and asked == [cpu_kernels.FLAGS, cpu_kernels.FLAGS_WITHOUT_OPENMP]
    # built without OpenMP: no batch-split loops on any BLAS
    assert kernels.split_loops(types.SimpleNamespace(library="libblas.so")) is None
