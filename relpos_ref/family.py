"""The interface every bias family implements.

A family is an immutable object holding its parameters as arrays of one namespace, dtype and device. Its
:meth:`BiasFamily.bias` turns absolute query and key positions into the (H, Sq, Sk) additive bias. Subclasses give
the parameter checks (in ``__init__``) and the arithmetic (``_compute``); this class does the plumbing that must be
identical for all of them: namespace and dtype rules, head selection, the float16 compute policy and conversion.
"""

from __future__ import annotations

from typing import Any, ClassVar

from array_api_compat import device as array_device
from array_api_compat import is_array_api_obj, to_device

from . import _checks
from .positions import _positions_pair, relative_offsets

__all__ = ["BiasFamily"]


class BiasFamily:
    """Base class of the bias families.

    Attributes
    ----------
    num_heads : int
        Number of heads H.
    dtype
        Dtype of the parameters and of the bias.
    xp
        Array namespace of the parameters.

    Notes
    -----
    Subclasses set ``_params`` (public parameter arrays, named as the constructor arguments), ``_head_params`` (the
    subset whose axis 0 is the head axis), may keep derived arrays in ``_derived`` (head axis 0), and implement
    ``_compute(xp, arrays, delta, q_pos, dtype)`` returning (h, Sq, Sk) in ``dtype``.
    """

    _head_params: ClassVar[tuple[str, ...]] = ()
    num_heads: int

    def __init__(self) -> None:  # pragma: no cover - subclasses call _finish instead
        msg = "BiasFamily is abstract; use one of the families (ALiBi, T5Bias, ...)"
        raise TypeError(msg)

    # -- construction helpers used by subclasses -------------------------------------------------------------
    def _finish(
        self,
        params: dict[str, Any],
        *,
        num_heads: int,
        xp: Any,
        dtype: Any,
        device: Any,
        derived: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        # Copies make the object immutable even if the caller later writes into the arrays they passed.
        object.__setattr__(self, "_params", {k: xp.asarray(v, copy=True) for k, v in params.items()})
        object.__setattr__(self, "_derived", dict(derived or {}))
        object.__setattr__(self, "_options", dict(options or {}))
        object.__setattr__(self, "num_heads", int(num_heads))
        object.__setattr__(self, "xp", xp)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "device", device)

    def __setattr__(self, name: str, value: Any) -> None:
        msg = f"{type(self).__name__} is immutable; build a new object instead of setting {name!r}"
        raise AttributeError(msg)

    # -- public interface ----------------------------------------------------------------------------------------
    def parameters(self) -> dict[str, Any]:
        """Copies of the parameter arrays, keyed by the constructor argument names."""
        return {k: self.xp.asarray(v, copy=True) for k, v in self._params.items()}

    def options(self) -> dict[str, Any]:
        """The non-array constructor keyword arguments."""
        return dict(self._options)

    def astype(self, dtype: Any = None, *, xp: Any = None, device: Any = None) -> BiasFamily:
        """The same family with its parameters converted to another dtype, namespace or device.

        Parameters
        ----------
        dtype : optional
            Target dtype (of the target namespace); the current dtype's name by default.
        xp : array namespace, optional
            Target namespace; the current one by default. Parameters travel through host NumPy arrays.
        device : optional
            Target device.
        """
        if dtype is not None:
            target = _checks.namespace_arg(xp) if xp is not None else self.xp
            if not _checks.is_float_dtype(target, dtype):
                msg = f"dtype: expected a real floating-point dtype, got {dtype!r}"
                raise TypeError(msg)
        return type(self)._rebuild(self, dtype=dtype, xp=xp, device=device)

    @classmethod
    def _rebuild(cls, obj: BiasFamily, *, dtype: Any, xp: Any, device: Any) -> BiasFamily:
        xp_to = _checks.namespace_arg(xp) if xp is not None else obj.xp
        if dtype is None:
            dtype = getattr(xp_to, _checks.dtype_name(obj.dtype), None) or obj.dtype
        params = {k: _convert(v, obj.xp, xp_to, dtype, device) for k, v in obj._params.items()}
        return cls(**params, **obj._options)

    def bias(self, q_pos: Any, k_pos: Any, *, heads: Any = None) -> Any:
        r"""Bias :math:`b_h(q_i, k_j)` for absolute positions.

        Parameters
        ----------
        q_pos, k_pos : 1-D integer arrays
            Absolute query and key positions, in the parameters' namespace (see :func:`relpos_ref.positions`).
        heads : int or sequence of int, optional
            Compute only these heads (0-based), in this order. Parameters are sliced before any arithmetic, so one
            head costs one head's work and memory.

        Returns
        -------
        array of shape (h, len(q_pos), len(k_pos))
            In the parameters' dtype; h = H, or the number of selected heads.
        """
        xp = _positions_pair(q_pos, k_pos, self.xp)
        arrays = self._select_heads(heads)
        cdtype = _checks.compute_dtype(xp, self.dtype)
        if cdtype != self.dtype:
            arrays = {k: xp.astype(v, cdtype) for k, v in arrays.items()}
        delta = relative_offsets(q_pos, k_pos, xp=xp)
        out = self._compute(xp, arrays, delta, q_pos, cdtype)
        return out if out.dtype == self.dtype else xp.astype(out, self.dtype)

    # -- internals -----------------------------------------------------------------------------------------------
    def _select_heads(self, heads: Any) -> dict[str, Any]:
        arrays = {**self._params, **self._derived}
        if heads is None:
            return arrays
        idx = _head_indices(heads, self.num_heads)
        sel = self.xp.asarray(idx, dtype=self.xp.int64, device=self.device)
        head_keys = set(self._head_params) | set(self._derived)
        return {k: (self.xp.take(v, sel, axis=0) if k in head_keys else v) for k, v in arrays.items()}

    def _compute(self, xp: Any, arrays: dict[str, Any], delta: Any, q_pos: Any, dtype: Any) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self._options.items())
        return f"{type(self).__name__}(num_heads={self.num_heads}, dtype={self.dtype}{opts})"


def _head_indices(heads: Any, num_heads: int) -> list[int]:
    items = [heads] if not isinstance(heads, list | tuple | range) else list(heads)
    if not items:
        msg = "heads: expected at least one head index, got an empty sequence"
        raise ValueError(msg)
    out = []
    for h in items:
        h = _checks.integer("heads", h)
        if not 0 <= h < num_heads:
            msg = f"heads: expected head indices in [0, {num_heads}), got {h}"
            raise ValueError(msg)
        out.append(h)
    return out


def _convert(value: Any, xp_from: Any, xp_to: Any, dtype: Any, device: Any) -> Any:
    """Move one array across namespaces/devices (through host NumPy when the namespace changes)."""
    if xp_to is xp_from:
        out = value if dtype is None or value.dtype == dtype else xp_to.astype(value, dtype)
        if device is not None and array_device(out) != device:
            out = to_device(out, device)
        return out
    import numpy as np

    host = _checks.host_numpy(value) if is_array_api_obj(value) else np.asarray(value)
    if host.dtype.kind == "V" or host.dtype == np.float16:
        host = host.astype(np.float64) if host.dtype.kind == "V" else host
    return xp_to.asarray(host, dtype=dtype, device=device)
