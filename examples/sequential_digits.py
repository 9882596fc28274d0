"""The same LSTM classifier, from the same initial weights, trained in every framework.

Data: scikit-learn's 8x8 handwritten digits (1797 images, shipped with sklearn),
read as a sequence: one row of 8 pixels per step (T=8, ``--sequence rows``) or
one pixel per step (T=64, ``--sequence pixels``).

Model: lstm_multi's functional LSTM cell for each backend, then a linear head on
the last hidden state and softmax cross-entropy. The head and the loss are this
example's own code in each framework:

* torch: the lstm_multi torch cell, autograd, ``torch.optim.Adam``;
* jax:   the lstm_multi jax cell inside ``jax.jit(jax.value_and_grad(...))``, ``optax.adam``;
* numpy: the lstm_multi numpy cell, its hand-written ``cell.vjp`` for the LSTM
  (the head's gradient enters as ``dh_n``), the head's gradient written here,
  and the small Adam of ``_common.NumpyAdam``.

Every backend starts from the same canonical parameters (``cell.init(seed)``
plus a head drawn here) and sees the same minibatches in the same order (one
NumPy RNG), so in float64 the loss curves lie on top of each other; the script
prints their largest gap and plots them on one figure.

    python examples/sequential_digits.py                       # rows, float64, all backends
    python examples/sequential_digits.py --sequence pixels --epochs 40
    python examples/sequential_digits.py --dtype float32 --backends torch,jax
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    NumpyAdam,
    machine_info,
    progress,
    pyplot,
    save_figure,
    softmax_cross_entropy,
    thread_limit,
    tree_leaves,
    tree_map,
    write_json,
)

import lstm_multi  # noqa: E402

BACKENDS = ("numpy", "torch", "jax")
NUM_CLASSES = 10
#: what each backend needs beyond lstm_multi's own backend
_EXTRA_PACKAGES = {"jax": ("optax",)}


# data -------------------------------------------------------------------------------------


def load_digits_sequences(sequence="rows", test_size=0.2, seed=0):
    """The sklearn digits as (N, T, F) sequences scaled to [0, 1], split stratified.

    rows: T=8 steps of 8 pixels; pixels: T=64 steps of 1 pixel (row-major).
    Returns x_train, y_train, x_test, y_test (float64 x, int64 labels).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float64) / 16.0  # (N, 8, 8), pixel values 0..16
    if sequence == "rows":
        x = x.reshape(-1, 8, 8)
    elif sequence == "pixels":
        x = x.reshape(-1, 64, 1)
    else:
        raise ValueError(f"sequence: expected 'rows' or 'pixels', got {sequence!r}")
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    return x_train, y_train, x_test, y_test


def minibatch_schedule(num_train, batch_size, epochs, seed, max_steps=None):
    """[(epoch, indices), ...]: a fresh permutation per epoch from one NumPy RNG, the
    last incomplete batch dropped (so every step has the same shape), cut at max_steps."""
    rng = np.random.default_rng(seed)
    per_epoch = num_train // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {num_train} training samples")
    schedule = []
    for epoch in range(epochs):
        order = rng.permutation(num_train)
        for k in range(per_epoch):
            schedule.append((epoch, order[k * batch_size : (k + 1) * batch_size]))
    return schedule[:max_steps] if max_steps is not None else schedule


def initial_params(cfg, input_size):
    """Canonical NumPy parameters shared by every backend: the LSTM's from
    ``cell.init(seed)`` and a linear head drawn like ``torch.nn.Linear``'s."""
    cell = lstm_multi.get_cell("numpy")(
        input_size,
        cfg.hidden_size,
        variant=cfg.variant,
        num_layers=cfg.num_layers,
        bidirectional=cfg.bidirectional,
    )
    features = cfg.hidden_size * cell.num_directions
    rng = np.random.default_rng(cfg.seed + 1)
    bound = 1.0 / math.sqrt(features)
    head = {
        "W": rng.uniform(-bound, bound, (features, NUM_CLASSES)).astype(cfg.dtype),
        "b": rng.uniform(-bound, bound, (NUM_CLASSES,)).astype(cfg.dtype),
    }
    return {"lstm": cell.init(seed=cfg.seed, dtype=cfg.dtype), "head": head}


def _make_cell(name, cfg, input_size, **kwargs):
    return lstm_multi.get_cell(name)(
        input_size,
        cfg.hidden_size,
        variant=cfg.variant,
        num_layers=cfg.num_layers,
        bidirectional=cfg.bidirectional,
        batch_first=True,
        **kwargs,
    )


# one trainer per framework ------------------------------------------------------------------
#
# Each takes the same arguments and returns
# {"losses": [per step], "test_accuracy": [per epoch], "epoch_seconds": [...], "params": numpy tree}.


class _Recorder:
    """Losses, per-epoch test accuracy and per-epoch wall time, shared by the trainers."""

    def __init__(self, backend, schedule, show_progress):
        self.losses, self.test_accuracy, self.epoch_seconds = [], [], []
        self.bar = progress(
            total=len(schedule),
            enabled=show_progress,
            desc=f"{backend:>5}",
            unit="step",
            leave=True,
        )
        self.schedule = schedule
        self.last_epoch = max(epoch for epoch, _ in schedule)
        self.t0 = time.perf_counter()

    def steps(self):
        """Yield (step, indices, end_of_epoch)."""
        for step, (epoch, idx) in enumerate(self.schedule):
            is_last = step + 1 == len(self.schedule) or self.schedule[step + 1][0] != epoch
            yield step, idx, is_last

    def step_done(self, loss):
        self.losses.append(float(loss))
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{float(loss):.4f}")

    def epoch_done(self, accuracy):
        self.epoch_seconds.append(time.perf_counter() - self.t0)
        self.test_accuracy.append(float(accuracy))
        self.bar.set_postfix(loss=f"{self.losses[-1]:.4f}", test_acc=f"{accuracy:.3f}")
        self.t0 = time.perf_counter()  # evaluation time counts in the epoch that ran it

    def result(self, params):
        self.bar.close()
        return {
            "losses": self.losses,
            "test_accuracy": self.test_accuracy,
            "epoch_seconds": self.epoch_seconds,
            "params": params,
        }


def _last_hidden(h_n, num_directions, concat):
    """The last layer's final hidden state(s) as (B, D*H)."""
    if num_directions == 1:
        return h_n[-1]
    return concat([h_n[-2], h_n[-1]], -1)


def train_numpy(cfg, data, init, schedule):
    x_train, y_train, x_test, y_test = data
    cell = _make_cell("numpy", cfg, x_train.shape[-1])
    d, hidden = cell.num_directions, cfg.hidden_size
    params = tree_map(np.copy, init)
    opt = NumpyAdam(params, lr=cfg.lr)

    def logits_of(params, x):
        _, (h_n, _) = cell(params["lstm"], x)
        feats = _last_hidden(h_n, d, np.concatenate)
        return feats @ params["head"]["W"] + params["head"]["b"], feats, h_n

    rec = _Recorder("numpy", schedule, cfg.progress)
    for _, idx, end_of_epoch in rec.steps():
        x, labels = x_train[idx], y_train[idx]
        logits, feats, h_n = logits_of(params, x)
        loss, dlogits = softmax_cross_entropy(logits, labels)
        # the head's gradient, by hand
        g_head = {"W": feats.T @ dlogits, "b": dlogits.sum(0)}
        dfeats = dlogits @ params["head"]["W"].T
        # ... enters the LSTM's hand-written vjp as the gradient of h_n (y is not used: dy = 0)
        dh_n = np.zeros_like(h_n)
        for k in range(d):
            dh_n[h_n.shape[0] - d + k] = dfeats[:, k * hidden : (k + 1) * hidden]
        dy = np.zeros(x.shape[:2] + (d * hidden,), x.dtype)
        g_lstm, _, _ = cell.vjp(params["lstm"], x, dy, dh_n=dh_n)
        params = opt.step(params, {"lstm": g_lstm, "head": g_head})
        rec.step_done(loss)
        if end_of_epoch:
            accuracy = (logits_of(params, x_test)[0].argmax(1) == y_test).mean()
            rec.epoch_done(accuracy)
    return rec.result(params)


def train_torch(cfg, data, init, schedule):
    import torch
    import torch.nn.functional as F

    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in data)
    cell = _make_cell("torch", cfg, x_train.shape[-1], native=cfg.torch_native)
    d = cell.num_directions
    params = {
        "lstm": tree_map(lambda a: a.clone().requires_grad_(True), cell.from_numpy(init["lstm"])),
        "head": {k: torch.tensor(v, requires_grad=True) for k, v in init["head"].items()},
    }
    leaves = [p for layer in params["lstm"] for p_ld in layer for p in p_ld.values()]
    leaves += list(params["head"].values())
    opt = torch.optim.Adam(leaves, lr=cfg.lr)

    def logits_of(x):
        _, (h_n, _) = cell(params["lstm"], x)
        return _last_hidden(h_n, d, torch.cat) @ params["head"]["W"] + params["head"]["b"]

    rec = _Recorder("torch", schedule, cfg.progress)
    for _, idx, end_of_epoch in rec.steps():
        index = torch.from_numpy(idx)
        loss = F.cross_entropy(logits_of(x_train[index]), y_train[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rec.step_done(loss.item())
        if end_of_epoch:
            with torch.no_grad():
                accuracy = (logits_of(x_test).argmax(1) == y_test).double().mean().item()
            rec.epoch_done(accuracy)
    return rec.result(tree_map(lambda a: a.detach().numpy().copy(), params))


def train_jax(cfg, data, init, schedule):
    import jax
    import jax.numpy as jnp
    import optax

    # float64 needs JAX's 64-bit mode; the context keeps it from leaking out of this function
    with jax.enable_x64(cfg.dtype == "float64"):
        x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in data)
        cell = _make_cell("jax", cfg, x_train.shape[-1])
        d = cell.num_directions
        params = {
            "lstm": cell.from_numpy(init["lstm"]),
            "head": tree_map(jnp.asarray, init["head"]),
        }

        def logits_of(params, x):
            _, (h_n, _) = cell(params["lstm"], x)
            return _last_hidden(h_n, d, jnp.concatenate) @ params["head"]["W"] + params["head"]["b"]

        def loss_fn(params, x, labels):
            logits = logits_of(params, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        opt = optax.adam(cfg.lr)
        opt_state = opt.init(params)

        @jax.jit
        def train_step(params, opt_state, x, labels):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, labels)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        @jax.jit
        def accuracy_of(params, x, labels):
            return (logits_of(params, x).argmax(1) == labels).mean()

        rec = _Recorder("jax", schedule, cfg.progress)
        for _, idx, end_of_epoch in rec.steps():
            params, opt_state, loss = train_step(params, opt_state, x_train[idx], y_train[idx])
            rec.step_done(float(loss))  # float() waits for the step, so the timing is honest
            if end_of_epoch:
                rec.epoch_done(float(accuracy_of(params, x_test, y_test)))
        return rec.result(tree_map(np.asarray, params))


TRAINERS = {"numpy": train_numpy, "torch": train_torch, "jax": train_jax}


# driver -------------------------------------------------------------------------------------


def usable_backends():
    """The backends of this example that can run here (their framework and optimizer installed)."""
    names = []
    for name in BACKENDS:
        if name not in lstm_multi.available_backends():
            continue
        if any(importlib.util.find_spec(pkg) is None for pkg in _EXTRA_PACKAGES.get(name, ())):
            continue
        names.append(name)
    return names


def curve_gaps(results):
    """Largest |loss_a - loss_b| over the steps, for each pair of backends."""
    gaps = {}
    for a, b in itertools.combinations(results, 2):
        la, lb = np.asarray(results[a]["losses"]), np.asarray(results[b]["losses"])
        gaps[f"{a}-{b}"] = float(np.max(np.abs(la - lb)))
    return gaps


def steps_in_agreement(results, tolerance=1e-9):
    """How many steps, from the first, every pair of loss curves stays within ``tolerance``."""
    curves = np.asarray([res["losses"] for res in results.values()])
    spread = curves.max(axis=0) - curves.min(axis=0)
    over = np.flatnonzero(spread > tolerance)
    return int(over[0]) if len(over) else len(spread)


def param_gaps(results):
    """Largest |param_a - param_b| over all final parameters, for each pair of backends."""
    gaps = {}
    for a, b in itertools.combinations(results, 2):
        diffs = tree_map(
            lambda x, y: float(np.max(np.abs(x - y))), results[a]["params"], results[b]["params"]
        )
        gaps[f"{a}-{b}"] = max(tree_leaves(diffs))
    return gaps


def plot_curves(results, cfg, path, gap):
    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed: no plot written")
        return None
    fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=(11, 3.8))
    styles = {"numpy": ("-", 3.0), "torch": ("--", 1.8), "jax": (":", 1.8)}
    for name, res in results.items():
        style, width = styles.get(name, ("-", 1.0))
        acc = res["test_accuracy"][-1]
        ax.plot(res["losses"], style, lw=width, label=f"{name} (test acc {acc:.3f})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (minibatch)")
    ax.set_title(f"digits, {cfg.sequence} as steps, {cfg.variant}, {cfg.dtype}")
    ax.legend()
    names = list(results)
    ref = np.asarray(results[names[0]]["losses"])
    for name in names[1:]:
        diff = np.maximum.accumulate(np.abs(np.asarray(results[name]["losses"]) - ref))
        ax_gap.plot(
            np.maximum(diff, 1e-17),
            styles.get(name, ("-", 1))[0],
            lw=1.8,
            label=f"{name} vs {names[0]}",
        )
    ax_gap.set_yscale("log")
    ax_gap.set_xlabel("step")
    ax_gap.set_ylabel("largest |loss difference| so far")
    ax_gap.set_title(f"largest gap between backends: {gap:.2e}")
    if len(names) > 1:
        ax_gap.legend()
    save_figure(fig, path)
    plt.close(fig)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--backends",
        default=None,
        help=f"comma-separated subset of {','.join(BACKENDS)} (default: every one usable here)",
    )
    p.add_argument(
        "--sequence",
        choices=("rows", "pixels"),
        default="rows",
        help="one row of 8 pixels per step (T=8) or one pixel per step (T=64)",
    )
    p.add_argument("--variant", default="lstm", choices=sorted(lstm_multi.VARIANTS))
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="float64 (default) makes the backends' curves agree to rounding",
    )
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0, help="initial weights and minibatch order")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in all")
    p.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="use only this many training samples (for quick runs)",
    )
    p.add_argument(
        "--torch-native",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch cell on PyTorch's own LSTM kernel for the plain variant (default on)",
    )
    p.add_argument(
        "--plot",
        default=None,
        help="where to write the loss-curve PNG (default: <tmp>/lstm_multi_examples/"
        "digits_<sequence>_<dtype>.png; the committed examples/results/ figures are written "
        "only when named here)",
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for torch and BLAS (1 is often fastest for small LSTMs and on a busy machine)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p.parse_args(argv)


def run(cfg):
    """Train every requested backend; return the results dict (also printed)."""
    usable = usable_backends()
    if cfg.backends is None:
        backends = usable
    else:
        backends = [b.strip() for b in cfg.backends.split(",") if b.strip()]
        for name in backends:
            if name not in BACKENDS:
                raise SystemExit(
                    f"--backends: unknown backend {name!r}, expected some of {BACKENDS}"
                )
            if name not in usable:
                raise SystemExit(
                    f"--backends: {name!r} cannot run here (framework or optax missing)"
                )
    if not backends:
        raise SystemExit("no backend can run here")

    x_train, y_train, x_test, y_test = load_digits_sequences(cfg.sequence, seed=cfg.seed)
    if cfg.train_size is not None:
        x_train, y_train = x_train[: cfg.train_size], y_train[: cfg.train_size]
    data = (x_train.astype(cfg.dtype), y_train, x_test.astype(cfg.dtype), y_test)
    init = initial_params(cfg, x_train.shape[-1])
    schedule = minibatch_schedule(len(x_train), cfg.batch_size, cfg.epochs, cfg.seed, cfg.max_steps)
    print(
        f"digits as {cfg.sequence} (T={x_train.shape[1]}, F={x_train.shape[2]}): "
        f"{len(x_train)} train / {len(x_test)} test, variant={cfg.variant}, H={cfg.hidden_size}, "
        f"dtype={cfg.dtype}, {len(schedule)} steps of batch {cfg.batch_size}, backends={backends}"
    )

    results = {}
    for name in backends:
        results[name] = TRAINERS[name](cfg, data, init, schedule)

    gaps = curve_gaps(results)
    largest = max(gaps.values(), default=0.0)
    print(
        f"\n{'backend':<8} {'test acc':>9} {'first loss':>11} {'last loss':>10} "
        f"{'s/epoch':>8} {'1st epoch s':>12}"
    )
    for name, res in results.items():
        secs = res["epoch_seconds"]
        steady = float(np.mean(secs[1:])) if len(secs) > 1 else float(secs[0])
        res["seconds_per_epoch"] = steady
        print(
            f"{name:<8} {res['test_accuracy'][-1]:>9.4f} {res['losses'][0]:>11.5f} "
            f"{res['losses'][-1]:>10.5f} {steady:>8.3f} {secs[0]:>12.3f}"
        )
    if len(results) > 1:
        print(
            "largest loss-curve gap per pair: " + ", ".join(f"{k} {v:.3e}" for k, v in gaps.items())
        )
        print(f"largest loss-curve gap: {largest:.3e} (over {len(schedule)} steps, {cfg.dtype})")
        agree = steps_in_agreement(results)
        print(f"the curves agree to 1e-9 for the first {agree} of {len(schedule)} steps")
        pgaps = param_gaps(results)
        print(
            "largest final-parameter gap per pair: "
            + ", ".join(f"{k} {v:.3e}" for k, v in pgaps.items())
        )
    else:
        pgaps, agree = {}, len(schedule)

    plot_path = None
    if not cfg.no_plot:
        # never into the repository or the current directory unless asked (--plot PATH)
        path = cfg.plot or os.path.join(
            tempfile.gettempdir(), "lstm_multi_examples", f"digits_{cfg.sequence}_{cfg.dtype}.png"
        )
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        plot_path = plot_curves(results, cfg, path, largest)
        if plot_path:
            print(f"loss curves written to {plot_path}")

    summary = {
        "config": vars(cfg),
        "backends": {
            name: {k: v for k, v in res.items() if k != "params"} for name, res in results.items()
        },
        "curve_gaps": gaps,
        "largest_curve_gap": largest,
        "steps_in_agreement_1e-9": agree,
        "param_gaps": pgaps,
        "plot": plot_path,
        "machine": machine_info(),
    }
    if cfg.json:
        write_json(cfg.json, summary)
    summary["params"] = {name: res["params"] for name, res in results.items()}
    return summary


def main(argv=None):
    cfg = parse_args(argv)
    with thread_limit(cfg.threads):
        return run(cfg)


if __name__ == "__main__":
    main()
