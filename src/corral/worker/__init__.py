"""The worker: pure state machine, task execution, and its asyncio server."""

from .server import Worker
from .state import WorkerState

__all__ = ["Worker", "WorkerState"]
