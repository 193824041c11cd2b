"""Tests of relpos_ref.cuda."""
