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
