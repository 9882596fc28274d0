"""Reports of a run: the printed table, results.json, results.md and results.png."""

from __future__ import annotations

import json
import os

MODE_LABEL = {
    "forward": "forward",
    "forward_backward": "forward + backward",
    "step": "one step per call (T calls)",
}


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


def text_table(results):
    """The table printed at the end of a run."""
    lines = []
    meta = results["meta"]
    rate = meta["gemm_rate_flops"]
    limit = meta.get("limit_rate_flops") or rate
    lines.append(
        f"GEMM rate (the machine's limit): {_fmt(limit and limit / 1e9, '.1f')} GFLOP/s "
        f"({meta.get('limit_source', 'square GEMM probe')}); "
        f"reference: {meta['reference'] or 'none (torch not installed)'}"
    )
    for size, mode in _groups(results):
        rows = table_rows(results, size, mode)
        lines.append("")
        lines.append(
            f"{size} ({_dims(rows[0])}), {MODE_LABEL[mode]}, {meta['config']['dtype']}, "
            f"{meta['config']['device']}"
        )
        lines.append(
            f"  {'runner / variant':34} {'ms':>9} {'x nn.LSTM':>10} {'% limit':>8} "
            f"{'1st call s':>10}"
        )
        for r in rows:
            ms = None if r["median_s"] is None else 1e3 * r["median_s"]
            extra = f"  ERROR {r['error']}" if r["error"] else ""
            lines.append(
                f"  {_label(r):34} {_fmt(ms, '9.2f'):>9} {_fmt(r['ratio_to_reference'], '10.2f'):>10} "
                f"{_fmt(r['pct_of_limit'], '7.0f'):>8} {_fmt(r['first_call_s'], '10.2f'):>10}{extra}"
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
    if "torch_threads" in m:
        out.append(f"- torch intra-op threads: {m['torch_threads']}")
    if "loadavg_at_start" in m:
        out.append(
            f"- load average at start {m['loadavg_at_start']}, at end {m.get('loadavg_at_end')}"
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
        f"{cfg['warmup']} warm-up call(s), started {meta['started']}, took {meta['duration_s']:.0f} s"
    )
    out.append("")
    out.append(
        "Times are medians over rounds; `x nn.LSTM` is the median over rounds of the time "
        "over the smaller of the two `torch.nn.LSTM` measurements around it; `% limit` is the "
        "GEMM FLOPs at the measured GEMM rate over the time; `first call` includes "
        "compilation/tracing (JAX) and `setup` is first call minus the median."
    )
    for size, mode in _groups(results):
        rows = table_rows(results, size, mode)
        out += ["", f"## {size} ({_dims(rows[0])}), {MODE_LABEL[mode]}", ""]
        out.append(
            "| runner | variant | time (ms) | x nn.LSTM | % of limit | first call (s) | setup (s) | spread |"
        )
        out.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            ms = None if r["median_s"] is None else 1e3 * r["median_s"]
            err = f" (error: {r['error']})" if r["error"] else ""
            out.append(
                f"| {r['runner']}{err} | {r['variant']} | {_fmt(ms, '.2f')} | "
                f"{_fmt(r['ratio_to_reference'], '.3f')} | {_fmt(r['pct_of_limit'], '.0f')} | "
                f"{_fmt(r['first_call_s'], '.2f')} | {_fmt(r['setup_s'], '.2f')} | "
                f"{_fmt(r['spread'] and 100 * r['spread'], '.0f')}% |"
            )
    if results["skipped"]:
        out += ["", "## Not run", ""]
        reasons = {}
        for s in results["skipped"]:
            reasons.setdefault((s["runner"], s["reason"]), []).append(f"{s['variant']}")
        for (runner, reason), variants in reasons.items():
            out.append(f"- {runner} ({', '.join(sorted(set(variants)))}): {reason}")
    return "\n".join(out) + "\n"


def plot(results, path):
    """Bars of the median time per runner/variant and size, one panel per mode (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in results["results"]))
    sizes = list(dict.fromkeys(r["size"] for r in results["results"]))
    labels = list(dict.fromkeys(_label(r) for r in results["results"] if r["median_s"]))
    fig, axes = plt.subplots(
        len(modes),
        1,
        figsize=(max(8, 1.2 * len(sizes) * len(labels) / 4), 4.5 * len(modes)),
        squeeze=False,
    )
    width = 0.8 / max(len(labels), 1)
    cmap = plt.get_cmap("tab20")
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        for k, label in enumerate(labels):
            xs, ys = [], []
            for j, size in enumerate(sizes):
                row = next(
                    (
                        r
                        for r in results["results"]
                        if r["mode"] == mode
                        and r["size"] == size
                        and _label(r) == label
                        and r["median_s"]
                    ),
                    None,
                )
                if row is not None:
                    xs.append(j + (k - len(labels) / 2 + 0.5) * width)
                    ys.append(1e3 * row["median_s"])
            ax.bar(xs, ys, width, label=label, color=cmap(k % 20))
        ax.set_yscale("log")
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels(sizes)
        ax.set_ylabel("median time (ms, log)")
        ax.set_title(
            f"{MODE_LABEL.get(mode, mode)}, {results['meta']['config']['dtype']}, "
            f"{results['meta']['config']['device']}"
        )
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0, 0].legend(
        fontsize=7, ncol=3, loc="upper left", bbox_to_anchor=(0, -0.08 - 0.0 * len(modes))
    )
    handles, names = axes[0, 0].get_legend_handles_labels()
    axes[0, 0].get_legend().remove()
    fig.legend(handles, names, fontsize=7, ncol=4, loc="lower center")
    fig.tight_layout(rect=(0, 0.04 + 0.012 * (len(labels) // 4 + 1), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
        plot(results, paths["png"])
    return paths
