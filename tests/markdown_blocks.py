"""The ```python blocks of a Markdown page, and the opt-out that keeps one from running.

A block runs unless the line before its fence is an HTML comment saying why not, e.g.
``<!-- no-test: needs a CUDA GPU -->`` (the page shows nothing of it; the tests report the
block as skipped with that reason). The reason is required: ``<!-- no-test -->`` alone is an
error, so that no block is left out silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: an opt-out comment, and its reason
NO_TEST = re.compile(r"<!--\s*no-test:\s*(\S.*?)\s*-->")
#: a fenced python block at the start of a line (the info string may carry more, e.g. a title)
_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class Block:
    """One ```python block: its code, the page it is on, the line of its first code line
    (1-based), and the reason it does not run (``None``: it runs)."""

    code: str
    page: str
    line: int
    skip: str | None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def numbered_code(self) -> str:
        """The code shifted down to its lines on the page, so a traceback names them."""
        return "\n" * (self.line - 1) + self.code


def python_blocks(path: Path) -> list[Block]:
    """Every ```python block of the page at ``path``, in order."""
    text = path.read_text()
    page = path.relative_to(ROOT).as_posix()
    blocks = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start(1)) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        reason = NO_TEST.fullmatch(before)
        if before.startswith("<!-- no-test") and reason is None:
            raise ValueError(
                f"{page}:{line - 1}: expected <!-- no-test: REASON -->, got {before!r}"
            )
        blocks.append(Block(match.group(1), page, line, reason.group(1) if reason else None))
    return blocks


def stray_opt_outs(path: Path) -> list[str]:
    """Opt-out comments that stand before no ```python block (they would skip nothing)."""
    lines = path.read_text().split("\n")
    return [
        f"{path.relative_to(ROOT).as_posix()}:{k + 1}"
        for k, line in enumerate(lines)
        if "no-test" in line
        and line.strip().startswith("<!--")
        and not (k + 1 < len(lines) and lines[k + 1].startswith("```python"))
    ]


def imported_modules(code: str) -> list[str]:
    """The top-level modules a block imports."""
    return re.findall(r"^\s*(?:import|from) (\w+)", code, flags=re.MULTILINE)
