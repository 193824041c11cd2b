"""Tests of relpos_ref.conformance."""
