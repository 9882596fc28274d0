"""The examples run end to end at a tiny size and learn something measurable.

Each example is imported from examples/ and its ``main(argv)`` called with a few
steps; optional packages (torch, jax, optax, scikit-learn, matplotlib) are
skipped cleanly when missing.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_close

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    return importlib.import_module(name)


def has(module):
    return importlib.util.find_spec(module) is not None


# sentiment -------------------------------------------------------------------------------------


def write_toy_reviews(path, n=600, seed=0):
    """A CSV in the Amazon Fine Food Reviews format whose sentiment is a separable signal:
    positive reviews hold one of a few positive words, negative ones a negative word,
    among shared filler words; some 3s (to be dropped) and more positives than negatives."""
    rng = np.random.default_rng(seed)
    filler = "the this it was tea coffee box bag taste price order and with for very".split()
    good, bad = ["great", "delicious", "love"], ["awful", "stale", "horrible"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        header = "Id ProductId UserId ProfileName HelpfulnessNumerator HelpfulnessDenominator"
        writer.writerow([*header.split(), "Score", "Time", "Summary", "Text"])
        for k in range(n):
            score = int(rng.choice([1, 2, 3, 4, 5], p=[0.15, 0.15, 0.1, 0.2, 0.4]))
            words = list(rng.choice(filler, rng.integers(3, 12)))
            if score != 3:
                words.insert(
                    int(rng.integers(0, len(words) + 1)), rng.choice(good if score >= 4 else bad)
                )
            text = " ".join(words).capitalize() + ".<br /><br />" + rng.choice(["OK", "Hm"])
            writer.writerow([k, "B0", "A0", "x", 0, 0, score, 0, "summary", text])
    return path


def test_sentiment_preprocessing(tmp_path):
    sentiment = load_example("sentiment")
    path = write_toy_reviews(tmp_path / "reviews.csv", n=300)
    texts, scores = sentiment.read_reviews(path)
    assert len(texts) == 300 and set(np.unique(scores)) <= {1, 2, 3, 4, 5}
    texts, labels = sentiment.label_and_balance(texts, scores, seed=0)
    n_neg = int(np.sum((scores == 1) | (scores == 2)))
    assert np.sum(labels == 0) == np.sum(labels == 1) == n_neg  # balanced, 3s dropped
    words = sentiment.tokenize("Great TEA!<br />Isn't it?")
    assert words == ["great", "tea", "!", "isn't", "it", "?"]
    data = sentiment.prepare(texts, labels, test_fraction=0.25, length_quantile=0.5)
    ids, lengths, y = data["train"]
    assert ids.shape == (len(y), data["max_len"]) and ids.dtype == np.int64
    assert np.all((lengths >= 1) & (lengths <= data["max_len"]))
    assert np.all(ids[np.arange(ids.shape[1]) >= lengths[:, None]] == sentiment.PAD)
    train_lengths = [len(sentiment.tokenize(t)) for t in texts[: len(y)]]
    assert data["max_len"] == int(np.ceil(np.quantile(train_lengths, 0.5)))
    assert len(data["test"][0]) == round(len(texts) * 0.25)


def test_sentiment_rejects_a_csv_without_the_columns(tmp_path):
    sentiment = load_example("sentiment")
    path = tmp_path / "bad.csv"
    path.write_text("review,stars\ngood,5\n")
    with pytest.raises(ValueError, match="Text and Score"):
        sentiment.read_reviews(path)


def test_sentiment_learns_the_toy_signal_with_both_impls(tmp_path):
    pytest.importorskip("torch", reason="the sentiment example needs torch")
    sentiment = load_example("sentiment")
    path = write_toy_reviews(tmp_path / "reviews.csv", n=600)
    args = "--impl both --epochs 4 --batch-size 32 --embed-size 16 --hidden-size 16 --lr 1e-2"
    args += " --threads 1 --no-progress --device cpu"
    out = sentiment.main([*args.split(), "--csv", str(path), "--json", str(tmp_path / "o.json")])
    results = out["results"]
    for impl in ("lstm_multi", "nn.LSTM"):
        res = results[impl]
        assert res["test_accuracy"][-1] >= 0.9, res["test_accuracy"]  # chance is 0.5
        losses = res["train_loss"]
        assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    # same initial weights and batches: lstm_multi's module and nn.LSTM train alike
    a, b = (np.asarray(results[k]["train_loss"]) for k in ("lstm_multi", "nn.LSTM"))
    # float32 through a third-party kernel (nn.LSTM's, another summation order) and Adam over
    # ~40 steps, which divides by sqrt(v) and so amplifies rounding differences: 1e-4, not 100 eps
    np.testing.assert_allclose(a, b, atol=1e-4)
    models = out["models"]
    assert type(models["lstm_multi"].lstm).__module__ == "lstm_multi.torch"
    assert (tmp_path / "o.json").exists()


def test_sentiment_initial_weights_match_between_impls():
    torch = pytest.importorskip("torch", reason="the sentiment example needs torch")
    sentiment = load_example("sentiment")
    cfg = sentiment.parse_args(["--embed-size", "8", "--hidden-size", "6"])
    m1 = sentiment.build_model("lstm_multi", 20, cfg)
    m2 = sentiment.build_model("nn.LSTM", 20, cfg)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["peephole", "peephole_full"])
def test_sentiment_runs_the_variants(tmp_path, variant):
    pytest.importorskip("torch", reason="the sentiment example needs torch")
    sentiment = load_example("sentiment")
    path = write_toy_reviews(tmp_path / "reviews.csv", n=200)
    args = "--epochs 1 --max-steps 3 --batch-size 16 --embed-size 8 --hidden-size 8 --threads 1"
    args += " --no-progress"
    argv = [*args.split(), "--csv", str(path), "--variant", variant]
    out = sentiment.main(argv)
    res = out["results"]["lstm_multi"]
    assert len(res["train_loss"]) == 3 and np.all(np.isfinite(res["train_loss"]))
    assert out["models"]["lstm_multi"].lstm.variant == variant
    # the first step's loss is the oracle's: the example's own data, initial weights (seeded)
    # and first batch, the LSTM computed by tests/oracle.py from the weights read by hand
    assert_close(res["train_loss"][0], first_loss_by_the_oracle(sentiment, argv), "float32", "loss")


def first_loss_by_the_oracle(sentiment, argv):
    """The binary cross-entropy of the sentiment model's first training batch at its initial
    weights, its LSTM (one layer, forward) run by the oracle in float64 on packed lengths."""
    import oracle

    cfg = sentiment.parse_args(argv)
    texts, scores = sentiment.read_reviews(cfg.csv, cfg.max_rows)
    texts, labels = sentiment.label_and_balance(texts, scores, cfg.seed, cfg.max_samples)
    data = sentiment.prepare(
        texts, labels, cfg.test_fraction, cfg.length_quantile, cfg.min_freq, cfg.max_vocab
    )
    model = sentiment.build_model("lstm_multi", len(data["vocab"]), cfg)  # seeded: same weights
    ids, lengths, targets = data["train"]
    batch = np.random.default_rng(cfg.seed).permutation(len(ids))[: cfg.batch_size]
    state = {k: v.detach().double().numpy() for k, v in model.state_dict().items()
             if not k.endswith("_extra_state")}  # fmt: skip
    lstm = {"W": state["lstm.weight_ih_l0"].T, "U": state["lstm.weight_hh_l0"].T,
            "b": state["lstm.bias_ih_l0"] + state["lstm.bias_hh_l0"]}  # fmt: skip
    if "lstm.weight_peephole_l0" in state:
        lstm["p"] = state["lstm.weight_peephole_l0"]
    x = state["embedding.weight"][ids[batch]].swapaxes(0, 1)  # (T, B, E)
    hidden, b = cfg.hidden_size, len(batch)
    zeros = np.zeros((1, b, hidden))
    want = oracle.oracle(cfg.variant, [[lstm]], x, zeros, zeros, lengths[batch],
                         np.zeros(x.shape[:2] + (hidden,)), zeros, zeros)  # fmt: skip
    logits = want["h_n"][0] @ state["fc.weight"].T[:, 0] + state["fc.bias"][0]
    y = targets[batch].astype(np.float64)
    return float(np.mean(np.logaddexp(0, logits) - y * logits))  # BCE with logits


def test_sentiment_demo_csv_is_in_the_dataset_format(tmp_path):
    sentiment = load_example("sentiment")
    path = sentiment.make_demo_csv(tmp_path / "demo.csv", n=200, seed=1)
    texts, scores = sentiment.read_reviews(path)
    assert len(texts) == 200 and set(np.unique(scores)) == {1, 2, 3, 4, 5}
    assert any("not" in sentiment.tokenize(t) for t in texts)


# sequential digits ------------------------------------------------------------------------------


@pytest.fixture
def digits():
    pytest.importorskip("sklearn", reason="the digits example needs scikit-learn")
    return load_example("sequential_digits")


def test_digits_data_and_schedule(digits):
    x_train, y_train, x_test, y_test = digits.load_digits_sequences("rows")
    assert x_train.shape[1:] == (8, 8) and len(x_train) + len(x_test) == 1797
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    x_pix = digits.load_digits_sequences("pixels")[0]
    assert x_pix.shape[1:] == (64, 1)
    np.testing.assert_array_equal(x_pix.reshape(-1, 8, 8), x_train)  # same split, row-major
    schedule = digits.minibatch_schedule(100, 32, 2, seed=0)
    assert len(schedule) == 6 and [e for e, _ in schedule] == [0, 0, 0, 1, 1, 1]
    assert len(np.unique(np.concatenate([i for e, i in schedule if e == 0]))) == 96
    again = digits.minibatch_schedule(100, 32, 2, seed=0)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(schedule, again, strict=True))


def test_digits_every_backend_learns_the_same_curve_in_float64(digits, tmp_path):
    backends = digits.usable_backends()
    plot = tmp_path / "curves.png"
    jax_x64_before = None
    if "jax" in backends:
        import jax

        jax_x64_before = bool(jax.config.jax_enable_x64)
    args = "--max-steps 30 --hidden-size 32 --lr 1e-2 --dtype float64 --threads 1 --no-progress"
    out = digits.main([*args.split(), "--plot", str(plot), "--json", str(tmp_path / "d.json")])
    assert set(out["backends"]) == set(backends)
    for name, res in out["backends"].items():
        losses = res["losses"]
        assert len(losses) == 30
        assert np.mean(losses[-5:]) < 0.8 * losses[0], name  # the loss went down
        assert res["test_accuracy"][-1] > 0.3, name  # chance is 0.1
    if len(backends) > 1:
        # identical initial weights and batches: in float64 the curves agree to rounding, here
        # 1e-10 rather than 100 eps: 30 Adam steps (dividing by sqrt(v)) amplify the backends'
        # differently ordered sums
        assert out["largest_curve_gap"] < 1e-10, out["curve_gaps"]
        assert out["steps_in_agreement_1e-9"] == 30
        assert max(out["param_gaps"].values()) < 1e-10, out["param_gaps"]
    if has("matplotlib"):
        assert plot.exists() and plot.stat().st_size > 0
    if jax_x64_before is not None:
        import jax

        assert bool(jax.config.jax_enable_x64) == jax_x64_before  # the example did not leak x64


def test_digits_hand_written_numpy_training_matches_autograd_deep_bidirectional(digits):
    """Two layers, both directions, peepholes: the example's hand-written head gradient and
    ``cell.vjp`` (dh_n of both last-layer directions) train exactly as torch autograd does."""
    pytest.importorskip("torch", reason="compares against torch autograd")
    args = "--hidden-size 5 --num-layers 2 --bidirectional --variant peephole --lr 1e-2"
    cfg = digits.parse_args([*args.split(), "--threads", "1"])
    cfg.progress = False
    x_train, y_train, *_ = digits.load_digits_sequences("rows")
    data = (x_train[:64], y_train[:64], x_train[:32], y_train[:32])
    init = digits.initial_params(cfg, 8)
    schedule = digits.minibatch_schedule(64, 16, 1, seed=0, max_steps=3)
    res = {name: digits.TRAINERS[name](cfg, data, init, schedule) for name in ("numpy", "torch")}
    # 3 SGD steps of the same float64 computation summed in different orders: rounding only
    assert_close(res["numpy"]["losses"], res["torch"]["losses"], "float64", "losses")
    digits.tree_map(
        lambda got, want: assert_close(got, want, "float64", "trained parameters"),
        res["numpy"]["params"],
        res["torch"]["params"],
    )
    moved = digits.tree_map(lambda a, b: float(np.max(np.abs(a - b))), init, res["numpy"]["params"])
    assert min(digits.tree_leaves(moved)) > 1e-3  # every parameter, p included, was trained


@pytest.mark.parametrize("sequence", ["rows", "pixels"])
def test_digits_float32_and_sequences_run(digits, tmp_path, sequence):
    """float32 training follows the float64 curve (the same initial weights rounded, the
    same batches; float64 numpy is checked against torch autograd above) to float32's
    precision."""

    def losses_in(dtype):
        args = f"--backends numpy --dtype {dtype} --max-steps 4 --hidden-size 8 --no-progress"
        out = digits.main(
            [*args.split(), "--no-plot", "--train-size", "128", "--sequence", sequence]
        )
        assert out["params"]["numpy"]["head"]["W"].dtype == np.dtype(dtype)
        return out["backends"]["numpy"]["losses"]

    losses = losses_in("float32")
    assert len(losses) == 4
    assert_close(losses, losses_in("float64"), "float32", f"{sequence} losses")


# peephole timing ---------------------------------------------------------------------------------


def timing_backends():
    names = []
    if has("jax") and has("optax"):
        names.append("jax")
    if has("torch"):
        names.append("torch")
    return names


def test_timing_tasks_are_what_they_say():
    timing = load_example("peephole_timing")
    rng = np.random.default_rng(0)
    x, target, mask, d = timing.msd_batch(rng, 16, 10, 20)
    assert np.all(x.sum(axis=(1, 2)) == 2)
    for n in range(16):
        t1, t2 = np.flatnonzero(x[n, :, 0])
        assert t2 - t1 == d[n] and mask[n, t2] == 1 and mask[n].sum() == 1
        assert target[n, t2] == pytest.approx(d[n] / 20)
    x, target, mask = timing.gts_batch(2, 7, 30)
    assert list(np.flatnonzero(target[0])) == [7, 14, 21, 28] and x[0, 0, 0] == 1


def test_timing_evaluation_scores_an_exact_model_as_exact():
    timing = load_example("peephole_timing")

    class Oracle:  # outputs the targets themselves
        def __init__(self, cfg):
            self.cfg = cfg

        def predict(self, x):
            if self.cfg.task == "gts":
                return timing.gts_batch(len(x), self.cfg.period, x.shape[1])[1]
            out = np.zeros(x.shape[:2])
            for n in range(len(x)):
                t1, t2 = np.flatnonzero(x[n, :, 0])
                out[n, t2] = (t2 - t1) / self.cfg.max_delay
            return out

    for task in ("msd", "gts"):
        cfg = timing.parse_args(["--task", task])
        assert timing.evaluate(Oracle(cfg), cfg) == (1.0, 0.0)
    cfg = timing.parse_args(["--task", "gts"])
    silent = type("Silent", (), {"predict": lambda self, x: np.zeros(x.shape[:2])})()
    assert timing.evaluate(silent, cfg)[0] == 0.0


def test_timing_example_trains_both_variants(tmp_path):
    task = "msd"
    backends = timing_backends()
    if not backends:
        pytest.skip("the timing example needs jax and optax, or torch")
    timing = load_example("peephole_timing")
    # 60 steps (150 before: the steps were two thirds of the test's time, JAX's compilation
    # the rest): the last 20 losses' mean is 0.37x (lstm) and 0.24x (peephole) the first
    # 20's on both backends (the same initial weights and batches), against the 0.7 asked
    steps = 60
    args = f"--task {task} --backend {backends[0]} --seeds 1 --steps {steps} --threads 1"
    out = timing.main([*args.split(), "--no-progress", "--json", str(tmp_path / "t.json")])
    assert set(out["table"]) == {"lstm", "peephole"}
    for variant, runs in out["losses"].items():
        losses = runs[0]
        assert len(losses) == steps
        assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20]), variant
    assert (tmp_path / "t.json").exists()


# weight interchange ----------------------------------------------------------------------------


@pytest.mark.thorough_only(
    "the converters' tests (test_convert*) take its path; this runs the example"
)
def test_interchange_runs_the_keras_weights_alike_in_every_framework(tmp_path):
    """Keras trains (--quick); its weights, converted, classify the test digits with the
    same accuracy in Flax, Equinox, torch.nn.LSTM and every lstm_multi backend."""
    for module in ("sklearn", "keras", "jax"):  # not imported here: the example imports them
        if not has(module):
            pytest.skip(f"the interchange example needs {module}")
    env = dict(os.environ)
    env.setdefault("KERAS_BACKEND", "jax")
    script = os.path.join(EXAMPLES, "interchange_digits.py")
    args = ["--quick", "--threads", "1", "--no-progress", "--json", str(tmp_path / "i.json")]
    out = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in out.stdout.splitlines()
        if line.startswith("| ") and "framework" not in line
    ]
    accuracy = {name: float(acc) for name, acc, _ in rows}
    logit_diff = {name: float(diff) for name, _, diff in rows}
    frameworks = {
        "Flax nn.RNN(OptimizedLSTMCell)": "flax",
        "Equinox LSTMCell + lax.scan": "equinox",
        "torch.nn.LSTM": "torch",
    }
    expected = {"Keras (trained)", "lstm_multi numpy"}
    expected |= {f"lstm_multi {b}" for b in ("torch", "jax") if has(b)}
    expected |= {name for name, module in frameworks.items() if has(module)}
    assert set(accuracy) == expected, out.stdout
    assert len(set(accuracy.values())) == 1, accuracy  # the same test accuracy everywhere
    assert accuracy["Keras (trained)"] > 0.3, accuracy  # it learned (chance is 0.1)
    # float32 logits from Keras, Flax, Equinox and nn.LSTM, each summing in its own order
    assert max(logit_diff.values()) < 1e-4, logit_diff
    assert (tmp_path / "i.json").exists()


# streaming -------------------------------------------------------------------------------------


def test_streaming_serves_what_the_whole_sequence_call_computes(tmp_path):
    if not has("torch"):
        pytest.skip("the streaming example needs torch")
    streaming = load_example("streaming")
    summary = streaming.main(
        ["--steps", "60", "--hidden", "8", "--train-length", "2000", "--stream-length", "200"]
        + ["--no-progress", "--json", str(tmp_path / "s.json")]
    )
    assert summary["streamed_vs_whole_max_abs"] < 1e-5
    assert summary["losses"][-1] < summary["losses"][0] / 2  # it learned
    assert summary["forecast_mse"] < summary["naive_mse"]  # better than "next = last"
    assert summary["step_seconds_median"] > 0 and summary["nn_lstm_step_seconds_median"] > 0
    assert (tmp_path / "s.json").exists()


def test_int8_digits_trains_and_compares_float32_with_int8():
    """The int8 example end to end on a few samples: the float32 module is the trained
    model (the example checks its accuracy against the trainer's), and int8 is measured."""
    pytest.importorskip("sklearn", reason="the digits example needs scikit-learn")
    pytest.importorskip("torch", reason="int8 quantisation is lstm_multi.torch's")
    example = load_example("int8_digits")
    rows = example.main(["--variants", "peephole", "--train-size", "64", "--epochs", "1"])
    (row,) = rows
    assert row["variant"] == "peephole" and 0 <= row["int8"] <= 1 and 0 <= row["float32"] <= 1
    assert 0 < row["logit gap"] < 1  # int8, not float: never exactly equal
