"""``python -m corral`` runs the ``corral`` command."""

from .cli import main

main()
