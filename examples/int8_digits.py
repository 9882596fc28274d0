"""int8 against float32 on the digits: train as ``sequential_digits.py`` does, evaluate both.

Each variant is trained in float32 on the torch backend exactly as
``sequential_digits.py`` trains it (the same data, initial weights, minibatches and
Adam), then its trained weights go into a ``lstm_multi.torch.LSTM`` with an
``nn.Linear`` head, which ``lstm_multi.torch.quantize_dynamic`` turns into int8 (the
LSTM's W, U (and W_hr) and the head's weight; docs/deployment.md). Printed per variant:
test accuracy in float32 and int8, how many test predictions the two share, the
largest logit difference, and the test set's inference time in each (one call on all
360 sequences, median of 5)::

    python examples/int8_digits.py                                   # rows (T=8)
    python examples/int8_digits.py --sequence pixels --epochs 10     # T=64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sequential_digits as digits  # noqa: E402
from _common import thread_limit  # noqa: E402

import lstm_multi  # noqa: E402


def classifier(cfg, input_size, params):
    """The trained canonical parameters as an nn.Module: LSTM, then the head on the last
    layer's final h (both directions' where bidirectional)."""
    import torch
    from torch import nn

    from lstm_multi.torch import LSTM

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = LSTM(
                input_size, cfg.hidden_size, cfg.num_layers, batch_first=True,
                bidirectional=cfg.bidirectional, variant=cfg.variant,
            )  # fmt: skip
            self.lstm.load_numpy_params(params["lstm"])
            features = cfg.hidden_size * (2 if cfg.bidirectional else 1)
            self.head = nn.Linear(features, digits.NUM_CLASSES)
            with torch.no_grad():
                self.head.weight.copy_(torch.from_numpy(params["head"]["W"].T))
                self.head.bias.copy_(torch.from_numpy(params["head"]["b"]))

        def forward(self, x):
            _, (h_n, _) = self.lstm(x)
            last = h_n[-1] if not cfg.bidirectional else torch.cat([h_n[-2], h_n[-1]], -1)
            return self.head(last)

    return Classifier().eval()


def median_seconds(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def evaluate(cfg, data, variant):
    """Train ``variant`` in float32, then compare float32 and int8 on the test set."""
    import torch

    from lstm_multi.torch import quantize_dynamic

    cfg = argparse.Namespace(**{**vars(cfg), "variant": variant})
    x_train, y_train, x_test, y_test = data
    init = digits.initial_params(cfg, x_train.shape[-1])
    schedule = digits.minibatch_schedule(len(x_train), cfg.batch_size, cfg.epochs, cfg.seed)
    trained = digits.train_torch(cfg, data, init, schedule)
    model = classifier(cfg, x_train.shape[-1], trained["params"])
    int8 = quantize_dynamic(model)
    x, labels = torch.from_numpy(x_test), torch.from_numpy(y_test)
    with torch.inference_mode():
        float_logits, int8_logits = model(x), int8(x)
        float_time = median_seconds(lambda: model(x))
        int8_time = median_seconds(lambda: int8(x))
    float_pred, int8_pred = float_logits.argmax(1), int8_logits.argmax(1)
    float_accuracy = (float_pred == labels).double().mean().item()
    if abs(float_accuracy - trained["test_accuracy"][-1]) > 1e-9:
        raise RuntimeError(
            f"{variant}: the float32 module's accuracy {float_accuracy} is not the trainer's "
            f"{trained['test_accuracy'][-1]}: the trained weights did not arrive"
        )
    return {
        "variant": variant,
        "float32": float_accuracy,
        "int8": (int8_pred == labels).double().mean().item(),
        "same": int((float_pred == int8_pred).sum()),
        "logit gap": (float_logits - int8_logits).abs().max().item(),
        "float32 ms": 1e3 * float_time,
        "int8 ms": 1e3 * int8_time,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="lstm,peephole,peephole_full,cifg")
    p.add_argument("--sequence", choices=("rows", "pixels"), default="rows")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=None, help="fewer samples, for quick runs")
    p.add_argument("--threads", type=int, default=1)
    cfg = p.parse_args(argv)
    # what sequential_digits' torch trainer reads besides these
    cfg.dtype, cfg.torch_native, cfg.progress = "float32", True, False
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    variants = [v.strip() for v in cfg.variants.split(",") if v.strip()]
    for name in variants:
        if name not in lstm_multi.VARIANTS:
            raise SystemExit(f"--variants: unknown variant {name!r}")
    with thread_limit(cfg.threads):
        x_train, y_train, x_test, y_test = digits.load_digits_sequences(cfg.sequence, seed=cfg.seed)
        if cfg.train_size is not None:
            x_train, y_train = x_train[: cfg.train_size], y_train[: cfg.train_size]
        data = (x_train.astype(np.float32), y_train, x_test.astype(np.float32), y_test)
        print(
            f"digits as {cfg.sequence} (T={x_train.shape[1]}), H={cfg.hidden_size}, "
            f"{cfg.epochs} epochs, {len(x_test)} test sequences, {cfg.threads} thread(s)"
        )
        print(
            f"{'variant':<14} {'float32 acc':>11} {'int8 acc':>9} {'same pred':>10} "
            f"{'logit gap':>10} {'fp32 ms':>8} {'int8 ms':>8}"
        )
        rows = []
        for variant in variants:
            row = evaluate(cfg, data, variant)
            rows.append(row)
            print(
                f"{variant:<14} {row['float32']:>11.4f} {row['int8']:>9.4f} "
                f"{row['same']:>6}/{len(y_test):<3} {row['logit gap']:>10.4f} "
                f"{row['float32 ms']:>8.2f} {row['int8 ms']:>8.2f}",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
