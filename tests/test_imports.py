"""Frameworks are optional and lazy; missing ones give errors that name the pip extra."""

from __future__ import annotations

import json
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
