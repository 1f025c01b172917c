"""A bounded in-memory log of each process: ``client.get_worker_logs()`` reads it.

:func:`install` adds one :class:`LogBuffer` handler to the ``corral`` logger
(once per process); schedulers and workers install it as they are created,
and ``corral scheduler`` / ``corral worker`` through :func:`setup_logging`,
which also keeps INFO records in the buffer while the terminal shows only the
``--log-level`` asked for.  The buffer holds ``logging.buffer-size`` records
(configuration, default 10000); older ones are dropped.

Example::

    client.get_scheduler_logs(n=20)     # [("INFO", "2024-... corral.scheduler ..."), ...]
    client.get_worker_logs()            # {worker address: [(level, text), ...]}
"""

from __future__ import annotations

import logging
import threading
from collections import deque

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

_lock = threading.Lock()
_buffer: LogBuffer | None = None


class LogBuffer(logging.Handler):
    """Keep the last ``maxlen`` formatted records as ``(levelname, text)``."""

    def __init__(self, maxlen: int = 10000) -> None:
        super().__init__()
        self.records: deque[tuple[str, str]] = deque(maxlen=maxlen)
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append((record.levelname, self.format(record)))
        except Exception:  # pragma: no cover - a broken record must not break logging
            self.handleError(record)


def install(maxlen: int | None = None) -> LogBuffer:
    """The process's buffer, added to the ``corral`` logger the first time."""
    global _buffer
    with _lock:
        if _buffer is None:
            if maxlen is None:
                try:
                    from . import config

                    maxlen = int(config.get("logging.buffer-size"))
                except Exception:  # a bad config file is reported elsewhere
                    maxlen = 10000
            _buffer = LogBuffer(maxlen)
            logging.getLogger("corral").addHandler(_buffer)
        return _buffer


def get_logs(n: int | None = None) -> list[tuple[str, str]]:
    """The last ``n`` records of this process (all kept ones when ``None``), oldest first."""
    records = list(install().records)
    return records[-n:] if n else records


def setup_logging(level: str) -> None:
    """Logging of a ``corral`` command: ``level`` on stderr, INFO or more in the buffer."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    logging.basicConfig(level=numeric, format=FORMAT)
    for handler in logging.getLogger().handlers:
        if handler.level == logging.NOTSET:
            handler.setLevel(numeric)  # the terminal shows what was asked for
    corral_logger = logging.getLogger("corral")
    corral_logger.setLevel(min(numeric, logging.INFO))  # the buffer sees INFO too
    install()
