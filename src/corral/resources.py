"""Abstract resources: what workers offer, what tasks demand, and who holds what.

Resources are named quantities (``GPU``, ``MEMORY``, ``LICENSE``...) that
Corral does not interpret.  A worker offers an amount of each; a task demands
an amount; a task only runs on a worker offering every resource it demands,
and a worker never runs more at once than it offers.

A worker may also offer an *indexed* resource: ``GPU=[0,1]`` offers two GPUs
named ``0`` and ``1``.  A task demanding ``{"GPU": 1}`` is then given one of
those indices for as long as it runs (:func:`corral.get_task_resources`).  The
rule for demands on indexed resources:

* the whole part of a demand takes that many *free* indices, held by this
  task alone (``{"GPU": 2}`` holds two indices);
* a fractional part shares one index with other fractional holders, as long
  as the shares on that index add up to at most 1 (two tasks demanding 0.5
  run together on the same GPU; a 0.6 and a 0.5 do not share one);
* so ``{"GPU": 1.5}`` holds one index alone and half of another.

Everything here is pure (no IO) except :func:`detect_resources`, which reads
the environment and asks ``nvidia-smi``.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

#: A worker's offer: an amount, or a list of indices (the amount is their count).
Offer = float | list[Any]

#: What one executing task holds of indexed resources: name -> [(index, share)].
Allocation = dict[str, list[tuple[Any, float]]]

#: Environment variable ``corral worker`` reads when ``--resources`` is not given.
ENV_VAR = "CORRAL_WORKER_RESOURCES"

EPS = 1e-9


# -- validation ---------------------------------------------------------------------
def _check_name(name: Any, what: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}: resource names must be non-empty strings, got {name!r}")


def _check_amount(name: str, amount: Any, what: str) -> float:
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise ValueError(f"{what}: {name} must be a number, got {amount!r}")
    if math.isnan(amount) or math.isinf(amount) or amount < 0:
        raise ValueError(f"{what}: {name} must be a finite non-negative number, got {amount!r}")
    return amount


def validate_resources(
    resources: Mapping[str, Any] | None, what: str = "resources"
) -> dict[str, float]:
    """Check a task's demand ``{name: amount}``; raise ``ValueError`` naming the bad entry.

    Example::

        validate_resources({"GPU": 1})        # {"GPU": 1}
        validate_resources({"GPU": -1})       # ValueError: resources: GPU must be ...
    """
    if resources is None:
        return {}
    if not isinstance(resources, Mapping):
        raise ValueError(
            f"{what} must be a mapping of name to amount, not {type(resources).__name__}"
        )
    out: dict[str, float] = {}
    for name, amount in resources.items():
        _check_name(name, what)
        if isinstance(amount, list | tuple):
            raise ValueError(
                f"{what}: {name} must be a number, got {amount!r} "
                "(lists of indices are for what workers offer, not what tasks demand)"
            )
        out[name] = _check_amount(name, amount, what)
    return out


def validate_worker_resources(
    resources: Mapping[str, Any] | None, what: str = "worker resources"
) -> dict[str, Offer]:
    """Check a worker's offer: amounts, or lists of distinct indices (ints or strings)."""
    if resources is None:
        return {}
    if not isinstance(resources, Mapping):
        raise ValueError(
            f"{what} must be a mapping of name to amount, not {type(resources).__name__}"
        )
    out: dict[str, Offer] = {}
    for name, value in resources.items():
        _check_name(name, what)
        if isinstance(value, list | tuple):
            indices = []
            for index in value:
                if isinstance(index, bool) or not isinstance(index, int | str):
                    raise ValueError(
                        f"{what}: {name} index {index!r} is not an integer or a string"
                    )
                if isinstance(index, int) and index < 0:
                    raise ValueError(f"{what}: {name} index {index!r} is negative")
                if isinstance(index, str) and not index:
                    raise ValueError(f"{what}: {name} has an empty index")
                if index in indices:
                    raise ValueError(f"{what}: {name} lists index {index!r} twice")
                indices.append(index)
            out[name] = indices
        else:
            out[name] = _check_amount(name, value, what)
    return out


def resource_amounts(offer: Mapping[str, Any]) -> dict[str, float]:
    """The amounts of an offer: a list of indices counts as its length."""
    return {k: (len(v) if isinstance(v, list | tuple) else v) for k, v in offer.items()}


def resource_indices(offer: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The indexed entries of an offer."""
    return {k: list(v) for k, v in offer.items() if isinstance(v, list | tuple)}


# -- the CLI syntax -----------------------------------------------------------------
def _split(text: str) -> list[str]:
    """Split on commas outside brackets: ``"GPU=[0,1],MEM=2"`` -> two parts."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _number(text: str) -> float:
    amount = float(text)
    return int(amount) if amount.is_integer() and abs(amount) < 2**53 else amount


def _index(text: str) -> int | str:
    text = text.strip().strip("'\"")
    return int(text) if re.fullmatch(r"\d+", text) else text


def parse_resources(text: str, what: str = "--resources") -> dict[str, Offer]:
    """Parse the CLI form: ``"GPU=2,MEMORY=100e9"``, ``"GPU=[0,1]"``, ``"auto"``.

    ``auto`` (alone or as one item, ``"auto,LICENSE=1"``) stands for what
    :func:`detect_resources` finds; items after it override it.
    """
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string like 'GPU=2,MEMORY=100e9', got {text!r}")
    out: dict[str, Any] = {}
    for part in _split(text):
        part = part.strip()
        if not part:
            continue
        if part.lower() == "auto":
            out.update(detect_resources())
            continue
        name, eq, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not name:
            raise ValueError(f"{what}: {part!r} is not of the form NAME=AMOUNT or NAME=[i,j,...]")
        if value.startswith("["):
            if not value.endswith("]"):
                raise ValueError(f"{what}: {name}: {value!r} has no closing bracket")
            inner = value[1:-1].strip()
            out[name] = [_index(i) for i in inner.split(",")] if inner else []
            continue
        try:
            out[name] = _number(value)
        except ValueError:
            raise ValueError(f"{what}: {name}: {value!r} is not a number") from None
    return validate_worker_resources(out, what)


def format_resources(offer: Mapping[str, Any]) -> str:
    """The CLI form of an offer: ``{"GPU": [0, 1], "MEM": 1e9}`` -> ``"GPU=[0,1],MEM=1e+09"``."""
    items = []
    for name, value in offer.items():
        if isinstance(value, list | tuple):
            items.append(f"{name}=[{','.join(str(i) for i in value)}]")
        else:
            items.append(f"{name}={value!r}")
    return ",".join(items)


def resources_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Offer]:
    """The offer in ``CORRAL_WORKER_RESOURCES`` (same syntax as ``--resources``), or ``{}``."""
    env = os.environ if environ is None else environ
    text = env.get(ENV_VAR, "").strip()
    return parse_resources(text, ENV_VAR) if text else {}


# -- detection ----------------------------------------------------------------------
def detect_gpus(environ: Mapping[str, str] | None = None) -> list[Any]:
    """NVIDIA GPU indices: from ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``.

    The indices are what a task puts in ``CUDA_VISIBLE_DEVICES`` (numbers, or
    ``GPU-...`` UUIDs as listed there).  No NVIDIA tooling: no GPUs.
    """
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        items = [_index(v) for v in visible.split(",") if v.strip()]
        # CUDA stops at the first invalid entry ("-1" hides every device).
        out = []
        for item in items:
            if isinstance(item, str) and item.startswith("-"):
                break
            out.append(item)
        return out
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        listing = subprocess.run(
            [exe, "-L"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return []
    found = re.findall(r"^GPU (\d+):", listing.stdout, flags=re.MULTILINE)
    return [int(i) for i in found]


def detect_resources(environ: Mapping[str, str] | None = None) -> dict[str, Offer]:
    """What ``--resources auto`` offers: ``GPU`` (indexed, if any) and ``MEMORY`` in bytes."""
    import psutil

    out: dict[str, Offer] = {}
    gpus = detect_gpus(environ)
    if gpus:
        out["GPU"] = gpus
    out["MEMORY"] = int(psutil.virtual_memory().total)
    return out


# -- what a worker holds: pure bookkeeping used by the worker's state machine ---------------
class ResourcePool:
    """A worker's resources: totals, what is free, and which task holds which index.

    Pure: the worker's state machine calls :meth:`fits`, :meth:`acquire` when a
    task starts and :meth:`release` when it ends.  ``total`` and ``available``
    are plain dicts updated in place.
    """

    def __init__(self, offer: Mapping[str, Any] | None = None) -> None:
        self.total: dict[str, float] = {}
        self.available: dict[str, float] = {}
        self.used: dict[str, float] = {}
        self.indices: dict[str, list[Any]] = {}
        #: name -> index -> share in use (indices dropped by an update stay until free)
        self.usage: dict[str, dict[Any, float]] = {}
        #: what running tasks held beyond a total lowered while they ran
        self.allowance: dict[str, float] = {}
        self.update(offer or {})

    def __repr__(self) -> str:
        return f"<ResourcePool total={self.total} available={self.available}>"

    def offer(self) -> dict[str, Offer]:
        """The current offer (indices as lists)."""
        return {k: list(self.indices[k]) if k in self.indices else v for k, v in self.total.items()}

    def update(self, offer: Mapping[str, Any]) -> None:
        """Set the named resources (others unchanged); running tasks keep what they hold."""
        for name, value in offer.items():
            if isinstance(value, list | tuple):
                self.indices[name] = list(value)
                usage = self.usage.setdefault(name, {})
                for index in value:
                    usage.setdefault(index, 0.0)
                total = float(len(value))
            else:
                self.indices.pop(name, None)
                total = value
            self.total[name] = total
            used = self.used.setdefault(name, 0.0)
            self.allowance[name] = max(0.0, used - total)
            self.available[name] = total - used
            self._prune(name)

    def _prune(self, name: str) -> None:
        usage = self.usage.get(name)
        if usage is None:
            return
        current = set(self.indices.get(name, ()))
        for index in [i for i, u in usage.items() if i not in current and u <= EPS]:
            del usage[index]
        if not usage and name not in self.indices:
            del self.usage[name]

    def _plan(self, demand: Mapping[str, float]) -> Allocation | None:
        """Which indices ``demand`` would take now, or ``None`` if it does not fit."""
        plan: Allocation = {}
        for name, amount in demand.items():
            if amount <= EPS:
                continue
            if self.available.get(name, 0.0) < amount - EPS:
                return None
            indices = self.indices.get(name)
            if indices is None:
                continue
            usage = self.usage[name]
            whole = math.floor(amount + EPS)
            frac = amount - whole
            if frac <= EPS:
                frac = 0.0
            free = [i for i in indices if usage.get(i, 0.0) <= EPS]
            if len(free) < whole:
                return None
            taken = [(i, 1.0) for i in free[:whole]]
            if frac:
                # Best fit: the fullest shared index that still has room, else a free one.
                shared = [
                    i for i in indices if usage.get(i, 0.0) > EPS and usage[i] + frac <= 1.0 + EPS
                ]
                if shared:
                    best = max(shared, key=lambda i: usage[i])
                elif len(free) > whole:
                    best = free[whole]
                else:
                    return None
                taken.append((best, frac))
            plan[name] = taken
        return plan

    def fits(self, demand: Mapping[str, float] | None) -> bool:
        """True if a task demanding ``demand`` could start now."""
        return not demand or self._plan(demand) is not None

    def acquire(self, demand: Mapping[str, float]) -> Allocation:
        """Take ``demand`` for a task that starts now; return the indices it holds."""
        plan = self._plan(demand)
        if plan is None:
            raise ValueError(f"{dict(demand)} does not fit in what is available: {self.available}")
        for name, amount in demand.items():
            self.used[name] = self.used.get(name, 0.0) + amount
            self.available[name] = self.available.get(name, 0.0) - amount
        for name, taken in plan.items():
            usage = self.usage[name]
            for index, share in taken:
                usage[index] = usage.get(index, 0.0) + share
        return plan

    def release(self, demand: Mapping[str, float], held: Allocation | None) -> None:
        """Give back what a task took when it started."""
        for name, amount in demand.items():
            used = max(0.0, self.used.get(name, 0.0) - amount)
            self.used[name] = used
            total = self.total.get(name, 0.0)
            self.available[name] = total - used
            self.allowance[name] = max(0.0, min(self.allowance.get(name, 0.0), used - total))
        for name, taken in (held or {}).items():
            usage = self.usage.get(name)
            if usage is None:
                continue
            for index, share in taken:
                if index in usage:
                    usage[index] = max(0.0, usage[index] - share)
            self._prune(name)

    def validate(self, held: list[tuple[Mapping[str, float], Allocation | None]]) -> None:
        """Check the books against what the executing tasks hold; raise ``AssertionError``."""
        used: dict[str, float] = {}
        per_index: dict[str, dict[Any, float]] = {}
        for demand, allocation in held:
            for name, amount in demand.items():
                used[name] = used.get(name, 0.0) + amount
            for name, taken in (allocation or {}).items():
                seen = set()
                for index, share in taken:
                    assert index not in seen, f"{name} index {index!r} taken twice by one task"
                    seen.add(index)
                    shares = per_index.setdefault(name, {})
                    shares[index] = shares.get(index, 0.0) + share
        for name in set(self.total) | set(used):
            u = used.get(name, 0.0)
            total = self.total.get(name, 0.0)
            assert abs(self.used.get(name, 0.0) - u) < 1e-6, (
                f"{name}: books say {self.used.get(name)} used, tasks hold {u}"
            )
            assert abs(self.available.get(name, 0.0) - (total - u)) < 1e-6, (
                f"{name}: available is off"
            )
            assert u <= total + self.allowance.get(name, 0.0) + 1e-6, (
                f"{name} oversubscribed: {u} > {total}"
            )
        for name, shares in per_index.items():
            for index, share in shares.items():
                assert share <= 1.0 + 1e-6, f"{name} index {index!r} held {share:g} times over"
                assert abs(self.usage.get(name, {}).get(index, 0.0) - share) < 1e-6, (name, index)


# -- what a running task sees -------------------------------------------------------
def task_resources(demand: Mapping[str, float], held: Allocation | None) -> dict[str, Any]:
    """A task's view: the indices it holds of indexed resources, the amount of others."""
    out: dict[str, Any] = dict(demand)
    for name, taken in (held or {}).items():
        out[name] = [index for index, _ in taken]
    return out


def get_task_resources() -> dict[str, Any]:
    """What the running task holds: ``{"GPU": [1], "MEMORY": 70e9}``.

    Indexed resources map to the list of indices the task holds (alone, or
    shared for a fractional demand); other resources map to the amount
    demanded.  A task that demanded nothing gets ``{}``.  Raises
    ``ValueError`` outside a task running on a Corral worker.

    Example::

        def train(data):
            gpus = corral.get_task_resources()["GPU"]   # e.g. [1]
            ...
    """
    from .worker.execution import current_task_resources

    held = current_task_resources()
    if held is None:
        raise ValueError("get_task_resources() called outside a task running on a Corral worker")
    return dict(held)


def task_env(
    resource: str = "GPU",
    variable: str = "CUDA_VISIBLE_DEVICES",
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """An environment for a subprocess that should see only this task's devices.

    A copy of ``base`` (default: ``os.environ``) with ``variable`` set to the
    comma-joined indices of ``resource`` the running task holds.  If the task
    holds no indices of ``resource``, ``variable`` is left as it is.

    Example::

        subprocess.run(["python", "train.py"], env=corral.task_env(), check=True)
    """
    env = dict(os.environ if base is None else base)
    held = get_task_resources().get(resource)
    if isinstance(held, list):
        env[variable] = ",".join(str(i) for i in held)
    return env
