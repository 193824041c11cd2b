"""The paged KV-cache harness (relpos_ref.conformance.paged): FlashAttention's and vLLM's cache layouts.

The correct candidates gather the pages themselves from the block table (NumPy, independent of the harness's
gather) and compute attention from the definition; the broken ones ignore the block table or misread the lengths.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import relpos_ref as rp
from relpos_ref.cases import AttentionShape, gather_pages, paged_inputs
from relpos_ref.conformance import check_paged_attention

from .test_features import FAM, dense

pytestmark = pytest.mark.conformance


def _pages(cache, layout):
    """(num_blocks, page, H_kv, D) from either layout, by the element formula of each."""
    if layout == "flash":
        return np.asarray(cache)
    if cache.ndim == 5:  # key_cache[n, h, d // x, p, d % x]
        n, h, dx, p, x = cache.shape
        out = np.empty((n, p, h, dx * x), dtype=cache.dtype)
        for d in range(dx * x):
            out[:, :, :, d] = np.swapaxes(cache[:, :, d // x, :, d % x], 1, 2)
        return out
    return np.transpose(cache, (0, 3, 1, 2))  # value_cache[n, h, d, p]


def paged_candidate(q, k_cache, v_cache, block_table, cache_seqlens, *, causal, layout="flash", mut=None):
    assert block_table.dtype == np.int32
    assert cache_seqlens.dtype == np.int32
    table = np.asarray(block_table)
    if mut == "in_order":
        table = np.arange(table.size).reshape(table.shape)
    kp, vp = _pages(k_cache, layout), _pages(v_cache, layout)
    b, m = table.shape
    k = np.stack([np.concatenate([kp[table[r, i]] for i in range(m)]) for r in range(b)]).swapaxes(1, 2)
    v = np.stack([np.concatenate([vp[table[r, i]] for i in range(m)]) for r in range(b)]).swapaxes(1, 2)
    lens = np.asarray(cache_seqlens) + {"plus1": 1, "minus1": -1}.get(mut, 0)
    out = dense(np.swapaxes(q, 1, 2), k, v, causal=causal, k_lens=np.clip(lens, 0, k.shape[2]).astype(np.int32))
    return np.swapaxes(out, 1, 2)


@pytest.mark.parametrize(
    ("layout", "page", "level"), [("flash", 16, "quick"), ("flash", 256, "default"), ("vllm", 16, "quick")]
)
def test_correct_paged_candidate_passes(layout, page, level):
    cand = functools.partial(paged_candidate, causal=True, layout=layout)
    report = check_paged_attention(cand, bias=FAM, causal=True, layout=layout, page_block_size=page, level=level)
    assert report.passed, str(report)
    assert [c.name for c in report.checks] == ["paged.output.decode", "paged.output.chunk"]
    cases = report.header["cases"]
    assert f"cache_seqlens=[{2067 if level == 'default' else 3 * page + 5}, 1, {page}, {page + 1}]" in cases
    assert "(3, 4, 2, 17," in cases
    assert f"page_block_size {page}" in report.header["paged cache"]


@pytest.mark.parametrize(
    ("mut", "text"),
    [
        ("in_order", "block table ignored"),
        ("plus1", "cache_seqlens off by +1"),
        ("minus1", "cache_seqlens off by -1"),
    ],
)
def test_paged_mutant_fails_with_its_diagnosis(mut, text):
    cand = functools.partial(paged_candidate, causal=True, mut=mut)
    report = check_paged_attention(cand, bias=FAM, causal=True, level="quick")
    assert not report.passed
    for res in report.checks:
        assert not res.passed
        assert res.diagnosis[0].startswith(text), res.text()


def test_paged_reproduction_contains_the_mismatch(capsys):
    cand = functools.partial(paged_candidate, causal=True, mut="plus1")
    res = check_paged_attention(cand, bias=FAM, causal=True, level="quick").checks[1]
    exec(res.reproduction.replace("candidate = ...", "candidate = cand  #"), {"cand": cand})
    got, want = (np.array(eval(line)) for line in capsys.readouterr().out.strip().splitlines())
    d = res.mismatch["index"][3]
    assert got[d] == pytest.approx(res.mismatch["candidate"], abs=1e-6)
    assert want[d] == pytest.approx(res.mismatch["reference"], abs=1e-12)


def test_paged_inputs_hold_the_contiguous_keys():
    shape = AttentionShape(3, 4, 2, 1, 48, 8)
    for layout in ("flash", "vllm"):
        c = paged_inputs(shape, [48, 1, 17], page_block_size=16, layout=layout, seed=3)
        assert len(np.unique(c.block_table)) == c.block_table.size
        assert c.k_cache.shape[0] == c.block_table.size + 3
        kp = _pages(c.k_cache, layout)
        for b in range(3):
            for t in (0, 15, 16, 47):
                np.testing.assert_array_equal(kp[c.block_table[b, t // 16], t % 16], c.k[b, :, t])
        np.testing.assert_array_equal(gather_pages(c.v_cache, c.block_table, layout), c.v)
    assert paged_inputs(shape, [48, 1, 17], page_block_size=16, layout="vllm").k_cache.shape == (12, 2, 2, 16, 4)


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"layout": "paged"}, ValueError, "layout"),
        ({"page_block_size": 0}, ValueError, "page_block_size"),
        ({"page_block_size": "16"}, TypeError, "page_block_size"),
        ({"bias": rp.TensorBias(np.zeros((4, 2, 2)))}, TypeError, "bias"),
        ({"layout": "vllm", "head_dims": [6]}, ValueError, "head_dims"),
        ({"window": (1, -2)}, ValueError, "window"),
        ({"softcap": -1.0}, ValueError, "softcap"),
    ],
)
def test_bad_paged_arguments(kwargs, error, text):
    with pytest.raises(error, match=text):
        check_paged_attention(paged_candidate, **{"bias": FAM, "level": "quick", **kwargs})
