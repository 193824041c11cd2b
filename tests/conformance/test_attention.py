"""relpos_ref.conformance.attention: kernel-shaped defaults, the candidate's declaration (layout, head dims, lengths,
GQA) and the float32/float64 tolerance that does not rest on the host's BLAS."""

import math

import numpy as np
import pytest

import relpos_ref as rp
from relpos_ref.conformance import check_attention
from relpos_ref.conformance.tolerance import _sequential_matmul

FAM = rp.ALiBi.from_num_heads(6)


def reference(q, k, v, *, bias=FAM, causal=True, **kw):
    """A correct candidate: relpos_ref itself in float64, returned in the input dtype."""
    dt = q.dtype
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    return np.asarray(rp.attention(q, k, v, bias=bias, causal=causal, **kw)).astype(dt)


def fa_style(q, k, v):
    """FlashAttention's attention_ref, in NumPy: (B, S, H, D), computed in float32, q divided by sqrt(d) before the
    product (np.einsum, not BLAS), -inf mask, the bias added after the mask."""
    dt = q.dtype
    q, k, v = (a.astype(np.float32) for a in (q, k, v))
    _b, sq, h, d = q.shape
    sk, g = k.shape[1], h // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q / np.float32(math.sqrt(d)), k)
    qp, kp = rp.positions(sq, sk)
    s = np.where(np.asarray(rp.causal_mask(qp, kp)), s, -np.inf)
    s = s + np.asarray(FAM.bias(qp, kp), dtype=np.float32)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(s - m)
    tot = np.sum(e, axis=-1, keepdims=True)
    p = np.where(tot > 0, e / np.where(tot > 0, tot, 1), 0)
    return np.einsum("bhts,bshd->bthd", p, v).astype(dt)


def test_defaults_are_kernel_shaped_and_reported():
    r = check_attention(reference, bias=FAM, causal=True, level="quick")
    assert r.passed, r
    assert "level quick" in r.header["cases"]
    assert "(1, 6, 2, 17, 33, 16, 1.0)" in r.header["cases"]
    names = {c.name for c in r.checks}
    assert {"attention.output.decode", "attention.output.gqa", "attention.output.q>k"} <= names


def test_flashattention_reference_style_passes_in_its_own_layout():
    r = check_attention(fa_style, bias=FAM, causal=True, layout="bshd")
    assert r.passed, r
    assert "layout bshd" in r.header["cases"]


def test_wrong_layout_is_caught():
    # an output returned (B, H, S, D) by a (B, S, H, D) kernel: an error naming the layout
    def transposed_out(q, k, v):
        return np.swapaxes(fa_style(q, k, v), 1, 2)

    r = check_attention(transposed_out, bias=FAM, causal=True, layout="bshd", level="quick")
    out = r["attention.output.square"]
    assert out.status == "error", out.summary
    assert "layout='bshd'" in out.summary, out.summary
    # a (B, H, S, D) kernel declared as (B, S, H, D): it attends over the wrong axes and fails
    r = check_attention(lambda q, k, v: reference(q, k, v, bias=None, causal=False), layout="bshd", level="quick")
    assert r["attention.output.q<k"].status in ("failed", "error")
    assert not r.passed


def test_declared_head_dims_and_lengths_are_honoured():
    def only_64_decode(q, k, v):
        if q.shape[-1] != 64 or q.shape[2] != 1:
            raise ValueError(f"unsupported shape {q.shape}")
        return reference(q, k, v)

    undeclared = check_attention(only_64_decode, bias=FAM, causal=True, level="quick")
    assert not undeclared.passed
    declared = check_attention(only_64_decode, bias=FAM, causal=True, head_dims=(64,), max_q_len=1)
    assert declared.passed, declared
    assert any("max" in n or "cut" in n for n in declared.notes)


def test_gqa_false_keeps_kv_heads():
    seen = []

    def cand(q, k, v):
        seen.append((q.shape[1], k.shape[1]))
        return reference(q, k, v)

    assert check_attention(cand, bias=FAM, causal=True, level="quick", gqa=False).passed
    assert all(h == hkv for h, hkv in seen)


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"layout": "bsdh"}, ValueError, "layout"),
        ({"level": "full"}, ValueError, "level"),
        ({"head_dims": 64}, TypeError, "head_dims"),
        ({"max_k_len": 0}, ValueError, "max_k_len"),
        ({"gqa": "yes"}, TypeError, "gqa"),
        ({"timeout": -1.0}, ValueError, "timeout"),
    ],
)
def test_bad_declaration(kwargs, error, text):
    with pytest.raises(error, match=text):
        check_attention(reference, bias=FAM, **kwargs)


# -- the tolerance --------------------------------------------------------------------------------------------------


def test_sequential_matmul_is_term_by_term_float32():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 17)).astype(np.float32)
    b = rng.standard_normal((2, 17, 4)).astype(np.float32)
    got = _sequential_matmul(a, b)
    want = np.zeros((2, 3, 4), dtype=np.float32)
    for i in np.ndindex(2, 3, 4):
        acc = np.float32(0)
        for n in range(17):
            acc = np.float32(acc + np.float32(a[i[0], i[1], n] * b[i[0], n, i[2]]))
        want[i] = acc
    np.testing.assert_array_equal(got, want)


def lowered(dtype):
    """A candidate whose logits go through ``dtype`` (a kernel keeping its scores in a lower precision)."""

    def cand(q, k, v):
        out = reference(q.astype(dtype).astype(np.float64), k.astype(dtype).astype(np.float64), v)
        return out.astype(q.dtype)

    return cand


def test_lower_precision_inside_is_caught():
    assert not check_attention(lowered(np.float16), bias=FAM, causal=True, level="quick").passed
    # float64 inputs computed in float32 (JAX without x64, BLOOM's softmax): caught at float64
    r = check_attention(lowered(np.float32), bias=FAM, causal=True, dtype="float64", level="quick")
    assert not r.passed
    assert check_attention(reference, bias=FAM, causal=True, dtype="float64", level="quick").passed


def doubled_slopes_bshd(q, k, v):
    """A (B, S, H, D) kernel whose slopes are twice the reference's."""
    q, k, v = (np.swapaxes(x.astype(np.float64), 1, 2) for x in (q, k, v))
    wrong = rp.ALiBi(2 * np.asarray(FAM.parameters()["slopes"]))
    out = np.asarray(rp.attention(q, k, v, bias=wrong, causal=True))
    return np.ascontiguousarray(np.swapaxes(out, 1, 2)).astype(np.float32)


def test_reproduction_speaks_the_layout(capsys):
    r = check_attention(doubled_slopes_bshd, bias=FAM, causal=True, layout="bshd", level="quick")
    res = r["attention.output.q<k"]
    assert res.status == "failed"
    snippet = res.reproduction.replace("candidate = ...", "candidate = doubled_slopes_bshd  #")
    assert "layout='bshd'" in snippet
    exec(snippet, {"doubled_slopes_bshd": doubled_slopes_bshd})
    got, want = (np.array(eval(line)) for line in capsys.readouterr().out.splitlines()[:2])
    i = res.mismatch["index"]
    assert got.shape == want.shape
    assert abs(got[i[3]] - want[i[3]]) > 1e-3


def test_repeatable_allows_accurate_nondeterminism_unless_deterministic():
    # An atomic-add kernel: each call rounds its float32 output differently, by about an ulp.
    rng = np.random.default_rng(5)

    def jittery(q, k, v):
        out = reference(q, k, v)
        return (out * (1 + np.float32(2.0**-23) * rng.choice([-1, 0, 1], size=out.shape))).astype(out.dtype)

    r = check_attention(jittery, bias=FAM, causal=True, level="quick")
    assert r.passed, r
    assert "not bitwise deterministic" in " ".join(r["attention.repeatable"].details)
    strict = check_attention(jittery, bias=FAM, causal=True, level="quick", deterministic=True)
    assert strict["attention.repeatable"].status == "failed"
    assert not strict.passed


def test_repeatable_catches_a_second_call_that_is_wrong():
    calls = []

    def stale_after_first(q, k, v):  # a cache keyed on the wrong thing: right the first time only
        calls.append(1)
        out = reference(q, k, v)
        return out if len(calls) % 2 else (out * np.float32(1.01)).astype(out.dtype)

    r = check_attention(stale_after_first, bias=FAM, causal=True, shapes=[(1, 6, 6, 17, 33, 16)])
    assert r["attention.repeatable"].status == "failed"
    assert "a call is not" in " ".join(r["attention.repeatable"].details)


def test_repeatable_catches_inputs_modified_in_place():
    def scales_q(q, k, v):
        out = reference(q, k, v)
        q *= 2
        return out

    r = check_attention(scales_q, bias=FAM, causal=True, shapes=[(1, 6, 6, 17, 33, 16)])
    assert r["attention.repeatable"].status == "failed"
    assert "in place" in r["attention.repeatable"].diagnosis[-1]
