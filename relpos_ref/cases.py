"""The attention cases a conformance check draws: shapes, seeded inputs, memory layouts, kernel-shaped case sets."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from . import _checks
from ._host import numpy_dtype
from .conventions import LEVELS, TENSOR_LAYOUTS, Level, TensorLayout

__all__ = [
    "AttentionShape",
    "KernelCase",
    "PagedInputs",
    "attention_inputs",
    "from_layout",
    "gather_pages",
    "kernel_cases",
    "paged_inputs",
    "to_layout",
]


class AttentionShape(NamedTuple):
    """Sizes of one attention case. ``logit_scale`` multiplies q (large logits)."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    logit_scale: float = 1.0


class KernelCase(NamedTuple):
    """A named case of a case set and what it is there to exercise (printed in every report)."""

    name: str
    shape: AttentionShape
    purpose: str


def attention_inputs(
    shape: AttentionShape, *, dtype: str = "float32", seed: int = 0, identity_v: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seeded q, k, v (NumPy, (B, H, S, D), in ``dtype``; bfloat16 via ml_dtypes) a check hands to a candidate.

    Standard normal entries; q is multiplied by ``shape.logit_scale`` before rounding. ``identity_v`` makes every
    value head the identity matrix (needs ``head_dim == k_len``), so the output rows are the probabilities.
    :func:`to_layout` gives them in a candidate's own layout.
    """
    shape = AttentionShape(*shape)
    nd = numpy_dtype(dtype)
    rng = np.random.default_rng([seed, *[int(x) for x in shape[:6]], round(shape.logit_scale * 1000)])
    b, h, hkv, sq, sk, d = shape[:6]
    q = rng.standard_normal((b, h, sq, d)) * shape.logit_scale
    k = rng.standard_normal((b, hkv, sk, d))
    if identity_v:
        if d != sk:
            msg = f"shape: identity_v needs head_dim == k_len, got head_dim {d}, k_len {sk}"
            raise ValueError(msg)
        v = np.broadcast_to(np.eye(sk), (b, hkv, sk, sk)).copy()
    else:
        v = rng.standard_normal((b, hkv, sk, d))
    return q.astype(nd), k.astype(nd), v.astype(nd)


def to_layout(x: np.ndarray, /, layout: TensorLayout) -> np.ndarray:
    """A (B, H, S, D) array in ``layout``: itself for "bhsd", a contiguous (B, S, H, D) copy for "bshd"."""
    _checks.option("layout", layout, TENSOR_LAYOUTS)
    return x if layout == "bhsd" else np.ascontiguousarray(np.swapaxes(x, 1, 2))


def from_layout(x: np.ndarray, /, layout: TensorLayout) -> np.ndarray:
    """The inverse of :func:`to_layout`: a ``layout`` array as (B, H, S, D)."""
    _checks.option("layout", layout, TENSOR_LAYOUTS)
    return x if layout == "bhsd" else np.swapaxes(x, 1, 2)


# Each case set: (name, batch, kv_group, q_len, k_len, head_dim, logit_scale, purpose). kv_group "g" is the largest
# group ratio the head count allows (preferring ratios above 2), 1 keeps kv_heads == heads. The sizes sit one past or
# one short of multiples of the usual tile widths (16..256), so a kernel's partial last tile is always exercised;
# (113, 203) and (1023, 1024)-style pairs are those of FlashAttention's own tests, 17 keys after a tile of 16 is
# where the vLLM ROCm ALiBi report starts to differ, and 2067 / 4099 keys put offsets past 2048 (integers a
# half-precision float no longer holds) and past T5's default max_distance.
_SETS: dict[str, tuple[tuple[str, int, Any, int, int, int, float, str], ...]] = {
    "quick": (
        ("square", 2, 1, 33, 33, 16, 1.0, "batch 2, Sq = Sk one past a 32-wide tile"),
        ("q<k", 1, 1, 17, 47, 16, 1.0, "Sq < Sk: bottom-right offset, partial tiles both ways"),
        ("decode", 1, 1, 1, 65, 16, 1.0, "one query against a cache of 65 keys"),
        ("gqa", 1, "g", 17, 33, 16, 1.0, "grouped-query heads"),
        ("q>k", 1, 1, 23, 9, 16, 1.0, "Sq > Sk: queries before the first key"),
        ("large_logits", 1, 1, 33, 33, 32, 40.0, "logits of order 100"),
    ),
    "default": (
        ("square", 2, 1, 129, 129, 64, 1.0, "batch 2, Sq = Sk one past a 128-wide tile"),
        ("q<k", 1, 1, 113, 203, 64, 1.0, "Sq < Sk, several query tiles, partial tiles both ways"),
        ("q>k", 1, 1, 203, 113, 128, 1.0, "Sq > Sk: queries before the first key, head dim 128"),
        ("long_rows", 1, 1, 255, 1023, 64, 1.0, "8-16 key tiles per row, one short of a multiple of 256"),
        ("gqa", 1, "g", 129, 257, 64, 1.0, "grouped-query heads, group ratio above 2 where the heads allow"),
        ("decode", 2, 1, 1, 4099, 64, 1.0, "decode against 4099 keys: split-KV paths, offsets past 4096"),
        ("chunked_prefill", 1, 1, 17, 2067, 64, 1.0, "a chunk of 17 queries at the end of a 2067-key cache"),
        ("large_logits", 1, 1, 129, 129, 128, 40.0, "logits of order 100 at head dim 128"),
    ),
    "thorough": (
        ("square", 2, 1, 257, 257, 64, 1.0, "batch 2, Sq = Sk one past a 256-wide tile"),
        ("q<k", 1, 1, 113, 203, 64, 1.0, "Sq < Sk, several query tiles, partial tiles both ways"),
        ("q>k", 1, 1, 203, 113, 128, 1.0, "Sq > Sk: queries before the first key, head dim 128"),
        ("fa_1023x1024", 1, 1, 1023, 1024, 64, 1.0, "FlashAttention's (1023, 1024)"),
        ("fa_1024x1023", 1, 1, 1024, 1023, 128, 1.0, "FlashAttention's (1024, 1023)"),
        ("square_2048", 1, 1, 2049, 2049, 64, 1.0, "Sq = Sk = 2049: offsets past 2048 on both sides"),
        ("rocm_65x1019", 2, 1, 65, 1019, 256, 1.0, "ROCm FlashAttention's (65, 1019), head dim 256"),
        ("odd_dims", 1, 1, 113, 123, 32, 1.0, "head dim 32"),
        ("dim_80", 1, 1, 97, 161, 80, 1.0, "head dim 80 (not a power of two)"),
        ("dim_96", 1, 1, 65, 127, 96, 1.0, "head dim 96"),
        ("gqa", 2, "g", 129, 513, 128, 1.0, "grouped-query heads, group ratio above 2 where the heads allow"),
        ("decode", 2, 1, 1, 16387, 64, 1.0, "decode against 16387 keys"),
        ("decode_gqa", 2, "g", 1, 8195, 128, 1.0, "grouped-query decode against 8195 keys"),
        ("chunked_prefill", 1, 1, 17, 2067, 64, 1.0, "a chunk of 17 queries at the end of a 2067-key cache"),
        ("chunk_4096", 1, 1, 129, 4227, 64, 1.0, "a chunk of 129 queries at the end of a 4227-key cache"),
        ("large_logits", 1, 1, 257, 257, 128, 40.0, "logits of order 100 at head dim 128"),
        ("huge_logits", 1, 1, 65, 1025, 64, 200.0, "logits of order 1000"),
    ),
}


def _group(heads: int) -> int:
    """The kv group ratio of a "g" case: the smallest ratio above 2 that leaves two kv heads or more (one kv head
    would hide a wrong query-to-kv mapping), else 2, else all heads on one kv head, else 1."""
    for ok in (lambda g: g > 2 and heads // g >= 2, lambda g: g == 2 and heads // g >= 2, lambda g: g > 1):
        found = [g for g in range(2, heads + 1) if heads % g == 0 and ok(g)]
        if found:
            return min(found)
    return 1


def kernel_cases(
    *,
    level: Level = "default",
    heads: int,
    head_dims: Sequence[int] | None = None,
    max_q_len: int | None = None,
    max_k_len: int | None = None,
    gqa: bool = True,
    min_k_len: int = 0,
) -> tuple[list[KernelCase], list[str]]:
    """The kernel-shaped case set of ``level`` for ``heads`` query heads, inside what the candidate declares.

    Parameters
    ----------
    level : {"quick", "default", "thorough"}
        "quick" for smoke tests (small sizes that still leave partial 16- and 32-wide tiles); "default" crosses
        the tile boundaries of 16..256-wide tiles with several key tiles per row, Sq != Sk both ways, decode
        against thousands of keys and a chunked prefill; "thorough" adds FlashAttention's and ROCm's test sizes,
        odd head dims and caches of 16k keys.
    heads : int
        Query heads (the bias family's).
    head_dims : sequence of int, optional
        Head dims the candidate accepts; each case's head dim becomes the nearest accepted one.
    max_q_len, max_k_len : int, optional
        The longest sequences the candidate accepts; longer cases are cut to these lengths.
    gqa : bool
        False when the candidate needs kv_heads == heads.
    min_k_len : int
        Add a decode case with at least this many keys when no case has as many (a T5 family's offsets past
        ``max_distance``).

    Returns
    -------
    cases : list of KernelCase
        Distinct shapes, in the set's order.
    notes : list of str
        What the declaration kept the set from covering.
    """
    _checks.option("level", level, LEVELS)
    heads = _checks.integer("heads", heads, minimum=1)
    _checks.boolean("gqa", gqa)
    dims = None
    if head_dims is not None:
        dims = sorted({_checks.integer("head_dims", d, minimum=1) for d in head_dims})
        if not dims:
            msg = "head_dims: expected at least one head dim, got an empty sequence"
            raise ValueError(msg)
    cap_q = None if max_q_len is None else _checks.integer("max_q_len", max_q_len, minimum=1)
    cap_k = None if max_k_len is None else _checks.integer("max_k_len", max_k_len, minimum=1)
    rows = list(_SETS[level])
    if min_k_len > max(r[4] for r in rows):
        rows.append(("far_decode", 1, 1, 1, min_k_len + 65, 64, 1.0, "offsets past the family's max_distance"))
    notes: list[str] = []
    cases: list[KernelCase] = []
    seen: set[AttentionShape] = set()
    for name, b, g, sq, sk, d, scale, purpose in rows:
        group = _group(heads) if g == "g" else 1
        if g == "g" and (group == 1 or not gqa):
            notes.append(
                f"{name}: {'the candidate does not take grouped-query heads' if not gqa else f'{heads} head(s)'}"
                ", run with kv_heads == heads"
            )
            group = 1
        if dims is not None and d not in dims:
            d = min(dims, key=lambda x: (abs(x - d), x))
        cut = []
        if cap_q is not None and sq > cap_q:
            cut.append(f"q_len {sq} -> {cap_q}")
            sq = cap_q
        if cap_k is not None and sk > cap_k:
            cut.append(f"k_len {sk} -> {cap_k}")
            sk = cap_k
        shape = AttentionShape(b, heads, heads // group, sq, sk, d, scale)
        if cut:
            notes.append(f"{name}: cut to the declared maximum lengths ({', '.join(cut)})")
        if shape in seen:
            notes.append(f"{name}: the same shape as an earlier case after the declared limits, dropped")
            continue
        seen.add(shape)
        cases.append(KernelCase(name, shape, purpose))
    if heads & (heads - 1) == 0:
        notes.append(f"heads: a head count that is not a power of two is not covered (the cases use {heads})")
    return cases, notes


# ------------------------------------------------------------------------------------------------------------------
# Kernel-feature cases: ragged batches, packed sequences, paged KV caches (relpos_ref.conformance.features, .paged)
# ------------------------------------------------------------------------------------------------------------------

PAGED_LAYOUTS = ("flash", "vllm")


class PagedInputs(NamedTuple):
    """One paged case: q, k, v (B, H, S, D) contiguous (k, v padded to max_blocks pages per row: what the reference
    reads), the caches, the block table and the lengths (int64 here; handed over as int32)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    k_cache: np.ndarray
    v_cache: np.ndarray
    block_table: np.ndarray
    cache_seqlens: np.ndarray


def paged_inputs(
    shape: AttentionShape | tuple[int, ...],
    cache_seqlens: Sequence[int],
    *,
    page_block_size: int,
    layout: str = "flash",
    dtype: str = "float32",
    seed: int = 0,
) -> PagedInputs:
    """The seeded paged case of ``shape`` (k_len: pages per row times ``page_block_size``) and ``cache_seqlens``.

    The physical blocks are a seeded permutation, with three spare blocks of random data no row uses; the pages of a
    row past its length hold random data too, so a candidate that reads them or the wrong block is seen.
    """
    shape = AttentionShape(*shape)
    page = _checks.integer("page_block_size", page_block_size, minimum=1)
    _checks.option("layout", layout, PAGED_LAYOUTS)
    lens = np.asarray(cache_seqlens, dtype=np.int64)
    b, _, hkv, _, sk, d = shape[:6]
    if lens.shape != (b,) or lens.min() < 0 or lens.max() > sk or sk % page:
        msg = f"cache_seqlens: expected (B,) = ({b},) lengths in [0, {sk}] with k_len a multiple of {page}, got {lens}"
        raise ValueError(msg)
    q, k, v = attention_inputs(shape, dtype=dtype, seed=seed)
    per_row = sk // page
    rng = np.random.default_rng([seed, *[int(x) for x in shape[:6]], page, 7])
    num_blocks = b * per_row + 3
    table = rng.permutation(num_blocks)[: b * per_row].reshape(b, per_row)
    nd = numpy_dtype(dtype)
    caches = []
    for x in (k, v):
        cache = rng.standard_normal((num_blocks, page, hkv, d)).astype(nd)
        pages = np.swapaxes(x, 1, 2).reshape(b, per_row, page, hkv, d)  # (B, blocks, page, H_kv, D)
        cache[table] = pages
        caches.append(cache)
    k_cache, v_cache = caches
    if layout == "vllm":
        xw = 16 // nd.itemsize
        if d % xw:
            msg = f"head_dims: vLLM's key cache splits D into D // x with x = {xw} in {dtype}, got D = {d}"
            raise ValueError(msg)
        k_cache = np.ascontiguousarray(k_cache.reshape(num_blocks, page, hkv, d // xw, xw).transpose(0, 2, 3, 1, 4))
        v_cache = np.ascontiguousarray(v_cache.transpose(0, 2, 3, 1))
    return PagedInputs(q, k, v, k_cache, v_cache, table.astype(np.int64), lens)


def gather_pages(k_cache: np.ndarray, table: np.ndarray, layout: str) -> np.ndarray:
    """The contiguous (B, H_kv, max_blocks * page, D) keys (or values) a block table reads from a cache."""
    if layout == "vllm":
        if k_cache.ndim == 5:  # (N, H_kv, D // x, P, x) -> (N, P, H_kv, D)
            n, h, dx, p, xw = k_cache.shape
            k_cache = k_cache.transpose(0, 3, 1, 2, 4).reshape(n, p, h, dx * xw)
        else:  # (N, H_kv, D, P)
            k_cache = k_cache.transpose(0, 3, 1, 2)
    b, m = table.shape
    _, p, h, d = k_cache.shape
    return np.swapaxes(k_cache[table].reshape(b, m * p, h, d), 1, 2)


# (name, q_len, lengths as functions of the page size P, purpose); k_len is (max length // P + 1) pages.
PAGED_CASES: dict[str, tuple[tuple[str, int, Callable[[int], list[int]], str], ...]] = {
    "quick": (
        ("decode", 1, lambda p: [3 * p + 5, 1, p, p + 1], "decode, ragged: 1 key, a page, one past a page"),
        ("chunk", 17, lambda p: [max(17, p + 1), 2 * p, 3 * p + 5], "a chunk of 17 queries at ragged cache ends"),
    ),
    "default": (
        ("decode", 1, lambda p: [2067, 1, p, p + 1], "decode against ragged caches up to 2067 keys, page edges"),
        ("chunk", 17, lambda p: [max(17, p + 1), 2 * p, 2067], "a chunk of 17 queries at ragged cache ends"),
    ),
}


# (name, Sq, Sk, q_lens, k_lens, purpose) per level group: B = 4 rows of different lengths, ragged on both sides,
# with a row of length 1 and rows at (16, 32, 64, 128, 256) and one past a tile edge.
VARLEN_CASES: dict[str, tuple[tuple[Any, ...], ...]] = {
    "quick": (
        ("varlen", 33, 65, [33, 1, 16, 7], [65, 1, 32, 17], "ragged q and k, a row of length 1, rows at 16/32 edges"),
        ("varlen_decode", 1, 130, [1, 1, 1, 1], [130, 1, 16, 17], "decode against ragged caches of 1..130 keys"),
    ),
    "default": (
        ("varlen", 129, 257, [129, 1, 64, 37], [257, 1, 128, 129], "ragged q and k, length 1, rows at tile edges"),
        ("varlen_decode", 1, 2067, [1, 1, 1, 1], [2067, 1, 256, 257], "decode against ragged caches up to 2067"),
    ),
}
# (name, Sq, Sk, k segment runs per row, purpose): Sq < Sk takes the last Sq tokens (a chunk of a packed prefill).
PACKED_CASES: dict[str, tuple[tuple[Any, ...], ...]] = {
    "quick": (
        ("packed", 33, 33, [[10, 1, 22], [16, 17]], "packed sequences, a segment of one token"),
        (
            "packed_chunk",
            17,
            33,
            [[10, 14, 9], [16, 1, 16]],
            "the last 17 tokens of packed sequences, across a boundary",
        ),
    ),
    "default": (
        ("packed", 129, 129, [[60, 1, 68], [64, 65]], "packed sequences, a segment of one token, tile edges"),
        ("packed_chunk", 17, 129, [[60, 60, 9], [100, 1, 12, 16]], "the last 17 tokens, across segment boundaries"),
    ),
}
