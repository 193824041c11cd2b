"""``relpos-ref verify``: every family and the attention path on every available backend and dtype.

Each case is computed on a backend in a dtype and compared with NumPy float64 evaluated on the *same* rounded inputs
(parameters and q/k/v are rounded to the dtype first, then widened exactly), so the error measured is the error of the
computation, not of the input rounding. A case passes when its normwise error is within the dtype's tolerance
(``TOLERANCES``) and every quick property holds.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

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

__all__ = ["TOLERANCES", "available_backends", "run_verify"]

SQ, SK = 24, 40  # Sq != Sk so alignment matters; bottom-right puts the queries at positions 16..39.


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

        if cupy.is_available():
            cp_xp = _checks.compat_namespace("cupy")

            out.append(("cupy", cp_xp, None))
        else:
            out.append(("cupy", None, "no CUDA GPU available"))
    except Exception as exc:
        out.append(("cupy", None, f"not usable ({type(exc).__name__})"))
    return out


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


def format_table(rows: list[Row]) -> str:
    head = (
        f"{'case':<30} {'backend':<17} {'dtype':<8} {'max abs err':>11} {'max rel err':>11} {'tolerance':>10} "
        f"{'result':<6} properties"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.case.startswith("properties"):
            errs = tol = "-"
            ae = re_ = "-"
        else:
            ae, re_ = f"{r.max_abs:.2e}", f"{r.max_rel:.2e}"
            tol = f"{r.tolerance * r.scale:.1e}"
            errs = ""
        props = ", ".join(f"{n} {'ok' if ok else 'FAIL'}" for n, ok in r.properties) or errs
        if r.error:
            props = f"ERROR {r.error}"
        lines.append(
            f"{r.case:<30} {r.backend:<17} {r.dtype:<8} {ae:>11} {re_:>11} {tol:>10} "
            f"{'ok' if r.passed else 'FAIL':<6} {props}"
        )
    return "\n".join(lines)


def main_verify(args: Any) -> int:
    start = time.perf_counter()
    backends = args.backend or None
    dtypes = tuple(args.dtype or ("float64", "float32", "float16"))
    rows, notes = run_verify(backends=backends, dtypes=dtypes, seed=args.seed)
    print("Backend agreement: each backend and dtype against NumPy float64 on the same rounded inputs")
    print(format_table(rows))
    for n in notes:
        print(f"note: {n}")
    failed = [r for r in rows if not r.passed]
    n_props = sum(len(r.properties) for r in rows)
    print(
        f"{len(rows) - len(failed)} of {len(rows)} rows passed ({n_props} property checks); tolerance = normwise, "
        f"max|x - x64| <= tol * max(1, max|x64|), tol = {TOLERANCES}"
    )

    oracle_failed = _print_oracle(backends, dtypes, thorough=args.thorough)
    print(f"\nverify finished in {time.perf_counter() - start:.1f} s")
    if failed or oracle_failed:
        print(f"FAILED: {len(failed)} agreement rows, {oracle_failed} oracle rows")
        return 1
    print("OK")
    return 0


def _print_oracle(backends: Iterable[str] | None, dtypes: tuple[str, ...], *, thorough: bool) -> int:
    """The error of every family, the softmax and attention against the mpmath oracle, next to the documented bound
    (``spec/tolerances.md``); returns the number of rows over their bound."""
    from .bounds import format_table as oracle_format
    from .bounds import oracle_table

    namespaces = [
        xp for name, xp, _ in available_backends() if xp is not None and (backends is None or name in backends)
    ]
    wanted = list(dtypes)
    try:
        import ml_dtypes  # noqa: F401  (bfloat16 on NumPy)

        wanted.append("bfloat16")
    except ImportError:
        pass
    print(
        f"\nAgainst the mpmath oracle (50 digits), {'thorough' if thorough else 'default'} case set: max error vs the "
        "documented bound (err/bound <= 1 passes)"
    )
    rows = oracle_table(namespaces, wanted, thorough=thorough)
    print(oracle_format(rows))
    bad = [r for r in rows if not r["passed"]]
    print(f"{len(rows) - len(bad)} of {len(rows)} oracle rows within their bound")
    return len(bad)
