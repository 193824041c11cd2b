"""``relpos-ref verify``: every family and the attention path on every available backend and dtype.

Each case is computed on a backend in a dtype and compared with NumPy float64 evaluated on the *same* rounded inputs
(parameters and q/k/v are rounded to the dtype first, then widened exactly), so the error measured is the error of the
computation, not of the input rounding. A case passes when its normwise error is within the dtype's tolerance
(``TOLERANCES``) and every quick property holds.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import textwrap
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

import numpy as np

from . import _checks
from .attention import attention
from .families import BiasFamily, example_family, t5_bucket
from .gradients import attention_vjp
from .positions import causal_mask, positions
from .properties import (
    causal_no_future_leak,
    heads_subset,
    kv_cache_suffix,
    offset_only,
    offset_only_horizon,
    penalty_monotone,
    probabilities,
    softmax_shift_invariance,
    t5_buckets,
    zero_at_zero,
)
from .softmax import biased_softmax
from .testing import max_errors, to_numpy
from .tolerances import VERIFY_TOLERANCES as TOLERANCES

__all__ = ["TOLERANCES", "available_backends", "format_table", "run_verify", "unrunnable"]

SQ, SK = 24, 40  # Sq != Sk so alignment matters; bottom-right puts the queries at positions 16..39.
WIDTH = 119  # every printed line stays under 120 columns


@dataclasses.dataclass
class Row:
    case: str
    backend: str
    dtype: str
    max_abs: float
    max_rel: float
    tolerance: float
    properties: list[tuple[str, bool]]
    error: str | None = None

    @property
    def passed(self) -> bool:
        props = all(ok for _, ok in self.properties)
        return self.error is None and props and self.max_abs <= self.tolerance * self.scale

    scale: float = 1.0


def available_backends() -> list[tuple[str, Any, str | None]]:
    """(name, namespace or None, reason when unavailable) for numpy, array_api_strict and cupy."""
    np_xp = _checks.default_namespace()

    out: list[tuple[str, Any, str | None]] = [("numpy", np_xp, None)]
    try:
        import array_api_strict as strict

        out.append(("array_api_strict", strict, None))
    except ImportError:
        out.append(("array_api_strict", None, "not installed (pip install array-api-strict)"))
    try:
        import cupy
    except ImportError:
        out.append(("cupy", None, "not installed (pip install 'relpos_ref[cuda12]' or '[cuda13]' on a CUDA machine)"))
        return out
    except Exception as exc:  # a broken CUDA library can fail the import itself
        out.append(("cupy", None, f"installed, but its import failed ({type(exc).__name__}: {exc})"))
        return out
    try:
        if cupy.is_available():
            cp_xp = _checks.compat_namespace("cupy")

            out.append(("cupy", cp_xp, None))
        else:
            out.append(("cupy", None, "installed, but no CUDA GPU is available"))
    except Exception as exc:  # a broken CUDA install raises anything from is_available() or the namespace
        out.append(("cupy", None, f"installed, but not usable ({type(exc).__name__}: {exc})"))
    return out


def unrunnable(backends: Iterable[str], dtypes: Iterable[str]) -> list[str]:
    """Why each of the requested ``backends`` cannot run (not installed, no GPU, none of ``dtypes``); [] when all can.

    Asking for a backend by name and getting "0 of 0 rows passed ... OK" would read as a pass of something never
    run, so the caller turns each reason into a failure."""
    wanted, dtypes = set(backends), list(dtypes)
    reasons = []
    for name, xp, reason in available_backends():
        if name not in wanted:
            continue
        if xp is None:
            reasons.append(f"--backend {name} cannot run here: {reason}")
        elif not any(getattr(xp, d, None) is not None for d in dtypes):
            reasons.append(
                f"--backend {name} cannot run here: it has none of the dtypes asked for ({', '.join(dtypes)})"
            )
    return reasons


def _families(rng: np.random.Generator) -> dict[str, BiasFamily]:
    """The verify rows' families, drawn in this order from one generator (the row names are verify's own)."""
    h = 4
    return {
        "t5_bidirectional": example_family("t5", h, rng=rng, bidirectional=True),
        "t5_causal": example_family("t5", h, rng=rng),
        "offset": example_family("offset", h, rng=rng),
        "alibi": example_family("alibi", h, rng=rng),
        "kerple_power": example_family("kerple_power", h, rng=rng),
        "kerple_log": example_family("kerple_log", h, rng=rng),
        # L = 20 < the largest query position, so the normaliser's max(L, i) takes both branches.
        "fire": example_family("fire", h, rng=rng),
        "sandwich": example_family("sandwich", h, rng=rng),
        "tensor": example_family("tensor", h, rng=rng, shape=(SQ, SK)),
    }


def _convert_family(fam: BiasFamily, xp: Any, dtype_name: str) -> BiasFamily:
    return fam.astype(getattr(xp, dtype_name), xp=xp)


def _as64(fam_low: BiasFamily) -> BiasFamily:
    np_xp = _checks.default_namespace()

    return fam_low.astype(np_xp.float64, xp=np_xp)


def _props_family(fam: BiasFamily, xp: Any, name: str) -> list[tuple[str, bool]]:
    """Quick structural properties of one family on one backend (float64): those its class traits promise."""
    horizon = offset_only_horizon(fam)
    if horizon == -math.inf:
        return []  # not a function of positions (a TensorBias has its own (Sq, Sk) grid only)
    q = xp.asarray([3, 9, 15], dtype=xp.int64)
    k = xp.arange(0, 16, dtype=xp.int64)
    shift = 4
    results = []
    # FIRE is offset-only too while every query position is <= L (here at most 19 against L = 20).
    if horizon >= int(xp.max(q)) + shift:
        results.append(offset_only(fam.bias, q, k, shift))
    results.append(heads_subset(fam.bias, q, k, [2]))
    if fam.zero_at_zero:
        results.append(zero_at_zero(fam.bias, q))
    if fam.monotone:
        results.append(penalty_monotone(fam.bias, 200, xp=xp, sides=("past",)))  # |Delta| = 0..200
    if fam.name == "t5":
        opts = fam.options()
        md = opts["max_distance"]
        cfg = {"bidirectional": opts["bidirectional"], "num_buckets": fam.num_buckets, "max_distance": md}
        results.append(t5_buckets(t5_bucket, 4 * md - 1, xp=xp, **cfg))
    return [(r.name, r.passed) for r in results]


def _props_attention(fam: BiasFamily, xp: Any, rng: np.random.Generator) -> list[tuple[str, bool]]:
    """Causal independence from future keys, rows summing to 1, KV-cache suffix consistency, shift invariance."""
    h = fam.num_heads
    q = rng.standard_normal((1, h, SQ, 8))
    k = rng.standard_normal((1, 2, SK, 8))
    v = rng.standard_normal((1, 2, SK, 8))
    qx, kx, vx = (xp.asarray(a) for a in (q, k, v))
    # Future keys: change every key after query 5 (position SK - SQ + 5); rows 0..5 must not move.
    k2, v2 = xp.asarray(k + 3.0), xp.asarray(v - 3.0)
    results = [causal_no_future_leak(attention, qx, kx, vx, k2, v2, rows=[5], bias=fam)]
    if offset_only_horizon(fam) > -math.inf:  # a function of positions (a TensorBias has one (Sq, Sk) grid)
        qp, kp = positions(SQ, SK, xp=xp)
        s = xp.asarray(rng.standard_normal((h, SQ, SK)))
        b = fam.bias(qp, kp)
        results.append(probabilities(biased_softmax, s, b, mask=causal_mask(qp, kp), atol=1e-12))
        results.append(kv_cache_suffix(attention, qx, kx, vx, 3, bias=fam, atol=1e-12))
        shift = xp.asarray(rng.standard_normal((h, SQ)) * 100)
        results.append(softmax_shift_invariance(biased_softmax, s, b, shift, atol=1e-12, lse_atol=1e-10))
    return [(r.name, r.passed) for r in results]


def _cases(rng: np.random.Generator) -> list[tuple[str, Callable[[Any, str], tuple[Any, Any]]]]:
    """(name, fn(xp, dtype) -> (value on backend, float64 NumPy value on the same rounded inputs))."""
    np_xp = _checks.default_namespace()

    fams = _families(rng)
    cases: list[tuple[str, Callable[[Any, str], tuple[Any, Any]]]] = []
    q = rng.standard_normal((2, 4, SQ, 16))
    k = rng.standard_normal((2, 2, SK, 16))
    v = rng.standard_normal((2, 2, SK, 16))

    def bias_case(fam: BiasFamily) -> Callable[[Any, str], tuple[Any, Any]]:
        def run(xp: Any, dtype: str) -> tuple[Any, Any]:
            low = _convert_family(fam, xp, dtype)
            qp, kp = positions(SQ, SK, xp=xp)
            ref = _as64(low).bias(*positions(SQ, SK))
            return low.bias(qp, kp), ref

        return run

    def attn_case(fam: BiasFamily, placement: str) -> Callable[[Any, str], tuple[Any, Any]]:
        def run(xp: Any, dtype: str) -> tuple[Any, Any]:
            low = _convert_family(fam, xp, dtype)
            dt = getattr(xp, dtype)
            qx, kx, vx = (xp.asarray(a, dtype=dt) for a in (q, k, v))
            q64, k64, v64 = (to_numpy(a).astype(np.float64) for a in (qx, kx, vx))
            got = attention(qx, kx, vx, bias=low, causal=True, placement=placement, block_size=7)
            want = attention(
                np_xp.asarray(q64),
                np_xp.asarray(k64),
                np_xp.asarray(v64),
                bias=_as64(low),
                causal=True,
                placement=placement,
            )
            return got, want

        return run

    d_out = rng.standard_normal((2, 4, SQ, 16))

    def grad_case(fam: BiasFamily, placement: str) -> Callable[[Any, str], tuple[Any, Any]]:
        # Every gradient (dq, dk, dv, each parameter's) flattened into one vector, so one row covers them all.
        def run(xp: Any, dtype: str) -> tuple[Any, Any]:
            low = _convert_family(fam, xp, dtype)
            dt = getattr(xp, dtype)
            args = [xp.asarray(a, dtype=dt) for a in (q, k, v, d_out)]
            args64 = [np_xp.asarray(to_numpy(a).astype(np.float64)) for a in args]
            opts = {"causal": True, "placement": placement, "block_size": 7, "kv_block_size": 9}
            got = attention_vjp(*args, bias=low, **opts)
            want = attention_vjp(*args64, bias=_as64(low), **opts)
            return _flat(got), _flat(want)

        return run

    for name, fam in fams.items():
        cases.append((f"bias {name}", bias_case(fam)))
    for name, fam in fams.items():
        cases.append((f"attention {name}", attn_case(fam, "post_scale")))
    cases.append(("attention alibi pre_scale", attn_case(fams["alibi"], "pre_scale")))
    for name, fam in fams.items():
        cases.append((f"gradients {name}", grad_case(fam, "post_scale")))
    cases.append(("gradients kerple_log pre_scale", grad_case(fams["kerple_log"], "pre_scale")))

    # The kernel features, one row each (forward) and all at once (gradients): ragged lengths and packed segments
    # per batch row, explicit per-row positions, a window narrower than the rows, a softcap below
    # the largest logits.
    seg = np.asarray([[0] * 10 + [1] * 14, [0] * 5 + [1] * 19])
    kseg = np.asarray([[0] * 20 + [1] * 20, [0] * 12 + [1] * 28])
    features: dict[str, dict[str, Any]] = {
        "window": {"window": (9, 3)},
        "softcap": {"softcap": 2.5},
        # Per-row query positions (row 1 seven keys behind row 0), offsets as short as elsewhere: verify's fixed
        # tolerances are for logits of order 1, and a bias of -m * 1000 rounds by more in float32.
        "positions": {"q_pos": np.arange(SK - SQ, SK)[None] - np.asarray([[0], [7]]), "k_pos": np.arange(SK)},
        "lengths": {"q_lens": np.asarray([SQ, 11]), "k_lens": np.asarray([SK, 19])},
        "segments": {"q_segment_ids": seg, "k_segment_ids": kseg, "segment_positions": "restart"},
    }

    def on(xp: Any, opts: dict[str, Any]) -> dict[str, Any]:
        return {n: xp.asarray(a) if isinstance(a, np.ndarray) else a for n, a in opts.items()}

    def feature_case(opts: dict[str, Any], *, grads: bool) -> Callable[[Any, str], tuple[Any, Any]]:
        fam = fams["alibi"]

        def run(xp: Any, dtype: str) -> tuple[Any, Any]:
            low = _convert_family(fam, xp, dtype)
            dt = getattr(xp, dtype)
            args = [xp.asarray(a, dtype=dt) for a in ((q, k, v, d_out) if grads else (q, k, v))]
            args64 = [np_xp.asarray(to_numpy(a).astype(np.float64)) for a in args]
            causal = not opts.get("segment_positions")
            fn = attention_vjp if grads else attention
            # Small tiles on the backend, one block in the reference: float64 NumPy then still compares two paths.
            got = fn(*args, bias=low, causal=causal, block_size=7, kv_block_size=9, **on(xp, opts))
            want = fn(*args64, bias=_as64(low), causal=causal, **on(np_xp, opts))
            return (_flat(got), _flat(want)) if grads else (got, want)

        return run

    for name, opts in features.items():
        cases.append((f"attention alibi {name}", feature_case(opts, grads=False)))
    combined = {**features["window"], **features["softcap"], **features["lengths"]}
    cases.append(("gradients alibi win+cap+lens", feature_case(combined, grads=True)))
    cases.append(("gradients alibi segments", feature_case(features["segments"], grads=True)))
    return cases


def _flat(g: Any) -> np.ndarray:
    parts = [g.dq, g.dk, g.dv, *(g.dbias.values() if isinstance(g.dbias, dict) else [])]
    return np.concatenate([to_numpy(a).astype(np.float64).reshape(-1) for a in parts])


def run_verify(
    *,
    backends: Iterable[str] | None = None,
    dtypes: Iterable[str] = ("float64", "float32", "float16"),
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Row], list[str]]:
    """Run the verification matrix. Returns (rows, notes on what was skipped and why)."""
    notes: list[str] = []
    chosen = []
    for name, xp, reason in available_backends():
        if backends is not None and name not in backends:
            continue
        if xp is None:
            notes.append(f"backend {name} skipped: {reason}")
            continue
        chosen.append((name, xp))
    rows: list[Row] = []
    for bname, xp in chosen:
        for dtype in dtypes:
            if getattr(xp, dtype, None) is None:
                notes.append(f"{bname} has no {dtype} (not required by the array API standard); skipped")
                continue
            rng = np.random.default_rng(seed)
            for case, fn in _cases(rng):
                if progress:
                    progress(f"{bname} {dtype} {case}")
                try:
                    got, want = fn(xp, dtype)
                    abs_err, rel_err = max_errors(got, want)
                    scale = max(1.0, float(np.nanmax(np.abs(np.where(np.isfinite(w := to_numpy(want)), w, 0)))))
                    if case.startswith("gradients"):
                        # Entrywise relative errors of a vector of many gradients mean little (an exact 0 in one
                        # inactive FIRE unit is 1e-8 in float32); report the normwise one the tolerance uses.
                        rel_err = abs_err / scale
                    row = Row(case, bname, dtype, abs_err, rel_err, TOLERANCES[dtype], [], scale=scale)
                except Exception as exc:
                    row = Row(
                        case,
                        bname,
                        dtype,
                        math.inf,
                        math.inf,
                        TOLERANCES[dtype],
                        [],
                        error=f"{type(exc).__name__}: {exc}",
                    )
                rows.append(row)
        # Properties once per backend, in float64 (float32 where float64 is missing).
        prop_dtype = "float64" if getattr(xp, "float64", None) is not None else "float32"
        rng = np.random.default_rng(seed)
        for name, fam in _families(rng).items():
            if progress:
                progress(f"{bname} properties {name}")
            fam_x = _convert_family(fam, xp, prop_dtype)
            try:
                props = _props_family(fam_x, xp, name) + _props_attention(fam_x, xp, np.random.default_rng(seed))
                err = None
            except Exception as exc:
                props, err = [], f"{type(exc).__name__}: {exc}"
            rows.append(Row(f"properties {name}", bname, prop_dtype, 0.0, 0.0, 0.0, props, error=err))
    return rows, notes


AGREEMENT_LEGEND = (
    "max abs err = max |x - x64| over the entries; bound = tol[dtype] x max(1, max |x64|) (normwise; tol = {tol}); "
    "a row passes when max abs err <= bound, i.e. err/bound <= 1, and every property holds."
)


def _fit(line: str, prefix: str, text: str) -> list[str]:
    """``line`` followed by ``text``, wrapped so each line fits WIDTH, continuation lines aligned under the text."""
    if not text:
        return [line.rstrip()]
    indent = " " * len(prefix)
    wrapped = textwrap.wrap(text, width=WIDTH, initial_indent=prefix, subsequent_indent=indent, break_on_hyphens=False)
    return [line + wrapped[0][len(prefix) :], *wrapped[1:]]


def format_table(rows: list[Row]) -> str:
    """The agreement table: per row the max abs error, the bound it is compared with, their ratio and the result."""
    head = f"{'case':<30} {'backend':<16} {'dtype':<7} {'result':<6} {'max abs err':>11} {'bound':>9} {'err/bound':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        start = f"{r.case:<30} {r.backend:<16} {r.dtype:<7} {'ok' if r.passed else 'FAIL':<6} "
        props = ", ".join(f"{n} {'ok' if ok else 'FAIL'}" for n, ok in r.properties)
        if r.case.startswith("properties"):
            note = f"ERROR {r.error}" if r.error else props
            lines += _fit(start, " " * len(start), note)
            continue
        bound = r.tolerance * r.scale
        if r.error:
            lines += _fit(start, " " * len(start), f"ERROR {r.error}")
            continue
        ratio = r.max_abs / bound if bound > 0 else math.inf if r.max_abs > 0 else 0.0
        lines.append(f"{start}{r.max_abs:>11.2e} {bound:>9.1e} {ratio:>9.3f}".rstrip())
        if props:
            lines += _fit(" " * len(start), " " * len(start), props)
    return "\n".join(lines)


def _format_oracle(rows: list[dict[str, Any]]) -> str:
    """The oracle table: per row the error of the entry closest to its bound, that bound and their ratio."""
    head = (
        f"{'family':<14} {'backend':<16} {'dtype':<8} {'entries':>7}  {'ok':<3} {'err there':>10} {'bound there':>11}"
    )
    head += f" {'err/bound':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        backend = r["backend"].replace("array_api_compat.", "")
        worst_err = r["ratio"] * r["bound"]  # the entry with the largest err/bound: err = ratio x its bound
        lines.append(
            f"{r['family']:<14} {backend:<16} {r['dtype']:<8} {r['cases']:>7}  {'yes' if r['passed'] else 'NO':<3} "
            f"{worst_err:>10.3g} {r['bound']:>11.3g} {r['ratio']:>9.3f}"
        )
    return "\n".join(lines)


class Progress:
    """Progress of the long steps on stderr: on a terminal one status line rewritten in place (``\\r``), otherwise a
    plain line each time a new stage (a backend and dtype) starts, so a log gets a few lines, not hundreds."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        isatty = getattr(self.stream, "isatty", None)
        self.tty = enabled and callable(isatty) and bool(isatty())
        self.start = time.perf_counter()
        self.stage: str | None = None
        self.shown = 0

    def __call__(self, stage: str, item: str = "") -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        if self.tty:
            text = f"verify {elapsed:5.1f} s: {stage} {item}".rstrip()[: WIDTH - 1]
            self.stream.write("\r" + text.ljust(self.shown))
            self.shown = len(text)
            self.stream.flush()
        elif stage != self.stage:
            self.stream.write(f"verify {elapsed:5.1f} s: {stage}\n")
            self.stream.flush()
        self.stage = stage

    def close(self) -> None:
        """Erase the status line (a terminal), so the tables that follow start on a clean line."""
        if self.tty and self.shown:
            self.stream.write("\r" + " " * self.shown + "\r")
            self.stream.flush()
        self.shown = 0


def main_verify(args: Any) -> int:
    """Run ``relpos-ref verify``: 0 when every row passes, 1 on a failure or when a requested backend cannot run."""
    start = time.perf_counter()
    backends = args.backend or None
    dtypes = tuple(args.dtype or ("float64", "float32", "float16"))
    reasons = unrunnable(backends, dtypes) if backends else []
    if reasons:
        for reason in reasons:
            print(f"relpos-ref verify: FAILED: {reason}", file=sys.stderr)
        return 1
    progress = Progress(enabled=not getattr(args, "no_progress", False))

    def case_progress(text: str) -> None:
        bname, dtype, case = text.split(" ", 2)  # run_verify's "<backend> <dtype or 'properties'> <case>"
        progress(f"agreement {bname} {dtype}", case)

    try:
        rows, notes = run_verify(backends=backends, dtypes=dtypes, seed=args.seed, progress=case_progress)
    finally:
        progress.close()
    print("Backend agreement: each backend and dtype against NumPy float64 on the same rounded inputs")
    tol = ", ".join(f"{k} {v:g}" for k, v in TOLERANCES.items())
    print(textwrap.fill(AGREEMENT_LEGEND.format(tol=tol), width=WIDTH))
    print(format_table(rows))
    for n in notes:
        print(f"note: {n}")
    failed = [r for r in rows if not r.passed]
    n_props = sum(len(r.properties) for r in rows)
    print(f"{len(rows) - len(failed)} of {len(rows)} agreement rows passed ({n_props} property checks)")

    oracle_failed = _print_oracle(backends, dtypes, thorough=args.thorough, progress=progress)
    print(f"\nverify finished in {time.perf_counter() - start:.1f} s")
    if not rows:
        print("FAILED: nothing was checked (no backend and dtype asked for can run here)")
        return 1
    if failed or oracle_failed:
        print(f"FAILED: {len(failed)} agreement rows, {oracle_failed} oracle rows")
        return 1
    print("OK")
    return 0


def _print_oracle(
    backends: Iterable[str] | None, dtypes: tuple[str, ...], *, thorough: bool, progress: Progress | None = None
) -> int:
    """The error of every family, the softmax and attention against the mpmath oracle, next to the documented bound
    (``spec/tolerances.md``); returns the number of rows over their bound."""
    from .bounds import oracle_table

    named = [
        (name, xp) for name, xp, _ in available_backends() if xp is not None and (backends is None or name in backends)
    ]
    wanted = list(dtypes)
    try:
        import ml_dtypes  # noqa: F401  (bfloat16 on NumPy)

        wanted.append("bfloat16")
    except ImportError:
        pass
    kind = "thorough" if thorough else "default"
    legend = (
        f"Against the mpmath oracle (50 digits), {kind} case set. Each entry's error |x - oracle| has its own bound "
        "(spec/tolerances.md), which grows with the entry's magnitude; 'there' is the entry with the largest "
        "err/bound, and a row passes when that ratio is <= 1."
    )
    print("\n" + textwrap.fill(legend, width=WIDTH))
    rows: list[dict[str, Any]] = []
    try:
        # One backend and dtype per call, in oracle_table's own order, so progress can be shown between them.
        for name, xp in named:
            for dtype in wanted:
                if progress is not None:
                    progress(f"oracle {name} {dtype}")
                rows += oracle_table([xp], [dtype], thorough=thorough)
    finally:
        if progress is not None:
            progress.close()
    print(_format_oracle(rows))
    bad = [r for r in rows if not r["passed"]]
    print(f"{len(rows) - len(bad)} of {len(rows)} oracle rows within their bound")
    return len(bad)
