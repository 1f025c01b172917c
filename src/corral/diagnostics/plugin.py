"""``from corral.diagnostics.plugin import SchedulerPlugin``: dask.distributed's import path.

The plugin classes live in :mod:`corral.plugins` (also exported from ``corral``).
"""

from ..plugins import Environ, NannyPlugin, PipInstall, SchedulerPlugin, UploadFile, WorkerPlugin

__all__ = ["Environ", "NannyPlugin", "PipInstall", "SchedulerPlugin", "UploadFile", "WorkerPlugin"]
