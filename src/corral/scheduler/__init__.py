"""The scheduler: pure state machine, placement, and its asyncio server."""

from .server import Scheduler
from .state import SchedulerState

__all__ = ["Scheduler", "SchedulerState"]
