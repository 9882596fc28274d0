"""Training beyond one process gives what one process gives.

* PyTorch DDP: two CPU processes (gloo, loopback) train the example's model
  (``examples/distributed_torch.py``: 2-layer bidirectional LSTM, packed
  variable lengths) for a few SGD steps on halves of the same global batches;
  the parameters equal one process's on the whole batches, float64, to 100 eps,
  for the plain variant's native and generic paths and the peephole (every variant in
  the thorough run).
* The example itself runs under ``torchrun`` and resumes from its checkpoint.
* JAX: ``examples/distributed_jax.py``'s two ways (jit with a sharded batch,
  shard_map + pmean) over two CPU devices give one device's loss and
  gradients, float64, to 100 eps (``jax_mesh_check.py``, in a fresh process:
  the device count is fixed when JAX starts): one variant and the autodiff path,
  every variant in the thorough run.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
from conftest import LAYER_NORM_FACTOR, float64_key, tolerance
from oracle import VARIANTS as ORACLE_VARIANTS
from test_examples import EXAMPLES, load_example

from lstm_multi import spec

TESTS = os.path.dirname(os.path.abspath(__file__))

CONFIGS = [(name, name, True) for name in sorted(spec.VARIANTS)] + [("lstm_generic", "lstm", False)]


#: the default run's DDP configurations: PyTorch's kernel, the generated kernels' path
#: for the plain and a peephole variant (the thorough run takes every variant)
DEFAULT_CONFIGS = [c for c in CONFIGS if c[0] in ("lstm", "lstm_generic", "peephole")]


def test_ddp_two_processes_equal_one_process(tmp_path, thorough):
    torch = pytest.importorskip("torch")
    configs = CONFIGS if thorough else DEFAULT_CONFIGS
    import ddp_worker
    import torch.multiprocessing as mp

    load_example("distributed_torch")  # puts examples/ on the path the children inherit
    world = 2
    mp.spawn(
        ddp_worker.worker,
        args=(world, str(tmp_path / "rendezvous"), str(tmp_path), configs),
        nprocs=world,
        join=True,
    )
    example = importlib.import_module("distributed_torch")
    batches = ddp_worker.global_batches(example, world)
    worst = {}
    for name, variant, native in configs:
        model = ddp_worker.new_model(example, variant, native)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        ddp_worker.train(model, optimizer, example, batches)
        ddp = torch.load(tmp_path / f"{name}.pt")
        one = model.state_dict()
        assert ddp.keys() == one.keys()
        tensors = [k for k in one if isinstance(one[k], torch.Tensor)]
        start = ddp_worker.new_model(example, variant, native).state_dict()
        moved = max((one[k] - start[k]).abs().max().item() for k in tensors)
        assert moved > 1e-3, f"{name}: training did not change the parameters"
        scale = max(1.0, *(one[k].abs().max().item() for k in tensors))
        worst[name] = max((ddp[k] - one[k]).abs().max().item() for k in tensors) / scale
    print("largest |DDP - one process| / max(1, max|parameter|) per variant:", worst)
    # the gradient all-reduce sums the two halves' in another order than one process: rounding
    # (amplified by a layer norm's 1/sigma in the layer-normalised variants: LAYER_NORM_FACTOR)
    variants = {name: variant for name, variant, _ in configs}
    for name, found in worst.items():
        factor = LAYER_NORM_FACTOR if float64_key(variants[name]) != "float64" else 1
        assert found <= factor * tolerance("float64"), worst


def test_example_runs_under_torchrun_and_resumes(tmp_path):
    torch = pytest.importorskip("torch")
    script = os.path.join(EXAMPLES, "distributed_torch.py")
    checkpoint = tmp_path / "model.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", "29531", script, "--samples", "256", "--steps", "12",
               "--batch-size", "32", "--checkpoint", str(checkpoint)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*command, "--epochs", "1"], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "epoch 0: test accuracy" in first.stdout and "(2 process(es))" in first.stdout
    assert torch.load(checkpoint)["epoch"] == 0
    again = subprocess.run(
        [*command, "--epochs", "2", "--resume"], capture_output=True, text=True, env=env
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "epoch 0:" not in again.stdout and "epoch 1: test accuracy" in again.stdout
    assert torch.load(checkpoint)["epoch"] == 1


def test_jax_mesh_of_two_devices_equals_one_device(thorough):
    """One variant (with its custom VJP) and the autodiff path, both ways; every variant in
    the thorough run (what the mesh adds is the same for each: sharding, shard_map, pmean)."""
    pytest.importorskip("jax")
    # two host devices, beside the flags the tests compile with (conftest.py: LLVM's
    # optimisation off, which halves this test's time)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    env = {**os.environ, "XLA_FLAGS": flags.strip()}
    variants = ORACLE_VARIANTS if thorough else ("peephole",)
    which = ["--all"] if thorough else ["--variant", "peephole"]
    done = subprocess.run(
        [sys.executable, os.path.join(TESTS, "jax_mesh_check.py"), *which],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["devices"] == 2
    cases = {*variants, "peephole autodiff"}
    assert report["largest"].keys() == {f"{c} / {w}" for c in cases for w in ("jit", "shard_map")}
    print("largest |mesh - one device|:", report["largest"])
    # the loss and gradients are O(1) here, so an absolute bound of 100 eps is a relative one;
    # observed worst 1.1e-16 (pmean sums the devices' halves in another order)
    assert max(report["largest"].values()) <= tolerance("float64"), report
