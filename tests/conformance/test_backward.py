"""Meta-tests of the backward conformance harness (relpos_ref.conformance.check_attention_backward).

The candidates are a plain materialised attention backward written here in NumPy from the formulas (softmax
backward, chain rule through the scale and the bias, grouped-query heads summed onto their key/value head), with the
bias and its parameter gradients written from each family's definition. They never call relpos_ref. A correct one
must pass; each deliberately wrong one ("mutant") must fail the expected check with the expected diagnosis.
"""

from __future__ import annotations

import ast
import functools
import math
import textwrap

import numpy as np
import pytest

import relpos_ref as rp
from relpos_ref.conformance import (
    AttentionShape,
    Report,
    attention_backward_checks,
    backward_inputs,
    check_attention_backward,
    parametrize_with_checks,
)
from relpos_ref.conformance.tolerance import plain_attention_vjp

# These tests pin what each check and diagnosis does, on the small "quick" case set; the kernel-scale defaults
# are pinned by tests/conformance/test_kernel_mutants.py and test_attention.py.
check_attention_backward = functools.partial(check_attention_backward, level="quick")
attention_backward_checks = functools.partial(attention_backward_checks, level="quick")

pytestmark = pytest.mark.conformance


def official_slopes(n: int) -> list[float]:
    """Press et al.'s get_slopes, from its description (geometric sequence, interleaved extras)."""

    def pow2(m: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return pow2(n)
    c = 2 ** math.floor(math.log2(n))
    return pow2(c) + official_slopes(2 * c)[0::2][: n - c]


def t5_buckets(delta: np.ndarray, *, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """T5 buckets as HF computes them (float32 log, truncation); delta = query - key."""
    rel = -delta
    nb = num_buckets
    out = np.zeros(rel.shape, dtype=np.int64)
    if bidirectional:
        nb //= 2
        out += (rel > 0).astype(np.int64) * nb
        n = np.abs(rel)
    else:
        n = -np.minimum(rel, 0)
    exact = nb // 2
    nf = np.maximum(n, 1).astype(np.float32)
    large = exact + (np.log(nf / exact) / np.float32(math.log(max_distance / exact)) * (nb - exact)).astype(np.int64)
    return out + np.where(n < exact, n, np.minimum(large, nb - 1))


class Bias:
    """A bias b_h(i, j) of the offsets and the gradients of its parameters for a cotangent db (H, Sq, Sk)."""

    def __init__(self, kind: str, *, bidirectional: bool = True, **params) -> None:
        self.kind = kind
        self.bidirectional = bidirectional
        self.p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}

    def value(self, delta: np.ndarray) -> np.ndarray:
        dist = np.abs(delta).astype(np.float64)
        if self.kind == "alibi":
            return -self.p["slopes"][:, None, None] * dist
        if self.kind == "kerple_power":
            return -self.p["r1"][:, None, None] * dist ** self.p["r2"][:, None, None]
        if self.kind == "t5":  # table given (buckets, heads), as HF's embedding weight
            b = t5_buckets(delta, bidirectional=self.bidirectional)
            return np.moveaxis(self.p["table"][b], -1, 0)
        raise AssertionError(self.kind)

    def grads(self, delta: np.ndarray, db: np.ndarray) -> dict[str, np.ndarray]:
        dist = np.abs(delta).astype(np.float64)
        if self.kind == "alibi":
            return {"slopes": -np.sum(db * dist, axis=(1, 2))}
        if self.kind == "kerple_power":
            r1, r2 = self.p["r1"][:, None, None], self.p["r2"][:, None, None]
            powed = dist**r2
            log_d = np.log(np.where(dist > 0, dist, 1.0))  # d/dr2 of 0**r2 is 0
            return {"r1": -np.sum(db * powed, axis=(1, 2)), "r2": -np.sum(db * r1 * powed * log_d, axis=(1, 2))}
        if self.kind == "t5":
            b = t5_buckets(delta, bidirectional=self.bidirectional)
            g = np.zeros_like(self.p["table"])
            for h in range(db.shape[0]):
                np.add.at(g[:, h], b, db[h])
            return {"table": g}
        raise AssertionError(self.kind)


def backward_candidate(
    bias: Bias | None = None,
    *,
    causal=False,
    align="bottom_right",
    placement="post_scale",
    scale=None,
    fully_masked="zero",
    mutant=None,
    returns="mapping",
):
    """Materialised attention forward and backward in float32 (float64 for float64 inputs)."""

    def candidate(q, k, v, d_out):
        dtype = q.dtype
        acc = np.float64 if dtype == np.float64 else np.float32
        q, k, v, do = (np.asarray(a).astype(acc) for a in (q, k, v, d_out))
        _nb, nh, sq, d = q.shape
        nkv, sk = k.shape[1], k.shape[2]
        heads = np.arange(nh) % nkv if mutant == "gqa_interleaved" else np.arange(nh) // (nh // nkv)
        kk, vv = k[:, heads], v[:, heads]
        start = sk - sq if align == "bottom_right" and mutant != "top_left" else 0
        delta = (start + np.arange(sq))[:, None] - np.arange(sk)[None, :]
        tau = acc(1.0 / math.sqrt(d) if scale is None else scale)
        place = (
            {"post_scale": "pre_scale", "pre_scale": "post_scale"}[placement] if mutant == "placement" else placement
        )
        s = q @ np.swapaxes(kk, -1, -2)
        if bias is not None:
            b = bias.value(delta).astype(acc)
            z = s * tau + b if place == "post_scale" else (s + b) * tau
        else:
            z = s * tau
        if causal and mutant != "no_causal":
            z = np.where(delta >= (-1 if mutant == "next_key" else 0), z, -np.inf)
        mx = np.max(z, axis=-1, keepdims=True)
        empty = mx == -np.inf
        e = np.exp(z - np.where(empty, 0, mx))
        p = e / np.where(empty, 1, np.sum(e, axis=-1, keepdims=True))
        if fully_masked == "nan" or mutant == "nan_rows":
            p = np.where(empty, np.nan, p)  # what autograd of a naive softmax gives
        dv_h = np.swapaxes(p, -1, -2) @ do
        dp = do @ np.swapaxes(vv, -1, -2)
        dz = p * dp if mutant == "no_delta" else p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
        if mutant == "transposed_dz":
            dz = np.swapaxes(dz, -1, -2)
        ds = dz * tau
        dq = (dz if mutant == "dq_scale" else ds) @ kk
        dk_h = np.swapaxes(ds, -1, -2) @ q
        if mutant == "per_query_head":
            dk, dv = dk_h, dv_h
        else:
            dk = np.zeros(k.shape, dtype=acc)
            dv = np.zeros(v.shape, dtype=acc)
            for h in range(nh):
                dk[:, heads[h]] += dk_h[:, h]
                dv[:, heads[h]] += dv_h[:, h]
        out = {"dq": dq.astype(dtype), "dk": dk.astype(dtype), "dv": dv.astype(dtype)}
        if bias is not None and returns == "mapping":
            db = dz if (place == "post_scale" or mutant == "db_scale") else ds
            grads = bias.grads(delta, np.sum(db, axis=0))
            if mutant == "slope_sign":
                grads["slopes"] = -grads["slopes"]
            if mutant == "t5_layout" and "table" in grads:
                grads["table"] = grads["table"].T
            out.update({n: g.astype(dtype) for n, g in grads.items()})
        if returns == "tuple":
            return out["dq"], out["dk"], out["dv"]
        return out

    return candidate


def diagnoses(report: Report) -> str:
    return " | ".join(d for c in report.failures for d in c.diagnosis)


RNG = np.random.default_rng(7)
T5_TABLE = RNG.standard_normal((32, 4))  # (buckets, heads): HF's layout
KERPLE = {"r1": RNG.uniform(0.1, 1.5, 4), "r2": RNG.uniform(0.2, 1.9, 4)}


def alibi4():
    return Bias("alibi", slopes=official_slopes(4)), rp.ALiBi.from_num_heads(4)


# -- accepted ------------------------------------------------------------------------------------------------


ACCEPT = {
    "alibi-causal-float32": ("alibi", {"causal": True}, "float32"),
    "alibi-causal-float64": ("alibi", {"causal": True}, "float64"),
    "alibi-pre_scale-float32": ("alibi", {"placement": "pre_scale"}, "float32"),
    "alibi-top_left-causal-float16": ("alibi", {"causal": True, "align": "top_left"}, "float16"),
    "alibi-causal-nan-float64": ("alibi", {"causal": True, "fully_masked": "nan"}, "float64"),
    "t5-bidirectional-float32": ("t5", {"scale": 1.0}, "float32"),
    "kerple_power-causal-float64": ("kerple_power", {"causal": True}, "float64"),
    "none-causal-bfloat16": (None, {"causal": True}, "bfloat16"),
}


def _pair(kind):
    if kind == "alibi":
        return alibi4()
    if kind == "t5":
        return (
            Bias("t5", table=T5_TABLE, bidirectional=True),
            rp.T5Bias(T5_TABLE, bidirectional=True, layout="buckets_heads"),
        )
    if kind == "kerple_power":
        return Bias("kerple_power", **KERPLE), rp.KerplePower(KERPLE["r1"], KERPLE["r2"])
    return None, None


@pytest.mark.parametrize("config", list(ACCEPT), ids=list(ACCEPT))
def test_accepts_correct_backward(config):
    kind, opts, dtype = ACCEPT[config]
    mine, ref = _pair(kind)
    cand = backward_candidate(mine, **opts)
    if dtype == "bfloat16":
        inner = cand

        def cand(q, k, v, d_out):  # ml_dtypes bfloat16 in, float32 compute, rounded back
            grads = inner(*(a.astype(np.float32) for a in (q, k, v, d_out)))
            return {n: g.astype(q.dtype) for n, g in grads.items()}

    report = check_attention_backward(cand, bias=ref, dtype=dtype, **opts)
    assert report.passed, report.text()
    names = [c.name for c in report.checks]
    assert "backward.dq.square" in names
    if ref is not None:
        for param in ref.parameters():
            assert f"backward.d{param}.gqa" in names
            assert report[f"backward.d{param}.gqa"].max_abs is not None  # compared, not merely present
    if opts.get("causal"):
        assert "backward.causal_future_keys" in names
        assert ("backward.fully_masked_rows" in names) == (opts.get("align", "bottom_right") == "bottom_right")


def test_accepts_attention_grads_tuple_and_reports_missing_parameter_gradients():
    def reference_in_float32(q, k, v, d_out):  # an AttentionGrads (dq, dk, dv, dbias) is a valid return
        return rp.attention_vjp(q, k, v, d_out, bias=rp.ALiBi.from_num_heads(4).astype(np.float32), causal=True)

    assert check_attention_backward(reference_in_float32, bias=rp.ALiBi.from_num_heads(4), causal=True).passed
    mine, ref = alibi4()
    report = check_attention_backward(backward_candidate(mine, causal=True, returns="tuple"), bias=ref, causal=True)
    assert report.passed, report.text()
    assert report["backward.dslopes.square"].max_abs is None
    assert "not returned" in report["backward.dslopes.square"].summary
    assert any("dslopes" in n for n in report.notes)
    assert report["backward.dq.square"].max_abs is not None


# -- mutants -------------------------------------------------------------------------------------------------


MUTANTS = {
    # mutant: (family, harness options, failing check, phrase of the diagnosis)
    "dq_scale": ("alibi", {"causal": True}, "backward.dq.square", "lacks the softmax scale"),
    "per_query_head": ("alibi", {"causal": True}, "backward.dk.gqa", "per query head"),
    "transposed_dz": ("alibi", {}, "backward.dq.square", "dz transposed"),
    "placement": ("alibi", {"causal": True}, "backward.dq.square", "wrong side of the scale"),
    "top_left": ("alibi", {"causal": True}, "backward.dq.q<k", "top-left"),
    "gqa_interleaved": ("alibi", {"causal": True}, "backward.dq.gqa", "h % H_kv"),
    "t5_layout": ("t5", {"scale": 1.0}, "backward.dtable.square", "T5 table gradient in the heads_buckets layout"),
    "slope_sign": ("alibi", {"causal": True}, "backward.dslopes.square", "opposite sign"),
    "nan_rows": ("alibi", {"causal": True}, "backward.fully_masked_rows", "NaN instead of zeros"),
    "no_delta": ("alibi", {"causal": True}, "backward.dq.square", "without its row term"),
    "db_scale": ("alibi", {"causal": True, "placement": "pre_scale"}, "backward.dslopes.square", "under pre_scale"),
    "no_causal": ("alibi", {"causal": True}, "backward.causal_future_keys", "future keys"),
    "next_key": ("alibi", {"causal": True}, "backward.causal_future_keys", "next key"),
}


@pytest.mark.parametrize("mutant", list(MUTANTS), ids=list(MUTANTS))
def test_rejects_mutant(mutant):
    kind, opts, check, phrase = MUTANTS[mutant]
    mine, ref = _pair(kind)
    report = check_attention_backward(backward_candidate(mine, mutant=mutant, **opts), bias=ref, **opts)
    assert not report.passed, report.text()
    res = report[check]
    assert res.status == "failed", report.text()
    assert any(phrase.lower() in d.lower() for d in res.diagnosis), report.text()
    assert res.reproduction, report.text()


def test_mutant_diagnoses_hold_on_the_value_checks():
    """The diagnoses of a mutant whose failure also shows in other checks are consistent across them."""
    mine, ref = alibi4()
    report = check_attention_backward(backward_candidate(mine, mutant="no_causal", causal=True), bias=ref, causal=True)
    assert "no causal mask" in report["backward.dq.square"].diagnosis[0]
    report = check_attention_backward(backward_candidate(mine, mutant="nan_rows", causal=True), bias=ref, causal=True)
    assert "NaN" in report["backward.dk.q>k"].diagnosis[0]
    assert report["backward.dq.q>k"].passed  # the rows that see keys are right; only the empty rows are NaN


def test_square_t5_table_layout_is_diagnosed_by_values():
    table = RNG.standard_normal((32, 32))  # H == B: both layouts have the same shape
    mine = Bias("t5", table=table, bidirectional=True)
    ref = rp.T5Bias(table, bidirectional=True, layout="buckets_heads")
    shapes = [AttentionShape(1, 32, 32, 9, 9, 8)]
    report = check_attention_backward(
        backward_candidate(mine, scale=1.0, mutant="t5_layout"), bias=ref, scale=1.0, shapes=shapes
    )
    assert report["backward.dq.shape0"].passed
    assert "heads_buckets layout" in report["backward.dtable.shape0"].diagnosis[0], report.text()


# -- protocol and reporting ----------------------------------------------------------------------------------


def test_candidate_errors_and_bad_returns():
    def raises(q, k, v, d_out):
        raise NotImplementedError("no backward here")

    report = check_attention_backward(raises)
    assert all(c.status == "error" for c in report.checks)
    assert "NotImplementedError: no backward here" in report.checks[0].summary

    report = check_attention_backward(lambda q, k, v, d_out: (q, k))
    assert all(c.status == "error" for c in report.checks)
    assert "expected (dq, dk, dv)" in report.checks[0].summary

    mine, ref = alibi4()

    def extra(q, k, v, d_out):
        return {**backward_candidate(mine)(q, k, v, d_out), "slope": np.zeros(4)}

    report = check_attention_backward(extra, bias=ref)
    assert "'slope'" in report.checks[0].summary
    assert "slopes" in report.checks[0].summary


def test_argument_errors_name_the_argument():
    with pytest.raises(TypeError, match="candidate"):
        check_attention_backward("not callable")
    with pytest.raises(ValueError, match="placement"):
        check_attention_backward(backward_candidate(), placement="middle")
    with pytest.raises(TypeError, match="bias"):
        check_attention_backward(backward_candidate(), bias=np.zeros((4, 3, 3)))
    with pytest.raises(ValueError, match="shapes"):
        check_attention_backward(backward_candidate(), bias=rp.ALiBi.from_num_heads(4), shapes=[(1, 8, 8, 3, 3, 4)])


def test_inputs_are_seeded_and_distinct():
    shape = AttentionShape(1, 2, 1, 3, 5, 4)
    q, k, v, d_out = backward_inputs(shape, dtype="float32", seed=3)
    again = backward_inputs(shape, dtype="float32", seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((q, k, v, d_out), again, strict=True))
    assert d_out.shape == (1, 2, 3, 4)
    assert d_out.dtype == np.float32
    assert not np.array_equal(d_out, q)
    assert not np.array_equal(backward_inputs(shape, seed=4)[3], d_out)


@pytest.mark.parametrize("method", ["autograd", "recompute"])
def test_plain_backward_matches_reference_in_float64(method):
    """The baseline is the exact chain rule: in float64 it agrees with attention_vjp to rounding."""
    shape = AttentionShape(2, 4, 2, 9, 6, 8)
    q, k, v, d_out = backward_inputs(shape, dtype="float64", seed=1)
    fam = rp.ALiBi.from_num_heads(4)
    q_pos, k_pos = rp.positions(9, 6)
    keep = np.asarray(rp.causal_mask(q_pos, k_pos))
    bias = np.asarray(fam.bias(q_pos, k_pos))[None]
    for placement in ("post_scale", "pre_scale"):
        dq, dk, dv, db = plain_attention_vjp(
            q, k, v, d_out, bias, keep, scale=0.3, placement=placement, dtype="float64", method=method
        )
        g = rp.attention_vjp(q, k, v, d_out, bias=fam, causal=True, scale=0.3, placement=placement)
        np.testing.assert_allclose(dq, g.dq, atol=1e-13)
        np.testing.assert_allclose(dk, g.dk, atol=1e-13)
        np.testing.assert_allclose(dv, g.dv, atol=1e-13)
        np.testing.assert_allclose(fam.bias_vjp(q_pos, k_pos, db)["slopes"], g.dbias["slopes"], atol=1e-12)


def test_plain_backward_error_grows_as_precision_drops():
    shape = AttentionShape(1, 4, 4, 16, 16, 16)
    q, k, v, d_out = backward_inputs(shape, dtype="float16", seed=2)
    args = tuple(a.astype(np.float64) for a in (q, k, v, d_out))
    ref = rp.attention_vjp(*args).dq
    err = {
        dt: np.max(
            np.abs(plain_attention_vjp(*args, None, None, scale=0.25, placement="post_scale", dtype=dt)[0] - ref)
        )
        for dt in ("float64", "float32", "float16")
    }
    assert err["float64"] < 1e-14 < err["float32"] < 1e-5 < err["float16"] < 1e-1
    with pytest.raises(ValueError, match="method"):
        plain_attention_vjp(*args, None, None, scale=0.25, placement="post_scale", dtype="float32", method="flash")


def test_header_tolerance_and_json():
    mine, ref = alibi4()
    report = check_attention_backward(backward_candidate(mine, mutant="dq_scale", causal=True), bias=ref, causal=True)
    assert "attention_vjp" in report.header["reference"]
    assert "FlashAttention-2" in report.header["tolerance rule"]
    res = report["backward.dq.square"]
    assert res.max_abs > res.bound > 0
    assert "plain float32 error" in res.tolerance
    assert res.mismatch["q_pos"] >= 0
    assert '"backward.dq.square"' in report.to_json()
    user = check_attention_backward(backward_candidate(mine, causal=True), bias=ref, causal=True, atol=1e-2)
    assert "user override" in user.header["tolerance rule"]
    assert "user override" in user["backward.dk.square"].tolerance


CANDIDATE_MODULE = '''
import numpy as np

def wrong_dq(q, k, v, d_out):
    """No bias, no mask, dq without the scale."""
    acc = np.float64 if q.dtype == np.float64 else np.float32
    q, k, v, do = (a.astype(acc) for a in (q, k, v, d_out))
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    tau = 1 / np.sqrt(q.shape[-1])
    z = q @ np.swapaxes(k, -1, -2) * tau
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dp = do @ np.swapaxes(v, -1, -2)
    dz = p * (dp - np.sum(p * dp, -1, keepdims=True))
    fold = lambda x: x.reshape(x.shape[0], -1, g, *x.shape[2:]).sum(2)
    dk = fold(np.swapaxes(dz, -1, -2) @ q * tau)
    dv = fold(np.swapaxes(p, -1, -2) @ do)
    return (dz @ k).astype(q.dtype), dk.astype(q.dtype), dv.astype(q.dtype)

def right(q, k, v, d_out):
    dq, dk, dv = wrong_dq(q, k, v, d_out)
    return dq / np.sqrt(q.shape[-1]), dk, dv
'''


@pytest.fixture
def candidate_module(tmp_path, monkeypatch):
    (tmp_path / "bwd_cand_mod.py").write_text(textwrap.dedent(CANDIDATE_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_reproduction_snippet_runs(candidate_module, capsys):
    from relpos_ref.conformance import load_target

    report = check_attention_backward(load_target("bwd_cand_mod:wrong_dq"), target="bwd_cand_mod:wrong_dq")
    res = report["backward.dq.square"]
    assert not res.passed
    exec(compile(res.reproduction, "<reproduction>", "exec"), {})
    got, want = capsys.readouterr().out.strip().splitlines()
    # the mutant's dq is 4 x too large for D = 16
    np.testing.assert_allclose(np.asarray(ast.literal_eval(got)) * 0.25, np.asarray(ast.literal_eval(want)), atol=1e-5)


def test_cli_backward_kind(candidate_module, capsys):
    from relpos_ref.cli import main

    assert main(["conform", "bwd_cand_mod:right", "--kind", "backward", "--level", "quick"]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert main(["conform", "bwd_cand_mod:wrong_dq", "--kind", "backward", "--level", "quick"]) == 1
    assert "lacks the softmax scale" in capsys.readouterr().out


def test_checks_for_families_without_parameters():
    names = [c.name for c in attention_backward_checks(backward_candidate(), bias=rp.Sandwich(4, 8))]
    assert "backward.dv.gqa" in names
    assert not [n for n in names if n.split(".")[1] not in ("dq", "dk", "dv", "repeatable")]


def _fire():
    rng = np.random.default_rng(3)
    w = (
        rng.standard_normal((16, 1)),
        rng.standard_normal(16),
        rng.standard_normal((4, 16)) / 4,
        rng.standard_normal(4),
    )
    return rp.FIRE(*w)


def _masked_tensor():
    arr = np.random.default_rng(4).standard_normal((4, 6, 9))
    arr[:, 2, :] = -np.inf  # a query row that sees no key
    arr[:, 3, 5:] = -np.inf
    return rp.TensorBias(arr)


@pytest.mark.parametrize("family", [_fire, _masked_tensor], ids=["fire", "tensor"])
def test_parameter_shapes_of_other_families(family):
    """Plumbing only: 0-d and (W, 1) FIRE parameters, a fixed-shape TensorBias with an empty row. The candidate is
    relpos_ref's own vjp computed in float32, so this shows that the checks are built and compared, not that the
    reference is right (the test_gradients tests do that)."""
    fam = family()

    def float32_vjp(q, k, v, d_out):
        return rp.attention_vjp(q, k, v, d_out, bias=fam.astype(np.float32), causal=not isinstance(fam, rp.TensorBias))

    report = check_attention_backward(float32_vjp, bias=fam, causal=not isinstance(fam, rp.TensorBias))
    assert report.passed, report.text()
    for name in fam.parameters():
        compared = [c for c in report.checks if c.name.startswith(f"backward.d{name}.")]
        assert compared
        assert all(c.max_abs is not None for c in compared)
    assert "backward.fully_masked_rows" in [c.name for c in report.checks]


@parametrize_with_checks(
    attention_backward_checks(backward_candidate(alibi4()[0], causal=True), bias=alibi4()[1], causal=True)
)
def test_parametrize_with_backward_checks(check):
    check()


# -- gradients not returned: not checked, never passed -------------------------------------------------------

SMALL = [AttentionShape(1, 4, 2, 5, 7, 8)]


def test_missing_parameter_gradient_is_not_checked():
    mine, ref = alibi4()
    report = check_attention_backward(backward_candidate(mine, returns="tuple"), bias=ref, shapes=SMALL)
    res = report["backward.dslopes.shape0"]
    assert res.status == "not_checked", report.text()
    assert not res.passed
    assert res.summary == "gradient of 'slopes' of case shape0 not returned by the candidate, so not compared"
    assert report.passed  # dq, dk, dv were compared and agree
    assert not report.complete
    assert [c.name for c in report.not_checked] == ["backward.dslopes.shape0"]
    assert report.counts() == f"{len(report.checks) - 1} passed, 1 not checked of {len(report.checks)}"
    # control: the same candidate returning the parameter gradient is complete
    full = check_attention_backward(backward_candidate(mine), bias=ref, shapes=SMALL)
    assert full.passed, full.text()
    assert full.complete
    assert full["backward.dslopes.shape0"].status == "passed"


def test_missing_core_gradient_is_not_checked():
    def without_dq(q, k, v, d_out):
        grads = backward_candidate()(q, k, v, d_out)
        return {"dk": grads["dk"], "dv": grads["dv"]}

    report = check_attention_backward(without_dq, shapes=SMALL)
    assert report["backward.dq.shape0"].status == "not_checked", report.text()
    assert report["backward.dq.shape0"].summary.startswith("dq of case shape0 not returned by the candidate")
    assert report["backward.dk.shape0"].status == "passed"
    assert not report.complete


@pytest.mark.parametrize(
    "returned", [(None, None, None), {}, {"dq": None}, (None, None, None, {"slopes": None})], ids=str
)
def test_no_gradient_at_all_is_an_error(returned):
    report = check_attention_backward(lambda q, k, v, d_out: returned, bias=rp.ALiBi.from_num_heads(4), shapes=SMALL)
    assert {c.status for c in report.checks} == {"error"}, report.text()
    assert "candidate returned no gradient: each of dq, dk, dv, slopes is None or missing" in report.checks[0].summary
    assert not report.passed


def sequential_slope_candidate(bias: Bias, *, causal: bool, rel_error: float = 0.0):
    """The correct backward, but the slope gradient summed term by term in float32 in row-major order (one running
    sum, as an atomic-add kernel may): correct code with the least accurate common order; ``rel_error`` a mutant."""
    base = backward_candidate(bias, causal=causal)

    def candidate(q, k, v, d_out):
        out = base(q, k, v, d_out)
        if q.dtype != np.float32:
            return out
        qd, kd, vd, dod = (np.asarray(a, dtype=np.float32) for a in (q, k, v, d_out))
        sq, sk = q.shape[2], k.shape[2]
        delta = (sk - sq + np.arange(sq))[:, None] - np.arange(sk)[None, :]
        keep = delta >= 0 if causal else np.ones(delta.shape, dtype=bool)
        heads = np.arange(q.shape[1]) // (q.shape[1] // k.shape[1])
        z = qd @ np.swapaxes(kd[:, heads], -1, -2) * np.float32(1 / math.sqrt(q.shape[-1]))
        z = np.where(keep, z + bias.value(delta).astype(np.float32), -np.inf)
        p = np.exp(z - z.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        dp = dod @ np.swapaxes(vd[:, heads], -1, -2)
        dz = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
        terms = -(np.moveaxis(dz, 1, 0) * np.abs(delta).astype(np.float32)).reshape(q.shape[1], -1)
        out["slopes"] = np.cumsum(terms, axis=-1, dtype=np.float32)[:, -1] * np.float32(1 + rel_error)
        return out

    return candidate


LONG_ROWS = [AttentionShape(1, 4, 4, 255, 1023, 64)]


def test_parameter_gradient_summed_in_any_order_passes():
    # The reduction term of the rule (ceil(log2 N) u sum|terms|) admits the order; 2x the plain backward's error
    # alone does not always (FlexAttention's float32 slope gradient failed it by 1.7x).
    bias, fam = alibi4()
    r = check_attention_backward(sequential_slope_candidate(bias, causal=True), bias=fam, causal=True, shapes=LONG_ROWS)
    assert r.passed, r
    assert "pairwise-summation bound" in r["backward.dslopes.shape0"].tolerance


def test_parameter_gradient_off_by_a_thousandth_fails():
    bias, fam = alibi4()
    wrong = sequential_slope_candidate(bias, causal=True, rel_error=1e-3)
    r = check_attention_backward(wrong, bias=fam, causal=True, shapes=LONG_ROWS)
    assert r["backward.dslopes.shape0"].status == "failed"
