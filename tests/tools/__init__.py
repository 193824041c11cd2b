"""Tests of the developer tooling outside the wheel (tools/)."""
