"""The installed version of Corral."""

__version__ = "0.1.0"
