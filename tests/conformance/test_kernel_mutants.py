"""Meta-tests: check_attention's default (kernel-shaped) cases reject tiled kernels with real kernel bugs and accept
correct tiled kernels.

The candidates are ``tests.support.tiled.tiled_attention``: a FlashAttention-style tiled attention (query and key
tiles, online softmax, padded partial tile, causal tile skipping, decode and split-KV paths) that never calls
``relpos_ref.attention``. Each bug switch of :data:`tests.support.tiled.BUGS` is checked against the correct kernel
of the same configuration, so a failure is due to the bug alone. Every check here uses ``check_attention``'s default
case set (no ``shapes=``).

Cost: a failing check runs the harness's diagnoses (many float64 references), so the fast mutant tests run the
default checks one at a time, the check aimed at the bug first, and stop at the first failure (``check_attention``
runs the same list, and its report passes only if every check does). The full report of every mutant and the
family x causal x dtype x block matrix of controls are marked slow.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np
import pytest

import relpos_ref as rp
from relpos_ref.conformance import Report, attention_checks, check_attention
from relpos_ref.families import example_family
from tests.support.tiled import BUGS, DECODE_MIN_KEYS, tiled_attention

pytestmark = pytest.mark.conformance

#: Not a power of two; the default grouped-query case then gets a group ratio of 3 (two kv heads).
HEADS = 6


@dataclass(frozen=True)
class Config:
    """One candidate and the check it gets: the tiled kernel's options and check_attention's keywords."""

    family: str = "alibi"
    causal: bool = False
    dtype: str = "float32"
    block: int = 64
    split_kv: int | None = None
    with_lse: bool = False
    bugs: tuple[str, ...] = ()

    def family_obj(self) -> rp.BiasFamily:
        return example_family(self.family, HEADS)

    def candidate(self):
        return functools.partial(
            tiled_attention,
            bias_family=self.family_obj(),
            causal=self.causal,
            block_q=self.block,
            block_k=self.block,
            split_kv=self.split_kv,
            lse=self.with_lse,
            bugs=self.bugs,
        )

    def check_kwargs(self) -> dict:
        return {"bias": self.family_obj(), "causal": self.causal, "dtype": self.dtype, "with_lse": self.with_lse}


# -- the correct controls (one per mutant configuration, plus bfloat16) ----------------------------------------------
PLAIN = Config()
CAUSAL_SPLIT = Config(causal=True, split_kv=4, with_lse=True)
CONTROLS = {
    "alibi_f32": PLAIN,
    "alibi_f32_causal_split_lse": CAUSAL_SPLIT,
    "alibi_bf16_causal_b16": Config(causal=True, dtype="bfloat16", block=16),
    "t5_f32_causal_b32": Config(family="t5", causal=True, block=32),
    "sandwich_f32_b128": Config(family="sandwich", block=128),
}

# -- the mutants: (control it departs from, the default check built for it, why that case reaches the bug) ---------
MUTANTS = {
    "partial_tile_dropped": (PLAIN, "output.decode", "Sk = 4099 = 64 x 64 + 3: the last 3 keys are a partial tile"),
    "no_rescale": (PLAIN, "output.decode", "4099 keys: 65 key tiles, the running max moves"),
    "qtile_offset": (PLAIN, "output.q<k", "Sq = 113 > 64 queries, Sq != Sk: a second query tile"),
    "decode_qpos_zero": (PLAIN, "output.decode", f"one query, 4099 > {DECODE_MIN_KEYS} keys: the decode path"),
    "float16_positions": (PLAIN, "output.decode", "positions up to 4098: float16 holds only even integers past 2048"),
    "gqa_modulo": (PLAIN, "output.gqa", "6 query heads on 2 kv heads: ratio 3"),
    "bias_batch0_only": (PLAIN, "output.decode", "batch 2"),
    "bias_head_mod4": (PLAIN, "output.decode", "6 heads: heads 4 and 5 read heads 0 and 1"),
    "split_no_rescale": (CAUSAL_SPLIT, "output.decode", "one query: the split-KV path, 4 chunks of 1024+ keys"),
    "partial_tile_causal": (CAUSAL_SPLIT, "output.q<k", "203 = 3 x 64 + 11 keys: the last queries' diagonal keys"),
    "causal_skip_first_row": (CAUSAL_SPLIT, "output.q<k", "offset 90: query tiles straddle key tile starts"),
    "causal_skip_off_by_one": (CAUSAL_SPLIT, "output.square", "row 128 = 2 x 64 is the first key of a key tile"),
    "lse_first_max": (CAUSAL_SPLIT, "lse.q<k", "203 keys: 4 key tiles, the max after the first is not final"),
    "t5_far_bucket_zero": (CONTROLS["t5_f32_causal_b32"], "output.decode", "offsets up to 4098 > max_distance 128"),
    "float16_distance": (CONTROLS["sandwich_f32_b128"], "output.decode", "offsets up to 4098 > 2048, sinusoids"),
}


def test_every_bug_switch_has_a_mutant_test():
    assert set(MUTANTS) == set(BUGS)
    assert len(BUGS) >= 11


# -- shared results: each full report is computed once per module -----------------------------------------------------
_REPORTS: dict[Config, tuple[Report, float]] = {}


def full_report(cfg: Config) -> tuple[Report, float]:
    """check_attention with default settings on the candidate ``cfg``, and its wall time in seconds (cached)."""
    if cfg not in _REPORTS:
        t0 = time.perf_counter()
        report = check_attention(cfg.candidate(), **cfg.check_kwargs())
        _REPORTS[cfg] = report, time.perf_counter() - t0
    return _REPORTS[cfg]


def failed_names(report: Report) -> list[str]:
    return [c.name.split(".", 1)[1] for c in report.failures]


def first_failure(cfg: Config, aimed: str) -> tuple[str | None, list[str]]:
    """Run check_attention's default checks one by one, ``aimed`` first, until one fails: (its name, names run)."""
    checks = attention_checks(cfg.candidate(), **cfg.check_kwargs())
    checks.sort(key=lambda c: c.name != f"attention.{aimed}")
    ran = []
    for c in checks:
        res = c.run()
        ran.append(c.name)
        if not Report([res], {}).passed:
            return c.name.split(".", 1)[1], ran
    return None, ran


# -- controls ---------------------------------------------------------------------------------------------------------
def _control_message(report: Report) -> str:
    figures = [
        f"{c.name}: {c.status} max_abs {c.max_abs:.3g} bound {c.bound:.3g}"
        for c in report.failures
        if c.max_abs is not None and c.bound is not None
    ]
    return "\n".join(["a correct tiled kernel was rejected:", *figures, report.text()])


@pytest.mark.parametrize("name", list(CONTROLS))
def test_correct_tiled_kernel_passes_the_default_check(name, record_property):
    report, seconds = full_report(CONTROLS[name])
    record_property("check_seconds", round(seconds, 2))
    print(f"{name}: default check_attention {seconds:.1f} s, {len(report.checks)} checks")
    assert report.passed, _control_message(report)
    # the default set, not a hand-picked one: kernel-sized cases with thousands of keys
    assert "level default" in report.header["cases"]
    assert any(c.name == "attention.output.decode" for c in report.checks)


def test_default_check_time_of_the_float32_alibi_kernel(record_property):
    # The target is under a minute on 2 unshared cores; on a shared machine this records, and fails only far beyond.
    _, seconds = full_report(PLAIN)
    record_property("default_check_seconds", round(seconds, 2))
    print(f"default check_attention of the correct float32 ALiBi tiled kernel: {seconds:.1f} s")
    assert seconds < 600


# -- mutants: fast (stop at the first failing default check) ----------------------------------------------------------
@pytest.mark.meta
@pytest.mark.parametrize("bug", list(MUTANTS))
def test_mutant_fails_the_default_check(bug, record_property):
    control, aimed, why = MUTANTS[bug]
    failed, ran = first_failure(replace(control, bugs=(bug,)), aimed)
    record_property("first_failed_check", failed)
    print(f"{bug}: first failing default check {failed} (aimed at {aimed}: {why})")
    assert failed is not None, (
        f"mutant {bug!r} ({BUGS[bug]}) passes every default check of check_attention; the case aimed at it "
        f"({aimed}: {why}) does not reach it. Checks run: {ran}"
    )
    # the same check passes on the correct kernel of the same configuration: the failure is the bug's
    assert full_report(control)[0][f"attention.{failed}"].passed, f"{bug}: the correct kernel fails {failed} too"


# -- mutants and controls: full reports (slow) ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.meta
@pytest.mark.parametrize("bug", list(MUTANTS))
def test_mutant_full_default_report_fails(bug, record_property):
    control, aimed, why = MUTANTS[bug]
    report, seconds = full_report(replace(control, bugs=(bug,)))
    names = failed_names(report)
    record_property("failed_checks", ",".join(names))
    print(f"{bug}: {seconds:.1f} s, failed {names}")
    assert not report.passed, f"mutant {bug!r} ({BUGS[bug]}) passes check_attention's defaults:\n{report.text()}"
    assert aimed in names, f"{bug}: {aimed} ({why}) passed; failed: {names}"
    assert full_report(control)[0][f"attention.{aimed}"].passed, f"{bug}: the correct kernel fails {aimed} too"


_BLOCKS = (16, 32, 64, 128, 256)
_MATRIX = [
    # n % 4 runs over (full, causal) x (float32, bfloat16): split-KV on for full bfloat16 and causal float32
    Config(family=fam, causal=causal, dtype=dtype, block=_BLOCKS[n % 5], split_kv=4 if n % 4 in (1, 2) else None)
    for n, (fam, causal, dtype) in enumerate(
        (f, c, d)
        for f in ("alibi", "t5", "kerple_power", "kerple_log", "fire", "sandwich")
        for c in (False, True)
        for d in ("float32", "bfloat16")
    )
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "cfg",
    _MATRIX,
    ids=[f"{c.family}-{'causal' if c.causal else 'full'}-{c.dtype}-b{c.block}-split{c.split_kv}" for c in _MATRIX],
)
def test_correct_tiled_kernel_matrix_passes(cfg):
    report, _ = full_report(cfg)
    assert report.passed, _control_message(report)


# -- the tiled kernel itself: correct, and each bug active only where a real kernel has it ---------------------------
def _inputs(shape, dtype=np.float64, seed=0):
    b, h, hkv, sq, sk, d = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, sq, d))
    k, v = rng.standard_normal((2, b, hkv, sk, d))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


@pytest.mark.parametrize("family", ["alibi", "t5", "kerple_log", "fire", "sandwich"])
@pytest.mark.parametrize(
    ("shape", "causal", "align", "block", "split"),
    [
        ((2, 6, 2, 37, 100, 8), True, "bottom_right", 16, None),
        ((1, 6, 6, 100, 37, 8), True, "bottom_right", 32, None),
        ((1, 6, 3, 40, 90, 8), True, "top_left", 16, None),
        ((2, 6, 6, 5, 300, 8), False, "bottom_right", 64, 3),
        ((1, 6, 6, 1, 2100, 8), True, "bottom_right", 128, 4),
    ],
)
def test_tiled_kernel_matches_the_reference_in_float64(family, shape, causal, align, block, split):
    fam = example_family(family, HEADS)
    q, k, v = _inputs(shape)
    ref, ref_lse = rp.attention(q, k, v, bias=fam, causal=causal, align=align, return_lse=True)
    out, lse = tiled_attention(
        q, k, v, bias_family=fam, causal=causal, align=align, block_q=block, block_k=block, split_kv=split, lse=True
    )
    np.testing.assert_allclose(out, np.asarray(ref), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(np.asarray(ref_lse)))
    np.testing.assert_allclose(lse, np.asarray(ref_lse), rtol=1e-13, atol=0)


def test_tiled_kernel_computes_low_precision_in_float32_and_returns_the_input_dtype():
    fam = example_family("alibi", HEADS)
    q, k, v = _inputs((1, 6, 6, 20, 70, 16))
    ref = np.asarray(rp.attention(q, k, v, bias=fam))
    for dt, tol in ((np.float32, 1e-5), (ml_dtypes.bfloat16, 2e-2)):
        qq, kk, vv = (a.astype(dt) for a in (q, k, v))
        out = tiled_attention(qq, kk, vv, bias_family=fam, block_q=16, block_k=16)
        assert out.dtype == dt
        exact = np.asarray(rp.attention(*(a.astype(np.float64) for a in (qq, kk, vv)), bias=fam))
        assert np.max(np.abs(out.astype(np.float64) - exact)) < tol * max(1.0, np.max(np.abs(ref)))


def test_tiled_kernel_leaves_its_inputs_unchanged():
    q, k, v = _inputs((1, 6, 2, 9, 21, 8))
    copies = [a.copy() for a in (q, k, v)]
    tiled_attention(q, k, v, bias_family=example_family("alibi", HEADS), causal=True, block_q=4, block_k=4)
    for a, c in zip((q, k, v), copies, strict=True):
        np.testing.assert_array_equal(a, c)


# Each bug: (kernel options and inputs where it is active, where it is not). Inactive: bitwise the correct kernel.
_ACTIVE = {
    "partial_tile_dropped": ({}, (1, 6, 6, 10, 129, 8), {}, (1, 6, 6, 10, 128, 8)),
    "no_rescale": ({}, (1, 6, 6, 10, 200, 8), {}, (1, 6, 6, 10, 64, 8)),
    "qtile_offset": ({}, (1, 6, 6, 100, 150, 8), {}, (1, 6, 6, 60, 150, 8)),
    "decode_qpos_zero": ({}, (1, 6, 6, 1, DECODE_MIN_KEYS + 1, 8), {}, (1, 6, 6, 1, DECODE_MIN_KEYS, 8)),
    "float16_positions": ({}, (1, 6, 6, 3, 2060, 8), {}, (1, 6, 6, 3, 2049, 8)),
    "gqa_modulo": ({}, (1, 6, 2, 10, 70, 8), {}, (1, 6, 3, 10, 70, 8)),
    "bias_batch0_only": ({}, (2, 6, 6, 10, 70, 8), {}, (1, 6, 6, 10, 70, 8)),
    "bias_head_mod4": ({}, (1, 6, 6, 10, 70, 8), {"heads": 4}, (1, 4, 4, 10, 70, 8)),
    "split_no_rescale": ({"split_kv": 3}, (1, 6, 6, 2, 400, 8), {}, (1, 6, 6, 2, 400, 8)),
    "partial_tile_causal": ({"causal": True}, (1, 6, 6, 65, 65, 8), {"causal": True}, (1, 6, 6, 64, 64, 8)),
    "causal_skip_first_row": ({"causal": True}, (1, 6, 6, 70, 100, 8), {}, (1, 6, 6, 70, 100, 8)),
    "causal_skip_off_by_one": ({"causal": True}, (1, 6, 6, 65, 65, 8), {}, (1, 6, 6, 65, 65, 8)),
    "lse_first_max": ({}, (1, 6, 6, 10, 200, 8), {}, (1, 6, 6, 10, 64, 8)),
    "t5_far_bucket_zero": ({"family": "t5"}, (1, 6, 6, 10, 200, 8), {"family": "t5"}, (1, 6, 6, 10, 120, 8)),
    "float16_distance": ({"family": "sandwich"}, (1, 6, 6, 3, 2060, 8), {"family": "sandwich"}, (1, 6, 6, 3, 2049, 8)),
}


def _run(bugs, opts, shape):
    opts = dict(opts)
    heads = opts.pop("heads", HEADS)
    fam = example_family(opts.pop("family", "alibi"), heads)
    q, k, v = _inputs(shape)
    return tiled_attention(q, k, v, bias_family=fam, block_q=64, block_k=64, lse=True, bugs=bugs, **opts)


def test_every_bug_switch_has_an_activity_test():
    assert set(_ACTIVE) == set(BUGS)


@pytest.mark.meta
@pytest.mark.parametrize("bug", list(_ACTIVE))
def test_bug_is_active_only_where_a_kernel_has_it(bug):
    on_opts, on_shape, off_opts, off_shape = _ACTIVE[bug]
    out, lse = _run((bug,), on_opts, on_shape)
    good, good_lse = _run((), on_opts, on_shape)
    changed = np.nanmax(np.abs(lse - good_lse)) if bug == "lse_first_max" else np.max(np.abs(out - good))
    assert changed > 1e-6, f"{bug}: no effect where it should act"
    out, lse = _run((bug,), off_opts, off_shape)
    good, good_lse = _run((), off_opts, off_shape)
    np.testing.assert_array_equal(out, good)
    np.testing.assert_array_equal(lse, good_lse)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"q": [[1.0]]}, TypeError, "q: expected a NumPy array"),
        ({"q": np.zeros((2, 3))}, ValueError, "q: expected 4 axes"),
        ({"k": np.zeros((1, 4, 5, 8))}, ValueError, "H_kv dividing"),
        ({"block_q": 0}, ValueError, "block_q: expected a positive integer"),
        ({"split_kv": 1.5}, ValueError, "split_kv"),
        ({"bugs": ["nope"]}, ValueError, "bugs: expected names"),
        ({"align": "middle"}, ValueError, "align"),
        ({"bias_family": "alibi"}, TypeError, "bias_family"),
        ({"q": np.zeros((1, 6, 4, 8), np.int64)}, TypeError, "q: expected float16"),
    ],
)
def test_tiled_kernel_rejects_bad_arguments(kwargs, error, words):
    args = dict(zip("qkv", _inputs((1, 6, 6, 4, 5, 8)), strict=True))
    args.update({n: kwargs.pop(n) for n in "qkv" if n in kwargs})
    with pytest.raises(error, match=words):
        tiled_attention(args["q"], args["k"], args["v"], bias_family=example_family("alibi", HEADS), **kwargs)


def test_float16_distance_needs_an_offset_only_family():
    q, k, v = _inputs((1, 6, 6, 2, 5, 8))
    with pytest.raises(ValueError, match="float16_distance needs an offset-only family"):
        tiled_attention(q, k, v, bias_family=example_family("fire", HEADS), bugs="float16_distance")


def test_split_combine_weights_are_the_chunk_probability_masses():
    # An independent statement of the split-KV combine: with two chunks of one key each, the output is the
    # softmax-weighted mean of the two value rows.
    fam = example_family("alibi", 1)
    q, k, v = _inputs((1, 1, 1, 1, 2, 4))
    out = tiled_attention(q, k, v, bias_family=fam, block_q=1, block_k=1, split_kv=2)
    slope = float(np.asarray(fam.parameters()["slopes"])[0])
    z = q[0, 0, 0] @ k[0, 0].T / math.sqrt(4) + np.array([-slope, 0.0])
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(out[0, 0, 0], p @ v[0, 0], rtol=1e-13)
