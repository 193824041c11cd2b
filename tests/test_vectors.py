"""Golden vectors: they still match their generator, and the library matches them on every backend and dtype."""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

import relpos_ref as rp
from relpos_ref import bounds

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
FILES = sorted(p.name for p in VECTORS.glob("*.json"))
EXPECTED_FILES = {
    "alibi.json",
    "attention.json",
    "features.json",
    "fire.json",
    "gradients.json",
    "kerple_log.json",
    "kerple_power.json",
    "offset.json",
    "sandwich.json",
    "softmax.json",
    "t5.json",
}


def _generator():
    spec = importlib.util.spec_from_file_location("relpos_vectors_generate", VECTORS / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load(name):
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


DOCS = {name: _load(name) for name in FILES}


# ---------------------------------------------------------------------------------------------------------------------
# Provenance and regeneration
# ---------------------------------------------------------------------------------------------------------------------


def test_every_file_is_present():
    assert set(FILES) == EXPECTED_FILES


@pytest.mark.parametrize("name", FILES)
def test_provenance_recorded(name):
    doc = DOCS[name]
    gen = doc["generator"]
    assert doc["schema_version"] == 1
    assert gen["script"] == "spec/vectors/generate.py"
    assert gen["command"].startswith("python spec/vectors/generate.py")
    assert gen["dps"] >= 50
    assert gen["digits"] >= 17
    assert isinstance(gen["mpmath_version"], str)
    assert gen["mpmath_version"]
    assert doc["cases"], "a vector file without cases tests nothing"
    ids = [c["id"] for c in doc["cases"]]
    assert len(ids) == len(set(ids)), "case ids must be unique"


@pytest.mark.parametrize("name", FILES)
def test_expected_strings_have_enough_digits(name):
    """Every finite, non-zero expected decimal carries at least 17 significant digits."""
    bad = []

    def walk(x):
        if isinstance(x, list):
            for t in x:
                walk(t)
        elif isinstance(x, dict):  # a family's parameter gradients, by name
            for t in x.values():
                walk(t)
        elif isinstance(x, str) and x not in ("inf", "-inf", "nan", "0.0"):
            mant = x.lower().split("e")[0].lstrip("-").replace(".", "").lstrip("0")
            if len(mant) < 17:
                bad.append(x)

    for case in DOCS[name]["cases"]:
        for key, val in case["expected"].items():
            if key == "probs_at":
                walk([v[2] for v in val])
            elif key != "bucket":
                walk(val)
    assert not bad, bad[:5]


# A fast subset: one case of every file (the cheap ones), regenerated and compared exactly.
FAST_SUBSET = [
    ("t5.json", "t5-bucket-B32-D128-bidirectional"),
    ("t5.json", "t5-bucket-B8-D20-causal"),
    ("offset.json", "offset-K3-H3"),
    ("alibi.json", "alibi-slopes-H12"),
    ("alibi.json", "alibi-bias-H8-float16-range"),
    ("kerple_power.json", "kerple-power-short"),
    ("kerple_log.json", "kerple-log-long"),
    ("fire.json", "fire-c0.125-L512-eps9.53674e-07"),
    ("sandwich.json", "sandwich-d32-H8-short"),
    ("softmax.json", "softmax-mask-fully-masked-nan"),
    ("softmax.json", "softmax-causal-Sq5-Sk3-bottom_right"),
    ("attention.json", "attention-mqa-Sq5-Sk3-bottom_right-fully-masked-zero"),
    ("gradients.json", "grad-alibi-H2-Sq4-Sk6-causal-post_scale"),
    ("features.json", "feat-softcap-c4-pre_scale-bias"),
    ("features.json", "feat-segments-lengths-packed-restart"),
    ("features.json", "grad-feat-lengths-B2-nan-d_lse"),
]


@pytest.mark.parametrize(("name", "case_id"), FAST_SUBSET, ids=[c for _, c in FAST_SUBSET])
def test_case_regenerates_identically(name, case_id):
    gen = _generator()
    committed = {c["id"]: c for c in DOCS[name]["cases"]}[case_id]
    fresh = json.loads(json.dumps(gen.build_case(name, case_id)))
    assert fresh == committed


@pytest.mark.slow
def test_all_files_regenerate_identically():
    """The whole generator (about 20 s, half of it the gradients; the default run regenerates FAST_SUBSET): cases
    identical to the committed files; header identical except the mpmath version string, which records the
    generating environment."""
    gen = _generator()
    for name in FILES:
        fresh = json.loads(gen.dumps(gen.build_file(name)))
        committed = DOCS[name]
        fresh["generator"].pop("mpmath_version")
        head = {k: v for k, v in committed.items() if k != "cases"}
        head["generator"] = {k: v for k, v in head["generator"].items() if k != "mpmath_version"}
        assert {k: v for k, v in fresh.items() if k != "cases"} == head, name
        assert len(fresh["cases"]) == len(committed["cases"]), name
        for a, b in zip(fresh["cases"], committed["cases"]):
            a, b = _negligible_atol_as_zero(a), _negligible_atol_as_zero(b)
            assert a == b, f"{name}: case {b['id']} differs from a fresh generation"


# A fitted atol below this is far under every case's rtol * |expected|; its exact value comes from underflow-level
# arithmetic in the bound evaluation and differs between hosts (measured: sandwich-d64-H8-short, float32 atol
# 1.41e-45 on one x86-64 host and 5.43e-20 on another, bfloat16 6.94e-18 and 4.60e-41), so it is compared as zero.
_NEGLIGIBLE_ATOL = 1e-15


def _negligible_atol_as_zero(case: dict) -> dict:
    tol = case.get("tolerance")
    if not isinstance(tol, dict):
        return case
    fixed = {
        dt: {**t, "atol": "0"} if isinstance(t, dict) and float(t.get("atol", 1)) < _NEGLIGIBLE_ATOL else t
        for dt, t in tol.items()
    }
    return {**case, "tolerance": fixed}


def test_required_coverage():
    """The issue's coverage list, checked on the committed data."""
    t5 = DOCS["t5.json"]["cases"]
    configs = {
        (c["options"]["num_buckets"], c["options"]["max_distance"], c["options"]["bidirectional"])
        for c in t5
        if c["kind"] == "bucket"
    }
    for nb, md in ((32, 128), (16, 128), (64, 256), (32, 256), (8, 20)):
        assert {(nb, md, True), (nb, md, False)} <= configs
    for c in t5:
        if c["kind"] == "bucket":
            mags = {abs(d) for d in c["delta"]}
            assert set(c["thresholds"]) <= mags
            assert 10**6 in mags
    assert {len(c["parameters"]["table"]) for c in t5 if c["kind"] == "bias"} >= {1, 12}
    alibi = DOCS["alibi.json"]["cases"]
    assert sorted(c["num_heads"] for c in alibi if c["kind"] == "slopes") == list(range(1, 257))
    assert max(max(c["q_pos"]) for c in alibi if c["kind"] == "bias") >= 10**6
    kp = DOCS["kerple_power.json"]["cases"]
    r2s = {float(x) for c in kp for x in c["parameters"]["r2"]}
    assert 2.0 in r2s
    assert min(r2s) < 0.01
    assert min(float(x) for c in kp for x in c["parameters"]["r1"]) < 1e-5
    fire = DOCS["fire.json"]["cases"]
    for c in fire:
        li = math.floor(float(c["parameters"]["L"]))
        assert {li - 1, li, li + 1} <= set(c["q_pos"]) or li <= 1
    cs = {float(c["parameters"]["c"]) for c in fire}
    assert min(cs) < 0.01
    assert max(cs) >= 10
    assert max(max(c["q_pos"]) for c in fire) >= 10**6
    assert {c["options"]["head_dim"] for c in DOCS["sandwich.json"]["cases"]} == {32, 64, 128}
    sm = DOCS["softmax.json"]["cases"]
    assert {c["placement"] for c in sm} == {"pre_scale", "post_scale"}
    assert {c["fully_masked"] for c in sm} == {"zero", "nan"}
    assert any(c.get("positions", {}).get("q_len", 0) > c.get("positions", {}).get("k_len", 0) for c in sm)
    assert any(isinstance(c["scores"], dict) and c["scores"]["shape"][-1] == 8192 for c in sm)
    att = DOCS["attention.json"]["cases"]
    assert any(_shape(c["q"])[1] != _shape(c["k"])[1] for c in att)
    assert {c["align"] for c in att} == {"bottom_right", "top_left"}
    assert any(_shape(c["k"])[2] == 8192 for c in att)


def test_gradient_coverage():
    """The required list of gradient vector cases, checked on the committed data."""
    grads = DOCS["gradients.json"]["cases"]
    fams = [c["family"] for c in grads if c["family"] is not None]
    names = {f["name"] for f in fams}
    assert names == {"alibi", "kerple_power", "kerple_log", "t5", "offset", "fire", "sandwich", "tensor"}
    assert {f["options"]["layout"] for f in fams if f["name"] == "t5"} == {"heads_buckets", "buckets_heads"}
    assert any(c["family"] is None and c["bias"] is None for c in grads), "a case without bias"
    assert any(c["bias"] is not None for c in grads), "a bias array"
    assert {c["placement"] for c in grads} == {"post_scale", "pre_scale"}
    assert {c["align"] for c in grads if c["causal"]} == {"bottom_right", "top_left"}
    sizes = [(_shape(c["q"])[2], _shape(c["k"])[2]) for c in grads]
    assert any(sq < sk for sq, sk in sizes)
    assert any(sq > sk for sq, sk in sizes)
    assert any(_shape(c["q"])[1] == 4 and _shape(c["k"])[1] == 2 for c in grads), "grouped-query heads"
    assert any(
        c["causal"]
        and c["align"] == "bottom_right"
        and _shape(c["q"])[2] > _shape(c["k"])[2]
        and c["fully_masked"] == "zero"
        for c in grads
    ), "fully masked rows in zero mode"
    assert any(c["d_lse"] is not None for c in grads)
    assert any(c["mask"] is not None for c in grads)
    for c in grads:
        assert {"float64", "float32"} <= set(c["dtypes"]), c["id"]
    ties = above = False
    for c in grads:
        if c["family"] is not None and c["family"]["name"] == "fire":
            sq, sk = _shape(c["q"])[2], _shape(c["k"])[2]
            start = sk - sq if c["align"] == "bottom_right" else 0
            big_l = float(c["family"]["parameters"]["L"])
            ties |= any(start + i == big_l for i in range(sq))
            above |= any(start + i > big_l for i in range(sq))
    assert ties, "a FIRE row with i == L"
    assert above, "a FIRE row with i > L"
    arrays = [f["parameters"]["array"] for f in fams if f["name"] == "tensor"]
    assert any("-inf" in list(_flatten(a)) for a in arrays), "a -inf entry in a tensor bias"


def test_feature_coverage():
    """features.json: the cases asked for per feature, checked on the committed data."""
    cases = DOCS["features.json"]["cases"]
    fwd = [c for c in cases if c["kind"] == "attention"]
    windows = [c for c in fwd if c["window"] is not None]
    assert any(None not in c["window"] for c in windows), "a window bounded on both sides"
    assert any(None in c["window"] for c in windows), "a one-sided window"
    assert any(c["causal"] for c in windows)
    assert any(_shape(c["q"])[2] != _shape(c["k"])[2] for c in windows)
    caps = [c for c in fwd if c["softcap"] is not None]
    assert {c["placement"] for c in caps} == {"post_scale", "pre_scale"}
    assert any(c["bias"] is None and c["family"] is None for c in caps)
    assert any(c["bias"] is not None or c["family"] is not None for c in caps)
    assert {float(c["softcap"]) for c in caps} >= {0.5, 64.0}, "logits far beyond and far below c"
    pos = [c for c in fwd if c["q_pos"] is not None]
    assert any(isinstance(c["q_pos"][0], list) for c in pos), "positions per batch row"
    assert any(min(_flatten(c["k_pos"])) > 0 for c in pos), "a KV-cache offset"
    lens = [c for c in fwd if c["q_lens"] is not None]
    assert {c["align"] for c in lens} == {"bottom_right", "top_left"}
    assert any(len(set(c["q_lens"])) > 1 for c in lens)
    segs = [c for c in fwd if c["q_segment_ids"] is not None]
    assert {c["segment_positions"] for c in segs} == {"global", "restart"}
    grads = [c for c in cases if c["kind"] == "attention_vjp"]
    for key in ("window", "softcap", "q_pos", "q_lens", "q_segment_ids"):
        assert any(c[key] is not None for c in grads), key
    for c in grads:
        assert _shape(c["q"])[2] <= 4, c["id"]
        assert _shape(c["k"])[2] <= 4, c["id"]
        assert _shape(c["q"])[3] <= 2, c["id"]


def _shape(x):
    if isinstance(x, dict):
        return tuple(x["shape"])
    shape = []
    while isinstance(x, list):
        shape.append(len(x))
        x = x[0]
    return tuple(shape)


# ---------------------------------------------------------------------------------------------------------------------
# The library against the vectors
# ---------------------------------------------------------------------------------------------------------------------


def _array(x):
    """Input (nested strings or a generated spec) -> float64 NumPy array."""
    if isinstance(x, dict):
        assert x["formula"] == "affine_mod"
        idx = np.indices(x["shape"])
        lin = sum(a * i for a, i in zip(x["a"], idx)) + x["c"]
        return ((lin % x["mod"]) - x["offset"]) / x["divisor"]
    return np.asarray(_floats(x), dtype=np.float64)


def _floats(x):
    return [_floats(t) for t in x] if isinstance(x, list) else float(x)


def _expected(x):
    """Expected decimal strings -> (hi, lo) float64 arrays with hi + lo equal to the decimal to ~1e-32 relative."""

    def one(sv):
        hi = float(sv)
        if not math.isfinite(hi):
            return hi, 0.0
        return hi, float(Decimal(sv) - Decimal(hi))

    flat = [one(sv) for sv in _flatten(x)]
    shape = _shape(x) if isinstance(x, list) else ()
    hi = np.array([f[0] for f in flat]).reshape(shape)
    lo = np.array([f[1] for f in flat]).reshape(shape)
    return hi, lo


def _flatten(x):
    if isinstance(x, list):
        for t in x:
            yield from _flatten(t)
    else:
        yield x


def _check(actual, expected, tol, what):
    hi, lo = _expected(expected)
    got = bounds.to_host(actual)
    assert got.shape == hi.shape, f"{what}: shape {got.shape}, expected {hi.shape}"
    finite = np.isfinite(hi)
    same_nonfinite = (got == hi) | (np.isnan(got) & np.isnan(hi))
    assert np.all(same_nonfinite[~finite]), f"{what}: non-finite expected values not reproduced"
    err = bounds.abs_error(got, hi, lo)
    allowed = float(tol["atol"]) + float(tol["rtol"]) * np.abs(np.where(finite, hi + lo, 0.0))
    bad = finite & ~(err <= allowed)
    if np.any(bad):
        i = tuple(int(t) for t in np.argwhere(bad)[0])
        pytest.fail(
            f"{what}: {int(bad.sum())} entries outside atol {tol['atol']} + rtol {tol['rtol']}; first at "
            f"{i}: got {got[i]!r}, expected {hi[i] + lo[i]!r}, error {err[i]:.3g} > {allowed[i]:.3g}"
        )


def _put(xp, a, dtype):
    a = np.asarray(a, dtype=np.float64)
    if dtype == "bfloat16":
        return xp.asarray(a.astype(bounds.np_dtype("bfloat16")))
    return xp.asarray(a, dtype=getattr(xp, dtype))


def _dtypes(case, xp):
    return [d for d in case["dtypes"] if bounds.xp_dtype(xp, d) is not None]


def _family(case, family, xp, dtype):
    p = {k: _put(xp, _array(v), dtype) for k, v in case["parameters"].items()}
    o = case["options"]
    if family == "t5":
        return rp.T5Bias(
            p["table"], bidirectional=o["bidirectional"], max_distance=o["max_distance"], layout=o["layout"]
        )
    if family == "offset":
        return rp.OffsetBias(p["table"])
    if family == "alibi":
        return rp.ALiBi(p["slopes"])
    if family == "kerple_power":
        return rp.KerplePower(p["r1"], p["r2"])
    if family == "kerple_log":
        return rp.KerpleLog(p["r1"], p["r2"])
    if family == "fire":
        return rp.FIRE(p["w1"], p["b1"], p["w2"], p["b2"], c=p["c"], L=p["L"], eps=float(o["eps"]))
    if family == "sandwich":
        return rp.Sandwich(o["num_heads"], o["head_dim"], dtype=bounds.xp_dtype(xp, dtype), xp=xp)
    if family == "tensor":
        return rp.TensorBias(p["array"])
    raise AssertionError(family)


CASES = [
    (name, case) for name in FILES for case in DOCS[name]["cases"] if case["kind"] not in ("slopes", "attention_vjp")
]
GRAD_CASES = [
    c for name in ("gradients.json", "features.json") for c in DOCS[name]["cases"] if c["kind"] == "attention_vjp"
]

#: The keywords of features.json cases, their JSON defaults, and how they reach the array code.
FEATURE_DEFAULTS = {
    "window": None,
    "softcap": None,
    "q_pos": None,
    "k_pos": None,
    "q_lens": None,
    "k_lens": None,
    "q_segment_ids": None,
    "k_segment_ids": None,
    "segment_positions": "global",
}


def _feature_kwargs(case, fn, xp):
    """The feature keywords a case uses, converted for the array code; skips (never passes) the case when ``fn``
    does not accept one of them yet."""
    used = [k for k, default in FEATURE_DEFAULTS.items() if case.get(k, default) != default]
    accepted = inspect.signature(fn).parameters
    for key in used:
        if key not in accepted:
            pytest.skip(f"array code lacks {key}")
    out = {}
    for key in used:
        val = case[key]
        if key == "window":
            out[key] = tuple(val)
        elif key == "softcap":
            out[key] = float(val)
        elif key == "segment_positions":
            out[key] = val
        else:
            out[key] = xp.asarray(np.asarray(val, dtype=np.int64))
    return out


def _bias_of(case, xp, dtype):
    """A case's bias: a family object (features.json may give one to a forward case), an array, or None."""
    if case.get("family") is not None:
        return _family(case["family"], case["family"]["name"], xp, dtype)
    return None if case["bias"] is None else _put(xp, _array(case["bias"]), dtype)


def _check_empty_rows_are_zero(out, case, what):
    """features.json: a row whose expected lse is -inf (padding, or nothing to attend under "zero") is exactly 0;
    the out tolerance is fitted without those rows, so this is checked on its own."""
    hi, _ = _expected(case["expected"]["lse"])
    got = bounds.to_host(out)
    empty = hi == -np.inf
    assert np.all(got[empty] == 0), f"{what}: rows with lse -inf must be exactly 0"


@pytest.mark.parametrize(("name", "case"), CASES, ids=[c["id"] for _, c in CASES])
def test_library_matches_vectors(xp, name, case):
    family = DOCS[name]["family"]
    kind = case["kind"]
    if kind == "bucket":
        o = case["options"]
        got = rp.t5_bucket(
            xp.asarray(case["delta"], dtype=xp.int64),
            bidirectional=o["bidirectional"],
            num_buckets=o["num_buckets"],
            max_distance=o["max_distance"],
        )
        assert bounds.to_host(got).tolist() == case["expected"]["bucket"]
        assert (
            list(
                rp.t5_bucket_thresholds(
                    bidirectional=o["bidirectional"], num_buckets=o["num_buckets"], max_distance=o["max_distance"]
                )
            )
            == case["thresholds"]
        )
        return
    dts = _dtypes(case, xp)
    assert dts, "no dtype of this case is available on this backend"
    for dtype in dts:
        what = f"{case['id']} [{dtype}]"
        if kind == "bias":
            fam = _family(case, family, xp, dtype)
            q = xp.asarray(case["q_pos"], dtype=xp.int64)
            k = xp.asarray(case["k_pos"], dtype=xp.int64)
            _check(fam.bias(q, k), case["expected"]["bias"], case["tolerance"][dtype], what)
        elif kind == "softmax":
            _run_softmax(case, xp, dtype, what)
        elif kind == "attention":
            _run_attention(case, xp, dtype, what)
        else:
            raise AssertionError(kind)


def _run_softmax(case, xp, dtype, what):
    if "positions" in case:
        pos = case["positions"]
        qp, kp = rp.positions(pos["q_len"], pos["k_len"], align=pos["align"], xp=xp)
        assert bounds.to_host(qp).tolist() == pos["q_pos"]
        assert bounds.to_host(kp).tolist() == pos["k_pos"]
        assert bounds.to_host(rp.causal_mask(qp, kp)).astype(int).tolist() == case["mask"]
    scores = _put(xp, _array(case["scores"]), dtype)
    bias = None if case["bias"] is None else _put(xp, _array(case["bias"]), dtype)
    mask = None if case["mask"] is None else xp.asarray(np.asarray(case["mask"], dtype=bool))
    probs, lse = rp.biased_softmax(
        scores,
        bias,
        mask=mask,
        scale=float(case["scale"]),
        placement=case["placement"],
        fully_masked=case["fully_masked"],
        return_lse=True,
    )
    tol = case["tolerance"][dtype]
    exp = case["expected"]
    _check(lse, exp["lse"], tol["lse"], what + " lse")
    if "probs" in exp:
        _check(probs, exp["probs"], tol["probs"], what + " probs")
    else:
        host = bounds.to_host(probs)
        rows = [r for r, _, _ in exp["probs_at"]]
        cols = [c for _, c, _ in exp["probs_at"]]
        _check(host[rows, cols], [v for _, _, v in exp["probs_at"]], tol["probs"], what + " probs_at")


def _run_attention(case, xp, dtype, what):
    features = _feature_kwargs(case, rp.attention, xp)
    q, k, v = (_put(xp, _array(case[n]), dtype) for n in ("q", "k", "v"))
    bias = _bias_of(case, xp, dtype)
    mask = None if case["mask"] is None else xp.asarray(np.asarray(case["mask"], dtype=bool))
    out, lse = rp.attention(
        q,
        k,
        v,
        bias=bias,
        causal=case["causal"],
        align=case["align"],
        scale=None if case["scale"] is None else float(case["scale"]),
        placement=case["placement"],
        mask=mask,
        fully_masked=case["fully_masked"],
        return_lse=True,
        **features,
    )
    tol = case["tolerance"][dtype]
    _check(out, case["expected"]["out"], tol["out"], what + " out")
    _check(lse, case["expected"]["lse"], tol["lse"], what + " lse")
    if "segment_positions" in case:
        _check_empty_rows_are_zero(out, case, what)


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c["id"] for c in GRAD_CASES])
def test_attention_vjp_matches_vectors(xp, case):
    """rp.attention_vjp against the central-difference oracle's gradients, within the running-error bound."""
    dts = _dtypes(case, xp)
    assert dts, "no dtype of this case is available on this backend"
    for dtype in dts:
        what = f"{case['id']} [{dtype}]"
        grads = _run_attention_vjp(case, xp, dtype)
        tol, exp = case["tolerance"][dtype], case["expected"]
        for name in ("dq", "dk", "dv"):
            _check(getattr(grads, name), exp[name], tol[name], f"{what} {name}")
        if exp["dbias"] is None:
            assert grads.dbias is None, f"{what}: dbias should be None without a bias"
        elif isinstance(exp["dbias"], dict):
            assert sorted(grads.dbias) == sorted(exp["dbias"]), f"{what}: parameter names {sorted(grads.dbias)}"
            for name, want in exp["dbias"].items():
                _check(grads.dbias[name], want, tol["dbias"][name], f"{what} d{name}")
        else:
            _check(grads.dbias, exp["dbias"], tol["dbias"], f"{what} dbias")


def _run_attention_vjp(case, xp, dtype):
    features = _feature_kwargs(case, rp.attention_vjp, xp)
    q, k, v, d_out = (_put(xp, _array(case[n]), dtype) for n in ("q", "k", "v", "d_out"))
    d_lse = None if case["d_lse"] is None else _put(xp, _array(case["d_lse"]), dtype)
    if case["family"] is not None:
        bias = _family(case["family"], case["family"]["name"], xp, dtype)
    else:
        bias = None if case["bias"] is None else _put(xp, _array(case["bias"]), dtype)
    mask = None if case["mask"] is None else xp.asarray(np.asarray(case["mask"], dtype=bool))
    return rp.attention_vjp(
        q,
        k,
        v,
        d_out,
        bias=bias,
        causal=case["causal"],
        align=case["align"],
        scale=None if case["scale"] is None else float(case["scale"]),
        placement=case["placement"],
        mask=mask,
        fully_masked=case["fully_masked"],
        d_lse=d_lse,
        **features,
    )


def test_alibi_slopes_match_vectors(xp):
    """All 256 slope cases in one test (they are tiny)."""
    for case in DOCS["alibi.json"]["cases"]:
        if case["kind"] != "slopes":
            continue
        for dtype in _dtypes(case, xp):
            got = rp.alibi_slopes(case["num_heads"], dtype=bounds.xp_dtype(xp, dtype), xp=xp)
            _check(got, case["expected"]["slopes"], case["tolerance"][dtype], f"{case['id']} [{dtype}]")


def test_feature_cases_are_skipped_not_passed_without_the_keyword():
    """The guard of features.json: an attention without a case's keyword skips the case with the keyword named."""

    def old_attention(q, k, v, *, bias=None, causal=False):
        raise AssertionError("must not be called")

    case = next(c for c in DOCS["features.json"]["cases"] if c["window"] is not None and c["softcap"] is None)
    with pytest.raises(pytest.skip.Exception, match="array code lacks window"):
        _feature_kwargs(case, old_attention, np)
    assert _feature_kwargs(case, lambda q, k, v, *, window=None: None, np) == {"window": tuple(case["window"])}
