"""The readout: one-hot value probes at q = 0, the probabilities they read, and a bounded plan of calls."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .. import _checks
from .._host import numpy_dtype
from ..cases import AttentionShape, attention_inputs
from ..conventions import FLOAT_DTYPES
from ..families import BiasFamily
from .compare import EffectiveBiasResult, compare_bias, reference_bias, reference_magnitude

__all__ = [
    "MAX_PROBE_CALLS",
    "effective_bias",
    "plan_readout",
    "probe_count",
    "probe_keys",
    "probe_values",
    "read_effective_bias",
    "read_probabilities",
]

#: Default bound on candidate calls of one effective-bias check (all its cases together): about as many calls as
#: the rest of a default check makes, which reads a 4099-key decode case at every other block of 64 keys.
MAX_PROBE_CALLS = 40


def _shape(shape: Any) -> AttentionShape:
    try:
        sh = AttentionShape(*shape)
    except TypeError as exc:
        msg = f"shape: expected an AttentionShape or (batch, heads, kv_heads, q_len, k_len, head_dim), got {shape!r}"
        raise TypeError(msg) from exc
    for name, value in zip(AttentionShape._fields[:6], sh[:6], strict=True):
        _checks.integer(f"shape.{name}", value, minimum=1)
    if sh.heads % sh.kv_heads:
        msg = f"shape: expected kv_heads dividing heads, got heads {sh.heads}, kv_heads {sh.kv_heads}"
        raise ValueError(msg)
    return sh


def probe_count(shape: Any) -> int:
    r"""The number of probes (candidate calls) that read every key: :math:`\lceil S_k / D \rceil`."""
    sh = _shape(shape)
    return -(-sh.k_len // sh.head_dim)


def probe_values(shape: Any, block: int, *, dtype: str) -> np.ndarray:
    r"""The one-hot values of probe ``block``: :math:`V_{b g j c} = [j = \mathrm{block} \cdot D + c]`.

    Parameters
    ----------
    shape : AttentionShape
        The case; D is its ``head_dim`` (the probe reads D keys), v has shape (B, H_kv, Sk, D).
    block : int
        Which D keys the probe reads: keys ``block * D`` to ``block * D + D - 1`` (fewer in the last block).
    dtype : {"float64", "float32", "float16", "bfloat16"}
        Dtype of the values (0 and 1 are exact in every format).

    Returns
    -------
    numpy.ndarray
        With q = 0 the output column c of this call is the probability of key ``block * D + c``; columns past the
        last key are 0.
    """
    sh = _shape(shape)
    n = probe_count(sh)
    p = _checks.integer("block", block, minimum=0)
    if p >= n:
        msg = f"block: expected 0 <= block < {n} (ceil(k_len / head_dim)), got {p}"
        raise ValueError(msg)
    nd = numpy_dtype(_checks.option("dtype", dtype, FLOAT_DTYPES))
    d = sh.head_dim
    keys = np.arange(p * d, min((p + 1) * d, sh.k_len))
    v = np.zeros((sh.batch, sh.kv_heads, sh.k_len, d), dtype=nd)
    v[:, :, keys, keys - p * d] = 1
    return v


def _blocks(sh: AttentionShape, blocks: Sequence[int] | None) -> tuple[int, ...]:
    n = probe_count(sh)
    if blocks is None:
        return tuple(range(n))
    if isinstance(blocks, str | bytes) or not isinstance(blocks, Sequence | np.ndarray):
        msg = f"blocks: expected None or a sequence of probe indices, got {type(blocks).__name__}"
        raise TypeError(msg)
    out = tuple(sorted({_checks.integer("blocks", b, minimum=0) for b in blocks}))
    if not out or out[-1] >= n:
        msg = f"blocks: expected a non-empty set of probe indices in [0, {n}), got {list(blocks)!r}"
        raise ValueError(msg)
    return out


def probe_keys(shape: Any, blocks: Sequence[int] | None = None) -> np.ndarray:
    """The key indices that the probes ``blocks`` (default: all) read, sorted."""
    sh = _shape(shape)
    d = sh.head_dim
    chosen = _blocks(sh, blocks)
    return np.concatenate([np.arange(p * d, min((p + 1) * d, sh.k_len)) for p in chosen])


def read_probabilities(
    call: Callable[[np.ndarray, np.ndarray, np.ndarray], Any],
    shape: Any,
    *,
    dtype: str,
    seed: int = 0,
    blocks: Sequence[int] | None = None,
) -> np.ndarray:
    r"""Each query's attention probabilities, read from ``call`` with q = 0 and one-hot value probes.

    Parameters
    ----------
    call : callable
        ``call(q, k, v)`` with host NumPy arrays in the (B, H, S, D) layout and ``dtype`` returns the output
        (B, H, Sq, D) as a host float64 array (the attention suite's ``call(inputs, shape)[0]`` is such a function:
        it converts namespace and layout). Each call gets a fresh q; k is the same array every call.
    shape : AttentionShape
    dtype : {"float64", "float32", "float16", "bfloat16"}
    seed : int
        Seed of k (:func:`relpos_ref.cases.attention_inputs`); with q = 0 its values do not enter the logits.
    blocks : sequence of int, optional
        The probes to run (default all :func:`probe_count`); a subset reads fewer keys in fewer calls.

    Returns
    -------
    numpy.ndarray
        P (B, H, Sq, Sk) float64: ``P[b, h, i, j]`` the probability query i of head h gives key j; NaN in the
        columns of keys no probe read (:func:`probe_keys` names those read).
    """
    if not callable(call):
        msg = f"call: expected a callable call(q, k, v), got {type(call).__name__}"
        raise TypeError(msg)
    sh = _shape(shape)
    _checks.option("dtype", dtype, FLOAT_DTYPES)
    q, k, _ = attention_inputs(sh, dtype=dtype, seed=_checks.integer("seed", seed))
    q = np.zeros_like(q)
    b, h, sq, sk, d = sh.batch, sh.heads, sh.q_len, sh.k_len, sh.head_dim
    probs = np.full((b, h, sq, sk), np.nan)
    for p in _blocks(sh, blocks):
        out = np.asarray(call(q.copy(), k, probe_values(sh, p, dtype=dtype)), dtype=np.float64)
        if out.shape != (b, h, sq, d):
            msg = f"call: expected an output of shape (B, H, Sq, D) = {(b, h, sq, d)}, got {out.shape}"
            raise ValueError(msg)
        n = min(d, sk - p * d)
        probs[..., p * d : p * d + n] = out[..., :n]
    return probs


def read_effective_bias(
    call: Callable[[np.ndarray, np.ndarray, np.ndarray], Any],
    shape: Any,
    family: BiasFamily,
    q_pos: Any,
    k_pos: Any,
    /,
    *,
    dtype: str,
    seed: int = 0,
    blocks: Sequence[int] | None = None,
    causal: bool = False,
    bias_scale: float = 1.0,
    rtol: float | None = None,
    atol: float | None = None,
) -> EffectiveBiasResult:
    """:func:`read_probabilities` of ``call`` on ``shape`` compared by :func:`compare_bias` with ``family``'s bias at
    ``q_pos``, ``k_pos`` (:func:`reference_bias`, -inf on the keys a causal mask removes when ``causal``)."""
    probs = read_probabilities(call, shape, dtype=dtype, seed=seed, blocks=blocks)
    bias = reference_bias(family, q_pos, k_pos, causal=causal)
    mag = reference_magnitude(family, q_pos, k_pos)
    keys = probe_keys(shape, blocks)
    return compare_bias(
        probs, bias, q_pos, k_pos, dtype=dtype, bias_scale=bias_scale, keys=keys, rtol=rtol, atol=atol, magnitude=mag
    )


def effective_bias(probs: Any, /) -> np.ndarray:
    r"""The effective bias :math:`\log P_{ij} - \log \max_{j'} P_{ij'}` of probabilities P (..., Sq, Sk).

    Each row is centred at its most probable key (0 there, negative elsewhere), where P is largest and its log the
    most accurate; the same centring of a reference bias, :math:`b_{ij} - b_{i j^*}` at that key :math:`j^*`, makes
    the two comparable, since softmax ignores a constant per row. -inf where P == 0; NaN where P is negative or NaN
    (no probability) and on rows without a positive entry. NaN entries (keys not read) are ignored by the centring.
    """
    arr = np.asarray(probs)
    if arr.dtype.kind not in "fiu" or arr.ndim < 1:
        msg = f"probs: expected a real array of probabilities with a key axis, got {arr.dtype} of shape {arr.shape}"
        raise TypeError(msg)
    p = arr.astype(np.float64)
    good = np.isfinite(p) & (p >= 0)
    top = np.max(np.where(good, p, -1.0), axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.where(good, p, np.nan)) - np.log(np.where(top > 0, top, np.nan))


def _spread(n: int, m: int) -> tuple[int, ...]:
    """m of the n blocks 0..n-1, evenly spread, first and last included."""
    if m >= n:
        return tuple(range(n))
    if m <= 1:
        return (n - 1,)
    return tuple(sorted({math.floor(x + 0.5) for x in np.linspace(0, n - 1, m)}))


def plan_readout(
    shapes: Mapping[str, Any], *, max_calls: int = MAX_PROBE_CALLS
) -> tuple[list[tuple[str, tuple[int, ...]]], list[str]]:
    """Which cases an effective-bias check reads, and which probe blocks of each, within ``max_calls`` calls.

    Two cases at most: the one with the longest keys (far offsets; among equals the fewest queries, as a decode
    case), and one with Sq > 1 (rows at different query positions, masked keys): the largest by Sq * Sk among those
    that need at most an eighth of the calls (each call of such a case costs Sq times more), else the one that needs
    the fewest. A case that needs more calls than
    it is given reads an evenly spread subset of its key blocks (the first and the last included).

    Returns
    -------
    plan : list of (case name, probe blocks)
    notes : list of str
        What was not read.
    """
    budget = _checks.integer("max_calls", max_calls, minimum=1)
    if not isinstance(shapes, Mapping) or not shapes:
        msg = f"shapes: expected a non-empty mapping of case name -> AttentionShape, got {shapes!r}"
        raise TypeError(msg)
    sh = {n: _shape(s) for n, s in shapes.items()}
    calls = {n: probe_count(s) for n, s in sh.items()}
    far = max(sh, key=lambda n: (sh[n].k_len, -sh[n].q_len, -list(sh).index(n)))
    multi = [n for n in sh if n != far and sh[n].q_len > 1]
    chosen = [far]
    if budget >= 2 and multi:
        small = [n for n in multi if calls[n] <= max(1, budget // 8)]
        second = max(small, key=lambda n: sh[n].q_len * sh[n].k_len) if small else min(multi, key=calls.__getitem__)
        chosen.append(second)
    plan: list[tuple[str, tuple[int, ...]]] = []
    notes: list[str] = []
    left = budget
    for n in reversed(chosen):  # the Sq > 1 case first: it is small; the far case takes what is left
        give = min(calls[n], left if n == far else max(1, budget // 2))
        plan.append((n, _spread(calls[n], give)))
        left -= len(plan[-1][1])
        if give < calls[n]:
            notes.append(
                f"case {n}: {give} of its {calls[n]} key blocks of {sh[n].head_dim} read (evenly spread, to stay "
                f"within {budget} candidate calls); the keys of the others are not compared"
            )
    plan.reverse()
    skipped = [n for n in sh if n not in chosen]
    if skipped:
        which = "the case with the longest keys" + (" and one with Sq > 1" if len(chosen) > 1 else "")
        notes.append(f"cases not read (the readout takes {which}): {', '.join(skipped)}")
    if sh[far].q_len == 1 and not multi:
        notes.append("no case with Sq > 1: rows at different query positions are not compared")
    return plan, notes
