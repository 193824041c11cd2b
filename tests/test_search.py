"""relpos_ref.search: the Hypothesis search finds deliberately broken candidates, shrinks them to minimal cases, replays
them from a database, keeps to its budgets and to the candidate's declaration, and rejects bad arguments."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import relpos_ref as rp
from relpos_ref.conformance import AttentionShape, check_attention
from relpos_ref.search import SearchResult, search_attention

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"max_q_len": 24, "max_k_len": 100}


def correct(q, k, v, **kw):
    """relpos_ref itself in float64, returned in the input dtype: the candidate every search must pass."""
    dt = q.dtype
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    return np.asarray(rp.attention(q, k, v, **kw)).astype(dt)


def drops_late_keys(q, k, v):
    """Forgets every key past the first 64 (a kernel that never loads its second key tile)."""
    return correct(q, k[:, :, :64], v[:, :, :64])


def top_left_causal(q, k, v):
    """Causal with the mask aligned top-left: the same as bottom-right exactly when Sq == Sk."""
    return correct(q, k, v, causal=True, align="top_left")


def no_max_subtraction(q, k, v):
    """Float32 softmax without subtracting the row maximum: exp overflows once a logit passes ~88.7."""
    dt = q.dtype
    q, k, v = (a.astype(np.float32) for a in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(q @ np.swapaxes(k, -1, -2) / np.float32(math.sqrt(q.shape[-1])))
        p = e / np.sum(e, axis=-1, keepdims=True)
    return (p @ v).astype(dt)


def test_a_correct_candidate_is_not_found_wanting():
    r = search_attention(correct, max_examples=25, **SMALL)
    assert isinstance(r, SearchResult)
    assert not r.found
    assert r.shape is None
    assert r.report is None
    assert r.reproduction is None
    assert r.examples == 25
    assert r.stopped == "max_examples"
    assert r.database is None
    assert "no failure in 25 cases" in str(r)


def test_keys_past_64_shrink_to_65_keys():
    r = search_attention(drops_late_keys, max_examples=60, **SMALL)
    assert r.found
    assert r.stopped == "shrunk"
    # The smallest case that can show the bug: one more key than the candidate reads, everything else at its least.
    assert r.shape == AttentionShape(1, 4, 4, 1, 65, 16, 1.0)
    assert r.dtype == "float32"
    assert not r.report.passed
    assert r.report.failures[0].name == "attention.output.shape0"
    assert r.found_at >= 1
    assert r.examples > r.found_at
    text = str(r)
    assert "k_len=65" in text
    assert "reproduce:" in text
    assert "attention.output.shape0" in text


def test_a_candidate_that_raises_on_long_rows_is_an_error_shrunk_to_65_keys():
    def refuses_long_rows(q, k, v):
        if k.shape[2] > 64:
            raise ValueError("k_len above 64 is not supported")
        return correct(q, k, v)

    r = search_attention(refuses_long_rows, max_examples=60, **SMALL)
    assert r.found
    assert r.shape.k_len == 65
    first = r.report.failures[0]
    assert first.status == "error"
    assert "k_len above 64" in first.summary
    assert "candidate(q, k, v)" in r.reproduction


def test_the_reproduction_recomputes_the_mismatch():
    r = search_attention(drops_late_keys, max_examples=60, **SMALL)
    scope: dict = {}
    exec(r.reproduction, scope)  # the snippet imports the candidate from this module
    got, want = np.asarray(scope["got"]), np.asarray(scope["want"])
    assert got.shape == want.shape == (1, 4, 1, 16)
    assert np.max(np.abs(got - want)) > 1e-3


def test_wrong_alignment_shrinks_to_the_smallest_uneven_pair():
    r = search_attention(top_left_causal, causal=True, max_examples=60, **SMALL)
    assert r.found
    sq, sk = r.shape.q_len, r.shape.k_len
    # Sq == Sk hides the bug, and (1, 2) or (2, 1) are the smallest pairs with Sq != Sk.
    assert sq != sk
    assert sq + sk == 3
    assert r.shape.batch == 1
    assert r.shape.head_dim == 16
    # ...and the candidate agrees with the reference whenever the lengths are equal.
    assert check_attention(top_left_causal, causal=True, shapes=[(1, 4, 4, 33, 33, 16), (2, 4, 2, 70, 70, 32)]).passed


def test_an_overflow_at_large_logits_is_found_at_logit_scale_40():
    r = search_attention(no_max_subtraction, max_examples=80, **SMALL)
    assert r.found
    assert r.shape.logit_scale == 40.0
    # The same candidate survives a search that never reaches logits of order 100.
    assert not search_attention(no_max_subtraction, logit_scales=(1.0, 8.0), max_examples=40, **SMALL).found


def test_a_database_replays_the_minimal_case_first(tmp_path):
    db = tmp_path / "db"
    first = search_attention(drops_late_keys, max_examples=60, database=db, **SMALL)
    assert first.found
    assert first.found_at > 1
    assert first.database == str(db)
    assert any(db.rglob("*"))
    # Another candidate searched against the same directory neither sees nor disturbs the saved case.
    assert not search_attention(correct, max_examples=10, database=db, **SMALL).found
    again = search_attention(drops_late_keys, max_examples=60, database=db, **SMALL)
    assert again.found_at == 1
    assert again.shape == first.shape
    assert "replay:" in str(again)


def test_time_budget_stops_generation():
    def slow(q, k, v):
        time.sleep(0.2)
        return correct(q, k, v)

    budget = 1.0
    r = search_attention(slow, max_examples=10_000, time_budget=budget, **SMALL)
    assert not r.found
    assert r.stopped == "time_budget"
    assert 1 <= r.examples <= 6
    assert r.elapsed <= budget + 0.2 + 1.5  # one case may overrun; the rest is Hypothesis' and the harness's time


def test_shrink_budget_zero_returns_the_first_failure_unshrunk():
    r = search_attention(drops_late_keys, max_examples=60, shrink_budget=0.0, **SMALL)
    assert r.found
    assert r.stopped == "shrink_budget"
    assert r.examples == r.found_at  # no shrink step ran
    assert r.shape.k_len > 64
    assert not r.report.passed


def test_draws_stay_inside_the_declaration_and_favour_tile_edges():
    seen = []

    def recording(q, k, v):
        seen.append((q.shape, k.shape))
        return correct(q, k, v)

    r = search_attention(recording, gqa=False, head_dims=(32, 64), max_q_len=40, max_k_len=300, max_examples=60, seed=3)
    assert not r.found
    assert len(seen) == 60
    for (b, h, sq, d), (bk, hkv, sk, dk) in seen:
        assert 1 <= b <= 3
        assert b == bk
        assert h == hkv == 4
        assert d == dk
        assert d in (32, 64)
        assert 1 <= sq <= 40
        assert 1 <= sk <= 300
    lengths = [s[2] for pair in seen for s in pair]
    edges = [n for n in lengths if n > 2 and min(n % 16, -n % 16) <= 1]
    # Uniform lengths would land next to a multiple of 16 three times in 16, and Hypothesis' plain integer draws
    # (biased to small and extreme values) under one in ten here; with the edges the search aims there more often.
    plain = [n for n in range(1, 301) if n > 2 and min(n % 16, -n % 16) <= 1]
    assert len(edges) >= 0.2 * len(lengths) > len(plain) / 300 * len(lengths)
    assert 1 in lengths


def test_heads_and_kv_heads_come_from_the_bias_family():
    fam = rp.ALiBi.from_num_heads(6)
    seen = []

    def with_bias(q, k, v):
        seen.append((q.shape[1], k.shape[1]))
        return correct(q, k, v, bias=fam)

    assert not search_attention(with_bias, bias=fam, max_examples=30, **SMALL).found
    assert {h for h, _ in seen} == {6}
    assert {kv for _, kv in seen} <= {6, 3, 2, 1}
    assert len({kv for _, kv in seen}) > 1


def test_a_tensor_bias_fixes_the_lengths():
    arr = np.random.default_rng(0).standard_normal((2, 5, 7))
    fam = rp.TensorBias(arr)
    seen = []

    def with_table(q, k, v):
        seen.append((q.shape[2], k.shape[2]))
        return correct(q, k, v, bias=fam)

    assert not search_attention(with_table, bias=fam, max_examples=10).found
    assert set(seen) == {(5, 7)}


def test_options_reach_the_harness_layout():
    def bshd(q, k, v):
        assert q.shape[2] == 4  # (B, S, H, D): the heads third
        q, k, v = (np.swapaxes(a, 1, 2) for a in (q, k, v))
        return np.swapaxes(correct(q, k, v), 1, 2)

    assert not search_attention(bshd, layout="bshd", max_examples=15, **SMALL).found
    assert search_attention(bshd, max_examples=15, **SMALL).found  # the same candidate fed (B, H, S, D)


def test_a_non_deterministic_candidate_is_reported_as_flaky():
    calls = [0]

    def sometimes_wrong(q, k, v):
        calls[0] += 1
        out = correct(q, k, v)
        return out + 1 if calls[0] % 3 == 2 else out

    r = search_attention(sometimes_wrong, max_examples=60, **SMALL)
    assert r.found
    assert r.stopped == "flaky"
    assert not r.report.passed


def test_several_dtypes_shrink_to_the_first():
    r = search_attention(drops_late_keys, dtypes=("float64", "float32"), max_examples=60, **SMALL)
    assert r.found
    assert r.dtype == "float64"


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"max_examples": 0}, ValueError, "max_examples"),
        ({"max_examples": 2.5}, TypeError, "max_examples"),
        ({"time_budget": 0}, ValueError, "time_budget"),
        ({"time_budget": "60"}, TypeError, "time_budget"),
        ({"shrink_budget": -1.0}, ValueError, "shrink_budget"),
        ({"database": 3}, TypeError, "database"),
        ({"database": ""}, ValueError, "database"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"dtypes": "float32"}, TypeError, "dtypes"),
        ({"dtypes": ()}, ValueError, "dtypes"),
        ({"dtypes": ("float8",)}, ValueError, "dtypes"),
        ({"dtypes": ("float32",), "dtype": "float32"}, ValueError, "dtype"),
        ({"logit_scales": ()}, ValueError, "logit_scales"),
        ({"logit_scales": (1.0, -2.0)}, ValueError, "logit_scales"),
        ({"logit_scales": 40.0}, TypeError, "logit_scales"),
        ({"head_dims": ()}, ValueError, "head_dims"),
        ({"max_k_len": 0}, ValueError, "max_k_len"),
        ({"gqa": "yes"}, TypeError, "gqa"),
        ({"dtype": "float8"}, ValueError, "dtype"),
        ({"shapes": [(1, 4, 4, 3, 3, 16)]}, TypeError, "shapes"),
        ({"expected_failures": {"x": "y"}}, TypeError, "expected_failures"),
        ({"no_such_option": 1}, TypeError, "no_such_option"),
        ({"bias": "alibi"}, TypeError, "bias"),
        ({"align": "middle"}, ValueError, "align"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, text):
    with pytest.raises(error, match=text):
        search_attention(correct, **kwargs)


def test_a_candidate_that_is_not_callable_is_named():
    with pytest.raises(TypeError, match="candidate"):
        search_attention("not a function")


def test_missing_hypothesis_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    with pytest.raises(ImportError, match="pip install hypothesis"):
        search_attention(correct, max_examples=1)


_SEARCH = """
import numpy as np, relpos_ref as rp
from relpos_ref.search import search_attention
def cand(q, k, v):
    return np.asarray(rp.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))).astype(q.dtype)
assert not search_attention(cand, max_examples=25, max_q_len=4, max_k_len=4).found
"""
_PLAIN = """
import relpos_ref.search
from hypothesis import HealthCheck, given, settings, strategies as st
@settings(max_examples=30, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.integers(0, 10**6), min_size=5, max_size=5))
def t(n):
    pass
t()
"""


def _run_in(cwd: Path, code: str) -> None:
    """Run ``code`` in a fresh interpreter in ``cwd`` (Hypothesis caches what it collects once per process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPOTHESIS")}
    env["PYTHONPATH"] = str(ROOT)
    subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, check=True, timeout=120)


def test_without_a_database_nothing_is_written_to_the_working_directory(tmp_path):
    control, searched = tmp_path / "plain", tmp_path / "search"
    control.mkdir()
    searched.mkdir()
    _run_in(control, _PLAIN)
    if not (control / ".hypothesis").exists():
        pytest.skip("this Hypothesis writes nothing to the working directory, so there is nothing to keep out")
    _run_in(searched, _SEARCH)
    assert list(searched.iterdir()) == []
