"""Corral: a distributed task scheduler for Python, for clusters that are not uniform.

The API follows dask.distributed's names::

    from corral import Client
    client = Client()
    client.submit(sum, [1, 2, 3]).result()
"""

from ._version import __version__
from .client import Client, Future, as_completed, default_client, wait
from .comm.security import Security
from .deploy import LocalCluster
from .diagnostics.progress import progress
from .environments import WorkerEnvironment, environment_worker, get_environment_state
from .errors import CommClosedError, FutureCancelledError, KilledWorker, LostDataError
from .plugins import (
    Environ,
    NannyPlugin,
    PipInstall,
    PipInstallError,
    SchedulerPlugin,
    UploadFile,
    WorkerPlugin,
)
from .resources import get_task_resources, task_env
from .scheduler import Scheduler
from .versions import VersionMismatchError, VersionMismatchWarning
from .worker import Worker
from .worker.execution import current_worker


def get_worker() -> Worker:
    """The worker running the current task (raise ``ValueError`` outside a task).

    Inside a worker environment's ``condition``, ``setup`` or ``teardown``: the
    worker it runs on.
    """
    worker = current_worker() or environment_worker()
    if worker is None:
        raise ValueError("get_worker() called outside a task running on a Corral worker")
    return worker


def get_client() -> Client:
    """The default client of this process."""
    return default_client()


__all__ = [
    "Client",
    "CommClosedError",
    "Environ",
    "Future",
    "FutureCancelledError",
    "KilledWorker",
    "LocalCluster",
    "LostDataError",
    "NannyPlugin",
    "PipInstall",
    "PipInstallError",
    "Scheduler",
    "SchedulerPlugin",
    "Security",
    "UploadFile",
    "VersionMismatchError",
    "VersionMismatchWarning",
    "Worker",
    "WorkerEnvironment",
    "WorkerPlugin",
    "__version__",
    "as_completed",
    "default_client",
    "get_client",
    "get_environment_state",
    "get_task_resources",
    "get_worker",
    "progress",
    "task_env",
    "wait",
]
