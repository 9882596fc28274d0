"""Data-parallel training of the lstm_multi JAX cell on a device mesh, two ways.

    python examples/distributed_jax.py                 # every local device
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python examples/distributed_jax.py

1. ``jax.jit`` with shardings: the batch lies sharded over the mesh's "data"
   axis (``NamedSharding(mesh, P("data"))``), the parameters replicated
   (``P()``); XLA partitions the computation and inserts the all-reduce of the
   gradients itself.
2. ``jax.shard_map``: each device runs the cell (its custom VJP included) on
   its own shard, and ``lax.pmean`` averages the shards' losses, so that the
   gradient of the average reaches the replicated parameters averaged.

Both give the gradients of the mean loss over the whole batch, what one device
gives (``tests/test_distributed.py`` checks that to 1e-12 in float64). On
several hosts, call ``jax.distributed.initialize()`` first and build the mesh
over ``jax.devices()`` (all hosts' devices): see docs/distributed.md.

The task is the one of ``distributed_torch.py``: sequences of random length;
the label says whether the first feature's mean over the sequence's own steps
is positive. The model: a 2-layer bidirectional peephole LSTM, then a linear
layer on the top layer's final h of both directions; plain SGD with momentum.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lstm_multi

FEATURES, HIDDEN, LAYERS = 4, 32, 2


def make_data(n, steps, seed, dtype="float32"):
    """x (n, steps, 4) zero past each length, lengths (n,) in 5..steps, labels (n,) in {0, 1}."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, steps + 1, n)
    x = rng.standard_normal((n, steps, FEATURES)).astype(dtype)
    x *= np.arange(steps)[None, :, None] < lengths[:, None, None]
    labels = (x[:, :, 0].sum(1) / lengths > 0).astype(np.int32)
    return x, lengths.astype(np.int32), labels


def make_cell(variant="peephole", hidden=HIDDEN):
    return lstm_multi.get_cell("jax")(
        FEATURES, hidden, variant=variant, num_layers=LAYERS, bidirectional=True
    )


def init(cell, seed=0, dtype="float32"):
    """{"lstm": the cell's parameters, "head": (W (2H, 2), b (2,))}."""
    rng = np.random.default_rng(seed + 1)
    hidden = cell.hidden_size
    w = rng.uniform(-1, 1, (2 * hidden, 2)) / np.sqrt(2 * hidden)
    return {
        "lstm": cell.init(seed=seed, dtype=dtype),
        "head": (jnp.asarray(w, dtype), jnp.zeros(2, dtype)),
    }


def loss_fn(cell, params, x, lengths, labels):
    """Mean cross-entropy over this batch (or this device's shard of it)."""
    _, (h_n, _) = cell(params["lstm"], x, lengths=lengths)
    features = jnp.concatenate([h_n[-2], h_n[-1]], axis=-1)  # last layer, both directions
    w, b = params["head"]
    logits = features @ w + b
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def data_mesh(devices=None):
    """A one-axis mesh ("data",) over the devices (all of them by default)."""
    devices = np.array(jax.devices() if devices is None else devices)
    return Mesh(devices, ("data",))


def sharded_grad(cell, mesh):
    """(params, x, lengths, labels) -> (loss, grads), jitted with the batch sharded over
    "data" and the parameters replicated; XLA inserts the all-reduce."""
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(
        jax.value_and_grad(functools.partial(loss_fn, cell)),
        in_shardings=(replicated, sharded, sharded, sharded),
        out_shardings=(replicated, replicated),
    )


def shard_map_grad(cell, mesh):
    """The same with ``jax.shard_map``: each device runs its shard, ``lax.pmean`` averages
    the shards' mean losses (equal shards: the mean of the means is the mean), and the
    gradient of that average reaches the replicated parameters already averaged."""

    def local(params, x, lengths, labels):
        def batch_loss(params):
            return jax.lax.pmean(loss_fn(cell, params, x, lengths, labels), "data")

        return jax.value_and_grad(batch_loss)(params)

    mapped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P("data"), P("data"), P("data")),
        out_specs=(P(), P()),
    )
    return jax.jit(mapped)


def place(mesh, params, batch):
    """Parameters replicated on every device, the batch split along its first axis."""
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.device_put(params, replicated), tuple(jax.device_put(a, sharded) for a in batch)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="peephole")
    parser.add_argument("--way", choices=("jit", "shard_map"), default="jit")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64, help="global; split over devices")
    parser.add_argument("--length", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    mesh = data_mesh()
    if args.batch_size % mesh.size:
        parser.error(f"--batch-size: expected a multiple of the {mesh.size} devices")
    cell = make_cell(args.variant)
    step_grad = (sharded_grad if args.way == "jit" else shard_map_grad)(cell, mesh)
    params = init(cell, args.seed)
    momentum = jax.tree.map(jnp.zeros_like, params)
    x, lengths, labels = make_data(args.steps * args.batch_size, args.length, args.seed)
    for step in range(args.steps):
        rows = slice(step * args.batch_size, (step + 1) * args.batch_size)
        params, batch = place(mesh, params, (x[rows], lengths[rows], labels[rows]))
        loss, grads = step_grad(params, *batch)
        momentum = jax.tree.map(lambda m, g: 0.9 * m + g, momentum, grads)
        params = jax.tree.map(lambda p, m: p - args.lr * m, params, momentum)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {float(loss):.3f}")
    test = make_data(1024, args.length, args.seed + 1)
    _, (h_n, _) = cell(params["lstm"], test[0], lengths=test[1])
    w, b = params["head"]
    predicted = np.asarray(jnp.argmax(jnp.concatenate([h_n[-2], h_n[-1]], -1) @ w + b, -1))
    accuracy = float(np.mean(predicted == test[2]))
    print(f"test accuracy {accuracy:.3f} ({mesh.size} device(s), {args.way})")
    return accuracy


if __name__ == "__main__":
    main()
