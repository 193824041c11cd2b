"""``relpos-ref conform MODULE:FUNCTION ...``: the harness from the command line.

The same options drive ``pytest --pyargs relpos_ref.conformance`` through the ``RELPOS_REF_ARGS`` environment
variable, so both entry points build the suite with :func:`build_checks`.

Exit status of ``relpos-ref conform`` (:func:`main_conform`):

- 0: every check that was run passed (declared ``--xfail`` checks may fail) and every check was run. A check is not
  run ("NOT CHECKED") when the candidate does not provide what it compares, e.g. a parameter gradient; with
  ``--allow-incomplete`` such checks do not stop exit 0, and the output still lists them.
- 1: a check failed or was an error (the candidate raised, called ``sys.exit``, timed out or returned something
  that is not an array), or a check was not run and ``--allow-incomplete`` was not given. Exit 0 therefore always
  means "shown to conform on everything the suite checks", never "nothing went wrong because nothing ran".
- 2: a usage or input error: bad options, a target that cannot be found or whose module raises while it is
  imported (one line on stderr, no traceback).
- 130: interrupted (Ctrl-C), as shells report SIGINT.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import _checks
from ..conventions import (
    ALIGNMENTS,
    EQUIVALENCES,
    FLOAT_DTYPES,
    FULLY_MASKED,
    LAYOUTS,
    LEVELS,
    PLACEMENTS,
    TENSOR_LAYOUTS,
)
from ..families import FAMILIES as _REGISTRY
from ..families import FIRE, ALiBi, BiasFamily, Sandwich, T5Bias, family_class
from ._core import Check, _match_expected, run_checks
from .attention import _attention_checks, _AttentionSuite
from .backward import _backward_checks, _BackwardSuite
from .bias import BiasOptions, _bias_checks, _BiasSuite
from .buckets import bucket_checks
from .options import AttentionOptions
from .plugin import load_target

__all__ = ["DefaultsHelpFormatter", "add_arguments", "build_checks", "main_conform", "parse_env_args"]

#: ``--family`` values: every registered family but the tensor one (a fixed array, nothing to build from options).
FAMILIES = ("none", *[n for n in _REGISTRY if n != "tensor"])

#: The learned parameter arrays ``--params`` must hold for each family built from them, in constructor order.
_NEEDED_PARAMS = {
    "t5": ("table",),
    "offset": ("table",),
    "kerple_power": ("r1", "r2"),
    "kerple_log": ("r1", "r2"),
    "fire": ("w1", "b1", "w2", "b2"),
}

EPILOG = """\
examples:
  relpos-ref conform mypkg.bias:alibi --family alibi --heads 12 --causal --equivalence row_shift
  relpos-ref conform mypkg.bias:t5 --family t5 --params t5_table.npz --layout buckets_heads --no-bidirectional
  relpos-ref conform mypkg.attn:forward --kind attention --family alibi --heads 8 --causal --dtype float16 --xp torch
  relpos-ref conform mypkg.attn:backward --kind backward --family alibi --heads 8 --causal --xp torch
  relpos-ref conform mypkg.t5:bucket --kind buckets --bidirectional
  relpos-ref conform mypkg.bias:fire --reference mypkg.bias:REFERENCE_FIRE --json report.json
  relpos-ref conform path/to/my_kernel.py:attention --kind attention --timeout 60

exit status: 0 when every check passes (declared --xfail checks may fail) and none was left unchecked (the
candidate did not provide what it compares; --allow-incomplete accepts that), 1 when one fails, errors or is
left unchecked, 2 on a usage error (also a target that cannot be imported), 130 when interrupted.
"""


#: Largest ``--max-distance``: the bucket checks evaluate every offset up to 4 x max_distance, so 2**20 already
#: means about 8 million candidate outputs (real T5 models use 128 to a few thousand).
MAX_DISTANCE = 1 << 20


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless it states its default, and keeps the line breaks of a
    description or epilog written with them (the examples) while wrapping one written as a single paragraph.

    Unlike argparse's ArgumentDefaultsHelpFormatter it leaves out defaults that say nothing (None, False, []) and
    help texts that already name their default in words ("default: any")."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and "default" not in text
            # identity: 0 == False, and a default of 0 is worth showing
            and not any(default is nothing for nothing in (None, False, argparse.SUPPRESS))
            and default != []
        ):
            text += " (default: %(default)s)"
        return text


def _int_type(minimum: int, maximum: int | None = None, why: str = "") -> Callable[[str], int]:
    """An argparse ``type`` reading an integer in [minimum, maximum]; argparse names the option in the message."""

    def parse(text: str) -> int:
        try:
            value: int | None = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            allowed = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}{f' ({why})' if why else ''}"
            shown = repr(text) if value is None or len(text) <= 24 else _checks.show_number(value)
            msg = f"expected an integer {allowed}, got {shown}"
            raise argparse.ArgumentTypeError(msg)
        return value

    parse.__name__ = "integer"
    return parse


def _head_dims(text: str) -> tuple[int, ...]:
    one = _int_type(1)
    try:
        return tuple(one(x.strip()) for x in text.split(","))
    except argparse.ArgumentTypeError:
        msg = f"expected comma-separated positive integers such as 64,128, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _window(text: str) -> tuple[int | None, int | None]:
    """``L,R``: each side an integer >= 0, or -1 / empty / "none" for unbounded (FlashAttention's -1)."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        sides = [None if x.strip().lower() in ("", "-1", "none") else int(x) for x in parts]
        if any(x is not None and x < 0 for x in sides):
            raise ValueError
    except ValueError:
        msg = f"expected L,R with each side an integer >= 0 or -1 (unbounded), such as 128,0, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    return sides[0], sides[1]


def _softcap(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, such as 50, got {text!r}")
    return value


_SIZE_WHY = "the size limit of one array"
_LENGTH = _int_type(1, _checks.MAX_ARRAY_BYTES // 8, _SIZE_WHY)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target",
        metavar="MODULE:FUNCTION",
        help="the candidate, as package.module:function (imported as python -m would, the current directory "
        "first) or path/to/file.py:function: candidate(q_pos, k_pos) for --kind bias, candidate(delta) for buckets, "
        "candidate(q, k, v) for attention, candidate(q, k, v, d_out) -> (dq, dk, dv) or a mapping with dq, dk, dv "
        "and parameter gradients for backward",
    )
    p.add_argument(
        "--kind",
        choices=("bias", "attention", "backward", "buckets"),
        default="bias",
        help="what the candidate computes",
    )
    g = p.add_argument_group("reference bias family")
    g.add_argument(
        "--family",
        choices=FAMILIES,
        default=None,
        help="bias family of the reference (bias: required unless --reference; attention, backward: default none)",
    )
    g.add_argument(
        "--heads",
        type=_int_type(1, _checks.MAX_HEADS),
        help="number of heads H (alibi, sandwich; default for alibi: the length of the slopes in --params)",
    )
    g.add_argument(
        "--params",
        metavar="FILE.npz",
        help="parameter arrays named as the family's constructor arguments (t5: table; offset: table; "
        "alibi: slopes; kerple: r1, r2; fire: w1, b1, w2, b2 and optionally c, L) (default: none; required for "
        "t5, offset, kerple and fire)",
    )
    g.add_argument(
        "--reference",
        metavar="MODULE:NAME",
        help="a relpos_ref family object to use as the reference instead of --family (default: built from --family)",
    )
    g.add_argument(
        "--bidirectional",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="T5 mode: bidirectional (encoder) or causal (decoder)",
    )
    g.add_argument("--num-buckets", type=_int_type(1), default=32, help="T5 number of buckets (--kind buckets)")
    g.add_argument(
        "--max-distance",
        type=_int_type(1, MAX_DISTANCE, "offsets up to 4 x max_distance are checked"),
        default=128,
        help="T5 max_distance: offsets at least this far apart share the last bucket",
    )
    g.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="heads_buckets",
        help="layout of the T5 table in --params: (heads, buckets) or (buckets, heads), as a Hugging Face "
        "nn.Embedding weight stores it",
    )
    g.add_argument(
        "--head-dim", type=_int_type(1), help="Sandwich head dimension d (default: none; required for sandwich)"
    )
    g.add_argument("--fire-eps", type=float, default=0.0, help="FIRE eps, added to the normaliser psi(max(L, i))")
    c = p.add_argument_group("comparison")
    c.add_argument("--q-len", type=_LENGTH, default=8, help="bias: number of queries of the main case")
    c.add_argument("--k-len", type=_LENGTH, default=24, help="bias: number of keys of the main case")
    c.add_argument(
        "--align",
        choices=ALIGNMENTS,
        default="bottom_right",
        help="where the queries sit among the keys: bottom_right (the last query at the last key, as in decoding) "
        "or top_left (query i at position i)",
    )
    c.add_argument(
        "--equivalence",
        choices=EQUIVALENCES,
        default="exact",
        help="bias: what counts as equal to the reference: exact (entry by entry) or row_shift (up to a constant "
        "per query row, which leaves the attention probabilities unchanged)",
    )
    c.add_argument(
        "--causal", action="store_true", help="compare only what a causal mask keeps / causal attention (default: off)"
    )
    c.add_argument(
        "--dtype",
        choices=FLOAT_DTYPES,
        default=None,
        help="bias: dtype whose tolerance applies (default: the output's); attention, backward: input dtype "
        "(default float32)",
    )
    c.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds one candidate call may take before its check is an error (default 600)",
    )
    c.add_argument(
        "--deterministic",
        action="store_true",
        help="attention, backward: require bitwise identical results from two calls (default: within tolerance)",
    )
    c.add_argument(
        "--rtol", type=float, help="override the tolerance rule: |c - r| <= atol + rtol |r| (default: per dtype)"
    )
    c.add_argument(
        "--atol", type=float, help="override the tolerance rule: |c - r| <= atol + rtol |r| (default: per dtype)"
    )
    a = p.add_argument_group("attention")
    a.add_argument(
        "--placement",
        choices=PLACEMENTS,
        default="post_scale",
        help="where the bias joins the logits: post_scale, after the 1/sqrt(D) scale (ALiBi, FlashAttention), or "
        "pre_scale, before it",
    )
    a.add_argument("--scale", type=float, default=None, help="softmax scale (default 1/sqrt(D))")
    a.add_argument("--with-lse", action="store_true", help="the candidate returns (out, lse) (default: out only)")
    a.add_argument(
        "--window",
        type=_window,
        default=None,
        metavar="L,R",
        help="attention: local window the candidate applies, -R <= q_pos - k_pos <= L, -1 unbounded (default: none)",
    )
    a.add_argument(
        "--softcap", type=_softcap, default=None, metavar="C", help="attention: softcap C tanh(s / C) (default: none)"
    )
    a.add_argument(
        "--xp",
        choices=("numpy", "torch", "cupy", "array_api_strict"),
        default="numpy",
        help="library of the q, k, v handed to the candidate",
    )
    a.add_argument("--device", default=None, help="device for --xp, e.g. cuda (default: the library's)")
    a.add_argument(
        "--fully-masked",
        choices=FULLY_MASKED,
        default="zero",
        help="what the candidate returns for a query whose keys are all masked: zero (FlashAttention, xformers) "
        "or nan (a plain softmax over -inf)",
    )
    a.add_argument(
        "--level",
        choices=LEVELS,
        default="default",
        help="attention, backward: kernel-shaped case set: quick (smoke test), default, thorough (nightly)",
    )
    a.add_argument(
        "--tensor-layout",
        choices=TENSOR_LAYOUTS,
        default="bhsd",
        help="layout of q, k, v and the output: bhsd (PyTorch SDPA) or bshd (FlashAttention, xformers, vLLM)",
    )
    a.add_argument(
        "--head-dims",
        type=_head_dims,
        default=None,
        metavar="D[,D...]",
        help="head dims the candidate accepts, e.g. 64,128 (default: any)",
    )
    a.add_argument(
        "--max-q-len", type=_LENGTH, default=None, help="longest query length the candidate accepts (default: any)"
    )
    a.add_argument(
        "--max-k-len", type=_LENGTH, default=None, help="longest key length the candidate accepts (default: any)"
    )
    a.add_argument(
        "--no-gqa",
        dest="gqa",
        action="store_false",
        help="the candidate needs as many kv heads as query heads (default: grouped-query heads are tested too)",
    )
    a.add_argument(
        "--plot-dir",
        default=None,
        help="write the effective-bias heatmaps (PNG) into this directory (default: no plots)",
    )
    a.add_argument("--seed", type=_int_type(0), default=0, help="seed of the random inputs")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH (default: no file)")
    o.add_argument(
        "--xfail",
        action="append",
        default=[],
        metavar="NAME[=REASON]",
        help="declare a known divergence (check name or fnmatch pattern; repeatable; default: none)",
    )
    o.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="exit 0 even when some checks were not run because the candidate did not provide what they compare "
        "(they are still listed)",
    )
    o.add_argument(
        "--quiet", action="store_true", help="print only the table and the verdict (default: the full report)"
    )


class _RaisingParser(argparse.ArgumentParser):
    """A parser whose errors are ValueError (argparse would print usage and exit, which pytest reports as an
    internal error when it happens inside a collection hook)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)


def parse_env_args(target: str, text: str) -> argparse.Namespace:
    """Parse the target and ``RELPOS_REF_ARGS``-style options (everything but the target).

    Raises ValueError naming ``RELPOS_REF_ARGS``, the option, what it expects and what it got."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        msg = f"RELPOS_REF_ARGS: expected options quoted as in a shell, got {text!r} ({exc})"
        raise ValueError(msg) from None
    p = _RaisingParser(prog="RELPOS_REF_ARGS", add_help=False)
    add_arguments(p)
    try:
        return p.parse_args([target, *words])
    except ValueError as exc:
        msg = f"{exc}; got RELPOS_REF_ARGS={text!r} (see 'relpos-ref conform --help' for the options)"
        raise ValueError(msg) from None


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive, or an empty one (np.savez with no arrays)


def _load_params(path_text: str) -> dict[str, np.ndarray]:
    """The arrays of the ``--params`` archive; ValueError naming --params, what it expects and what it got."""
    path = Path(path_text).expanduser()
    expected = "--params: expected an .npz archive of arrays (as numpy.savez writes)"
    if not path.is_file():
        why = "a directory" if path.is_dir() else "no such file"
        msg = f"{expected}, got {path_text!r} ({why})"
        raise ValueError(msg)
    with path.open("rb") as f:
        head = f.read(6)
    if head.startswith(b"\x93NUMPY"):
        msg = f"{expected}, got {path_text!r}, a single-array .npy file (save with numpy.savez(path, name=array))"
        raise ValueError(msg)
    if not head.startswith(_ZIP_MAGIC):
        msg = f"{expected}, got {path_text!r}, which is not a zip archive (an .npz file is one)"
        raise ValueError(msg)
    try:
        # allow_pickle=False: an .npz given on the command line must not run code when it is read.
        # Opened here, not by np.load: it leaves its file open when the archive is corrupt.
        with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        msg = f"{expected}, got {path_text!r}, which cannot be read ({type(exc).__name__}: {exc})"
        raise ValueError(msg) from None


def _reference(args: argparse.Namespace) -> BiasFamily | None:
    if args.reference:
        obj = load_target(args.reference)
        if not isinstance(obj, BiasFamily):
            msg = f"--reference: expected a relpos_ref bias family object, got {type(obj).__name__}"
            raise TypeError(msg)
        return obj
    fam = args.family or "none"
    params: dict[str, Any] = _load_params(args.params) if args.params else {}
    if fam == "none":
        return None
    cls = family_class(fam)
    if cls is ALiBi:
        if "slopes" in params:
            return ALiBi(params["slopes"])
        if args.heads is None:
            raise ValueError("--heads: expected the number of heads for --family alibi (or --params with slopes)")
        return ALiBi.from_num_heads(args.heads)
    if cls is Sandwich:
        if args.heads is None or args.head_dim is None:
            raise ValueError("--heads, --head-dim: expected both for --family sandwich")
        return Sandwich(args.heads, args.head_dim)
    need = _NEEDED_PARAMS[fam]
    missing = [n for n in need if n not in params]
    if missing:
        msg = (
            f"--params: expected an .npz with arrays {list(need)} for --family {fam} (learned parameters the "
            f"candidate uses too), missing {missing}"
        )
        raise ValueError(msg)
    options: dict[str, Any] = {}
    if cls is T5Bias:
        options = {"bidirectional": args.bidirectional, "max_distance": args.max_distance, "layout": args.layout}
    elif cls is FIRE:
        options = {"eps": args.fire_eps, **{k: params[k] for k in ("c", "L") if k in params}}
    return cls(*(params[n] for n in need), **options)


def build_checks(args: argparse.Namespace, candidate: Any = None) -> list[Check]:
    """The suite described by parsed ``conform`` options."""
    if candidate is None:
        candidate = load_target(args.target)
    target = args.target
    if args.kind == "buckets":
        return bucket_checks(
            candidate,
            bidirectional=args.bidirectional,
            num_buckets=args.num_buckets,
            max_distance=args.max_distance,
            target=target,
            timeout=args.timeout,
        )
    ref = _reference(args)
    # The options' destinations are the suites' keywords (--q-len: q_len, ...); the reference is built above.
    given = {**vars(args), "reference": ref, "bias": ref, "target": target}
    # --layout is the T5 table's layout (used by _reference), not the attention tensors' layout of AttentionOptions.
    given.pop("layout")
    given["layout"] = args.tensor_layout
    if args.kind == "bias":
        if ref is None:
            raise ValueError("--family: expected a bias family (or --reference) for --kind bias")
        _BiasSuite.check_candidate(candidate)  # first, as in the public functions
        _check_bias_size(ref.num_heads, args.q_len, args.k_len)
        return _bias_checks(candidate, BiasOptions.of(given))
    backward = args.kind == "backward"
    if backward and args.with_lse:
        raise ValueError("--with-lse: applies to --kind attention, not backward")
    for flag in ("window", "softcap"):
        if backward and getattr(args, flag, None) is not None:
            raise ValueError(f"--{flag}: applies to --kind attention, not backward (the backward harness lacks it)")
    (_BackwardSuite if backward else _AttentionSuite).check_candidate(candidate)  # first, as in the public functions
    options = AttentionOptions.of({**given, "dtype": args.dtype or "float32"})
    return (_backward_checks if backward else _attention_checks)(candidate, options)


def _check_bias_size(heads: int, q_len: int, k_len: int) -> None:
    """--q-len and --k-len each fit an array, but the (H, Sq, Sk) float64 bias they ask for must fit one too."""
    nbytes = 8 * heads * q_len * k_len
    if nbytes > _checks.MAX_ARRAY_BYTES:
        msg = (
            f"--q-len, --k-len: expected an (H, Sq, Sk) float64 bias within the {_checks.MAX_ARRAY_BYTES >> 30} GiB "
            f"size limit of one array, got H={heads} x Sq={q_len} x Sk={k_len} = {nbytes / 2**30:.3g} GiB"
        )
        raise ValueError(msg)


def _check_json_path(path_text: str | None) -> None:
    """Before anything runs: a report that cannot be written is a usage error, found before minutes of checks."""
    if path_text is None:
        return
    path = Path(path_text).expanduser()
    parent = path.absolute().parent
    if path.is_dir():
        msg = f"--json: expected a file path, got {path_text!r}, which is a directory"
        raise ValueError(msg)
    if not parent.is_dir():
        msg = f"--json: expected a file path in an existing directory, got {path_text!r} (no directory {parent})"
        raise ValueError(msg)


def expected_from_args(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, _, reason = item.partition("=")
        out[name.strip()] = reason.strip() or "declared known divergence"
    return out


def main_conform(args: argparse.Namespace) -> int:
    """Run ``relpos-ref conform``; the exit status is described in this module's docstring (0, 1, 2 or 130)."""
    try:
        _check_json_path(args.json)
        checks = build_checks(args)
        expected = expected_from_args(args.xfail)
        _match_expected(checks, expected)  # an unknown check name is a usage error, reported before running
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as exc:
        print(f"relpos-ref conform: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("relpos-ref conform: interrupted", file=sys.stderr)
        return 130
    try:
        report = run_checks(checks, expected_failures=expected)
    except KeyboardInterrupt:
        print("relpos-ref conform: interrupted; no report", file=sys.stderr)
        return 130
    except SystemExit as exc:
        # Checks turn a candidate's SystemExit into an error result; this is the last guard, so that no path
        # through a candidate ends the command with its exit code (sys.exit(0) must never read as a pass).
        print(f"relpos-ref conform: error: the candidate raised SystemExit({exc.code!r}); no report", file=sys.stderr)
        return 1
    print(report.table() if args.quiet else report.text(), end="" if not args.quiet else "\n")
    complete = report.complete or args.allow_incomplete
    verdict = "PASSED" if report.passed and report.complete else "FAILED" if not report.passed else "INCOMPLETE"
    print(f"\n{verdict}: {report.counts()} checks")
    if not report.complete:
        names = ", ".join(c.name for c in report.not_checked)
        consequence = (
            "accepted by --allow-incomplete"
            if args.allow_incomplete
            else "exit status 1 (--allow-incomplete accepts this)"
        )
        print(f"NOT CHECKED: {names}: the candidate did not provide what they compare; {consequence}")
    if args.json:
        try:
            Path(args.json).expanduser().write_text(report.to_json() + "\n", encoding="utf-8")
        except OSError as exc:  # checked before the run, but the directory may have gone or be read-only
            print(f"relpos-ref conform: error: --json: cannot write {args.json!r}: {exc}", file=sys.stderr)
            return 2
    return 0 if report.passed and complete else 1
