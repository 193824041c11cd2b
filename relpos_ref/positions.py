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
        Numbers of queries and keys, both >= 1.
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
    q_len = _checks.integer("q_len", q_len, minimum=1)
    k_len = _checks.integer("k_len", k_len, minimum=1)
    _checks.option("align", align, ALIGNMENTS)
    xp = _checks.namespace_arg(xp)
    start = k_len - q_len if align == "bottom_right" else 0
    q_pos = xp.arange(start, start + q_len, dtype=xp.int64, device=device)
    k_pos = xp.arange(0, k_len, dtype=xp.int64, device=device)
    return q_pos, k_pos


def _positions_pair(q_pos: Any, k_pos: Any, xp: Any = None) -> Any:
    xp = _checks.namespace(q_pos, k_pos, xp=xp, names=("q_pos", "k_pos"))
    _checks.integer_array("q_pos", q_pos, xp, ndim=1)
    _checks.integer_array("k_pos", k_pos, xp, ndim=1)
    _checks.nonempty("q_pos", q_pos)
    _checks.nonempty("k_pos", k_pos)
    return xp


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
    """
    xp = _positions_pair(q_pos, k_pos, xp)
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
    """
    return relative_offsets(q_pos, k_pos, xp=xp) >= 0
