"""Compatibility with ``distributed.diagnostics``: ``corral.diagnostics.plugin``."""
