"""Versions of Python and of the packages that must agree across a cluster.

Every process reports :func:`get_versions` (dask.distributed's layout): a
worker in its handshake and ``register_worker``, a client in its handshake.
The functions below compare those reports and render mismatches as one
readable table:

* the packages compared are Python, :data:`REQUIRED` and :data:`OPTIONAL`
  (``tblib`` is reported but not compared: it only shapes tracebacks);
* a package missing somewhere shows as ``missing``;
* the scheduler never unpickles task data, so only Python and the
  :data:`REQUIRED` packages count on the scheduler: a scheduler without NumPy
  (or with another NumPy) is not a mismatch.

Test hook (for tests only, never for production): the environment variable
``CORRAL_TEST_FAKE_VERSIONS`` holds a JSON map, e.g.
``{"numpy": "0.0.1", "pandas": null}``, that overrides what this process
reports (``null``: the package is reported missing).  Corral's own tests use
it to start a worker that looks mismatched without touching installed
packages.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ._version import __version__

__all__ = [
    "CHECKED",
    "FAKE_VERSIONS_ENV",
    "OPTIONAL",
    "REQUIRED",
    "SCHEDULER_RELEVANT",
    "VERSION_CHECK_MODES",
    "Mismatch",
    "VersionMismatchError",
    "VersionMismatchWarning",
    "check_mode",
    "compare_versions",
    "format_mismatches",
    "get_versions",
    "joining_worker_mismatches",
]

#: Packages whose versions must match everywhere (missing ones are reported as such).
REQUIRED = ("corral", "cloudpickle", "msgpack")
OPTIONAL = ("numpy", "pandas", "dask", "tblib")
#: What is compared between client, scheduler and workers.
CHECKED = ("python", *REQUIRED, "numpy", "pandas", "dask")
#: What counts on the scheduler (it runs no task code).
SCHEDULER_RELEVANT = frozenset(("python", *REQUIRED))
#: Test-only: a JSON map of package -> version (or null) overriding the report.
FAKE_VERSIONS_ENV = "CORRAL_TEST_FAKE_VERSIONS"

MISSING = "missing"
UNKNOWN = "unknown"

#: ``version_check`` values of clients and schedulers.
VERSION_CHECK_MODES = ("warn", "strict", "off")


def check_mode(mode: str, what: str = "version_check") -> str:
    """Validate a ``version_check`` value: ``"warn"``, ``"strict"`` or ``"off"``."""
    if mode not in VERSION_CHECK_MODES:
        raise ValueError(f"{what} must be one of {', '.join(VERSION_CHECK_MODES)}, not {mode!r}")
    return mode


class VersionMismatchError(ValueError):
    """Client, scheduler and workers run different versions of packages that matter.

    ``str(exc)`` is the readable table; ``exc.mismatches`` the rows.
    """

    def __init__(self, message: str, mismatches: list[Mismatch] | None = None) -> None:
        super().__init__(message)
        self.mismatches = mismatches or []


class VersionMismatchWarning(UserWarning):
    """Warned on connect (``version_check="warn"``) when versions differ."""


def _version_of(name: str) -> str | None:
    if name == "corral":
        return __version__
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def _real_versions() -> dict[str, Any]:
    python = ".".join(map(str, sys.version_info[:3]))
    return {
        "host": {
            "python": python,
            "python-bits": 64 if sys.maxsize > 2**32 else 32,
            "OS": platform.system(),
            "machine": platform.machine(),
        },
        "packages": {
            "python": python,
            **{name: _version_of(name) for name in (*REQUIRED, *OPTIONAL)},
        },
    }


def _fake_versions() -> dict[str, str | None]:
    raw = os.environ.get(FAKE_VERSIONS_ENV)
    if not raw:
        return {}
    try:
        fake = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"${FAKE_VERSIONS_ENV} is not valid JSON: {exc}") from None
    if not isinstance(fake, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in fake.items()
    ):
        raise ValueError(f"${FAKE_VERSIONS_ENV} must map package names to version strings or null")
    return fake


def get_versions(packages: Iterable[str] | None = None) -> dict[str, Any]:
    """This process's Python and package versions, in dask.distributed's layout.

    ``{"host": {"python", "python-bits", "OS", "machine"}, "packages": {name:
    version or None}}``; ``packages`` names more packages to report.
    """
    out = copy.deepcopy(_real_versions())
    for name in packages or ():
        out["packages"].setdefault(name, _version_of(name))
    fake = _fake_versions()
    if fake:
        out["packages"].update(fake)
        if "python" in fake:
            out["host"]["python"] = fake["python"]
    return out


# -- comparing ----------------------------------------------------------------------------
def _packages(versions: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not isinstance(versions, Mapping):
        return None
    packages = versions.get("packages")
    return dict(packages) if isinstance(packages, Mapping) else None


def _value(packages: Mapping[str, Any] | None, name: str) -> str:
    if packages is None:
        return UNKNOWN
    value = packages.get(name)
    return MISSING if value is None else str(value)


@dataclass
class Mismatch:
    """One package whose versions differ: each party's version (``"missing"`` if absent)."""

    package: str
    client: str
    scheduler: str
    workers: dict[str, str] = field(default_factory=dict)


def compare_versions(
    client: Mapping[str, Any] | None,
    scheduler: Mapping[str, Any] | None,
    workers: Mapping[str, Mapping[str, Any] | None],
    packages: Iterable[str] = (),
) -> list[Mismatch]:
    """The packages whose versions differ between a client, the scheduler and workers.

    Arguments are :func:`get_versions` reports (workers by address).  A
    worker without a report (a worker in another language) is left out.
    ``packages``: more package names to compare (counted like optional ones).
    """
    cp, sp = _packages(client), _packages(scheduler)
    wps = {addr: p for addr, v in workers.items() if (p := _packages(v)) is not None}
    names = list(dict.fromkeys([*CHECKED, *packages]))
    out = []
    for name in names:
        c, s = _value(cp, name), _value(sp, name)
        ws = {addr: _value(p, name) for addr, p in sorted(wps.items())}
        seen = set(ws.values())
        if cp is not None:
            seen.add(c)
        if name in SCHEDULER_RELEVANT and sp is not None:
            seen.add(s)
        if len(seen) > 1:
            out.append(Mismatch(name, c, s, ws))
    return out


def joining_worker_mismatches(
    worker: Mapping[str, Any] | None,
    scheduler: Mapping[str, Any] | None,
    clients: Mapping[str, Mapping[str, Any] | None],
    workers: Mapping[str, Mapping[str, Any] | None],
) -> list[tuple[str, str, str, dict[str, str], dict[str, str]]]:
    """How a joining worker differs from the scheduler, the clients and the other workers.

    Returns ``(package, worker's version, scheduler's, {client: version},
    {worker: version})`` for each package where the joining worker's version
    differs from some party's (the scheduler counting for Python and the
    required packages only).  Empty when it matches, or has no report.
    """
    wp = _packages(worker)
    if wp is None:
        return []
    sp = _packages(scheduler)
    cps = {cid: p for cid, v in clients.items() if (p := _packages(v)) is not None}
    wps = {addr: p for addr, v in workers.items() if (p := _packages(v)) is not None}
    out = []
    for name in CHECKED:
        mine = _value(wp, name)
        s = _value(sp, name)
        cs = {cid: _value(p, name) for cid, p in sorted(cps.items())}
        ws = {addr: _value(p, name) for addr, p in sorted(wps.items())}
        others = {*cs.values(), *ws.values()}
        if name in SCHEDULER_RELEVANT and sp is not None:
            others.add(s)
        if others - {mine}:
            out.append((name, mine, s, cs, ws))
    return out


# -- rendering ---------------------------------------------------------------------------
def _who(names: list[str], noun: str) -> str:
    if len(names) <= 3:
        return ", ".join(names)
    return f"{len(names)} {noun}s"


def summarize(values: Mapping[str, str], noun: str = "worker") -> str:
    """``{"a": "1", "b": "1"}`` -> ``"1"``; ``{"a": "1", "b": "2"}`` -> ``"1 (a); 2 (b)"``."""
    if not values:
        return "-"
    groups: dict[str, list[str]] = {}
    for who, version in values.items():
        groups.setdefault(version, []).append(who)
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{v} ({_who(names, noun)})" for v, names in sorted(groups.items()))


def ascii_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain text table with a header row."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells: list[str]) -> str:
        return "|" + "|".join(f" {c!s:<{w}} " for c, w in zip(cells, widths, strict=True)) + "|"

    return "\n".join([rule, line(headers), rule, *(line(r) for r in rows), rule])


def format_mismatches(mismatches: list[Mismatch], source: str = "Client") -> str:
    """The readable report: a title and one table (package | client | scheduler | workers)."""
    rows = [[m.package, m.client, m.scheduler, summarize(m.workers)] for m in mismatches]
    table = ascii_table(["Package", source, "Scheduler", "Workers"], rows)
    return (
        "Mismatched versions found between the client, the scheduler and the workers\n"
        "(the scheduler counts for Python and corral/cloudpickle/msgpack only):\n\n" + table
    )


def format_joining_worker(
    address: str, rows: list[tuple[str, str, str, dict[str, str], dict[str, str]]]
) -> str:
    """The table of :func:`joining_worker_mismatches` for worker ``address``."""
    body = [
        [name, mine, s, summarize(cs, "client"), summarize(ws)] for name, mine, s, cs, ws in rows
    ]
    return ascii_table(["Package", f"Worker {address}", "Scheduler", "Clients", "Workers"], body)
