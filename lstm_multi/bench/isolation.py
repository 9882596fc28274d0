"""One child process per framework: its environment, its start, its JSON result.

Each framework's rows run in a fresh Python (``python -m lstm_multi.bench.child``)
whose thread-pool variables are set for that framework alone: its own
libraries' (``Framework.thread_variables``) to the threads it is given, every
other library's to 1. Two pools that spin at once on a small machine (NumPy's
OpenBLAS, torch's OpenMP, XLA's) slow each other by up to 6x; in one process
per framework only the measured framework's pool is awake. Keras's backend is
set to JAX in the JAX process only: the caller's process and environment are
never changed. The job and the result travel as JSON files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from . import frameworks
from .machine import usable_cores


class ChildFailed(RuntimeError):
    """A framework's process ended without a result; the message says how."""


def child_environment(framework, threads=None, base=None):
    """The environment of ``framework``'s process: ``base`` (this process's) with every
    thread-pool variable at 1 but the framework's own, at ``threads`` when given, else the
    core count (torch and NumPy then measure their choice)."""
    env = dict(os.environ if base is None else base)
    cores = usable_cores()
    for name in frameworks.THREAD_VARIABLES:
        env[name] = "1"
    own = threads or cores
    for name in frameworks.get(framework).thread_variables:
        env[name] = str(own)
    if framework == "jax":
        env["KERAS_BACKEND"] = "jax"  # the Keras peer runs on JAX, in this process only
    # the child imports the same lstm_multi as this process, wherever that came from
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_child(job, env):
    """Run ``job`` (``suite.run_framework``'s input) in a child process with ``env``;
    returns its result. Its progress and messages go to this process's stderr."""
    with tempfile.TemporaryDirectory(prefix="lstm-multi-bench-") as tmp:
        job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "result.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        proc = subprocess.run(
            [sys.executable, "-m", "lstm_multi.bench.child", job_path, out_path],
            env=env,
            stdout=subprocess.PIPE,  # a library's prints must not mix into the table
            text=True,
            check=False,
        )
        if proc.stdout:
            sys.stderr.write(proc.stdout)
        if proc.returncode != 0 or not os.path.exists(out_path):
            raise ChildFailed(
                f"the {job['framework']} process ended with status {proc.returncode} "
                "and no result (its messages are above)"
            )
        with open(out_path) as f:
            return json.load(f)
