"""What an attention suite (forward or backward) is built with: ``AttentionOptions``, validated once."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import _checks
from .._host import numpy_dtype
from ..cases import AttentionShape
from ..conventions import (
    ALIGNMENTS,
    FLOAT_DTYPES,
    FULLY_MASKED,
    LEVELS,
    PLACEMENTS,
    SEGMENT_POSITIONS,
    TENSOR_LAYOUTS,
    Alignment,
    FloatDtype,
    FullyMasked,
    Level,
    Placement,
    SegmentPositions,
    TensorLayout,
)
from ..families import BiasFamily
from ._arrays import resolve_namespace
from ._core import _Options, _to_numpy64
from .tolerance import attention_tolerance

__all__ = ["AttentionOptions"]


@dataclass(frozen=True)
class AttentionOptions(_Options):
    """What an attention suite (forward or backward) is built with, validated once, when the object is made.

    The fields are the keywords of :func:`check_attention` that describe the comparison (all but the candidate,
    ``expected_failures`` and the check ``label``); :func:`attention_checks`, :func:`attention_backward_checks` and
    the CLI make one and hand it to the suites. Invalid values raise ``TypeError`` or ``ValueError`` naming the
    keyword, checked in the order of the fields. Derived: ``bias64`` (the bias in float64 NumPy, for the
    reference), ``xp_kind``, ``xp_module`` and ``xp_name`` (the resolved namespace of the inputs). ``shapes`` is kept
    as a tuple; the suite checks it against the bias when it builds its cases. ``window`` and ``softcap`` are fixed
    per candidate (as FlashAttention's ``window_size=``, ``softcap=``); ``varlen``, ``segments`` and
    ``segment_positions`` add the per-row length and packed-sequence cases of :mod:`relpos_ref.conformance.features`.
    """

    bias: BiasFamily | None = None
    causal: bool = False
    align: Alignment = "bottom_right"
    placement: Placement = "post_scale"
    scale: float | None = None
    dtype: FloatDtype = "float32"
    with_lse: bool = False
    fully_masked: FullyMasked = "zero"
    xp: Any = None
    device: Any = None
    rtol: float | None = None
    atol: float | None = None
    seed: int = 0
    shapes: Sequence[AttentionShape | tuple[int, ...]] | None = None
    target: str | None = None
    level: Level = "default"
    layout: TensorLayout = "bhsd"
    head_dims: Sequence[int] | None = None
    max_q_len: int | None = None
    max_k_len: int | None = None
    gqa: bool = True
    timeout: float | None = None
    plot_dir: str | os.PathLike[str] | None = None
    deterministic: bool = False
    window: tuple[int | None, int | None] | None = None
    softcap: float | None = None
    varlen: bool = False
    segments: bool = False
    segment_positions: SegmentPositions = "global"
    bias64: BiasFamily | None = field(init=False, repr=False, compare=False)
    xp_kind: str = field(init=False, repr=False, compare=False)
    xp_module: Any = field(init=False, repr=False, compare=False)
    xp_name: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        put = self._put
        bias = self.bias
        if bias is not None and not isinstance(bias, BiasFamily):
            msg = f"bias: expected None or a relpos_ref bias family, got {type(bias).__name__}"
            raise TypeError(msg)
        put("bias64", _to_numpy64(bias) if bias is not None else None)
        _checks.boolean("causal", self.causal)
        _checks.option("align", self.align, ALIGNMENTS)
        _checks.option("placement", self.placement, PLACEMENTS)
        if self.scale is not None:
            put("scale", _checks.real_scalar("scale", self.scale, positive=True))
        _checks.option("dtype", self.dtype, FLOAT_DTYPES)
        numpy_dtype(self.dtype)
        _checks.boolean("with_lse", self.with_lse)
        _checks.option("fully_masked", self.fully_masked, FULLY_MASKED)
        kind, module = resolve_namespace(self.xp)
        put("xp_kind", kind)
        put("xp_module", module)
        put(
            "xp_name", {"numpy": "numpy", "torch": "torch", "cupy": "cupy"}.get(kind, getattr(module, "__name__", "xp"))
        )
        if self.rtol is not None or self.atol is not None:
            attention_tolerance("float64", 0.0, 1.0, rtol=self.rtol, atol=self.atol)
        put("seed", _checks.integer("seed", self.seed))
        if self.shapes is not None:
            put("shapes", tuple(self.shapes))
        _checks.option("level", self.level, LEVELS)
        _checks.option("layout", self.layout, TENSOR_LAYOUTS)
        if self.head_dims is not None:
            if isinstance(self.head_dims, str | bytes) or not isinstance(self.head_dims, Sequence):
                msg = f"head_dims: expected a sequence of head dims, got {self.head_dims!r}"
                raise TypeError(msg)
            put("head_dims", tuple(_checks.integer("head_dims", d, minimum=1) for d in self.head_dims))
        for name in ("max_q_len", "max_k_len"):
            if getattr(self, name) is not None:
                put(name, _checks.integer(name, getattr(self, name), minimum=1))
        _checks.boolean("gqa", self.gqa)
        if self.timeout is not None:
            put("timeout", _checks.real_scalar("timeout", self.timeout, positive=True))
        if self.plot_dir is not None and not isinstance(self.plot_dir, str | os.PathLike):
            msg = f"plot_dir: expected None or a directory path, got {type(self.plot_dir).__name__}"
            raise TypeError(msg)
        _checks.boolean("deterministic", self.deterministic)
        if self.window is not None:
            w = self.window
            if isinstance(w, str | bytes) or not isinstance(w, Sequence) or len(w) != 2:
                msg = f"window: expected None or a pair (left, right), each an int >= 0 or None, got {w!r}"
                raise TypeError(msg)
            put(
                "window",
                tuple(None if x is None else _checks.integer(f"window[{n}]", x, minimum=0) for n, x in enumerate(w)),
            )
        if self.softcap is not None:
            put("softcap", _checks.real_scalar("softcap", self.softcap, positive=True))
        _checks.boolean("varlen", self.varlen)
        _checks.boolean("segments", self.segments)
        _checks.option("segment_positions", self.segment_positions, SEGMENT_POSITIONS)

    def features(self) -> dict[str, Any]:
        """The fixed kernel features (``window``, ``softcap``) as keywords of ``relpos_ref.attention``, those set."""
        return {n: getattr(self, n) for n in ("window", "softcap") if getattr(self, n) is not None}
