"""Shared test helpers: rounding bounds and property plumbing, deliberately broken implementations, fused cases."""
