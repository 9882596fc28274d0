"""Serve a trained peephole LSTM over a stream, one sample at a time.

A sensor signal (a sum of two sines with drifting phase plus noise) is forecast one
sample ahead. A peephole ``lstm_multi.torch.LSTM`` is trained on windows of it,
then served with ``lstm_multi.Stream``: each new sample goes in as it arrives and
the forecast comes out, the state (h, c) carried between calls. The script checks
that the streamed forecasts equal the whole-sequence call, reports the forecast
error against the naive "next = last" forecast, and times one served step against
``torch.nn.LSTM`` of the same size streamed the same way (median over the stream,
in this process, one thread by default).

    python examples/streaming.py                # ~20 s on a laptop CPU
    python examples/streaming.py --steps 600 --stream-length 4000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import machine_info, progress, thread_limit, write_json


def signal(length, rng):
    """(length,) float32: two sines of periods ~23 and ~61 samples, slowly drifting
    phase, and Gaussian noise of std 0.05."""
    t = np.arange(length, dtype=np.float64)
    drift = np.cumsum(rng.normal(0.0, 0.01, length))
    clean = np.sin(2 * np.pi * t / 23.0 + drift) + 0.5 * np.sin(2 * np.pi * t / 61.0)
    return (clean + rng.normal(0.0, 0.05, length)).astype(np.float32)


class Forecaster:
    """x (T, B, 1) -> the next sample at each step (T, B): an LSTM and a linear head."""

    def __init__(self, torch, lstm_class, hidden, variant=None):
        kwargs = {} if variant is None else {"variant": variant}
        self.lstm = lstm_class(1, hidden, **kwargs)
        self.head = torch.nn.Linear(hidden, 1)

    def parameters(self):
        return [*self.lstm.parameters(), *self.head.parameters()]

    def __call__(self, x):
        y, _ = self.lstm(x)
        return self.head(y)[..., 0]


def train(torch, model, series, cfg, rng):
    """Adam on random windows of ``series``: minimise the one-step-ahead squared error."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    losses = []
    for _ in progress(range(cfg.steps), enabled=cfg.progress, desc="training"):
        starts = rng.integers(0, len(series) - cfg.window - 1, cfg.batch_size)
        windows = np.stack([series[s : s + cfg.window + 1] for s in starts], axis=1)
        x = torch.from_numpy(windows[:-1, :, None])
        target = torch.from_numpy(windows[1:])
        loss = torch.mean((model(x) - target) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def serve(torch, lstm_multi, model, stream_input):
    """Feed ``stream_input`` (N,) one sample at a time: the forecasts (N,) and the
    seconds each step took."""
    stream = lstm_multi.Stream(model.lstm)
    forecasts, seconds = [], []
    with torch.inference_mode():
        for value in stream_input:
            start = time.perf_counter()
            y_t = stream(torch.tensor([[value]]))  # one step: (B=1, F=1) -> (1, H)
            forecasts.append(float(model.head(y_t)[0, 0]))
            seconds.append(time.perf_counter() - start)
    return np.asarray(forecasts), np.asarray(seconds)


def run(cfg):
    import torch

    import lstm_multi
    import lstm_multi.torch as lt

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    series = signal(cfg.train_length, rng)
    model = Forecaster(torch, lt.LSTM, cfg.hidden, variant=cfg.variant)
    losses = train(torch, model, series, cfg, rng)
    model.lstm.eval()

    fresh = signal(cfg.stream_length + 1, np.random.default_rng(cfg.seed + 1))
    stream_input, target = fresh[:-1], fresh[1:]
    forecasts, seconds = serve(torch, lstm_multi, model, stream_input)
    with torch.inference_mode():
        whole = model(torch.from_numpy(stream_input[:, None, None]))[:, 0].numpy()
    streamed_vs_whole = float(np.max(np.abs(forecasts - whole)))

    peer = Forecaster(torch, torch.nn.LSTM, cfg.hidden)  # the same size, untrained: timing only
    _, peer_seconds = serve(torch, lstm_multi, peer, stream_input)

    mse = float(np.mean((forecasts - target) ** 2))
    naive_mse = float(np.mean((stream_input - target) ** 2))
    ours, theirs = float(np.median(seconds)), float(np.median(peer_seconds))
    print(f"trained {cfg.steps} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(
        f"served {len(stream_input)} samples one at a time: forecast MSE {mse:.5f} "
        f"(naive next = last: {naive_mse:.5f})"
    )
    print(f"streamed forecasts against the whole-sequence call: max |diff| {streamed_vs_whole:.2e}")
    print(
        f"one served step (median): lstm_multi {cfg.variant} {ours * 1e6:.0f} us, "
        f"torch.nn.LSTM {theirs * 1e6:.0f} us ({ours / theirs:.2f}x)"
    )
    summary = {
        "config": vars(cfg),
        "machine": machine_info(),
        "losses": losses,
        "forecast_mse": mse,
        "naive_mse": naive_mse,
        "streamed_vs_whole_max_abs": streamed_vs_whole,
        "step_seconds_median": ours,
        "nn_lstm_step_seconds_median": theirs,
    }
    if cfg.json:
        write_json(cfg.json, summary)
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--variant", default="peephole")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--window", type=int, default=64, help="training window length")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--train-length", type=int, default=20000, help="samples to train on")
    p.add_argument("--stream-length", type=int, default=2000, help="samples to serve")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="threads for torch and BLAS")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def main(argv=None):
    cfg = parse_args(argv)
    with thread_limit(cfg.threads):
        return run(cfg)


if __name__ == "__main__":
    main()
