"""A bias as attention sees it: tiles of a family or of an array, and the vector-Jacobian product of each tile.

The streamed forward, the backward and the fused path ask this adapter for a tile instead of reading a family's
private fields; a :class:`~relpos_ref.TensorBias` is served as the 4-D array it holds.
"""

from __future__ import annotations

from typing import Any

from .base import BiasFamily

__all__ = ["BiasTiles", "tile"]


class BiasTiles:
    """The bias of one attention call over (B, H, Sq, Sk): a family (computed per tile from positions) or an array.

    Attributes
    ----------
    family : BiasFamily or None
        A family other than TensorBias.
    array : array or None
        A 4-D array broadcastable to (B, H, Sq, Sk): the caller's bias array, or a TensorBias's (1, H, Sq, Sk).
    tensor : TensorBias or None
        The TensorBias that ``array`` came from, whose parameter gradient is ``array``'s.
    """

    __slots__ = ("array", "family", "sk", "sq", "tensor")

    def __init__(self, family: Any, array: Any, tensor: Any, sq: int, sk: int) -> None:
        self.family, self.array, self.tensor, self.sq, self.sk = family, array, tensor, sq, sk

    @staticmethod
    def split(bias: Any, like: Any = None) -> tuple[Any, Any, Any]:
        """(family, array, tensor) of an attention ``bias`` argument, unchecked: exactly one is not None (or none).

        ``like``: an input array (q); a family with NumPy parameters is taken in its namespace and device
        (:meth:`BiasFamily._following`).
        """
        if isinstance(bias, BiasFamily):
            if like is not None:
                bias = bias._following(like, "bias")
            dense = bias._dense_array()
            return (None, dense, bias) if dense is not None else (bias, None, None)
        return None, bias, None

    def tile(self, xp: Any, qs: int, qe: int, ks: int, ke: int, q_pos: Any, k_pos: Any) -> Any:
        """Bias of query rows qs:qe and key columns ks:ke; ``q_pos``/``k_pos`` are those rows' and columns'.

        Positions (rows,) and (cols,) give (H, rows, cols) for every batch row; per-row positions (B, rows) and
        (B, cols) give (B, H, rows, cols), the family evaluated at each batch row's own positions.
        """
        if self.family is not None:
            if q_pos.ndim == 2:
                return xp.stack([self._family_bias(q_pos[b, :], k_pos[b, :]) for b in range(q_pos.shape[0])])
            return self._family_bias(q_pos, k_pos)
        return tile(self.array, qs, qe, ks, ke, self.sq, self.sk)

    def _family_bias(self, q_pos: Any, k_pos: Any) -> Any:
        try:
            return self.family.bias(q_pos, k_pos)
        except ValueError as exc:  # attention's positions are valid: the family's arithmetic overflowed at them
            msg = f"bias: expected a family whose bias has a value at this call's positions; {exc}"
            raise ValueError(msg) from None

    def rows(self, qs: int, qe: int) -> Any:
        """Bias argument of the fused kernel for query rows qs:qe: the family itself, or those rows of the array."""
        return self.family if self.family is not None else tile(self.array, qs, qe, 0, self.sk, self.sq, self.sk)

    def family_vjp(self, xp: Any, q_pos: Any, k_pos: Any, d_bias: Any) -> dict[str, Any]:
        """Unchecked parameter gradients of the family for the cotangent (H, rows, cols) of one tile, compute dtype."""
        return self.family._vjp_compute(xp, q_pos, k_pos, d_bias)

    def family_vjp_batch(self, xp: Any, q_pos: Any, k_pos: Any, d_bias: Any) -> dict[str, Any]:
        """:meth:`family_vjp` of a (B, H, rows, cols) cotangent: summed over the batch first for shared positions,
        batch row by batch row for per-row positions (B, rows) and (B, cols)."""
        if q_pos.ndim == 1:
            return self.family_vjp(xp, q_pos, k_pos, xp.sum(d_bias, axis=0))
        total = None
        for b in range(q_pos.shape[0]):
            g = self.family_vjp(xp, q_pos[b, :], k_pos[b, :], d_bias[b, ...])
            total = g if total is None else {n: total[n] + g[n] for n in total}
        return total

    def family_grads(self, xp: Any, grads: dict[str, Any]) -> dict[str, Any]:
        """Accumulated parameter gradients in the family's own dtype and layout."""
        return self.family._grads_out(xp, grads)


def tile(arr: Any, qs: int, qe: int, ks: int, ke: int, sq: int, sk: int) -> Any:
    """Rows qs:qe and columns ks:ke of a (., ., Sq or 1, Sk or 1) array, keeping broadcast axes."""
    if arr.shape[2] == sq:
        arr = arr[:, :, qs:qe, :]
    if arr.shape[3] == sk:
        arr = arr[:, :, :, ks:ke]
    return arr
