"""The client: futures, graph submission, waiting helpers."""

from .client import Client, default_client
from .future import Future
from .wait import as_completed, wait

__all__ = ["Client", "Future", "as_completed", "default_client", "wait"]
