"""Every Python snippet in README.md runs as written, each on its own in a fresh process
(the docs pages' blocks: ``test_docs.py``)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
from markdown_blocks import ROOT, imported_modules, python_blocks

SNIPPETS = python_blocks(ROOT / "README.md")


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.where for s in SNIPPETS])
def test_readme_snippet_runs_alone(snippet, tmp_path):
    if snippet.skip:
        pytest.skip(f"{snippet.where}: {snippet.skip}")
    for module in imported_modules(snippet.code):
        # found, not imported: importing keras here would fix its backend for this process
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the snippet needs {module}, which is not installed")
    script = tmp_path / "snippet.py"
    script.write_text(snippet.numbered_code())
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, (
        f"{snippet.where} failed:\n{snippet.code}\n{result.stderr[-3000:]}"
    )


def test_the_readme_test_command_is_what_ci_runs():
    """The README's second command installs what .ci/run installs and runs its test command."""
    commands = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    install, test = commands[1].split(" && ")[-2:]
    ci = [line.replace(" --quiet", "") for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install in ci and test in ci, (install, test)
