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
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

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

__all__ = ["add_arguments", "build_checks", "main_conform", "parse_env_args"]

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
        help="what the candidate computes (default: bias)",
    )
    g = p.add_argument_group("reference bias family")
    g.add_argument(
        "--family",
        choices=FAMILIES,
        default=None,
        help="bias family of the reference (bias: required unless --reference; attention, backward: default none)",
    )
    g.add_argument("--heads", type=int, help="number of heads H (alibi, sandwich)")
    g.add_argument(
        "--params",
        metavar="FILE.npz",
        help="parameter arrays named as the family's constructor arguments (t5: table; offset: table; "
        "alibi: slopes; kerple: r1, r2; fire: w1, b1, w2, b2 and optionally c, L)",
    )
    g.add_argument("--reference", metavar="MODULE:NAME", help="a relpos_ref family object to use as the reference")
    g.add_argument(
        "--bidirectional", action=argparse.BooleanOptionalAction, default=True, help="T5 mode (default: bidirectional)"
    )
    g.add_argument("--num-buckets", type=int, default=32, help="T5 buckets (buckets kind; default 32)")
    g.add_argument("--max-distance", type=int, default=128, help="T5 max_distance (default 128)")
    g.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="heads_buckets",
        help="layout of the T5 table in --params (HF nn.Embedding weight: buckets_heads)",
    )
    g.add_argument("--head-dim", type=int, help="Sandwich head dimension d")
    g.add_argument("--fire-eps", type=float, default=0.0, help="FIRE eps (default 0)")
    c = p.add_argument_group("comparison")
    c.add_argument("--q-len", type=int, default=8, help="bias: number of queries of the main case (default 8)")
    c.add_argument("--k-len", type=int, default=24, help="bias: number of keys of the main case (default 24)")
    c.add_argument("--align", choices=ALIGNMENTS, default="bottom_right")
    c.add_argument("--equivalence", choices=EQUIVALENCES, default="exact")
    c.add_argument("--causal", action="store_true", help="compare only what a causal mask keeps / causal attention")
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
    c.add_argument("--rtol", type=float, help="override the tolerance rule: |c - r| <= atol + rtol |r|")
    c.add_argument("--atol", type=float, help="override the tolerance rule: |c - r| <= atol + rtol |r|")
    a = p.add_argument_group("attention")
    a.add_argument("--placement", choices=PLACEMENTS, default="post_scale")
    a.add_argument("--scale", type=float, default=None, help="softmax scale (default 1/sqrt(D))")
    a.add_argument("--with-lse", action="store_true", help="the candidate returns (out, lse)")
    a.add_argument(
        "--xp",
        choices=("numpy", "torch", "cupy", "array_api_strict"),
        default="numpy",
        help="library of the q, k, v handed to the candidate (default numpy)",
    )
    a.add_argument("--device", default=None, help="device for --xp (e.g. cuda)")
    a.add_argument("--fully-masked", choices=FULLY_MASKED, default="zero")
    a.add_argument(
        "--level",
        choices=LEVELS,
        default="default",
        help="kernel-shaped case set: quick (smoke test), default, thorough (nightly) (default: default)",
    )
    a.add_argument(
        "--tensor-layout",
        choices=TENSOR_LAYOUTS,
        default="bhsd",
        help="layout of q, k, v and the output: bhsd (SDPA) or bshd (FlashAttention, xformers, vLLM) (default bhsd)",
    )
    a.add_argument(
        "--head-dims",
        type=lambda text: tuple(int(x) for x in text.split(",")),
        default=None,
        metavar="D[,D...]",
        help="head dims the candidate accepts, e.g. 64,128 (default: any)",
    )
    a.add_argument("--max-q-len", type=int, default=None, help="longest query length the candidate accepts")
    a.add_argument("--max-k-len", type=int, default=None, help="longest key length the candidate accepts")
    a.add_argument(
        "--no-gqa", dest="gqa", action="store_false", help="the candidate needs as many kv heads as query heads"
    )
    a.add_argument("--plot-dir", default=None, help="write the effective-bias heatmaps (PNG) into this directory")
    a.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    o.add_argument(
        "--xfail",
        action="append",
        default=[],
        metavar="NAME[=REASON]",
        help="declare a known divergence (check name or fnmatch pattern; repeatable)",
    )
    o.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="exit 0 even when some checks were not run because the candidate did not provide what they compare "
        "(they are still listed)",
    )
    o.add_argument("--quiet", action="store_true", help="print only the table and the verdict")


def parse_env_args(target: str, text: str) -> argparse.Namespace:
    """Parse the target and ``RELPOS_REF_ARGS``-style options (everything but the target)."""
    p = argparse.ArgumentParser(prog="RELPOS_REF_ARGS", add_help=False, exit_on_error=False)
    add_arguments(p)
    return p.parse_args([target, *shlex.split(text)])


def _reference(args: argparse.Namespace) -> BiasFamily | None:
    if args.reference:
        obj = load_target(args.reference)
        if not isinstance(obj, BiasFamily):
            msg = f"--reference: expected a relpos_ref bias family object, got {type(obj).__name__}"
            raise TypeError(msg)
        return obj
    fam = args.family or "none"
    params: dict[str, Any] = {}
    if args.params:
        with np.load(args.params) as data:
            params = {k: np.asarray(data[k]) for k in data.files}
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
        return _bias_checks(candidate, BiasOptions.of(given))
    backward = args.kind == "backward"
    if backward and args.with_lse:
        raise ValueError("--with-lse: applies to --kind attention, not backward")
    (_BackwardSuite if backward else _AttentionSuite).check_candidate(candidate)  # first, as in the public functions
    options = AttentionOptions.of({**given, "dtype": args.dtype or "float32"})
    return (_backward_checks if backward else _attention_checks)(candidate, options)


def expected_from_args(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, _, reason = item.partition("=")
        out[name.strip()] = reason.strip() or "declared known divergence"
    return out


def main_conform(args: argparse.Namespace) -> int:
    """Run ``relpos-ref conform``; the exit status is described in this module's docstring (0, 1, 2 or 130)."""
    try:
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
    if args.json:
        Path(args.json).write_text(report.to_json() + "\n", encoding="utf-8")
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
    return 0 if report.passed and complete else 1
