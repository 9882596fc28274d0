"""Helpers shared by the examples: a progress bar, a small Adam for NumPy, pytrees
of nested lists/dicts, the machine description, and saving plots.

Nothing here is part of ``lstm_multi``; the examples import it as a sibling module.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import sys

import numpy as np

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# progress bar -----------------------------------------------------------------


class _NoBar:
    """Stands in for tqdm where it is missing or the bar is turned off."""

    def __init__(self, iterable=None, **kwargs):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(iterable=None, enabled=True, **kwargs):
    """``tqdm(iterable, **kwargs)``, or a silent stand-in if tqdm is missing or ``enabled`` is False."""
    if enabled and importlib.util.find_spec("tqdm") is not None:
        from tqdm.auto import tqdm

        return tqdm(iterable, dynamic_ncols=True, **kwargs)
    return _NoBar(iterable, **kwargs)


# threads ----------------------------------------------------------------------------------


@contextlib.contextmanager
def thread_limit(n):
    """Run with at most ``n`` threads in torch and in NumPy's BLAS (via threadpoolctl, which
    scikit-learn installs); restored afterwards. ``n`` None or 0: change nothing.

    Small LSTMs gain little from more threads, and on a busy machine the threads of a
    pool wait on each other: one thread is then often many times faster."""
    if not n:
        yield
        return
    with contextlib.ExitStack() as stack:
        if importlib.util.find_spec("threadpoolctl") is not None:
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(n))
        if importlib.util.find_spec("torch") is not None:
            import torch

            before = torch.get_num_threads()
            torch.set_num_threads(n)
            stack.callback(torch.set_num_threads, before)
        yield


# pytrees of nested lists / tuples / dicts (lstm_multi's canonical params are one) ---------


def tree_map(fn, *trees):
    """Apply ``fn`` leaf-wise over trees of the same structure (lists, tuples, dicts)."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: tree_map(fn, *(t[k] for t in trees)) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(tree_map(fn, *items) for items in zip(*trees, strict=True))
    return fn(*trees)


def tree_leaves(tree):
    """The leaves of ``tree`` in a fixed order (dict keys in insertion order)."""
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in tree_leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in tree_leaves(v)]
    return [tree]


class NumpyAdam:
    """Adam (Kingma & Ba 2015) on a tree of NumPy arrays, the update of
    ``torch.optim.Adam`` and ``optax.adam`` (bias-corrected moments, eps outside the sqrt)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.eps = lr, eps
        self.b1, self.b2 = betas
        self.m = tree_map(np.zeros_like, params)
        self.v = tree_map(np.zeros_like, params)
        self.t = 0

    def step(self, params, grads):
        """Return the updated parameters (new arrays; ``params`` is not changed)."""
        self.t += 1
        b1, b2 = self.b1, self.b2
        self.m = tree_map(lambda m, g: b1 * m + (1 - b1) * g, self.m, grads)
        self.v = tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, self.v, grads)
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t

        def update(p, m, v):
            return p - self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)

        return tree_map(update, params, self.m, self.v)


# softmax cross-entropy in NumPy ---------------------------------------------------------


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of integer ``labels`` and its gradient w.r.t. ``logits``."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_p = shifted - log_z
    n = logits.shape[0]
    loss = -log_p[np.arange(n), labels].mean()
    dlogits = np.exp(log_p)
    dlogits[np.arange(n), labels] -= 1
    return loss, dlogits / n


# the machine and the versions, for the recorded results ----------------------------------


def machine_info():
    """A dict describing this machine and the package versions that matter here."""
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
    }
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    for name in ("torch", "jax", "optax", "sklearn", "lstm_multi"):
        module = sys.modules.get(name)
        if module is None and importlib.util.find_spec(name) is not None:
            with contextlib.suppress(Exception):
                module = importlib.import_module(name)
        if module is not None:
            info[name] = getattr(module, "__version__", "?")
    return info


def write_json(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=_json_default)
        f.write("\n")


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or None if matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return path
