"""Deliberately broken implementations: every property test must reject at least one of them.

Each mutant is a small, plausible bug (a flipped sign, an off-by-one, a forgotten factor), built by subclassing a
real family, wrapping the real functions, or re-implementing a few lines. relpos_ref itself is never modified.
``MUTANTS`` maps a mutant name to the :class:`properties.Impl` that carries it and the property bodies (names in
``test_properties.BODIES``, or ``"alibi_slopes"``) that must fail with it; ``tests/test_mutants.py`` runs them.

``naive_attention`` is a direct, unblocked re-implementation of relpos_ref's attention contract on top of
:func:`relpos_ref.biased_softmax`; with ``bug=None`` it satisfies every attention property (``test_mutants.py``
checks that too), so a failure of a mutant built on it is due to its bug and nothing else.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from array_api_compat import array_namespace

import relpos_ref as rp
from relpos_ref.testing import to_numpy

from .properties import REAL, Impl

# -- family mutants ---------------------------------------------------------------------------------------------


class ALiBiSignFlipped(rp.ALiBi):
    """b = +m |i - j|: a reward for distance instead of a penalty."""

    def _compute(self, xp, arrays, delta, q_pos, dtype):
        return -super()._compute(xp, arrays, delta, q_pos, dtype)


class ALiBiNoAbs(rp.ALiBi):
    """b = -m (i - j): the abs dropped, so future keys (Delta < 0) get a growing bonus."""

    def _compute(self, xp, arrays, delta, q_pos, dtype):
        return -(arrays["slopes"][:, None, None] * xp.astype(delta, dtype)[None, :, :])


class ALiBiQueryPosition(rp.ALiBi):
    """b = -m i: the slope multiplies the absolute query position instead of |i - j|."""

    def _compute(self, xp, arrays, delta, q_pos, dtype):
        pos = xp.astype(q_pos[:, None] + 0 * delta, dtype)
        return -(arrays["slopes"][:, None, None] * pos[None, :, :])


class ALiBiHeadsSorted(rp.ALiBi):
    """bias(heads=...) treats the head list as a set: sorted, duplicates kept."""

    def bias(self, q_pos, k_pos, *, heads=None):
        if heads is not None and not isinstance(heads, int):
            heads = sorted(heads)
        return super().bias(q_pos, k_pos, heads=heads)


class ALiBiFloat32OffNumPy(rp.ALiBi):
    """Rounds m |i - j| through float32 on every namespace but NumPy (a backend-dependent intermediate)."""

    def _compute(self, xp, arrays, delta, q_pos, dtype):
        out = super()._compute(xp, arrays, delta, q_pos, dtype)
        if "numpy" not in getattr(xp, "__name__", ""):
            out = xp.astype(xp.astype(out, xp.float32), dtype)
        return out


class KerplePowerSignFlipped(rp.KerplePower):
    """b = +r1 |Delta|^r2."""

    def _compute(self, xp, arrays, delta, q_pos, dtype):
        return -super()._compute(xp, arrays, delta, q_pos, dtype)


class KerpleLogOffByOne(rp.KerpleLog):
    """b = -r1 log(1 + r2 (|Delta| + 1)): distances counted from 1."""

    def _compute(self, xp, arrays, delta, q_pos, dtype):
        dist = xp.astype(xp.abs(delta), dtype) + 1.0
        return -(arrays["r1"][:, None, None] * xp.log1p(arrays["r2"][:, None, None] * dist[None, :, :]))


class FIREWithoutThreshold(rp.FIRE):
    """Normaliser psi(i + 1) instead of psi(max(L, i)): L forgotten, so FIRE depends on i even below L."""

    def _x(self, xp, arrays, delta, q_pos, dtype):
        c = arrays["c"]
        dist = xp.astype(xp.abs(delta), dtype)
        norm = xp.log1p(c * (xp.astype(q_pos, dtype) + 1.0)) + self._options["eps"]
        return xp.log1p(c * dist) / norm[:, None]


class FIREFixedNormaliser(rp.FIRE):
    """Normaliser psi(L) for every query: the absolute position forgotten (FIRE becomes translation invariant)."""

    def _x(self, xp, arrays, delta, q_pos, dtype):
        c, big_l = arrays["c"], arrays["L"]
        dist = xp.astype(xp.abs(delta), dtype)
        return xp.log1p(c * dist) / (xp.log1p(c * big_l) + self._options["eps"])


class SandwichUncentred(rp.Sandwich):
    """sum_k cos(|Delta| w_k) / (8h/H) without the - d/2: not zero at Delta = 0."""

    def _compute(self, xp, arrays, delta, q_pos, dtype):
        omega = xp.astype(self._omega, dtype)
        dist = xp.astype(xp.abs(delta), dtype)
        total = xp.zeros(delta.shape, dtype=dtype)
        for k in range(omega.shape[0]):
            total = total + xp.cos(dist * omega[k])
        return total[None, :, :] / arrays["divisor"][:, None, None]


class SandwichLastFrequencyOnly(rp.Sandwich):
    """The accumulation ``total = s * s`` instead of ``total + s * s``: only the lowest frequency survives."""

    def _compute(self, xp, arrays, delta, q_pos, dtype):
        omega = xp.astype(self._omega, dtype)
        half_dist = xp.astype(xp.abs(delta), dtype) * 0.5
        total = xp.zeros(delta.shape, dtype=dtype)
        for k in range(omega.shape[0]):
            s = xp.sin(half_dist * omega[k])
            total = s * s
        return (-2.0 * total)[None, :, :] / arrays["divisor"][:, None, None]


# -- T5 bucket mutants: the HF float formula with a broken cap ----------------------------------------------------


def _t5_float(delta, *, bidirectional, num_buckets=32, max_distance=128, xp=None, cap: int | None):
    """HF ``_relative_position_bucket(-delta)`` in float64 with the last bucket capped at ``half - cap``."""
    xp = array_namespace(delta) if xp is None else xp
    rel = -to_numpy(delta).astype(np.int64)  # HF's memory - query
    half = num_buckets
    out = np.zeros_like(rel)
    if bidirectional:
        half //= 2
        out += (rel > 0) * half
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    exact = half // 2
    # log of max(rel, exact): entries below exact take the exact branch anyway
    ratio = np.log(np.maximum(rel, exact) / exact) / math.log(max_distance / exact)
    large = exact + (ratio * (half - exact)).astype(np.int64)
    if cap is not None:
        large = np.minimum(large, half - cap)
    out += np.where(rel < exact, rel, large)
    return xp.asarray(out)


def t5_bucket_cap_off_by_one(delta, **kw):
    """Last bucket capped at min(B', .) instead of min(B' - 1, .)."""
    return _t5_float(delta, cap=0, **kw)


def t5_bucket_uncapped(delta, **kw):
    """No cap at all: buckets keep growing beyond max_distance."""
    return _t5_float(delta, cap=None, **kw)


# -- softmax mutants ------------------------------------------------------------------------------------------------


def _softmax(scores, bias=None, *, mask=None, scale=1.0, placement="post_scale", fully_masked="zero",
             return_lse=False, xp=None, bug: str):  # fmt: skip
    xp = array_namespace(scores) if xp is None else xp
    if bias is None:
        z = scores * scale
    else:
        z = scores * scale + bias if placement == "post_scale" else (scores + bias) * scale
    attend = xp.ones(z.shape, dtype=xp.bool) if mask is None else xp.broadcast_to(mask, z.shape)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if bug == "no_max_shift":
            e = xp.where(attend, xp.exp(z), 0.0)
            total = xp.sum(e, axis=-1, keepdims=True)
            probs, lse = e / total, xp.log(total)[..., 0]
        else:
            zm = xp.where(attend, z, -math.inf)
            m = xp.max(zm, axis=-1, keepdims=True)
            m = xp.where(m == -math.inf, 0.0, m)
            e = xp.where(attend, xp.exp(zm - m), 0.0)
            total = xp.sum(e, axis=-1, keepdims=True)
            if bug == "normalise_all":  # normalises over every key, masked ones included
                total = xp.sum(xp.exp(z - m), axis=-1, keepdims=True)
            safe = xp.where(total == 0, 1.0, total)
            probs = e / safe
            lse = xp.log(safe) if bug == "lse_without_max" else m + xp.log(safe)
            lse = xp.where(total == 0, -math.inf, lse)[..., 0]
    return (probs, lse) if return_lse else probs


def softmax_no_max_shift(scores, bias=None, **kw):
    """exp(z) / sum exp(z) with no max shift: overflows to inf/inf = NaN for logits above ~709 (float64)."""
    return _softmax(scores, bias, bug="no_max_shift", **kw)


def softmax_normalise_all(scores, bias=None, **kw):
    """Masked keys dropped from the numerator but not from the denominator: rows sum to less than 1."""
    return _softmax(scores, bias, bug="normalise_all", **kw)


def softmax_lse_without_max(scores, bias=None, **kw):
    """Correct probabilities; lse = log sum exp(z - m), the max m not added back."""
    return _softmax(scores, bias, bug="lse_without_max", **kw)


# -- attention mutants -------------------------------------------------------------------------------------------


def naive_attention(q, k, v, *, bias=None, causal=False, align="bottom_right", scale=None, placement="post_scale",
                    mask=None, fully_masked="zero", return_lse=False, block_size=None, xp=None, bug=None):  # fmt: skip
    """Unblocked attention from biased_softmax; ``bug`` injects one defect (None: correct)."""
    del block_size  # unblocked: one pass over all queries
    xp = array_namespace(q, k, v) if xp is None else xp
    _, nh, sq, d = q.shape
    nkv, sk = k.shape[1], k.shape[2]
    group = nh // nkv
    kv_of = [h % nkv for h in range(nh)] if bug == "gqa_interleaved" else [h // group for h in range(nh)]
    idx = xp.asarray(kv_of, dtype=xp.int64)
    kk, vv = xp.take(k, idx, axis=1), xp.take(v, idx, axis=1)
    if bug == "head_shift":  # each head's queries leak half of the previous head's
        q = q + 0.5 * xp.roll(q, 1, axis=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q_pos, k_pos = rp.positions(sq, sk, align="top_left" if bug == "top_left" else align, xp=xp)
    scores = q @ xp.matrix_transpose(kk)
    b = None
    if isinstance(bias, rp.BiasFamily):
        b = bias.bias(q_pos, k_pos)[None, ...]
    elif bias is not None:
        b = bias
    allowed = mask
    if causal:
        delta = rp.relative_offsets(q_pos, k_pos)
        cm = delta >= (-1 if bug == "next_key" else 0)
        allowed = cm if allowed is None else (allowed & cm)
    softmax = softmax_lse_without_max if bug == "lse_without_max" else rp.biased_softmax
    if bug == "prescale_unscaled_bias" and placement == "pre_scale":
        placement = "post_scale"  # z = s * scale + b: the bias misses its factor scale
    probs, lse = softmax(
        scores, b, mask=allowed, scale=scale, placement=placement, fully_masked=fully_masked, return_lse=True
    )
    out = probs @ vv
    return (out, lse) if return_lse else out


def _naive(bug):
    def attention(*args, **kw):
        return naive_attention(*args, bug=bug, **kw)

    attention.__name__ = f"naive_attention_{bug}"
    return attention


def attention_blocks_restart(q, k, v, *, bias=None, block_size=None, return_lse=False, **kw):
    """Each query block evaluated as an independent call: positions restart per block (wrong unless one block)."""
    xp = array_namespace(q, k, v)
    sq = q.shape[2]
    if block_size is None or block_size >= sq:
        return rp.attention(q, k, v, bias=bias, return_lse=return_lse, **kw)
    outs, lses = [], []
    for start in range(0, sq, block_size):
        stop = min(sq, start + block_size)
        b = bias
        if isinstance(bias, rp.TensorBias):
            b = rp.TensorBias(bias.parameters()["array"][:, start:stop, :])
        elif bias is not None and not isinstance(bias, rp.BiasFamily) and bias.shape[-2] == sq:
            b = bias[..., start:stop, :]
        o, lse = rp.attention(q[:, :, start:stop, :], k, v, bias=b, return_lse=True, **kw)
        outs.append(o)
        lses.append(lse)
    out, lse = xp.concat(outs, axis=2), xp.concat(lses, axis=2)
    return (out, lse) if return_lse else out


def attention_kv_blocks_restart(q, k, v, *, bias=None, kv_block_size=None, return_lse=False, **kw):
    """Each key block evaluated as an independent call and merged by log-sum-exp (a correct merge), but the key
    positions (and the bottom-right offset) restart per block: wrong unless there is one key block."""
    xp = array_namespace(q, k, v)
    sk = k.shape[2]
    kw.pop("block_size", None)
    if (
        kv_block_size is None
        or kv_block_size >= sk
        or isinstance(bias, rp.TensorBias)
        or (bias is not None and not isinstance(bias, rp.BiasFamily))
    ):
        return rp.attention(q, k, v, bias=bias, return_lse=return_lse, **kw)
    outs, lses = [], []
    for start in range(0, sk, kv_block_size):
        stop = min(sk, start + kv_block_size)
        o, lse = rp.attention(q, k[:, :, start:stop, :], v[:, :, start:stop, :], bias=bias, return_lse=True, **kw)
        outs.append(o)
        lses.append(lse)
    stacked = xp.stack(lses, axis=0)
    top = xp.max(stacked, axis=0)
    safe_top = xp.where(xp.isinf(top), 0.0, top)
    weights = [xp.exp(lse - safe_top) for lse in lses]
    total = sum(weights)
    safe_total = xp.where(total == 0, 1.0, total)
    out = sum(w[..., None] * o for w, o in zip(weights, outs)) / safe_total[..., None]
    lse = xp.where(total == 0, -float("inf"), safe_top + xp.log(safe_total))
    return (out, lse) if return_lse else out


# -- backward mutants --------------------------------------------------------------------------------------------


def naive_attention_vjp(q, k, v, d_out, *, bias=None, causal=False, align="bottom_right", scale=None,
                        placement="post_scale", mask=None, fully_masked="zero", d_lse=None, block_size=None,
                        kv_block_size=None, xp=None, bug=None):  # fmt: skip
    """Materialised (B, H, Sq, Sk) backward written from the formulas; ``bug`` injects one defect (None: correct).

    Family parameter gradients go through the family's ``bias_vjp`` on the whole bias cotangent.
    """
    del block_size, kv_block_size
    xp = array_namespace(q, k, v) if xp is None else xp
    nb, nh, sq, d = q.shape
    nkv, sk = k.shape[1], k.shape[2]
    group = nh // nkv
    idx = xp.asarray([h // group for h in range(nh)], dtype=xp.int64)
    kk, vv = xp.take(k, idx, axis=1), xp.take(v, idx, axis=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q_pos, k_pos = rp.positions(sq, sk, align=align, xp=xp)
    family = bias if isinstance(bias, rp.BiasFamily) and not isinstance(bias, rp.TensorBias) else None
    if isinstance(bias, rp.TensorBias):
        b = bias.parameters()["array"][None, ...]
    elif family is not None:
        b = family.bias(q_pos, k_pos)[None, ...]
    else:
        b = bias
    allowed = mask
    if causal and bug != "backward_no_causal":
        cm = rp.causal_mask(q_pos, k_pos, xp=xp)
        allowed = cm if allowed is None else (allowed & cm)
    probs, lse = rp.biased_softmax(q @ xp.matrix_transpose(kk), b, mask=allowed, scale=scale, placement=placement,
                                   return_lse=True)  # fmt: skip
    if bug == "backward_no_causal" and causal:
        full = rp.biased_softmax(q @ xp.matrix_transpose(kk), b, scale=scale, placement=placement)
        probs = full  # probabilities recomputed without the mask
    out = probs @ vv
    dp = d_out @ xp.matrix_transpose(vv)
    delta = xp.sum(d_out * out, axis=-1, keepdims=True)
    if d_lse is not None:
        delta = delta - xp.where(lse == -math.inf, 0.0, d_lse)[..., None]
    dz = probs * dp if bug == "no_delta" else probs * (dp - delta)
    dq = (dz @ kk) * (1.0 if bug == "dq_unscaled" else scale)
    dk_h = (xp.matrix_transpose(dz) @ q) * scale
    dv_h = xp.matrix_transpose(probs) @ d_out
    if bug == "dk_first_of_group":
        dk = xp.take(dk_h, xp.asarray([g * group for g in range(nkv)], dtype=xp.int64), axis=1) * group
    else:
        dk = xp.sum(xp.reshape(dk_h, (nb, nkv, group, sk, d)), axis=2)
    dv = xp.sum(xp.reshape(dv_h, (nb, nkv, group, sk, dv_h.shape[-1])), axis=2)
    db = dz * scale if placement == "pre_scale" and bug != "prescale_bias_grad_unscaled" else dz
    dbias = None
    if isinstance(bias, rp.TensorBias):
        dbias = {"array": xp.sum(db, axis=0)}
    elif family is not None:
        dbias = family.bias_vjp(q_pos, k_pos, xp.sum(db, axis=0))
    elif bias is not None:
        axes = tuple(ax for ax in range(4) if (bias.ndim - 4 + ax < 0 or bias.shape[bias.ndim - 4 + ax] == 1))
        dbias = xp.reshape(xp.sum(db, axis=axes, keepdims=True) if axes else db, bias.shape)
    if fully_masked == "nan":
        # autograd of softmax(z + mask) spreads an empty row's NaN to dk, dv of its kv head and to every family
        # parameter; the bug keeps it in dq
        empty = lse == -math.inf
        dq = xp.where(empty[..., None], math.nan, dq)
        if bug != "nan_dq_only":
            per_kv = xp.any(xp.reshape(empty, (nb, nkv, group * sq)), axis=-1)[:, :, None, None]
            dk, dv = xp.where(per_kv, math.nan, dk), xp.where(per_kv, math.nan, dv)
            if family is not None:
                dbias = {n: xp.full_like(a, math.nan) for n, a in dbias.items()}
    return rp.AttentionGrads(dq, dk, dv, dbias)


def _naive_vjp(bug):
    def attention_vjp(*args, **kw):
        return naive_attention_vjp(*args, bug=bug, **kw)

    attention_vjp.__name__ = f"naive_attention_vjp_{bug}"
    return attention_vjp


def attention_vjp_blocks_restart(q, k, v, d_out, *, block_size=None, **kw):
    """Each query block's gradients from an independent call: positions restart per block (wrong unless one block)."""
    xp = array_namespace(q, k, v)
    sq = q.shape[2]
    bq = sq if block_size is None else block_size
    if bq >= sq:
        return rp.attention_vjp(q, k, v, d_out, **kw)
    bias = kw.pop("bias", None)
    d_lse = kw.pop("d_lse", None)
    parts = []
    for s in range(0, sq, bq):
        e = min(sq, s + bq)
        b = bias
        if isinstance(bias, rp.TensorBias):
            b = rp.TensorBias(bias.parameters()["array"][:, s:e, :])
        elif bias is not None and not isinstance(bias, rp.BiasFamily):
            b = bias[..., s:e, :] if bias.shape[-2] == sq else bias
        dl = None if d_lse is None else d_lse[:, :, s:e]
        parts.append(rp.attention_vjp(q[:, :, s:e], k, v, d_out[:, :, s:e], bias=b, d_lse=dl, **kw))
    dq = xp.concat([p.dq for p in parts], axis=2)
    dk = sum(p.dk for p in parts[1:]) + parts[0].dk
    dv = sum(p.dv for p in parts[1:]) + parts[0].dv
    dbias = parts[0].dbias
    if isinstance(dbias, dict):
        if isinstance(bias, rp.TensorBias):
            dbias = {"array": xp.concat([p.dbias["array"] for p in parts], axis=1)}
        else:
            dbias = {n: sum(p.dbias[n] for p in parts[1:]) + parts[0].dbias[n] for n in dbias}
    elif dbias is not None:
        dbias = xp.concat([p.dbias for p in parts], axis=-2) if bias.shape[-2] == sq else sum(p.dbias for p in parts)
    return rp.AttentionGrads(dq, dk, dv, dbias)


class ALiBiSlopeGradSign(rp.ALiBi):
    """d slope = +sum |Delta| g: the minus sign of b = -m |Delta| lost in the backward."""

    def _offset_vjp(self, xp, arrays, g, deltas, dtype, *, consecutive):
        return {"slopes": -super()._offset_vjp(xp, arrays, g, deltas, dtype, consecutive=consecutive)["slopes"]}


class KerplePowerGradNoLog(rp.KerplePower):
    """d r2 = -r1 |Delta|^r2: the log |Delta| factor of the exponent's derivative dropped."""

    def _offset_vjp(self, xp, arrays, g, deltas, dtype, *, consecutive):
        out = super()._offset_vjp(xp, arrays, g, deltas, dtype, consecutive=consecutive)
        dist = xp.astype(xp.abs(deltas), dtype)[None, :]
        out["r2"] = -xp.sum(g * (arrays["r1"][:, None] * xp.pow(dist, arrays["r2"][:, None])), axis=1)
        return out


class KerplePowerGradNaNAtZero(rp.KerplePower):
    """d r2 from |Delta|^r2 log|Delta| evaluated as is: 0 * -inf = NaN at Delta = 0."""

    def _offset_vjp(self, xp, arrays, g, deltas, dtype, *, consecutive):
        out = super()._offset_vjp(xp, arrays, g, deltas, dtype, consecutive=consecutive)
        dist = xp.astype(xp.abs(deltas), dtype)[None, :]
        r1, r2 = arrays["r1"][:, None], arrays["r2"][:, None]
        with np.errstate(all="ignore"):
            out["r2"] = -xp.sum(g * (r1 * xp.pow(dist, r2) * xp.log(dist)), axis=1)
        return out


class T5GradBucketShift(rp.T5Bias):
    """Table gradient scattered one bucket up (capped at the last): an off-by-one in the backward's bucket index."""

    def _offset_vjp(self, xp, arrays, g, deltas, dtype, *, consecutive):
        out = super()._offset_vjp(xp, arrays, g, deltas, dtype, consecutive=consecutive)
        t = out["table"]
        return {"table": xp.concat([xp.zeros_like(t[:, :1]), t[:, :-2], t[:, -2:-1] + t[:, -1:]], axis=1)}


class OffsetGradNoClipSums(rp.OffsetBias):
    """End columns get only the offsets exactly +-K, not every offset clipped onto them."""

    def _offset_vjp(self, xp, arrays, g, deltas, dtype, *, consecutive):
        k = self.max_offset
        idx = deltas + k
        inside = (idx >= 0) & (idx <= 2 * k)
        g = xp.where(inside[None, :], g, xp.zeros_like(g))
        return {"table": rp.families.base.scatter_columns(xp, g, xp.clip(idx, min=0, max=2 * k), 2 * k + 1)}


class FIREGradTieFull(rp.FIRE):
    """d max(L, i) / dL = 1 at a tie L == i (the one-sided slope from above) instead of 1/2."""

    def _vjp(self, xp, arrays, g, q_pos, k_pos, dtype):
        out = super()._vjp(xp, arrays, g, q_pos, k_pos, dtype)
        # L nudged up by a relative 1e-12 turns every tie into L > i and changes nothing else measurably.
        nudged = super()._vjp(xp, {**arrays, "L": arrays["L"] * (1.0 + 1e-12)}, g, q_pos, k_pos, dtype)
        return {**out, "L": nudged["L"]}


# -- ALiBi slope mutant ------------------------------------------------------------------------------------------


def alibi_slopes_closed_form(num_heads, *, dtype=None, xp=None, device=None):
    """2^(-8h/H) for every H: right for powers of two only."""
    if xp is None:
        import array_api_compat.numpy as xp
    vals = [2.0 ** (-8.0 * h / num_heads) for h in range(1, num_heads + 1)]
    return xp.asarray(vals, dtype=xp.float64 if dtype is None else dtype, device=device)


# -- registry ----------------------------------------------------------------------------------------------------


def _fam(kind: str, cls: type) -> Impl:
    return REAL.with_class(kind, cls, name=cls.__name__)


MUTANTS: dict[str, tuple[Impl, tuple[str, ...]]] = {
    "alibi_sign_flipped": (_fam("alibi", ALiBiSignFlipped), ("penalty_monotone",)),
    "alibi_no_abs": (_fam("alibi", ALiBiNoAbs), ("penalty_monotone",)),
    "alibi_query_position": (_fam("alibi", ALiBiQueryPosition), ("offset_only", "penalty_monotone")),
    "alibi_heads_sorted": (_fam("alibi", ALiBiHeadsSorted), ("heads_subset",)),
    "alibi_float32_off_numpy": (_fam("alibi", ALiBiFloat32OffNumPy), ("backend_agreement",)),
    "kerple_power_sign_flipped": (_fam("kerple_power", KerplePowerSignFlipped), ("penalty_monotone",)),
    "kerple_log_off_by_one": (_fam("kerple_log", KerpleLogOffByOne), ("penalty_monotone",)),
    "fire_without_threshold": (_fam("fire", FIREWithoutThreshold), ("offset_only",)),
    "fire_fixed_normaliser": (_fam("fire", FIREFixedNormaliser), ("fire_beyond_L",)),
    "sandwich_uncentred": (_fam("sandwich", SandwichUncentred), ("sandwich_zero",)),
    "sandwich_last_frequency_only": (_fam("sandwich", SandwichLastFrequencyOnly), ("sandwich_not_monotone",)),
    "t5_cap_off_by_one": (Impl(name="t5_cap_off_by_one", t5_bucket=t5_bucket_cap_off_by_one), ("t5_buckets",)),
    "t5_uncapped": (Impl(name="t5_uncapped", t5_bucket=t5_bucket_uncapped), ("t5_buckets",)),
    "softmax_no_max_shift": (
        Impl(name="softmax_no_max_shift", biased_softmax=softmax_no_max_shift),
        ("probabilities",),
    ),
    "softmax_normalise_all": (
        Impl(name="softmax_normalise_all", biased_softmax=softmax_normalise_all),
        ("probabilities",),
    ),
    "softmax_lse_without_max": (
        Impl(name="softmax_lse_without_max", biased_softmax=softmax_lse_without_max),
        ("softmax_shift",),
    ),
    "attention_lse_without_max": (
        Impl(name="lse_without_max", attention=_naive("lse_without_max")),
        ("attention_shift",),
    ),
    "attention_causal_next_key": (Impl(name="next_key", attention=_naive("next_key")), ("causal",)),
    "attention_top_left_always": (Impl(name="top_left", attention=_naive("top_left")), ("kv_cache",)),
    "attention_head_shift": (
        Impl(name="head_shift", attention=_naive("head_shift")),
        ("head_independence", "head_permutation"),
    ),
    "attention_gqa_interleaved": (
        Impl(name="gqa_interleaved", attention=_naive("gqa_interleaved")),
        ("head_independence", "head_permutation"),
    ),
    "attention_prescale_unscaled_bias": (
        Impl(name="prescale_unscaled_bias", attention=_naive("prescale_unscaled_bias")),
        ("placement",),
    ),
    "attention_blocks_restart": (Impl(name="blocks_restart", attention=attention_blocks_restart), ("block_size",)),
    "attention_kv_blocks_restart": (
        Impl(name="kv_blocks_restart", attention=attention_kv_blocks_restart),
        ("block_size",),
    ),
    "alibi_slopes_closed_form": (Impl(name="closed_form", alibi_slopes=alibi_slopes_closed_form), ("alibi_slopes",)),
    # backward (bodies of tests/test_gradient_properties.py)
    "vjp_no_delta": (Impl(name="no_delta", attention_vjp=_naive_vjp("no_delta")), ("grad_fd", "grad_row_sums")),
    "vjp_dq_unscaled": (Impl(name="dq_unscaled", attention_vjp=_naive_vjp("dq_unscaled")), ("grad_fd",)),
    "vjp_dk_first_of_group": (
        Impl(name="dk_first_of_group", attention_vjp=_naive_vjp("dk_first_of_group")),
        ("grad_fd", "grad_gqa"),
    ),
    "vjp_prescale_bias_grad_unscaled": (
        Impl(name="prescale_bias_grad_unscaled", attention_vjp=_naive_vjp("prescale_bias_grad_unscaled")),
        ("grad_placement", "grad_row_sums"),
    ),
    "vjp_backward_no_causal": (
        Impl(name="backward_no_causal", attention_vjp=_naive_vjp("backward_no_causal")),
        ("grad_causal",),
    ),
    "vjp_nan_dq_only": (Impl(name="nan_dq_only", attention_vjp=_naive_vjp("nan_dq_only")), ("grad_fully_masked",)),
    "vjp_blocks_restart": (
        Impl(name="vjp_blocks_restart", attention_vjp=attention_vjp_blocks_restart),
        ("grad_block_size",),
    ),
    "alibi_slope_grad_sign": (_fam("alibi", ALiBiSlopeGradSign), ("grad_fd", "bias_vjp_fd", "grad_tables")),
    "kerple_power_grad_no_log": (_fam("kerple_power", KerplePowerGradNoLog), ("grad_fd", "bias_vjp_fd")),
    "kerple_power_grad_nan_at_zero": (_fam("kerple_power", KerplePowerGradNaNAtZero), ("grad_fd", "bias_vjp_fd")),
    "t5_grad_bucket_shift": (_fam("t5", T5GradBucketShift), ("grad_tables", "bias_vjp_fd")),
    "offset_grad_no_clip_sums": (_fam("offset", OffsetGradNoClipSums), ("grad_tables", "bias_vjp_fd")),
    "fire_grad_tie_full": (_fam("fire", FIREGradTieFull), ("bias_vjp_fd",)),
}

# The correct naive attention: must pass every attention property (a control for the attention mutants).
NAIVE_CONTROL = Impl(name="naive_attention", attention=_naive(None))
NAIVE_VJP_CONTROL = Impl(name="naive_attention_vjp", attention_vjp=_naive_vjp(None))
NAIVE_VJP_CONTROL_BODIES = (
    "grad_fd",
    "grad_row_sums",
    "grad_gqa",
    "grad_placement",
    "grad_causal",
    "grad_fully_masked",
)
NAIVE_CONTROL_BODIES = (
    "causal",
    "attention_shift",
    "kv_cache",
    "head_independence",
    "head_permutation",
    "placement",
)
