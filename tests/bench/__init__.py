"""Tests of relpos_ref.bench."""
