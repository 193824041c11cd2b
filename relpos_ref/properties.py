"""The structural properties of biases and attention, each checked once for verify, the tests and the harness."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from ._checks import array_device, array_namespace
from ._host import host_numpy
from .positions import positions

__all__ = [
    "PropertyResult",
    "causal_no_future_leak",
    "heads_subset",
    "kv_cache_suffix",
    "offset_only",
    "offset_only_horizon",
    "penalty_monotone",
    "probabilities",
    "softmax_shift_invariance",
    "t5_buckets",
    "zero_at_zero",
]

BiasFn = Callable[..., Any]


class PropertyResult(NamedTuple):
    """Outcome of one property check.

    Attributes
    ----------
    name : str
        The property (``"offset-only"``, ``"monotone"``, ...), as verify prints it.
    passed : bool
        Whether the property holds on the evaluated inputs.
    detail : str
        What was compared; on failure, the first violation.
    worst : float
        Size of the largest violation (0 when there is none; infinite for a NaN or a shape mismatch).
    index : tuple of int, optional
        First violating entry of the evaluated array (documented per check), None when passed.

    Notes
    -----
    Every check evaluates the code it is given (a ``bias(q_pos, k_pos)`` callable such as a family's ``.bias`` or a
    conformance candidate, a softmax, an attention, a bucket function) on arrays of any namespace and compares in
    that namespace. Equal entries (matching infinities, NaN against NaN) count as equal and a NaN or infinity on one
    side only as an infinite difference; ``atol = 0`` is exact (up to the sign of zero). The tolerance of a
    floating-point comparison is the caller's: the tests derive rounding bounds, verify uses fixed float64 figures,
    the harness its tolerance rule. Tests turn a failure into ``AssertionError`` with :meth:`require`.
    """

    name: str
    passed: bool
    detail: str
    worst: float = 0.0
    index: tuple[int, ...] | None = None

    def require(self) -> PropertyResult:
        """This result when it passed; otherwise raise ``AssertionError`` with the name and detail."""
        if not self.passed:
            raise AssertionError(f"{self.name}: {self.detail}")
        return self


# -- shared comparison ------------------------------------------------------------------------------------------


def _errors(xp: Any, actual: Any, desired: Any) -> Any:
    """|actual - desired| entrywise: equal entries (NaN against NaN) 0, a one-sided NaN or infinity infinite.

    Only finite pairs are subtracted, so no floating-point warning is raised.
    """
    same = (actual == desired) | (xp.isnan(actual) & xp.isnan(desired))
    fin = xp.isfinite(actual) & xp.isfinite(desired)
    zero = xp.zeros_like(actual)
    diff = xp.abs(xp.where(fin, actual, zero) - xp.where(fin, desired, zero))
    return xp.where(fin, diff, xp.where(same, zero, xp.full_like(actual, math.inf)))


def _first_true(xp: Any, mask: Any) -> tuple[int, ...] | None:
    """Index of the first True entry of ``mask`` in C order, None when there is none."""
    if not bool(xp.any(mask)):
        return None
    flat = int(xp.argmax(xp.reshape(xp.astype(mask, xp.int8), (-1,))))
    out = []
    for n in reversed(tuple(mask.shape)):
        out.append(flat % n)
        flat //= n
    return tuple(reversed(out))


def _entry(x: Any, index: tuple[int, ...]) -> float:
    return float(x[index])


def _compare(
    name: str, actual: Any, desired: Any, atol: Any, what: str, violations: Callable[[Any, Any], Any] | None = None
) -> PropertyResult:
    """``actual`` against ``desired``: equal shapes and no entry further apart than ``atol`` (or ``violations``)."""
    if tuple(actual.shape) != tuple(desired.shape):
        shapes = f"shape {tuple(actual.shape)}, expected {tuple(desired.shape)}"
        return PropertyResult(name, False, f"{what}: {shapes}", math.inf)
    xp = array_namespace(actual, desired)
    err = _errors(xp, actual, desired)
    if violations is not None:
        bad = xp.asarray(violations(actual, desired))
    else:
        tol = atol if isinstance(atol, int | float) else xp.asarray(atol, device=array_device(actual))
        bad = err > tol
    index = _first_true(xp, bad)
    worst = float(xp.max(xp.where(bad, err, xp.zeros_like(err)))) if index is not None else 0.0
    if index is None:
        return PropertyResult(name, True, what)
    detail = (
        f"{what}: {int(xp.sum(xp.astype(bad, xp.int64)))} entries differ, first at {index}: "
        f"{_entry(actual, index)!r} vs {_entry(desired, index)!r}"
    )
    return PropertyResult(name, False, detail, worst, index)


def _int_positions(xp: Any, values: Sequence[int] | range, device: Any = None) -> Any:
    return xp.asarray(list(values), dtype=xp.int64, device=device)


def _wide(xp: Any, x: Any) -> Any:
    """``x`` in float64 where the namespace has it (sums of probabilities), else unchanged."""
    f64 = getattr(xp, "float64", None)
    return x if f64 is None or x.dtype == f64 else xp.astype(x, f64)


# -- bias properties --------------------------------------------------------------------------------------------


def offset_only_horizon(family: Any) -> float:
    r"""The largest query position up to which ``family`` depends on :math:`\Delta = i - j` alone.

    Parameters
    ----------
    family : BiasFamily

    Returns
    -------
    float
        ``inf`` for a family with the ``offset_only`` trait; FIRE's :math:`L` (the trait's one exception: FIRE is
        offset-only while every query position is :math:`\le L`); ``-inf`` otherwise (a TensorBias is no function of
        positions at all, only of its own (Sq, Sk) grid).
    """
    if family.offset_only:
        return math.inf
    if type(family).name == "fire":
        return float(host_numpy(family.parameters()["L"]))
    return -math.inf


def offset_only(
    bias: BiasFn,
    q_pos: Any,
    k_pos: Any,
    shift: int,
    *,
    atol: Any = 0.0,
    violations: Callable[[Any, Any], Any] | None = None,
) -> PropertyResult:
    r""":math:`b(i + s, j + s) = b(i, j)`: the bias depends on :math:`i - j` alone.

    Parameters
    ----------
    bias : callable
        ``bias(q_pos, k_pos)`` returning (H, Sq, Sk): a family's ``.bias`` or a harness candidate. It is called on
        ``(q_pos, k_pos)`` first, then on the shifted positions.
    q_pos, k_pos : 1-D integer arrays
        Absolute positions (of the namespace ``bias`` expects).
    shift : int
        s, added to both.
    atol : float or array, optional
        Largest allowed difference; 0 (the default) is exact.
    violations : callable, optional
        ``violations(shifted, base)`` returning the boolean mask of entries that break the property, in place of
        ``atol`` (the harness's tolerance and equivalence rules).

    Returns
    -------
    PropertyResult
        ``index``: the first differing (h, i, j).
    """
    base = bias(q_pos, k_pos)
    shifted = bias(q_pos + shift, k_pos + shift)
    what = f"bias(q_pos + {shift}, k_pos + {shift}) against bias(q_pos, k_pos)"
    return _compare("offset-only", shifted, base, atol, what, violations)


def heads_subset(bias: BiasFn, q_pos: Any, k_pos: Any, heads: Sequence[int], *, atol: Any = 0.0) -> PropertyResult:
    """``bias(q_pos, k_pos, heads=heads)`` is the selected heads of the full bias, in the order given.

    Parameters
    ----------
    bias : callable
        ``bias(q_pos, k_pos, heads=None)``, such as a family's ``.bias``.
    q_pos, k_pos : 1-D integer arrays
    heads : sequence of int
        Head indices (repeats allowed).
    atol : float or array, optional
        Largest allowed difference, broadcast against (len(heads), Sq, Sk); 0 (the default) is exact.

    Returns
    -------
    PropertyResult
        ``index``: the first differing entry of the selected bias.
    """
    full = bias(q_pos, k_pos)
    part = bias(q_pos, k_pos, heads=list(heads))
    xp = array_namespace(full)
    sel = xp.take(full, _int_positions(xp, heads, array_device(full)), axis=0)
    return _compare("heads=", part, sel, atol, f"bias(heads={list(heads)}) against those rows of the full bias")


def zero_at_zero(bias: BiasFn, q_pos: Any, k_pos: Any = None) -> PropertyResult:
    r""":math:`b_h(i, i) = 0` exactly: every entry whose key position equals its query position is 0.

    Parameters
    ----------
    bias : callable
        ``bias(q_pos, k_pos)``.
    q_pos : 1-D integer array
    k_pos : 1-D integer array, optional
        ``q_pos`` by default.

    Returns
    -------
    PropertyResult
        ``index``: the first non-zero (h, i, j) with ``q_pos[i] == k_pos[j]``.
    """
    k_pos = q_pos if k_pos is None else k_pos
    b = bias(q_pos, k_pos)
    xp = array_namespace(b)
    same = (q_pos[:, None] == k_pos[None, :])[None, :, :]
    bad = same & (b != 0)
    index = _first_true(xp, bad)
    if index is None:
        return PropertyResult("zero at 0", True, "bias at Delta = 0 is exactly 0")
    value = _entry(b, index)
    detail = f"bias at Delta = 0 is {value!r} at {index}, expected exactly 0"
    return PropertyResult("zero at 0", False, detail, math.inf if math.isnan(value) else abs(value), index)


def _increases(xp: Any, vals: Any) -> Any:
    """vals[:, d + 1] - vals[:, d], with a NaN (or the same infinity twice) counted as an infinite increase."""
    a, b = vals[:, :-1], vals[:, 1:]
    undefined = xp.isnan(a) | xp.isnan(b) | (~(xp.isfinite(a) & xp.isfinite(b)) & (a == b))
    zero = xp.zeros_like(a)
    diff = xp.where(undefined, zero, b) - xp.where(undefined, zero, a)
    return xp.where(undefined, xp.full_like(a, math.inf), diff)


def penalty_monotone(
    bias: BiasFn, n: int, *, xp: Any, sides: Iterable[str] = ("past", "future"), slack: float = 0.0
) -> PropertyResult:
    r"""The bias is non-increasing in :math:`|\Delta|` for :math:`|\Delta| = 0..n` on each side (past, future keys).

    One query at position n against keys 0..2n: key j has :math:`\Delta = n - j`.

    Parameters
    ----------
    bias : callable
        ``bias(q_pos, k_pos)`` returning (H, 1, 2n + 1).
    n : int
        Largest :math:`|\Delta|`.
    xp : array namespace
        Namespace of the positions handed to ``bias``.
    sides : iterable of {"past", "future"}
        Keys at or before the query (:math:`\Delta \ge 0`) and after it (:math:`\Delta \le 0`).
    slack : float
        Largest allowed increase between neighbours (0: none).

    Returns
    -------
    PropertyResult
        ``worst``: the largest increase (0 when none); ``index``: (h, 0, j) of the entry that rose most, the first
        found (past side first), so the step is :math:`|\Delta|` = ``abs(n - j) - 1`` -> ``abs(n - j)``.
    """
    row = bias(_int_positions(xp, [n]), _int_positions(xp, range(2 * n + 1)))[:, 0, :]
    worst, where = 0.0, None
    for side in sides:
        # vals[:, d] is the bias at |Delta| = d on this side.
        vals = xp.flip(row[:, : n + 1], axis=1) if side == "past" else row[:, n:]
        inc = _increases(xp, vals)
        if inc.shape[1] == 0:
            continue
        top = float(xp.max(inc))
        if top > worst:
            flat = int(xp.argmax(xp.reshape(inc, (-1,))))
            h, d = divmod(flat, int(inc.shape[1]))
            worst, where = top, (side, h, d)
    span = f"|Delta| = 0..{n}, {' and '.join(sides)} keys"
    if worst <= slack:
        return PropertyResult("monotone", True, f"bias non-increasing in {span}", worst)
    assert where is not None
    side, h, d = where
    j = n - (d + 1) if side == "past" else n + d + 1
    detail = (
        f"bias increases with |Delta| on the {side} side ({span}): head {h}, |Delta| {d} -> {d + 1} by {worst!r} "
        f"(allowed {slack!r}); values {host_numpy(row[h, :]).tolist()}"
    )
    return PropertyResult("monotone", False, detail, worst, (h, 0, j))


def t5_buckets(
    bucket: Callable[..., Any], n: int, *, xp: Any, bidirectional: bool, num_buckets: int, max_distance: int
) -> PropertyResult:
    r"""T5 buckets of :math:`\Delta = -n..n`: in range, each side in its own half, non-decreasing in :math:`|\Delta|`,
    constant for :math:`|\Delta| \ge` ``max_distance``; causal buckets of :math:`\Delta \le 0` are 0.

    Parameters
    ----------
    bucket : callable
        ``bucket(delta, bidirectional=, num_buckets=, max_distance=)``, such as :func:`relpos_ref.t5_bucket`.
    n : int
        Largest :math:`|\Delta|`.
    xp : array namespace
        Namespace of the offsets handed to ``bucket``.
    bidirectional, num_buckets, max_distance
        The bucket configuration.

    Returns
    -------
    PropertyResult
    """
    name = "buckets monotone"
    delta = _int_positions(xp, range(-n, n + 1))
    got = bucket(delta, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    cfg = f"bidirectional={bidirectional}, num_buckets={num_buckets}, max_distance={max_distance}"

    def fail(text: str, vals: Any = None) -> PropertyResult:
        shown = "" if vals is None else f": {host_numpy(vals).tolist()}"
        return PropertyResult(name, False, f"{cfg}: {text}{shown}", math.inf)

    if tuple(got.shape) != tuple(delta.shape):
        return fail(f"shape {tuple(got.shape)} for {tuple(delta.shape)} offsets")
    ns = array_namespace(got)
    got = ns.astype(got, ns.int64)
    if not bool(ns.all((got >= 0) & (got < num_buckets))):
        return fail(f"buckets outside [0, {num_buckets})", got)
    past = got[n:]  # Delta = 0..n
    future = ns.flip(got[: n + 1], axis=0)  # Delta = 0, -1, ..., -n
    if bidirectional:
        half = num_buckets // 2
        if not bool(ns.all(past < half)):
            return fail("past offsets left the lower half", past)
        if not bool(ns.all(future[1:] >= half)):
            return fail("future offsets left the upper half", future[1:])
        sides = {"past": past, "future": future[1:]}
    else:
        if not bool(ns.all(future == 0)):
            return fail("causal buckets of Delta <= 0 must be 0", future)
        sides = {"past": past}
    for side, vals in sides.items():
        if vals.shape[0] > 1 and not bool(ns.all(vals[1:] >= vals[:-1])):
            return fail(f"{side} buckets decrease with |Delta|", vals)
    if n >= max_distance:
        for side, vals in sides.items():
            start = max_distance if side == "past" else max_distance - 1  # future[1:] starts at |Delta| = 1
            tail = vals[start:]
            if not bool(ns.all(tail == tail[0])):
                return fail(f"{side} buckets not constant for |Delta| >= D", tail)
    return PropertyResult(name, True, f"{cfg}: buckets of Delta = -{n}..{n}")


# -- softmax and attention properties ---------------------------------------------------------------------------


def probabilities(
    softmax: Callable[..., Any],
    scores: Any,
    bias: Any = None,
    *,
    mask: Any = None,
    scale: float = 1.0,
    placement: str = "post_scale",
    atol: float,
) -> PropertyResult:
    """Probabilities >= 0, exactly 0 where masked (by ``mask`` or a -inf bias), each row with something to attend
    summing to 1 within ``atol``, every fully masked row all 0.

    Parameters
    ----------
    softmax : callable
        ``softmax(scores, bias, mask=, scale=, placement=)``, such as :func:`relpos_ref.biased_softmax`.
    scores, bias, mask : arrays
        As for :func:`relpos_ref.biased_softmax` (``bias`` and ``mask`` optional).
    scale, placement
        Passed on.
    atol : float
        Largest allowed |row sum - 1| (sums in float64 where the namespace has it).

    Returns
    -------
    PropertyResult
    """
    name = "rows sum to 1"
    p = softmax(scores, bias, mask=mask, scale=scale, placement=placement)
    if tuple(p.shape) != tuple(scores.shape):
        detail = f"probability shape {tuple(p.shape)}, expected {tuple(scores.shape)}"
        return PropertyResult(name, False, detail, math.inf)
    xp = array_namespace(p)
    p = _wide(xp, p)
    if bool(xp.any(xp.isnan(p))):
        return PropertyResult(name, False, "NaN probabilities", math.inf)
    if bool(xp.any(p < 0)):
        return PropertyResult(name, False, "negative probabilities", float(-xp.min(p)))
    attend = xp.ones(p.shape, dtype=xp.bool, device=array_device(p))
    if mask is not None:
        attend = attend & xp.broadcast_to(mask, p.shape)
    if bias is not None:
        attend = attend & xp.broadcast_to(bias != -math.inf, p.shape)
    if bool(xp.any(~attend & (p != 0))):
        return PropertyResult(name, False, "masked entries have non-zero probability", float(xp.max(p[~attend])))
    sums = xp.sum(p, axis=-1)
    live = xp.any(attend, axis=-1)
    off = xp.where(live, xp.abs(sums - 1.0), xp.zeros_like(sums))
    worst = float(xp.max(off)) if off.size else 0.0
    if worst > atol:
        return PropertyResult(name, False, f"rows do not sum to 1: off by up to {worst!r} (allowed {atol!r})", worst)
    if bool(xp.any(~live & (sums != 0))):
        return PropertyResult(name, False, "fully masked rows are not all zero", math.inf)
    return PropertyResult(name, True, f"rows sum to 1 within {atol!r}", worst)


def softmax_shift_invariance(
    softmax: Callable[..., Any],
    scores: Any,
    bias: Any,
    shift: Any,
    *,
    mask: Any = None,
    scale: float = 1.0,
    placement: str = "post_scale",
    atol: float,
    lse_atol: float | None = None,
) -> PropertyResult:
    """``bias + c`` (c constant per row): the same probabilities, lse moved by c (post_scale) or c * scale
    (pre_scale).

    Parameters
    ----------
    softmax : callable
        ``softmax(scores, bias, mask=, scale=, placement=, return_lse=True)``.
    scores, bias : arrays
        Bias broadcastable to the scores.
    shift : array
        c, one value per row: shape ``scores.shape[:-1]``.
    mask, scale, placement
        Passed on.
    atol : float
        Largest allowed difference of the probabilities.
    lse_atol : float, optional
        Of the lse; ``atol`` by default.

    Returns
    -------
    PropertyResult
    """
    p0, l0 = softmax(scores, bias, mask=mask, scale=scale, placement=placement, return_lse=True)
    p1, l1 = softmax(scores, bias + shift[..., None], mask=mask, scale=scale, placement=placement, return_lse=True)
    moved = shift * scale if placement == "pre_scale" else shift
    probs = _compare("shift invariance", p1, p0, atol, "probabilities under a per-row shift of the bias")
    if not probs.passed:
        return probs
    tol = atol if lse_atol is None else lse_atol
    return _compare("shift invariance", l1, l0 + moved, tol, "lse under a per-row shift c: lse + c")


def causal_no_future_leak(
    attention: Callable[..., Any],
    q: Any,
    k: Any,
    v: Any,
    k_new: Any,
    v_new: Any,
    *,
    rows: Iterable[int] | None = None,
    align: str = "bottom_right",
    **options: Any,
) -> PropertyResult:
    """Replacing the keys and values after query i (key position > query position) leaves the output and lse of
    every query at or before i exactly unchanged.

    Exact because a masked key contributes exp(-inf) = 0 to every sum and 0 * v to the output (keys and values
    finite).

    Parameters
    ----------
    attention : callable
        ``attention(q, k, v, causal=True, align=, return_lse=True, **options)``, such as
        :func:`relpos_ref.attention`.
    q, k, v : arrays (B, H, Sq, D), (B, H_kv, Sk, D), (B, H_kv, Sk, Dv)
    k_new, v_new : arrays shaped as k and v
        The replacements.
    rows : iterable of int, optional
        The queries i to cut after (one run each); every row by default.
    align : {"bottom_right", "top_left"}
    **options
        Passed on (``bias``, ``block_size``, ...).

    Returns
    -------
    PropertyResult
        ``index``: the first differing entry of the output (or lse) of the first failing cut.
    """
    xp = array_namespace(q, k, v)
    sq, sk = int(q.shape[2]), int(k.shape[2])
    q_pos, k_pos = positions(sq, sk, align=align, xp=xp, device=array_device(q))
    kw = {**options, "causal": True, "align": align, "return_lse": True}
    out0, lse0 = attention(q, k, v, **kw)
    checked = 0
    for i in range(sq) if rows is None else list(rows):
        future = k_pos > q_pos[i]
        if not bool(xp.any(future)):
            continue
        cut = future[None, None, :, None]
        out1, lse1 = attention(q, xp.where(cut, k_new, k), xp.where(cut, v_new, v), **kw)
        blind = int(xp.sum(xp.astype(q_pos <= q_pos[i], xp.int64)))  # queries 0..blind-1 see none of the changes
        what = f"keys after query {i} (position {int(q_pos[i])}, align={align}) changed"
        for got, want, part in ((out1, out0, "output"), (lse1, lse0, "lse")):
            res = _compare("causal", got[:, :, :blind, ...], want[:, :, :blind, ...], 0.0, f"{what}: {part}")
            if not res.passed:
                return res
        checked += 1
    return PropertyResult("causal", True, f"{checked} cuts: no query saw a change of keys after it")


def kv_cache_suffix(
    attention: Callable[..., Any],
    q: Any,
    k: Any,
    v: Any,
    suffix: int,
    *,
    bias: Any = None,
    suffix_bias: Any = None,
    atol: float,
    **options: Any,
) -> PropertyResult:
    """The last ``suffix`` queries alone (causal, bottom_right) give the last rows of the full causal attention.

    suffix = 1 is a decoding step against a KV cache; a larger suffix is chunked prefill.

    Parameters
    ----------
    attention : callable
        ``attention(q, k, v, bias=, causal=True, align="bottom_right", return_lse=True, **options)``.
    q, k, v : arrays
    suffix : int
        Number of trailing queries.
    bias : optional
        Bias of the full run.
    suffix_bias : optional
        Bias of the suffix run: ``bias`` by default (a function of positions); a TensorBias's last rows otherwise.
    atol : float
        Largest allowed difference of output and lse.
    **options
        Passed on (``placement``, ``scale``, ...).

    Returns
    -------
    PropertyResult
    """
    sq = int(q.shape[2])
    kw = {**options, "causal": True, "align": "bottom_right", "return_lse": True}
    o_full, l_full = attention(q, k, v, bias=bias, **kw)
    part_bias = bias if suffix_bias is None else suffix_bias
    o_part, l_part = attention(q[:, :, sq - suffix :, ...], k, v, bias=part_bias, **kw)
    what = f"last {suffix} queries alone against the full run"
    res = _compare("kv-cache suffix", o_part, o_full[:, :, sq - suffix :, ...], atol, f"{what}: output")
    if not res.passed:
        return res
    return _compare("kv-cache suffix", l_part, l_full[:, :, sq - suffix :], atol, f"{what}: lse")
