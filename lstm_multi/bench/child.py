"""``python -m lstm_multi.bench.child JOB.json RESULT.json``: one framework's rows.

Started by ``isolation.run_child`` with the framework's environment; runs
``suite.run_framework`` on the job and writes its JSON result.
"""

from __future__ import annotations

import json
import sys

from .suite import run_framework


def main(argv):
    job_path, out_path = argv
    with open(job_path) as f:
        job = json.load(f)
    result = run_framework(job)
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
