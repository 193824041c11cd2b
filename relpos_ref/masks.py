"""The kernel features of attention as positions and per-tile masks: explicit positions, a local window, per-row
lengths and packed segments, validated once per call and never materialised beyond one tile."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _checks
from ._host import host_numpy
from .conventions import ALIGNMENTS, SEGMENT_POSITIONS
from .positions import MAX_OFFSET, _offsets_fit

__all__ = ["Features", "features", "pad_rows", "tile_keep"]


@dataclass(frozen=True)
class Features:
    """Resolved feature arguments of one attention call (see :func:`relpos_ref.attention`)."""

    q_pos: Any  # int64 (Sq,), or (B, Sq) when the positions differ between batch rows
    k_pos: Any  # int64 (Sk,) or (B, Sk), 2-D exactly when q_pos is
    causal: bool
    left: int | None  # window: attend when -right <= q_pos - k_pos <= left; None is unbounded
    right: int | None
    q_lens: Any  # int64 (B,) or None (every query real)
    k_lens: Any
    q_seg: Any  # int (S,) or (B, S), or None
    k_seg: Any
    blocks: tuple[tuple[int, ...], ...]  # per query block: the key blocks that can hold an attended key


def features(
    xp: Any,
    dev: Any,
    sizes: tuple[int, int, int, int, int],
    *,
    causal: bool,
    align: str,
    window: Any,
    q_pos: Any,
    k_pos: Any,
    q_lens: Any,
    k_lens: Any,
    q_segment_ids: Any,
    k_segment_ids: Any,
    segment_positions: str,
) -> Features | None:
    """Check the feature arguments and resolve them, with the key blocks each query block must visit.

    ``sizes`` is (B, Sq, Sk, block_size, kv_block_size). None when no feature is asked for: the caller then runs the
    plain path (positions from ``align``).
    """
    nb, sq, sk, bq, bk = sizes
    segment_positions = _checks.option("segment_positions", segment_positions, SEGMENT_POSITIONS)
    left, right = _window(window)
    given = (q_pos, k_pos, q_lens, k_lens, q_segment_ids, k_segment_ids)
    if window is None and all(a is None for a in given):
        if segment_positions == "restart":
            msg = "segment_positions: expected 'global' without q_segment_ids/k_segment_ids, got 'restart'"
            raise ValueError(msg)
        return None
    # Shapes and dtypes first, then the values (reductions of small integer arrays).
    if q_pos is not None:
        _per_row("q_pos", q_pos, xp, nb, sq)
    if k_pos is not None:
        _per_row("k_pos", k_pos, xp, nb, sk)
    if (q_segment_ids is None) != (k_segment_ids is None):
        msg = "q_segment_ids, k_segment_ids: expected both or neither, got only " + (
            "q_segment_ids" if k_segment_ids is None else "k_segment_ids"
        )
        raise ValueError(msg)
    if q_segment_ids is not None:
        _per_row("q_segment_ids", q_segment_ids, xp, nb, sq)
        _per_row("k_segment_ids", k_segment_ids, xp, nb, sk)
    elif segment_positions == "restart":
        msg = "segment_positions: expected 'global' without q_segment_ids/k_segment_ids, got 'restart'"
        raise ValueError(msg)
    if segment_positions == "restart" and (q_pos is not None or k_pos is not None):
        msg = (
            "q_pos, k_pos: expected None with segment_positions='restart' (which computes the positions from the "
            "segments), got explicit positions"
        )
        raise ValueError(msg)
    if q_lens is not None:
        _checks.integer_array("q_lens", q_lens, xp, ndim=1)
    if k_lens is not None:
        _checks.integer_array("k_lens", k_lens, xp, ndim=1)
    q_lens = None if q_lens is None else _lengths("q_lens", q_lens, xp, nb, sq)
    k_lens = None if k_lens is None else _lengths("k_lens", k_lens, xp, nb, sk)
    if segment_positions == "restart":
        q_pos = _restart(xp, dev, "q_segment_ids", q_segment_ids)
        k_pos = _restart(xp, dev, "k_segment_ids", k_segment_ids)
    if q_pos is None:
        q_pos = _aligned(xp, dev, align, nb, sq, sk, q_lens, k_lens)
    if k_pos is None:
        k_pos = xp.arange(0, sk, dtype=xp.int64, device=dev)
    # Offsets are formed in int64 (wrapping silently): a batch-wide bound on them, as for relative_offsets.
    _offsets_fit(xp, q_pos, k_pos)
    q_pos = q_pos if q_pos.dtype == xp.int64 else xp.astype(q_pos, xp.int64)
    k_pos = k_pos if k_pos.dtype == xp.int64 else xp.astype(k_pos, xp.int64)
    if q_pos.ndim != k_pos.ndim:  # one per-row, one shared: both per-row, so a tile has one shape
        q_pos = q_pos if q_pos.ndim == 2 else xp.broadcast_to(q_pos[None, :], (nb, sq))
        k_pos = k_pos if k_pos.ndim == 2 else xp.broadcast_to(k_pos[None, :], (nb, sk))
    blocks = _plan(q_pos, k_pos, q_lens, k_lens, (nb, sq, sk, bq, bk), causal, left, right)
    return Features(q_pos, k_pos, causal, left, right, q_lens, k_lens, q_segment_ids, k_segment_ids, blocks)


def _window(window: Any) -> tuple[int | None, int | None]:
    if window is None:
        return None, None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        msg = f"window: expected a pair (left, right), each an int >= 0 or None, got {window!r}"
        raise TypeError(msg)
    # A side beyond every int64 offset is unbounded; capping it keeps the comparisons inside int64.
    return tuple(
        None if w is None else min(MAX_OFFSET, _checks.integer(f"window[{n}]", w, minimum=0))
        for n, w in enumerate(window)
    )


def _per_row(name: str, value: Any, xp: Any, nb: int, n: int) -> None:
    _checks.integer_array(name, value, xp, ndim=(1, 2))
    want = (n,) if value.ndim == 1 else (nb, n)
    if tuple(value.shape) != want:
        msg = f"{name}: expected shape ({n},) or {(nb, n)} (one row per batch), got {tuple(value.shape)}"
        raise ValueError(msg)


def _lengths(name: str, value: Any, xp: Any, nb: int, n: int) -> Any:
    if tuple(value.shape) != (nb,):
        msg = f"{name}: expected shape ({nb},) (one length per batch row), got {tuple(value.shape)}"
        raise ValueError(msg)
    lo, hi = int(xp.min(value)), int(xp.max(value))
    if lo < 0 or hi > n:
        msg = f"{name}: expected lengths in [0, {n}], got values from {lo} to {hi}"
        raise ValueError(msg)
    return value if value.dtype == xp.int64 else xp.astype(value, xp.int64)


def _aligned(xp: Any, dev: Any, align: str, nb: int, sq: int, sk: int, q_lens: Any, k_lens: Any) -> Any:
    """Query positions from ``align`` on each row's own lengths (bottom_right: i + k_lens[b] - q_lens[b])."""
    _checks.option("align", align, ALIGNMENTS)
    rows = xp.arange(0, sq, dtype=xp.int64, device=dev)
    if align == "top_left":
        return rows
    ql = q_lens if q_lens is not None else xp.full((nb,), sq, dtype=xp.int64, device=dev)
    kl = k_lens if k_lens is not None else xp.full((nb,), sk, dtype=xp.int64, device=dev)
    start = kl - ql
    first = int(start[0])
    if bool(xp.all(start == first)):  # one offset for the batch: shared positions, one bias per tile
        return rows + first
    return rows[None, :] + start[:, None]


def _restart(xp: Any, dev: Any, name: str, ids: Any) -> Any:
    """Each token's index minus the index of the first token of its segment, per row (host NumPy, O(S) a row)."""
    host = np.atleast_2d(host_numpy(ids))
    n = host.shape[1]
    idx = np.arange(n, dtype=np.int64)
    start = np.ones(host.shape, dtype=bool)
    start[:, 1:] = host[:, 1:] != host[:, :-1]
    for b, row in enumerate(host):
        firsts = row[start[b]]
        if np.unique(firsts).size != firsts.size:
            # A returning id has two "first tokens" (its first occurrence and the start of this run): refuse.
            sid = next(s for t, s in enumerate(firsts) if s in firsts[:t])
            msg = (
                f"{name}: expected each segment to be one contiguous run with segment_positions='restart', got id "
                f"{sid} reappearing after another segment in row {b}"
            )
            raise ValueError(msg)
    # The index of the latest run start at or before each token is its segment's first token.
    first = np.maximum.accumulate(np.where(start, idx, 0), axis=1)
    out = idx - first
    return xp.asarray(out[0] if ids.ndim == 1 else out, dtype=xp.int64, device=dev)


def _plan(
    q_pos: Any,
    k_pos: Any,
    q_lens: Any,
    k_lens: Any,
    sizes: tuple[int, int, int, int, int],
    causal: bool,
    left: int | None,
    right: int | None,
) -> tuple[tuple[int, ...], ...]:
    """Key blocks of each query block that can hold an attended key, from batch-wide position bounds per block.

    A tile is skipped when, over every real query of its rows and every real key of its columns (in any batch row),
    causal (max q < min k), the window's left side (min q - max k > left) or its right side (max q - min k < -right)
    excludes every pair; a query block of padding rows only visits nothing.
    """
    nb, sq, sk, bq, bk = sizes
    qh = np.broadcast_to(np.asarray(host_numpy(q_pos), dtype=np.int64), (nb, sq))
    kh = np.broadcast_to(np.asarray(host_numpy(k_pos), dtype=np.int64), (nb, sk))
    q_ok = np.ones((nb, sq), dtype=bool) if q_lens is None else np.arange(sq) < host_numpy(q_lens)[:, None]
    k_ok = np.ones((nb, sk), dtype=bool) if k_lens is None else np.arange(sk) < host_numpy(k_lens)[:, None]
    q_lo, q_hi, q_any = _block_bounds(qh, q_ok, bq)
    k_lo, k_hi, k_any = _block_bounds(kh, k_ok, bk)
    ok = q_any[:, None] & k_any[None, :]
    if causal:
        ok &= q_hi[:, None] >= k_lo[None, :]
    # Bounds of real positions, so their differences are offsets, which fit int64 (checked by _offsets_fit).
    if left is not None:
        ok &= q_lo[:, None] - k_hi[None, :] <= left
    if right is not None:
        ok &= q_hi[:, None] - k_lo[None, :] >= -right
    return tuple(tuple(int(j) for j in np.flatnonzero(row)) for row in ok)


def _block_bounds(pos: np.ndarray, ok: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block of ``size`` columns: min and max of ``pos`` over the entries ``ok`` (0 where none), and whether any."""
    nb, n = pos.shape
    nblk = -(-n // size)
    pad = nblk * size - n
    info = np.iinfo(np.int64)
    ok = np.pad(ok, ((0, 0), (0, pad)), constant_values=False).reshape(nb, nblk, size)
    pos = np.pad(pos, ((0, 0), (0, pad))).reshape(nb, nblk, size)
    lo = np.where(ok, pos, info.max).min(axis=(0, 2))
    hi = np.where(ok, pos, info.min).max(axis=(0, 2))
    some = ok.any(axis=(0, 2))
    return np.where(some, lo, 0), np.where(some, hi, 0), some


def tile_keep(feat: Features, xp: Any, dev: Any, qs: int, qe: int, ks: int, ke: int) -> Any:
    """Which keys ks:ke the queries qs:qe may attend as far as the features say: bool (B or 1, 1, rows, cols), or None
    when nothing is masked (explicit positions alone)."""
    keep = None

    def both(c: Any) -> Any:
        return c if keep is None else keep & c

    if feat.causal or feat.left is not None or feat.right is not None:
        delta = feat.q_pos[..., qs:qe, None] - feat.k_pos[..., None, ks:ke]
        if feat.causal:
            keep = both(delta >= 0)
        if feat.left is not None:
            keep = both(delta <= feat.left)
        if feat.right is not None:
            keep = both(delta >= -feat.right)
    if feat.q_lens is not None:
        keep = both(xp.arange(qs, qe, dtype=xp.int64, device=dev)[None, :, None] < feat.q_lens[:, None, None])
    if feat.k_lens is not None:
        keep = both(xp.arange(ks, ke, dtype=xp.int64, device=dev)[None, None, :] < feat.k_lens[:, None, None])
    if feat.q_seg is not None:
        keep = both(feat.q_seg[..., qs:qe, None] == feat.k_seg[..., None, ks:ke])
    if keep is None:
        return None
    return keep[None, None, ...] if keep.ndim == 2 else keep[:, None, ...]


def pad_rows(feat: Features | None, xp: Any, dev: Any, qs: int, qe: int) -> Any:
    """Padding queries (i >= q_lens[b]) among rows qs:qe: bool (B, 1, rows, 1), or None without ``q_lens``."""
    if feat is None or feat.q_lens is None:
        return None
    pad = xp.arange(qs, qe, dtype=xp.int64, device=dev)[None, :] >= feat.q_lens[:, None]
    return pad[:, None, :, None]
