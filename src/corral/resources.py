"""Abstract resources: parsing and validating what workers offer and tasks demand."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def validate_resources(resources: Mapping[str, Any] | None, what: str = "resources") -> dict[str, float]:
    """Check a ``{name: amount}`` mapping; raise ``ValueError`` naming the bad entry."""
    if resources is None:
        return {}
    if not isinstance(resources, Mapping):
        raise ValueError(f"{what} must be a mapping of name to amount, not {type(resources).__name__}")
    out: dict[str, float] = {}
    for name, amount in resources.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what}: resource names must be non-empty strings, got {name!r}")
        if isinstance(amount, bool) or not isinstance(amount, int | float):
            raise ValueError(f"{what}: {name} must be a number, got {amount!r}")
        if math.isnan(amount) or math.isinf(amount) or amount < 0:
            raise ValueError(f"{what}: {name} must be a finite non-negative number, got {amount!r}")
        out[name] = amount
    return out


def parse_resources(text: str) -> dict[str, float]:
    """Parse the CLI form ``"GPU=2,MEMORY=100e9"``."""
    out: dict[str, Any] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or not name:
            raise ValueError(f"resource {part!r} is not of the form NAME=AMOUNT")
        try:
            amount = float(value)
        except ValueError:
            raise ValueError(f"resource {name}: {value.strip()!r} is not a number") from None
        out[name] = int(amount) if amount.is_integer() else amount
    return validate_resources(out, "--resources")
