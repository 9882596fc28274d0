"""The project's performance targets (2-core CPU, float32) and their verdicts on a run.

What the project tracks, not what a user of ``lstm-multi bench`` reads: the
benchmark reports times and ratios; this script reads its ``results.json`` and
says which targets were met::

    lstm-multi bench --full --out DIR
    python benchmarks/targets.py DIR/results.json

Each target compares one runner's time to another's in the same run. When both
were measured against the same reference (in one framework's process: nn.LSTM,
Flax, the GEMM floor) the comparison is the quotient of their ratios to it (so
machine noise cancels); otherwise the quotient of median times.
Targets are only evaluated for CPU float32 runs, at the preset sizes they name.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

MEDIUM_LARGE = ("medium", "large")
EVERY_SIZE = ("small", "medium", "large")
MODES = ("forward", "forward_backward")
ALL_VARIANTS = ("lstm", "peephole", "peephole_full")


@dataclass(frozen=True)
class Target:
    runner: str
    variants: tuple
    sizes: tuple
    modes: tuple
    against: str
    max_ratio: float
    #: variant of ``against`` to compare with, per variant (missing: "lstm"; "*" for floors)
    against_variant: dict | None = None
    note: str = ""

    def against_variant_of(self, variant):
        if self.against_variant is None:
            return "lstm"
        return self.against_variant.get(variant, "lstm")


FLOOR = {v: "*" for v in ALL_VARIANTS}
ARTICLE = {"lstm": "lstm", "peephole_full": "peephole_full", "peephole": "lstm"}


def target_specs(backends):
    """The issue's targets for the backends present in a run."""
    specs = [
        Target(
            "torch",
            ("lstm",),
            MEDIUM_LARGE,
            MODES,
            "torch.nn.LSTM",
            1.0,
            note="default path (auto: the generated CPU kernels for 'lstm')",
        ),
        Target(
            "torch[native]",
            ("lstm",),
            MEDIUM_LARGE,
            MODES,
            "torch.nn.LSTM",
            1.15,
            note="engine='native': nn.LSTM's own kernel through the functional cell",
        ),
        Target(
            "torch",
            ("peephole", "peephole_full"),
            MEDIUM_LARGE,
            MODES,
            "torch.nn.LSTM",
            1.15,
            note="generic path; nn.LSTM cannot do peepholes",
        ),
        Target(
            "torch",
            ALL_VARIANTS,
            ("small",),
            MODES,
            "torch.nn.LSTM",
            2.0,
            note="small size: per-step Python overhead dominates",
        ),
        Target("torch[native]", ("lstm",), ("small",), MODES, "torch.nn.LSTM", 2.0),
        Target(
            "jax",
            ALL_VARIANTS,
            EVERY_SIZE,
            MODES,
            "flax",
            0.9,
            note="against Flax OptimizedLSTMCell (plain LSTM) at the same size",
        ),
        Target(
            "numpy",
            ALL_VARIANTS,
            MEDIUM_LARGE,
            ("forward",),
            "numpy.matmuls",
            1.5,
            against_variant=FLOOR,
            note="against its matrix products alone",
        ),
        Target(
            "numpy",
            ALL_VARIANTS,
            MEDIUM_LARGE,
            ("forward_backward",),
            "numpy.matmuls",
            1.7,
            against_variant=FLOOR,
            note="against its matrix products alone",
        ),
    ]
    for backend in backends:
        specs.append(
            Target(
                backend,
                ALL_VARIANTS,
                MEDIUM_LARGE,
                ("forward_backward",),
                "article",
                1 / 1.5,
                against_variant=ARTICLE,
                note="at least 1.5x faster than the article's module ('peephole' against its plain LSTM)",
            )
        )
    return specs


def relative(a, b):
    """a's time over b's, through their ratios to the reference when both have one ratio
    to the same reference (measured in the same process); else the quotient of medians."""
    same = a.get("reference", "torch.nn.LSTM") == b.get("reference", "torch.nn.LSTM")
    if same and a.get("ratio_to_reference") and b.get("ratio_to_reference"):
        return a["ratio_to_reference"] / b["ratio_to_reference"]
    if a.get("median_s") and b.get("median_s"):
        return a["median_s"] / b["median_s"]
    return None


def evaluate(results):
    config = results["meta"]["config"]
    if config["dtype"] != "float32" or config["device"] != "cpu":
        return []
    rows = {(r["runner"], r["variant"], r["size"], r["mode"]): r for r in results["results"]}
    backends = sorted(
        {
            r["runner"]
            for r in results["results"]
            if r["role"] == "backend" and "[" not in r["runner"]
        }
    )
    out = []
    for target in target_specs(backends):
        for size in target.sizes:
            for mode in target.modes:
                for variant in target.variants:
                    a = rows.get((target.runner, variant, size, mode))
                    if a is None:
                        continue
                    other_variant = target.against_variant_of(variant)
                    b = rows.get((target.against, other_variant, size, mode))
                    value = None if b is None else relative(a, b)
                    out.append(
                        {
                            "runner": target.runner,
                            "variant": variant,
                            "size": size,
                            "mode": mode,
                            "against": f"{target.against}"
                            + ("" if other_variant in ("lstm", "*") else f" ({other_variant})"),
                            "max_ratio": target.max_ratio,
                            "ratio": value,
                            "ratio_of_medians": None
                            if b is None or not (a.get("median_s") and b.get("median_s"))
                            else a["median_s"] / b["median_s"],
                            "met": None if value is None else bool(value <= target.max_ratio),
                            "note": target.note,
                        }
                    )
    return out


def _fmt(value, spec):
    return "–" if value is None else format(value, spec)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python benchmarks/targets.py RESULTS.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        found = evaluate(json.load(f))
    if not found:
        print("no targets apply (they are for CPU float32 runs at the preset sizes)")
        return 0
    met = sum(1 for t in found if t["met"])
    print(f"targets met: {met} of {len(found)}")
    for t in found:
        mark = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        print(
            f"  {mark:6} {t['runner']} / {t['variant']} {t['size']} {t['mode']}: "
            f"{_fmt(t['ratio'], '.2f')}x {t['against']} (target <= {t['max_ratio']:.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
