"""The generated Triton modules (``compile.emit_triton``) written to the cache and imported.

Triton's ``jit`` reads a kernel's source from its file, so a variant's module
text is written under the cache (``build.cache_dir().parent / "triton"`` by
default), named by the hash of its text and of the interpreter mode (Triton
reads ``TRITON_INTERPRET`` when the module is imported), and imported from
there. The file is written whole under a name of its own, fsynced and renamed
into place, and a file whose text differs from the source (truncated, damaged)
is written again before it is imported. Importing this module imports no
framework; the generated module imports triton.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
from pathlib import Path

from ..compile.derive import GatePrograms
from ..compile.emit_triton import module_source


def load(programs: GatePrograms, directory: Path, interpret: bool):
    """The generated module of ``programs``, written under ``directory`` and imported.

    ``interpret``: whether Triton's interpreter will run it (``TRITON_INTERPRET`` as
    Triton reads it at import): the text differs, and so does the module's name.
    """
    source = module_source(programs, interpret)
    digest = hashlib.sha256(f"{int(interpret)}\n{source}".encode()).hexdigest()[:24]
    name = f"lstm_multi_triton_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.py"
    try:
        intact = path.read_text() == source  # a truncated or damaged file is rewritten
    except (OSError, UnicodeDecodeError):
        intact = False
    if not intact:  # written whole under a name of its own, fsynced, renamed into place
        temporary = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        with open(temporary, "w") as file:
            file.write(source)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
