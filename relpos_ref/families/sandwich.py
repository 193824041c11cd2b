r"""Sandwich: parameter-free bias from the cross term of sinusoidal embeddings (Chi, Fan, Rudnicky, Ramadge,
arXiv 2212.10356).

Formula as implemented in NeMo (``SandwichRelativePositionEmbedding``,
``nemo/collections/nlp/modules/common/megatron/position_embedding/sandwich_relative_position_embedding.py``):

.. math::

    b_h(i, j) = \frac{\sum_{k=1}^{d/2} \cos(|i - j|\,\omega_k) - d/2}{8h/H},
    \qquad \omega_k = 10000^{-2k/d},\; h = 1..H.

The numerator is evaluated as :math:`-2\sum_k \sin^2(|i-j|\,\omega_k/2)`, the same quantity without the cancellation
of :math:`\sum\cos - d/2` near :math:`\Delta = 0`.
"""

from __future__ import annotations

from typing import Any

from .. import _checks
from .._checks import array_device
from .._host import dtype_name
from .base import BiasFamily

__all__ = ["Sandwich"]


class Sandwich(BiasFamily, name="sandwich"):
    r"""Sandwich bias; no learned parameters.

    Parameters
    ----------
    num_heads : int
        1 <= H <= ``MAX_HEADS`` (65536). Head h (1-based) is divided by :math:`8h/H`, so head 1 is the steepest, as
        in ALiBi.
    head_dim : int
        d, even, 2 <= d <= 2 ``MAX_HEADS`` (NeMo's per-head hidden size).
    dtype : optional
        float64 by default.
    xp : array namespace, optional
        NumPy by default.
    device : optional

    Notes
    -----
    Zero at :math:`\Delta = 0`, symmetric, a function of :math:`i - j` only, and not monotone: with d = 128 head 1
    first increases between :math:`|\Delta| = 13` and 14.
    """

    zero_at_zero = True
    learned = False

    def __init__(self, num_heads: int, head_dim: int, *, dtype: Any = None, xp: Any = None, device: Any = None) -> None:
        why = "its constants are built as a Python list"
        num_heads = _checks.integer("num_heads", num_heads, minimum=1, maximum=_checks.MAX_HEADS, why=why)
        head_dim = _checks.integer("head_dim", head_dim, minimum=2, maximum=2 * _checks.MAX_HEADS, why=why)
        if head_dim % 2:
            msg = f"head_dim: expected an even integer (d/2 frequencies), got {head_dim}"
            raise ValueError(msg)
        xp = _checks.namespace_arg(xp)
        dtype = _checks.float_dtype("dtype", dtype, xp) if dtype is not None else xp.float64
        _checks.device_arg(xp, device)
        half = head_dim // 2
        # The frequencies and divisors are derived constants, not parameters: they live in the compute dtype
        # (float32 for float16), so a float16 bias is the float32 computation rounded once.
        cdtype = _checks.compute_dtype(xp, dtype)
        omega = xp.asarray([10000.0 ** (-2.0 * k / head_dim) for k in range(1, half + 1)], dtype=cdtype, device=device)
        divisor = xp.asarray([8.0 * h / num_heads for h in range(1, num_heads + 1)], dtype=cdtype, device=device)
        self._finish(
            {},
            num_heads=num_heads,
            xp=xp,
            dtype=xp.empty((0,), dtype=dtype, device=device).dtype,
            device=device,
            derived={"divisor": divisor},
            options={"num_heads": num_heads, "head_dim": head_dim},
        )
        object.__setattr__(self, "_omega", omega)

    @classmethod
    def _rebuild(cls, obj: BiasFamily, *, dtype: Any, xp: Any, device: Any) -> BiasFamily:
        xp_to = _checks.namespace_arg(xp) if xp is not None else obj.xp
        if dtype is None:
            dtype = getattr(xp_to, dtype_name(obj.dtype))
        return cls(**obj._options, dtype=dtype, xp=xp_to, device=device)

    def _compute(self, xp: Any, arrays: dict[str, Any], delta: Any, q_pos: Any, dtype: Any) -> Any:
        omega = xp.astype(self._omega, dtype)
        half_dist = xp.astype(xp.abs(delta), dtype) * 0.5
        total = xp.zeros(delta.shape, dtype=dtype, device=array_device(delta))
        # One frequency at a time keeps the working memory at one (Sq, Sk) array instead of (d/2, Sq, Sk).
        for k in range(omega.shape[0]):
            s = xp.sin(half_dist * omega[k])
            total = total + s * s
        return (-2.0 * total)[None, :, :] / arrays["divisor"][:, None, None]

    def _bias_bound(self) -> float:
        # |numerator| = 2 sum_k sin^2 <= d, over the smallest divisor 8/H.
        return self._options["head_dim"] * self.num_heads / 8.0

    def _magnitude(self, xp: Any, arrays: dict[str, Any], delta: Any, q_pos: Any, dtype: Any) -> Any:
        r""":math:`(\sum_k (|\cos x_k| + x_k) + d/2) / (8h/H)`, :math:`x_k = |i - j|\,\omega_k`: the terms of NeMo's
        :math:`\sum_k \cos x_k - d/2`, which cancel, and the arguments, whose rounding moves a cosine by
        :math:`x_k u`."""
        omega = xp.astype(self._omega, dtype)
        dist = xp.astype(xp.abs(delta), dtype)
        total = xp.full(delta.shape, omega.shape[0], dtype=dtype, device=array_device(delta))  # d/2
        for k in range(omega.shape[0]):
            total = total + xp.abs(xp.cos(dist * omega[k])) + dist * omega[k]
        return total[None, :, :] / arrays["divisor"][:, None, None]

    def _offset_vjp(
        self, xp: Any, arrays: dict[str, Any], g: Any, deltas: Any, dtype: Any, *, consecutive: bool
    ) -> dict[str, Any]:
        return {}  # no learned parameters

    def _vjp(self, xp: Any, arrays: dict[str, Any], g: Any, q_pos: Any, k_pos: Any, dtype: Any) -> dict[str, Any]:
        return {}
