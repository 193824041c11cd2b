r"""FIRE: functional interpolation for relative positions (Li et al., arXiv 2310.04418, ICLR 2024).

.. math::

    b_h(i, j) = f_\theta\!\left(\frac{\psi(|i - j|)}{\psi(\max(L, i)) + \varepsilon}\right),
    \qquad \psi(t) = \log(1 + c\,t),

with :math:`f_\theta(x) = W_2\,\mathrm{relu}(W_1 x + b_1) + b_2` a one-hidden-layer MLP. ``i`` is the absolute query
position: under a KV cache or chunked prefill the normaliser uses the true position, not the row index of the slice.
The normaliser makes FIRE the one family here that is not a function of :math:`i - j` alone once :math:`i > L`.
"""

from __future__ import annotations

import math
from typing import Any

from .. import _checks
from .._checks import array_device
from .base import OFFSET_BOUND, BiasFamily, host_abs_max

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

    Notes
    -----
    The normaliser is at least :math:`\log(1 + cL) > 0`, and the constructor requires :math:`c` and :math:`cL` to be
    normal numbers of the compute dtype (float32 for float16) and :math:`c\,2^{63}` finite, so that no
    :math:`\psi` underflows to 0 or overflows, for every int64 position: no division by zero can occur. The
    listing applies ``abs`` to the offset; so does this class: keys after the query get the bias of their mirror
    image and must be removed by a causal mask, as in the paper, which defines FIRE for causal attention.
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
        _psi_range(ns, dtype, c, L)
        eps = _checks.real_scalar("eps", eps, nonnegative=True)
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
        x = self._x(xp, arrays, delta, q_pos, dtype)
        w1, b1, w2 = arrays["w1"][:, 0], arrays["b1"], arrays["w2"]
        out = xp.broadcast_to(arrays["b2"][:, None, None], (w2.shape[0], *x.shape))
        # One hidden unit at a time, in a fixed order: memory stays at one (H, Sq, Sk) array, and each head's sum is
        # the same sequence of roundings whichever heads are selected or however they are permuted (a matrix product
        # would let the BLAS kernel, and so the rounding, depend on the number of heads).
        for w in range(w1.shape[0]):
            hidden = xp.maximum(w1[w] * x + b1[w], 0)
            out = out + w2[:, w, None, None] * hidden[None, :, :]
        return out

    def _bias_bound(self) -> float:
        r""":math:`|b_2| + W \max|W_2| (\max|W_1|\, x_{\max} + \max|b_1|)` with
        :math:`x \le \psi(2^{63}) / (\psi(L) + \varepsilon)`."""
        p = self._params
        c, L = host_abs_max(p["c"]), host_abs_max(p["L"])  # noqa: N806
        x_max = math.log1p(c * OFFSET_BOUND) / (math.log1p(c * L) + self._options["eps"])
        hidden = host_abs_max(p["w1"]) * x_max + host_abs_max(p["b1"])
        return host_abs_max(p["b2"]) + self.width * host_abs_max(p["w2"]) * hidden

    def _magnitude(self, xp: Any, arrays: dict[str, Any], delta: Any, q_pos: Any, dtype: Any) -> Any:
        r""":math:`|b_2| + \sum_w |W_{2,w}|\,(|W_{1,w}\,x| + |b_{1,w}|)`: the MLP's terms, which can cancel."""
        x = self._x(xp, arrays, delta, q_pos, dtype)
        w1, b1, w2 = arrays["w1"][:, 0], arrays["b1"], arrays["w2"]
        out = xp.broadcast_to(xp.abs(arrays["b2"])[:, None, None], (w2.shape[0], *x.shape))
        for w in range(w1.shape[0]):
            out = out + xp.abs(w2[:, w, None, None]) * (xp.abs(w1[w] * x) + xp.abs(b1[w]))[None, :, :]
        return out

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


def _psi_range(xp: Any, dtype: Any, c: Any, L: Any) -> None:  # noqa: N803
    r"""Reject c and L for which :math:`\psi` under- or overflows in the compute dtype at some int64 position.

    :math:`c L` below the smallest normal number makes the normaliser :math:`\log(1 + c L)` zero or inexact (NaN at
    query 0 for c = L = 1e-200 in float64, or 1e-23 in float32); :math:`c\,|\Delta|` beyond the largest makes
    :math:`\psi = \infty` and x = inf / inf.
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
