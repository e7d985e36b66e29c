"""Charts of the bench results: one PNG per bench whose JSON is found.

    kernel_ops.json GB/s vs density per N and method (SDDMM, scatter), with the copy bandwidth
    train.json    held for backward over the floor (MiB) and step time vs PEFT LoRA, per
                  variant and model size, compiled rows
    switch.json   time of one adapter switch per method (log scale)
    quality.json  accuracy mean ± std over seeds per method and budget, one panel per task
    mixed.json    mixed-batch inference: throughput vs the base model and tokens/s per method
                  and number of distinct adapters in the batch
    quantized.json  held for backward, step peak and step time vs QLoRA per method on 4-bit
                  bases (architecture, width and rank x mode; failed rows left blank), and the MiniLM-4bit
                  accuracy mean ± std per method

Each chart is titled with the machine the JSON describes. A missing file is skipped with a
note; a malformed one stops with an error naming it.

    python -m bench.plot                                   # bench/results/*.json -> *.png
    python -m bench.plot --results /tmp/r --out /tmp/r
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from collections.abc import Callable
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.common import RESULTS, BenchParser, describe

NAN = float("nan")


class MalformedResults(ValueError):
    """A results JSON that cannot be plotted; the message names the file."""


def new_figure(ncols: int, width: float, height: float) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg whatever pyplot's backend is
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def title(fig: Figure, what: str, data: dict) -> None:
    fig.suptitle(f"{what}\n{describe(data['machine'])}", fontsize=10)


def num(x: Any) -> float:
    """A value to plot: None (a missing ratio in the JSON) becomes NaN, which is left blank."""
    return NAN if x is None else float(x)


def grouped_bars(ax, groups: list[str], series: dict[str, list[float]],
                 errors: dict[str, list[float]] | None = None) -> None:
    """Bars of each series side by side within each group."""
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=name, yerr=None if errors is None else errors[name],
               capsize=2 if errors else 0)
    ax.set_xticks(range(len(groups)), groups)


def plot_kernels(data: dict) -> Figure:
    rows = data["rows"]
    ops = [op for op in ("sddmm", "scatter") if any(r["op"] == op for r in rows)]
    if not ops:
        raise ValueError("no sddmm or scatter rows")
    fig, axes = new_figure(len(ops), 7 * len(ops), 5)
    markers = "osD^v<>px*"
    sizes = sorted({r["size"] for r in rows})
    bw = data.get("copy_bandwidth_GB_per_s")
    for ax, op in zip(axes, ops, strict=True):
        mine = [r for r in rows if r["op"] == op]
        methods = list(dict.fromkeys(r["method"] for r in mine))
        for ci, method in enumerate(methods):
            for si, n in enumerate(sizes):
                pts = sorted((r["density"] * 100, r["GB_per_s"]) for r in mine
                             if r["method"] == method and r["size"] == n)
                if pts:
                    ax.plot(*zip(*pts, strict=True), color=f"C{ci}", marker=markers[si % len(markers)],
                            label=f"{method}, N={n}")
        if bw:
            ax.axhline(bw, color="grey", linestyle="--", label=f"copy bandwidth ({bw:.1f} GB/s)")
        ax.set_yscale("log")
        ax.set_xlabel("density (%)")
        ax.set_ylabel("GB/s (bytes the op must move / time)")
        ax.set_title("masked gradient (SDDMM)" if op == "sddmm" else "scatter W.flat[idx] = base + delta")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    title(fig, "Kernels", data)
    return fig


def plot_train(data: dict) -> Figure:
    sizes = data["sizes"]
    groups = [f"hidden {s['hidden']} x {s['layers']}" + (f", r={s['r']}" if "r" in s else "") for s in sizes]
    compiled = [{r["variant"]: r for r in s["rows"] if r["mode"] == "compiled"} for s in sizes]
    variants = list(dict.fromkeys(v for rows in compiled for v in rows))
    if not variants:
        raise ValueError("no compiled rows")
    fig, axes = new_figure(2, 14, 5)
    metrics = (("held_for_backward_over_floor_MiB", "held for backward over the floor (MiB)"),
               ("step_ms_vs_lora", "step time / PEFT LoRA's"))
    for ax, (key, label) in zip(axes, metrics, strict=True):
        series = {v: [num(rows[v][key]) if v in rows else NAN for rows in compiled] for v in variants}
        grouped_bars(ax, groups, series)
        ax.set_ylabel(label)
        ax.set_title(f"{label}, compiled")
        ax.grid(True, axis="y", alpha=0.3)
        if key == "step_ms_vs_lora":
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.legend(fontsize=7)
    title(fig, "Training step (compiled rows)", data)
    return fig


def plot_switch(data: dict) -> Figure:
    switch = data["switch_ms"]
    if not switch:
        raise ValueError("switch_ms is empty")
    names, ms = list(switch), [float(v) for v in switch.values()]
    fig, (ax,) = new_figure(1, 9, 0.5 * len(names) + 1.5)
    ax.barh(range(len(names)), ms, color=[f"C{i}" for i in range(len(names))])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ms per switch (log scale)")
    for i, v in enumerate(ms):
        ax.text(v, i, f" {v:.3g} ms", va="center", fontsize=8)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    args = data.get("args", {})
    what = (f"Adapter switch: Llama hidden {args.get('hidden')}, {args.get('layers')} layers, "
            f"{data.get('nnz', 0):,} values/adapter, PEFT r={data.get('peft_r')}")
    title(fig, what, data)
    return fig


def plot_quality(data: dict) -> Figure:
    acc: dict[str, dict[str, dict[str, list[float]]]] = {}  # task -> budget -> method -> accuracies
    for key, values in data["accuracy"].items():
        task, budget, method = key.split("|")
        acc.setdefault(task, {}).setdefault(budget, {})[method] = [float(v) for v in values]
    if not acc:
        raise ValueError("accuracy is empty")
    density = data.get("density", {})
    fig, axes = new_figure(len(acc), 7 * len(acc), 5)
    for ax, (task, by_budget) in zip(axes, acc.items(), strict=True):
        methods = list(dict.fromkeys(m for b in by_budget.values() for m in b))
        series, errors = {}, {}
        for budget, by_method in by_budget.items():
            d = density.get(budget)
            name = f"r={budget}" + (f" ({d * 100:.2f} %)" if d is not None else "")
            vals = [by_method.get(m, []) for m in methods]
            series[name] = [statistics.mean(v) if v else NAN for v in vals]
            errors[name] = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        grouped_bars(ax, methods, series, errors)
        spans = [(m - e, m + e) for s in series for m, e in zip(series[s], errors[s], strict=True)
                 if not math.isnan(m)]
        lo, hi = min((a for a, _ in spans), default=0.0), max((b for _, b in spans), default=1.0)
        ax.set_ylim(max(0.0, lo - 0.05), min(1.0, hi + 0.04))
        ax.tick_params(axis="x", labelsize=8, rotation=20)
        ax.set_ylabel("accuracy (mean ± std over seeds)")
        ax.set_title(task)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, title="budget", title_fontsize=8)
    title(fig, "Quality: SHiRA masks vs LoRA at equal trainable parameters", data)
    return fig


def plot_mixed(data: dict) -> Figure:
    rows = [r for r in data["rows"] if r["distinct"] is not None]
    if not rows:
        raise ValueError("no rows with adapters")
    counts = sorted({r["distinct"] for r in rows})
    variants = list(dict.fromkeys((r["method"], r["mode"]) for r in rows))
    got = {(r["method"], r["mode"], r["distinct"]): r for r in rows}
    base = {r["mode"]: r for r in data["rows"] if r["distinct"] is None}
    fig, axes = new_figure(2, 15, 5.5)
    groups = [f"{k} distinct" for k in counts]
    metrics = (("vs_base", "throughput / the base model's (same mode)"), ("tokens_per_s", "tokens/s"))
    for ax, (key, label) in zip(axes, metrics, strict=True):
        series = {f"{m} ({mode})": [num(got[m, mode, k][key]) if (m, mode, k) in got else NAN for k in counts]
                  for m, mode in variants}
        grouped_bars(ax, groups, series)
        if key == "vs_base":
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
            ax.axhline(0.8, color="C3", linestyle=":", linewidth=0.8, label="target 0.8x (per_request)")
        else:
            for i, (mode, r) in enumerate(base.items()):
                ax.axhline(num(r["tokens_per_s"]), color="grey", linestyle="--" if i == 0 else "-.",
                           linewidth=0.8, label=f"base model ({mode})")
        ax.set_ylabel(label)
        ax.set_xlabel("distinct adapters in the batch (rows round-robin)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=6)
    args = data.get("args", {})
    what = (f"Mixed-batch inference: Llama hidden {args.get('hidden')}, {args.get('layers')} layers, "
            f"batch {args.get('batch')}x{args.get('seq')}, {args.get('adapters')} adapters loaded "
            f"(r={args.get('r')})")
    title(fig, what, data)
    return fig


def plot_quantized(data: dict) -> Figure:
    rows = [r for a in data["archs"] for r in a["rows"]]
    if not rows:
        raise ValueError("no rows")
    def group(r: dict) -> str:  # (rows of older runs name no hidden size or rank)
        shape = f" {r['hidden']} r={r['r']}" if "hidden" in r else ""
        return f"{r['arch']}{shape} {r['mode']}"

    groups = list(dict.fromkeys(group(r) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(group(r), r["method"]): r for r in rows}
    minilm = data.get("minilm")
    metrics = (("held_for_backward_MiB", "held for backward (MiB)"), ("step_peak_MiB", "step peak (MiB)"),
               ("step_ms_vs_qlora", "step time / QLoRA's"))
    panels = len(metrics) + (minilm is not None)
    fig, axes = new_figure(panels, 5.5 * panels, 5)
    for ax, (key, label) in zip(axes, metrics, strict=False):
        series = {m: [num(by.get((g, m), {}).get(key)) for g in groups] for m in methods}
        grouped_bars(ax, groups, series)
        width = 0.8 / max(1, len(methods))
        for k, m in enumerate(methods):  # a row that could not run says so where its bar would be
            for gi, g in enumerate(groups):
                if "error" in by.get((g, m), {}):
                    ax.text(gi + (k - (len(methods) - 1) / 2) * width, 0, " failed", rotation=90,
                            ha="center", va="bottom", fontsize=7, color=f"C{k}")
        ax.tick_params(axis="x", labelsize=8, rotation=15)
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(True, axis="y", alpha=0.3)
        if key == "step_ms_vs_qlora":
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.legend(fontsize=7)
    if minilm is not None:
        ax = axes[-1]
        summary = minilm["summary"]
        names = list(summary)
        means = [summary[m]["mean"] * 100 for m in names]
        stds = [summary[m]["std"] * 100 for m in names]
        # each method in its colour of the other panels
        colors = [f"C{methods.index(m) if m in methods else len(methods) + i}" for i, m in enumerate(names)]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=colors)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        spans = [(m - e, m + e) for m, e in zip(means, stds, strict=True)]
        lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        ax.set_ylim(max(0.0, lo - 5), min(100.0, hi + 3))
        ax.set_ylabel("test accuracy % (mean ± std over seeds)")
        ax.set_title(f"MiniLM-L6 4-bit, {minilm['task']}")
        ax.grid(True, axis="y", alpha=0.3)
    args = data.get("args", {})
    shape = "" if "hidden" in rows[0] else f"hidden {args.get('hidden')}, r={args.get('r')}, "
    title(fig, f"4-bit NF4 bases (bitsandbytes): {shape}{args.get('layers')} layers, batch "
               f"{args.get('batch')}x{args.get('seq')}, compiled = {args.get('compiler')}", data)
    return fig


PLOTS: dict[str, Callable[[dict], Figure]] = {
    "kernel_ops": plot_kernels, "train": plot_train, "switch": plot_switch, "quality": plot_quality,
    "mixed": plot_mixed, "quantized": plot_quantized}


def load(path: str, bench: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MalformedResults(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise MalformedResults(f"{path}: expected a JSON object, got {type(data).__name__}")
    if data.get("bench", bench) != bench:
        raise MalformedResults(f"{path}: holds results of bench {data['bench']!r}, not {bench!r}")
    return data


def main(argv: list[str] | None = None) -> list[str]:
    p = BenchParser("plot", __doc__, smoke=None)
    p.add_argument("--results", default=RESULTS, help="folder holding <bench>.json (default %(default)s)")
    p.add_argument("--out", default=None, help="folder for <bench>.png (default: --results)")
    args = p.parse(argv)
    out_dir = args.out or args.results
    written = []
    for bench, plot in PLOTS.items():
        path = os.path.join(args.results, f"{bench}.json")
        if not os.path.exists(path):
            print(f"skip {bench}: no {path}", file=sys.stderr)
            continue
        data = load(path, bench)
        try:
            fig = plot(data)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise MalformedResults(f"{path}: cannot plot it as {bench} results "
                                   f"({type(e).__name__}: {e})") from e
        os.makedirs(out_dir, exist_ok=True)
        png = os.path.join(out_dir, f"{bench}.png")
        fig.savefig(png, dpi=120)
        written.append(png)
        print(f"wrote {png}", file=sys.stderr)
    return written


if __name__ == "__main__":
    main()
