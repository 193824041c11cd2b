"""Kernel features in the attention harness: ``window=``, ``softcap=``, ``varlen=True``, ``segments=True``.

The correct candidate is written here from the definitions (spec/softmax_attention.md, "Kernel features"), in NumPy
and in torch (FlashAttention's ``window_size``/``softcap`` arguments, layout bshd), never through rp.attention; each
broken variant must fail with its own diagnosis.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import relpos_ref as rp
from relpos_ref.conformance import check_attention
from relpos_ref.conformance import cli as conform_cli
from relpos_ref.conformance.tolerance import plain_attention

pytestmark = pytest.mark.conformance

H = 4
FAM = rp.ALiBi.from_num_heads(H)
SLOPES = np.array([2.0 ** (-8.0 * (i + 1) / H) for i in range(H)])  # the official rule for a power of two


def _restart(ids: np.ndarray) -> np.ndarray:
    out = np.zeros(ids.shape, dtype=np.int64)
    for r in range(ids.shape[0]):
        start = 0
        for t in range(ids.shape[1]):
            start = t if t and ids[r, t] != ids[r, t - 1] else start
            out[r, t] = t - start
    return out


def dense(q, k, v, *, causal, window=None, softcap=None, restart=False, mut=None, **given):
    """Attention with ALiBi -m |Delta| by the definitions, float64; ``mut`` names a deliberate mistake."""
    for name, a in given.items():
        assert a.dtype == np.int32, (name, a.dtype)  # the harness hands kernels int32
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    b, h, sq, d = q.shape
    sk, g = k.shape[2], h // k.shape[1]
    lq = np.asarray(given.get("q_lens", np.full(b, sq)), dtype=np.int64)
    lk = np.asarray(given.get("k_lens", np.full(b, sk)), dtype=np.int64)
    if mut == "lengths_ignored":
        lq, lk = np.full(b, sq), np.full(b, sk)
    i, j = np.arange(sq)[None, :], np.arange(sk)[None, :]
    qp, kp = i + (lk - lq)[:, None], np.broadcast_to(j, (b, sk))
    seg_q, seg_k = given.get("q_segment_ids"), given.get("k_segment_ids")
    if seg_q is not None and restart != (mut == "restart_flip"):
        qp, kp = _restart(np.asarray(seg_q)), _restart(np.asarray(seg_k))
    delta = qp[:, :, None] - kp[:, None, :]
    keep = delta >= 0 if causal else np.ones(delta.shape, dtype=bool)
    if window is not None:
        left, right = window
        left += mut == "window_left+1"
        right -= mut == "window_right-1"
        wd = i[:, :, None] - kp[:, None, :] if mut == "window_top_left" else delta
        keep &= (wd <= left) & (wd >= -right)
    if mut != "padding_keys":
        keep &= j[:, None, :] < lk[:, None, None]
    if seg_q is not None:
        keep &= np.asarray(seg_q)[:, :, None] == np.asarray(seg_k)[:, None, :]
    s = np.einsum("bhid,bhjd->bhij", q, np.repeat(k, g, axis=1)) / np.sqrt(d)
    bias = -SLOPES[None, :, None, None] * np.abs(delta)[:, None]
    if softcap is None or mut == "softcap_ignored":
        z = s + bias
    elif mut == "softcap_after":
        z = softcap * np.tanh((s + bias) / softcap)
    else:
        z = softcap * np.tanh(s / softcap) + bias
    z = np.where(keep[:, None], z, -np.inf)
    m = np.max(z, axis=-1, keepdims=True)
    e = np.exp(z - np.where(np.isfinite(m), m, 0.0))
    p = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
    out = p @ np.repeat(v, g, axis=1)
    return np.where((i < lq[:, None])[:, None, :, None], out, 0.0)


def test_correct_candidate_passes_every_feature_check():
    cand = functools.partial(dense, causal=True, window=(8, 3), softcap=2.0)
    report = check_attention(
        cand, bias=FAM, causal=True, window=(8, 3), softcap=2.0, varlen=True, segments=True, level="quick"
    )
    assert report.passed, str(report)
    names = [c.name for c in report.checks]
    assert "attention.varlen.output.varlen" in names
    assert "attention.segments.output.packed_chunk" in names
    assert "window=(8, 3), softcap=2.0" in report.header["setup"]
    assert "q_lens=[33, 1, 16, 7]" in report.header["varlen cases"]
    assert "int32" in report.header["varlen cases"]
    assert "int32" in report.header["segments cases"]


def test_correct_candidate_passes_restart_and_non_causal():
    cand = functools.partial(dense, causal=False, window=(5, 2), restart=True)
    report = check_attention(
        cand, bias=FAM, window=(5, 2), varlen=True, segments=True, segment_positions="restart", level="quick"
    )
    assert report.passed, str(report)
    assert "segment_positions=restart" in report.header["segments cases"]


# (mistake, the candidate's fixed options, check_attention's keywords, a check that must fail, its diagnosis)
MUTANTS = [
    ("window_left+1", {"causal": True}, {"window": (8, 0)}, "output.square", "window off by one on the left: (9, 0)"),
    ("window_right-1", {}, {"window": (8, 3)}, "output.square", "window off by one on the right: (8, 2)"),
    ("window_top_left", {"causal": True}, {"window": (8, 3)}, "output.q<k", "window aligned top-left"),
    ("softcap_after", {"causal": True}, {"softcap": 2.0}, "output.square", "softcap applied after the bias"),
    ("softcap_ignored", {"causal": True}, {"softcap": 2.0}, "output.square", "softcap ignored"),
    ("padding_keys", {}, {"varlen": True}, "varlen.output.varlen", "padding keys attended"),
    ("lengths_ignored", {"causal": True}, {"varlen": True}, "varlen.output.varlen", "lengths ignored"),
    ("restart_flip", {"causal": True}, {"segments": True}, "segments.output.packed_chunk", "restarted per segment"),
    (
        "restart_flip",
        {"causal": True, "restart": True},
        {"segments": True, "segment_positions": "restart"},
        "segments.output.packed_chunk",
        "positions kept global",
    ),
]


@pytest.mark.parametrize(("mut", "fixed", "kw", "check", "text"), MUTANTS, ids=[f"{m[0]}-{m[3]}" for m in MUTANTS])
def test_mutant_fails_with_its_diagnosis(mut, fixed, kw, check, text):
    fixed = {**fixed, **{n: kw[n] for n in ("window", "softcap") if n in kw}}
    cand = functools.partial(dense, mut=mut, **{"causal": False, **fixed})
    report = check_attention(cand, bias=FAM, causal=fixed.get("causal", False), level="quick", **kw)
    assert not report.passed
    res = next(c for c in report.checks if c.name == f"attention.{check}")
    assert not res.passed
    assert res.diagnosis, res.text()
    assert text in res.diagnosis[0], res.text()
    # The correct candidate with the same options stays silent.
    good = functools.partial(dense, **{"causal": False, **fixed})
    assert check_attention(good, bias=FAM, causal=fixed.get("causal", False), level="quick", **kw).passed


def test_varlen_reproduction_contains_the_mismatch(capsys):
    cand = functools.partial(dense, causal=False, mut="padding_keys")
    res = next(c for c in check_attention(cand, bias=FAM, varlen=True, level="quick").checks if not c.passed)
    snippet = res.reproduction
    assert "given = dict(zip(('q_lens', 'k_lens'), hand_over((q_lens, k_lens,))))" in snippet
    exec(snippet.replace("candidate = ...", "candidate = cand  #"), {"cand": cand})
    got, want = (np.array(eval(line)) for line in capsys.readouterr().out.strip().splitlines())
    idx = res.mismatch["index"]
    assert got[idx[3]] == pytest.approx(res.mismatch["candidate"], abs=1e-6)
    assert want[idx[3]] == pytest.approx(res.mismatch["reference"], abs=1e-12)


def test_padding_rows_must_be_zero():
    def nonzero_padding(q, k, v, **kw):
        out = dense(q, k, v, causal=True, **kw)
        lq = kw["q_lens"]
        for b in range(out.shape[0]):
            out[b, :, lq[b] :] = 1.0
        return out

    res = check_attention(nonzero_padding, bias=FAM, causal=True, varlen=True, level="quick").checks
    bad = next(c for c in res if c.name == "attention.varlen.output.varlen")
    assert not bad.passed
    assert bad.mismatch["padding_row"]
    assert bad.mismatch["reference"] == 0.0
    assert bad.diagnosis[0].startswith("only padding query rows (i >= q_lens[b]) differ")


def test_tensor_bias_leaves_the_feature_cases_not_checked():
    arr = np.zeros((H, 8, 8))
    report = check_attention(functools.partial(dense, causal=False), bias=rp.TensorBias(arr), varlen=True)
    res = next(c for c in report.checks if c.name == "attention.varlen.output")
    assert res.status == "not_checked"
    assert "TensorBias" in res.summary


def flash_style(q, k, v, *, causal, window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """A FlashAttention-style function in torch: (B, S, H, D), window_size (-1 unbounded), softcap 0 = none,
    bottom-right positions, ALiBi as -m |i + Sk - Sq - j| (FlashAttention's non-causal form)."""
    import torch

    qt, kt, vt = (x.transpose(1, 2).to(torch.float64) for x in (q, k, v))
    sq, sk, d = qt.shape[2], kt.shape[2], qt.shape[3]
    g = qt.shape[1] // kt.shape[1]
    kt, vt = kt.repeat_interleave(g, dim=1), vt.repeat_interleave(g, dim=1)
    s = qt @ kt.transpose(-1, -2) / d**0.5
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    delta = (torch.arange(sq)[:, None] + sk - sq) - torch.arange(sk)[None, :]
    if alibi_slopes is not None:
        s = s - alibi_slopes.to(torch.float64)[:, None, None] * delta.abs()
    keep = torch.ones(sq, sk, dtype=torch.bool)
    left, right = window_size
    right = 0 if causal else right
    if left >= 0:
        keep &= delta <= left
    if right >= 0:
        keep &= delta >= -right
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
    return (p @ vt).transpose(1, 2).to(q.dtype)


def test_flashattention_style_torch_candidate_passes_in_bshd():
    torch = pytest.importorskip("torch")
    cand = functools.partial(
        flash_style, causal=True, window_size=(16, -1), softcap=3.0, alibi_slopes=torch.tensor(SLOPES)
    )
    report = check_attention(
        cand, bias=FAM, causal=True, window=(16, None), softcap=3.0, xp="torch", layout="bshd", level="quick"
    )
    assert report.passed, str(report)
    broken = functools.partial(cand, window_size=(15, -1))
    assert "window off by one on the left" in str(
        check_attention(
            broken, bias=FAM, causal=True, window=(16, None), softcap=3.0, xp="torch", layout="bshd", level="quick"
        )
    )


def test_plain_baseline_applies_softcap_before_the_bias():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 5, 4)) for _ in range(3))
    bias = rng.standard_normal((1, 2, 5, 5))
    out, _ = plain_attention(q, k, v, bias, None, scale=0.5, placement="post_scale", dtype="float64", softcap=1.5)
    z = 1.5 * np.tanh(0.5 * (q @ np.swapaxes(k, -1, -2)) / 1.5) + bias
    p = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(out, (p / p.sum(-1, keepdims=True)) @ v, rtol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"window": 8}, TypeError, "window"),
        ({"window": (8,)}, TypeError, "window"),
        ({"window": (-1, 0)}, ValueError, "window[0]"),
        ({"window": (0, 1.5)}, TypeError, "window[1]"),
        ({"softcap": 0.0}, ValueError, "softcap"),
        ({"softcap": "50"}, TypeError, "softcap"),
        ({"varlen": "yes"}, TypeError, "varlen"),
        ({"segments": 1}, TypeError, "segments"),
        ({"segment_positions": "local"}, ValueError, "segment_positions"),
    ],
)
def test_bad_feature_arguments(kwargs, error, text):
    with pytest.raises(error, match=text.replace("[", r"\[").replace("]", r"\]")):
        check_attention(dense, bias=FAM, level="quick", **kwargs)


def test_cli_window_and_softcap_flags():
    args = conform_cli.parse_env_args("m:f", "--kind attention --family alibi --heads 4 --window 8,-1 --softcap 2")
    assert (args.window, args.softcap) == ((8, None), 2.0)
    checks = conform_cli.build_checks(args, candidate=dense)
    assert "window=(8, None), softcap=2.0" in checks[0]._suite.header()["setup"]
    for bad in ("--window 8", "--window a,b", "--softcap 0"):
        with pytest.raises(ValueError, match=bad.split()[0]):
            conform_cli.parse_env_args("m:f", bad)
    back = conform_cli.parse_env_args("m:f", "--kind backward --family alibi --heads 4 --window 8,0")
    with pytest.raises(ValueError, match="--window"):
        conform_cli.build_checks(back, candidate=dense)


def test_declared_lengths_leave_feature_cases_out_with_a_note():
    cand = functools.partial(dense, causal=False)
    report = check_attention(cand, bias=FAM, varlen=True, level="quick", max_k_len=100)
    names = [c.name for c in report.checks]
    assert "attention.varlen.output.varlen" in names
    assert "attention.varlen.output.varlen_decode" not in names
    assert any(n.startswith("varlen.varlen_decode: not run") for n in report.notes)
    none = check_attention(cand, bias=FAM, varlen=True, level="quick", max_k_len=40).checks
    assert next(c for c in none if c.name == "attention.varlen.output").status == "not_checked"
