"""Every ```python block of the documentation pages (``docs/``) runs, in order.

A page is a session, as a notebook is: its blocks run one after another in one fresh Python
process (in a temporary directory), so a later block may use what an earlier one made, as the
reader of the page does, and a page costs one interpreter start, not one a block. Pages with
frameworks (Keras, Flax, PyTorch) take seconds each, so the pages run in the thorough run
(``--thorough``, CI's second pass); the default run checks that every block either runs or
says why not, and reports each block that does not as a skip with its reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from markdown_blocks import ROOT, imported_modules, python_blocks, stray_opt_outs

PAGES = sorted((ROOT / "docs").rglob("*.md"))
BLOCKS = {page: python_blocks(page) for page in PAGES}
RUNNABLE = {page: [b for b in blocks if not b.skip] for page, blocks in BLOCKS.items()}
OPTED_OUT = [b for blocks in BLOCKS.values() for b in blocks if b.skip]


def _page_id(page):
    return page.relative_to(ROOT / "docs").as_posix()


#: runs the blocks of one page, in order, in one namespace (what ``python page.py`` would do)
_SESSION = """
import json, sys
namespace = {"__name__": "__main__"}
for block in json.load(open(sys.argv[1])):
    print("--- " + block["where"], file=sys.stderr, flush=True)
    exec(compile(block["code"], block["page"], "exec"), namespace)
"""


def test_every_block_runs_or_says_why():
    """Each opt-out comment has a reason and stands before a block; there are blocks to run."""
    assert sum(len(blocks) for blocks in RUNNABLE.values()) >= 15
    assert [where for page in PAGES for where in stray_opt_outs(page)] == []


@pytest.mark.parametrize("block", OPTED_OUT, ids=[b.where for b in OPTED_OUT])
def test_opted_out_block(block):
    pytest.skip(f"{block.where} does not run: {block.skip}")


@pytest.mark.parametrize(
    "page", [p for p in PAGES if RUNNABLE[p]], ids=[_page_id(p) for p in PAGES if RUNNABLE[p]]
)
def test_docs_page_runs(page, thorough, tmp_path):
    if not thorough:
        pytest.skip("the docs pages run in the thorough run: python -m pytest --thorough")
    blocks = RUNNABLE[page]
    for module in sorted({m for b in blocks for m in imported_modules(b.code)}):
        # found, not imported: importing keras here would fix its backend for this process
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{_page_id(page)} needs {module}, which is not installed")
    session = tmp_path / "blocks.json"
    session.write_text(
        json.dumps([{"where": b.where, "page": b.page, "code": b.numbered_code()} for b in blocks])
    )
    result = subprocess.run(
        [sys.executable, "-c", _SESSION, str(session)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        # a page's `import keras` runs on the Keras backend of the environment, else JAX (not
        # Keras's own default, TensorFlow, which the layer does not support); without this,
        # a page ran on whatever a test module collected before had set in this process
        env={**os.environ, "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "jax")},
    )
    ran = [line[4:] for line in result.stderr.splitlines() if line.startswith("--- ")]
    assert result.returncode == 0, (
        f"{ran[-1] if ran else _page_id(page)} failed:\n{result.stderr[-4000:]}"
    )
