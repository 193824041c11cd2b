"""Absolute query/key positions, relative offsets and the causal mask, as Python ints."""

from __future__ import annotations

from ._mp import _int, _int_list

# ---------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------


def positions(q_len, k_len, *, align="bottom_right"):
    """Absolute query and key positions as lists of Python ints.

    ``bottom_right``: ``q_pos = (k_len - q_len) + arange(q_len)`` (the last query sits at the last
    key; entries are negative when ``q_len > k_len``). ``top_left``: ``q_pos = arange(q_len)``.
    ``k_pos = arange(k_len)`` in both cases.
    """
    q_len = _int(q_len, "q_len")
    k_len = _int(k_len, "k_len")
    if q_len < 0 or k_len < 0:
        raise ValueError(f"q_len and k_len must be >= 0, got q_len={q_len}, k_len={k_len}")
    if align == "bottom_right":
        start = k_len - q_len
    elif align == "top_left":
        start = 0
    else:
        raise ValueError(f"align must be 'bottom_right' or 'top_left', got {align!r}")
    return [start + t for t in range(q_len)], list(range(k_len))


def relative_offsets(q_pos, k_pos):
    """``delta[i][j] = q_pos[i] - k_pos[j]`` as Python ints."""
    q_pos = _int_list(q_pos, "q_pos")
    k_pos = _int_list(k_pos, "k_pos")
    return [[i - j for j in k_pos] for i in q_pos]


def causal_mask(q_pos, k_pos):
    """``mask[i][j] = k_pos[j] <= q_pos[i]`` (True where the key may be attended)."""
    q_pos = _int_list(q_pos, "q_pos")
    k_pos = _int_list(k_pos, "k_pos")
    return [[j <= i for j in k_pos] for i in q_pos]


# ---------------------------------------------------------------------------------------------
# Attention layout: per-row positions, lengths, windows and segments
# ---------------------------------------------------------------------------------------------

SEGMENT_POSITIONS = ("global", "restart")


def _per_row(values, batch, length, name):
    """A (S,) or (B, S) integer sequence as B lists of ``length`` Python ints (None stays None)."""
    if values is None:
        return None
    if hasattr(values, "tolist"):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a sequence of int of shape (S,) or (B, S), got {type(values).__name__}")
    rows = [values] * batch if not values or not isinstance(values[0], (list, tuple)) else list(values)
    if len(rows) != batch:
        raise ValueError(f"{name} must have shape ({length},) or ({batch}, {length}), got {len(rows)} rows")
    out = []
    for b, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != length:
            got = len(row) if isinstance(row, (list, tuple)) else type(row).__name__
            raise ValueError(f"{name} must have shape ({length},) or ({batch}, {length}), got row {b} of {got}")
        out.append(_int_list(row, f"{name}[{b}]"))
    return out


def _lengths(values, batch, size, name):
    if values is None:
        return [size] * batch
    out = _int_list(values, name)
    if len(out) != batch:
        raise ValueError(f"{name} must have shape ({batch},), got {len(out)} entries")
    for b, n in enumerate(out):
        if not 0 <= n <= size:
            raise ValueError(f"{name}[{b}] must be in [0, {size}], got {n}")
    return out


def _window(window):
    if window is None:
        return None, None
    if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
        raise ValueError(f"window must be (left, right) with each side an int >= 0 or None, got {window!r}")
    sides = []
    for side, w in zip(("left", "right"), window):
        if w is not None:
            if isinstance(w, bool) or not isinstance(w, int):
                raise TypeError(f"window {side} must be an int >= 0 or None, got {type(w).__name__} {w!r}")
            if w < 0:
                raise ValueError(f"window {side} must be >= 0 or None, got {w}")
        sides.append(w)
    return sides[0], sides[1]


def _restart(ids, name):
    """Position of each token within its segment: its index minus the index of the segment's first token."""
    out, start = [], 0
    seen = set()
    for t, sid in enumerate(ids):
        if t == 0 or sid != ids[t - 1]:
            # An id that comes back after another segment has two "first tokens" (its first occurrence, or the
            # start of this run): the definitions disagree, so refuse rather than pick one silently.
            if sid in seen:
                raise ValueError(
                    f"{name}: segment id {sid} reappears at index {t} after another segment; "
                    "segment_positions='restart' needs each segment to be one contiguous run"
                )
            seen.add(sid)
            start = t
        out.append(t - start)
    return out


def attention_layout(
    batch,
    q_len,
    k_len,
    *,
    causal=False,
    align="bottom_right",
    window=None,
    q_pos=None,
    k_pos=None,
    q_lens=None,
    k_lens=None,
    q_segment_ids=None,
    k_segment_ids=None,
    segment_positions="global",
):
    """Per batch row: the positions, the structural attend-flags and the padding rows of one attention call.

    Returns ``(q_pos, k_pos, keep, padded)``: ``q_pos[b]`` (Sq ints) and ``k_pos[b]`` (Sk ints) are the positions
    at which the bias is evaluated; ``keep[b][i][j]`` is True when query i may attend key j as far as lengths,
    ``causal`` (``k_pos <= q_pos``), ``window`` (``-right <= q_pos - k_pos <= left``, a None side unbounded) and
    segment ids allow (a mask or a -inf bias may remove more); ``padded[b][i]`` is True for a padding query
    (``i >= q_lens[b]``), whose output is 0 and lse -inf whatever ``fully_masked`` says.

    Positions: ``q_pos``/``k_pos`` ((S,) or (B, S)) when given; else from ``align`` on each row's own lengths
    (bottom_right: ``i + k_lens[b] - q_lens[b]``, top_left: ``i``; keys ``0..Sk-1``). ``segment_positions="restart"``
    replaces both by each token's index minus that of the first token of its segment in its own sequence.
    """
    batch = _int(batch, "batch")
    q_len = _int(q_len, "q_len")
    k_len = _int(k_len, "k_len")
    if batch < 0 or q_len < 0 or k_len < 0:
        raise ValueError(f"batch, q_len and k_len must be >= 0, got {batch}, {q_len}, {k_len}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if align not in ("bottom_right", "top_left"):
        raise ValueError(f"align must be 'bottom_right' or 'top_left', got {align!r}")
    if segment_positions not in SEGMENT_POSITIONS:
        raise ValueError(f"segment_positions must be 'global' or 'restart', got {segment_positions!r}")
    left, right = _window(window)
    q_lens = _lengths(q_lens, batch, q_len, "q_lens")
    k_lens = _lengths(k_lens, batch, k_len, "k_lens")
    qp = _per_row(q_pos, batch, q_len, "q_pos")
    kp = _per_row(k_pos, batch, k_len, "k_pos")
    q_seg = _per_row(q_segment_ids, batch, q_len, "q_segment_ids")
    k_seg = _per_row(k_segment_ids, batch, k_len, "k_segment_ids")
    if (q_seg is None) != (k_seg is None):
        raise ValueError("q_segment_ids and k_segment_ids: give both or neither")
    if segment_positions == "restart":
        if q_seg is None:
            raise ValueError("segment_positions='restart' needs q_segment_ids and k_segment_ids")
        if qp is not None or kp is not None:
            raise ValueError("segment_positions='restart' computes the positions: do not also give q_pos or k_pos")
        qp = [_restart(row, f"q_segment_ids[{b}]") for b, row in enumerate(q_seg)]
        kp = [_restart(row, f"k_segment_ids[{b}]") for b, row in enumerate(k_seg)]
    if qp is None:
        qp = [[t + (kl - ql if align == "bottom_right" else 0) for t in range(q_len)] for ql, kl in zip(q_lens, k_lens)]
    if kp is None:
        kp = [list(range(k_len)) for _ in range(batch)]

    def ok(b, i, j):
        if j >= k_lens[b]:
            return False
        d = qp[b][i] - kp[b][j]
        if causal and d < 0:
            return False
        if left is not None and d > left:
            return False
        if right is not None and d < -right:
            return False
        return q_seg is None or q_seg[b][i] == k_seg[b][j]

    padded = [[i >= q_lens[b] for i in range(q_len)] for b in range(batch)]
    keep = [[[not padded[b][i] and ok(b, i, j) for j in range(k_len)] for i in range(q_len)] for b in range(batch)]
    return qp, kp, keep, padded
