r"""A learned scalar per head and clipped offset (the scalar form of Shaw et al., arXiv 1803.02155, section 3).

Shaw et al. learn vectors added to the keys, shared across heads, indexed by ``clip(j - i, k)``; the scalar per head
and offset written :math:`u_{i-j}` in Xiao & Zhu, *Foundations of LLMs* (arXiv 2501.09223, ch. 2) is the form used
here, with the offset sign :math:`\Delta = i - j` of the rest of relpos_ref. A table trained with the ``j - i``
convention is this table reversed along its last axis.
"""

from __future__ import annotations

from typing import Any

from .. import _checks
from .._checks import array_device
from .._host import host_numpy
from .base import BiasFamily, host_abs_max, scatter_columns

__all__ = ["OffsetBias"]


class OffsetBias(BiasFamily, name="offset"):
    r"""Learned bias per clipped offset.

    .. math:: b_h(i, j) = \mathrm{table}[h, \operatorname{clip}(i - j, -K, K) + K]

    Parameters
    ----------
    table : float array of shape (H, 2K + 1)
        Column K holds the bias of :math:`\Delta = 0`, column 0 that of every :math:`\Delta \le -K` (keys K or more
        positions after the query), column 2K that of every :math:`\Delta \ge K`.
    xp, dtype, device : optional
        Used only when ``table`` is not already an array.
    """

    _head_params = ("table",)

    def __init__(self, table: Any, *, xp: Any = None, dtype: Any = None, device: Any = None) -> None:
        table = _checks.as_param("table", table, xp, dtype, device)
        ns = _checks.namespace(table, names=("table",))
        _checks.float_array("table", table, ns, ndim=2)
        _checks.nonempty("table", table)
        if table.shape[1] % 2 != 1:
            msg = f"table: expected shape (H, 2K+1) with an odd number of columns, got shape {tuple(table.shape)}"
            raise ValueError(msg)
        _checks.finite("table", table, ns)
        self._finish({"table": table}, num_heads=table.shape[0], xp=ns, dtype=table.dtype, device=array_device(table))

    @property
    def max_offset(self) -> int:
        """K, the clipping distance."""
        return (int(self._params["table"].shape[1]) - 1) // 2

    def _bias_bound(self) -> float:
        return host_abs_max(self._params["table"])  # the bias is an entry of the (finite) table

    def _compute(self, xp: Any, arrays: dict[str, Any], delta: Any, q_pos: Any, dtype: Any) -> Any:
        table = arrays["table"]
        k = self.max_offset
        idx = xp.clip(delta, min=-k, max=k) + k
        picked = xp.take(table, xp.reshape(idx, (-1,)), axis=1)
        return xp.reshape(picked, (table.shape[0], *delta.shape))

    def _offset_vjp(
        self, xp: Any, arrays: dict[str, Any], g: Any, deltas: Any, dtype: Any, *, consecutive: bool
    ) -> dict[str, Any]:
        k = self.max_offset
        if not consecutive:
            return {"table": scatter_columns(xp, g, xp.clip(deltas, min=-k, max=k) + k, 2 * k + 1)}
        # Ascending consecutive offsets d0..d1: the columns strictly inside (-K, K) take one sum each, the two end
        # columns the sums of every offset clipped onto them; columns of offsets not present are zero.
        h, n = int(g.shape[0]), int(g.shape[1])
        d0 = int(host_numpy(deltas[:1])[0])
        d1 = d0 + n - 1
        dev = array_device(g)

        def zeros(m: int) -> Any:
            return xp.zeros((h, m), dtype=g.dtype, device=dev)

        def total(lo: int, hi: int) -> Any:  # sum of offsets lo..hi present, as an (h, 1) column
            lo, hi = max(lo, d0), min(hi, d1)
            return xp.sum(g[:, lo - d0 : hi - d0 + 1], axis=1, keepdims=True) if lo <= hi else zeros(1)

        if k == 0:
            return {"table": total(d0, d1)}
        lo, hi = max(-k + 1, d0), min(k - 1, d1)
        inner = [zeros(2 * k - 1)]
        if lo <= hi:
            inner = [zeros(lo - (-k + 1)), g[:, lo - d0 : hi - d0 + 1], zeros(k - 1 - hi)]
        return {"table": xp.concat([total(d0, -k), *inner, total(k, d1)], axis=1)}
