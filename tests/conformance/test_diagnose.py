"""Tests of ``relpos_ref.conformance.diagnose`` and the diagnoses of the bias, attention and backward suites.

Each test runs a deliberately broken candidate modelled on a real peer's bug and asserts the diagnosis names it (and,
where another explanation used to win, that the wrong one is gone); the candidates are written here from the
formulas. Attention checks use small explicit shapes, so the hypotheses run in a fraction of a second.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import relpos_ref as rp
from relpos_ref.conformance import _repro, check_attention, check_attention_backward, check_bias
from tests.conformance.test_bias import hf_bucket

pytestmark = pytest.mark.conformance


def slopes(h: int, rule: str = "official") -> np.ndarray:
    """ALiBi slopes: Press et al.'s rule (a power of two h: 2^(-8k/h)), or the 8-head rule 2^-k."""
    if rule == "eight":
        return 2.0 ** -np.arange(1.0, h + 1)
    c = 2 ** int(math.log2(h))
    main = [2.0 ** (-8.0 * k / c) for k in range(1, c + 1)]
    return np.asarray(main + [2.0 ** (-4.0 * (2 * k - 1) / c) for k in range(1, h - c + 1)])


def alibi(m: np.ndarray, *, q_at=None, scale: float = 1.0, dtype=np.float64):
    """candidate(q_pos, k_pos) = -scale m_h |i - j|; ``q_at(q_pos)`` replaces the query positions."""

    def candidate(q_pos, k_pos):
        q = q_pos if q_at is None else q_at(q_pos)
        return (-scale * m[:, None, None] * np.abs(q[:, None] - k_pos[None, :])[None]).astype(dtype)

    return candidate


def diag(report, name: str | None = None) -> str:
    checks = [report[name]] if name else report.failures
    return " | ".join(d for c in checks for d in c.diagnosis)


# -- bias ----------------------------------------------------------------------------------------------------


def test_doubled_alibi_is_named_with_the_slope_rule_it_coincides_with():
    """transformers' Falcon eager path adds ALiBi twice; for 8 heads 2 m_h are the slopes off by one head."""
    report = check_bias(alibi(slopes(8), scale=2.0), rp.ALiBi.from_num_heads(8), q_len=8, k_len=24)
    text = diag(report, "bias.values.main")
    assert text.startswith("the bias added twice")
    assert "identical here: slopes off by one head" in text
    text = diag(check_bias(alibi(slopes(12), scale=2.0), rp.ALiBi.from_num_heads(12), q_len=8, k_len=24))
    assert "added twice" in text
    assert "off by one head" not in text


def test_ignored_query_position_is_named_not_a_sign_error():
    report = check_bias(alibi(slopes(4), q_at=np.zeros_like), rp.ALiBi.from_num_heads(4), q_len=8, k_len=24)
    assert "ignores the query position" in diag(report, "bias.monotone")
    assert "sign or slope" not in diag(report, "bias.monotone")
    assert "ignores the query position" in diag(report, "bias.values.chunk")
    assert check_bias(alibi(slopes(4)), rp.ALiBi.from_num_heads(4), q_len=8, k_len=24)["bias.monotone"].passed


def test_bottom_right_candidate_of_a_top_left_reference_is_an_alignment():
    """Under the causal mask the two differ by a per-row constant; the alignment explains every entry."""

    def bottom_right(q_pos, k_pos):  # queries placed at the last Sq keys whatever positions it is given
        return alibi(slopes(4))(k_pos[-1] - len(q_pos) + 1 + np.arange(len(q_pos)), k_pos)

    report = check_bias(bottom_right, rp.ALiBi.from_num_heads(4), q_len=8, k_len=24, align="top_left", causal=True)
    text = diag(report, "bias.values.main")
    assert "bottom-right alignment" in text
    assert "causal-only" not in text
    assert "per-row constant" not in text


@pytest.mark.parametrize(
    ("m", "phrase"),
    [
        (np.concatenate([slopes(4), np.zeros(4)]), "ALiBi on the first 4 of 8 heads only"),
        (slopes(8) * np.array([1, 1, 1, 0.5, 1, 1, 1, 1]), "head 3: 0.03125 instead of 0.0625"),
    ],
    ids=["partial-heads", "one-wrong-slope"],
)
def test_wrong_slopes_are_named(m, phrase):
    """x-transformers' alibi_num_heads / NeMo's num_attention_heads_alibi, and an arbitrary wrong slope."""
    assert phrase in diag(check_bias(alibi(m), rp.ALiBi.from_num_heads(8), q_len=8, k_len=24))


def test_eight_head_rule_for_another_head_count():
    report = check_bias(alibi(slopes(12, "eight")), rp.ALiBi.from_num_heads(12), q_len=8, k_len=24)
    assert "8-head rule" in diag(report, "bias.values.main")


def test_top_left_tril_over_a_bottom_right_block():
    """NeMo's causal KERPLE: distances of the bottom-right block zeroed by a top-left tril."""
    r1, r2 = np.array([0.5, 1.0]), np.array([0.3, 0.8])

    def nemo(q_pos, k_pos):
        dist = np.abs(q_pos[:, None] - k_pos[None, :]).astype(np.float64)
        dist = np.tril(dist)  # the tril of the (Sq, Sk) slice, not of the positions
        return -(r1[:, None, None] * np.log1p(r2[:, None, None] * dist[None]))

    report = check_bias(nemo, rp.KerpleLog(r1, r2), q_len=8, k_len=24, causal=True)
    assert "top-left tril applied to the bottom-right block" in diag(report, "bias.values.main")


def test_bfloat16_rounding_and_precision():
    """A float32 result holding bfloat16 values, and a float64 one computed in float32 (BLOOM, JAX without x64)."""
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    m, ref = slopes(8), rp.ALiBi.from_num_heads(8)

    def rounded(q_pos, k_pos):
        return alibi(m)(q_pos, k_pos).astype(bf16).astype(np.float32)

    assert "rounded to bfloat16" in diag(check_bias(rounded, ref, q_len=8, k_len=24), "bias.values.decode")
    in_float32 = alibi(slopes(12), dtype=np.float32)

    def float32_inside(q_pos, k_pos):
        return in_float32(q_pos, k_pos).astype(np.float64)

    report = check_bias(float32_inside, rp.ALiBi.from_num_heads(12), q_len=8, k_len=24)
    assert "agrees to float32 precision" in diag(report, "bias.values.main")


def test_falcon_key_only_bfloat16_under_row_shift():
    """Falcon: bfloat16 slopes times positions, key-only; equal to -m|i - j| up to a row constant only exactly."""
    bf = pytest.importorskip("ml_dtypes").bfloat16
    m = np.asarray(slopes(12), dtype=bf)

    def falcon(q_pos, k_pos):
        row = (m[:, None] * k_pos.astype(bf)[None, :]).astype(np.float32)  # bfloat16 product, float32 out
        return np.broadcast_to(row[:, None, :], (12, len(q_pos), len(k_pos)))

    report = check_bias(falcon, rp.ALiBi.from_num_heads(12), q_len=8, k_len=24, equivalence="row_shift", causal=True)
    assert "computed in bfloat16 as transformers' Falcon does" in diag(report, "bias.values.decode")


# -- attention -----------------------------------------------------------------------------------------------


def attention(bias, *, causal=True, dtype=None, lse=None, top_left=False, noise=0.0):
    """NumPy attention with ``bias(q_pos, k_pos)`` (H, Sq, Sk), bottom-right (or top-left) positions, computed in
    ``dtype`` (the inputs' by default); ``lse`` "inf" returns +inf for rows with no key (FlashAttention's)."""
    rng = np.random.default_rng(0)

    def candidate(q, k, v):
        acc = np.dtype(dtype or q.dtype).type
        nh, sq, d, sk = q.shape[1], q.shape[2], q.shape[3], k.shape[2]
        kk, vv = (np.repeat(a, nh // a.shape[1], axis=1).astype(acc) for a in (k, v))
        qp, kp = np.arange(sq) if top_left else np.arange(sk - sq, sk), np.arange(sk)
        z = q.astype(acc) @ np.swapaxes(kk, -1, -2) * acc(1 / math.sqrt(d))
        z = z + (0 if bias is None else bias(qp, kp).astype(acc))
        if causal:
            z = np.where(qp[:, None] >= kp[None, :], z, -np.inf)
        mx = z.max(-1, keepdims=True)
        empty = np.isinf(mx)
        e = np.exp(z - np.where(empty, 0, mx))
        tot = e.sum(-1, keepdims=True)
        out = (e / np.where(empty, 1, tot)) @ vv
        out = (out + noise * rng.standard_normal(out.shape)).astype(q.dtype)
        if lse is None:
            return out
        return out, np.where(empty, np.inf if lse == "inf" else -np.inf, mx + np.log(np.where(empty, 1, tot)))[..., 0]

    return candidate


SHAPES = [(1, 4, 4, 12, 40, 16), (1, 4, 4, 13, 5, 16), (1, 4, 4, 1, 40, 16)]  # q<k, q>k (empty rows), decode


def test_one_query_lists_the_conventions_it_cannot_tell_apart():
    """Without a mask one query gives the same output for a negated bias and top-left positions."""
    report = check_attention(
        attention(alibi(slopes(4), scale=-1.0), causal=False), bias=rp.ALiBi.from_num_heads(4), shapes=SHAPES[2:]
    )
    text = diag(report, "attention.output.shape0")
    assert text.startswith("with one query these")
    assert "bias negated" in text
    assert "top-left" in text


def test_flipped_causal_t5_on_decode_names_the_sign():
    table = np.random.default_rng(2).standard_normal((4, 32))
    fam = rp.T5Bias(table, bidirectional=False, layout="heads_buckets")

    def flipped(q_pos, k_pos):  # HF's relative_position handed query - key instead of key - query
        return table[:, hf_bucket(k_pos[None, :] - q_pos[:, None], bidirectional=False)]

    report = check_attention(attention(flipped), bias=fam, causal=True, shapes=[SHAPES[0], SHAPES[2]])
    for check in ("attention.output.shape0", "attention.output.shape1"):
        assert "offset sign flipped" in diag(report, check)
        assert "top-left" not in diag(report, check)


def test_lse_only_infinite_rows_get_no_invented_cause():
    report = check_attention(
        attention(None, lse="inf"), causal=True, with_lse=True, shapes=SHAPES[1:2], fully_masked="zero"
    )
    res = report["attention.fully_masked_rows"]
    assert not res.passed
    assert res.diagnosis == [
        "lse = +inf for empty rows (FlashAttention's convention); relpos_ref uses -inf, the log of an empty sum"
    ]


def test_alignment_consistency_names_top_left_only_when_it_fits():
    ref = rp.ALiBi.from_num_heads(4)
    top_left = check_attention(attention(alibi(slopes(4)), top_left=True), bias=ref, causal=True, shapes=SHAPES[:1])
    assert "places queries top-left" in diag(top_left, "attention.alignment_consistency")

    def sq_dependent(q_pos, k_pos):  # a bias that shifts with the number of queries: no alignment
        return alibi(slopes(4))(q_pos, k_pos) + 0.3 * (len(q_pos) > 8) * (k_pos % 2)

    report = check_attention(attention(sq_dependent), bias=ref, causal=True, shapes=SHAPES[:1])
    text = diag(report, "attention.alignment_consistency")
    assert "neither alignment explains them" in text
    assert "top-left" not in text
    noisy = attention(alibi(slopes(4)), noise=5e-7, dtype=np.float32)
    noisy = check_attention(noisy, bias=ref, causal=True, shapes=SHAPES[:1])
    assert noisy["attention.alignment_consistency"].passed, noisy.text()  # call-to-call noise within the rule


@pytest.mark.parametrize(
    ("bias", "phrase"),
    [
        (alibi(slopes(8), scale=2.0), "the bias added twice"),
        (alibi(np.concatenate([slopes(4), np.zeros(4)])), "ALiBi on the first 4 of 8 heads only"),
    ],
    ids=["doubled", "partial-heads"],
)
def test_attention_names_bias_conventions(bias, phrase):
    report = check_attention(
        attention(bias), bias=rp.ALiBi.from_num_heads(8), causal=True, shapes=[(1, 8, 8, 12, 40, 16)]
    )
    assert phrase in diag(report, "attention.output.shape0")


def test_attention_bias_rounded_to_bfloat16():
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    m = slopes(12)

    def rounded(q_pos, k_pos):
        return alibi(m)(q_pos, k_pos).astype(bf16).astype(np.float64)

    report = check_attention(
        attention(rounded), bias=rp.ALiBi.from_num_heads(12), causal=True, shapes=[(1, 12, 12, 12, 300, 16)]
    )
    assert "rounded to bfloat16" in diag(report, "attention.output.shape0")


@pytest.mark.parametrize(
    ("dtype", "inside", "phrase"), [("float64", np.float32, "float32"), ("float32", np.float16, "float16")]
)
def test_attention_precision_hypothesis(dtype, inside, phrase):
    """BLOOM, x-transformers' Attend and JAX without x64 compute float64 inputs in float32."""
    report = check_attention(
        attention(alibi(slopes(4)), dtype=inside),
        bias=rp.ALiBi.from_num_heads(4),
        causal=True,
        dtype=dtype,
        shapes=SHAPES[:1],
    )
    assert f"agrees to {phrase} precision" in diag(report, "attention.output.shape0")


def test_precision_hypothesis_needs_errors_of_the_lower_dtype():
    """Errors a little beyond the own dtype's bound, far below a lower dtype's rounding, name no lower precision."""
    report = check_attention(
        attention(alibi(slopes(4)), noise=1e-11),
        bias=rp.ALiBi.from_num_heads(4),
        causal=True,
        dtype="float64",
        shapes=SHAPES[:1],
    )
    assert not report["attention.output.shape0"].passed
    assert "precision" not in diag(report, "attention.output.shape0")

    def off(q_pos, k_pos):
        return alibi(slopes(8))(q_pos, k_pos).astype(np.float32) * np.float32(1 + 3e-5)

    report = check_bias(off, rp.ALiBi.from_num_heads(8), q_len=8, k_len=24)
    assert not report.passed
    assert "precision" not in diag(report)


# -- backward ------------------------------------------------------------------------------------------------


def backward(m: np.ndarray, *, mask: str = "-inf", dtype=None):
    """Materialised causal ALiBi attention and its backward, bottom-right; ``mask``: "-inf", or a finite mask value
    "additive" (added to the logits) or "masked_fill"; computed in ``dtype`` (the inputs' by default)."""

    def candidate(q, k, v, d_out):
        acc = np.dtype(dtype or q.dtype).type
        q, k, v, do = (a.astype(acc) for a in (q, k, v, d_out))
        sq, d, sk = q.shape[2], q.shape[3], k.shape[2]
        dist = np.abs(np.arange(sk - sq, sk)[:, None] - np.arange(sk)[None, :])
        future = (np.arange(sk - sq, sk)[:, None] - np.arange(sk)[None, :]) < 0
        tau = acc(1 / math.sqrt(d))
        z = q @ np.swapaxes(k, -1, -2) * tau - (m[:, None, None] * dist[None]).astype(acc)
        low = np.finfo(acc).min if mask != "-inf" else -np.inf
        z = z + np.where(future, low, 0).astype(acc) if mask == "additive" else np.where(future, low, z)
        mx = z.max(-1, keepdims=True)
        e = np.exp(z - np.where(np.isinf(mx), 0, mx))
        tot = e.sum(-1, keepdims=True)
        p = e / np.where(tot == 0, 1, tot)
        dp = do @ np.swapaxes(v, -1, -2)
        dz = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
        if mask == "masked_fill":
            dz = np.where(future, 0, dz)
        grads = {"dq": dz @ k * tau, "dk": np.swapaxes(dz, -1, -2) @ q * tau, "dv": np.swapaxes(p, -1, -2) @ do}
        grads["slopes"] = -np.sum(dz * dist, axis=(0, 2, 3))
        return {n: g.astype(d_out.dtype) for n, g in grads.items()}

    return candidate


@pytest.mark.parametrize(
    ("mask", "check", "phrase"), [("additive", "dk", "added to the logits"), ("masked_fill", "dv", "masked_fill")]
)
def test_backward_finite_mask(mask, check, phrase):
    ref = rp.ALiBi.from_num_heads(4)
    report = check_attention_backward(
        backward(slopes(4), mask=mask), bias=ref, causal=True, dtype="float64", shapes=SHAPES[1:2]
    )
    text = diag(report, f"backward.{check}.shape0")
    assert "a finite mask value" in text
    assert phrase in text
    assert check_attention_backward(
        backward(slopes(4)), bias=ref, causal=True, dtype="float64", shapes=SHAPES[1:2]
    ).passed


def test_backward_precision_hypothesis():
    report = check_attention_backward(
        backward(slopes(4), dtype=np.float32),
        bias=rp.ALiBi.from_num_heads(4),
        causal=True,
        dtype="float64",
        shapes=SHAPES[:1],
    )
    assert "agrees to float32 precision" in diag(report, "backward.dq.shape0")


# -- reproductions -------------------------------------------------------------------------------------------


def test_bucket_snippet_contains_the_reported_offset():
    snippet = _repro.bucket_snippet(None, "m:f", np.arange(-500, -460), {"bidirectional": True}, first=200)
    assert "200" in snippet.split("delta = ")[1].splitlines()[0]
