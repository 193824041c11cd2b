r"""T5 bucketed relative position bias (Raffel et al., arXiv 1910.10683, section 2.1).

The bucket of an offset is the exact-real-arithmetic value of the T5 definition. Implementations evaluate
:math:`\lfloor \ln(n/E)/\ln(D/E)\,(B'-E) \rfloor` in float32 and happen to agree with it for the usual settings, but
with the bidirectional defaults :math:`n = 16, 32, 64` land exactly on a boundary (the quotient is exactly 2, 4, 6),
so a logarithm one ulp low would move them down a bucket. Here the boundaries are integer thresholds computed once
with Python integers, and the bucket of any offset is a count of thresholds: exact for every offset, on every
backend and dtype.
"""

from __future__ import annotations

import decimal
import math
from functools import cache
from typing import Any

from .. import _checks
from .._checks import array_device
from .._host import dtype_name
from ..conventions import LAYOUTS
from ..positions import MAX_OFFSET
from .base import BiasFamily, _convert, host_abs_max, scatter_columns

__all__ = ["T5Bias", "t5_bucket", "t5_bucket_thresholds"]


#: Largest number of buckets (the thresholds are a Python tuple of num_buckets / 2 or num_buckets integers, each
#: found with float arithmetic and, near an integer, big-integer powers of up to num_buckets / 4).
MAX_BUCKETS = 1 << 16


def _config(bidirectional: Any, num_buckets: Any, max_distance: Any) -> tuple[bool, int, int, int, int]:
    bidirectional = _checks.boolean("bidirectional", bidirectional)
    num_buckets = _checks.integer("num_buckets", num_buckets, maximum=MAX_BUCKETS, why="the thresholds are a tuple")
    max_distance = _checks.integer(
        "max_distance", max_distance, maximum=MAX_OFFSET, why="every threshold is then an int64, as every offset is"
    )
    if bidirectional:
        if num_buckets < 4 or num_buckets % 2:
            msg = (
                "num_buckets: expected an even integer >= 4 in bidirectional mode (each direction needs an exact "
                f"and a logarithmic bucket), got {num_buckets}"
            )
            raise ValueError(msg)
        half = num_buckets // 2
    else:
        if num_buckets < 2:
            msg = f"num_buckets: expected an integer >= 2 in causal mode, got {num_buckets}"
            raise ValueError(msg)
        half = num_buckets
    exact = half // 2
    if max_distance <= exact:
        msg = (
            f"max_distance: expected an integer > {exact} (the exact range num_buckets"
            f"{'/2' if bidirectional else ''}//2; ln(max_distance/{exact}) must be > 0), got {max_distance}"
        )
        raise ValueError(msg)
    return bidirectional, num_buckets, max_distance, half, exact


def _iroot_ceil(value: int, k: int) -> int:
    """Smallest integer n >= 0 with n**k >= value, by bisection on Python integers (exact)."""
    lo, hi = 0, 1 << (value.bit_length() // k + 1)
    while lo < hi:
        mid = (lo + hi) // 2
        if mid**k >= value:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _threshold(exact: int, max_distance: int, span: int, k: int) -> int:
    r"""Smallest integer n with n**span >= exact**(span - k) * max_distance**k, exactly.

    The real root :math:`t = e^{((s - k) \ln E + k \ln D) / s}` in float64 has a relative error of a few
    :math:`(1 + \ln D)\,u` (the exponent is a weighted mean of two logarithms, whatever the size s), so when t is
    farther than :math:`10^{-14} (1 + \ln D)\, t` from an integer its ceiling is the answer (for t < 1e10; larger
    roots are computed with 40 decimal digits); only near an integer
    (the exact boundaries n = 16, 32, 64 of the defaults) is the integer comparison made, and a big power is then
    computed at most twice instead of once per bisection step (a 16000-bucket table took minutes).
    """
    log_d = math.log(max_distance)
    log_t = ((span - k) * math.log(exact) + k * log_d) / span
    if log_t < 23.0:  # t < 1e10: float64 resolves it but within ~1e-3 of an integer
        t = math.exp(log_t)
        margin = 1e-14 * (1.0 + log_d) * t
    else:  # up to 2^63 (max_distance is capped there): 40 significant digits
        with decimal.localcontext() as ctx:
            ctx.prec = 40
            dt = ((span - k) * decimal.Decimal(exact).ln() + k * decimal.Decimal(max_distance).ln()) / span
            t_dec = dt.exp()
        t = float(t_dec)
        margin = 1e-30 * t
        n = int(t_dec.to_integral_value(rounding=decimal.ROUND_CEILING))
        if n - t_dec > margin and t_dec - (n - 1) > margin:
            return n
    n = math.ceil(t)
    if log_t < 23.0 and n - t > margin and t - (n - 1) > margin:
        return n
    # Within the error of an integer: decide with integers, starting from the estimate.
    value = exact ** (span - k) * max_distance**k
    near = round(t)
    for cand in (near - 1, near, near + 1):
        if cand >= 0 and cand**span >= value and (cand - 1) ** span < value:
            return cand
    return _iroot_ceil(value, span)


@cache
def _thresholds(bidirectional: bool, num_buckets: int, max_distance: int) -> tuple[int, ...]:
    _, _, max_distance, half, exact = _config(bidirectional, num_buckets, max_distance)
    span = half - exact
    starts = list(range(exact))
    # n is in bucket >= b (b >= exact) iff exact + floor(ln(n/E)/ln(D/E) * span) >= b
    #   iff ln(n/E) * span >= (b - E) * ln(D/E)      (ln(D/E) > 0)
    #   iff n**span >= E**(span - (b - E)) * D**(b - E)   (all integers: exact).
    for b in range(exact, half):
        starts.append(_threshold(exact, max_distance, span, b - exact))
    return tuple(starts)


def t5_bucket_thresholds(*, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128) -> tuple[int, ...]:
    r"""First distance of every bucket in one direction, exactly.

    Parameters
    ----------
    bidirectional : bool
        True for encoder (both directions), False for causal decoder self-attention.
    num_buckets : int
        B, total number of buckets (32 in T5).
    max_distance : int
        D, the distance from which every offset shares the last bucket's value (128 in T5).

    Returns
    -------
    tuple of int, length :math:`B'` (:math:`B' = B/2` bidirectional, :math:`B` causal)
        ``t[b]`` is the smallest distance n in half-bucket b. With :math:`E = \lfloor B'/2 \rfloor`, ``t[b] = b``
        for :math:`b < E` and, for :math:`b \ge E`, the smallest integer n with
        :math:`n^{B'-E} \ge E^{B'-b} D^{b-E}`. Equal consecutive entries mean an empty bucket (the formula skips it).

    Examples
    --------
    >>> import relpos_ref as rp
    >>> rp.t5_bucket_thresholds(bidirectional=True)
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 23, 32, 46, 64, 91)
    """
    return _thresholds(*_config(bidirectional, num_buckets, max_distance)[:3])


def t5_bucket(
    delta: Any,
    *,
    bidirectional: bool,
    num_buckets: int = 32,
    max_distance: int = 128,
    xp: Any = None,
) -> Any:
    r"""T5 bucket of each offset :math:`\Delta = i - j` (query minus key position).

    With :math:`n = |\Delta|` (bidirectional) or :math:`n = \max(\Delta, 0)` (causal), :math:`B'` and :math:`E` as
    in :func:`t5_bucket_thresholds`:

    .. math::

        \mathrm{bucket} = o + \begin{cases} n & n < E \\
        \min\!\left(B'-1,\; E + \left\lfloor \frac{\ln(n/E)}{\ln(D/E)} (B'-E) \right\rfloor\right) & n \ge E
        \end{cases}

    in exact real arithmetic, where :math:`o = B'` for keys after the query (:math:`\Delta < 0`) in bidirectional
    mode and 0 otherwise. This equals HF transformers' ``T5Attention._relative_position_bucket(-delta, ...)`` (T5
    code takes ``memory_position - query_position``, the opposite sign). In causal mode every future key
    (:math:`\Delta < 0`) gets bucket 0, like :math:`\Delta = 0`; a causal mask must remove them.

    Parameters
    ----------
    delta : integer array
        Offsets, any shape.
    bidirectional : bool
    num_buckets : int, default 32
    max_distance : int, default 128
    xp : array namespace, optional

    Returns
    -------
    int64 array of the shape of ``delta``, values in [0, num_buckets).

    Raises
    ------
    ValueError
        Odd or fewer than 4 buckets in bidirectional mode, fewer than 2 in causal mode, ``max_distance`` not above
        the exact range.

    Examples
    --------
    >>> import numpy as np, relpos_ref as rp
    >>> rp.t5_bucket(np.array([0, 1, 16, -1, -16]), bidirectional=True)
    array([ 0,  1, 10, 17, 26])
    """
    bidirectional, num_buckets, max_distance, half, _ = _config(bidirectional, num_buckets, max_distance)
    xp = _checks.namespace(delta, xp=xp, names=("delta",))
    _checks.integer_array("delta", delta, xp)
    if all(int(n) for n in delta.shape):  # non-empty (0-d included)
        lo, hi = int(xp.min(delta)), int(xp.max(delta))
        if lo < -MAX_OFFSET or hi > MAX_OFFSET:  # |delta| and the int64 cast below would wrap
            msg = f"delta: expected offsets in [-(2**63 - 1), 2**63 - 1] (int64), got values from {lo} to {hi}"
            raise ValueError(msg)
    return _bucket(xp, delta, bidirectional, num_buckets, max_distance, half)


def _bucket(xp: Any, delta: Any, bidirectional: bool, num_buckets: int, max_distance: int, half: int) -> Any:
    # Thresholds beyond int64 are never reached by an offset (|delta| < 2**63) and would not fit the int64 array.
    starts = [t for t in _thresholds(bidirectional, num_buckets, max_distance) if t <= MAX_OFFSET]
    thr = xp.asarray(starts, dtype=xp.int64, device=array_device(delta))
    delta = xp.astype(delta, xp.int64)
    if bidirectional:
        n = xp.abs(delta)
        offset = xp.astype(delta < 0, xp.int64) * half
    else:
        n = xp.clip(delta, min=0)
        offset = 0
    flat = xp.reshape(n, (-1,))
    b = xp.searchsorted(thr, flat, side="right") - 1
    b = xp.reshape(xp.astype(b, xp.int64), n.shape)
    return b + offset


class T5Bias(BiasFamily, name="t5"):
    r"""T5 relative position bias: a learned scalar per (head, bucket).

    .. math:: b_h(i, j) = \mathrm{table}[h, \mathrm{bucket}(i - j)]

    with the bucket of :func:`t5_bucket`. T5 adds it to unscaled logits (no :math:`1/\sqrt{d}` at all); use
    ``scale=1.0`` in :func:`relpos_ref.attention` to reproduce T5.

    Parameters
    ----------
    table : float array
        Shape (H, B) with ``layout="heads_buckets"`` (t5x, Mesh TensorFlow) or (B, H) with
        ``layout="buckets_heads"`` (HF transformers' ``nn.Embedding(num_buckets, n_heads)`` weight). Stored as
        (H, B); :meth:`parameters` returns that.
    bidirectional : bool
        Encoder (True) or causal decoder self-attention (False).
    max_distance : int, default 128
    layout : {"heads_buckets", "buckets_heads"}
        Layout of ``table`` as given; required, with no default: a (32, 8) table is valid read either way (HF's 32
        buckets of 8 heads, or 32 heads of 8 buckets), so the shape cannot decide and a default would silently
        misread one of them. :meth:`options` reports ``layout="heads_buckets"``, the layout of
        :meth:`parameters`; the layout given is the :attr:`layout` property.
    xp, dtype, device : optional
        Used only when ``table`` is not already an array.
    """

    _head_params = ("table",)

    def __init__(
        self,
        table: Any,
        *,
        bidirectional: bool,
        max_distance: int = 128,
        layout: str,
        xp: Any = None,
        dtype: Any = None,
        device: Any = None,
    ) -> None:
        _checks.option("layout", layout, LAYOUTS)
        table = _checks.as_param("table", table, xp, dtype, device)
        ns = _checks.namespace(table, names=("table",))
        _checks.float_array("table", table, ns, ndim=2)
        _checks.nonempty("table", table)
        given_shape = tuple(table.shape)
        if layout == "buckets_heads":
            table = ns.permute_dims(table, (1, 0))
        _checks.finite("table", table, ns)
        try:
            bidirectional, _, max_distance, _, _ = _config(bidirectional, table.shape[1], max_distance)
        except ValueError as exc:
            # The bucket count is not an argument here but an axis of the table: say so.
            if not str(exc).startswith("num_buckets:"):
                raise
            msg = (
                f"table: expected a number of buckets B (axis {0 if layout == 'buckets_heads' else 1} of the table) "
                f"that is{str(exc).removeprefix('num_buckets: expected')}; table shape {given_shape}, layout {layout!r}"
            )
            raise ValueError(msg) from None
        self._finish(
            {"table": table},
            num_heads=table.shape[0],
            xp=ns,
            dtype=table.dtype,
            device=array_device(table),
            # The layout of parameters()["table"], so that cls(**parameters(), **options()) rebuilds this family.
            options={"bidirectional": bidirectional, "max_distance": max_distance, "layout": "heads_buckets"},
        )
        # The table is stored (H, B); the layout it was given in is kept only to return gradients in that layout.
        object.__setattr__(self, "_layout", layout)

    @property
    def num_buckets(self) -> int:
        """B, the number of buckets (columns of the stored (H, B) table)."""
        return int(self._params["table"].shape[1])

    @property
    def layout(self) -> str:
        """The table layout given to the constructor (gradients are returned in it); the table is stored (H, B)."""
        return self._layout

    def _compute(self, xp: Any, arrays: dict[str, Any], delta: Any, q_pos: Any, dtype: Any) -> Any:
        opts = self._options
        table = arrays["table"]
        half = self.num_buckets // 2 if opts["bidirectional"] else self.num_buckets
        b = _bucket(xp, delta, opts["bidirectional"], self.num_buckets, opts["max_distance"], half)
        picked = xp.take(table, xp.reshape(b, (-1,)), axis=1)
        return xp.reshape(picked, (table.shape[0], *delta.shape))

    def _offset_vjp(
        self, xp: Any, arrays: dict[str, Any], g: Any, deltas: Any, dtype: Any, *, consecutive: bool
    ) -> dict[str, Any]:
        opts = self._options
        half = self.num_buckets // 2 if opts["bidirectional"] else self.num_buckets
        b = _bucket(xp, deltas, opts["bidirectional"], self.num_buckets, opts["max_distance"], half)
        return {"table": scatter_columns(xp, g, b, self.num_buckets)}

    def _grads_out(self, xp: Any, grads: dict[str, Any]) -> dict[str, Any]:
        grads = super()._grads_out(xp, grads)
        if self._layout == "buckets_heads":
            grads["table"] = xp.permute_dims(grads["table"], (1, 0))
        return grads

    def _bias_bound(self) -> float:
        return host_abs_max(self._params["table"])  # the bias is an entry of the (finite) table

    @classmethod
    def _rebuild(cls, obj: BiasFamily, *, dtype: Any, xp: Any, device: Any) -> BiasFamily:

        xp_to = _checks.namespace_arg(xp) if xp is not None else obj.xp
        if dtype is None:
            dtype = getattr(xp_to, dtype_name(obj.dtype), None) or obj.dtype
        table = _convert(obj._params["table"], obj.xp, xp_to, dtype, device)
        new = cls(table, **obj._options)  # the stored (H, B) table; the layout given is kept for the gradients
        object.__setattr__(new, "_layout", obj._layout)
        return new
