"""Print the measured error-versus-bound table of relpos_ref.bounds, and rewrite it in spec/tolerances.md.

``python -m tools.bounds_table [--thorough] [--backends numpy,array_api_strict,cupy] [--dtypes ...]
[--update-md spec/tolerances.md]``, from the repository root. It measures every family, the softmax and attention
against the mpmath oracle (:func:`relpos_ref.bounds.oracle_table`), prints the table, and with ``--update-md``
replaces the block between the table markers of that Markdown file. The exit status is 1 when a row exceeds its bound.
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np

from relpos_ref.bounds import DTYPES, format_table, oracle_table

MD_BEGIN = "<!-- BEGIN MEASURED TABLE (python -m tools.bounds_table --update-md spec/tolerances.md) -->"
MD_END = "<!-- END MEASURED TABLE -->"


def _backends(names: str, parser: argparse.ArgumentParser) -> list[Any]:
    backends = []
    for b in names.split(","):
        if b == "numpy":
            import array_api_compat.numpy as npc

            backends.append(npc)
        elif b == "array_api_strict":
            import array_api_strict

            backends.append(array_api_strict)
        elif b == "cupy":
            import array_api_compat.cupy as cpc

            backends.append(cpc)
        else:
            parser.error(f"unknown backend {b!r}")
    return backends


def update_markdown(path: str, rows: Sequence[dict[str, Any]], *, thorough: bool) -> None:
    """Replace the measured-table block of the Markdown file ``path`` by ``rows`` (ValueError without markers)."""
    import mpmath

    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if MD_BEGIN not in text or MD_END not in text:
        msg = f"{path} lacks the table markers"
        raise ValueError(msg)
    info = (
        f"Measured with numpy {np.__version__}, mpmath {mpmath.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}; {'thorough' if thorough else 'default'} case set; bound = the documented "
        "bound at the entry where error/bound is largest."
    )
    block = f"{MD_BEGIN}\n\n{info}\n\n{format_table(rows, markdown=True)}\n\n{MD_END}"
    text = text[: text.index(MD_BEGIN)] + block + text[text.index(MD_END) + len(MD_END) :]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tools.bounds_table [--thorough] [--update-md PATH]``: print the measured table."""
    parser = argparse.ArgumentParser(prog="python -m tools.bounds_table", description=main.__doc__)
    parser.add_argument("--thorough", action="store_true")
    parser.add_argument("--backends", default="numpy,array_api_strict")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--update-md", metavar="PATH", help="rewrite the measured table block of this Markdown file")
    args = parser.parse_args(argv)
    backends = _backends(args.backends, parser)
    rows = oracle_table(backends, args.dtypes.split(","), thorough=args.thorough)
    print(format_table(rows))
    if args.update_md:
        try:
            update_markdown(args.update_md, rows, thorough=args.thorough)
        except ValueError as exc:
            parser.error(str(exc))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
