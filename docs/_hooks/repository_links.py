"""mkdocs hook: the docs pages link the repository's files as GitHub shows them.

The pages under ``docs/`` link files outside it (``../examples/distributed_torch.py``,
``../benchmarks/NOTES.md``): on GitHub those links work, but the site holds only
``docs/``, so ``mkdocs build --strict`` would refuse them as broken. This hook
rewrites each such link whose target exists in the repository to the file's path as
code (the site names the file); a link to a file that does not exist stays as it is
and fails the strict build. An image in the repository (``![plot](../benchmarks/
results/results.png)``) is copied into the site and shown.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
_LINK = re.compile(r"(!?)\[([^\]]*)\]\((\.\./[^)#\s]+)(#[^)]*)?\)")
_ASSETS = "assets/repository"


def _in_repository(page_dir, target):
    path = (page_dir / target).resolve()
    if ROOT in path.parents and path.exists() and (ROOT / "docs") not in path.parents:
        return path.relative_to(ROOT).as_posix()
    return None


def on_files(files, config):
    """Adds every repository image a page shows, under ``assets/repository/``."""
    docs = Path(config["docs_dir"])
    for page in docs.rglob("*.md"):
        for image, _, target, _ in _LINK.findall(page.read_text()):
            relative = _in_repository(page.parent, target) if image else None
            uri = f"{_ASSETS}/{relative}"
            if relative and files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(ROOT / relative)))
    return files


def on_page_markdown(markdown, page, config, files):
    page_dir = (Path(config["docs_dir"]) / page.file.src_uri).parent
    depth = page.file.src_uri.count("/")

    def rewrite(match):
        image, text, target = match.group(1), match.group(2), match.group(3)
        relative = _in_repository(page_dir, target)
        if relative is None:
            return match.group(0)  # not a repository file: mkdocs judges it
        if image:
            return f"![{text}]({'../' * depth}{_ASSETS}/{relative})"
        if text.strip("`") == relative:
            return f"`{relative}`"
        return f"{text} (`{relative}`)"

    return _LINK.sub(rewrite, markdown)
