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
    v.add_argument(
        "--backend",
        action="append",
        choices=["numpy", "array_api_strict", "cupy"],
        help="restrict to this backend (repeatable)",
    )
    v.add_argument(
        "--dtype",
        action="append",
        choices=["float64", "float32", "float16"],
        help="restrict to this dtype (repeatable)",
    )
    v.add_argument("--seed", type=int, default=0, help="seed of the random parameters and inputs (default 0)")
    v.add_argument(
        "--thorough", action="store_true", help="run the larger oracle case set (minutes instead of seconds)"
    )
    from .conformance.cli import EPILOG, add_arguments

    c = sub.add_parser(
        "conform",
        help="check an implementation (bias, T5 buckets, attention or its backward) against the reference",
        description=(
            "Run the conformance harness on MODULE:FUNCTION: compare it with the float64 reference under the named "
            "conventions, run the property checks, print a table with the first mismatch, a diagnosis and a "
            "reproduction for each failure."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(c)
    from . import bench as _bench
    from . import plot as _plot

    b = sub.add_parser(
        "bench",
        help="benchmark attention with each bias family across shapes and backends; JSON, Markdown and PNG plots",
        description=(
            "Time rp.attention (NumPy; CuPy unfused and fused on a GPU) against PyTorch SDPA with a materialised bias "
            "and FlexAttention, over families x shapes x backends: warm-up, repetitions, median and min-max, CUDA "
            "events on a GPU, GFLOP/s and GB/s against a roofline measured in the same run, peak extra memory, and "
            "the CPU targets. Writes results.json, results.md, time_vs_seqlen.png and roofline.png."
        ),
    )
    _bench.add_arguments(b)
    pl = sub.add_parser(
        "plot",
        help="draw penalty curves b(Delta) per head and bias/probability heatmaps of every family (PNG/SVG)",
        description=(
            "Draw each family's penalty b_h(Delta) per head (ALiBi slopes, T5 buckets and table, KERPLE, FIRE at "
            "several query positions, Sandwich, the clipped offset table) and heatmaps of b(i, j) and of the "
            "probabilities it gives. Needs matplotlib (pip install 'relpos_ref[plot]')."
        ),
    )
    _plot.add_arguments(pl)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "verify":
        from .verify import main_verify

        return main_verify(args)
    if args.command == "conform":
        from .conformance.cli import main_conform

        return main_conform(args)
    if args.command == "bench":
        from .bench import main_bench

        return main_bench(args)
    if args.command == "plot":
        from .plot import main_plot

        return main_plot(args)
    return 2  # pragma: no cover - argparse rejects unknown commands first


if __name__ == "__main__":
    sys.exit(main())
