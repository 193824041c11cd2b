"""Command-line entry point ``relpos-ref``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relpos-ref", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser(
        "verify",
        help="evaluate every family and the attention path on every available backend and dtype",
        description=(
            "Evaluate every bias family and the attention path on every available backend (NumPy always; "
            "array_api_strict and CuPy when present) in float64, float32 and float16, compare each with NumPy float64 "
            "on the same rounded inputs, run a quick pass of the properties, print one table, exit 1 on any failure."
        ),
    )
    v.add_argument("--backend", action="append", choices=["numpy", "array_api_strict", "cupy"],
                   help="restrict to this backend (repeatable)")
    v.add_argument("--dtype", action="append", choices=["float64", "float32", "float16"],
                   help="restrict to this dtype (repeatable)")
    v.add_argument("--seed", type=int, default=0, help="seed of the random parameters and inputs (default 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "verify":
        from .verify import main_verify

        return main_verify(args)
    return 2  # pragma: no cover - argparse rejects unknown commands first


if __name__ == "__main__":
    sys.exit(main())
