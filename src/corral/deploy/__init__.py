"""Ways to start a cluster."""

from .local import LocalCluster

__all__ = ["LocalCluster"]
