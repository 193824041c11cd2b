"""A FlashAttention-style tiled attention in NumPy, correct by default, with the bugs of real kernels as switches.

``tiled_attention`` is written the way a tiled GPU kernel is: query tiles of ``block_q`` rows, key tiles of
``block_k`` columns, the bias computed per tile from absolute positions, an online softmax with a running maximum
and sum, a padded last key tile with a boundary mask, causal tile skipping, a long-cache decode path and a split-KV
path whose chunks are combined through their log-sum-exp. Every switch in :data:`BUGS` plants one realistic kernel
bug, active only where a real kernel would have it (the partial tile, the later query tiles, the decode path, ...),
so ``tests/conformance/test_kernel_mutants.py`` can show that ``check_attention``'s default cases reach each of these
code paths. It never calls ``relpos_ref.attention``; it uses the family only for the bias of a tile, as a kernel
evaluates its bias function.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import ml_dtypes
import numpy as np

import relpos_ref as rp

__all__ = ["BUGS", "DECODE_MIN_KEYS", "tiled_attention"]

#: Keys above which one query takes the decode path (real kernels switch to a cache-reading kernel around here).
DECODE_MIN_KEYS = 2048

#: Every bug switch and the kernel bug it plants (where it is active).
BUGS: dict[str, str] = {
    "partial_tile_dropped": "the partial last key tile is never processed (Sk not a multiple of block_k)",
    "no_rescale": "the accumulator is not rescaled by exp(m_old - m_new) when the running max grows across tiles",
    "qtile_offset": "query tiles after the first take q_pos from the tile start (bottom-right offset lost)",
    "decode_qpos_zero": f"the decode path (Sq == 1, Sk > {DECODE_MIN_KEYS}) computes the bias at query position 0",
    "split_no_rescale": "split-KV chunks combined as sum(l_i o_i) / sum(l_i), without the exp(m_i - m) correction",
    "float16_distance": "the offset i - j carried in float16 (wrong past 2048), for offset-only families",
    "float16_positions": "query and key positions held in float16 before i - j is formed (wrong past 2048)",
    "t5_far_bucket_zero": "T5 bucket table covers offsets below max_distance only; farther offsets read bucket 0",
    "partial_tile_causal": "the partial last key tile's causal mask is k < q (strict): its diagonal key dropped",
    "causal_skip_first_row": "causal tile skipping tests a key tile against the query tile's first row, not its last",
    "causal_skip_off_by_one": "causal loop bound cdiv(q_last, block_k) instead of cdiv(q_last + 1, block_k)",
    "gqa_modulo": "kv head h % H_kv instead of h // (H / H_kv) when the group ratio is above 2",
    "bias_batch0_only": "the bias is added to batch 0 only (a batch stride of 0 in the bias pointer)",
    "bias_head_mod4": "heads 4 and up read the bias parameters of head h % 4 (a 4-entry parameter buffer)",
    "lse_first_max": "lse = first key tile's max + log(final sum): wrong once the running max moves",
}


def _array(name: str, x: Any) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        msg = f"{name}: expected a NumPy array, got {type(x).__name__}"
        raise TypeError(msg)
    if x.ndim != 4:
        msg = f"{name}: expected 4 axes (B, H, S, D), got shape {x.shape}"
        raise ValueError(msg)
    if x.dtype not in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16):
        msg = f"{name}: expected float16, bfloat16, float32 or float64, got {x.dtype}"
        raise TypeError(msg)
    return x


def _block(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        msg = f"{name}: expected a positive integer, got {value!r}"
        raise ValueError(msg)
    return int(value)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _bugs(bugs: Iterable[str] | str) -> frozenset[str]:
    chosen = frozenset([bugs] if isinstance(bugs, str) else bugs)
    unknown = sorted(chosen - set(BUGS))
    if unknown:
        msg = f"bugs: expected names from {sorted(BUGS)}, got {unknown}"
        raise ValueError(msg)
    return chosen


class _Kernel:
    """One call's state: inputs in the compute dtype, positions, the bias function of a tile, and the bugs."""

    def __init__(self, q, k, v, family, *, causal, align, scale, block_q, block_k, bugs):
        b, h, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        self.acc = np.float64 if q.dtype == np.float64 else np.float32
        group = h // hkv
        wrong = "gqa_modulo" in bugs and group > 2
        kv_of = [i % hkv if wrong else i // group for i in range(h)]
        self.q = q.astype(self.acc)
        self.k = k.astype(self.acc)[:, kv_of]
        self.v = v.astype(self.acc)[:, kv_of]
        self.b, self.h, self.sq, self.sk = b, h, sq, sk
        self.scale = self.acc(1.0 / math.sqrt(d) if scale is None else scale)
        self.causal, self.align, self.bugs = causal, align, bugs
        self.block_q, self.block_k = block_q, block_k
        q_pos, k_pos = rp.positions(sq, sk, align=align)
        self.q_pos, self.k_pos = np.asarray(q_pos), np.asarray(k_pos)
        # A kernel evaluates its bias function in its own arithmetic: the family's parameters in the compute dtype.
        self.family = None if family is None else family.astype(self.acc)
        heads = list(range(h))
        if "bias_head_mod4" in bugs and h > 4:
            heads = [i % 4 for i in heads]
        self.heads = heads

    # -- the bias of one tile --------------------------------------------------------------------------------
    def bias(self, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray | None:
        """(H, len(q_pos), len(k_pos)) bias in the compute dtype, or None without a family."""
        fam = self.family
        if fam is None:
            return None
        if "t5_far_bucket_zero" in self.bugs and isinstance(fam, rp.T5Bias):
            return self._t5_short_table(q_pos, k_pos)
        if "float16_distance" in self.bugs:
            return self._float16_distance(q_pos, k_pos)
        if "float16_positions" in self.bugs:
            q_pos, k_pos = (p.astype(np.float16).astype(np.int64) for p in (q_pos, k_pos))
        return np.asarray(fam.bias(q_pos, k_pos, heads=self.heads))

    def _float16_distance(self, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
        if not self.family.offset_only:
            msg = f"bugs: float16_distance needs an offset-only family, got {type(self.family).__name__}"
            raise ValueError(msg)
        delta = (q_pos[:, None] - k_pos[None, :]).astype(np.float16).astype(np.int64)
        values, where = np.unique(delta, return_inverse=True)
        # An offset-only family's b(i, j) depends on i - j alone: evaluate it at q = 0, k = -delta.
        row = np.asarray(self.family.bias(np.zeros(1, np.int64), -values, heads=self.heads))[:, 0, :]
        return row[:, where.reshape(delta.shape)]

    def _t5_short_table(self, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
        opts = self.family.options()
        table = np.asarray(self.family.parameters()["table"])[self.heads]
        delta = q_pos[:, None] - k_pos[None, :]
        bucket = np.asarray(rp.t5_bucket(delta, bidirectional=opts["bidirectional"], max_distance=opts["max_distance"]))
        dist = np.abs(delta) if opts["bidirectional"] else np.maximum(delta, 0)
        bucket = np.where(dist >= opts["max_distance"], 0, bucket)
        return table[:, bucket]

    # -- one query tile over a range of key tiles ----------------------------------------------------------------
    def tile_positions(self, start: int, stop: int) -> np.ndarray:
        """Query positions of rows start..stop-1 as the kernel computes them."""
        if "qtile_offset" in self.bugs and start > 0:
            return np.arange(start, stop, dtype=np.int64)
        return self.q_pos[start:stop]

    def key_tiles(self, qp: np.ndarray, lo: int, hi: int) -> range:
        """The key tile indices visited for queries ``qp`` among keys [lo, hi), causal tiles skipped."""
        bk = self.block_k
        first, last = lo // bk, _cdiv(hi, bk)
        if self.causal:
            if "causal_skip_first_row" in self.bugs:
                last = min(last, max(first, int(qp[0]) // bk + 1))
            elif "causal_skip_off_by_one" in self.bugs:
                last = min(last, max(first, _cdiv(int(qp[-1]), bk)))
            else:
                last = min(last, max(first, int(qp[-1]) // bk + 1))
        if "partial_tile_dropped" in self.bugs and self.sk % bk and last == _cdiv(self.sk, bk):
            last -= 1
        return range(first, max(first, last))

    def run(self, rows: slice, qp: np.ndarray, lo: int, hi: int, *, mask: bool = True):
        """Unnormalised (acc, m, l, m_first) of the rows ``rows`` (positions ``qp``) over keys [lo, hi)."""
        bk = self.block_k
        q = self.q[:, :, rows]
        nq = q.shape[2]
        m = np.full((self.b, self.h, nq), -np.inf, self.acc)
        m_first = None
        l_sum = np.zeros((self.b, self.h, nq), self.acc)
        acc = np.zeros((self.b, self.h, nq, self.v.shape[-1]), self.acc)
        for t in self.key_tiles(qp, lo, hi):
            k0 = t * bk
            partial = k0 + bk > hi
            s = self._scores(q, qp, k0, hi, mask=mask, partial=partial)
            m_new = np.maximum(m, s.max(axis=-1))
            safe = np.where(m_new == -np.inf, 0.0, m_new).astype(self.acc)
            p = np.exp(s - safe[..., None])
            alpha = np.exp(np.where(m == -np.inf, -np.inf, m - safe)).astype(self.acc)
            l_sum = alpha * l_sum + p.sum(axis=-1, dtype=self.acc)
            pv = p[..., : min(bk, hi - k0)] @ self.v[:, :, k0 : min(k0 + bk, hi)]
            acc = acc + pv if "no_rescale" in self.bugs else alpha[..., None] * acc + pv
            m = m_new
            if m_first is None:
                m_first = m.copy()
        return acc, m, l_sum, (m if m_first is None else m_first)

    def _scores(self, q, qp, k0: int, hi: int, *, mask: bool, partial: bool) -> np.ndarray:
        """Logits of one key tile at key k0; the partial last tile is padded to block_k and boundary-masked."""
        bk = self.block_k
        kp = np.arange(k0, k0 + bk, dtype=np.int64)
        if partial:
            n = hi - k0
            kt = np.zeros((*self.k.shape[:2], bk, self.k.shape[-1]), self.acc)
            kt[:, :, :n] = self.k[:, :, k0:hi]
        else:
            n = bk
            kt = self.k[:, :, k0 : k0 + bk]
        s = (q @ np.swapaxes(kt, -1, -2)) * self.scale
        bias = self.bias(qp, kp)
        if bias is not None:
            if "bias_batch0_only" in self.bugs and self.b > 1:
                s[:1] += bias[None]
            else:
                s = s + bias[None]
        keep = np.ones((len(qp), bk), dtype=bool)
        keep[:, n:] = False
        if mask and self.causal:
            strict = partial and "partial_tile_causal" in self.bugs
            keep &= (kp[None, :] < qp[:, None]) if strict else (kp[None, :] <= qp[:, None])
        return np.where(keep, s, -np.inf).astype(self.acc)


def _finish(acc, m, l_sum, acc_dtype):
    """Normalised output and lse; rows that saw no key give 0 and -inf."""
    empty = l_sum == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(empty[..., None], 0.0, acc / np.where(empty, 1.0, l_sum)[..., None])
        lse = np.where(empty, -np.inf, m + np.log(np.where(empty, 1.0, l_sum)))
    return out.astype(acc_dtype), lse.astype(acc_dtype)


def tiled_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    /,
    *,
    bias_family: rp.BiasFamily | None = None,
    causal: bool = False,
    align: str = "bottom_right",
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
    split_kv: int | None = None,
    lse: bool = False,
    bugs: Iterable[str] | str = (),
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    r"""Tiled biased attention, :math:`\mathrm{softmax}(s\,QK^\top + b)\,V`, computed the way a GPU kernel tiles it.

    Parameters
    ----------
    q : array (B, H, Sq, D)
    k, v : arrays (B, H_kv, Sk, D) and (B, H_kv, Sk, D_v)
        Query head h reads kv head :math:`h \,/\!/\, (H / H_\mathrm{kv})`. float16, bfloat16 and float32 inputs are
        computed in float32, float64 in float64; the results have the input dtype.
    bias_family : BiasFamily, optional
        Evaluated per (query tile, key tile) on the tile's absolute positions (``relpos_ref.positions``), with the
        parameters converted to the compute dtype.
    causal : bool
        Keys after the query are masked; key tiles wholly after a query tile's last row are skipped.
    align : {"bottom_right", "top_left"}
    scale : float, optional
        :math:`s`; :math:`1/\sqrt{D}` by default. The bias is added after scaling.
    block_q, block_k : int
        Tile sizes. A key tile that runs past Sk is zero-padded and boundary-masked.
    split_kv : int, optional
        With :math:`S_q \le` ``block_q`` (decode, small chunks): split the keys into this many chunks (on tile
        boundaries), each an independent online softmax giving :math:`(o_c, \mathrm{lse}_c)`, combined as
        :math:`\mathrm{lse} = \log\sum_c e^{\mathrm{lse}_c}`, :math:`o = \sum_c e^{\mathrm{lse}_c - \mathrm{lse}} o_c`.
    lse : bool
        Also return the log-sum-exp (B, H, Sq) in the result dtype (-inf for rows that see no key).
    bugs : str or iterable of str
        Names from :data:`BUGS` to plant; none by default (a correct kernel).

    Returns
    -------
    out : array (B, H, Sq, D_v), or (out, lse)

    Notes
    -----
    Per query tile, for each key tile :math:`t`: :math:`m' = \max(m, \max_j s_j)`,
    :math:`\ell \leftarrow e^{m - m'}\ell + \sum_j e^{s_j - m'}`, :math:`a \leftarrow e^{m - m'} a + P_t V_t`; finally
    :math:`o = a / \ell`, :math:`\mathrm{lse} = m + \log \ell`. One query against more than
    :data:`DECODE_MIN_KEYS` keys (bottom-right or non-causal) takes the decode path: every key is in the query's
    past, so no causal mask is built, and the bias is evaluated at the query's position.
    """
    q, k, v = _array("q", q), _array("k", k), _array("v", v)
    if not (q.dtype == k.dtype == v.dtype):
        msg = f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        raise TypeError(msg)
    b, h, sq, d = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[3] != d or k.shape[1] < 1 or h % k.shape[1]:
        msg = f"k, v: expected (B, H_kv, Sk, D) with H_kv dividing H = {h}, given q {q.shape}, got {k.shape}, {v.shape}"
        raise ValueError(msg)
    if bias_family is not None:
        if not isinstance(bias_family, rp.BiasFamily):
            msg = f"bias_family: expected None or a relpos_ref bias family, got {type(bias_family).__name__}"
            raise TypeError(msg)
        if bias_family.num_heads != h:
            msg = f"bias_family: expected num_heads = H = {h}, got {bias_family.num_heads}"
            raise ValueError(msg)
    if align not in ("bottom_right", "top_left"):
        msg = f"align: expected 'bottom_right' or 'top_left', got {align!r}"
        raise ValueError(msg)
    block_q, block_k = _block("block_q", block_q), _block("block_k", block_k)
    if split_kv is not None:
        split_kv = _block("split_kv", split_kv)
    kern = _Kernel(
        q,
        k,
        v,
        bias_family,
        causal=bool(causal),
        align=align,
        scale=scale,
        block_q=block_q,
        block_k=block_k,
        bugs=_bugs(bugs),
    )
    sk = k.shape[2]
    if sq == 1 and sk > DECODE_MIN_KEYS and (align == "bottom_right" or not causal):
        out, lse_ = _decode(kern, split_kv)
    elif split_kv is not None and sq <= block_q:
        out, lse_ = _split(kern, slice(0, sq), kern.tile_positions(0, sq), split_kv, mask=True)
    else:
        out = np.zeros((b, h, sq, v.shape[-1]), kern.acc)
        lse_ = np.zeros((b, h, sq), kern.acc)
        for start in range(0, sq, block_q):
            stop = min(start + block_q, sq)
            qp = kern.tile_positions(start, stop)
            acc, m, l_sum, m_first = kern.run(slice(start, stop), qp, 0, sk)
            # o = acc / l does not read m, so lse_first_max spoils the stored lse alone
            lse_max = m_first if "lse_first_max" in kern.bugs else m
            out[:, :, start:stop], lse_[:, :, start:stop] = _finish(acc, lse_max, l_sum, kern.acc)
    out = out.astype(q.dtype)
    return (out, lse_.astype(q.dtype)) if lse else out


def _decode(kern: _Kernel, split_kv: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One query against a long cache: all keys are past keys, so no mask; split-KV when asked."""
    qp = np.zeros(1, np.int64) if "decode_qpos_zero" in kern.bugs else kern.q_pos
    if split_kv is not None:
        return _split(kern, slice(0, 1), qp, split_kv, mask=False)
    acc, m, l_sum, _ = kern.run(slice(0, 1), qp, 0, kern.sk, mask=False)
    return _finish(acc, m, l_sum, kern.acc)


def _split(kern: _Kernel, rows: slice, qp: np.ndarray, n_split: int, *, mask: bool) -> tuple[np.ndarray, np.ndarray]:
    """Split-KV: independent chunks of whole key tiles, combined through their lse (flash-decoding)."""
    bk, sk = kern.block_k, kern.sk
    chunk = _cdiv(_cdiv(sk, n_split), bk) * bk
    parts = []
    for lo in range(0, sk, chunk):
        acc, m, l_sum, _ = kern.run(rows, qp, lo, min(lo + chunk, sk), mask=mask)
        parts.append((*_finish(acc, m, l_sum, kern.acc), l_sum))
    outs = np.stack([p[0] for p in parts])
    lses = np.stack([p[1] for p in parts])
    sums = np.stack([p[2] for p in parts])
    top = np.max(lses, axis=0)
    empty = top == -np.inf
    safe = np.where(empty, 0.0, top)
    if "split_no_rescale" in kern.bugs:
        # each chunk's sum is relative to its own running max: adding them mixes scales
        total = sums.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(empty[..., None], 0.0, (sums[..., None] * outs).sum(axis=0) / total[..., None])
    else:
        w = np.exp(lses - safe)
        out = (w[..., None] * outs).sum(axis=0) / np.where(empty, 1.0, w.sum(axis=0))[..., None]
    with np.errstate(divide="ignore"):
        lse = np.where(empty, -np.inf, safe + np.log(np.where(empty, 1.0, np.exp(lses - safe).sum(axis=0))))
    return out.astype(kern.acc), lse.astype(kern.acc)
