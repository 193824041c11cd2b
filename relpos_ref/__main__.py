"""``python -m relpos_ref``: the ``relpos-ref`` command, for environments where its script is not on PATH."""

import sys

from .cli import main

if __name__ == "__main__":  # importing the module (doctest collection, pkgutil walks) must not run the command
    sys.exit(main())
