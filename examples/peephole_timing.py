"""Why peepholes exist: precise timing tasks, trained with "lstm" and "peephole".

In the spirit of Gers, Schraudolph & Schmidhuber (2002), "Learning Precise Timing
with LSTM Recurrent Networks" (JMLR 3). Peephole connections let the gates see
the cell state c directly, so a cell can act as a counter whose value opens or
closes a gate at a precise time; without them the gates only see h = o * tanh(c),
which is zero whenever the output gate is shut.

Tasks (one input channel, one linear output per step on top of the LSTM):

* ``msd`` (measuring spike delays): two input spikes at t1 and t1 + d, d drawn
  from [--min-delay, --max-delay]; at the second spike the output must be the
  delay d (scaled by 1 / max-delay). Loss: squared error at that step.
* ``gts`` (generating timed spikes): one input spike at t=0; the output must
  spike (1) every --period steps, t = P, 2P, 3P, ..., and be 0 in between.
  Loss: squared error at every step. Tested on sequences twice as long as
  trained on, so the network must keep time, not memorise positions.

A run "solves" a test sequence if its timing is exact: for msd |pred - d| < 0.5
steps; for gts thresholding the output at 0.5 gives spikes at exactly the target
steps and nowhere else. The script trains each variant from several seeds (the
seed gives the same initial weights to both variants where their parameters
coincide: "peephole" only adds p) and prints a table.

    python examples/peephole_timing.py --task msd
    python examples/peephole_timing.py --task gts --period 10 --steps 4000
    python examples/peephole_timing.py --backend torch --seeds 2 --steps 500
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine_info, progress, thread_limit, tree_map, write_json  # noqa: E402

import lstm_multi  # noqa: E402

VARIANTS = ("lstm", "peephole")


# tasks -----------------------------------------------------------------------------------------


def msd_batch(rng, batch, min_delay, max_delay, max_onset=10):
    """Measuring spike delays: x (B, T, 1), target (B, T), mask (B, T), delays (B,)."""
    steps = max_onset + max_delay + 1
    t1 = rng.integers(0, max_onset, batch)
    d = rng.integers(min_delay, max_delay + 1, batch)
    x = np.zeros((batch, steps, 1))
    rows = np.arange(batch)
    x[rows, t1, 0] = 1.0
    x[rows, t1 + d, 0] = 1.0
    target = np.zeros((batch, steps))
    mask = np.zeros((batch, steps))
    target[rows, t1 + d] = d / max_delay
    mask[rows, t1 + d] = 1.0
    return x, target, mask, d


def msd_test_set(min_delay, max_delay, max_onset=10):
    """Every (onset, delay) pair once."""
    t1, d = np.meshgrid(np.arange(max_onset), np.arange(min_delay, max_delay + 1), indexing="ij")
    t1, d = t1.ravel(), d.ravel()
    steps = max_onset + max_delay + 1
    x = np.zeros((len(d), steps, 1))
    rows = np.arange(len(d))
    x[rows, t1, 0] = 1.0
    x[rows, t1 + d, 0] = 1.0
    return x, t1 + d, d


def gts_batch(batch, period, steps):
    """Generating timed spikes: a start spike at t=0, target spikes at t = P, 2P, ..."""
    x = np.zeros((batch, steps, 1))
    x[:, 0, 0] = 1.0
    target = np.zeros((batch, steps))
    target[:, period::period] = 1.0
    return x, target, np.ones((batch, steps))


# models per backend ------------------------------------------------------------------------------


def initial_params(variant, hidden_size, seed, dtype):
    """LSTM params from ``cell.init(seed)`` and a linear read-out. ``init`` draws W, U, b
    before p, so with one seed "peephole" starts from the "lstm" weights plus its p."""
    lstm = lstm_multi.get_cell("numpy")(1, hidden_size, variant=variant).init(seed, dtype)
    rng = np.random.default_rng(seed + 1)
    bound = 1.0 / math.sqrt(hidden_size)
    head = {"w": rng.uniform(-bound, bound, (hidden_size,)).astype(dtype), "b": np.zeros((), dtype)}
    return {"lstm": lstm, "head": head}


class JaxModel:
    def __init__(self, variant, hidden_size, lr, dtype):
        import jax
        import jax.numpy as jnp
        import optax

        self.jax, self.jnp = jax, jnp
        self.dtype = dtype
        self.cell = lstm_multi.get_cell("jax")(1, hidden_size, variant=variant)
        self.opt = optax.adam(lr)

        def predict(params, x):
            y, _ = self.cell(params["lstm"], x)
            return y @ params["head"]["w"] + params["head"]["b"]

        def loss_fn(params, x, target, mask):
            err = (predict(params, x) - target) * mask
            return jnp.sum(err * err) / jnp.sum(mask)

        def step(params, opt_state, x, target, mask):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, target, mask)
            updates, opt_state = self.opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self._predict = jax.jit(predict)
        self._step = jax.jit(step)

    def _x64(self):
        return self.jax.enable_x64(self.dtype == "float64")

    def init(self, np_params):
        with self._x64():
            self.params = {
                "lstm": self.cell.from_numpy(np_params["lstm"]),
                "head": tree_map(self.jnp.asarray, np_params["head"]),
            }
            self.opt_state = self.opt.init(self.params)

    def step(self, x, target, mask):
        with self._x64():
            self.params, self.opt_state, loss = self._step(
                self.params,
                self.opt_state,
                x.astype(self.dtype),
                target.astype(self.dtype),
                mask.astype(self.dtype),
            )
            return float(loss)

    def predict(self, x):
        with self._x64():
            return np.asarray(self._predict(self.params, x.astype(self.dtype)))


class TorchModel:
    def __init__(self, variant, hidden_size, lr, dtype):
        import torch

        self.torch, self.lr, self.dtype = torch, lr, dtype
        self.cell = lstm_multi.get_cell("torch")(1, hidden_size, variant=variant)

    def init(self, np_params):
        torch = self.torch
        self.params = {
            "lstm": tree_map(
                lambda a: a.clone().requires_grad_(True), self.cell.from_numpy(np_params["lstm"])
            ),
            "head": {k: torch.tensor(v, requires_grad=True) for k, v in np_params["head"].items()},
        }
        leaves = [p for layer in self.params["lstm"] for d in layer for p in d.values()]
        self.opt = torch.optim.Adam(leaves + list(self.params["head"].values()), lr=self.lr)

    def _predict(self, x):
        y, _ = self.cell(self.params["lstm"], x)
        return y @ self.params["head"]["w"] + self.params["head"]["b"]

    def step(self, x, target, mask):
        torch = self.torch
        x, target, mask = (torch.from_numpy(a.astype(self.dtype)) for a in (x, target, mask))
        err = (self._predict(x) - target) * mask
        loss = (err * err).sum() / mask.sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()

    def predict(self, x):
        with self.torch.no_grad():
            return self._predict(self.torch.from_numpy(x.astype(self.dtype))).numpy()


MODELS = {"jax": JaxModel, "torch": TorchModel}


# evaluation ----------------------------------------------------------------------------------------


def evaluate(model, cfg):
    """(fraction of test sequences timed exactly, mean abs timing error in steps)."""
    if cfg.task == "msd":
        x, t2, d = msd_test_set(cfg.min_delay, cfg.max_delay)
        out = model.predict(x)[np.arange(len(d)), t2] * cfg.max_delay
        err = np.abs(out - d)
        return float(np.mean(err < 0.5)), float(np.mean(err))
    steps = 2 * cfg.train_length
    x, target, _ = gts_batch(1, cfg.period, steps)
    out = model.predict(x)[0]
    fired = out > 0.5
    wanted = target[0] > 0.5
    # exact: spikes at precisely the target steps; error: mean distance from each target spike
    # to the nearest output spike (steps), the sequence length if none fired
    exact = float(np.array_equal(fired, wanted))
    times = np.flatnonzero(fired)
    if len(times) == 0:
        return exact, float(steps)
    dist = [np.min(np.abs(times - t)) for t in np.flatnonzero(wanted)]
    return exact, float(np.mean(dist))


def train_one(cfg, variant, seed):
    model = MODELS[cfg.backend](variant, cfg.hidden_size, cfg.lr, cfg.dtype)
    model.init(initial_params(variant, cfg.hidden_size, seed, cfg.dtype))
    rng = np.random.default_rng(seed)
    losses = []
    bar = progress(
        range(cfg.steps), enabled=cfg.progress, desc=f"{variant} seed {seed}", leave=False
    )
    t0 = time.perf_counter()
    for _ in bar:
        if cfg.task == "msd":
            x, target, mask, _ = msd_batch(rng, cfg.batch_size, cfg.min_delay, cfg.max_delay)
        else:
            x, target, mask = gts_batch(cfg.batch_size, cfg.period, cfg.train_length)
        losses.append(model.step(x, target, mask))
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.2e}")
    bar.close()
    seconds = time.perf_counter() - t0
    exact, error = evaluate(model, cfg)
    return {"losses": losses, "exact": exact, "error": error, "seconds": seconds}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", choices=("msd", "gts"), default="msd")
    p.add_argument(
        "--backend",
        choices=tuple(MODELS),
        default=None,
        help="default: jax if jax and optax are installed, else torch",
    )
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", type=int, default=5, help="runs per variant, seeds 0..N-1")
    p.add_argument("--steps", type=int, default=3000, help="training steps per run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--hidden-size",
        type=int,
        default=4,
        help="memory cells; the task needs few (Gers et al. used 1-2 blocks)",
    )
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--min-delay", type=int, default=10)
    p.add_argument("--max-delay", type=int, default=40)
    p.add_argument("--period", type=int, default=10, help="gts: steps between output spikes")
    p.add_argument("--train-length", type=int, default=50, help="gts: training sequence length")
    p.add_argument("--threads", type=int, default=None, help="threads for torch and BLAS")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def default_backend():
    if all(importlib.util.find_spec(m) is not None for m in ("jax", "optax")):
        return "jax"
    return "torch"


def run(cfg):
    cfg.backend = cfg.backend or default_backend()
    variants = [v.strip() for v in cfg.variants.split(",") if v.strip()]
    what = (
        f"delays {cfg.min_delay}..{cfg.max_delay}"
        if cfg.task == "msd"
        else f"period {cfg.period}, trained on T={cfg.train_length}, tested on T={2 * cfg.train_length}"
    )
    print(
        f"task {cfg.task} ({what}); backend {cfg.backend}, H={cfg.hidden_size}, "
        f"{cfg.steps} steps of batch {cfg.batch_size}, lr {cfg.lr}, {cfg.seeds} seeds"
    )
    results = {}
    for variant in variants:
        runs = []
        for seed in range(cfg.seeds):
            res = train_one(cfg, variant, seed)
            runs.append(res)
            print(
                f"  {variant:<9} seed {seed}: exact {res['exact']:.3f}  "
                f"mean error {res['error']:.3f} steps  final loss "
                f"{np.mean(res['losses'][-50:]):.2e}  ({res['seconds']:.1f} s)"
            )
        results[variant] = runs

    unit = "test sequences timed exactly" if cfg.task == "msd" else "runs exact on 2x length"
    print(
        f"\n| variant | {unit} (mean over seeds) | runs with all exact | "
        f"median mean error (steps) | s per 1000 steps |"
    )
    print("|---|---|---|---|---|")
    table = {}
    for variant, runs in results.items():
        exact = np.array([r["exact"] for r in runs])
        error = np.array([r["error"] for r in runs])
        secs = np.mean([r["seconds"] for r in runs]) / max(cfg.steps, 1) * 1000
        table[variant] = {
            "exact_mean": float(exact.mean()),
            "solved": int(np.sum(exact >= 1.0)),
            "runs": len(runs),
            "median_error": float(np.median(error)),
            "seconds_per_1000_steps": float(secs),
        }
        print(
            f"| {variant} | {exact.mean():.3f} | {int(np.sum(exact >= 1.0))}/{len(runs)} | "
            f"{np.median(error):.3f} | {secs:.1f} |"
        )
    summary = {
        "config": vars(cfg),
        "table": table,
        "runs": {
            v: [{k: r[k] for k in ("exact", "error", "seconds")} for r in rs]
            for v, rs in results.items()
        },
        "losses": {v: [r["losses"] for r in rs] for v, rs in results.items()},
        "machine": machine_info(),
    }
    if cfg.json:
        write_json(cfg.json, summary)
    return summary


def main(argv=None):
    cfg = parse_args(argv)
    with thread_limit(cfg.threads):
        return run(cfg)


if __name__ == "__main__":
    main()
