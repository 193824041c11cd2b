"""The fused CUDA path through the public API: biased_softmax(backend="fused") and attention(backend="fused").

GPU-only (marker ``gpu``); the kernel itself is tested in test_fused_gpu.py. Here the point is the wiring: the same
arguments give the reference result within float rounding, and non-CuPy inputs get a clear error.
"""

from __future__ import annotations

import numpy as np
import pytest

import relpos_ref as rp
from relpos_ref.testing import to_numpy


def test_fused_rejects_numpy_inputs():
    with pytest.raises(TypeError, match="scores"):
        rp.biased_softmax(np.zeros((1, 2, 3, 4)), backend="fused")
    q = np.zeros((1, 2, 3, 4))
    with pytest.raises(TypeError, match="q: expected a CuPy array"):
        rp.attention(q, q, q, backend="fused")
    with pytest.raises(ValueError, match="backend"):
        rp.attention(q, q, q, backend="cuda")


def _families(xp, h):
    rng = np.random.default_rng(0)
    fams = [
        rp.ALiBi.from_num_heads(h),
        rp.T5Bias(rng.standard_normal((h, 32)), bidirectional=False, layout="heads_buckets"),
        rp.KerplePower(rng.uniform(0.1, 1, h), rng.uniform(0.1, 2, h)),
        rp.FIRE(
            rng.standard_normal((8, 1)), rng.standard_normal(8), rng.standard_normal((h, 8)), rng.standard_normal(h)
        ),
        rp.Sandwich(h, 16),
    ]
    return [f.astype(xp=xp) for f in fams]


@pytest.mark.gpu
@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
@pytest.mark.parametrize("placement", ["post_scale", "pre_scale"])
def test_attention_fused_matches_reference(align, placement):
    import array_api_compat.cupy as xp

    rng = np.random.default_rng(1)
    q = xp.asarray(rng.standard_normal((2, 4, 37, 16)))
    k = xp.asarray(rng.standard_normal((2, 2, 53, 16)))
    v = xp.asarray(rng.standard_normal((2, 2, 53, 8)))
    for fam in _families(xp, 4):
        kw = {"bias": fam, "causal": True, "align": align, "placement": placement, "return_lse": True}
        ref_o, ref_l = rp.attention(q, k, v, **kw)
        got_o, got_l = rp.attention(q, k, v, backend="fused", block_size=16, **kw)
        np.testing.assert_allclose(to_numpy(got_o), to_numpy(ref_o), rtol=1e-12, atol=1e-12, err_msg=repr(fam))
        np.testing.assert_allclose(to_numpy(got_l), to_numpy(ref_l), rtol=1e-12, atol=1e-12, err_msg=repr(fam))


@pytest.mark.gpu
def test_biased_softmax_fused_matches_reference():
    import array_api_compat.cupy as xp

    rng = np.random.default_rng(2)
    s = xp.asarray(rng.standard_normal((2, 3, 5, 700)).astype(np.float32))
    b = xp.asarray(rng.standard_normal((3, 5, 700)).astype(np.float32))
    m = xp.asarray(rng.random((5, 700)) > 0.3)
    ref_p, ref_l = rp.biased_softmax(s, b, mask=m, scale=0.125, return_lse=True)
    got_p, got_l = rp.biased_softmax(s, b, mask=m, scale=0.125, return_lse=True, backend="fused")
    np.testing.assert_allclose(to_numpy(got_p), to_numpy(ref_p), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(to_numpy(got_l), to_numpy(ref_l), rtol=2e-6, atol=1e-6)


# ---- window and softcap of fused_biased_softmax: argument checks (no GPU: the launch preparation on NumPy) -------


def _prepare_numpy(dtype="float32", **kw):
    from relpos_ref.cuda._launch import _prepare
    from tests.cuda.test_emulated import _probe

    scores = np.zeros((1, 2, 3, 4), dtype=dtype)
    args = {"q_pos": None, "k_pos": None, "align": "bottom_right", "causal": False, "mask": None, "scale": 1.0,
            "placement": "post_scale", "fully_masked": "zero", "return_lse": False}  # fmt: skip
    return _prepare(_probe(), scores, rp.ALiBi.from_num_heads(2), **args, **kw)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"window": 3}, TypeError, r"window: expected a pair"),
        ({"window": (1, 2, 3)}, TypeError, r"window: expected a pair"),
        ({"window": (-1, 2)}, ValueError, r"window\[0\]"),
        ({"window": (2, -1)}, ValueError, r"window\[1\]"),
        ({"window": (1.5, 2)}, TypeError, r"window\[0\]"),
        ({"window": (True, 2)}, TypeError, r"window\[0\]"),
        ({"softcap": 0.0}, ValueError, r"softcap: expected a number > 0"),
        ({"softcap": -2.0}, ValueError, r"softcap: expected a number > 0"),
        ({"softcap": float("inf")}, ValueError, r"softcap: expected a finite number"),
        ({"softcap": float("nan")}, ValueError, r"softcap: expected a finite number"),
        ({"softcap": "2"}, TypeError, r"softcap: expected a real number"),
        ({"softcap": True}, TypeError, r"softcap: expected a real number"),
        ({"softcap": 1e-40}, ValueError, r"softcap: expected a value in .* for float32"),
        ({"softcap": 1e39}, ValueError, r"softcap: expected a value in .* for float32"),
    ],
)
def test_fused_rejects_bad_window_and_softcap(kw, error, match):
    with pytest.raises(error, match=match):
        _prepare_numpy(**kw)


def test_fused_accepts_good_window_and_softcap():
    """The rejections above are the arguments' (the same call with valid ones prepares a launch), and float64
    arithmetic accepts softcaps beyond the float32 range."""
    for kw in ({"window": (0, None)}, {"window": [None, 0]}, {"window": (None, None)}, {"softcap": 30},
               {"window": (2**40, 3), "softcap": 1e-30}):  # fmt: skip
        assert _prepare_numpy(**kw).name
    assert _prepare_numpy("float64", softcap=1e-40).name
    assert _prepare_numpy("float64", softcap=1e39).name


def test_fused_window_softcap_keywords_only_on_fused_biased_softmax():
    """window/softcap are keywords of fused_biased_softmax (checked after the CuPy test on scores), not of
    biased_softmax."""
    import inspect

    from relpos_ref.cuda import fused_biased_softmax

    params = inspect.signature(fused_biased_softmax).parameters
    assert params["window"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["softcap"].kind is inspect.Parameter.KEYWORD_ONLY
    assert "window" not in inspect.signature(rp.biased_softmax).parameters
    with pytest.raises(TypeError, match="scores"):
        fused_biased_softmax(np.zeros((1, 2, 3, 4), np.float32), window=(1, 1), softcap=2.0)
