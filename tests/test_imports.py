"""Frameworks are optional and lazy; missing ones give errors that name the pip extra."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys

import pytest

import lstm_multi
from lstm_multi import registry

FRAMEWORKS = ("torch", "jax", "jaxlib", "cupy", "tensorflow", "flax", "equinox", "keras")


def test_import_lstm_multi_imports_no_framework():
    code = (
        "import sys, json, lstm_multi, lstm_multi.spec, lstm_multi.cell;"
        "lstm_multi.known_backends();"
        f"print(json.dumps([m for m in {list(FRAMEWORKS)!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_numpy_backend_imports_no_other_framework():
    code = (
        "import sys, json, numpy as np, lstm_multi;"
        "c = lstm_multi.get_cell('numpy')(2, 3); c(c.init(), np.zeros((1, 2, 2), 'float32'));"
        f"print(json.dumps([m for m in {list(FRAMEWORKS)!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


#: both orders in one process (a second child's torch and TorchDynamo imports, 3.8 s, saved):
#: lstm_multi.torch imported without TorchDynamo, which is imported next ("dynamo-after");
#: then the two modules that call ``break_graph_at`` executed again (``importlib.reload``)
#: with TorchDynamo loaded, as an import of them after it executes them ("dynamo-before")
_DYNAMO_CHECK = """
import importlib, json, sys
import lstm_multi.torch as lt
from lstm_multi.backends import torch_backend


def disabled():
    methods = [lt.LSTM.forward, torch_backend.Cell.__call__, torch_backend.Cell.step,
               torch_backend.Cell.vjp]
    return all(getattr(m, "_torchdynamo_disable", False) for m in methods)


found = {}
plain = not any(getattr(m, "_torchdynamo_disable", False) for m in [lt.LSTM.forward])
before = "torch._dynamo" in sys.modules
import torch, torch._dynamo
found["dynamo-after"] = [before, plain, disabled(),
                         lt.LSTM.forward.__doc__.startswith("``nn.LSTM``'s forward")]
importlib.reload(torch_backend)
importlib.reload(lt)
found["dynamo-before"] = ["torch._dynamo" in sys.modules, None, disabled(),  # never plain
                          lt.LSTM.forward.__doc__.startswith("``nn.LSTM``'s forward")]
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def dynamo_checks():
    """What the child running ``_DYNAMO_CHECK`` found, by the order of the imports."""
    pytest.importorskip("torch")
    out = subprocess.run(
        [sys.executable, "-c", _DYNAMO_CHECK], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("dynamo_first", [False, True], ids=["dynamo-after", "dynamo-before"])
def test_torch_compile_breaks_at_the_module_without_importing_dynamo_first(
    dynamo_first, dynamo_checks
):
    """``import lstm_multi.torch`` leaves TorchDynamo unimported (it took 1.3 s of the
    import's 3.1 s), its methods plain; once it is imported (``torch.compile`` imports it
    before tracing), or if it was already when the module is imported (its modules
    executed again in the same process, TorchDynamo loaded), the module's forward and the
    cell's calls are ``torch.compiler.disable``d: one graph break each, run eagerly."""
    loaded, plain, disabled, documented = dynamo_checks[
        "dynamo-before" if dynamo_first else "dynamo-after"
    ]
    assert loaded == dynamo_first and disabled, dynamo_checks
    assert plain is (None if dynamo_first else True), dynamo_checks  # before TorchDynamo
    assert documented


@pytest.mark.parametrize(
    ("backend", "extra"), [("torch", "torch"), ("jax", "jax"), ("cupy", "cupy")]
)
def test_missing_framework_names_the_pip_extra(monkeypatch, backend, extra):
    real_find_spec = registry.importlib.util.find_spec
    monkeypatch.setattr(
        registry.importlib.util,
        "find_spec",
        lambda name, *a: None if name == backend else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match=rf"pip install 'lstm_multi\[{extra}\]'"):
        lstm_multi.get_cell(backend)
    assert backend not in lstm_multi.available_backends()


def test_available_backends_lists_what_runs_here():
    names = lstm_multi.available_backends()
    assert "numpy" in names
    assert names == sorted(names)
    assert set(names) <= set(lstm_multi.known_backends())
    for name in names:
        assert lstm_multi.get_cell(name).backend == name


def test_known_backends():
    assert lstm_multi.known_backends() == ["cupy", "jax", "numpy", "torch"]


def test_torch_module_without_torch_names_the_pip_extra():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "try:\n"
        "    import lstm_multi.torch\n"
        "except ImportError as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ImportError lstm_multi.torch needs torch")
    assert "pip install 'lstm_multi[torch]'" in out.stdout


#: the packages of each framework a core install lacks (top-level names in site-packages)
FRAMEWORK_PACKAGES = {"torch": ("torch", "functorch", "torchgen"), "jax": ("jax", "jaxlib")}


def site_packages_without(packages, where):
    """A directory of links to every entry of this interpreter's site-packages except
    ``packages`` (and their dist-info): added with ``site.addsitedir`` to a ``python -S``,
    it is this environment as if they had never been installed."""
    farm = where / "site-packages"
    farm.mkdir()
    for directory in site.getsitepackages():
        for entry in os.listdir(directory):
            if entry.split("-")[0].split(".")[0] not in packages and not (farm / entry).exists():
                (farm / entry).symlink_to(os.path.join(directory, entry))
    return farm


def test_the_suite_collects_without_torch_and_jax(tmp_path):
    """A core install (NumPy only) collects every test file: what needs a missing
    framework is skipped with the reason, nothing errors at import (the oracle's torch
    is needed only when a test calls it, and skips that test then)."""
    hidden = {name for names in FRAMEWORK_PACKAGES.values() for name in names}
    farm = site_packages_without(hidden, tmp_path)
    tests = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import site, sys; site.addsitedir({str(farm)!r}); import pytest; "
        "sys.exit(pytest.main(sys.argv[1:]))"
    )
    # --assert=plain: the modules imported as Python imports them, without pytest's
    # rewriting of every assert (half of this child's time where no rewritten module is
    # cached, PYTHONDONTWRITEBYTECODE: 4.9 -> 2.6 CPU s; the same 1468 tests collected)
    done = subprocess.run(
        [sys.executable, "-S", "-c", code, "--collect-only", "-q", "-p", "no:cacheprovider",
         "-p", "no:xdist", "--assert=plain", "-rs", tests],
        capture_output=True, text=True, cwd=os.path.dirname(tests),
    )  # fmt: skip
    summary = [line for line in done.stdout.splitlines() if not line.startswith("tests/")]
    assert done.returncode == 0, "\n".join(summary[-40:]) + done.stderr[-2000:]
    assert "error" not in summary[-1], summary[-1]
    skipped = "\n".join(line for line in summary if line.startswith("SKIPPED"))
    for framework in FRAMEWORK_PACKAGES:
        assert f"No module named '{framework}'" in skipped, skipped
