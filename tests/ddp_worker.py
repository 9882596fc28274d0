"""The per-process side of test_distributed.py's DDP test (spawned; imported by name)."""

from __future__ import annotations

import importlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

#: optimizer steps, sequences per process and step, and their padded length
STEPS, BATCH, SEQUENCE = 3, 4, 9


def train(model, optimizer, example, step_batches, rank=0, world=1):
    """``STEPS`` optimizer steps; this process takes its contiguous share of each global batch."""
    for x, lengths, labels in step_batches:
        share = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        example.train_step(model, optimizer, x[share], lengths[share], labels[share])


def global_batches(example, world):
    return [
        example.make_data(world * BATCH, SEQUENCE, seed=100 + k, dtype=torch.float64)
        for k in range(STEPS)
    ]


def new_model(example, variant, native):
    torch.manual_seed(0)
    return example.Classifier(variant, hidden=6, native=native).double()


def worker(rank, world, init_file, out_dir, configs):
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    example = importlib.import_module("distributed_torch")
    batches = global_batches(example, world)
    for name, variant, native in configs:
        model = new_model(example, variant, native)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        train(DistributedDataParallel(model), optimizer, example, batches, rank, world)
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(out_dir, f"{name}.pt"))
    # Without this barrier the rank that finishes first tears gloo down while
    # the other still holds a connection to it, and its C++ threads abort the
    # process ("terminate called without an active exception"): seen once in CI.
    dist.barrier()
    dist.destroy_process_group()
