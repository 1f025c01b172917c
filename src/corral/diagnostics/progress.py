"""``corral.progress(futures)``: one progress bar per task group while futures run.

In a terminal the bars are drawn with `rich <https://rich.readthedocs.io>`_
and the call returns once every future is done (finished, erred or
cancelled).  In a Jupyter notebook an HTML table of bars is displayed and
updated in place until they are done.  Groups are key prefixes
(``inc-1a2b`` -> ``inc``), as on the dashboard.  The client's own future
states are read (no message to the scheduler); a future that failed counts
as done and is shown as erred.  From a coroutine (an asynchronous client),
``await corral.progress(futures)``.

Example::

    futures = client.map(inc, range(1000)) + client.map(double, range(500))
    corral.progress(futures)
    #   inc     ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 1000/1000  0 erred  0:00:02
    #   double  ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━  500/500   0 erred  0:00:02
"""

from __future__ import annotations

import asyncio
import html
import time
from collections.abc import Iterable
from typing import Any

from ..scheduler.state import key_prefix

#: Future statuses that count as failed.
FAILED = frozenset({"error", "lost", "cancelled"})


def _flatten(objs: Iterable[Any]) -> list[Any]:
    from ..client.future import Future

    out: list[Any] = []
    stack = list(objs)[::-1]
    while stack:
        obj = stack.pop()
        if isinstance(obj, Future):
            out.append(obj)
        elif isinstance(obj, dict):
            stack.extend(list(obj.values())[::-1])
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(list(obj)[::-1])
        else:
            raise TypeError(
                f"progress() takes futures (or lists/dicts of them), not {type(obj).__name__}"
            )
    return list({f.key: f for f in out}.values())


class ProgressBars:
    """Counts per task group of a set of futures; renders as text, rich or HTML.

    Example::

        bars = ProgressBars(futures)
        bars.update()
        bars.groups["inc"]     # {"total": 10, "done": 7, "erred": 1}
    """

    def __init__(self, futures: Iterable[Any], multi: bool = True) -> None:
        self.futures = _flatten(futures)
        self.multi = multi
        self.started = time.monotonic()
        self.groups: dict[str, dict[str, int]] = {}
        for f in self.futures:
            name = key_prefix(f.key) if multi else "total"
            row = self.groups.setdefault(name, {"total": 0, "done": 0, "erred": 0})
            row["total"] += 1
        self.update()

    def update(self) -> bool:
        """Count again; ``True`` once every future is done."""
        for row in self.groups.values():
            row["done"] = row["erred"] = 0
        for f in self.futures:
            row = self.groups[key_prefix(f.key) if self.multi else "total"]
            status = f.status
            if status == "finished":
                row["done"] += 1
            elif status in FAILED:
                row["done"] += 1
                row["erred"] += 1
        return self.finished

    @property
    def finished(self) -> bool:
        return all(r["done"] == r["total"] for r in self.groups.values())

    def __repr__(self) -> str:
        rows = ", ".join(f"{g}: {r['done']}/{r['total']}" for g, r in self.groups.items())
        return f"<ProgressBars {rows}>"

    def _repr_html_(self) -> str:
        cells = []
        for name, r in self.groups.items():
            total = r["total"] or 1
            ok = 100 * (r["done"] - r["erred"]) / total
            bad = 100 * r["erred"] / total
            bar = (
                "<div style='display:flex;width:320px;height:14px;background:#eee;"
                "border-radius:3px;"
                "overflow:hidden'>"
                f"<div style='width:{ok:.1f}%;background:#3a9d5d'></div>"
                f"<div style='width:{bad:.1f}%;background:#d62728'></div></div>"
            )
            erred = f" ({r['erred']} erred)" if r["erred"] else ""
            cells.append(
                f"<tr><td style='text-align:left'><code>{html.escape(name)}</code></td>"
                f"<td>{bar}</td>"
                f"<td style='text-align:right'>{r['done']} / {r['total']}{erred}</td></tr>"
            )
        elapsed = time.monotonic() - self.started
        return f"<table>{''.join(cells)}</table><small>{elapsed:.1f}s</small>"


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def progress(
    *futures: Any,
    notebook: bool | None = None,
    multi: bool = True,
    complete: bool = True,
    interval: float = 0.1,
    console: Any = None,
) -> Any:
    """Show progress bars (one per task group with ``multi``) until ``futures`` are done.

    ``notebook``: HTML in Jupyter (default: detected); ``complete=False``
    clears the bars when done (terminal); ``console``: a ``rich.console.Console``
    to draw on (default: rich's console on standard output).
    Returns ``None``; inside a running event loop, a coroutine to await.
    """
    bars = ProgressBars(futures, multi=multi)
    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    if notebook is None:
        notebook = _in_notebook()
    if in_loop:
        return _progress_async(bars, interval, complete, console, notebook)
    if notebook:
        _notebook(bars, interval)
        return None
    _terminal(bars, interval, complete, console)
    return None


def _rich_progress(bars: ProgressBars, complete: bool, console: Any) -> tuple[Any, dict[str, Any]]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    width = max(len(g) for g in bars.groups) if bars.groups else 5
    bar = Progress(
        TextColumn(f"{{task.description:<{width}}}"),
        BarColumn(complete_style="green", finished_style="green"),
        MofNCompleteColumn(),
        TextColumn("[red]{task.fields[erred]} erred[/]"),
        TimeElapsedColumn(),
        console=console,
        transient=not complete,
    )
    ids = {g: bar.add_task(g, total=r["total"], erred=0) for g, r in bars.groups.items()}
    return bar, ids


def _refresh(bar: Any, ids: dict[str, Any], bars: ProgressBars) -> None:
    for g, r in bars.groups.items():
        bar.update(ids[g], completed=r["done"], erred=r["erred"])


def _terminal(bars: ProgressBars, interval: float, complete: bool, console: Any) -> None:
    bar, ids = _rich_progress(bars, complete, console)
    with bar:
        while not bars.update():
            _refresh(bar, ids, bars)
            time.sleep(interval)
        _refresh(bar, ids, bars)


async def _progress_async(
    bars: ProgressBars, interval: float, complete: bool, console: Any, notebook: bool
) -> None:
    if notebook:
        from IPython.display import HTML, display

        handle = display(HTML(bars._repr_html_()), display_id=True)
        while not bars.update():
            await asyncio.sleep(interval)
            handle.update(HTML(bars._repr_html_()))
        handle.update(HTML(bars._repr_html_()))
        return
    bar, ids = _rich_progress(bars, complete, console)
    with bar:
        while not bars.update():
            _refresh(bar, ids, bars)
            await asyncio.sleep(interval)
        _refresh(bar, ids, bars)


def _notebook(bars: ProgressBars, interval: float) -> None:
    from IPython.display import HTML, display

    handle = display(HTML(bars._repr_html_()), display_id=True)
    while not bars.update():
        time.sleep(interval)
        handle.update(HTML(bars._repr_html_()))
    handle.update(HTML(bars._repr_html_()))
