"""Tests of relpos_ref.bounds."""
