"""Validation, parameter packing and launch of the fused biased-softmax kernels (CuPy imported on first call)."""

from __future__ import annotations

import functools
import weakref
from typing import Any

import numpy as np

from .. import _checks
from .._checks import is_array_api_obj, is_cupy_array
from .._host import host_numpy
from ..conventions import ALIGNMENTS, FULLY_MASKED, PLACEMENTS
from ..families import FAMILIES, BiasFamily, t5_bucket_thresholds
from ..masks import _window
from ._source import FAMILY_STRUCTS, cluster_policy, kernel_source, plan_launch

__all__ = ["fused_biased_softmax", "supported_family"]

# Flags of biased_softmax.cu (enum RP_*).
_POS_ARRAYS, _CAUSAL, _HAS_MASK, _WANT_LSE, _EMPTY_NAN, _WINDOW, _SOFTCAP = 1, 2, 4, 8, 16, 32, 64
# An unbounded window side: |q - k| < 2**31 - 1 for positions below 2**30, so this side never rejects a key
# (bias.cuh, in_window), and -_WINDOW_UNBOUNDED is still an int32.
_WINDOW_UNBOUNDED = 2**31 - 1
# Softcaps whose float32 value and reciprocal are both normal numbers: the kernel multiplies by the rounded
# reciprocal (bias.cuh, softcap_logit), which must be neither infinite nor subnormal for the error model to hold.
_SOFTCAP_RANGE = {"float32": (2.0**-125, 2.0**125), "float64": (2.0**-1021, 2.0**1021)}
# Offsets are 32-bit in the kernel: positions are kept below 2**30 in magnitude so q - k never overflows.
_POS_LIMIT = 1 << 30
# Largest Sandwich profile table (entries of 8 bytes).
_SANDWICH_MAX_N = 1 << 24

_COMPILE_OPTIONS = ("--std=c++17",)


@functools.cache
def _function(name: str) -> Any:
    """The compiled kernel ``name`` (a name expression of the source); compiled once per process and device."""
    import cupy

    module = cupy.RawModule(code=kernel_source(), options=_COMPILE_OPTIONS, name_expressions=(name,))
    return module.get_function(name)


def supported_family(bias: Any) -> str | None:
    """Name of the in-kernel family that computes ``bias`` (a BiasFamily), or None if it would be materialised.

    Only the registered classes themselves qualify: a subclass may change the arithmetic the kernel hard-codes.
    """
    name = getattr(type(bias), "name", None)
    if name in FAMILY_STRUCTS and FAMILIES.get(name) is type(bias):
        return name
    return None


def _f64(value: Any) -> np.ndarray:
    return np.asarray(host_numpy(value), dtype=np.float64)


# Packed parameter buffers of a family, per (accumulation dtype, device): families are immutable, so the upload
# happens once per family object and kernel precision.
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pack_alibi(fam: Any) -> tuple[Any, list[int]]:
    return _f64(fam.parameters()["slopes"]), [0]


def _pack_kerple(fam: Any) -> tuple[Any, list[int]]:
    p = fam.parameters()
    return np.concatenate([_f64(p["r1"]), _f64(p["r2"])]), [0]


def _pack_t5(fam: Any) -> tuple[Any, list[int]]:
    opts = fam.options()
    table = _f64(fam.parameters()["table"])
    thr = t5_bucket_thresholds(
        bidirectional=opts["bidirectional"], num_buckets=table.shape[1], max_distance=opts["max_distance"]
    )
    # A threshold beyond int32 is never reached by an offset below 2**31: clamping keeps the count exact.
    thr = [min(int(t), 2**31 - 1) for t in thr]
    return table.reshape(-1), [int(opts["bidirectional"]), table.shape[1], len(thr), *thr]


def _pack_offset(fam: Any) -> tuple[Any, list[int]]:
    table = _f64(fam.parameters()["table"])
    return table.reshape(-1), [(table.shape[1] - 1) // 2]


def _pack_sandwich(fam: Any) -> tuple[Any, list[int]]:
    heads = fam.num_heads
    # Head factor H / (8 h), h = 1..H, in float64, rounded once to the kernel precision.
    return np.array([heads / (8.0 * h) for h in range(1, heads + 1)]), [0]


def _pack_fire(fam: Any) -> tuple[Any, list[int]]:
    p = fam.parameters()
    w1, b1, w2, b2 = (_f64(p[k]) for k in ("w1", "b1", "w2", "b2"))
    head = [float(_f64(p["c"])), float(_f64(p["L"])), float(fam.options()["eps"])]
    return np.concatenate([np.array(head), w1.reshape(-1), b1, w2.reshape(-1), b2]), [w1.shape[0]]


# Parameter layout of each in-kernel family, documented above its struct in bias.cuh.
_PACKERS = {
    "alibi": _pack_alibi,
    "kerple_power": _pack_kerple,
    "kerple_log": _pack_kerple,
    "t5": _pack_t5,
    "offset": _pack_offset,
    "sandwich": _pack_sandwich,
    "fire": _pack_fire,
}


def _pack_family(name: str, fam: Any, acc: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Host buffers (fp in ``acc``, ip int32) in the layouts documented above each struct of bias.cuh."""
    fp, ip = _PACKERS[name](fam)
    return np.asarray(fp, dtype=acc), np.asarray(ip, dtype=np.int32)


def _device_params(be: Any, name: str, fam: Any, acc: np.dtype) -> tuple[Any, Any]:
    key = (name, acc.str, be.device_key())
    try:
        cache = _PACKED.setdefault(fam, {})
    except TypeError:  # not weak-referenceable: no caching
        cache = {}
    if key not in cache:
        fp, ip = _pack_family(name, fam, acc)
        cache[key] = (be.am.asarray(fp), be.am.asarray(ip))
    return cache[key]


@functools.lru_cache(maxsize=64)
def _sandwich_profile(half_d: int, count: int, device_id: int) -> Any:
    """Profile table -2 sum_k sin^2(n w_k / 2), n = 0..count-1, computed on the GPU in double (see bias.cuh)."""
    import cupy as cp

    out = cp.empty(count, dtype=cp.float64)
    fn = _function("rp::sandwich_profile_kernel")
    fn(((count + 255) // 256,), (256,), (out, np.int32(count), np.int32(half_d)))
    return out


def _positions(q_pos: Any, k_pos: Any, align: str, sq: int, sk: int) -> tuple[np.ndarray, np.ndarray]:
    if (q_pos is None) != (k_pos is None):
        given = "q_pos" if q_pos is not None else "k_pos"
        msg = f"q_pos, k_pos: expected both position arrays or neither, got only {given}"
        raise ValueError(msg)
    if q_pos is None:
        start = sk - sq if align == "bottom_right" else 0
        return np.arange(start, start + sq, dtype=np.int64), np.arange(sk, dtype=np.int64)
    out = []
    for name, value, length in (("q_pos", q_pos, sq), ("k_pos", k_pos, sk)):
        if not is_array_api_obj(value):
            msg = f"{name}: expected a 1-D integer array, got {type(value).__name__}"
            raise TypeError(msg)
        host = host_numpy(value)
        if host.dtype.kind not in "iu":
            msg = f"{name}: expected an integer dtype, got {host.dtype}"
            raise TypeError(msg)
        if host.shape != (length,):
            msg = f"{name}: expected shape ({length},) to match the scores, got {host.shape}"
            raise ValueError(msg)
        host = host.astype(np.int64)
        if host.size and int(np.abs(host).max()) >= _POS_LIMIT:
            msg = f"{name}: expected positions of magnitude < 2**30 for the fused kernel, got {int(np.abs(host).max())}"
            raise ValueError(msg)
        out.append(host)
    return out[0], out[1]


def _affine_start(pos: np.ndarray) -> int | None:
    """pos[0] if pos is pos[0] + arange(len(pos)), else None."""
    if pos.size > 1 and not np.all(np.diff(pos) == 1):
        return None
    return int(pos[0])


def _strides(am: Any, arr: Any, shape: tuple[int, ...]) -> tuple[Any, list[int]]:
    """(array, element strides) of ``arr`` broadcast to ``shape`` (4-D); broadcast axes get stride 0."""
    view = am.broadcast_to(arr, shape)
    return view, [s // view.itemsize for s in view.strides]


_ZEROS: dict = {}


class _Backend:
    """What the launch preparation needs from an array library: CuPy for real launches, NumPy for the CPU emulation
    of the kernels in the tests (same preparation code, same argument list)."""

    def __init__(
        self, am: Any, xp: Any, is_array: Any, ptr: Any, device_key: Any, profile: Any, clusters: Any = None
    ) -> None:
        self.am, self.xp, self.is_array, self.ptr, self.device_key, self.profile = (
            am, xp, is_array, ptr, device_key, profile
        )  # fmt: skip
        # dtype name -> ClusterPolicy or None: whether long rows may use the cluster kernel on this device.
        self.clusters = clusters if clusters is not None else (lambda dtype: None)

    def zeros(self, n: int, dtype: np.dtype) -> Any:
        """A small read-only zero array, allocated once per (device, dtype): saves allocations and fill kernels on
        every call (the kernels never write to these)."""
        key = (self.am.__name__, self.device_key(), n, dtype.str)
        if key not in _ZEROS:
            _ZEROS[key] = self.am.zeros(n, dtype=dtype)
        return _ZEROS[key]


def _cupy_backend() -> _Backend:
    xp = _checks.compat_namespace("cupy")
    import cupy as cp

    return _Backend(
        cp,
        xp,
        is_cupy_array,
        lambda a: a.data.ptr,
        lambda: cp.cuda.Device().id,
        lambda half_d, count: _sandwich_profile(half_d, count, cp.cuda.Device().id),
        _device_cluster_policy,
    )


def _device_cluster_policy(dtype: str) -> Any:
    """The cluster policy (RELPOS_REF_CUDA_CLUSTERS) if the current device has thread-block clusters (CC >= 9.0)."""
    import cupy as cp

    policy = cluster_policy(dtype)
    if policy is None or int(cp.cuda.Device().compute_capability) < 90:
        return None
    return policy


class _Launch:
    """A prepared kernel launch: name expression, grid and block sizes, the argument tuple, and the outputs.
    ``cluster`` (blocks per cluster) is fixed at compile time by the kernel's ``__cluster_dims__``; the grid is a
    multiple of it."""

    def __init__(
        self, name: str, grid: int, block: int, args: tuple, probs: Any, lse: Any, lse_shape: tuple, cluster: int = 1
    ) -> None:
        self.name, self.grid, self.block, self.args, self.cluster = name, grid, block, args, cluster
        self.probs, self.lse, self.lse_shape = probs, lse, lse_shape

    def result(self, return_lse: bool) -> Any:
        if return_lse:
            return self.probs, self.lse.reshape(self.lse_shape)
        return self.probs


def fused_biased_softmax(
    scores: Any,
    bias: Any = None,
    *,
    q_pos: Any = None,
    k_pos: Any = None,
    align: str = "bottom_right",
    causal: bool = False,
    mask: Any = None,
    scale: float = 1.0,
    placement: str = "post_scale",
    fully_masked: str = "zero",
    return_lse: bool = False,
    window: Any = None,
    softcap: float | None = None,
) -> Any:
    r"""Biased softmax of CuPy scores in one CUDA kernel, the bias computed in the kernel.

    Parameters
    ----------
    scores : CuPy float16, float32 or float64 array (B, H, Sq, Sk) or (H, Sq, Sk)
        Raw query-key products. Non-contiguous input is copied first.
    bias : BiasFamily, CuPy float array, or None
        A family (:class:`~relpos_ref.ALiBi`, :class:`~relpos_ref.KerplePower`, :class:`~relpos_ref.KerpleLog`,
        :class:`~relpos_ref.T5Bias`, :class:`~relpos_ref.OffsetBias`, :class:`~relpos_ref.Sandwich`,
        :class:`~relpos_ref.FIRE`: computed in the kernel; :class:`~relpos_ref.TensorBias` or any other family:
        read from memory) with ``num_heads == H``; or an array broadcastable to ``scores`` (read with broadcasting
        strides, -inf entries mask); or None.
    q_pos, k_pos : 1-D integer arrays, optional
        Absolute positions (any namespace; |position| < 2**30). Default: :func:`relpos_ref.positions` with
        ``align``.
    align : {"bottom_right", "top_left"}
        Used when positions are not given.
    causal : bool, default False
        Attend only keys with ``k_pos[j] <= q_pos[i]``.
    mask : CuPy bool array broadcastable to ``scores``, optional
        True where the key may be attended; combined with ``causal``.
    scale : float, default 1.0
        :math:`\tau > 0`.
    placement : {"post_scale", "pre_scale"}
    fully_masked : {"zero", "nan"}
        Rows with nothing to attend (or only -inf logits): zeros and lse -inf, or NaN and NaN.
    return_lse : bool, default False
        Also return the natural-log log-sum-exp of the final logits, shape ``scores.shape[:-1]``.
    window : (left, right), optional
        Local attention, as in :func:`relpos_ref.attention`: key j only when
        :math:`-\mathit{right} \le p_i - p_j \le \mathit{left}` (the positions above); each side an int >= 0, or
        None for unbounded. Combined with ``causal`` and ``mask``.
    softcap : float, optional
        :math:`c > 0` (and, with its reciprocal, a normal number of the kernel's precision): the scaled score
        becomes :math:`c \tanh(\tau s / c)` before the bias is added and before masking, as in
        :func:`relpos_ref.attention`: :math:`z = c \tanh(\tau s / c) + b` (``post_scale``) or
        :math:`c \tanh(\tau s / c) + \tau b` (``pre_scale``). A -inf score stays -inf (a masked key, as
        without a softcap), not :math:`c \tanh(-\infty) = -c`. None for none.

    Returns
    -------
    probs : CuPy array, shape and dtype of ``scores``
    lse : CuPy array, only with ``return_lse=True``
        float32 for float16/float32 scores, float64 for float64 scores.

    Raises
    ------
    TypeError
        ``scores`` (or ``bias``/``mask``) is not a CuPy array of a supported dtype.
    ValueError
        Shapes that do not match, head counts that differ, bad options, positions beyond the kernel's range.

    Notes
    -----
    Arithmetic is float32 for float16/float32 scores (probabilities rounded once to float16), float64 for float64.
    Error bounds of the in-kernel bias against the float64 reference are in :mod:`relpos_ref.cuda.bounds`.
    With ``RELPOS_REF_CUDA_CLUSTERS=1`` on a GPU of compute capability 9.0 or later, rows longer than 8192 keys
    (16384 for float64) and up to 65536 are split over a thread-block cluster instead of one block (off by default
    until measured on a GPU; results agree within the same error model, not bit for bit).
    ``window`` and ``softcap`` are kernel arguments tested on uniform flags: without them the kernel takes the
    branches it took before they existed (no tanh, no window test); nothing has been timed on a GPU. The softcap's
    error model is :func:`relpos_ref.cuda.bounds.softcap_error_bound`. They are keywords of this function only:
    ``biased_softmax(backend="fused")`` does not take them.
    """
    if not is_cupy_array(scores):
        msg = (
            "scores: expected a CuPy array (the fused kernel runs on CUDA; use backend='reference' for other "
            f"arrays), got {type(scores).__module__}.{type(scores).__name__}"
        )
        raise TypeError(msg)
    with scores.device:
        launch = _prepare(
            _cupy_backend(), scores, bias, q_pos=q_pos, k_pos=k_pos, align=align, causal=causal, mask=mask,
            scale=scale, placement=placement, fully_masked=fully_masked, return_lse=return_lse, window=window,
            softcap=softcap,
        )  # fmt: skip
        if launch.grid:
            _function(launch.name)((launch.grid,), (launch.block,), launch.args)
    return launch.result(return_lse)


def _prepare(
    be: _Backend,
    scores: Any,
    bias: Any,
    *,
    q_pos: Any,
    k_pos: Any,
    align: str,
    causal: bool,
    mask: Any,
    scale: float,
    placement: str,
    fully_masked: str,
    return_lse: bool,
    window: Any = None,
    softcap: float | None = None,
) -> _Launch:
    """Validate the arguments and build the kernel launch (allocations happen here, the launch does not)."""

    am = be.am
    dtype = np.dtype(scores.dtype)
    if dtype.name not in ("float16", "float32", "float64"):
        msg = f"scores: expected dtype float16, float32 or float64, got {dtype}"
        raise TypeError(msg)
    if scores.ndim not in (3, 4):
        msg = f"scores: expected shape (B, H, Sq, Sk) or (H, Sq, Sk), got {tuple(scores.shape)}"
        raise ValueError(msg)
    if any(s == 0 for s in scores.shape):
        msg = f"scores: expected a non-empty array, got shape {tuple(scores.shape)}"
        raise ValueError(msg)
    _checks.option("align", align, ALIGNMENTS)
    _checks.option("placement", placement, PLACEMENTS)
    _checks.option("fully_masked", fully_masked, FULLY_MASKED)
    _checks.boolean("causal", causal)
    _checks.boolean("return_lse", return_lse)
    scale = _checks.real_scalar("scale", scale, positive=True)
    left, right = _window(window)
    if softcap is not None:
        softcap = _checks.real_scalar("softcap", softcap, positive=True)
    shape4 = (1, *scores.shape) if scores.ndim == 3 else tuple(scores.shape)
    nb, nh, sq, sk = shape4
    nrows = nb * nh * sq
    if nrows >= 2**31 or sk >= 2**31:
        msg = f"scores: expected fewer than 2**31 rows and keys, got shape {tuple(scores.shape)}"
        raise ValueError(msg)
    acc = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
    if softcap is not None:
        lo, hi = _SOFTCAP_RANGE[acc.name]
        if not lo <= softcap <= hi:
            msg = f"softcap: expected a value in [{lo:.3g}, {hi:.3g}] for {acc.name} arithmetic, got {softcap!r}"
            raise ValueError(msg)

    # -- bias: a family computed in the kernel, or a tensor read with strides ----------------------------------------
    family, fam_obj, tensor = "none", None, None
    if isinstance(bias, BiasFamily):
        if bias.num_heads != nh:
            msg = f"bias: expected a family with num_heads == {nh} (the scores' H), got {bias.num_heads}"
            raise ValueError(msg)
        family = supported_family(bias) or "materialise"
        fam_obj = bias
    elif bias is not None:
        if not be.is_array(bias):
            msg = f"bias: expected a BiasFamily or a CuPy array, got {type(bias).__module__}.{type(bias).__name__}"
            raise TypeError(msg)
        if np.dtype(bias.dtype).kind != "f":
            msg = f"bias: expected a real floating-point dtype, got {bias.dtype}"
            raise TypeError(msg)
        _checks.broadcastable("bias", bias, tuple(scores.shape))
        family, tensor = "tensor", bias
    if mask is not None:
        if not be.is_array(mask):
            msg = f"mask: expected a CuPy boolean array, got {type(mask).__module__}.{type(mask).__name__}"
            raise TypeError(msg)
        if np.dtype(mask.dtype) != np.bool_:
            msg = f"mask: expected a boolean dtype, got {mask.dtype}"
            raise TypeError(msg)
        _checks.broadcastable("mask", mask, tuple(scores.shape))

    qh, kh = _positions(q_pos, k_pos, align, sq, sk)
    q0, k0 = _affine_start(qh), _affine_start(kh)
    pos_arrays = q0 is None or k0 is None

    x = am.ascontiguousarray(scores)
    y = am.empty_like(x)
    lse = am.empty(shape4[:3], dtype=acc) if return_lse else be.zeros(4, acc)  # not written without the flag

    if family == "tensor" and fam_obj is not None:  # TensorBias: (H, Sq, Sk), rows are query indices
        arr = fam_obj.parameters()["array"]
        if tuple(arr.shape) != (nh, sq, sk):
            msg = f"bias: expected a TensorBias of shape {(nh, sq, sk)}, got {tuple(arr.shape)}"
            raise ValueError(msg)
        tensor = arr if be.is_array(arr) else am.asarray(host_numpy(arr))
    elif family == "materialise":  # a family without an in-kernel form: materialise its bias on the device
        tensor = fam_obj.astype(xp=be.xp).bias(am.asarray(qh), am.asarray(kh))
        family = "tensor"

    dummy_f = be.zeros(4, acc)  # placeholders for unused pointer arguments (never written)
    dummy_i = be.zeros(4, np.dtype(np.int32))
    lp = be.zeros(4, np.dtype(np.int64))
    if family == "none":
        fp, ip = dummy_f, dummy_i
    elif family == "tensor":
        fp, strides = _strides(am, am.asarray(tensor, dtype=acc), shape4)
        ip, lp = dummy_i, am.asarray(strides, dtype=np.int64)
    elif family == "sandwich":
        fac, _ = _device_params(be, "sandwich", fam_obj, acc)
        nmax = int(max(abs(qh.max() - kh.min()), abs(qh.min() - kh.max())))
        if nmax + 1 > _SANDWICH_MAX_N:
            msg = f"q_pos, k_pos: the Sandwich kernel supports |q - k| < 2**24, got offsets up to {nmax}"
            raise ValueError(msg)
        count = 1 << max(10, nmax.bit_length())  # > nmax; a power of two so nearby lengths share one table
        prof = be.profile(fam_obj.options()["head_dim"] // 2, count)
        fp = am.concatenate([fac, prof.astype(acc, copy=False)])
        ip = am.asarray([count - 1], dtype=np.int32)
    else:
        fp, ip = _device_params(be, family, fam_obj, acc)

    flags = (
        (_POS_ARRAYS if pos_arrays else 0)
        | (_CAUSAL if causal else 0)
        | (_WANT_LSE if return_lse else 0)
        | (_EMPTY_NAN if fully_masked == "nan" else 0)
        | (_WINDOW if window is not None and (left, right) != (None, None) else 0)
        | (_SOFTCAP if softcap is not None else 0)
    )
    wl = _WINDOW_UNBOUNDED if left is None else min(left, _WINDOW_UNBOUNDED)
    wr = _WINDOW_UNBOUNDED if right is None else min(right, _WINDOW_UNBOUNDED)
    if pos_arrays:
        qd, kd = am.asarray(qh.astype(np.int32)), am.asarray(kh.astype(np.int32))
        q0 = k0 = 0
    else:
        qd = kd = dummy_i
    if mask is not None:
        md, ms = _strides(am, mask, shape4)
        flags |= _HAS_MASK
    else:
        md, ms = be.zeros(4, np.dtype(np.bool_)), [0, 0, 0, 0]

    vector_ok = be.ptr(x) % 16 == 0 and be.ptr(y) % 16 == 0
    plan = plan_launch(sk, dtype.name, vector_ok=vector_ok, clusters=be.clusters(dtype.name))
    a = acc.type
    alpha, beta = (a(scale), a(1.0)) if placement == "post_scale" else (a(scale), a(scale))
    # cap and 1 / cap each rounded once from float64; 0 when off (never read then).
    cap, inv_cap = (a(softcap), a(1.0 / softcap)) if softcap is not None else (a(0.0), a(0.0))
    i32 = np.int32
    args = (
        x, y, lse, fp, ip, lp, qd, kd, md,
        *(np.int64(s) for s in ms),
        i32(nrows), i32(nh), i32(sq), i32(sk), i32(q0), i32(k0), i32(flags), alpha, beta,
        i32(wl), i32(wr), cap, inv_cap,
    )  # fmt: skip
    name = plan.kernel_name(family, dtype.name)
    return _Launch(name, plan.grid(nrows), plan.block, args, y, lse, tuple(scores.shape[:-1]), plan.cluster)
