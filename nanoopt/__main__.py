"""``python -m nanoopt`` runs the ``nanoopt`` command."""

import sys

from nanoopt.cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
