"""Tests of relpos_ref.effective_bias: the one-hot probes, the readout, the row-shift-aware comparison and its
findings, the bounded plan, the summary and the picture.

Expected probabilities are written here with a plain NumPy softmax of a known bias (float64, rounded to the dtype
under test where a dtype matters); the deliberately wrong "candidates" perturb those probabilities, so every finding is
shown to fire on a broken input and to stay silent on a correct one.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from relpos_ref.cases import AttentionShape
from relpos_ref.effective_bias import (
    MAX_PROBE_CALLS,
    READABLE_RATIO,
    SMALLEST_NORMAL,
    UNIT_ROUNDOFF,
    EffectiveBiasResult,
    compare_bias,
    effective_bias,
    plan_readout,
    plot_effective_bias,
    probe_count,
    probe_keys,
    probe_snippet,
    probe_values,
    read_probabilities,
    readout_summary,
    reference_bias,
    row_sum_faults,
    save_plot,
)
from relpos_ref.families import ALiBi
from relpos_ref.tolerances import BIAS_TOLERANCES


def softmax(bias: np.ndarray) -> np.ndarray:
    """Row softmax in float64, -inf entries giving exactly 0 (rows of -inf give 0)."""
    top = np.max(bias, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.exp(bias - top)
    tot = e.sum(axis=-1, keepdims=True)
    return e / np.where(tot > 0, tot, 1.0)


def bias_candidate(bias: np.ndarray, seen: list | None = None):
    """call(q, k, v) = softmax(q k^T / sqrt(D) + bias) @ v in float64, the bias (H, Sq, Sk) fixed."""

    def call(q, k, v):
        if seen is not None:
            seen.append((q.copy(), k.copy(), v.copy()))
        q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
        g = q.shape[1] // k.shape[1]
        k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
        z = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1]) + bias[None]
        return softmax(z) @ v

    return call


def alibi_bias(slopes, q_pos, k_pos, *, causal=True):
    b = -np.asarray(slopes)[:, None, None] * np.abs(q_pos[:, None] - k_pos[None, :]).astype(np.float64)[None]
    return np.where(k_pos[None, None, :] <= q_pos[None, :, None], b, -np.inf) if causal else b


def positions_br(sq, sk):
    return np.arange(sk - sq, sk), np.arange(sk)


SLOPES8 = 2.0 ** (-np.arange(1, 9, dtype=np.float64))


# -- probes -----------------------------------------------------------------------------------------------------


def test_probe_values_are_one_hot_and_cover_every_key_once():
    sh = AttentionShape(2, 4, 2, 3, 10, 4)
    assert probe_count(sh) == 3
    total = np.zeros((2, 2, 10, 4))
    for p in range(3):
        v = probe_values(sh, p, dtype="float32")
        assert v.shape == (2, 2, 10, 4)
        assert v.dtype == np.float32
        j, c = np.meshgrid(np.arange(10), np.arange(4), indexing="ij")
        np.testing.assert_array_equal(v, np.broadcast_to((j == p * 4 + c).astype(np.float32), v.shape))
        total += v
    # each key is read once, by one output column; the last probe's columns 2, 3 read nothing
    np.testing.assert_array_equal(total.sum(axis=-1), np.ones((2, 2, 10)))
    np.testing.assert_array_equal(probe_keys(sh, [2]), [8, 9])
    np.testing.assert_array_equal(probe_keys(sh), np.arange(10))


def test_probe_values_bfloat16():
    v = probe_values((1, 1, 1, 1, 5, 2), 2, dtype="bfloat16")
    assert "bfloat16" in str(v.dtype)
    np.testing.assert_array_equal(v.astype(np.float64)[0, 0], [[0, 0], [0, 0], [0, 0], [0, 0], [1, 0]])


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda: probe_values((1, 1, 1, 1, 5, 2), 3, dtype="float32"), ValueError, "block"),
        (lambda: probe_values((1, 1, 1, 1, 5, 2), 1.0, dtype="float32"), TypeError, "block"),
        (lambda: probe_values((1, 1, 1, 1, 5, 2), 0, dtype="int8"), ValueError, "dtype"),
        (lambda: probe_values((1, 1, 1, 1, 5), 0, dtype="float32"), TypeError, "shape"),
        (lambda: probe_values((1, 3, 2, 1, 5, 2), 0, dtype="float32"), ValueError, "kv_heads"),
        (lambda: probe_keys((1, 1, 1, 1, 5, 2), [0, 7]), ValueError, "blocks"),
        (lambda: read_probabilities(3, (1, 1, 1, 1, 5, 2), dtype="float32"), TypeError, "call"),
        (lambda: effective_bias(np.array(["a"])), TypeError, "probs"),
        (lambda: plan_readout({}), TypeError, "shapes"),
        (lambda: plan_readout({"a": (1, 1, 1, 1, 5, 2)}, max_calls=0), ValueError, "max_calls"),
    ],
)
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error, match=words):
        call()


# -- the readout ------------------------------------------------------------------------------------------------


def test_read_probabilities_recovers_the_softmax_of_the_bias():
    sh = AttentionShape(2, 4, 2, 3, 11, 4)  # GQA, a partial last block
    q_pos, k_pos = positions_br(3, 11)
    bias = np.random.default_rng(1).standard_normal((4, 3, 11))
    seen: list = []
    probs = read_probabilities(bias_candidate(bias, seen), sh, dtype="float64", seed=3)
    want = np.broadcast_to(softmax(bias)[None], (2, 4, 3, 11))
    np.testing.assert_allclose(probs, want, rtol=1e-14, atol=1e-300)
    assert len(seen) == probe_count(sh) == 3
    for q, k, v in seen:  # q = 0 in the (B, H, S, D) layout, k the seeded inputs' k, v a probe
        assert q.shape == (2, 4, 3, 4)
        assert not q.any()
        assert k.shape == (2, 2, 11, 4)
        assert v.shape == (2, 2, 11, 4)
    assert q_pos.shape == (3,)
    assert k_pos.shape == (11,)


def test_read_probabilities_subset_leaves_unread_keys_nan():
    sh = AttentionShape(1, 2, 2, 2, 12, 4)
    bias = np.random.default_rng(2).standard_normal((2, 2, 12))
    probs = read_probabilities(bias_candidate(bias), sh, dtype="float64", blocks=[0, 2])
    read = probe_keys(sh, [0, 2])
    np.testing.assert_array_equal(read, [0, 1, 2, 3, 8, 9, 10, 11])
    np.testing.assert_allclose(probs[..., read], softmax(bias)[None][..., read], rtol=1e-14)
    assert np.isnan(probs[..., 4:8]).all()


def test_read_probabilities_rejects_a_wrong_output_shape():
    with pytest.raises(ValueError, match="call: expected an output of shape"):
        read_probabilities(lambda q, k, v: np.zeros((1, 1, 1, 3)), (1, 1, 1, 1, 4, 2), dtype="float32")


def test_effective_bias_centres_each_row_at_its_most_probable_key():
    p = np.array([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.7, -0.1]])
    before = p.copy()
    e = effective_bias(p)
    np.testing.assert_allclose(e[0, :3], [0.0, math.log(0.5), math.log(0.5)], rtol=1e-15)
    assert e[0, 3] == -np.inf
    np.testing.assert_allclose(e[1, :3], np.log([0.1 / 0.7, 0.2 / 0.7, 1.0]), rtol=1e-15)
    assert np.isnan(e[1, 3])
    np.testing.assert_array_equal(p, before)


# -- the comparison ---------------------------------------------------------------------------------------------


def _compare(p, bias, q_pos, k_pos, dtype="float32", **kw) -> EffectiveBiasResult:
    return compare_bias(p, bias, q_pos, k_pos, dtype=dtype, **kw)


def _case(sq=5, sk=300, slopes=SLOPES8[:4]):
    q_pos, k_pos = positions_br(sq, sk)
    bias = alibi_bias(slopes, q_pos, k_pos)
    return q_pos, k_pos, bias


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_correct_probabilities_pass_with_any_row_constant(dtype):
    q_pos, k_pos, bias = _case()
    shift = np.array([0.0, 3.0, -7.5, 12.0, 0.25])[None, :, None]
    p = np.asarray(softmax(bias + shift)[None], dtype=np.float64)  # a per-row constant changes nothing
    from relpos_ref._host import round_to

    r = _compare(round_to(p, dtype), bias, q_pos, k_pos, dtype=dtype)
    assert r.passed, r.text()
    assert r.counts["readable"] > 0
    assert r.worst_ratio <= 1.0
    assert r.counts["masked"] == 4 * (4 + 3 + 2 + 1)  # keys after each of the last 5 queries but the last


def test_bound_is_elementwise_and_not_vacuous():
    q_pos, k_pos, bias = _case()
    p = softmax(bias)[None].copy()
    b, h, i, j = 0, 2, 3, 250
    t = BIAS_TOLERANCES["float32"] * max(1.0, abs(bias[h, i, j]))
    tau = t + 8 * UNIT_ROUNDOFF["float32"] * (1 + SMALLEST_NORMAL["float32"] / p[b, h, i, j])
    ok = p.copy()
    ok[b, h, i, j] *= math.exp(0.5 * tau)
    assert _compare(ok, bias, q_pos, k_pos).passed
    bad = p.copy()
    bad[b, h, i, j] *= math.exp(2.5 * tau)  # the row constant absorbs at most half of it
    r = _compare(bad, bias, q_pos, k_pos)
    assert not r.passed
    assert r.worst_index == (b, h, i, j)
    assert r.counts["failed"] == 1
    assert r.worst[0].head == h
    assert r.worst[0].delta_lo == r.worst[0].delta_hi == int(q_pos[i] - k_pos[j])


def test_entries_below_what_the_dtype_resolves_are_counted_not_passed():
    q_pos, k_pos = positions_br(1, 300)
    bias = alibi_bias([1.0], q_pos, k_pos)  # P(Delta) ~ e^-Delta: below 1e-30 of the top from Delta = 70
    p = softmax(bias)[None]
    r = _compare(p, bias, q_pos, k_pos)
    n_read = int(np.sum(bias[0, 0] >= math.log(READABLE_RATIO)))
    assert r.counts["readable"] == n_read
    assert r.counts["unreadable"] == 300 - n_read
    # a candidate whose small probabilities underflow to 0 is not blamed for it ...
    under = np.where(np.arange(300)[None, None, None, :] < 300 - n_read, 0.0, p)
    assert _compare(under, bias, q_pos, k_pos).passed
    # ... but one that puts mass there where the reference has almost none is
    over = p.copy()
    over[0, 0, 0, 0] = 1e-3
    r = _compare(over, bias, q_pos, k_pos)
    assert not r.passed
    assert r.worst_index == (0, 0, 0, 0)


def test_float16_readable_threshold_is_its_smallest_normal():
    q_pos, k_pos = positions_br(1, 40)
    bias = alibi_bias([0.5], q_pos, k_pos)
    r = _compare(softmax(bias)[None], bias, q_pos, k_pos, dtype="float16")
    ref = softmax(bias)[0, 0]
    assert r.counts["readable"] == int(np.sum(ref >= 2.0**-14))
    assert r.counts["readable"] < 40


def test_masked_keys_need_exact_zeros_and_kept_keys_positive_probabilities():
    q_pos, k_pos, bias = _case(sq=5, sk=20)
    p = softmax(bias)[None]
    leak = p.copy()
    leak[0, 1, 2, int(q_pos[2]) + 1] = 1e-20  # a tiny mass on the next key
    r = _compare(leak, bias, q_pos, k_pos)
    assert not r.passed
    assert r.counts["masked_leaks"] == 1
    assert r.worst[0].kind == "masked"
    assert r.worst[0].delta_lo == -1
    assert "off by one" in r.findings[0]
    zero = p.copy()
    zero[0, 0, 4, 19] = 0.0  # the most probable key of the last row
    r = _compare(zero, bias, q_pos, k_pos)
    assert not r.passed
    assert r.worst[0].kind == "zero"
    assert r.max_error == math.inf
    nan = p.copy()
    nan[0, 0, 0, 0] = np.nan
    r = _compare(nan, bias, q_pos, k_pos)
    assert not r.passed
    assert r.worst[0].kind == "invalid"


def test_rows_without_keys_and_keys_not_read_are_skipped():
    q_pos, k_pos = np.arange(-2, 3), np.arange(3)  # Sq > Sk bottom-right: the first two queries see nothing
    bias = alibi_bias([0.5], q_pos, k_pos)
    p = softmax(bias)[None]
    p[0, 0, :2] = np.nan  # whatever a candidate gives on rows without keys
    p[..., 1] = np.nan  # key 1 not read
    r = _compare(p, bias, q_pos, k_pos, keys=[0, 2])
    assert r.passed, r.text()
    assert r.counts["empty_rows"] == 2
    assert r.counts["not_read"] == 3
    # the same NaN on a key that was read is the candidate's
    assert not _compare(p, bias, q_pos, k_pos).passed


def test_pre_scale_compares_the_scaled_bias():
    q_pos, k_pos, bias = _case(sq=3, sk=50)
    p = softmax(bias / 8)[None]
    assert _compare(p, bias, q_pos, k_pos, bias_scale=1 / 8).passed
    assert not _compare(p, bias, q_pos, k_pos).passed


def test_compare_validates_its_inputs():
    q_pos, k_pos, bias = _case(sq=2, sk=6)
    p = softmax(bias)[None]
    with pytest.raises(ValueError, match="probs: expected"):
        _compare(p[0], bias, q_pos, k_pos)
    with pytest.raises(ValueError, match="bias: expected shape"):
        _compare(p, bias[:, :1], q_pos, k_pos)
    with pytest.raises(ValueError, match="bias: expected finite"):
        _compare(p, np.where(np.isinf(bias), np.inf, bias), q_pos, k_pos)
    with pytest.raises(ValueError, match="q_pos, k_pos"):
        _compare(p, bias, q_pos.astype(float), k_pos)
    with pytest.raises(ValueError, match="keys"):
        _compare(p, bias, q_pos, k_pos, keys=[9])
    with pytest.raises(ValueError, match="bias_scale"):
        _compare(p, bias, q_pos, k_pos, bias_scale=0.0)
    before = p.copy()
    _compare(p, bias, q_pos, k_pos)
    np.testing.assert_array_equal(p, before)


def test_reference_bias_is_the_family_in_float64_with_the_causal_mask():
    q_pos, k_pos = positions_br(3, 6)
    got = reference_bias(ALiBi.from_num_heads(4), q_pos, k_pos, causal=True)
    want = alibi_bias(2.0 ** (-2.0 * np.arange(1, 5)), q_pos, k_pos)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-15)
    with pytest.raises(TypeError, match="family"):
        reference_bias(np.zeros((1, 3, 6)), q_pos, k_pos)


# -- findings ---------------------------------------------------------------------------------------------------


def test_wrong_slope_is_named_with_its_fitted_value():
    q_pos, k_pos = positions_br(1, 600)
    bias = alibi_bias(SLOPES8, q_pos, k_pos)
    wrong = SLOPES8.copy()
    wrong[5] *= 1.5
    r = _compare(softmax(alibi_bias(wrong, q_pos, k_pos))[None], bias, q_pos, k_pos)
    assert not r.passed
    named = [f for hs in r.heads for f in hs.findings]
    assert len(named) == 1
    assert named[0].startswith("head 5: ")
    assert "wrong slope" in named[0]
    assert f"slope {-wrong[5]:.6g} where the reference's is {-SLOPES8[5]:.6g}" in named[0]
    assert abs(r.heads[5].slope + wrong[5]) < 1e-9
    assert r.heads[5].linear
    assert {g.head for g in r.worst} == {5}


def test_half_precision_distance_is_named_past_2048():
    q_pos, k_pos = positions_br(1, 2600)
    bias = alibi_bias(SLOPES8, q_pos, k_pos)
    dist16 = np.abs(q_pos[:, None] - k_pos[None, :]).astype(np.float16).astype(np.float64)
    cand = -SLOPES8[:, None, None] * dist16[None]
    r = _compare(softmax(cand)[None], bias, q_pos, k_pos)
    assert not r.passed
    named = [f for hs in r.heads for f in hs.findings]
    assert named
    assert all("wrong from |Delta| = 2049" in f and "float16" in f for f in named)
    assert all(g.delta_lo > 2048 for g in r.worst)
    # the same candidate on keys within 2048 of the query is right
    near = slice(2600 - 2049, 2600)
    assert _compare(softmax(cand)[None][..., near], bias[..., near], q_pos, k_pos[near]).passed


def test_bias_ignoring_the_query_position_is_named():
    q_pos, k_pos = positions_br(9, 200)
    dist = np.abs(q_pos[:, None] - k_pos[None, :]).astype(np.float64)
    bias = -0.3 * np.sqrt(dist)[None]  # a non-linear penalty: rows differ by more than a constant
    bias = np.where(k_pos[None, None, :] <= q_pos[None, :, None], bias, -np.inf)
    last = np.broadcast_to(bias[:, -1:, :], bias.shape)  # every row gets the last query's bias
    cand = np.where(np.isinf(bias), -np.inf, last)
    r = _compare(softmax(cand)[None], bias, q_pos, k_pos)
    assert not r.passed
    assert any("ignores the query position" in f for f in r.heads[0].findings)
    # a correct candidate's rows differ as the reference's do: no such finding
    assert not any(
        "ignores" in f for hs in _compare(softmax(bias)[None], bias, q_pos, k_pos).heads for f in hs.findings
    )


# -- plan, summary, snippet, picture ----------------------------------------------------------------------------


def test_plan_reads_the_longest_keys_and_one_case_with_several_queries_within_the_budget():
    shapes = {
        "square": (2, 4, 4, 129, 129, 64),
        "q<k": (1, 4, 4, 113, 203, 64),
        "decode_long": (2, 4, 4, 1, 4099, 64),
        "gqa": (1, 4, 2, 129, 257, 64),
        "chunked_prefill": (1, 4, 4, 17, 2067, 64),
    }
    plan, notes = plan_readout(shapes)
    names = [n for n, _ in plan]
    assert names == ["decode_long", "gqa"]
    calls = sum(len(b) for _, b in plan)
    assert calls <= MAX_PROBE_CALLS
    blocks = dict(plan)
    assert blocks["gqa"] == tuple(range(5))
    assert blocks["decode_long"][0] == 0
    assert blocks["decode_long"][-1] == 64
    assert len(blocks["decode_long"]) == MAX_PROBE_CALLS - 5
    assert any(f"{MAX_PROBE_CALLS - 5} of its 65 key blocks" in n for n in notes)
    assert any("square, q<k, chunked_prefill" in n for n in notes)
    one, notes = plan_readout({"d": (1, 2, 2, 1, 100, 64)})
    assert one == [("d", (0, 1))]
    assert any("no case with Sq > 1" in n for n in notes)


def test_summary_and_snippet():
    q_pos, k_pos, bias = _case(sq=3, sk=40)
    good = _compare(softmax(bias)[None], bias, q_pos, k_pos)
    p = softmax(bias)[None].copy()
    p[0, 1, 2, 30] *= 2.0
    bad = _compare(p, bias, q_pos, k_pos)
    s = readout_summary([("a", good), ("b", bad)], ["a note"])
    assert not s.passed
    assert s.worst_case == "b"
    assert s.mismatch["index"] == (0, 1, 2, 30)
    assert s.mismatch["Delta"] == int(q_pos[2] - 30)
    assert all(d.startswith("case b: ") for d in s.diagnosis)
    assert s.details[-1] == "a note"
    assert readout_summary([("a", good)]).passed
    text = "q, k, v = attention_inputs(shape, dtype='float32', seed=4)\nresult = candidate(q, k, v)"
    out = probe_snippet(text, 2, shape=(1, 4, 4, 3, 40, 16), dtype="float32", seed=4)
    assert "q = np.zeros_like(q)" in out
    assert "v = probe_values(shape, 2, dtype='float32')" in out
    assert "key 32 + c" in out
    assert out.endswith("result = candidate(q, k, v)")


def test_row_sum_faults():
    q_pos, k_pos, bias = _case(sq=3, sk=8)
    p = softmax(bias)[None]
    rows, masked = np.ones((1, 4, 3), dtype=bool), np.isinf(bias)[None]
    assert row_sum_faults(p, masked, rows, q_pos, k_pos, slack=1e-12).worst <= 1e-12
    off = p * 1.01
    f = row_sum_faults(off, masked, rows, q_pos, k_pos, slack=1e-6)
    assert f.worst == pytest.approx(0.01)
    assert f.mismatch["what"] == "row sum"
    leak = p.copy()
    leak[0, 0, 0, int(q_pos[0]) + 1] = 0.1
    f = row_sum_faults(leak, masked, rows, q_pos, k_pos, slack=1.0)
    assert f.worst == math.inf
    assert "off by one" in f.diagnosis[0]
    neg = p.copy()
    neg[0, 0, 0, 0] = -1e-30
    assert "negative" in row_sum_faults(neg, masked, rows, q_pos, k_pos, slack=1.0).diagnosis[0]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    q_pos, k_pos, bias = _case(sq=3, sk=40)
    p = softmax(bias)[None].copy()
    p[0, 1, 2, 30] *= 2.0
    r = _compare(p, bias, q_pos, k_pos)
    path = plot_effective_bias(r, tmp_path / "eb.png")
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    q1, k1, b1 = _case(sq=1, sk=40)
    note = save_plot(_compare(softmax(b1)[None], b1, q1, k1), tmp_path / "sub", "attention.effective_bias.q<k")
    assert note.endswith("attention.effective_bias.q_k.png")
    assert (tmp_path / "sub" / "attention.effective_bias.q_k.png").stat().st_size > 1000


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    q_pos, k_pos, bias = _case(sq=1, sk=10)
    r = _compare(softmax(bias)[None], bias, q_pos, k_pos)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="plot"):
        plot_effective_bias(r, tmp_path / "x.png")
    assert "not written" in save_plot(r, tmp_path, "x")
