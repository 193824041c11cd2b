"""Developer tooling that is not part of the relpos_ref wheel."""
