"""Memory per time step of a forward + backward, per CPU backend (B = 1).

Each measurement is a fresh process (``resource.getrusage``'s peak resident
set size) running one forward + vjp of T steps; the bytes per step are the
difference between two lengths over the difference in steps, so the fixed
cost of importing a framework cancels. A path whose memory were not linear in
T would show different slopes between the two pairs of lengths.

    python benchmarks/memory_per_step.py [--steps 5000 20000] [--hidden 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

PATHS = {
    "numpy": ("numpy", {}),
    "torch generic": ("torch", {"native": False}),
    "torch native": ("torch", {"native": True}),
    "jax": ("jax", {}),
}

CHILD = """
import json, resource, sys
import numpy as np
import lstm_multi
backend, kwargs, steps, hidden, variant = json.loads(sys.argv[1])
cell = lstm_multi.get_cell(backend)(2, hidden, variant=variant, **kwargs)
params = cell.init(seed=0)
x = np.ones((1, steps, 2), "float32")
dy = np.ones((1, steps, hidden), "float32")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
grads, dx, _ = cell.vjp(params, x, dy)
np.asarray(dx)
print(json.dumps([before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))
"""


def peak_kib(backend, kwargs, steps, hidden, variant):
    arg = json.dumps([backend, kwargs, steps, hidden, variant])
    out = subprocess.run(
        [sys.executable, "-c", CHILD, arg], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs=3, default=[5000, 10000, 20000])
    parser.add_argument("--hidden", type=int, default=8)
    args = parser.parse_args()
    short, middle, long = args.steps
    print(f"B=1, I=2, H={args.hidden}, forward + vjp, float32; peak RSS per step")
    print(f"| path | variant | bytes/step (T {short}->{middle}) | bytes/step (T {middle}->{long}) |")  # fmt: skip
    print("|---|---|---:|---:|")
    for name, (backend, kwargs) in PATHS.items():
        variant = "lstm" if kwargs.get("native") else "peephole"
        peaks = [peak_kib(backend, kwargs, t, args.hidden, variant) for t in (short, middle, long)]
        first = (peaks[1] - peaks[0]) * 1024 / (middle - short)
        second = (peaks[2] - peaks[1]) * 1024 / (long - middle)
        print(f"| {name} | {variant} | {first:,.0f} | {second:,.0f} |")


if __name__ == "__main__":
    main()
