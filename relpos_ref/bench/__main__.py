"""``python -m relpos_ref.bench --probe SPEC``: the fresh process in which a peak-memory probe runs its one call."""

import sys

from .probe import main_probe

if __name__ == "__main__":
    sys.exit(main_probe(sys.argv))
