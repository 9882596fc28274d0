"""Every Python block of docs/deploy.md runs as written, each on its own in a fresh process."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "deploy.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)


def test_the_page_has_one_block_per_route():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{k}" for k in range(len(BLOCKS))])
def test_block_runs_alone(block, tmp_path):
    for module in re.findall(r"^\s*(?:import|from) (\w+)", block, flags=re.MULTILINE):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the block needs {module}, which is not installed")
    script = tmp_path / "block.py"
    script.write_text(block)
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600,
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, f"the block failed:\n{block}\n{result.stderr[-3000:]}"
