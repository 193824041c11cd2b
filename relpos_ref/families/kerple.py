r"""KERPLE: kernelized relative positional embeddings (Chi, Fan, Ramadge, Rudnicky, arXiv 2205.09921).

Both kernels are conditionally positive definite; the bias is the negated kernel, a distance penalty that is zero at
:math:`\Delta = 0` and non-increasing in :math:`|\Delta|` under the constraints enforced here. The official code
(``chijames/KERPLE``, ``megatron/mpu/layers.py``: ``ParallelKerplePower`` and ``ParallelKerpleLog``) names the
parameters ``bias_a``/``bias_p`` with the roles swapped between the two classes; here ``r1`` is always the outer
multiplier and ``r2`` the inner exponent or rate, as in the paper.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from .. import _checks
from .._checks import array_device, quiet_overflow
from .base import OFFSET_BOUND, BiasFamily, host_abs_max

__all__ = ["KerpleLog", "KerplePower"]


class _Kerple(BiasFamily):
    _head_params = ("r1", "r2")
    monotone = True
    zero_at_zero = True
    _r2_upper: float | None = None

    def __init__(self, r1: Any, r2: Any, *, xp: Any = None, dtype: Any = None, device: Any = None) -> None:
        r1 = _checks.as_param("r1", r1, xp, dtype, device)
        r2 = _checks.as_param("r2", r2, xp, dtype, device)
        ns = _checks.namespace(r1, r2, names=("r1", "r2"))
        _checks.float_array("r1", r1, ns, ndim=1)
        _checks.float_array("r2", r2, ns, ndim=1)
        _checks.nonempty("r1", r1)
        if r2.shape != r1.shape:
            msg = f"r2: expected the shape of r1 {tuple(r1.shape)} (one value per head), got {tuple(r2.shape)}"
            raise ValueError(msg)
        if r2.dtype != r1.dtype:
            msg = f"r2: expected the dtype of r1 ({r1.dtype}), got {r2.dtype}"
            raise TypeError(msg)
        _checks.finite("r1", r1, ns)
        _checks.finite("r2", r2, ns)
        _checks.positive("r1", r1, ns)
        _checks.positive("r2", r2, ns, upper=self._r2_upper)
        self._finish({"r1": r1, "r2": r2}, num_heads=r1.shape[0], xp=ns, dtype=r1.dtype, device=array_device(r1))


class KerplePower(_Kerple, name="kerple_power"):
    r"""KERPLE power kernel.

    .. math:: b_h(i, j) = -r_{1,h}\,|i - j|^{r_{2,h}}, \qquad r_1 > 0,\; 0 < r_2 \le 2

    Parameters
    ----------
    r1, r2 : float arrays of shape (H,)
        Official code: ``r1 = bias_a``, ``r2 = bias_p`` of ``ParallelKerplePower`` (clamped there to >= 0.01 and
        r2 <= 2 on every forward; here out-of-range values are rejected instead).
    xp, dtype, device : optional
        Used only for arguments that are not already arrays.
    """

    _r2_upper = 2.0

    def _compute(self, xp: Any, arrays: dict[str, Any], delta: Any, q_pos: Any, dtype: Any) -> Any:
        dist = xp.astype(xp.abs(delta), dtype)
        return -(arrays["r1"][:, None, None] * xp.pow(dist[None, :, :], arrays["r2"][:, None, None]))

    def _bias_bound(self) -> float:
        return host_abs_max(self._params["r1"]) * OFFSET_BOUND ** host_abs_max(self._params["r2"])

    def _offset_vjp(
        self, xp: Any, arrays: dict[str, Any], g: Any, deltas: Any, dtype: Any, *, consecutive: bool
    ) -> dict[str, Any]:
        # d/dr1 = -|D|^r2, d/dr2 = -r1 |D|^r2 log|D|; at D = 0 both vanish (0^r2 = 0 for r2 > 0, and
        # |D|^r2 log|D| -> 0), which the log of 1 substituted there gives without 0 * -inf.
        dist = xp.astype(xp.abs(deltas), dtype)[None, :]
        r1, r2 = arrays["r1"][:, None], arrays["r2"][:, None]
        power = xp.pow(dist, r2)
        log_dist = xp.log(xp.where(dist == 0, xp.ones_like(dist), dist))
        return {"r1": -xp.sum(g * power, axis=1), "r2": -xp.sum(g * (r1 * power * log_dist), axis=1)}


class KerpleLog(_Kerple, name="kerple_log"):
    r"""KERPLE logarithmic kernel.

    .. math:: b_h(i, j) = -r_{1,h}\,\log(1 + r_{2,h}\,|i - j|), \qquad r_1, r_2 > 0

    evaluated with ``log1p``.

    Parameters
    ----------
    r1, r2 : float arrays of shape (H,)
        Official code: ``r1 = bias_p``, ``r2 = bias_a`` of ``ParallelKerpleLog``. Any finite ``r2 > 0``: where
        :math:`r_2 |\Delta|` overflows, :math:`\log(1 + r_2|\Delta|)` is evaluated as
        :math:`\log r_2 + \log|\Delta|` (exact to rounding there, since :math:`1/(r_2|\Delta|)` is below the
        smallest normal number), so ``r2 = 1e308`` gives -709.89 at :math:`|\Delta| = 2`, not -inf.
    xp, dtype, device : optional
        Used only for arguments that are not already arrays.
    """

    def _compute(self, xp: Any, arrays: dict[str, Any], delta: Any, q_pos: Any, dtype: Any) -> Any:
        dist = xp.astype(xp.abs(delta), dtype)
        return -(arrays["r1"][:, None, None] * self._log_term(xp, arrays["r2"][:, None, None], dist[None, :, :]))

    @functools.cached_property
    def _big_rate(self) -> bool:
        """Whether r2 |Delta| can overflow the compute dtype at some int64 offset (decided once, on the host)."""
        cdtype = _checks.compute_dtype(self.xp, self.dtype)
        return host_abs_max(self._params["r2"]) * OFFSET_BOUND > float(self.xp.finfo(cdtype).max) / 2

    def _log_term(self, xp: Any, r2: Any, dist: Any) -> Any:
        """log(1 + r2 |Delta|), with log r2 + log |Delta| where the product overflows (only for such rates)."""
        if not self._big_rate:
            return xp.log1p(r2 * dist)
        with quiet_overflow():
            t = r2 * dist
        safe = xp.where(dist == 0, xp.ones_like(dist), dist)
        return xp.where(xp.isinf(t), xp.log(r2) + xp.log(safe), xp.log1p(xp.where(xp.isinf(t), 0.0, t)))

    def _bias_bound(self) -> float:
        r2 = host_abs_max(self._params["r2"])
        big = r2 * OFFSET_BOUND > 1e300  # log1p(r2 2^63) as log r2 + log 2^63 (plus 1, an upper bound)
        log_term = math.log(r2) + math.log(OFFSET_BOUND) + 1.0 if big else math.log1p(r2 * OFFSET_BOUND)
        return host_abs_max(self._params["r1"]) * log_term

    def _offset_vjp(
        self, xp: Any, arrays: dict[str, Any], g: Any, deltas: Any, dtype: Any, *, consecutive: bool
    ) -> dict[str, Any]:
        # d/dr1 = -log(1 + r2 |D|), d/dr2 = -r1 |D| / (1 + r2 |D|) = -r1 / (r2 + 1/|D|) (0 at D = 0), the second
        # form for rates whose product with |D| can overflow.
        dist = xp.astype(xp.abs(deltas), dtype)[None, :]
        r1, r2 = arrays["r1"][:, None], arrays["r2"][:, None]
        if self._big_rate:
            safe = xp.where(dist == 0, xp.ones_like(dist), dist)
            ratio = xp.where(dist == 0, xp.zeros_like(dist), 1.0 / (r2 + 1.0 / safe))
        else:
            ratio = dist / (1.0 + r2 * dist)
        return {
            "r1": -xp.sum(g * self._log_term(xp, r2, dist), axis=1),
            "r2": -xp.sum(g * (r1 * ratio), axis=1),
        }
