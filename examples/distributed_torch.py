"""Data-parallel training of ``lstm_multi.torch.LSTM`` with PyTorch's DistributedDataParallel.

    torchrun --nproc-per-node 2 examples/distributed_torch.py --epochs 3
    torchrun --nproc-per-node 2 examples/distributed_torch.py --epochs 6 --resume

Each process holds a full copy of the model (a 2-layer bidirectional peephole
LSTM by default, then a linear classifier on the final states), reads its own
shard of every epoch (``DistributedSampler``), and DDP averages the gradients
over the processes before each optimizer step, so every copy stays identical:
the run computes what one process would on the whole batch (``tests/test_distributed.py``
checks that to 1e-12 in float64). The backend is chosen by the device: gloo on
the CPU, nccl with one process per GPU. Rank 0 writes a checkpoint after each
epoch and shows the progress bar; ``--resume`` continues from the checkpoint.

The task: sequences of random length (5 to ``--steps``) of 4 features; the
label says whether the first feature's mean over the sequence's own steps is
positive, so padding must not leak into the answer.

Launched without torchrun, it runs as a single process (world size 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import progress  # noqa: E402

from lstm_multi.torch import LSTM  # noqa: E402

FEATURES = 4


def make_data(n, steps, seed, dtype=torch.float32):
    """x (n, steps, 4) zero past each length, lengths (n,) in 5..steps, labels (n,) in {0, 1}."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, steps + 1, (n,), generator=generator)
    x = torch.randn(n, steps, FEATURES, generator=generator, dtype=dtype)
    x = x * (torch.arange(steps)[None, :, None] < lengths[:, None, None])
    labels = (x[:, :, 0].sum(1) / lengths > 0).long()
    return x, lengths, labels


class Classifier(nn.Module):
    """LSTM over the valid steps (packed), then a linear layer on the top layer's final h."""

    def __init__(self, variant="peephole", hidden=32, num_layers=2, native=True):
        super().__init__()
        self.lstm = LSTM(
            FEATURES, hidden, num_layers=num_layers, bidirectional=True, batch_first=True,
            variant=variant, native=native,
        )  # fmt: skip
        self.head = nn.Linear(2 * hidden, 2)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        return self.head(torch.cat([h_n[-2], h_n[-1]], dim=1))  # both directions, last layer


def train_step(model, optimizer, x, lengths, labels):
    """One optimizer step on the mean cross-entropy of this process's batch; returns the loss."""
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x, lengths), labels)
    loss.backward()  # under DDP: the gradients are averaged over the processes here
    optimizer.step()
    return loss.item()


def setup():
    """Join the process group torchrun describes (gloo on the CPU, nccl on GPUs); -> device."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="peephole")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--checkpoint",
        default=os.path.join(tempfile.gettempdir(), "lstm_multi_examples", "distributed_torch.pt"),
        help="where rank 0 saves after each epoch (default under the temporary directory, "
        "not the current one)",
    )
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = setup()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # the same initial weights everywhere (DDP also broadcasts)
    model = Classifier(args.variant).to(device)
    model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    first_epoch = 0
    if args.resume and os.path.exists(args.checkpoint):
        state = torch.load(args.checkpoint, map_location=device)
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first_epoch = state["epoch"] + 1

    x, lengths, labels = make_data(args.samples, args.steps, args.seed)
    test = make_data(1024, args.steps, args.seed + 1)
    dataset = TensorDataset(x, lengths, labels)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    for epoch in range(first_epoch, args.epochs):
        sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on every rank
        model.train()
        bar = progress(loader, enabled=rank == 0, desc=f"epoch {epoch}", leave=False)
        for xb, lb, yb in bar:
            loss = train_step(model, optimizer, xb.to(device), lb, yb.to(device))
            bar.set_postfix(loss=f"{loss:.3f}")
        model.eval()
        with torch.no_grad():
            predicted = model.module(test[0].to(device), test[1]).argmax(1).cpu()
        accuracy = (predicted == test[2]).float().mean().item()
        if rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(args.checkpoint)), exist_ok=True)
            torch.save(
                {"model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                 "epoch": epoch},
                args.checkpoint,
            )  # fmt: skip
            print(f"epoch {epoch}: test accuracy {accuracy:.3f} ({world} process(es))")
        dist.barrier()  # nobody reads a checkpoint that rank 0 is still writing
    dist.destroy_process_group()
    return accuracy


if __name__ == "__main__":
    main()
