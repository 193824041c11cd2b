"""An arbitrary, fully materialised bias: the fallback for anything the named families do not cover."""

from __future__ import annotations

from typing import Any

from .. import _checks
from .._checks import array_device
from ..positions import _positions_pair
from .base import BiasFamily, _head_indices

__all__ = ["TensorBias"]


class TensorBias(BiasFamily, name="tensor"):
    r"""A given bias tensor :math:`b_h(i, j)`, indexed by query row and key column.

    Parameters
    ----------
    array : float array of shape (H, Sq, Sk)
        NaN and +inf are rejected; -inf is allowed and acts as a mask (probability exactly 0).
    xp, dtype, device : optional
        Used only when ``array`` is not already an array.

    Notes
    -----
    Unlike the other families this one is not a function of positions: :meth:`bias` only checks that the position
    arrays have lengths Sq and Sk and returns the tensor. Row i belongs to the i-th query whatever the alignment.
    """

    _head_params = ("array",)
    offset_only = False

    def __init__(self, array: Any, *, xp: Any = None, dtype: Any = None, device: Any = None) -> None:
        array = _checks.as_param("array", array, xp, dtype, device)
        ns = _checks.namespace(array, names=("array",))
        _checks.float_array("array", array, ns, ndim=3)
        _checks.nonempty("array", array)
        if not bool(ns.all(~ns.isnan(array) & (array != float("inf")))):
            msg = "array: expected finite values or -inf (a mask), got NaN or +inf"
            raise ValueError(msg)
        self._finish({"array": array}, num_heads=array.shape[0], xp=ns, dtype=array.dtype, device=array_device(array))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, Sq, Sk) of the stored tensor."""
        return tuple(self._params["array"].shape)

    def bias(self, q_pos: Any, k_pos: Any, *, heads: Any = None) -> Any:
        family = self._following(q_pos)
        if family is not self:
            return family.bias(q_pos, k_pos, heads=heads)
        xp = _positions_pair(q_pos, k_pos, self.xp)
        self._check_positions(q_pos, k_pos)
        arr = self._params["array"]
        if heads is None:
            return xp.asarray(arr, copy=True)
        idx = xp.asarray(_head_indices(heads, self.num_heads), dtype=xp.int64, device=self.device)
        return xp.take(arr, idx, axis=0)

    def bias_magnitude(self, q_pos: Any, k_pos: Any, *, heads: Any = None) -> Any:
        family = self._following(q_pos)
        return family.xp.abs(family.bias(q_pos, k_pos, heads=heads))

    def _dense_array(self) -> Any:
        return self._params["array"]

    def _check_positions(self, q_pos: Any, k_pos: Any) -> None:
        _, sq, sk = self.shape
        if (q_pos.shape[0], k_pos.shape[0]) != (sq, sk):
            msg = (
                f"q_pos, k_pos: expected lengths ({sq}, {sk}) matching the tensor's (Sq, Sk), "
                f"got ({q_pos.shape[0]}, {k_pos.shape[0]})"
            )
            raise ValueError(msg)

    def _vjp(self, xp: Any, arrays: dict[str, Any], g: Any, q_pos: Any, k_pos: Any, dtype: Any) -> dict[str, Any]:
        # The bias is the tensor itself: its gradient is the cotangent (entries at -inf included; inside attention
        # they are masked, so their cotangent is 0 there).
        return {"array": xp.asarray(g, copy=True)}
