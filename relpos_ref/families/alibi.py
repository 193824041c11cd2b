r"""ALiBi: attention with linear biases (Press, Smith, Lewis, arXiv 2108.12409).

The slopes follow the official rule of ``ofirpress/attention_with_linear_biases`` (``get_slopes`` in
``fairseq/models/transformer.py``), which BLOOM, MPT, FlashAttention's helpers and llama.cpp share: for H a power of
two :math:`m_h = 2^{-8h/H}`, h = 1..H; otherwise the :math:`c = 2^{\lfloor \log_2 H \rfloor}` slopes of c heads
followed by the odd-indexed slopes of 2c heads, :math:`2^{-4(2k-1)/c}`, k = 1..H-c, appended in that order (not
sorted).

The official code builds the key-only form :math:`+m\,j`, which differs from :math:`-m|i-j|` by the per-row constant
:math:`m\,i` under a causal mask (so probabilities agree and the log-sum-exp does not) and is wrong without one. This
module computes the relative form :math:`-m|i-j|`, valid in both settings.
"""

from __future__ import annotations

from typing import Any

from .. import _checks
from .._checks import array_device
from .base import OFFSET_BOUND, BiasFamily, host_abs_max

__all__ = ["ALiBi", "alibi_slopes"]


def _slope_exponents(num_heads: int) -> list[float]:
    """Base-2 exponents of the official slopes (exact dyadic rationals, so the float values are exact)."""
    c = 1 << (num_heads.bit_length() - 1)
    exps = [-8.0 * h / c for h in range(1, c + 1)]
    exps += [-4.0 * (2 * k - 1) / c for k in range(1, num_heads - c + 1)]
    return exps


def alibi_slopes(num_heads: int, *, dtype: Any = None, xp: Any = None, device: Any = None) -> Any:
    r"""The official ALiBi slopes for ``num_heads`` heads.

    Parameters
    ----------
    num_heads : int
        1 <= H <= ``MAX_HEADS`` (65536; the slopes are built as a Python list).
    dtype : optional
        float64 by default.
    xp : array namespace, optional
        NumPy by default.
    device : optional

    Returns
    -------
    array of shape (H,)
        :math:`m_h = 2^{e_h}` with exact exponents, rounded once to ``dtype``. The official code computes
        ``start * ratio**i`` in float64, which raises the rounding error of ``start`` to the power i: its slopes
        differ from these by up to (i + 3) * 2**-53 relative, measured up to 90 ulp at H = 256.

    Examples
    --------
    >>> import numpy as np, relpos_ref as rp
    >>> np.log2(rp.alibi_slopes(6)).tolist()
    [-2.0, -4.0, -6.0, -8.0, -1.0, -3.0]
    """
    num_heads = _checks.integer(
        "num_heads", num_heads, minimum=1, maximum=_checks.MAX_HEADS, why="the slopes are built as a Python list"
    )
    xp = _checks.namespace_arg(xp)
    dtype = _checks.float_dtype("dtype", dtype, xp) if dtype is not None else xp.float64
    _checks.device_arg(xp, device)
    return xp.asarray([2.0**e for e in _slope_exponents(num_heads)], dtype=dtype, device=device)


class ALiBi(BiasFamily, name="alibi"):
    r"""ALiBi bias, relative (symmetric) form.

    .. math:: b_h(i, j) = -m_h\,|i - j|

    added after the :math:`1/\sqrt{d}` scale in the official code (``placement="post_scale"``).

    Parameters
    ----------
    slopes : float array of shape (H,)
        Finite and >= 0. See :func:`alibi_slopes` and :meth:`from_num_heads`. A slope of 0 is a head without bias
        (NeMo's ``num_attention_heads_alibi``, x-transformers' ``alibi_num_heads``: the heads past the ALiBi ones).
        Where :math:`m_h |i - j|` is beyond the dtype's range the bias is -inf, its rounding (float16 slope 0.5 from
        :math:`|i - j| = 131040`).
    allow_any_sign : bool, default False
        Accept any finite slope, negative included (kernel tests that draw random slopes, as vLLM's do with
        ``torch.randn``). A negative slope rewards distance: its bias :math:`+|m_h|\,|i - j|` grows with the
        offset, up to +inf beyond the dtype's range.
    xp, dtype, device : optional
        Used only when ``slopes`` is not already an array.

    Notes
    -----
    The penalty :math:`-b_h = m_h |i - j|` is non-decreasing in :math:`|i - j|` exactly when :math:`m_h \ge 0`: the
    class trait ``monotone`` is that of the default parameter set (slopes >= 0), and an object built with a negative
    slope has ``monotone = False``, so :func:`relpos_ref.verify` and the conformance harness do not check it there.
    """

    _head_params = ("slopes",)
    monotone = True
    zero_at_zero = True

    def __init__(
        self, slopes: Any, *, allow_any_sign: bool = False, xp: Any = None, dtype: Any = None, device: Any = None
    ) -> None:
        slopes = _checks.as_param("slopes", slopes, xp, dtype, device)
        ns = _checks.namespace(slopes, names=("slopes",))
        _checks.float_array("slopes", slopes, ns, ndim=1)
        _checks.nonempty("slopes", slopes)
        _checks.finite("slopes", slopes, ns)
        allow_any_sign = _checks.boolean("allow_any_sign", allow_any_sign)
        nonnegative = slopes >= 0
        if not allow_any_sign and not bool(ns.all(nonnegative)):
            msg = (
                "slopes: expected values >= 0 (or allow_any_sign=True for any finite slope), "
                f"got {_checks._preview(slopes, ~nonnegative)}"
            )
            raise ValueError(msg)
        self._finish(
            {"slopes": slopes},
            num_heads=slopes.shape[0],
            xp=ns,
            dtype=slopes.dtype,
            device=array_device(slopes),
            options={"allow_any_sign": True} if allow_any_sign else None,
        )
        # The monotone penalty is a fact of these slopes, not of every ALiBi: readers of the trait see this one.
        object.__setattr__(self, "monotone", bool(ns.all(nonnegative)))

    @classmethod
    def from_num_heads(cls, num_heads: int, *, dtype: Any = None, xp: Any = None, device: Any = None) -> ALiBi:
        """ALiBi with the official slopes for ``num_heads`` heads."""
        return cls(alibi_slopes(num_heads, dtype=dtype, xp=xp, device=device))

    def _compute(self, xp: Any, arrays: dict[str, Any], delta: Any, q_pos: Any, dtype: Any) -> Any:
        dist = xp.astype(xp.abs(delta), dtype)
        return -(arrays["slopes"][:, None, None] * dist[None, :, :])

    def _bias_bound(self) -> float:
        return host_abs_max(self._params["slopes"]) * OFFSET_BOUND

    def _offset_vjp(
        self, xp: Any, arrays: dict[str, Any], g: Any, deltas: Any, dtype: Any, *, consecutive: bool
    ) -> dict[str, Any]:
        # d b / d m_h = -|Delta|
        dist = xp.astype(xp.abs(deltas), dtype)
        return {"slopes": -xp.sum(g * dist[None, :], axis=1)}
