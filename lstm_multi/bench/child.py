"""``python -m lstm_multi.bench.child JOB.json RESULT.json``: one framework's rows.

Started by ``isolation.run_child`` with the framework's environment; runs
``suite.run_framework`` on the job and writes its JSON result.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from .suite import run_framework


def _exit_with_parent(interval=1.0):
    """End this process when the command that started it is gone (killed, timed out):
    a daemon thread watches the parent's pid. A benchmark left running alone would
    load the machine for nobody."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def main(argv):
    _exit_with_parent()
    job_path, out_path = argv
    with open(job_path) as f:
        job = json.load(f)
    result = run_framework(job)
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
