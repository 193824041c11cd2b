"""``python -m relpos_ref.bench --probe SPEC``: the fresh process in which a peak-memory probe runs its one call."""

import sys

from .probe import main_probe

sys.exit(main_probe(sys.argv))
