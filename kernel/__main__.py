"""``python -m inferno.kernel`` runs the ``inferno`` command line."""

from .cli import main

main()
