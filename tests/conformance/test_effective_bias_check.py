"""The attention suite's effective_bias check and the rows_sum_to_one check built on the same one-hot V probes.

Correct candidates: ``relpos_ref.attention`` itself (the readout must recover every family's own bias to the
documented tolerance, whatever the dtype) and ``naive``, a direct NumPy attention written here from a bias function
of the positions. The mutants are ``naive`` with one plausible kernel bug each: distances carried in float16, a wrong
slope for one head, the query position ignored, a causal mask off by one. Each must fail with a diagnosis that names
the bug; the same ``naive`` without the bug must pass.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import relpos_ref as rp
from relpos_ref.conformance import attention_checks
from relpos_ref.families import example_family

pytestmark = pytest.mark.conformance

SLOPES8 = 2.0 ** (-np.arange(1, 9, dtype=np.float64))  # ALiBi's slopes for 8 heads: 2^-1 .. 2^-8
SLOPES4 = 2.0 ** (-2.0 * np.arange(1, 5))  # and for 4 heads: 2^-2 .. 2^-8


def naive(bias_fn, *, next_key=False, only_decode=False, only_dim=None):
    """softmax(q k^T / sqrt(D) + bias_fn(q_pos, k_pos)) @ v in float32 with a bottom-right causal mask."""

    def candidate(q, k, v):
        if only_decode and q.shape[2] != 1:
            raise ValueError(f"decode only: one query per call, got {q.shape[2]}")
        if only_dim is not None and q.shape[-1] != only_dim:
            raise ValueError(f"head_dim {only_dim} only, got {q.shape[-1]}")
        q, k, v = (np.asarray(a, dtype=np.float32) for a in (q, k, v))
        sq, sk, d = q.shape[2], k.shape[2], q.shape[3]
        g = q.shape[1] // k.shape[1]
        k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
        q_pos, k_pos = np.arange(sk - sq, sk), np.arange(sk)
        z = q @ np.swapaxes(k, -1, -2) / np.float32(math.sqrt(d)) + bias_fn(q_pos, k_pos).astype(np.float32)
        keep = k_pos[None, :] <= q_pos[:, None] + (1 if next_key else 0)
        z = np.where(keep, z, -np.inf)
        m = z.max(axis=-1, keepdims=True)
        e = np.exp(z - np.where(np.isfinite(m), m, 0))
        tot = e.sum(axis=-1, keepdims=True)
        return (e / np.where(tot > 0, tot, 1)) @ v

    return candidate


def alibi(slopes, distance_dtype=np.float64):
    """-m_h |i - j|, the distance held in ``distance_dtype``."""
    slopes = np.asarray(slopes, dtype=np.float64)

    def bias(q_pos, k_pos):
        dist = np.abs(q_pos[:, None] - k_pos[None, :]).astype(distance_dtype).astype(np.float64)
        return -slopes[:, None, None] * dist[None]

    return bias


def run(candidate, name, **kw):
    """Run only the check ``attention.<name>`` of ``candidate``."""
    (check,) = [c for c in attention_checks(candidate, causal=True, **kw) if c.name == f"attention.{name}"]
    return check.run()


# -- controls: the readout recovers the families' own biases ------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("family", ["alibi", "t5", "kerple_power", "kerple_log", "fire", "sandwich"])
def test_relpos_ref_attention_reads_back_its_own_bias(family, dtype):
    fam = example_family(family, 4)

    def candidate(q, k, v):
        return rp.attention(q, k, v, bias=fam, causal=True)

    shapes = [(1, 4, 4, 1, 300, 64), (1, 4, 2, 9, 130, 32)]
    res = run(candidate, "effective_bias", bias=fam, dtype=dtype, shapes=shapes)
    assert res.status == "passed", res.text()
    assert res.max_abs <= res.bound
    assert "readable entries" in res.summary
    assert run(candidate, "rows_sum_to_one", bias=fam, dtype=dtype, shapes=shapes).passed


def test_naive_control_passes_where_its_mutants_fail():
    res = run(naive(alibi(SLOPES8)), "effective_bias", bias=rp.ALiBi.from_num_heads(8), shapes=[(1, 8, 8, 1, 4200, 64)])
    assert res.passed, res.text()


# -- mutants ------------------------------------------------------------------------------------------------------


def test_float16_distance_is_named_past_2048():
    res = run(
        naive(alibi(SLOPES8, np.float16)),
        "effective_bias",
        bias=rp.ALiBi.from_num_heads(8),
        shapes=[(1, 8, 8, 1, 4200, 64)],
    )
    assert not res.passed
    assert res.mismatch["Delta"] > 2048
    heads = [d for d in res.diagnosis if "float16" in d]
    assert heads, res.text()
    assert all("right for |Delta| <= 2048, wrong from |Delta| = 2049" in d for d in heads)
    # every worst group lies past 2048
    deltas = [d.split("Delta ")[1].split(" ")[0] for d in res.diagnosis if ", Delta " in d]
    assert deltas
    assert all(int(d.split("..")[0]) > 2048 for d in deltas)


def test_wrong_slope_of_head_5_is_named_with_the_fitted_slope():
    wrong = SLOPES8.copy()
    wrong[5] = 2 * SLOPES8[5]
    shapes = [(1, 8, 8, 1, 4200, 64), (1, 8, 8, 17, 300, 64)]
    res = run(naive(alibi(wrong)), "effective_bias", bias=rp.ALiBi.from_num_heads(8), shapes=shapes)
    assert not res.passed
    assert res.mismatch["index"][1] == 5
    slope = [d for d in res.diagnosis if "wrong slope" in d]
    assert slope, res.text()
    assert all(": head 5: " in d for d in slope)
    assert all(f"slope {-wrong[5]:.6g} where the reference's is {-SLOPES8[5]:.6g}" in d for d in slope)
    assert not any(f"head {h}" in d for d in res.diagnosis for h in (0, 1, 2, 3, 4, 6, 7))


def test_bias_ignoring_the_query_position_is_named():
    fam = example_family("kerple_power", 4)  # r2 = 0.5, 1, 1.5, 2: head 1 is linear, its row constant hides it

    def at_last_query(q_pos, k_pos):
        return np.asarray(fam.bias(np.full_like(q_pos, q_pos[-1]), k_pos))

    res = run(naive(at_last_query), "effective_bias", bias=fam, shapes=[(1, 4, 4, 17, 300, 64)])
    assert not res.passed
    named = [d for d in res.diagnosis if "ignores the query position" in d]
    assert {d.split(":")[0] for d in named} == {"head 0", "head 2", "head 3"}


def test_causal_mask_off_by_one_puts_probability_on_a_masked_key():
    fam = rp.ALiBi.from_num_heads(4)
    shapes = [(1, 4, 4, 17, 300, 64)]
    cand = naive(alibi(SLOPES4), next_key=True)
    res = run(cand, "effective_bias", bias=fam, shapes=shapes)
    assert not res.passed
    assert res.mismatch["Delta"] == -1
    assert "off by one" in res.diagnosis[0]
    rows = run(cand, "rows_sum_to_one", bias=fam, shapes=shapes)
    assert not rows.passed
    assert "off by one" in rows.diagnosis[0]


def test_reproduction_shows_the_mismatch():
    wrong = SLOPES8.copy()
    wrong[5] *= 2
    cand = naive(alibi(wrong))
    res = run(cand, "effective_bias", bias=rp.ALiBi.from_num_heads(8), shapes=[(1, 8, 8, 5, 200, 64)])
    code = res.reproduction.replace("candidate = ...", "candidate = CAND").replace("print(", "shown.append(")
    assert "probe_values(shape, " in code
    shown: list = []
    exec(code, {"CAND": cand, "shown": shown})
    got, want = (np.asarray(x) for x in shown)
    assert np.max(np.abs(got - want)) > 1e-3


def test_pre_scale_bias_is_compared_scaled():
    fam = rp.ALiBi.from_num_heads(4)
    shapes = [(1, 4, 4, 3, 200, 64)]

    def pre(q, k, v):
        return rp.attention(q, k, v, bias=fam, causal=True, placement="pre_scale")

    assert run(pre, "effective_bias", bias=fam, placement="pre_scale", shapes=shapes).passed
    res = run(pre, "effective_bias", bias=fam, shapes=shapes)  # declared post_scale: the bias looks 8x smaller
    assert not res.passed
    assert all("(0.125 times): a wrong slope" in d for d in res.diagnosis if "slope" in d)
    assert sum("wrong slope" in d for d in res.diagnosis) == 4


# -- rows_sum_to_one in the caller's shapes -----------------------------------------------------------------------


def test_rows_sum_runs_for_a_decode_only_candidate():
    cand = naive(alibi(SLOPES4), only_decode=True)
    shapes = [(1, 4, 4, 1, 300, 64), (2, 4, 4, 1, 129, 64)]
    res = run(cand, "rows_sum_to_one", bias=rp.ALiBi.from_num_heads(4), shapes=shapes)
    assert res.status == "passed", res.text()
    assert "(1, 4, 4, 1, 300, 64" in res.summary or "(2, 4, 4, 1, 129, 64" in res.summary
    assert run(cand, "effective_bias", bias=rp.ALiBi.from_num_heads(4), shapes=shapes).passed


def test_rows_sum_runs_for_a_head_dim_64_candidate():
    cand = naive(alibi(SLOPES4), only_dim=64)
    res = run(cand, "rows_sum_to_one", bias=rp.ALiBi.from_num_heads(4), level="quick", head_dims=[64])
    assert res.status == "passed", res.text()
    res = run(cand, "rows_sum_to_one", bias=rp.ALiBi.from_num_heads(4), shapes=[(1, 4, 4, 7, 90, 64)])
    assert res.status == "passed", res.text()


def test_rows_sum_rejects_probabilities_that_do_not_sum_to_one():
    base = naive(alibi(SLOPES4))

    def leaky(q, k, v):
        return base(q, k, v) * np.float32(1 + 1e-4)  # a normaliser off by 1e-4

    res = run(leaky, "rows_sum_to_one", bias=rp.ALiBi.from_num_heads(4), shapes=[(1, 4, 4, 7, 90, 64)])
    assert not res.passed
    assert res.mismatch["what"] == "row sum"
    assert res.mismatch["candidate"] == pytest.approx(1 + 1e-4, rel=1e-5)
    assert run(base, "rows_sum_to_one", bias=rp.ALiBi.from_num_heads(4), shapes=[(1, 4, 4, 7, 90, 64)]).passed


# -- options ------------------------------------------------------------------------------------------------------


def test_plot_dir_writes_one_png_per_case(tmp_path):
    pytest.importorskip("matplotlib")
    checks = attention_checks(
        naive(alibi(SLOPES4)), bias=rp.ALiBi.from_num_heads(4), causal=True, shapes=[(1, 4, 4, 3, 80, 64)]
    )
    (check,) = [c for c in checks if c.name == "attention.effective_bias"]
    # AttentionOptions has no plot_dir field yet: the check reads the attribute when it is there
    object.__setattr__(check._suite.options, "plot_dir", str(tmp_path))
    res = check.run()
    assert res.passed, res.text()
    assert (tmp_path / "attention.effective_bias.shape0.png").stat().st_size > 1000
    assert any("plot written" in d for d in res.details)


def test_no_bias_no_effective_bias_check():
    checks = attention_checks(naive(lambda q, k: np.zeros((4, len(q), len(k)))), causal=True, level="quick")
    assert "attention.effective_bias" not in [c.name for c in checks]
    assert any("effective_bias" in n for n in checks[0]._suite.notes)
