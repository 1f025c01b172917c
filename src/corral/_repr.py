"""Readable summaries of a cluster, for ``repr()`` and Jupyter (``_repr_html_``)."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any


def format_bytes(n: float | None) -> str:
    """``1536`` -> ``"1.50 KiB"``; ``0``/``None`` -> ``"0 B"``."""
    if not n:
        return "0 B"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"  # pragma: no cover


def format_offer(resources: Mapping[str, Any] | None) -> str:
    """``{"GPU": 2.0, "MEM": [0, 1]}`` -> ``"GPU=2, MEM=[0,1]"``; empty -> ``"-"``."""
    if not resources:
        return "-"
    parts = []
    for name, value in resources.items():
        if isinstance(value, list | tuple):
            parts.append(f"{name}=[{','.join(str(v) for v in value)}]")
        elif isinstance(value, float) and value.is_integer():
            parts.append(f"{name}={int(value)}")
        else:
            parts.append(f"{name}={value}")
    return ", ".join(parts)


def summarize(workers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Totals of ``scheduler_info()["workers"]``: workers, threads, memory, resources."""
    totals: dict[str, float] = {}
    for w in workers.values():
        for name, value in (w.get("resources") or {}).items():
            amount = len(value) if isinstance(value, list | tuple) else float(value)
            totals[name] = totals.get(name, 0.0) + amount
    return {
        "workers": len(workers),
        "threads": sum(int(w.get("nthreads", 0)) for w in workers.values()),
        "memory": sum(int(w.get("memory_limit") or 0) for w in workers.values()),
        "resources": totals,
    }


def cluster_html(
    title: str,
    address: str | None,
    workers: Mapping[str, Mapping[str, Any]] | None,
    dashboard: str | None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """An HTML card: address, dashboard link, totals and one row per worker."""
    e = html.escape
    rows = [
        "<tr><th style='text-align:left'>Scheduler</th>"
        f"<td><code>{e(str(address))}</code></td></tr>"
    ]
    if dashboard:
        rows.append(
            "<tr><th style='text-align:left'>Dashboard</th>"
            f"<td><a href='{e(dashboard)}' target='_blank'>{e(dashboard)}</a></td></tr>"
        )
    for k, v in (extra or {}).items():
        rows.append(f"<tr><th style='text-align:left'>{e(str(k))}</th><td>{e(str(v))}</td></tr>")
    out = [f"<div><h3 style='margin:4px 0'>{e(title)}</h3><table>{''.join(rows)}</table>"]
    if workers is not None:
        s = summarize(workers)
        out.append(
            f"<p>{s['workers']} workers, {s['threads']} threads, "
            f"{e(format_bytes(s['memory']))} memory"
            + (f", resources {e(format_offer(s['resources']))}" if s["resources"] else "")
            + "</p>"
        )
        if workers:
            head = "".join(
                f"<th style='text-align:left'>{h}</th>"
                for h in ("name", "address", "threads", "memory limit", "resources", "environments")
            )
            body = []
            for addr, w in workers.items():
                cells = (
                    str(w.get("name", "")),
                    f"<code>{e(addr)}</code>",
                    str(w.get("nthreads", "")),
                    format_bytes(w.get("memory_limit")),
                    format_offer(w.get("resources")),
                    ", ".join(w.get("environments") or []) or "-",
                )
                body.append(
                    "<tr>"
                    + "".join(f"<td>{c if c.startswith('<code>') else e(c)}</td>" for c in cells)
                    + "</tr>"
                )
            out.append(f"<table><tr>{head}</tr>{''.join(body)}</table>")
    out.append("</div>")
    return "".join(out)
