r"""FIRE: functional interpolation for relative positions (Li et al., arXiv 2310.04418, ICLR 2024).

.. math::

    b_h(i, j) = f_\theta\!\left(\frac{\psi(|i - j|)}{\psi(\max(L, i)) + \varepsilon}\right),
    \qquad \psi(t) = \log(1 + c\,t),

with :math:`f_\theta(x) = W_2\,\mathrm{relu}(W_1 x + b_1) + b_2` a one-hidden-layer MLP. ``i`` is the absolute query
position: under a KV cache or chunked prefill the normaliser uses the true position, not the row index of the slice.
The normaliser makes FIRE the one family here that is not a function of :math:`i - j` alone once :math:`i > L`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from .. import _checks
from .._checks import array_device
from .base import OFFSET_BOUND, BiasFamily, host_abs_max, scale_pow2

__all__ = ["FIRE"]


class FIRE(BiasFamily, name="fire"):
    r"""FIRE bias with a one-hidden-layer MLP in PyTorch ``nn.Linear`` layouts.

    Parameters
    ----------
    w1 : float array (W, 1)
        Weight of ``nn.Linear(1, W)``.
    b1 : float array (W,)
    w2 : float array (H, W)
        Weight of ``nn.Linear(W, H)``.
    b2 : float array (H,)
    c : float or 0-d array, default 0.1
        Scale inside :math:`\psi`; > 0. The reference listing stores ``c`` as a learnable parameter initialised to
        0.1 and applies ``abs``; here it must be positive.
    L : float or 0-d array, default 512.0
        Threshold of the normaliser :math:`\psi(\max(L, i))`; > 0 (``init_L * L_multiplier`` in the listing).
    eps : float, default 0.0
        Added to the normaliser (the listing uses 1e-6); >= 0.
    xp, dtype, device : optional
        Used only for arguments that are not already arrays.

    Raises
    ------
    ValueError
        A shape or value out of range (NaN, infinity, c or L <= 0, eps < 0); or c and L for which :math:`\psi` or
        the interpolant leaves the compute dtype's range at some int64 position (see Notes).

    Notes
    -----
    The normaliser is at least :math:`\log(1 + cL) > 0`, and the constructor requires :math:`c` and :math:`cL` to be
    normal numbers of the compute dtype (float32 for float16), :math:`c\,2^{63}` finite, and the largest interpolant
    :math:`\psi(2^{63}) / (\psi(L) + \varepsilon)` below a quarter of the dtype's largest number, so that no
    :math:`\psi` underflows to 0 or overflows and x is finite, for every int64 position: no division by zero can
    occur. The MLP's weights may take its hidden units beyond the range (a unit of 4e308 whose output weight 1e-10
    brings the bias back to 4e298): entries that overflow are recomputed with the weights divided by a power of two
    and the result multiplied back (exact), so a bias is :math:`\pm\infty` only where its exact value is beyond the
    range, and never NaN. The listing applies ``abs`` to the offset; so does this class: keys after the query get
    the bias of their mirror image and must be removed by a causal mask, as in the paper, which defines FIRE for
    causal attention.
    """

    _head_params = ("w2", "b2")
    offset_only = False  # once a query position exceeds L, the normaliser max(L, i) depends on i

    def __init__(
        self,
        w1: Any,
        b1: Any,
        w2: Any,
        b2: Any,
        *,
        c: Any = 0.1,
        L: Any = 512.0,  # noqa: N803  (the paper's name)
        eps: float = 0.0,
        xp: Any = None,
        dtype: Any = None,
        device: Any = None,
    ) -> None:
        w1 = _checks.as_param("w1", w1, xp, dtype, device)
        ns = _checks.namespace(w1, names=("w1",))
        dtype = w1.dtype
        dev = array_device(w1)
        b1 = _checks.as_param("b1", b1, ns, dtype, dev)
        w2 = _checks.as_param("w2", w2, ns, dtype, dev)
        b2 = _checks.as_param("b2", b2, ns, dtype, dev)
        c = _checks.as_param("c", c, ns, dtype, dev)
        L = _checks.as_param("L", L, ns, dtype, dev)  # noqa: N806
        ns = _checks.namespace(w1, b1, w2, b2, c, L, names=("w1", "b1", "w2", "b2", "c", "L"))
        for name, arr, nd in (("w1", w1, 2), ("b1", b1, 1), ("w2", w2, 2), ("b2", b2, 1), ("c", c, 0), ("L", L, 0)):
            _checks.float_array(name, arr, ns, ndim=nd)
            _checks.nonempty(name, arr)
            _checks.finite(name, arr, ns)
        width = w1.shape[0]
        heads = w2.shape[0]
        expected = {"w1": (width, 1), "b1": (width,), "w2": (heads, width), "b2": (heads,)}
        for name, arr in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
            if tuple(arr.shape) != expected[name]:
                msg = (
                    f"{name}: expected shape {expected[name]} (nn.Linear layouts: w1 (W, 1), b1 (W,), w2 (H, W), "
                    f"b2 (H,)), got {tuple(arr.shape)}"
                )
                raise ValueError(msg)
        _checks.positive("c", c, ns)
        _checks.positive("L", L, ns)
        eps = _checks.real_scalar("eps", eps, nonnegative=True)
        _psi_range(ns, dtype, c, L, eps)
        self._finish(
            {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "c": c, "L": L},
            num_heads=heads,
            xp=ns,
            dtype=dtype,
            device=dev,
            options={"eps": eps},
        )

    @property
    def width(self) -> int:
        """W, the hidden width of the MLP."""
        return int(self._params["w1"].shape[0])

    def interpolant(self, q_pos: Any, k_pos: Any) -> Any:
        r"""The MLP input :math:`x(i, j) = \psi(|i-j|) / (\psi(\max(L, i)) + \varepsilon)`, shape (Sq, Sk)."""
        from ..positions import _positions_pair, relative_offsets

        xp = _positions_pair(q_pos, k_pos, self.xp)
        cdtype = _checks.compute_dtype(xp, self.dtype)
        arrays = {k: xp.astype(v, cdtype) for k, v in self._params.items()}
        x = self._x(xp, arrays, relative_offsets(q_pos, k_pos, xp=xp), q_pos, cdtype)
        return x if x.dtype == self.dtype else xp.astype(x, self.dtype)

    def _x(self, xp: Any, arrays: dict[str, Any], delta: Any, q_pos: Any, dtype: Any) -> Any:
        c, L = arrays["c"], arrays["L"]  # noqa: N806
        dist = xp.astype(xp.abs(delta), dtype)
        norm = xp.log1p(c * xp.maximum(xp.astype(q_pos, dtype), L)) + self._options["eps"]
        return xp.log1p(c * dist) / norm[:, None]

    def _compute(self, xp: Any, arrays: dict[str, Any], delta: Any, q_pos: Any, dtype: Any) -> Any:
        return self._stable_mlp(xp, arrays, self._x(xp, arrays, delta, q_pos, dtype), dtype, absolute=False)

    def _magnitude(self, xp: Any, arrays: dict[str, Any], delta: Any, q_pos: Any, dtype: Any) -> Any:
        r""":math:`|b_2| + \sum_w |W_{2,w}|\,(|W_{1,w}\,x| + |b_{1,w}|)`: the MLP's terms, which can cancel."""
        return self._stable_mlp(xp, arrays, self._x(xp, arrays, delta, q_pos, dtype), dtype, absolute=True)

    def _stable_mlp(self, xp: Any, arrays: dict[str, Any], x: Any, dtype: Any, *, absolute: bool) -> Any:
        """The MLP (or its magnitude) at x; entries that overflowed are recomputed on a power-of-two scale.

        An entry that is finite was computed without overflow (an overflow to +inf in a hidden unit or a partial
        sum stays non-finite to the end; one to -inf in a pre-activation is a ReLU input < 0, whose output 0 is
        exact). Dividing the weights by 2**shift keeps every intermediate below the range, and multiplying the
        result back is exact: it rounds to +-inf only where the exact value is beyond the range.
        """
        shift = self._shift(xp, dtype)
        if not shift:
            return self._mlp(xp, arrays, x, 0, absolute=absolute)
        with _checks.quiet_overflow():
            out = self._mlp(xp, arrays, x, 0, absolute=absolute)
            ok = xp.isfinite(out)
            if bool(xp.all(ok)):
                return out
            return xp.where(ok, out, self._mlp(xp, arrays, x, shift, absolute=absolute))

    def _mlp(self, xp: Any, arrays: dict[str, Any], x: Any, shift: int, *, absolute: bool) -> Any:
        """``2**shift`` times the MLP at x with every weight divided by ``2**shift`` (relu commutes with it)."""
        w1, b1, w2, b2 = arrays["w1"][:, 0], arrays["b1"], arrays["w2"], arrays["b2"]
        if shift:
            emax = _checks.max_exponent(xp, x.dtype)
            w1, b1, b2 = (scale_pow2(a, -shift, emax) for a in (w1, b1, b2))
        if absolute:
            w2, b2 = xp.abs(w2), xp.abs(b2)
        out = xp.broadcast_to(b2[:, None, None], (w2.shape[0], *x.shape))
        # One hidden unit at a time, in a fixed order: memory stays at one (H, Sq, Sk) array, and each head's sum is
        # the same sequence of roundings whichever heads are selected or however they are permuted (a matrix product
        # would let the BLAS kernel, and so the rounding, depend on the number of heads).
        for w in range(w1.shape[0]):
            hidden = xp.abs(w1[w] * x) + xp.abs(b1[w]) if absolute else xp.maximum(w1[w] * x + b1[w], 0)
            out = out + w2[:, w, None, None] * hidden[None, :, :]
        return scale_pow2(out, shift, _checks.max_exponent(xp, x.dtype)) if shift else out

    def _shift(self, xp: Any, dtype: Any) -> int:
        """0 when no intermediate can overflow ``dtype``; else the power of two that keeps all below 2**(emax-3)."""
        emax = _checks.max_exponent(xp, dtype)
        return 0 if self._log2_bound < emax - 3 else math.ceil(self._log2_bound) - emax + 3

    @functools.cached_property
    def _log2_bound(self) -> float:
        r"""log2 of a bound on :math:`|b|` and on every intermediate of the MLP over all int64 positions, computed on
        logarithms (the bound itself may exceed float64: weights of 1e308 and 1e308).

        Each hidden unit is at most :math:`\max|W_1|\, x_{\max} + \max|b_1|` (:math:`a + b \le 2\max(a, b)`), the
        bias and every partial sum at most :math:`|b_2| + W \max|W_2|` times that.
        """
        p = self._params

        def lg(v: float) -> float:
            return math.log2(v) if v > 0 else -math.inf

        hidden = 1 + max(lg(host_abs_max(p["w1"])) + lg(self._x_max()), lg(host_abs_max(p["b1"])))
        total = 1 + max(lg(host_abs_max(p["b2"])), lg(self.width) + lg(host_abs_max(p["w2"])) + hidden)
        return max(hidden, total, lg(self._x_max()))

    def _x_max(self) -> float:
        r""":math:`x \le \psi(2^{63}) / (\psi(L) + \varepsilon)` over all int64 positions."""
        p = self._params
        c, L = host_abs_max(p["c"]), host_abs_max(p["L"])  # noqa: N806
        return _x_max(c, L, self._options["eps"])

    def _bias_bound(self) -> float:
        r"""2 to the :meth:`_log2_bound`: a bound on :math:`|b|` and every intermediate (inf beyond float64)."""
        e = self._log2_bound
        return 2.0**e if e < 1024 else math.inf

    def _vjp(self, xp: Any, arrays: dict[str, Any], g: Any, q_pos: Any, k_pos: Any, dtype: Any) -> dict[str, Any]:
        r"""Backward of the MLP and of the interpolant x = N / Den, N = log1p(c |D|), Den = log1p(c max(L, i)) + eps.

        relu'(0) = 0 (as PyTorch and JAX). At a tie L == i, d max(L, i) / dL = 1/2 (as ``torch.maximum``, and the
        average of the one-sided slopes that a central difference measures).
        """
        from ..positions import relative_offsets

        c, L = arrays["c"], arrays["L"]  # noqa: N806
        dist = xp.astype(xp.abs(relative_offsets(q_pos, k_pos, xp=xp)), dtype)
        qf = xp.astype(q_pos, dtype)
        top = xp.maximum(qf, L)
        den = xp.log1p(c * top) + self._options["eps"]
        x = xp.log1p(c * dist) / den[:, None]
        w1, b1, w2 = arrays["w1"][:, 0], arrays["b1"], arrays["w2"]
        g_b2 = xp.sum(g, axis=(1, 2))
        g_w1, g_b1, g_w2 = [], [], []
        g_x = xp.zeros(x.shape, dtype=dtype, device=array_device(x))
        # One hidden unit at a time, as in the forward: memory stays at one (H, Sq, Sk) array.
        for w in range(w1.shape[0]):
            pre = w1[w] * x + b1[w]
            hidden = xp.maximum(pre, 0)
            g_w2.append(xp.sum(g * hidden[None, :, :], axis=(1, 2)))
            g_hidden = xp.sum(g * w2[:, w, None, None], axis=0)
            g_pre = xp.where(pre > 0, g_hidden, xp.zeros_like(g_hidden))
            g_b1.append(xp.sum(g_pre))
            g_w1.append(xp.sum(g_pre * x))
            g_x = g_x + g_pre * w1[w]
        # dx/dc = |D| / ((1 + c|D|) Den) - x max(L, i) / ((1 + c max(L, i)) Den)
        # dx/dL = -x c / ((1 + c max(L, i)) Den) * d max(L, i)/dL
        g_x_x = xp.sum(g_x * x, axis=1)  # per query row
        g_c = xp.sum(xp.sum(g_x * (dist / (1.0 + c * dist)), axis=1) / den) - xp.sum(
            g_x_x * top / ((1.0 + c * top) * den)
        )
        slope = xp.where(qf < L, xp.ones_like(qf), xp.where(qf == L, xp.full_like(qf, 0.5), xp.zeros_like(qf)))
        g_l = -xp.sum(g_x_x * c * slope / ((1.0 + c * top) * den))
        return {
            "w1": xp.stack(g_w1)[:, None],
            "b1": xp.stack(g_b1),
            "w2": xp.stack(g_w2, axis=1),
            "b2": g_b2,
            "c": g_c,
            "L": g_l,
        }


def _x_max(c: float, L: float, eps: float) -> float:  # noqa: N803
    """The largest interpolant over int64 positions, in float64 (inf when beyond it)."""
    den = math.log1p(c * L) + eps  # Python floats: an overflow is inf, not an error
    return math.log1p(c * OFFSET_BOUND) / den if den > 0 else math.inf


def _psi_range(xp: Any, dtype: Any, c: Any, L: Any, eps: float) -> None:  # noqa: N803
    r"""Reject c and L for which :math:`\psi` or x under- or overflows in the compute dtype at some int64 position.

    :math:`c L` below the smallest normal number makes the normaliser :math:`\log(1 + c L)` zero or inexact (NaN at
    query 0 for c = L = 1e-200 in float64, or 1e-23 in float32); :math:`c\,|\Delta|` beyond the largest makes
    :math:`\psi = \infty` and x = inf / inf; a normaliser just above the smallest normal number (c = 1,
    L = 3e-308) makes x itself overflow far from the query (43.7 / 3e-308), so x must stay below a quarter of the
    largest number (the quarter absorbs the difference between this float64 estimate and the compute dtype).
    """
    info = xp.finfo(_checks.compute_dtype(xp, dtype))
    cv, lv = float(c), float(L)
    top = float(info.max) / OFFSET_BOUND
    tiny = float(info.smallest_normal)
    if cv > top:
        msg = f"c: expected a value in (0, {top:.3g}] (c times every int64 offset must be finite), got {cv!r}"
        raise ValueError(msg)
    if cv < tiny or cv * lv < tiny or cv * lv > float(info.max):
        msg = (
            f"c, L: expected c and c * L in [{tiny:.3g}, {float(info.max):.3g}] (normal numbers of the compute dtype, "
            f"so that log1p(c * L) neither underflows nor overflows), got c = {cv!r}, L = {lv!r}, c * L = {cv * lv!r}"
        )
        raise ValueError(msg)
    x_max = _x_max(cv, lv, eps)
    if not x_max <= float(info.max) / 4:
        msg = (
            f"c, L: expected c, L and eps whose largest interpolant psi(2**63) / (psi(L) + eps) is at most "
            f"{float(info.max) / 4:.3g} (a quarter of the compute dtype's largest number), got c = {cv!r}, L = {lv!r}, "
            f"eps = {eps!r}, for which it is {f'{x_max:.4g}' if math.isfinite(x_max) else 'above 1.8e+308'}"
        )
        raise ValueError(msg)
