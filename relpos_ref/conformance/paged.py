"""Paged KV-cache attention (``flash_attn_with_kvcache``-style decode and chunks) against the float64 reference.

The harness splits each row's keys and values into pages of ``page_block_size`` tokens, stores them at shuffled
physical blocks of a cache (with spare blocks of other data) and hands the candidate
``candidate(q, k_cache, v_cache, block_table, cache_seqlens)``:

* q (B, Sq, H, D), FlashAttention's layout, in both cache layouts; the output is (B, Sq, H, D), an lse (B, H, Sq).
* ``layout="flash"``: ``flash_attn_with_kvcache``'s paged cache, k_cache and v_cache (num_blocks, page_block_size,
  H_kv, D).
* ``layout="vllm"``: vLLM's paged-attention cache, key_cache (num_blocks, H_kv, D // x, page_block_size, x) with
  x = 16 // itemsize (4 in float32, 8 in 16-bit dtypes, 2 in float64) and value_cache (num_blocks, H_kv, D,
  page_block_size), as ``PagedAttention.split_kv_cache`` in vLLM's ``vllm/attention/ops/paged_attn.py`` views them.
* block_table (B, max_blocks) int32: row b's token t is at block ``block_table[b, t // page_block_size]``, slot
  ``t % page_block_size``; cache_seqlens (B,) int32: the real keys of each row.

The expected output is :func:`relpos_ref.attention` on the gathered contiguous K and V with ``k_lens=cache_seqlens``
and ``align="bottom_right"`` (query i of row b at position ``i + cache_seqlens[b] - Sq``), compared by the forward
suite's rule (:class:`relpos_ref.conformance.features._FeatureSuite`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import _checks
from ..cases import PAGED_CASES, PAGED_LAYOUTS, AttentionShape, PagedInputs, gather_pages, paged_inputs
from ..families import BiasFamily, TensorBias
from . import _repro
from ._arrays import from_host
from ._core import Check, run_checks
from .features import _FeatureCase, _FeatureSuite
from .options import AttentionOptions
from .report import Report

__all__ = ["PagedInputs", "check_paged_attention", "paged_attention_checks", "paged_inputs"]


class _PagedSuite(_FeatureSuite):
    """The forward suite of a paged candidate: its cases are ragged key lengths read through a block table."""

    def __init__(self, candidate: Any, options: AttentionOptions, *, label: str, layout: str, page: int) -> None:
        self.cache_layout, self.page = layout, page
        super().__init__(candidate, options, label=label, kind="paged")
        self.signature = "candidate(q, k_cache, v_cache, block_table, cache_seqlens)"
        self.label = label

    def _make_cases(self, shapes: Any) -> dict[str, Any]:
        o = self.options
        h = self.bias64.num_heads if self.bias64 is not None else 4
        g = next((f for f in (2, 3) if h % f == 0 and h // f >= 2), 1) if o.gqa else 1
        group = "quick" if o.level == "quick" else "default"
        d = 16 if group == "quick" else 64
        d = min(sorted(o.head_dims), key=lambda x: (abs(x - d), x)) if o.head_dims else d
        cases: dict[str, Any] = {}
        self.purposes: dict[str, str] = {}
        for name, sq, lens_of, purpose in PAGED_CASES[group]:
            lens = np.array(lens_of(self.page))
            sk = (int(lens.max()) // self.page + 1) * self.page
            sh = AttentionShape(len(lens), h, h // g, sq, sk, d)
            cases[name] = _FeatureCase(name, sh, {"k_lens": lens})
            self.purposes[name] = purpose
        return cases

    def paged(self, case: Any) -> PagedInputs:
        key = ("paged", case.name)
        if key not in self._cache:
            self._cache[key] = paged_inputs(
                case.shape,
                case.features["k_lens"],
                page_block_size=self.page,
                layout=self.cache_layout,
                dtype=self.dtype,
                seed=self.seed,
            )
        return self._cache[key]

    def inputs(self, case: Any, *, perturb_after: int | None = None) -> tuple[np.ndarray, ...]:
        p = self.paged(case)
        return p.q, p.k, p.v

    def header_extra(self) -> dict[str, Any]:
        cases = "; ".join(
            f"{n} {tuple(c.shape)} ({self.purposes[n]}): cache_seqlens={c.features['k_lens'].tolist()}"
            for n, c in self.cases.items()
        )
        return {
            "kind": f"paged attention {self.signature} -> output (B, Sq, H, D)" + (" and lse" if self.with_lse else ""),
            "paged cache": f"layout {self.cache_layout} ({_LAYOUT_TEXT[self.cache_layout]}), page_block_size "
            f"{self.page}, shuffled block table (B, max_blocks) int32, cache_seqlens (B,) int32; reference "
            "relpos_ref.attention on the gathered K/V with k_lens=cache_seqlens, align=bottom_right",
            "cases": cases,
        }

    def _got(self, case: Any, e: dict[str, Any]) -> dict[str, Any]:
        p = self.paged(case)
        args = self.hand((p.q,)) + tuple(from_host(a, self.xp_kind, self.xp_mod, self.device) for a in p[3:])
        out, lse = self.read_result(self._call(*args), case.shape, p.v.shape[-1])
        return {"out": out, "lse": lse}

    def extra_hypotheses(self, case: Any, e: dict[str, Any]) -> list[tuple[str, Callable[..., Any]]]:
        p, lens = self.paged(case), case.features["k_lens"]
        q = e["inputs"][0]
        hyps: list[tuple[str, Callable[..., Any]]] = []

        def whole(label: str, fn: Callable[[], Any]) -> None:
            hyps.append((label, lambda rows=slice(None): fn() if rows == slice(None) else None))

        in_order = np.arange(p.block_table.size).reshape(p.block_table.shape)
        whole(
            "block table ignored: row b read from physical blocks b * max_blocks + 0, 1, 2, ... in order",
            lambda: self.reference(
                case,
                (
                    q,
                    gather_pages(p.k_cache, in_order, self.cache_layout),
                    gather_pages(p.v_cache, in_order, self.cache_layout),
                ),
            ),
        )
        for d in (1, -1):
            alt = np.clip(lens + d, 0, case.shape.k_len)
            whole(
                f"cache_seqlens off by {d:+d}: each row read as one key {'longer' if d > 0 else 'shorter'} (the query "
                "positions move with it)",
                lambda a=alt: self.reference(case, e["inputs"], k_lens=a),
            )
        return hyps

    def snippet(self, case: Any, index: tuple[int, ...] | None, what: str = "output") -> str:
        opts = {**self.reference_options(), "fully_masked": self.fully_masked}
        kw = ", ".join(f"{k}={v!r}" for k, v in opts.items())
        ns = "" if self.xp_name == "numpy" else f", xp={self.xp_name!r}"
        lines = [
            *_repro._preamble(self.candidate, self.target, "AttentionShape, as_numpy, hand_over"),
            "from relpos_ref.conformance.paged import paged_inputs",
            f"bias = {_repro.family_source(self.bias64)}",
            f"shape = {case.shape!r}",
            f"c = paged_inputs(shape, {case.features['k_lens'].tolist()!r}, page_block_size={self.page}, "
            f"layout={self.cache_layout!r}, dtype={self.dtype!r}, seed={self.seed})",
            f"args = hand_over((c.q,){ns}, layout='bshd') + hand_over(c[3:]{ns})  # int32 block_table, cache_seqlens",
            "result = candidate(*args)",
            f"got = as_numpy({'result[1]' if what == 'lse' else 'result[0]' if self.with_lse else 'result'})"
            + ("" if what == "lse" else ".swapaxes(1, 2)  # (B, Sq, H, D) as (B, H, Sq, D)"),
            f"want = rp.attention(*(a.astype(np.float64) for a in (c.q, c.k, c.v)), bias=bias, {kw}, "
            f"k_lens=c.cache_seqlens, return_lse=True)[{int(what == 'lse')}]",
        ]
        if index is not None:
            sel = ", ".join(map(str, index[:3]))
            lines += [f"print(got[{sel}].tolist())", f"print(want[{sel}].tolist())"]
        return "\n".join(lines)


_LAYOUT_TEXT = {
    "flash": "flash_attn_with_kvcache: k_cache, v_cache (num_blocks, page_block_size, H_kv, D)",
    "vllm": "vLLM paged attention: key_cache (num_blocks, H_kv, D // x, page_block_size, x), x = 16 // itemsize; "
    "value_cache (num_blocks, H_kv, D, page_block_size)",
}


def paged_attention_checks(
    candidate: Callable[..., Any],
    *,
    bias: BiasFamily | None = None,
    causal: bool = False,
    layout: str = "flash",
    page_block_size: int = 16,
    scale: float | None = None,
    placement: str = "post_scale",
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    dtype: str = "float32",
    with_lse: bool = False,
    xp: Any = None,
    device: Any = None,
    fully_masked: str = "zero",
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    target: str | None = None,
    level: str = "default",
    head_dims: Sequence[int] | None = None,
    gqa: bool = True,
    timeout: float | None = None,
    label: str = "paged",
) -> list[Check]:
    """The checks of :func:`check_paged_attention`, unrun."""
    _PagedSuite.check_candidate(candidate)
    _checks.option("layout", layout, PAGED_LAYOUTS)
    page = _checks.integer("page_block_size", page_block_size, minimum=1)
    if isinstance(bias, TensorBias):
        raise TypeError("bias: a TensorBias has fixed (Sq, Sk); a paged check needs a positional bias family")
    given = {k: v for k, v in locals().items() if k not in ("layout", "page_block_size", "candidate", "label")}
    options = AttentionOptions.of({**given, "layout": "bshd", "align": "bottom_right"})
    s = _PagedSuite(candidate, options, label=label, layout=layout, page=page)
    if s.cache_layout == "vllm":
        paged_inputs(next(iter(s.cases.values())).shape, [0] * 4, page_block_size=page, layout="vllm", dtype=dtype)
    s.notes.append("paged: repeatable, rows_sum_to_one and effective_bias are checked by check_attention, not here")
    return s.values_checks()


def check_paged_attention(
    candidate: Callable[..., Any],
    *,
    bias: BiasFamily | None = None,
    causal: bool = False,
    layout: str = "flash",
    page_block_size: int = 16,
    scale: float | None = None,
    placement: str = "post_scale",
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    dtype: str = "float32",
    with_lse: bool = False,
    xp: Any = None,
    device: Any = None,
    fully_masked: str = "zero",
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    expected_failures: dict[str, str] | None = None,
    target: str | None = None,
    level: str = "default",
    head_dims: Sequence[int] | None = None,
    gqa: bool = True,
    timeout: float | None = None,
) -> Report:
    """Check a paged KV-cache attention ``candidate(q, k_cache, v_cache, block_table, cache_seqlens)`` against
    :func:`relpos_ref.attention` in float64 on the gathered K/V (the module docstring gives the layouts).

    Cases: decode (Sq = 1) against ragged caches (1 key, a page, one past a page, up to 2067 keys; "quick": up to
    3 pages) and a chunk of Sq = 17 queries at ragged cache ends; ``page_block_size`` is the cache's page (16 in
    vLLM; FlashAttention's paged kernels take multiples of 256). The other keywords are those of
    :func:`~relpos_ref.conformance.check_attention`; ``window`` and ``softcap`` are fixed for the candidate.
    """
    kw = {k: v for k, v in locals().items() if k not in ("candidate", "expected_failures")}
    return run_checks(paged_attention_checks(candidate, **kw), expected_failures=expected_failures)
