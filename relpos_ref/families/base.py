"""The interface every bias family implements, and the registry of families by name.

A family is an immutable object holding its parameters as arrays of one namespace, dtype and device. Its
:meth:`BiasFamily.bias` turns absolute query and key positions into the (H, Sq, Sk) additive bias. Subclasses give
the parameter checks (in ``__init__``) and the arithmetic (``_compute``); this class does the plumbing that must be
identical for all of them: namespace and dtype rules, head selection, the float16 compute policy and conversion.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

from .. import _checks
from .._checks import array_device, is_array_api_obj, to_device
from .._host import dtype_name, host_numpy
from ..positions import _offsets, _positions_pair

__all__ = ["FAMILIES", "BiasFamily", "family_class"]

#: Every concrete family by its registry name (``BiasFamily.name``), in definition order; filled by
#: ``BiasFamily.__init_subclass__``, so a family is known everywhere once its class exists.
FAMILIES: dict[str, type[BiasFamily]] = {}


class BiasFamily:
    r"""Base class of the bias families.

    Attributes
    ----------
    num_heads : int
        Number of heads H.
    dtype
        Dtype of the parameters and of the bias.
    xp
        Array namespace of the parameters.

    Class traits (one place for each family fact; the registry, verify, the harness, the CUDA path and the tests
    read them):

    ``name``
        Registry key (``"alibi"``, ``"t5"``, ...); a subclass passes ``name=`` in its class statement to register.
    ``offset_only``
        :math:`b_h(i, j)` depends on :math:`\Delta = i - j` alone (FIRE only while every query position is <= L).
    ``monotone``
        The penalty :math:`-b_h` is non-decreasing in :math:`|\Delta|` for every valid parameter set.
    ``zero_at_zero``
        :math:`b_h(i, i) = 0` for every valid parameter set.
    ``learned``
        Has trainable parameters (``bias_vjp`` returns gradients).

    Notes
    -----
    Subclasses set ``_params`` (public parameter arrays, named as the constructor arguments), ``_head_params`` (the
    subset whose axis 0 is the head axis), may keep derived arrays in ``_derived`` (head axis 0), and implement
    ``_compute(xp, arrays, delta, q_pos, dtype)`` returning (h, Sq, Sk) in ``dtype``.
    """

    name: ClassVar[str] = ""
    offset_only: ClassVar[bool] = True
    monotone: ClassVar[bool] = False
    zero_at_zero: ClassVar[bool] = False
    learned: ClassVar[bool] = True
    _head_params: ClassVar[tuple[str, ...]] = ()
    num_heads: int

    def __init_subclass__(cls, *, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            if name in FAMILIES:
                msg = f"name: expected a new family name, got {name!r} (already {FAMILIES[name].__name__})"
                raise ValueError(msg)
            cls.name = name
            FAMILIES[name] = cls

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
        target = _checks.namespace_arg(xp) if xp is not None else self.xp
        if dtype is not None:
            _checks.float_dtype("dtype", dtype, target)
        elif not _checks.same_namespace(target, self.xp) and getattr(target, dtype_name(self.dtype), None) is None:
            # The current dtype has no twin in the target library (float16 in array_api_strict): say so.
            msg = (
                f"dtype: expected a dtype of {getattr(target, '__name__', target)} when it has no "
                f"{dtype_name(self.dtype)} (the family's dtype), got None"
            )
            raise TypeError(msg)
        _checks.device_arg(target, device)
        return type(self)._rebuild(self, dtype=dtype, xp=xp, device=device)

    @classmethod
    def _rebuild(cls, obj: BiasFamily, *, dtype: Any, xp: Any, device: Any) -> BiasFamily:
        xp_to = _checks.namespace_arg(xp) if xp is not None else obj.xp
        if dtype is None:
            dtype = getattr(xp_to, dtype_name(obj.dtype), None) or obj.dtype
        params = {k: _convert(v, obj.xp, xp_to, dtype, device) for k, v in obj._params.items()}
        return cls(**params, **obj._options)

    def bias(self, q_pos: Any, k_pos: Any, *, heads: Any = None) -> Any:
        r"""Bias :math:`b_h(q_i, k_j)` for absolute positions.

        Parameters
        ----------
        q_pos, k_pos : 1-D integer arrays
            Absolute query and key positions (see :func:`relpos_ref.positions`): in the parameters' namespace, or in
            any namespace and device for a family with NumPy parameters (see :meth:`_following`).
        heads : int or sequence of int, optional
            Compute only these heads (0-based), in this order. Parameters are sliced before any arithmetic, so one
            head costs one head's work and memory.

        Returns
        -------
        array of shape (h, len(q_pos), len(k_pos))
            In the parameters' dtype; h = H, or the number of selected heads. Entries whose exact value lies beyond
            the dtype's range are :math:`\pm\infty`, its correct rounding (ALiBi with slope 0.5 in float16 from
            :math:`|\Delta| = 131040`); :func:`relpos_ref.attention` reports a row that such entries leave without a
            representable softmax.

        Raises
        ------
        ValueError
            Where an overflow inside the arithmetic leaves no value at all (NaN), naming the positions; a family
            whose parameters bound it inside the range (:meth:`_bias_bound`) pays no check, and FIRE recomputes such
            entries on a power-of-two scale instead. Also when the (h, Sq, Sk) result (or the (Sq, Sk) int64
            offsets) would exceed ``MAX_ARRAY_BYTES`` (8 GiB), checked before allocating.
        """
        family = self._following(q_pos)
        if family is not self:
            return family.bias(q_pos, k_pos, heads=heads)
        if not self._bias_may_overflow:
            return self._evaluate(self._compute, q_pos, k_pos, heads)
        with _checks.quiet_overflow():  # infinities are the rounded exact values; a NaN is reported below
            out = self._evaluate(self._compute, q_pos, k_pos, heads)
        _no_nan_bias(self, out, q_pos, k_pos)
        return out

    @functools.cached_property
    def _bias_may_overflow(self) -> bool:
        """Whether the bound on |b| over every int64 offset reaches the dtype's largest number (computed once)."""
        return not self._bias_bound() < _largest(self.xp, self.dtype)

    def _bias_bound(self) -> float:
        """An upper bound on :math:`|b_h(i, j)|`, and on every intermediate of its arithmetic, over all offsets and
        positions with :math:`|i|, |i - j| < 2^{63}`, from the parameters (a Python float; inf when a family cannot
        bound it, which makes :meth:`bias` check for NaN)."""
        return math.inf

    def bias_magnitude(self, q_pos: Any, k_pos: Any, *, heads: Any = None) -> Any:
        r"""The magnitude :math:`m_h(i, j)` of each entry as an implementation computes it: the scale its rounding
        error is relative to. The conformance harness accepts a bias entry within :math:`t\,\max(1, m)`.

        :math:`|b|` for a family evaluated in a few roundings (the default). A family whose value is a sum with
        cancellation overrides it with the sum of the absolute values of the terms, and of the arguments of the
        functions whose rounding moves the result by :math:`|x|\,u` (FIRE's MLP, Sandwich's cosines).
        Same arguments, shape and dtype as :meth:`bias`; infinite where the bias is.
        """
        family = self._following(q_pos)
        if family is not self:
            return family.bias_magnitude(q_pos, k_pos, heads=heads)
        return self._evaluate(self._magnitude, q_pos, k_pos, heads)

    # -- internals -----------------------------------------------------------------------------------------------
    def _following(self, array: Any, name: str = "q_pos") -> BiasFamily:
        """The family to use with ``array``'s namespace and device: itself, or a cached copy there.

        A family with NumPy parameters (every constructor's default) is a description of a few numbers, so it goes
        wherever its inputs are: ``ALiBi.from_num_heads(8)`` used with torch tensors is converted once per (namespace,
        device, dtype) and cached on the object. A family whose parameters were put in another library on purpose
        keeps them there, and mixing it with a third library stays an error (raised by the caller's namespace check).
        """
        if not is_array_api_obj(array) or not _checks.same_namespace(self.xp, _checks.default_namespace()):
            return self
        try:
            xp = _checks.array_namespace(array)
            device = array_device(array)
        except (TypeError, ValueError):  # not an array after all (a class such as numpy.float64): the checks name it
            return self
        if _checks.same_namespace(xp, self.xp):
            return self
        dtype = getattr(xp, dtype_name(self.dtype), None)
        if dtype is None:
            msg = (
                f"{name}: expected arrays of a library with the family's dtype {dtype_name(self.dtype)} (its NumPy "
                f"parameters follow the inputs' library), got arrays of {_checks._ns_name(xp)}; convert the family "
                "with .astype(dtype, xp=...) first"
            )
            raise TypeError(msg)
        key = (_checks._ns_name(xp), str(device), dtype_name(self.dtype))
        # The cache lives in the instance dict (the class forbids attribute assignment, not dict items): one dict
        # assignment per key is atomic under the GIL, and two threads racing on a first call both build equal copies.
        cache = self.__dict__.setdefault("_followers", {})
        family = cache.get(key)
        if family is None:
            family = _follow_convert(self, xp, dtype, device)
            cache[key] = family
        return family

    def _evaluate(self, fn: Any, q_pos: Any, k_pos: Any, heads: Any) -> Any:
        """``fn(xp, arrays, delta, q_pos, dtype)`` on the selected heads in the compute dtype, in the family's."""
        xp = _positions_pair(q_pos, k_pos, self.xp)
        arrays = self._select_heads(heads)
        cdtype = _checks.compute_dtype(xp, self.dtype)
        h = self.num_heads if heads is None else len(_head_indices(heads, self.num_heads))
        itemsize = max(_itemsize(xp, cdtype), _itemsize(xp, self.dtype))
        _checks.result_size("q_pos, k_pos", (h, q_pos.shape[0], k_pos.shape[0]), itemsize, what="bias (h, Sq, Sk)")
        if cdtype != self.dtype:
            arrays = {k: xp.astype(v, cdtype) for k, v in arrays.items()}
        delta = _offsets(xp, q_pos, k_pos)  # checked once above, not again (four reductions per attention tile)
        out = fn(xp, arrays, delta, q_pos, cdtype)
        return out if out.dtype == self.dtype else xp.astype(out, self.dtype)

    def _magnitude(self, xp: Any, arrays: dict[str, Any], delta: Any, q_pos: Any, dtype: Any) -> Any:
        return xp.abs(self._compute(xp, arrays, delta, q_pos, dtype))

    def _select_heads(self, heads: Any) -> dict[str, Any]:
        arrays = {**self._params, **self._derived}
        if heads is None:
            return arrays
        idx = _head_indices(heads, self.num_heads)
        sel = self.xp.asarray(idx, dtype=self.xp.int64, device=self.device)
        head_keys = set(self._head_params) | set(self._derived)
        return {k: (self.xp.take(v, sel, axis=0) if k in head_keys else v) for k, v in arrays.items()}

    def bias_vjp(self, q_pos: Any, k_pos: Any, d_bias: Any) -> dict[str, Any]:
        r"""Gradients of the parameters for a cotangent of :meth:`bias`: the vector-Jacobian product.

        .. math:: \bar\theta = \sum_{h,i,j} \bar b_h(i, j)\, \frac{\partial b_h(q_i, k_j)}{\partial \theta}

        Parameters
        ----------
        q_pos, k_pos : 1-D integer arrays
            Absolute positions, as for :meth:`bias`.
        d_bias : float array (H, len(q_pos), len(k_pos))
            Cotangent of the bias (the gradient of a loss with respect to it); finite.

        Returns
        -------
        dict
            Keyed by the constructor argument names, each gradient with the shape and dtype of that parameter (see
            each family and ``spec/gradients.md``); empty for a family without learned parameters.

        Raises
        ------
        ValueError
            ``d_bias`` not finite or of the wrong shape; a gradient whose arithmetic has no value (NaN) even on a
            power-of-two scale (FIRE weights whose hidden units overflow).

        Notes
        -----
        Families that depend on :math:`\Delta = i - j` alone first sum ``d_bias`` over each diagonal (every entry of
        one offset) when the positions are consecutive integers, as they are inside attention; the parameter
        gradient is then a short sum over the distinct offsets. Other positions are handled entry by entry.

        The gradients are linear in ``d_bias``: when a partial sum overflows (``d_bias`` entries of 1e308 at
        offsets 1 and 2 with opposite signs), the call is recomputed on ``d_bias`` divided by a power of two and the
        result multiplied back, which is exact; a gradient is then :math:`\pm\infty` only where its exact value is
        beyond the dtype's range.
        """
        family = self._following(q_pos)
        if family is not self:
            return family.bias_vjp(q_pos, k_pos, d_bias)
        xp = _positions_pair(q_pos, k_pos, self.xp)
        _checks.float_array("d_bias", d_bias, xp, ndim=3)
        want = (self.num_heads, int(q_pos.shape[0]), int(k_pos.shape[0]))
        if tuple(d_bias.shape) != want:
            msg = f"d_bias: expected shape (H, Sq, Sk) = {want} (heads, len(q_pos), len(k_pos)), got {d_bias.shape}"
            raise ValueError(msg)
        top = _checks.abs_max_finite("d_bias", d_bias, xp)
        self._check_positions(q_pos, k_pos)
        with _checks.quiet_overflow():  # an overflow is detected below and recomputed, or is the exact value's rounding
            grads = self._vjp_compute(xp, q_pos, k_pos, d_bias)
            if not _all_finite(xp, grads) and top > 0:
                grads = self._vjp_compute(xp, q_pos, k_pos, d_bias, shift=math.frexp(top)[1])
            _no_nan_grads(self, xp, grads)
            return self._grads_out(xp, grads)

    def _vjp_compute(self, xp: Any, q_pos: Any, k_pos: Any, d_bias: Any, *, shift: int = 0) -> dict[str, Any]:
        """Unchecked parameter gradients in the compute dtype (attention accumulates these over its tiles).

        ``shift``: compute on ``d_bias / 2**shift`` and multiply the gradients by ``2**shift`` (exact: they are
        linear in ``d_bias``), so that no partial sum overflows when ``max |d_bias| < 2**shift``.
        """
        cdtype = _checks.compute_dtype(xp, self.dtype)
        arrays = {**self._params, **self._derived}
        arrays = {k: (xp.astype(v, cdtype) if v.dtype != cdtype else v) for k, v in arrays.items()}
        g = xp.astype(d_bias, cdtype) if d_bias.dtype != cdtype else d_bias
        if not shift:
            return self._vjp(xp, arrays, g, q_pos, k_pos, cdtype)
        emax = _checks.max_exponent(xp, cdtype)
        grads = self._vjp(xp, arrays, scale_pow2(g, -shift, emax), q_pos, k_pos, cdtype)
        return {k: scale_pow2(v, shift, emax) for k, v in grads.items()}

    def _check_positions(self, q_pos: Any, k_pos: Any) -> None:
        """Hook for families with a fixed (Sq, Sk) (TensorBias)."""

    def _dense_array(self) -> Any:
        """Hook for families stored as a (H, Sq, Sk) array (TensorBias): that array, which attention tiles by index.

        None for families computed from positions.
        """
        return None

    def _grads_out(self, xp: Any, grads: dict[str, Any]) -> dict[str, Any]:
        """Gradients in the parameters' dtype and shape (the stored layout by default)."""
        return {k: (v if v.dtype == self.dtype else xp.astype(v, self.dtype)) for k, v in grads.items()}

    def _vjp(self, xp: Any, arrays: dict[str, Any], g: Any, q_pos: Any, k_pos: Any, dtype: Any) -> dict[str, Any]:
        """Parameter gradients for cotangent ``g`` (h, Sq, Sk) in ``dtype``: by offset for Toeplitz families."""
        sums, deltas, consecutive = offset_sums(xp, g, q_pos, k_pos)
        return self._offset_vjp(xp, arrays, sums, deltas, dtype, consecutive=consecutive)

    def _offset_vjp(
        self, xp: Any, arrays: dict[str, Any], g: Any, deltas: Any, dtype: Any, *, consecutive: bool
    ) -> dict[str, Any]:
        """Gradients from per-offset cotangent sums ``g`` (h, n) at offsets ``deltas`` (n,).

        ``consecutive``: ``deltas`` are ascending consecutive integers (each offset once); otherwise they are the
        offsets of individual entries, in any order and with repeats.
        """
        raise NotImplementedError

    def _compute(self, xp: Any, arrays: dict[str, Any], delta: Any, q_pos: Any, dtype: Any) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self._options.items())
        return f"{type(self).__name__}(num_heads={self.num_heads}, dtype={self.dtype}{opts})"


def _largest(xp: Any, dtype: Any) -> float:
    """The largest finite number of ``dtype`` (bfloat16, unknown to NumPy's finfo, has float32's range)."""
    try:
        return float(xp.finfo(dtype).max)
    except (TypeError, ValueError):
        return float(xp.finfo(xp.float32).max)


#: Bound on |i - j| and |i| over which :meth:`BiasFamily._bias_bound` bounds a bias: every int64 offset.
OFFSET_BOUND = 2.0**63


def host_abs_max(value: Any) -> float:
    """max |value| of a parameter array as a Python float (on the host; parameters are small)."""
    import numpy as np

    host = np.asarray(host_numpy(value)).astype(np.float64)
    return float(np.max(np.abs(host))) if host.size else 0.0


def _itemsize(xp: Any, dtype: Any) -> int:
    """Bytes per element of ``dtype`` (from an empty array: the standard has no itemsize)."""
    try:
        return int(xp.empty((0,), dtype=dtype).itemsize)
    except (AttributeError, TypeError):  # a library whose arrays have no itemsize: the float64 worst case
        return 8


def scale_pow2(a: Any, e: int, emax: int) -> Any:
    """``a * 2**e``, exact unless the result leaves the normal range, in steps of at most ``2**(emax - 2)`` so that
    no factor itself under- or overflows (2**-1100 is 0 in float64; 2**-140 is subnormal in float32)."""
    step = emax - 2
    while e:
        part = max(-step, min(step, e))
        a = a * 2.0**part
        e -= part
    return a


def _all_finite(xp: Any, arrays: dict[str, Any]) -> bool:
    return all(bool(xp.all(xp.isfinite(v))) for v in arrays.values())


def _no_nan_grads(family: BiasFamily, xp: Any, grads: dict[str, Any]) -> None:
    """ValueError when a parameter gradient is NaN (an intermediate of the family's own arithmetic overflowed)."""
    bad = [k for k, v in grads.items() if bool(xp.any(xp.isnan(v)))]
    if bad:
        msg = (
            f"d_bias: expected a cotangent for which the {type(family).__name__} parameter gradients have a value in "
            f"{dtype_name(family.dtype)}, got one for which the gradient of {', '.join(bad)} overflows to inf - inf "
            "(NaN) even on a power-of-two scale: a wider dtype or smaller parameters keep it finite"
        )
        raise ValueError(msg)


def _no_nan_bias(family: BiasFamily, out: Any, q_pos: Any, k_pos: Any) -> None:
    """ValueError naming the positions where an overflow inside a family's arithmetic left NaN (inf - inf)."""
    xp = family.xp
    bad = xp.isnan(out)
    if not bool(xp.any(bad)):
        return
    import numpy as np

    flags = np.asarray(host_numpy(bad), dtype=bool)
    h, i, j = (int(n) for n in np.argwhere(flags)[0])
    qi, kj = int(host_numpy(q_pos)[i]), int(host_numpy(k_pos)[j])
    msg = (
        f"q_pos, k_pos: expected positions at which the {type(family).__name__} arithmetic stays within "
        f"{dtype_name(family.dtype)} (|x| <= {_largest(xp, family.dtype):.6g}), got {int(flags.sum())} entries "
        f"where it overflows to inf - inf (NaN), the first at head {h}, q_pos {qi}, k_pos {kj} (offset {qi - kj}): "
        "a wider dtype or smaller parameters keep it finite"
    )
    raise ValueError(msg)


def family_class(name: str) -> type[BiasFamily]:
    """The family class registered as ``name``; ValueError naming the registered names otherwise."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        msg = f"family: expected one of {tuple(FAMILIES)}, got {name!r}"
        raise ValueError(msg) from None


def _consecutive_start(pos: Any) -> int | None:
    """First position when ``pos`` is ``p0, p0 + 1, ...`` (checked on the host), else None."""
    host = host_numpy(pos).astype("int64")
    if host.shape[0] > 1 and not bool((host[1:] - host[:-1] == 1).all()):
        return None
    return int(host[0])


def offset_sums(xp: Any, g: Any, q_pos: Any, k_pos: Any) -> tuple[Any, Any, bool]:
    r"""Sum a cotangent over the entries of each relative offset :math:`\Delta = q_i - k_j`.

    Returns ``(sums, deltas, consecutive)``. For consecutive positions (attention's), ``sums`` is (h, Sq + Sk - 1)
    with ``sums[:, t]`` the sum of ``g[:, i, j]`` over the entries of offset ``deltas[t]``, ``deltas`` ascending
    consecutive; each diagonal is summed over its rows in one reduction. Otherwise the entries are returned
    flattened, (h, Sq * Sk), with their offsets, and ``consecutive`` is False.
    """
    q0, k0 = _consecutive_start(q_pos), _consecutive_start(k_pos)
    h, rows, cols = (int(n) for n in g.shape)
    dev = array_device(g)
    if q0 is None or k0 is None:
        delta = _offsets(xp, q_pos, k_pos)  # the callers checked the positions
        return xp.reshape(g, (h, rows * cols)), xp.reshape(delta, (rows * cols,)), False
    # Skew: with the columns reversed (j' = Sk-1-j), entry (i, j') moves to column i + j' of a (rows, rows+cols-1)
    # array when each row is padded with `rows` zeros and the flat buffer is cut to rows * (rows + cols - 1); column
    # i + j' is the offset i - j + cols - 1, so a sum over rows gives every diagonal at once.
    flipped = xp.flip(g, axis=2)
    padded = xp.concat([flipped, xp.zeros((h, rows, rows), dtype=g.dtype, device=dev)], axis=2)
    width = rows + cols - 1
    flat = xp.reshape(padded, (h, rows * (rows + cols)))[:, : rows * width]
    sums = xp.sum(xp.reshape(flat, (h, rows, width)), axis=1)
    first = q0 - k0 - (cols - 1)
    deltas = xp.arange(first, first + width, dtype=xp.int64, device=dev)
    return sums, deltas, True


def scatter_columns(xp: Any, g: Any, idx: Any, ncols: int) -> Any:
    """``out[:, c] = sum of g[:, t] over t with idx[t] == c``: (h, n) and (n,) -> (h, ncols), a scatter-add.

    The standard has no scatter-add: a one-hot matrix product when it is small, else one masked sum per column.
    """
    h, n = int(g.shape[0]), int(g.shape[1])
    dev = array_device(g)
    cols = xp.arange(ncols, dtype=idx.dtype, device=dev)
    if n * ncols <= 1 << 22:
        return g @ xp.astype(idx[:, None] == cols[None, :], g.dtype)
    present = set(host_numpy(idx).astype("int64").tolist())
    zero = xp.zeros((h,), dtype=g.dtype, device=dev)
    out = [
        xp.sum(xp.where((idx == c)[None, :], g, xp.zeros_like(g)), axis=1) if c in present else zero
        for c in range(ncols)
    ]
    return xp.stack(out, axis=1)


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


def _follow_convert(family: BiasFamily, xp: Any, dtype: Any, device: Any) -> BiasFamily:
    """``family`` with its parameters in ``xp`` on ``device`` (one conversion; :meth:`BiasFamily._following` caches
    it, and the tests count calls of this function)."""
    return family.astype(dtype, xp=xp, device=device)


def _convert(value: Any, xp_from: Any, xp_to: Any, dtype: Any, device: Any) -> Any:
    """Move one array across namespaces/devices (through host NumPy when the namespace changes)."""
    if xp_to is xp_from:
        with _checks.quiet_overflow():  # a parameter that overflows the new dtype is rejected by the constructor
            out = value if dtype is None or value.dtype == dtype else xp_to.astype(value, dtype)
        if device is not None and array_device(out) != device:
            out = to_device(out, device)
        return out
    import numpy as np

    host = host_numpy(value) if is_array_api_obj(value) else np.asarray(value)
    if host.dtype.kind == "V" or host.dtype == np.float16:
        host = host.astype(np.float64) if host.dtype.kind == "V" else host
    return xp_to.asarray(host, dtype=dtype, device=device)
