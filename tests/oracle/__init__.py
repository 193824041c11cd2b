"""Tests of relpos_ref.oracle."""
