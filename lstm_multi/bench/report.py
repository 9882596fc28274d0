"""Reports of a run: the printed table, results.json, results.md and results.png.

Each row's ratio is to its own framework's reference, measured alternately with
it in the same process (``runners.REFERENCES``); it is printed in that
reference's column (``x nn.LSTM``, ``x Flax``, ``x GEMM floor``) and only where
the reference's own time is in the same table: never a ratio without the time
it was computed from.
"""

from __future__ import annotations

import json
import os

from .runners import REFERENCE_COLUMNS

MODE_LABEL = {
    "forward": "forward",
    "forward_backward": "forward + backward",
    "step": "one step per call (T calls)",
}

#: what marks a row still noisy after its retries
NOISY_MARK = "noisy"


def _fmt(value, spec, missing="–"):
    return missing if value is None else format(value, spec)


def _label(row):
    return (
        row["runner"]
        if row["variant"] in ("lstm", "*") and row["role"] != "backend"
        else f"{row['runner']} / {row['variant']}"
    )


def _groups(results):
    seen = []
    for row in results["results"]:
        key = (row["size"], row["mode"])
        if key not in seen:
            seen.append(key)
    return seen


def _dims(row):
    d = row["dims"]
    return f"T{d['T']} B{d['B']} I{d['I']} H{d['H']}"


def table_rows(results, size, mode):
    rows = [r for r in results["results"] if r["size"] == size and r["mode"] == mode]
    return sorted(rows, key=lambda r: (r["median_s"] is None, r["median_s"] or 0))


def ratio_columns(rows):
    """The reference columns these rows need, in a fixed order (``x nn.LSTM``, ``x Flax``,
    ``x GEMM floor``): those of the references measured among them."""
    measured = {r["runner"] for r in rows if r["median_s"]}
    wanted = {REFERENCE_COLUMNS[name] for name in measured if name in REFERENCE_COLUMNS}
    return [c for c in dict.fromkeys(REFERENCE_COLUMNS.values()) if c in wanted]


def ratio_cells(row, rows):
    """``{column: ratio}`` for ``row``: its ratio, in its reference's column, when that
    reference's time is among ``rows`` (the same size and mode of the same run); else {}."""
    reference, ratio = row.get("reference"), row.get("ratio_to_reference")
    if reference is None or ratio is None or reference not in REFERENCE_COLUMNS:
        return {}
    if not any(r["runner"] == reference and r["median_s"] for r in rows):
        return {}
    return {REFERENCE_COLUMNS[reference]: ratio}


def _spread_cell(row):
    if row["median_s"] is None:
        return "–"
    text = f"{100 * row['spread']:.0f}%"
    return f"{text} {NOISY_MARK}" if row.get("noisy") else text


def text_table(results):
    """The table printed at the end of a run."""
    lines = []
    meta = results["meta"]
    rate = meta["gemm_rate_flops"]
    limit = meta.get("limit_rate_flops") or rate
    lines.append(
        f"GEMM rate (the machine's limit): {_fmt(limit and limit / 1e9, '.1f')} GFLOP/s "
        f"({meta.get('limit_source', 'square GEMM probe')}). Each ratio is to the reference "
        "of the row's framework, measured in turns with it in the same process."
    )
    for size, mode in _groups(results):
        rows = table_rows(results, size, mode)
        columns = ratio_columns(rows)
        lines.append("")
        lines.append(
            f"{size} ({_dims(rows[0])}), {MODE_LABEL[mode]}, {meta['config']['dtype']}, "
            f"{meta['config']['device']}"
        )
        lines.append(
            f"  {'runner / variant':30} {'ms':>9} "
            + "".join(f"{c:>13}" for c in columns)
            + f" {'% limit':>8} {'1st call s':>10}  spread"
        )
        for r in rows:
            ms = None if r["median_s"] is None else 1e3 * r["median_s"]
            cells = ratio_cells(r, rows)
            extra = f"  ERROR {r['error']}" if r["error"] else ""
            lines.append(
                f"  {_label(r):30} {_fmt(ms, '9.2f'):>9} "
                + "".join(f"{_fmt(cells.get(c), '.2f', ''):>13}" for c in columns)
                + f" {_fmt(r['pct_of_limit'], '7.0f'):>8} {_fmt(r['first_call_s'], '10.2f'):>10}"
                f"  {_spread_cell(r)}{extra}"
            )
    noisy = [r for r in results["results"] if r.get("noisy")]
    if noisy:
        lines.append("")
        retried = max(r.get("attempts", 1) for r in noisy) - 1
        lines.append(
            f"{len(noisy)} row(s) marked {NOISY_MARK}: their times still spread over "
            f"{100 * meta['config']['max_spread']:.0f}% (after up to {retried} of "
            f"{meta['config']['retries']} retries: no retry starts once a framework's process "
            f"has taken {meta['config']['retry_budget']:g}x its estimate); compare them with care."
        )
    return "\n".join(lines)


def markdown(results):
    meta = results["meta"]
    m = meta["machine"]
    cpu = m.get("lscpu", {})
    cfg = meta["config"]
    out = ["# lstm-multi bench results", ""]
    out.append("## Machine")
    out.append("")
    out.append(
        f"- CPU: {cpu.get('Model name', m.get('processor') or '?')}, "
        f"{cpu.get('CPU(s)', m.get('cpu_count'))} logical CPU(s), "
        f"{cpu.get('Core(s) per socket', '?')} core(s) per socket, "
        f"{cpu.get('Thread(s) per core', '?')} thread(s) per core"
        + (f", hypervisor {cpu['Hypervisor vendor']}" if cpu.get("Hypervisor vendor") else "")
    )
    if m.get("gpu"):
        out.append(f"- GPU: {m['gpu']}")
    out.append(f"- {m['platform']}, Python {m['python']}")
    out.append("- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    for name, what in (("torch", "torch intra-op threads"), ("numpy", "NumPy's BLAS threads")):
        if f"{name}_threads" not in m:
            continue
        probe = m.get(f"{name}_thread_probe_s") or {}
        how = (
            "measured: " + ", ".join(f"{n} -> {1e3 * s:.1f} ms" for n, s in probe.items())
            if probe
            else "set by --threads"
        )
        out.append(f"- {what}: {m[f'{name}_threads']} ({how})")
    if "loadavg_at_start" in m:
        out.append(
            f"- load average at start {_loads(m['loadavg_at_start'])}, "
            f"at end {_loads(m.get('loadavg_at_end'))}"
            + (" - **the machine was busy**" if m.get("busy_at_start") else "")
        )
    processes = meta.get("processes", {})
    if processes:
        out.append(
            "- one process per framework, thread-pool variables: "
            + "; ".join(
                f"{f}: "
                + ", ".join(f"{k}={v}" for k, v in p["environment"].items() if v is not None)
                for f, p in processes.items()
            )
        )
    rates = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in meta["gemm_rates_by_framework"].items())
    limit = meta.get("limit_rate_flops") or meta["gemm_rate_flops"]
    out.append(
        f"- GEMM rate (the limit): {_fmt(limit and limit / 1e9, '.1f')} GFLOP/s, from the "
        f"{meta.get('limit_source', 'square GEMM probe')} (probe: {meta['gemm_probe']}; "
        f"by framework: {rates}); the highest rate measured in the run, so no row exceeds 100%"
    )
    out.append(
        f"- run: dtype {cfg['dtype']}, device {cfg['device']}, {cfg['repeats']} rounds after "
        f"{cfg['warmup']} warm-up call(s), started {meta['started']}, took "
        f"{meta['duration_s']:.0f} s (estimated {meta.get('estimate_s', 0):.0f} s on a quiet "
        "machine"
        + (
            f", {meta['estimate_at_load_s']:.0f} s at the load average at the start"
            if meta.get("estimate_at_load_s")
            else ""
        )
        + ")"
    )
    out.append("")
    out.append(
        "Times are medians over rounds. Each framework ran in a process of its own, its rows "
        "in turns with its reference: `x nn.LSTM` (torch rows), `x Flax` (JAX rows) and "
        "`x GEMM floor` (NumPy rows: the LSTM's matrix products alone) are the median over "
        "rounds of the row's time over the smaller of the two reference times around it; a "
        "row has no ratio to a reference of another process. `% limit` is the GEMM FLOPs at "
        "the measured GEMM rate over the time; `first call` includes compilation/tracing "
        f"(JAX). `spread` is (max - min) / median of the times; a row over "
        f"{100 * cfg['max_spread']:.0f}% was measured again (up to {cfg['retries']} times, "
        f"the calmest attempt kept) and is marked *{NOISY_MARK}* if it stayed over."
    )
    for size, mode in _groups(results):
        rows = table_rows(results, size, mode)
        columns = ratio_columns(rows)
        out += ["", f"## {size} ({_dims(rows[0])}), {MODE_LABEL[mode]}", ""]
        out.append(
            "| runner | variant | time (ms) | "
            + "".join(f"{c} | " for c in columns)
            + "% of limit | first call (s) | spread | attempts |"
        )
        out.append("|---|---|---:|" + "---:|" * len(columns) + "---:|---:|---:|---:|")
        for r in rows:
            ms = None if r["median_s"] is None else 1e3 * r["median_s"]
            err = f" (error: {r['error']})" if r["error"] else ""
            cells = ratio_cells(r, rows)
            spread = _spread_cell(r).replace(f" {NOISY_MARK}", f" *{NOISY_MARK}*")
            out.append(
                f"| {r['runner']}{err} | {r['variant']} | {_fmt(ms, '.2f')} | "
                + "".join(f"{_fmt(cells.get(c), '.3f', '')} | " for c in columns)
                + f"{_fmt(r['pct_of_limit'], '.0f')} | {_fmt(r['first_call_s'], '.2f')} | "
                f"{spread} | {r.get('attempts', 1)} |"
            )
    if results["skipped"]:
        out += ["", "## Not run", ""]
        reasons = {}
        for s in results["skipped"]:
            reasons.setdefault((s["runner"], s["reason"]), []).append(f"{s['variant']}")
        for (runner, reason), variants in reasons.items():
            out.append(f"- {runner} ({', '.join(sorted(set(variants)))}): {reason}")
    return "\n".join(out) + "\n"


def _loads(values):
    return "–" if not values else " ".join(f"{v:.2f}" for v in values)


#: one colour per framework (the plot's legend names each with its reference)
FRAMEWORK_COLOURS = {
    "torch": "#d95f02",
    "jax": "#1f78b4",
    "numpy": "#33a02c",
    "cupy": "#6a3d9a",
}
#: one hatch per variant (the plain LSTM and variant-free rows solid)
VARIANT_HATCHES = {"lstm": "", "*": "", "peephole": "///", "peephole_full": "xxx"}
_OTHER_HATCHES = ("...", "\\\\\\", "ooo", "---", "+++")


def _hatch(variant, variants):
    if variant in VARIANT_HATCHES:
        return VARIANT_HATCHES[variant]
    others = [v for v in variants if v not in VARIANT_HATCHES]
    return _OTHER_HATCHES[others.index(variant) % len(_OTHER_HATCHES)]


def _bar_order(bar):
    """Frameworks in FRAMEWORK_COLOURS' order, each reference first, then by ratio."""
    row, value = bar
    frameworks = list(FRAMEWORK_COLOURS)
    rank = frameworks.index(row["framework"]) if row["framework"] in frameworks else len(frameworks)
    return rank, row["runner"] != row["reference"], value


#: the ratios the plot's axis may mark (those within its range are used): dense for a
#: narrow range, sparse for a wide one
_TICKS = (0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 5, 10)
_WIDE_TICKS = (0.01, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10000)


def plot(results, path):
    """One panel per size and mode: each row's time over its framework's reference
    (horizontal bars, log scale, the value written on each), one colour per framework,
    one hatch per variant. Rows without a ratio (no reference measured) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    groups = _groups(results)
    panels = []
    for size, mode in groups:
        rows = table_rows(results, size, mode)
        bars = [(r, ratio_cells(r, rows)) for r in rows]
        bars = [(r, next(iter(c.values()))) for r, c in bars if c]
        bars.sort(key=_bar_order)
        if bars:
            panels.append((size, mode, rows, bars))
    if not panels:
        return False
    heights = [0.32 * len(bars) + 1.1 for *_, bars in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(9, sum(heights) + 1.0), squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )  # fmt: skip
    variants = list(dict.fromkeys(r["variant"] for r in results["results"]))
    lo = min(v for *_, bars in panels for _, v in bars)
    hi = max(v for *_, bars in panels for _, v in bars)
    for ax, (size, mode, rows, bars) in zip(axes[:, 0], panels, strict=True):
        ys = range(len(bars))[::-1]
        for y, (r, value) in zip(ys, bars, strict=True):
            colour = FRAMEWORK_COLOURS.get(r["framework"], "#777777")
            ax.barh(
                y, value, color=colour, alpha=0.85,
                hatch=_hatch(r["variant"], variants), edgecolor="white", linewidth=0,
            )  # fmt: skip
            text = f"{value:.2f}x" + (" (noisy)" if r.get("noisy") else "")
            ax.text(
                value * 1.03, y, text, va="center", fontsize=8,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.8},
            )  # fmt: skip
        ax.set_yticks(list(ys))
        ax.set_yticklabels(
            [
                _label(r) + (" (reference)" if r["runner"] == r["reference"] else "")
                for r, _ in bars
            ],
            fontsize=8,
        )
        ax.set_xscale("log")
        left, right = min(lo, 1.0) / 1.2, max(hi, 1.0) * 1.6
        ax.set_xlim(left, right)
        ticks = [t for t in (_TICKS if right / left < 8 else _WIDE_TICKS) if left <= t <= right]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FixedFormatter([f"{t:g}x" for t in ticks]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(
            f"{size} ({_dims(rows[0])}), {MODE_LABEL.get(mode, mode)}: time / the framework's "
            "reference (lower is faster)",
            fontsize=9,
        )
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[-1, 0].set_xlabel("time / reference (log scale; 1 = the reference)")
    references = results["meta"].get("references", {})
    handles = [
        Patch(
            color=FRAMEWORK_COLOURS.get(f, "#777777"),
            label=f"{f} rows: " + (REFERENCE_COLUMNS.get(references[f]) or "no reference"),
        )
        for f in references
    ]
    handles += [
        Patch(
            facecolor="white",
            edgecolor="black",
            hatch=_hatch(v, variants),
            label=v + (" (and rows without a variant)" if v == "lstm" else ""),
        )
        for v in variants
        if v != "*"
    ]
    fig.legend(handles=handles, fontsize=8, ncol=4, loc="lower center")
    fig.tight_layout(rect=(0, 0.35 / (sum(heights) + 1.0) + 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(results, directory):
    """results.json, results.md and (with matplotlib) results.png in ``directory``."""
    os.makedirs(directory, exist_ok=True)
    paths = {
        "json": os.path.join(directory, "results.json"),
        "md": os.path.join(directory, "results.md"),
    }
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(results))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        paths["png"] = None
    else:
        paths["png"] = os.path.join(directory, "results.png")
        if not plot(results, paths["png"]):
            paths["png"] = None
    return paths
