"""Tests of relpos_ref.families."""
