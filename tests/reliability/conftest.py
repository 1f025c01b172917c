"""Fixtures of the reliability tests (helpers live in ``rel_support``, a unique module name,
so worker processes importing a test module never pick up another folder's ``conftest``)."""

from rel_support import pki

__all__ = ["pki"]
