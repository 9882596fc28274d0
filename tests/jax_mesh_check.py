"""The JAX side of test_distributed.py, run in a fresh process with two CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/jax_mesh_check.py \
        [--all | --variant NAME]

For the core variants (every variant with ``--all``, one with ``--variant``) and the
cell's ``autodiff=True`` path, float64 (peephole in the example's two bidirectional
layers, the others in one): the
gradients of the mean loss over a global batch with variable lengths from
``examples/distributed_jax.py``'s two data-parallel ways (jit with shardings,
shard_map + pmean) against one device's. Prints one JSON line: the largest
absolute difference per variant and way, and the number of devices.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
)
import distributed_jax as example  # noqa: E402

from lstm_multi import spec  # noqa: E402


def largest_difference(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def main():
    mesh = example.data_mesh()
    batch = example.make_data(8, 7, seed=3, dtype="float64")
    report = {"devices": mesh.size, "largest": {}}
    names = ["lstm", "peephole", "peephole_full"]
    if "--all" in sys.argv:
        names = sorted(spec.VARIANTS)
    elif "--variant" in sys.argv:
        names = [sys.argv[sys.argv.index("--variant") + 1]]
    cases = [(name, {}) for name in names] + [("peephole autodiff", {"autodiff": True})]
    for name, options in cases:
        variant = name.split()[0]
        # the example's model (two bidirectional layers) for its variant, peephole with its
        # custom VJP; one bidirectional layer for the others, whose compiling is this
        # check's time (what the mesh adds, the batch's sharding, is the same for each)
        layers = example.LAYERS if name == "peephole" else 1
        cell = example.lstm_multi.get_cell("jax")(
            example.FEATURES, 5, variant=variant, num_layers=layers, bidirectional=True, **options
        )
        params = example.init(cell, seed=1, dtype="float64")
        loss, want = jax.value_and_grad(functools.partial(example.loss_fn, cell))(params, *batch)
        placed = example.place(mesh, params, batch)
        for way, build in (("jit", example.sharded_grad), ("shard_map", example.shard_map_grad)):
            got_loss, got = build(cell, mesh)(*placed[:1], *placed[1])
            difference = max(largest_difference(got, want), abs(float(got_loss) - float(loss)))
            report["largest"][f"{name} / {way}"] = difference
    print(json.dumps(report))


if __name__ == "__main__":
    main()
