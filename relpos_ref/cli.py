"""Command-line entry point ``relpos-ref`` (also ``python -m relpos_ref``): the parser and the exit-status guards."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import NoReturn

__all__ = ["main"]

DESCRIPTION = (
    "Reference math for relative positional biases in attention (T5, ALiBi, KERPLE, FIRE, Sandwich, offset tables), "
    "checked against a 50-digit oracle, and a harness that checks your own implementation against it."
)

EPILOG = """\
Run 'relpos-ref COMMAND --help' for the options of a command.
exit status: 0 success, 1 a check failed, 2 a usage or input error, 130 interrupted (Ctrl-C), 141 the output pipe
was closed (e.g. piped into head).
"""

#: Exit status when the reader of stdout went away (``relpos-ref verify | head -1``), as shells report SIGPIPE.
EXIT_BROKEN_PIPE = 141
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """Reports a usage error as one line naming the argument (argparse's default prints the whole usage first, which
    for ``conform`` is 20 lines that bury the message)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("relpos_ref")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        msg = f"expected an integer >= 0, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _parser() -> argparse.ArgumentParser:
    from .conformance.cli import EPILOG as CONFORM_EPILOG
    from .conformance.cli import DefaultsHelpFormatter, add_arguments

    p = _Parser(
        prog="relpos-ref",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, title="commands")
    v = sub.add_parser(
        "verify",
        help="check this installation: every bias family and attention on every available backend and dtype",
        description=(
            "Evaluate every bias family and the attention path on every available backend (NumPy always; "
            "array_api_strict and CuPy when present) in float64, float32 and float16, compare each with NumPy float64 "
            "on the same rounded inputs, run a quick pass of the properties, then measure each family, the softmax "
            "and attention against the 50-digit mpmath oracle. Prints two tables; exit 1 on any failure, also when "
            "a backend asked for with --backend cannot run or nothing was checked."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    v.add_argument(
        "--backend",
        action="append",
        choices=["numpy", "array_api_strict", "cupy"],
        help="check only this backend (repeatable; it must be installed and, for cupy, have a GPU; default: every "
        "available one)",
    )
    v.add_argument(
        "--dtype",
        action="append",
        choices=["float64", "float32", "float16"],
        help="check only this dtype (repeatable; default: all three)",
    )
    v.add_argument("--seed", type=_nonnegative_int, default=0, help="seed of the random parameters and inputs")
    v.add_argument(
        "--thorough",
        action="store_true",
        help="run the larger oracle case set (minutes instead of seconds; default: the quick set)",
    )
    v.add_argument(
        "--no-progress",
        action="store_true",
        help="print no progress on stderr (default: a status line on a terminal, one line per step otherwise)",
    )
    c = sub.add_parser(
        "conform",
        help="check an implementation (bias, T5 buckets, attention or its backward) against the reference",
        description=(
            "Run the conformance harness on MODULE:FUNCTION: compare it with the float64 reference under the named "
            "conventions, run the property checks, print a table with the first mismatch, a diagnosis and a "
            "reproduction for each failure."
        ),
        epilog=CONFORM_EPILOG,
        formatter_class=DefaultsHelpFormatter,
    )
    add_arguments(c)
    from . import bench as _bench
    from . import plot as _plot

    b = sub.add_parser(
        "bench",
        help="time attention with each bias family, next to PyTorch, across sequence lengths; tables and plots",
        description=(
            "Measure how fast relpos_ref's attention runs with each bias family, next to PyTorch's attention "
            "(torch.nn.functional.scaled_dot_product_attention with the bias passed as a mask, and FlexAttention) "
            "when PyTorch is installed, and on a GPU next to CuPy. For each family, sequence length and library it "
            "reports the median time, the achieved GFLOP/s and GB/s next to the machine's own peak (measured in "
            "the same run with a matrix product and a memory copy) and the extra memory used. Writes results.json, "
            "results.md and, with matplotlib, time_vs_seqlen.png and roofline.png."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    _bench.add_arguments(b)
    pl = sub.add_parser(
        "plot",
        help="draw each family's bias curves per head and heatmaps of the bias and probabilities (PNG/SVG)",
        description=(
            "Draw each family's penalty b_h(Delta) per head (ALiBi slopes, T5 buckets and table, KERPLE, FIRE at "
            "several query positions, Sandwich, the clipped offset table) and heatmaps of b(i, j) and of the "
            "probabilities it gives. Needs matplotlib (pip install 'relpos_ref[plot]')."
        ),
    )
    _plot.add_arguments(pl)
    return p


def _run(args: argparse.Namespace) -> int:
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


def _drop_output() -> None:
    """Point stdout at /dev/null: the interpreter flushes it at exit, and a flush into the closed pipe would print
    "Exception ignored ... BrokenPipeError" after all (the recipe of Python's signal module documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    # A stream without a descriptor (pytest's capture, a StringIO) has nothing to flush into a pipe.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Run ``relpos-ref`` with ``argv`` (default ``sys.argv[1:]``) and return its exit status."""
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as exc:  # --help, --version and usage errors: their status, also when called in-process
            return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
        status = _run(args)
        # Inside the guard: output still in the buffer would otherwise meet the closed pipe at exit, where Python
        # prints "Exception ignored ... BrokenPipeError" and exits 120.
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _drop_output()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("relpos-ref: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
