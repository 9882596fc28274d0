"""Every Python snippet in README.md runs as written, each on its own in a fresh process."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{k}" for k in range(len(SNIPPETS))])
def test_readme_snippet_runs_alone(snippet, tmp_path):
    for module in re.findall(r"^\s*(?:import|from) (\w+)", snippet, flags=re.MULTILINE):
        # found, not imported: importing keras here would fix its backend for this process
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the snippet needs {module}, which is not installed")
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, f"the snippet failed:\n{snippet}\n{result.stderr[-3000:]}"
