"""Versions of Python and of the packages that must agree across a cluster."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from functools import lru_cache
from typing import Any

from ._version import __version__

#: Packages whose versions must match everywhere (missing ones are reported as such).
REQUIRED = ("corral", "cloudpickle", "msgpack")
OPTIONAL = ("numpy", "pandas", "dask", "tblib")


def _version_of(name: str) -> str | None:
    if name == "corral":
        return __version__
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def get_versions() -> dict[str, Any]:
    """This process's Python and package versions, in dask.distributed's layout."""
    return {
        "host": {
            "python": ".".join(map(str, sys.version_info[:3])),
            "python-bits": 64 if sys.maxsize > 2**32 else 32,
            "OS": platform.system(),
            "machine": platform.machine(),
        },
        "packages": {
            "python": ".".join(map(str, sys.version_info[:3])),
            **{name: _version_of(name) for name in (*REQUIRED, *OPTIONAL)},
        },
    }
