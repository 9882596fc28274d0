"""Train an LSTM classifier in Keras, then run its weights in Flax, Equinox, PyTorch and lstm_multi.

Data: scikit-learn's 8x8 handwritten digits, one row of 8 pixels per step (T=8),
the stratified 80/20 split of ``sequential_digits.py`` (seed 0).

1. Keras (on whatever backend ``KERAS_BACKEND`` names; JAX if unset) trains
   ``[Bidirectional(LSTM)] * num_layers -> Dense(10)`` with ``model.fit``.
2. ``lstm_multi.convert.from_keras`` exports the LSTM layers' weights as canonical
   ``params[layer][direction] = {"W", "U", "b"}``; the Dense head is copied as it is.
3. The same numbers are written into each framework's own LSTM:

   * Flax: ``nn.RNN(nn.OptimizedLSTMCell)`` layers (in ``nn.Bidirectional``), params
     from ``convert.to_flax``;
   * Equinox: ``eqx.nn.LSTMCell`` per layer and direction scanned with ``lax.scan``,
     from ``convert.to_equinox``;
   * PyTorch: ``torch.nn.LSTM``, from ``lstm_multi.torch.LSTM(...).load_numpy_params(params)
     .to_torch()``;
   * lstm_multi's functional cell on every backend installed (``cell.from_numpy``).

4. Each classifies the test set. The script prints one row per framework (test
   accuracy, largest |logit difference| from the trained Keras model) and exits with
   status 1 if any accuracy differs or any logit differs by more than ``--tolerance``.

    python examples/interchange_digits.py             # about 20 s on 2 cores, most of it
    python examples/interchange_digits.py --quick     # compiling; --quick: 3 epochs, H=8
    KERAS_BACKEND=torch python examples/interchange_digits.py --no-bidirectional
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine_info, thread_limit, write_json  # noqa: E402
from sequential_digits import load_digits_sequences  # noqa: E402

import lstm_multi  # noqa: E402
from lstm_multi import convert  # noqa: E402

NUM_CLASSES = 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument(
        "--bidirectional",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Bidirectional(LSTM) layers (default on)",
    )
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0, help="Keras's initial weights and shuffling")
    p.add_argument(
        "--quick",
        action="store_true",
        help="3 epochs, hidden size 8 (a smoke test; accuracy well below the default run's)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest |logit difference| from Keras accepted (float32; default 1e-4)",
    )
    p.add_argument("--json", default=None, help="also write the table to this JSON file")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for torch and BLAS (1 is often fastest for small LSTMs and on a busy machine)",
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no per-epoch lines"
    )
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.epochs, cfg.hidden_size = 3, 8
    return cfg


def has(module):
    return importlib.util.find_spec(module) is not None


# 1. train in Keras -----------------------------------------------------------------------------


def train_keras(cfg, x_train, y_train):
    """The Keras model, trained; its LSTM layers (forward first) and Dense head."""
    os.environ.setdefault("KERAS_BACKEND", "jax")  # read when keras is first imported
    import keras

    keras.utils.set_random_seed(cfg.seed)
    lstms = []
    for k in range(cfg.num_layers):
        lstm = keras.layers.LSTM(cfg.hidden_size, return_sequences=k + 1 < cfg.num_layers)
        lstms.append(keras.layers.Bidirectional(lstm) if cfg.bidirectional else lstm)
    head = keras.layers.Dense(NUM_CLASSES)
    model = keras.Sequential([keras.Input(x_train.shape[1:]), *lstms, head])
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    print(
        f"training in Keras {keras.__version__} on {keras.backend.backend()}: {cfg.epochs} epochs"
    )
    model.fit(
        x_train,
        y_train,
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        verbose=2 if cfg.progress else 0,
    )
    return model, lstms, head


def keras_logits(model, x):
    return np.asarray(model.predict(x, batch_size=512, verbose=0))


# 3. the same weights in each framework's own LSTM ------------------------------------------------
#
# Each takes the canonical params (NumPy), the head {"W": (F, 10), "b": (10,)}, the test
# inputs (N, T, 8) and cfg, and returns the logits (N, 10) as a NumPy array.


def run_flax(params, head, x, cfg):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class Classifier(nn.Module):
        """Flax LSTM layers made in setup (params ``layers_k``) and a Dense head."""

        def setup(self):
            def rnn():
                return nn.RNN(nn.OptimizedLSTMCell(cfg.hidden_size), return_carry=True)

            self.layers = [
                nn.Bidirectional(rnn(), rnn(), return_carry=True) if cfg.bidirectional else rnn()
                for _ in range(cfg.num_layers)
            ]
            self.head = nn.Dense(NUM_CLASSES)

        def __call__(self, x):
            for layer in self.layers:
                carry, x = layer(x)
            if cfg.bidirectional:  # ((c, h) forward, (c, h) backward)
                return self.head(jnp.concatenate([carry[0][1], carry[1][1]], -1))
            return self.head(carry[1])

    # nn.RNN's params are {"cell": ...}; nn.Bidirectional's {"forward_rnn": ..., "backward_rnn": ...}
    layers = {}
    for k, layer in enumerate(params):
        cells = [{"cell": convert.to_flax(p)} for p in layer]
        if cfg.bidirectional:
            layers[f"layers_{k}"] = dict(zip(("forward_rnn", "backward_rnn"), cells, strict=True))
        else:
            layers[f"layers_{k}"] = cells[0]
    variables = {"params": {**layers, "head": {"kernel": head["W"], "bias": head["b"]}}}
    return np.asarray(jax.jit(Classifier().apply)(variables, x))


def run_equinox(params, head, x, cfg):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    class Classifier(eqx.Module):
        """``cells[layer][direction]`` Equinox LSTM cells and a Linear head; one sequence."""

        cells: list
        head: eqx.nn.Linear

        def __call__(self, x):  # (T, 8) -> (10,)
            for layer in self.cells:
                outputs, last = [], []
                for direction, cell in enumerate(layer):

                    def step(state, x_t, cell=cell):
                        state = cell(x_t, state)
                        return state, state[0]

                    zeros = jnp.zeros(cell.hidden_size, x.dtype)
                    seq = x[::-1] if direction else x  # direction 1 reads the sequence reversed
                    (h, _), ys = jax.lax.scan(step, (zeros, zeros), seq)
                    outputs.append(ys[::-1] if direction else ys)
                    last.append(h)
                x = jnp.concatenate(outputs, -1)
            return self.head(jnp.concatenate(last))

    key = jax.random.key(0)  # the initial draws are overwritten
    cells = [
        [
            convert.to_equinox(p, eqx.nn.LSTMCell(p["W"].shape[0], cfg.hidden_size, key=key))
            for p in layer
        ]
        for layer in params
    ]
    linear = eqx.nn.Linear(*head["W"].shape, key=key)
    linear = eqx.tree_at(
        lambda m: (m.weight, m.bias), linear, (jnp.asarray(head["W"].T), jnp.asarray(head["b"]))
    )
    model = Classifier(cells, linear)
    return np.asarray(jax.jit(jax.vmap(model))(x))


def run_torch_nn_lstm(params, head, x, cfg):
    import torch

    from lstm_multi.torch import LSTM

    lstm = LSTM(
        x.shape[-1],
        cfg.hidden_size,
        num_layers=cfg.num_layers,
        batch_first=True,
        bidirectional=cfg.bidirectional,
    )
    lstm = lstm.load_numpy_params(params).to_torch()  # a torch.nn.LSTM
    assert type(lstm) is torch.nn.LSTM
    linear = torch.nn.Linear(*head["W"].shape)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(head["W"].T))
        linear.bias.copy_(torch.from_numpy(head["b"]))
        _, (h_n, _) = lstm(torch.from_numpy(x))
        features = torch.cat([h_n[-2], h_n[-1]], -1) if cfg.bidirectional else h_n[-1]
        return linear(features).numpy()


def run_lstm_multi(backend):
    def run(params, head, x, cfg):
        cell = lstm_multi.get_cell(backend)(
            x.shape[-1],
            cfg.hidden_size,
            num_layers=cfg.num_layers,
            bidirectional=cfg.bidirectional,
        )
        _, (h_n, _) = cell(cell.from_numpy(params), x)
        h_n = np.asarray(cell.ops.to_numpy(h_n))
        features = np.concatenate([h_n[-2], h_n[-1]], -1) if cfg.bidirectional else h_n[-1]
        return features @ head["W"] + head["b"]

    return run


def frameworks():
    """[(name, needed module, runner)] in the order of the table."""
    table = [
        ("Flax nn.RNN(OptimizedLSTMCell)", "flax", run_flax),
        ("Equinox LSTMCell + lax.scan", "equinox", run_equinox),
        ("torch.nn.LSTM", "torch", run_torch_nn_lstm),
    ]
    for backend in lstm_multi.available_backends():
        if backend != "cupy":
            table.append((f"lstm_multi {backend}", None, run_lstm_multi(backend)))
    return table


# ----------------------------------------------------------------------------------------------


def run(cfg):
    x_train, y_train, x_test, y_test = load_digits_sequences("rows", seed=0)
    x_train, x_test = x_train.astype(np.float32), x_test.astype(np.float32)
    t0 = time.perf_counter()
    model, lstms, dense = train_keras(cfg, x_train, y_train)
    print(f"trained in {time.perf_counter() - t0:.1f} s")

    # 2. export: canonical params for the LSTM layers, the head as (F, 10) and (10,)
    params = convert.from_keras(lstms)
    head = {"W": np.asarray(dense.kernel.numpy()), "b": np.asarray(dense.bias.numpy())}
    want = keras_logits(model, x_test)

    rows = [
        {
            "framework": "Keras (trained)",
            "test_accuracy": float(np.mean(want.argmax(1) == y_test)),
            "max_logit_diff": 0.0,
        }
    ]
    for name, module, runner in frameworks():
        if module is not None and not has(module):
            print(f"{name}: skipped ({module} is not installed)")
            continue
        logits = runner(params, head, x_test, cfg)
        rows.append(
            {
                "framework": name,
                "test_accuracy": float(np.mean(logits.argmax(1) == y_test)),
                "max_logit_diff": float(np.max(np.abs(logits - want))),
            }
        )

    print(f"\n{len(y_test)} test digits, the trained weights in each framework:\n")
    print(f"| {'framework':<32} | test accuracy | max abs logit diff vs Keras |")
    print(f"|{'-' * 34}|---------------|-----------------------------|")
    for row in rows:
        print(
            f"| {row['framework']:<32} | {row['test_accuracy']:>13.4f} "
            f"| {row['max_logit_diff']:>27.2e} |"
        )
    reference = rows[0]["test_accuracy"]
    failed = [
        row["framework"]
        for row in rows
        if row["test_accuracy"] != reference or row["max_logit_diff"] > cfg.tolerance
    ]
    if failed:
        print(f"\nFAILED: {', '.join(failed)} disagree with Keras (tolerance {cfg.tolerance:g})")
    else:
        print(f"\nall {len(rows)} agree: same accuracy, logits within {cfg.tolerance:g}")
    summary = {"config": vars(cfg), "rows": rows, "failed": failed, "machine": machine_info()}
    if cfg.json:
        write_json(cfg.json, summary)
    return summary


def main(argv=None):
    cfg = parse_args(argv)
    with thread_limit(cfg.threads):
        return run(cfg)


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
