"""Charts for docs/ from the benchmark results: `make plots` (python -m bench.plots).

    python -m bench.plots                                  # bench/results/*.json -> docs/img/*.png
    python -m bench.plots --results /tmp/r --img /tmp/img  # elsewhere

One PNG per results file that exists (a missing one is skipped with a message):
- precision.json -> precision_memory.png: weights, predicted and measured peak by precision, per model;
- llm.json -> llm_throughput.png: decode tokens/s by precision at batch 1 (gRPC and in-process) and
  with 16 concurrent streams, and time to first token, against the targets of issue 4;
- compat.json -> compat_matrix.png: per card size, each server's measured peak and budget as a share
  of the card, the plans auto chose, and whether the video completed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

GiB = 2**30
CARDS = (8, 12, 16, 24)  # GiB lines on the memory chart
COLORS = {"weights": "#c7d4e8", "predicted": "#7f9fcc", "measured": "#2f4f8f", "llm": "#3b7dd8"}
COLORS["measured (live tensors + CUDA context)"] = COLORS["measured"]
COLORS |= {"video": "#e08a2e", "in-process": "#9bbde9", "grpc": "#2f4f8f", "ok": "#2e8b57", "bad": "#c0392b"}


def _bars(ax: Any, labels: list[str], series: dict[str, list[float | None]], unit: str = "") -> None:
    """Grouped vertical bars, one group per label, each value written above its bar."""
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        heights = [v or 0.0 for v in values]
        bars = ax.bar(xs, heights, width, label=name, color=COLORS.get(name))
        texts = ["-" if v is None else f"{v:,.0f}{unit}" if v >= 100 else f"{v:.3g}{unit}" for v in values]
        ax.bar_label(bars, texts, fontsize=7, padding=1)
    crowded = len(labels) > 6
    ax.set_xticks(range(len(labels)), labels, fontsize=7 if crowded else 8, rotation=60 if crowded else 0)
    ax.margins(y=0.15)


def plot_precision(data: dict[str, Any], out: Path) -> Path:
    """Weights, predicted and measured peak (GiB) by precision, one panel per model."""
    ok = [
        r for r in data["records"] if "error" not in r and not r.get("simulated") and r.get("weights_bytes")
    ]
    models = list(dict.fromkeys(r["model"] for r in ok))
    fig = Figure(figsize=(6.5 * len(models), 4.8), layout="constrained")
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models, strict=True):
        rows = [r for r in ok if r["model"] == model]
        labels = [r["precision"].replace("+keep_fp32=", "\n+fp32 ") for r in rows]
        _bars(
            ax,
            labels,
            {
                "weights": [r["weights_bytes"] / GiB for r in rows],
                "predicted": [r["predicted_peak_bytes"] / GiB for r in rows],
                "measured (live tensors + CUDA context)": [r["measured_peak_bytes"] / GiB for r in rows],
            },
        )
        top = max(r["measured_peak_bytes"] for r in rows) / GiB
        ax.set_xlim(-0.6, len(rows) - 0.1)  # room on the right for the card labels
        for card in (c for c in CARDS if c < top * 1.15):
            ax.axhline(card, color="grey", linestyle=":", linewidth=0.8, zorder=0)
            ax.annotate(
                f"{card} GiB", (len(rows) - 0.15, card), fontsize=7, color="grey", ha="right", va="bottom"
            )
        ax.set_title(model, fontsize=10)
        ax.set_ylabel("GiB")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle(
        f"Peak memory by precision: predicted before loading vs measured ({data['gpu']}, {data['date']})",
        fontsize=10,
    )
    return _save(fig, out)


def plot_llm(data: dict[str, Any], out: Path) -> Path:
    """Each precision's latest build: tokens/s at batch 1 (gRPC vs in-process) and at the concurrency
    measured, and the TTFT of the long prompt. docs/BENCHMARKS.md's table keeps the history."""
    ok = [r for r in data["records"] if "error" not in r and not r.get("label")]
    latest: dict[str, str] = {}  # precision -> the commit of its last record (records are appended)
    for r in ok:
        latest[r["precision"]] = r.get("commit", "")
    precisions = list(latest)

    def value(precision: str, path: str, phase: str, key: str) -> float | None:
        found = [
            r[key]
            for r in ok
            if (r["precision"], r.get("commit", ""), r.get("path"), r.get("phase"))
            == (precision, latest[precision], path, phase)
        ]
        return found[-1] if found else None

    fig = Figure(figsize=(12, 4.6), layout="constrained")
    decode, concurrent, ttft = fig.subplots(1, 3)
    series: dict[str, list[float | None]] = {"grpc": [], "in-process": []}
    batched: dict[str, list[float | None]] = {"grpc": []}
    first: dict[str, list[float | None]] = {"grpc": []}
    streams = 0
    for p in precisions:
        series["grpc"].append(value(p, "grpc", "decode", "tokens_per_s"))
        series["in-process"].append(value(p, "in-process", "decode", "tokens_per_s"))
        batched["grpc"].append(value(p, "grpc", "concurrent", "tokens_per_s"))
        first["grpc"].append(value(p, "grpc", "ttft", "ttft_ms_p50"))
        streams = streams or int(value(p, "grpc", "concurrent", "concurrency") or 0)
    panels = (
        (decode, series, "batch 1: decode tokens/s", 250.0),
        (concurrent, batched, f"{streams or '?'} concurrent streams: total tokens/s", 2500.0),
        (ttft, first, "time to first token, 512-token prompt: ms (p50)", 60.0),
    )
    names = [f"{p}\n{latest[p]}" for p in precisions]
    for ax, values, title, target in panels:
        _bars(ax, names, values)
        ax.axhline(target, color=COLORS["bad"], linestyle="--", linewidth=0.9, label=f"target {target:g}")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"LLM server over gRPC ({data['gpu']}, {data['date']})", fontsize=10)
    return _save(fig, out)


def plot_compat(data: dict[str, Any], out: Path) -> Path:
    """Per card: each server's peak (solid) and budget (outline) as a share of the card, and the outcome."""
    records = sorted(data["records"], key=lambda r: r["card_gb"])
    fig = Figure(figsize=(14, 0.9 * len(records) + 1.4), layout="constrained")
    ax = fig.subplots()
    for y, r in enumerate(records):
        card = r.get("card_bytes") or r["card_gb"] * GiB
        left = 0.0
        for name in ("llm", "video"):
            budget = (r.get(f"{name}_budget_bytes") or 0) / card
            peak = (r.get(f"{name}_peak_bytes") or 0) / card
            ax.barh(
                y,
                peak,
                left=left,
                height=0.5,
                color=COLORS[name],
                label=f"{name} peak (allocated)" if y == 0 else None,
            )
            ax.barh(
                y,
                budget,
                left=left,
                height=0.7,
                fill=False,
                edgecolor=COLORS[name],
                linestyle="--",
                label=f"{name} budget" if y == 0 else None,
            )
            left += budget
        if r.get("completed"):
            text, color = f"completed in {r.get('seconds')} s", COLORS["ok"]
        else:
            text, color = _failure(r), COLORS["bad"]
        plans = f"llm {r.get('llm_plan') or '-'} | video {r.get('video_plan') or '-'}"
        if r.get("llm_peak_bytes") and r.get("video_peak_bytes"):
            llm, video = r["llm_peak_bytes"] / GiB, r["video_peak_bytes"] / GiB
            plans += f"\npeaks {llm:.1f} + {video:.1f} = {llm + video:.1f} GiB"
        ax.annotate(
            f"{text}\n{plans}",
            (1.02, y),
            xycoords=("axes fraction", "data"),
            fontsize=7,
            color=color,
            va="center",
            annotation_clip=False,
        )
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(records)), [f"{r['card_gb']} GB" for r in records])
    ax.set_xlim(0, 1.05)
    ax.set_xlabel(
        "share of the card (the budgets add up to it, each with its process's CUDA context; "
        "peaks are allocated bytes)"
    )
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=5)
    fig.suptitle(
        f"LLM + video server on one card, precision=auto ({data['gpu']}, {data['date']})", fontsize=10
    )
    return _save(fig, out)


def _failure(record: dict[str, Any]) -> str:
    error = str(record.get("error") or "did not complete")
    if record.get("refusals"):
        why = [
            f"{name} ({text.split('start: ')[-1].split(';')[0]})" for name, text in record["refusals"].items()
        ]
        return "refused at start: " + ", ".join(why)
    return "failed: " + error.splitlines()[0].split(": ", 1)[-1][:90]


def _save(fig: Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    return out


PLOTS: dict[str, tuple[str, Callable[[dict[str, Any], Path], Path]]] = {
    "precision.json": ("precision_memory.png", plot_precision),
    "llm.json": ("llm_throughput.png", plot_llm),
    "compat.json": ("compat_matrix.png", plot_compat),
}


def plot_all(results: Path, img: Path) -> list[Path]:
    """Draw every chart whose results file exists; returns the PNGs written."""
    written = []
    for name, (png, plot) in PLOTS.items():
        source = results / name
        if not source.exists():
            print(f"skipped {png}: {source} does not exist")
            continue
        written.append(plot(json.loads(source.read_text()), img / png))
        print(f"wrote {written[-1]} from {source}")
    return written


def main(argv: list[str] | None = None) -> None:
    """Entry point of `make plots`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path("bench/results"))
    parser.add_argument("--img", type=Path, default=Path("docs/img"))
    args = parser.parse_args(argv)
    plot_all(args.results, args.img)


if __name__ == "__main__":
    main()
