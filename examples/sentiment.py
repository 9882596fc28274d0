"""Text sentiment with an LSTM: the pipeline of "Building a LSTM by hand on PyTorch".

Data: a CSV in the format of the Amazon Fine Food Reviews dataset (``Reviews.csv``,
columns ``Text`` and ``Score`` among others). Scores 1-2 are negative, 4-5
positive, 3 is dropped, and the larger class is subsampled so both are equally
frequent. The dataset is not shipped; ``--make-demo-csv PATH`` writes a small
synthetic one in the same format (short reviews whose sentiment words may be
negated, "not good", so word order matters) to try the pipeline without it.

Pipeline: lower-case, a regex tokenizer, a vocabulary of the training split's
frequent words (0 = padding, 1 = unknown), each review cut/padded to a quantile
of the training lengths, then Embedding -> LSTM -> Linear on the last hidden
state, trained with Adam on binary cross-entropy; accuracy on a held-out split.
Padded batches go through the LSTM as a ``PackedSequence``, so the last hidden
state is the one at each review's own last word.

``--impl lstm_multi`` uses ``lstm_multi.torch.LSTM`` (any ``--variant``),
``--impl nn.LSTM`` uses ``torch.nn.LSTM`` (variant "lstm" only) and
``--impl both`` trains the two from the same initial weights and compares them.

    python examples/sentiment.py --make-demo-csv /tmp/reviews.csv
    python examples/sentiment.py --csv /tmp/reviews.csv --impl both
    python examples/sentiment.py --csv Reviews.csv --max-samples 40000 --variant peephole
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine_info, progress, thread_limit, write_json  # noqa: E402

PAD, UNK = 0, 1
IMPLS = ("lstm_multi", "nn.LSTM")


# data -------------------------------------------------------------------------------------


def read_reviews(path, max_rows=None):
    """(texts, scores) from a CSV with columns ``Text`` and ``Score`` (others ignored).

    Rows whose Score is not an integer 1..5 are skipped.
    """
    texts, scores = [], []
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        missing = {"Text", "Score"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{path}: expected the columns Text and Score (the Amazon Fine Food Reviews "
                f"format), missing {sorted(missing)}; found {reader.fieldnames}"
            )
        for row in reader:
            try:
                score = int(float(row["Score"]))
            except (TypeError, ValueError):
                continue
            if 1 <= score <= 5 and row["Text"] is not None:
                texts.append(row["Text"])
                scores.append(score)
            if max_rows is not None and len(texts) >= max_rows:
                break
    return texts, np.asarray(scores, dtype=np.int64)


def label_and_balance(texts, scores, seed=0, max_samples=None):
    """Scores 1-2 -> 0, 4-5 -> 1, 3 dropped; the larger class subsampled to the smaller's
    size (and both to max_samples // 2 if given); returned shuffled."""
    rng = np.random.default_rng(seed)
    neg = np.flatnonzero(scores <= 2)
    pos = np.flatnonzero(scores >= 4)
    per_class = min(len(neg), len(pos))
    if max_samples is not None:
        per_class = min(per_class, max_samples // 2)
    if per_class == 0:
        raise ValueError(
            f"need reviews of both classes, got {len(neg)} negative (score 1-2) and "
            f"{len(pos)} positive (score 4-5)"
        )
    keep = np.concatenate(
        [rng.choice(neg, per_class, replace=False), rng.choice(pos, per_class, replace=False)]
    )
    keep = keep[rng.permutation(len(keep))]
    labels = (scores[keep] >= 4).astype(np.int64)
    return [texts[k] for k in keep], labels


_TAGS = re.compile(r"<[^>]+>")  # the reviews hold HTML line breaks, "<br />"
_WORDS = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[!?]")


def tokenize(text):
    """Lower-case words (with "n't"-style contractions kept whole) and ! and ?."""
    return _WORDS.findall(_TAGS.sub(" ", text.lower()))


class Vocabulary:
    """Words seen at least ``min_freq`` times in the training texts, most frequent first,
    at most ``max_size`` of them; 0 is padding and 1 every other word."""

    def __init__(self, token_lists, min_freq=2, max_size=20000):
        counts = collections.Counter(t for tokens in token_lists for t in tokens)
        words = [w for w, n in counts.most_common(max_size) if n >= min_freq]
        self.itos = ["<pad>", "<unk>", *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self):
        return len(self.itos)

    def encode(self, tokens):
        return [self.stoi.get(t, UNK) for t in tokens]


def pad_to(ids_lists, max_len):
    """(N, max_len) int64 ids, cut or padded with 0 at the end, and the (N,) lengths (>= 1)."""
    ids = np.zeros((len(ids_lists), max_len), dtype=np.int64)
    lengths = np.empty(len(ids_lists), dtype=np.int64)
    for n, seq in enumerate(ids_lists):
        seq = seq[:max_len] or [UNK]  # an empty review is one unknown word
        ids[n, : len(seq)] = seq
        lengths[n] = len(seq)
    return ids, lengths


def prepare(texts, labels, test_fraction=0.2, length_quantile=0.9, min_freq=2, max_vocab=20000):
    """Split, build the vocabulary on the training split, encode and pad both splits."""
    n_test = max(1, int(round(len(texts) * test_fraction)))
    if n_test >= len(texts):
        raise ValueError(f"{len(texts)} reviews are too few to hold out {test_fraction:.0%}")
    tokens = [tokenize(t) for t in texts]
    train_tokens, test_tokens = tokens[:-n_test], tokens[-n_test:]
    vocab = Vocabulary(train_tokens, min_freq=min_freq, max_size=max_vocab)
    max_len = max(1, int(np.ceil(np.quantile([len(t) for t in train_tokens], length_quantile))))
    train = pad_to([vocab.encode(t) for t in train_tokens], max_len)
    test = pad_to([vocab.encode(t) for t in test_tokens], max_len)
    return {
        "vocab": vocab,
        "max_len": max_len,
        "train": (*train, labels[:-n_test]),
        "test": (*test, labels[-n_test:]),
    }


# a synthetic CSV in the dataset's format ------------------------------------------------------

_POSITIVE = [
    "good",
    "great",
    "delicious",
    "tasty",
    "excellent",
    "fresh",
    "perfect",
    "wonderful",
    "yummy",
    "lovely",
]
_NEGATIVE = [
    "bad",
    "awful",
    "stale",
    "bland",
    "terrible",
    "disgusting",
    "horrible",
    "gross",
    "rancid",
    "soggy",
]
_FILLER = (
    "the this these i we my our it they coffee tea chips cookies sauce dog food cat "
    "treats box bag price order amazon package flavor taste smell texture brand store "
    "bought tried ordered received arrived was were is are and but so with for of a to "
    "in on very really quite just also again after before kids husband wife"
).split()


def _demo_review(rng, positive):
    """Filler words around two or three sentiment phrases; a phrase may be negated
    ("not good" is negative), so the label depends on word order, not only on the words."""
    words = list(rng.choice(_FILLER, rng.integers(6, 30)))
    for _ in range(rng.integers(2, 4)):
        negate = rng.random() < 0.35
        want_positive_word = positive != negate
        word = rng.choice(_POSITIVE if want_positive_word else _NEGATIVE)
        phrase = ["not", word] if negate else [word]
        at = rng.integers(0, len(words) + 1)
        words[at:at] = phrase
    text = " ".join(words)
    text = text[0].upper() + text[1:] + rng.choice([".", "!", " !!", "."])
    if rng.random() < 0.2:
        text += "<br /><br />" + " ".join(rng.choice(_FILLER, rng.integers(3, 10))) + "."
    return text


def make_demo_csv(path, n=4000, seed=0, label_noise=0.03):
    """Write ``n`` synthetic reviews in the Reviews.csv format (Id, ProductId, UserId,
    Score, Summary, Text; Score 1..5 with some 3s and more positives than negatives,
    like the real data). ``label_noise`` of them get the opposite sentiment's score."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["Id", "ProductId", "UserId", "Score", "Summary", "Text"])
        for k in range(n):
            score = int(rng.choice([1, 2, 3, 4, 5], p=[0.15, 0.1, 0.1, 0.2, 0.45]))
            positive = score >= 4 if score != 3 else bool(rng.random() < 0.5)
            text = _demo_review(rng, positive)
            if score != 3 and rng.random() < label_noise:
                score = 6 - score
            writer.writerow([k + 1, f"B{k:09d}", f"A{rng.integers(1e9):09d}", score, "", text])
    return path


# model ---------------------------------------------------------------------------------------


def make_lstm(
    impl, input_size, hidden_size, variant="lstm", num_layers=1, bidirectional=False, dropout=0.0
):
    """``lstm_multi.torch.LSTM`` or ``torch.nn.LSTM``, batch_first, the same constructor."""
    import torch

    kwargs = dict(
        num_layers=num_layers,
        batch_first=True,
        bidirectional=bidirectional,
        dropout=dropout if num_layers > 1 else 0.0,
    )
    if impl == "nn.LSTM":
        if variant != "lstm":
            raise SystemExit(f"--impl nn.LSTM has no variant {variant!r}: use --impl lstm_multi")
        return torch.nn.LSTM(input_size, hidden_size, **kwargs)
    if impl == "lstm_multi":
        import lstm_multi.torch

        return lstm_multi.torch.LSTM(input_size, hidden_size, variant=variant, **kwargs)
    raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")


def build_model(impl, vocab_size, cfg):
    """Embedding -> LSTM -> Linear on the last hidden state (one logit)."""
    import torch
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence

    class SentimentLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(vocab_size, cfg.embed_size, padding_idx=PAD)
            self.lstm = make_lstm(
                impl,
                cfg.embed_size,
                cfg.hidden_size,
                cfg.variant,
                cfg.num_layers,
                cfg.bidirectional,
                cfg.dropout,
            )
            directions = 2 if cfg.bidirectional else 1
            self.dropout = nn.Dropout(cfg.dropout)
            self.fc = nn.Linear(cfg.hidden_size * directions, 1)

        def forward(self, ids, lengths):
            emb = self.dropout(self.embedding(ids))
            packed = pack_padded_sequence(
                emb, lengths.cpu(), batch_first=True, enforce_sorted=False
            )
            _, (h_n, _) = self.lstm(packed)
            last = h_n[-1] if not cfg.bidirectional else torch.cat([h_n[-2], h_n[-1]], -1)
            return self.fc(self.dropout(last)).squeeze(-1)

    # the same seed gives the same initial weights whichever LSTM is inside: both register
    # weight_ih, weight_hh, bias_ih, bias_hh in nn.LSTM's order and draw U(-1/sqrt(H), 1/sqrt(H))
    torch.manual_seed(cfg.seed)
    return SentimentLSTM()


# training ------------------------------------------------------------------------------------


def evaluate(model, split, batch_size, device):
    import torch

    ids, lengths, labels = split
    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            x = torch.from_numpy(ids[start : start + batch_size]).to(device)
            n = torch.from_numpy(lengths[start : start + batch_size])
            y = torch.from_numpy(labels[start : start + batch_size]).float().to(device)
            logits = model(x, n)
            loss_sum += torch.nn.functional.binary_cross_entropy_with_logits(
                logits, y, reduction="sum"
            ).item()
            correct += ((logits > 0).float() == y).sum().item()
    return correct / len(ids), loss_sum / len(ids)


def train(impl, data, cfg):
    """Train one model; returns its history and the final accuracies."""
    import torch

    device = torch.device(cfg.device)
    model = build_model(impl, len(data["vocab"]), cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    ids, lengths, labels = data["train"]
    rng = np.random.default_rng(cfg.seed)  # the same batches for every impl
    history = {"train_loss": [], "test_accuracy": [], "test_loss": [], "epoch_seconds": []}
    steps = 0
    for epoch in range(cfg.epochs):
        model.train()
        order = rng.permutation(len(ids))
        batches = [order[k : k + cfg.batch_size] for k in range(0, len(ids), cfg.batch_size)]
        if cfg.max_steps is not None:
            batches = batches[: max(0, cfg.max_steps - steps)]
        if not batches:
            break
        t0 = time.perf_counter()
        bar = progress(
            batches,
            enabled=cfg.progress,
            desc=f"{impl} epoch {epoch + 1}",
            unit="batch",
            leave=False,
        )
        running = []
        for idx in bar:
            x = torch.from_numpy(ids[idx]).to(device)
            n = torch.from_numpy(lengths[idx])
            y = torch.from_numpy(labels[idx]).float().to(device)
            loss = loss_fn(model(x, n), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            running.append(loss.item())
            history["train_loss"].append(running[-1])
            bar.set_postfix(loss=f"{np.mean(running[-20:]):.4f}")
            steps += 1
        bar.close()
        seconds = time.perf_counter() - t0
        accuracy, test_loss = evaluate(model, data["test"], 256, device)
        history["epoch_seconds"].append(seconds)
        history["test_accuracy"].append(accuracy)
        history["test_loss"].append(test_loss)
        print(
            f"{impl:>10} epoch {epoch + 1:>2}: train loss {np.mean(running):.4f}  "
            f"test loss {test_loss:.4f}  test acc {accuracy:.4f}  ({seconds:.1f} s)"
        )
    train_accuracy, _ = evaluate(model, data["train"], 256, device)
    history["train_accuracy"] = train_accuracy
    history["seconds_per_epoch"] = (
        float(np.mean(history["epoch_seconds"])) if history["epoch_seconds"] else 0.0
    )
    history["model"] = model
    return history


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--csv", help="reviews CSV with columns Text and Score (Reviews.csv)")
    p.add_argument(
        "--make-demo-csv",
        metavar="PATH",
        help="write a synthetic CSV in that format to PATH (and train on it unless --csv)",
    )
    p.add_argument("--demo-size", type=int, default=6000, help="rows of the demo CSV")
    p.add_argument("--impl", choices=(*IMPLS, "both"), default="lstm_multi")
    p.add_argument(
        "--variant", default="lstm", help="lstm_multi variant: lstm, peephole, peephole_full"
    )
    p.add_argument("--max-rows", type=int, default=None, help="read at most this many CSV rows")
    p.add_argument(
        "--max-samples",
        type=int,
        default=None,
        help="keep at most this many balanced reviews (half per class)",
    )
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument(
        "--length-quantile",
        type=float,
        default=0.9,
        help="pad/cut every review to this quantile of the training lengths",
    )
    p.add_argument("--min-freq", type=int, default=2)
    p.add_argument("--max-vocab", type=int, default=20000)
    p.add_argument("--embed-size", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=5.0, help="gradient-norm clip (0: none)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for torch and BLAS (1 is often fastest for small LSTMs and on a busy machine)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def run(cfg):
    import torch

    if cfg.device is None:
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.make_demo_csv:
        make_demo_csv(cfg.make_demo_csv, n=cfg.demo_size, seed=cfg.seed)
        print(f"wrote {cfg.demo_size} synthetic reviews to {cfg.make_demo_csv}")
        if cfg.csv is None:
            cfg.csv = cfg.make_demo_csv
    if cfg.csv is None:
        raise SystemExit(
            "give --csv PATH (Reviews.csv of Amazon Fine Food Reviews) or --make-demo-csv PATH"
        )
    texts, scores = read_reviews(cfg.csv, cfg.max_rows)
    texts, labels = label_and_balance(texts, scores, cfg.seed, cfg.max_samples)
    data = prepare(
        texts, labels, cfg.test_fraction, cfg.length_quantile, cfg.min_freq, cfg.max_vocab
    )
    print(
        f"{len(texts)} balanced reviews ({len(data['train'][0])} train / "
        f"{len(data['test'][0])} test), vocabulary {len(data['vocab'])}, "
        f"padded to {data['max_len']} tokens (quantile {cfg.length_quantile}), "
        f"device {cfg.device}"
    )

    impls = IMPLS if cfg.impl == "both" else (cfg.impl,)
    results = {}
    for impl in impls:
        results[impl] = train(impl, data, cfg)

    print(f"\n{'impl':<11} {'variant':<14} {'test acc':>9} {'train acc':>10} {'s/epoch':>8}")
    for impl, res in results.items():
        variant = cfg.variant if impl == "lstm_multi" else "lstm"
        print(
            f"{impl:<11} {variant:<14} {res['test_accuracy'][-1] if res['test_accuracy'] else float('nan'):>9.4f} "
            f"{res['train_accuracy']:>10.4f} {res['seconds_per_epoch']:>8.2f}"
        )
    if len(results) == 2:
        a, b = (np.asarray(results[k]["train_loss"]) for k in IMPLS)
        gap = float(np.max(np.abs(a - b))) if len(a) else 0.0
        print(
            f"largest gap between the two training-loss curves: {gap:.2e} "
            "(same initial weights, same batches)"
        )
    summary = {
        "config": vars(cfg),
        "data": {"reviews": len(texts), "vocab": len(data["vocab"]), "max_len": data["max_len"]},
        "results": {
            k: {kk: vv for kk, vv in v.items() if kk != "model"} for k, v in results.items()
        },
        "machine": machine_info(),
    }
    if cfg.json:
        write_json(cfg.json, summary)
    summary["models"] = {k: v["model"] for k, v in results.items()}
    return summary


def main(argv=None):
    cfg = parse_args(argv)
    with thread_limit(cfg.threads):
        return run(cfg)


if __name__ == "__main__":
    main()
