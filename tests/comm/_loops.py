"""The event loops the comm tests run under: asyncio's, and uvloop's when installed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest


def loop_factories() -> list[Any]:
    """``pytest.param`` loop factories, one per event loop implementation."""
    factories: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop

        factories.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    except ImportError:  # pragma: no cover - uvloop is optional
        pass
    return factories
