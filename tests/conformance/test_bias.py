"""Tests of ``relpos_ref.conformance.bias``: the elementwise bias rule, the kernel-scale default positions and the
per-call timeout.

Candidates are written here from the formulas, never from the family they are checked against; low-precision ones
round every operation to the dtype (``arith``), as a kernel computing in that dtype does, or compute in float32 and
round once (``once``). Their parameters are held in the candidate's dtype and the reference is built from those
values, as a user of the harness builds it from the candidate's own parameters.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

import relpos_ref as rp
from relpos_ref.conformance import bias_checks, check_bias
from relpos_ref.families import example_family
from relpos_ref.tolerances import BIAS_TOLERANCES

ml_dtypes = pytest.importorskip("ml_dtypes")
pytestmark = pytest.mark.conformance

FORMATS = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
FAMILIES = ["alibi", "t5", "offset", "kerple_power", "kerple_log", "fire", "sandwich"]


def rounder(dtype: str):
    """x rounded to ``dtype`` and widened back to float64 (overflow gives infinities)."""
    fmt = FORMATS[dtype]

    def r(x):
        with np.errstate(over="ignore"):
            return np.asarray(x, dtype=np.float64).astype(fmt).astype(np.float64)

    return r


def hf_bucket(delta, *, bidirectional, num_buckets=32, max_distance=128):
    """T5 buckets as HF computes them (float32 log of memory - query, truncation)."""
    rel, nb, out = -delta, num_buckets, np.zeros(delta.shape, dtype=np.int64)
    if bidirectional:
        nb //= 2
        out += (rel > 0) * nb
        n = np.abs(rel)
    else:
        n = -np.minimum(rel, 0)
    exact = nb // 2
    ratio = np.log(np.maximum(n, 1).astype(np.float32) / np.float32(exact)) / np.float32(math.log(max_distance / exact))
    large = np.minimum(exact + (ratio * np.float32(nb - exact)).astype(np.int64), nb - 1)
    return out + np.where(n < exact, n, large)


def low_precision(name: str, params: dict, opts: dict, dtype: str, *, once: bool):
    """``candidate(q_pos, k_pos)`` for family ``name``: every operation rounded to ``dtype``, or with ``once`` computed
    in float32 and rounded at the end; the result in ``dtype``."""
    r, out = rounder("float32" if once else dtype), rounder(dtype)
    p = {n: np.asarray(v, dtype=np.float64) for n, v in params.items()}

    def candidate(q_pos, k_pos):
        delta = q_pos[:, None] - k_pos[None, :]
        dist = r(np.abs(delta))
        if name == "alibi":
            b = -(p["slopes"][:, None, None] * dist[None])
        elif name == "kerple_power":  # power and product in float32 registers: a float16 power overflows past 256^2
            b = -rounder("float32")(p["r1"][:, None, None] * rounder("float32")(dist[None] ** p["r2"][:, None, None]))
        elif name == "kerple_log":
            b = -(p["r1"][:, None, None] * r(np.log1p(r(p["r2"][:, None, None] * dist[None]))))
        elif name == "fire":
            norm = r(np.log1p(r(p["c"] * r(np.maximum(q_pos.astype(np.float64), p["L"])))))
            x = r(r(np.log1p(r(p["c"] * dist))) / norm[:, None])
            b = np.broadcast_to(p["b2"][:, None, None], (len(p["b2"]), *x.shape))
            for w in range(p["w1"].shape[0]):
                hidden = r(np.maximum(r(r(p["w1"][w, 0] * x) + p["b1"][w]), 0.0))
                b = r(b + r(p["w2"][:, w, None, None] * hidden[None]))
        elif name == "sandwich":  # NeMo's form: sum of cosines minus d/2
            d, h = opts["head_dim"], opts["num_heads"]
            total = np.zeros(dist.shape)
            for k in range(1, d // 2 + 1):
                total = r(total + r(np.cos(r(dist * r(10000.0 ** (-2.0 * k / d))))))
            b = r(total - d / 2)[None] / r(8.0 * np.arange(1, h + 1) / h)[:, None, None]
        elif name == "t5":
            b = p["table"][:, hf_bucket(delta, **opts)]
        else:  # offset: the table entry of the clipped offset
            k = (p["table"].shape[1] - 1) // 2
            b = p["table"][:, np.clip(delta, -k, k) + k]
        return out(r(b)).astype(FORMATS[dtype])

    return candidate


def held_in(name: str, dtype: str, heads: int = 8):
    """(parameters rounded to ``dtype``, options, reference family built from them)."""
    fam = example_family(name, heads)
    params = {n: rounder(dtype)(v) for n, v in fam.parameters().items()}
    return params, fam.options(), (type(fam)(**params, **fam.options()) if params else fam)


CASES = [(n, dt, once) for n in FAMILIES for dt in FORMATS for once in ((False,) if dt == "float32" else (False, True))]
IDS = [f"{n}-{d}-{'once' if o else 'arith'}" for n, d, o in CASES]


@pytest.mark.parametrize(("name", "dtype", "once"), CASES, ids=IDS)
def test_correct_low_precision_biases_pass(name, dtype, once):
    params, opts, ref = held_in(name, dtype)
    cand_opts = opts if name != "t5" else {"bidirectional": opts["bidirectional"], "max_distance": opts["max_distance"]}
    report = check_bias(low_precision(name, params, cand_opts, dtype, once=once), ref, q_len=8, k_len=24)
    assert report.passed, report.text()
    assert report.header["candidate dtype"] == dtype


def vllm_alibi(heads: int):
    """vLLM's make_alibi_bias in bfloat16: positions from arange(S, dtype=bfloat16), then (j - i) * slope."""
    r = rounder("bfloat16")
    slopes = np.asarray([2.0 ** (-8.0 * h / heads) for h in range(1, heads + 1)])

    def candidate(q_pos, k_pos):
        signed = r(r(k_pos)[None, :] - r(q_pos)[:, None])
        return r(slopes[:, None, None] * signed[None]).astype(ml_dtypes.bfloat16)

    return candidate


def test_bfloat16_positions_fail_elementwise_where_the_normwise_rule_passed():
    """Off by 2 logits next to the diagonal at S = 1024 and by 7.5 at S = 4096, which t x max|ref| accepted."""
    ref, t = rp.ALiBi.from_num_heads(8), BIAS_TOLERANCES["bfloat16"]
    report = check_bias(vllm_alibi(8), ref, q_len=64, k_len=1024, causal=True)
    main = report["bias.values.main"]
    assert main.status == "failed"
    q, k = np.arange(960, 1024), np.arange(1024)
    want = -(np.asarray([2.0**-h for h in range(1, 9)])[:, None, None] * np.abs(q[:, None] - k[None, :]))
    err = np.where(q[:, None] >= k[None, :], np.abs(vllm_alibi(8)(q, k).astype(np.float64) - want), 0.0)
    assert err.max() == pytest.approx(main.max_abs)
    assert err.max() >= 1.5
    assert err.max() <= t * np.abs(want).max()  # the normwise rule's bound: this bug passed it
    assert "positions rounded to bfloat16" in " ".join(main.diagnosis)
    decode = check_bias(vllm_alibi(8), ref, q_len=8, k_len=24, causal=True)["bias.values.decode"]  # S = 4099
    assert decode.status == "failed"
    assert decode.max_abs >= 6.0


def test_elementwise_rule_rejects_an_error_small_against_the_largest_entry():
    slopes = np.asarray([2.0**-h for h in range(1, 9)])

    def off_near_the_diagonal(q_pos, k_pos):
        b = -(slopes[:, None, None] * np.abs(q_pos[:, None] - k_pos[None, :])[None]).astype(np.float32)
        b[0][np.abs(q_pos[:, None] - k_pos[None, :]) == 1] += 1e-4  # 20 t at |b| = 0.5, 0.01 t max|b| at S = 4099
        return b

    report = check_bias(off_near_the_diagonal, rp.ALiBi.from_num_heads(8), q_len=8, k_len=24)
    assert report["bias.values.decode"].status == "failed"
    assert report["bias.values.decode"].max_abs == pytest.approx(1e-4, rel=1e-2)
    assert "|cand - ref| <= 5.0e-06 * max(1, m)" in report["bias.values.decode"].tolerance


def test_magnitudes_of_sums_are_the_sums_of_their_absolute_terms():
    q, k = np.arange(40, 43), np.arange(45)
    d = np.abs(q[:, None] - k[None, :]).astype(np.float64)
    sw = rp.Sandwich(4, 8)
    omega = 10000.0 ** (-2.0 * np.arange(1, 5) / 8)
    terms = sum(np.abs(np.cos(d * w)) + d * w for w in omega) + 4.0
    want = terms[None] / (2.0 * np.arange(1, 5))[:, None, None]
    np.testing.assert_allclose(sw.bias_magnitude(q, k), want, rtol=1e-12)
    assert np.all(sw.bias_magnitude(q, k) >= np.abs(sw.bias(q, k)))
    w1, b1, w2, b2 = np.array([[2.0], [-1.0]]), np.array([0.5, 3.0]), np.array([[1.0, -2.0]]), np.array([0.25])
    fire = rp.FIRE(w1, b1, w2, b2, c=0.1, L=8.0)
    x = np.log1p(0.1 * d) / np.log1p(0.1 * np.maximum(q, 8.0))[:, None]
    want = 0.25 + 1.0 * (np.abs(2.0 * x) + 0.5) + 2.0 * (np.abs(-x) + 3.0)
    np.testing.assert_allclose(fire.bias_magnitude(q, k)[0], want, rtol=1e-12)
    alibi = rp.ALiBi.from_num_heads(4)
    np.testing.assert_array_equal(alibi.bias_magnitude(q, k), np.abs(alibi.bias(q, k)))


def test_float16_overflow_to_infinity_is_the_correct_rounding():
    """-r1 |i - j|^r2 past 65504 is -inf in float16; a candidate that returns it is right."""
    ref = rp.KerplePower(np.ones(2), np.full(2, 2.0))

    def power16(q_pos, k_pos):
        d = np.abs(q_pos[:, None] - k_pos[None, :]).astype(np.float32)
        with np.errstate(over="ignore"):
            return np.broadcast_to(-(d**2), (2, *d.shape)).astype(np.float16)

    report = check_bias(power16, ref, q_len=8, k_len=24)
    assert report.passed, report.text()
    assert report["bias.values.decode"].max_abs == 0.0 or np.isfinite(report["bias.values.decode"].max_abs)


def test_default_positions_reach_kernel_scale():
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    table = np.random.default_rng(0).standard_normal((2, 32))

    def t5(q_pos, k_pos):
        seen.append((q_pos.copy(), k_pos.copy()))
        return table[:, hf_bucket(q_pos[:, None] - k_pos[None, :], bidirectional=True, max_distance=1200)]

    ref = rp.T5Bias(table, bidirectional=True, max_distance=1200, layout="heads_buckets")
    report = check_bias(t5, ref, q_len=4, k_len=9)
    assert report.passed, report.text()
    assert max(int(k.max()) for _, k in seen) >= 4098  # a decode row of 4099 keys
    offsets = [np.abs(q[:, None] - k[None, :]).max() for q, k in seen]
    assert max(offsets) > 2 * 1200  # past float16's exact integers and twice max_distance
    chunk = report["bias.values.chunk"].summary
    assert "queries at 2050..2066" in chunk


def test_timeout_per_call():
    def slow(q_pos, k_pos):
        time.sleep(1.0)
        return np.zeros((4, len(q_pos), len(k_pos)))

    start = time.perf_counter()
    report = check_bias(slow, rp.ALiBi.from_num_heads(4), q_len=3, k_len=4, timeout=0.2)
    assert time.perf_counter() - start < 0.9
    assert not report.passed
    assert all(c.status == "error" for c in report.checks)
    assert "timed out" in report.checks[0].summary
    with pytest.raises(ValueError, match="timeout"):
        bias_checks(slow, rp.ALiBi.from_num_heads(4), q_len=3, k_len=4, timeout=0)


def _key_only(num_heads):
    """BLOOM's key-only ALiBi m_h * j in float32, slopes from Press et al.'s rule: 2^-h for 8 heads; for 12, those
    and every other slope of the 16-head rule, 2^(-(2k - 1)/2) for k = 1..4."""
    m = 2.0 ** -np.arange(1.0, 9.0)
    if num_heads == 12:
        m = np.concatenate([m, 2.0 ** (-(2 * np.arange(1.0, 5.0) - 1) / 2)])
    assert len(m) == num_heads

    def cand(q_pos, k_pos):
        out = (m[:, None] * np.asarray(k_pos, dtype=np.float64)[None, :]).astype(np.float32)
        return np.broadcast_to(out[:, None, :], (num_heads, len(q_pos), len(k_pos)))

    return cand


def test_exact_key_only_alibi_is_not_blamed_on_bfloat16():
    # With 8 heads the slopes are powers of two and m*j is exact in bfloat16 for short positions: the Falcon
    # bfloat16 hypothesis then predicts the plain key-only form, and must not be the explanation given for it.
    report = check_bias(_key_only(8), rp.ALiBi.from_num_heads(8), q_len=8, k_len=24)
    text = report["bias.values.main"].diagnosis[-1]
    assert text.startswith("causal-only form"), text
    assert "bfloat16" not in " ".join(d for c in report.failures for d in c.diagnosis)


def test_structural_difference_is_not_called_a_lower_precision():
    report = check_bias(_key_only(12), rp.ALiBi.from_num_heads(12), q_len=8, k_len=24, equivalence="row_shift")
    texts = " ".join(d for c in report.failures for d in c.diagnosis)
    assert "causal-only form" in texts
    assert "precision" not in texts
