"""Turn result records into the table, ``results.json`` and ``results.png``.

A *record* is the dict printed by :mod:`benchmarks.runone` (or made by the
runner for errors and skips).  Values are shown per backend; the ratio
column is Corral against the best dask backend, oriented so that >1 means
Corral is better; the target column says whether Corral met its goal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.backends import BACKENDS
from benchmarks.spec import MetricSpec, Verdict, Workload, best_dask, oriented_ratio

#: Table columns for backends, in display order.
BACKEND_COLUMNS: tuple[str, ...] = ("corral", "dask", "dask-inf")
_MAX_ERROR_CHARS = 80


@dataclass
class Row:
    """One table line: a metric of a workload across the backends."""

    workload: str
    metric: str
    unit: str
    higher_is_better: bool
    values: dict[str, float | None]
    cells: dict[str, str]
    ratio: float | None
    target: str
    verdict: Verdict | None


def add_derived_metrics(records: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Fill in metrics computed across workloads (in place).

    ``map_noop_100k.cost_vs_map_noop`` is the per-task cost of the large map
    divided by that of ``map_noop`` on the same backend (>1 means it got
    more expensive per task at the larger size).
    """
    for backend in BACKENDS:
        small = records.get((backend, "map_noop"))
        large = records.get((backend, "map_noop_100k"))
        if not (small and large and small["status"] == "ok" and large["status"] == "ok"):
            continue
        small_tps = small["metrics"].get("tasks_per_s")
        large_tps = large["metrics"].get("tasks_per_s")
        if small_tps and large_tps:
            large["metrics"]["cost_vs_map_noop"] = small_tps / large_tps


def format_value(value: float) -> str:
    """Format a metric value compactly (about three significant digits)."""
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _cell(
    record: Mapping[str, Any] | None, spec: MetricSpec, selected: bool, applies: bool
) -> tuple[float | None, str]:
    """Return ``(value, text)`` for one backend's cell."""
    if not applies:
        return None, "n/a: not applicable"
    if not selected or record is None:
        return None, "-"
    if record["status"] != "ok":
        reason = str(record.get("error") or record["status"])
        if len(reason) > _MAX_ERROR_CHARS:
            reason = reason[: _MAX_ERROR_CHARS - 3] + "..."
        return None, f"n/a: {reason}"
    value = record.get("metrics", {}).get(spec.key)
    if value is None:
        why = "needs map_noop" if spec.derived else "missing"
        return None, f"n/a: {why}"
    return float(value), format_value(float(value))


def build_rows(
    workloads: Sequence[Workload],
    records: Mapping[tuple[str, str], Mapping[str, Any]],
    selected_backends: Sequence[str],
) -> list[Row]:
    """Build one :class:`Row` per (workload, metric)."""
    rows: list[Row] = []
    for workload in workloads:
        for spec in workload.metrics:
            values: dict[str, float | None] = {}
            cells: dict[str, str] = {}
            for backend in BACKEND_COLUMNS:
                value, text = _cell(
                    records.get((backend, workload.name)),
                    spec,
                    backend in selected_backends,
                    workload.applies_to(backend),
                )
                values[backend] = value
                cells[backend] = text
            ratio = None
            corral = values.get("corral")
            best = best_dask(values, spec.higher_is_better)
            if spec.compare and corral and best:
                ratio = oriented_ratio(corral, best, spec.higher_is_better)
            target, verdict = "", None
            if spec.target is not None:
                verdict = spec.target.evaluate(values, spec.higher_is_better)
                target = f"{spec.target.text}: {verdict}"
            rows.append(
                Row(
                    workload=workload.name,
                    metric=f"{spec.label} ({spec.unit})",
                    unit=spec.unit,
                    higher_is_better=spec.higher_is_better,
                    values=values,
                    cells=cells,
                    ratio=ratio,
                    target=target,
                    verdict=verdict,
                )
            )
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """Return the rows as an aligned, pipe-separated text table."""
    header = [
        "workload",
        "metric",
        *(BACKENDS[b].label for b in BACKEND_COLUMNS),
        "ratio vs best dask",
        "target",
    ]
    lines = [
        [
            row.workload,
            row.metric,
            *(row.cells[b] for b in BACKEND_COLUMNS),
            f"{row.ratio:.2f}x" if row.ratio is not None else "-",
            row.target or "-",
        ]
        for row in rows
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines, strict=True)]

    def fmt(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), separator, *(fmt(line) for line in lines)])


def write_json(
    path: Path,
    meta: Mapping[str, Any],
    records: Iterable[Mapping[str, Any]],
    rows: Sequence[Row],
) -> None:
    """Write ``results.json``: run metadata, raw records and the table rows."""
    payload = {"meta": dict(meta), "records": list(records), "table": [asdict(r) for r in rows]}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


_COLORS = {"corral": "#2a9d8f", "dask": "#e76f51", "dask-inf": "#f4a261"}


def write_png(path: Path, rows: Sequence[Row], title: str) -> None:
    """Write a bar chart with one panel per metric and one bar per backend.

    Missing values are shown as "n/a" in place of a bar.  Uses matplotlib's
    Agg backend, so no display is needed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows_to_plot = [r for r in rows if any(v is not None for v in r.values.values())]
    ncols = 4
    nrows = max(1, math.ceil(len(rows_to_plot) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False)
    labels = [BACKENDS[b].label.replace(" (", "\n(") for b in BACKEND_COLUMNS]
    for ax, row in zip(axes.flat, rows_to_plot, strict=False):
        heights = [row.values[b] or 0.0 for b in BACKEND_COLUMNS]
        bars = ax.bar(labels, heights, color=[_COLORS[b] for b in BACKEND_COLUMNS])
        top = max(heights) or 1.0
        for bar, backend, height in zip(bars, BACKEND_COLUMNS, heights, strict=True):
            if row.values[backend] is not None:
                text = format_value(height)
            else:
                text = "not run" if row.cells[backend] == "-" else "n/a"
            ax.text(
                bar.get_x() + bar.get_width() / 2,
                height + top * 0.02,
                text,
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_ylim(0, top * 1.2)
        better = "higher" if row.higher_is_better else "lower"
        verdict = f" [{row.verdict}]" if row.verdict in ("met", "missed") else ""
        ax.set_title(f"{row.workload}{verdict}\n{row.metric}, {better} is better", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(rows_to_plot) :]:
        ax.axis("off")
    if not rows_to_plot:
        axes.flat[0].text(0.5, 0.5, "no results", ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
