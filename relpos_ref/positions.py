"""Absolute positions, relative offsets and the causal mask.

All biases in relpos_ref are functions of absolute query and key positions, so a KV cache (one query at the end of a
long key sequence) and chunked prefill (a block of queries in the middle) are described exactly, not approximated by
slicing a square bias.
"""

from __future__ import annotations

from typing import Any

from . import _checks
from .conventions import ALIGNMENTS

__all__ = ["causal_mask", "positions", "relative_offsets"]


def positions(
    q_len: int,
    k_len: int,
    *,
    align: str = "bottom_right",
    xp: Any = None,
    device: Any = None,
) -> tuple[Any, Any]:
    r"""Absolute positions of ``q_len`` queries and ``k_len`` keys.

    Parameters
    ----------
    q_len, k_len : int
        Numbers of queries and keys, both >= 1 and at most ``MAX_ARRAY_BYTES / 8`` (2**30: an int64 array of 8 GiB).
    align : {"bottom_right", "top_left"}
        How the queries sit against the keys when ``q_len != k_len``.
        ``"bottom_right"``: the last query sits at the last key,
        :math:`q_i = (S_k - S_q) + i` (FlashAttention >= 2.1, KV-cache decoding, chunked prefill).
        ``"top_left"``: :math:`q_i = i` (PyTorch SDPA ``is_causal=True``).
        With ``q_len > k_len`` and ``"bottom_right"`` the first queries get negative positions: under a causal mask
        they see no key at all.
    xp : array namespace, optional
        Namespace of the result; NumPy by default.
    device : optional
        Device of the result.

    Returns
    -------
    q_pos, k_pos : int64 arrays of shapes (q_len,) and (k_len,)
        :math:`k_j = j`.

    Examples
    --------
    >>> import relpos_ref as rp
    >>> rp.positions(2, 5)
    (array([3, 4]), array([0, 1, 2, 3, 4]))
    >>> rp.positions(2, 5, align="top_left")[0]
    array([0, 1])
    """
    # The cap keeps every position and offset far inside int64 and fails a typo at once instead of allocating.
    q_len = _checks.size("q_len", q_len)
    k_len = _checks.size("k_len", k_len)
    _checks.option("align", align, ALIGNMENTS)
    xp = _checks.namespace_arg(xp)
    _checks.device_arg(xp, device)
    start = k_len - q_len if align == "bottom_right" else 0
    q_pos = xp.arange(start, start + q_len, dtype=xp.int64, device=device)
    k_pos = xp.arange(0, k_len, dtype=xp.int64, device=device)
    return q_pos, k_pos


#: Largest offset magnitude: every :math:`\Delta = q_i - k_j` and :math:`|\Delta|` must be an int64.
MAX_OFFSET = 2**63 - 1


def _positions_pair(q_pos: Any, k_pos: Any, xp: Any = None) -> Any:
    """Check a pair of position arrays (1-D, integer, non-empty, offsets within int64); return their namespace."""
    xp = _checks.namespace(q_pos, k_pos, xp=xp, names=("q_pos", "k_pos"))
    _checks.integer_array("q_pos", q_pos, xp, ndim=1)
    _checks.integer_array("k_pos", k_pos, xp, ndim=1)
    _checks.nonempty("q_pos", q_pos)
    _checks.nonempty("k_pos", k_pos)
    # Before any copy or reduction: two 2**28-entry (or zero-stride) position arrays ask for 512 PiB of offsets.
    _checks.result_size("q_pos, k_pos", (q_pos.shape[0], k_pos.shape[0]), 8, what="int64 offsets (Sq, Sk)")
    _offsets_fit(xp, q_pos, k_pos)
    return xp


def _offsets_fit(xp: Any, q_pos: Any, k_pos: Any) -> None:
    """Reject positions with an offset outside :math:`[-(2^{63}-1), 2^{63}-1]`.

    Offsets are computed in int64, whose subtraction wraps silently: ``[2**62] - [-2**62]`` would give -2**63, and
    uint64 positions above 2**63 a wrong sign. Four reductions, read exactly as Python integers, decide it; when they
    pass, the int64 arithmetic below is exact (uint64 positions too: the cast wraps both operands by the same 2**64).
    """
    q_lo, q_hi, k_lo, k_hi = (int(f(p)) for p in (q_pos, k_pos) for f in (xp.min, xp.max))
    lo, hi = q_lo - k_hi, q_hi - k_lo
    if lo < -MAX_OFFSET or hi > MAX_OFFSET:
        msg = (
            "q_pos, k_pos: expected positions whose offsets q_pos[i] - k_pos[j] lie in [-(2**63 - 1), 2**63 - 1] "
            f"(int64), got offsets from {lo} to {hi}"
        )
        raise ValueError(msg)


def relative_offsets(q_pos: Any, k_pos: Any, *, xp: Any = None) -> Any:
    r"""Signed offsets :math:`\Delta_{ij} = q_i - k_j`.

    :math:`\Delta \ge 0` for keys at or before the query (the past), negative for keys after it. This is the sign of
    the ALiBi paper and of the book's :math:`u_{i-j}`; T5 code uses the opposite sign ``memory - context`` (see
    ``spec/conventions.md``).

    Parameters
    ----------
    q_pos, k_pos : 1-D integer arrays
        Absolute positions (see :func:`positions`).
    xp : array namespace, optional
        Namespace the positions must belong to; taken from them by default.

    Returns
    -------
    int64 array of shape (len(q_pos), len(k_pos))

    Raises
    ------
    ValueError
        An offset or its magnitude does not fit int64 (outside :math:`\pm(2^{63}-1)`); the (Sq, Sk) int64 result
        would exceed ``MAX_ARRAY_BYTES`` (8 GiB: Sq * Sk > 2**30), checked before allocating.
    """
    xp = _positions_pair(q_pos, k_pos, xp)
    return _offsets(xp, q_pos, k_pos)


def _offsets(xp: Any, q_pos: Any, k_pos: Any) -> Any:
    """:func:`relative_offsets` of positions :func:`_positions_pair` has already checked (exact in int64)."""
    return xp.astype(q_pos, xp.int64)[:, None] - xp.astype(k_pos, xp.int64)[None, :]


def causal_mask(q_pos: Any, k_pos: Any, *, xp: Any = None) -> Any:
    """Boolean mask, True where the key may be attended: ``k_pos[j] <= q_pos[i]``.

    Parameters
    ----------
    q_pos, k_pos : 1-D integer arrays
        Absolute positions (see :func:`positions`).
    xp : array namespace, optional
        Namespace the positions must belong to; taken from them by default.

    Returns
    -------
    bool array of shape (len(q_pos), len(k_pos))

    Raises
    ------
    ValueError
        As :func:`relative_offsets`: offsets beyond int64, or Sq * Sk > 2**30 (checked before allocating).
    """
    return relative_offsets(q_pos, k_pos, xp=xp) >= 0
