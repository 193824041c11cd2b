"""The fused CUDA biased softmax on a GPU, against the float64 NumPy reference (``relpos_ref.biased_softmax``).

Every test here is marked ``gpu`` and skipped, with the reason, when CuPy cannot run kernels (conftest.py). The cases
(fused_cases.py) cover every family (in-kernel ALiBi, KERPLE power/log, T5 both modes, OffsetBias, Sandwich, FIRE;
TensorBias, plain arrays and an unknown family read from memory; no bias), both placements, both alignments with
Sq != Sk, causal masks and boolean masks, fully masked rows (zeros / NaN), lse, float32 / float16 / float64 scores,
-inf and NaN scores, rows that end mid-vector, short rows (warp kernels), long rows up to Sk = 40000 (block kernels up
to 32768, then the two-pass kernel), decode (Sq = 1), explicit and non-affine positions, non-contiguous and 3-D
inputs. The error model is in fused_cases.py; the same cases run on the CPU emulation in test_cuda_emulated.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import relpos_ref as rp
from relpos_ref.cuda import fused_biased_softmax
from tests.cuda.feature_cases import FEATURE_CASES, FEATURE_MUTANT_CASE, FeatureCase, build_feature
from tests.support.fused_cases import FAMILIES, Case, build, check, family_sweep, special_cases

pytestmark = pytest.mark.gpu

SWEEP = family_sweep([(2, 3, 5, 37), (1, 3, 7, 128), (2, 2, 3, 1000), (1, 2, 3, 4099)], ["float32", "float16"])
SPECIALS = special_cases()
LONG_SK = (2048, 4096, 8192, 16384, 32768, 40000)
LONG = [
    Case(fam, (1, 2, 2, sk), dtype, causal=True, seed=sk + k)
    for k, fam in enumerate(("alibi", "t5_causal", "fire"))
    for dtype in ("float32", "float16")
    for sk in LONG_SK
]
LONG += [
    Case(fam, (1, 2, 2, sk), dtype, causal=True, align="top_left", seed=sk)
    for fam in ("sandwich", "kerple_power", "none", "tensor_array")
    for dtype in ("float32", "float16")
    for sk in (4096, 32768)
]
LONG += [Case("alibi", (1, 2, 4, sk), "float32", specials="spike", seed=sk) for sk in (1024, *LONG_SK)]
LONG += [Case("alibi", (1, 1, 2, sk), "float32", causal=True, seed=sk) for sk in (4095, 32767, 32769)]  # scalar
DECODE = [
    Case(fam, (2, 4, 1, sk), dtype, causal=True, seed=sk)
    for fam in ("alibi", "fire", "t5_causal")
    for dtype in ("float32", "float16")
    for sk in (1, 17, 4096, 32768)
]
DECODE += [Case("fire", (2, 4, 1, 4096), "float32", causal=True, positions="shifted")]
DOUBLES = [Case(fam, (1, 2, 3, 45), "float64", causal=True, seed=k) for k, fam in enumerate(FAMILIES)]
DOUBLES += [
    Case("alibi", (1, 2, 2, 4096), "float64", causal=True),
    Case("fire", (1, 2, 2, 16384), "float64", causal=True),
    Case("t5_bidirectional", (1, 2, 2, 20000), "float64"),  # float64 rows > 16384: the two-pass kernel
]
CASES = SWEEP + SPECIALS + LONG + DECODE + DOUBLES


@pytest.fixture(scope="module", autouse=True)
def _allocator():
    """RELPOS_REF_NO_POOL=1 (bench/gpu_check.sh under compute-sanitizer): plain cudaMalloc per array, so memcheck
    sees the true bounds of every input and output instead of a pool block."""
    if os.environ.get("RELPOS_REF_NO_POOL") != "1":
        yield
        return
    import cupy as cp

    cp.cuda.set_allocator(None)
    yield
    cp.cuda.set_allocator(cp.get_default_memory_pool().malloc)


_ids = [c.id for c in CASES]
assert len(set(_ids)) == len(_ids), "case ids must be unique"


def to_cupy_inputs(built, *, family_on_device: bool):
    import array_api_compat.cupy as cpx
    import cupy as cp

    case = built.case
    scores = cp.asarray(built.scores)
    if case.noncontiguous:
        scores = cp.ascontiguousarray(cp.swapaxes(scores, -1, -2)).swapaxes(-1, -2)
        assert not scores.flags.c_contiguous
    bias = built.bias
    if isinstance(bias, np.ndarray):
        bias = cp.asarray(bias)
    elif bias is not None and family_on_device:
        bias = bias.astype(xp=cpx)
    mask = None if built.mask is None else cp.asarray(built.mask)
    q_pos, k_pos = built.q_pos, built.k_pos
    if q_pos is not None and family_on_device:
        q_pos, k_pos = cp.asarray(q_pos), cp.asarray(k_pos)
    return scores, bias, mask, q_pos, k_pos


def run_fused(built, *, family_on_device: bool = False):
    import cupy as cp

    case = built.case
    scores, bias, mask, q_pos, k_pos = to_cupy_inputs(built, family_on_device=family_on_device)
    before = scores.copy()
    out = fused_biased_softmax(
        scores,
        bias,
        q_pos=q_pos,
        k_pos=k_pos,
        align=case.align,
        causal=case.causal,
        mask=mask,
        scale=case.scale,
        placement=case.placement,
        fully_masked=case.fully_masked,
        return_lse=case.return_lse,
    )
    probs, lse = out if case.return_lse else (out, None)
    assert cp.array_equal(scores, before, equal_nan=True), "the input scores must not be modified"
    return probs.get(), (None if lse is None else lse.get())


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_fused_matches_reference(case):
    built = build(case)
    probs, lse = run_fused(built, family_on_device=case.seed % 2 == 1)
    check(built, probs, lse)


@pytest.mark.parametrize("fam", [f for f in FAMILIES if f not in ("none", "tensor_array")])
def test_family_parameters_on_device_or_host_agree(fam):
    """A family whose parameters live on the GPU and the same family on NumPy give identical probabilities."""
    built = build(Case(fam, (2, 3, 4, 300), "float32", causal=True, seed=11))
    a, _ = run_fused(built, family_on_device=False)
    b, _ = run_fused(built, family_on_device=True)
    np.testing.assert_array_equal(a, b)


def test_deterministic():
    built = build(Case("fire", (2, 4, 8, 5000), "float32", causal=True))
    a, la = run_fused(built)
    b, lb = run_fused(built)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fam=st.sampled_from(FAMILIES),
    dtype=st.sampled_from(["float32", "float16"]),
    sq=st.integers(1, 6),
    sk=st.sampled_from([1, 2, 31, 33, 64, 100, 257, 1023, 1024, 1025, 2050, 5000]),
    causal=st.booleans(),
    align=st.sampled_from(["bottom_right", "top_left"]),
    placement=st.sampled_from(["post_scale", "pre_scale"]),
    scale=st.sampled_from([0.05, 0.125, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_random_cases(fam, dtype, sq, sk, causal, align, placement, scale, seed):
    case = Case(fam, (2, 3, sq, sk), dtype, causal=causal, align=align, placement=placement, scale=scale, seed=seed)
    built = build(case)
    probs, lse = run_fused(built)
    check(built, probs, lse)


def test_fused_errors():
    import cupy as cp

    scores = cp.zeros((1, 2, 3, 4), dtype=cp.float32)
    with pytest.raises(TypeError, match="bias: expected a BiasFamily or a CuPy array"):
        fused_biased_softmax(scores, np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="bias: expected a family with num_heads == 2"):
        fused_biased_softmax(scores, rp.ALiBi.from_num_heads(3))
    with pytest.raises(TypeError, match="mask: expected a CuPy boolean array"):
        fused_biased_softmax(scores, mask=np.ones((3, 4), bool))
    with pytest.raises(ValueError, match="mask: expected a shape broadcastable"):
        fused_biased_softmax(scores, mask=cp.ones((3, 5), bool))
    with pytest.raises(ValueError, match="q_pos: expected shape"):
        fused_biased_softmax(scores, q_pos=np.arange(4), k_pos=np.arange(4))
    with pytest.raises(ValueError, match="q_pos, k_pos: expected both"):
        fused_biased_softmax(scores, q_pos=np.arange(3))
    with pytest.raises(TypeError, match="scores: expected dtype"):
        fused_biased_softmax(scores.astype(cp.int32))
    with pytest.raises(ValueError, match="scale"):
        fused_biased_softmax(scores, scale=0.0)
    with pytest.raises(ValueError, match="placement"):
        fused_biased_softmax(scores, placement="inside")
    with pytest.raises(ValueError, match="positions of magnitude"):
        fused_biased_softmax(scores, q_pos=np.full(3, 2**30), k_pos=np.arange(4))


# ---- thread-block cluster kernels (compute capability 9.0+, RELPOS_REF_CUDA_CLUSTERS) --------------------------------
# A small policy ("0:2x32x4,4x64x4,8x32x8") spreads rows of a few hundred keys over 2, 4 and 8 blocks: pieces past
# the row end, pieces with nothing attended, every family, dtype and special case. The default policy ("1") runs at
# the lengths it serves. The same cases run on the CPU emulation (test_cuda_emulated.py); here the hardware's cluster
# barrier, distributed shared memory and scheduling are under test.
SMALL_CLUSTERS = "0:2x32x4,4x64x4,8x32x8"
# Every kernel instantiation is an NVRTC compilation of about a second that the warm stage of gpu_check.sh does not
# cover for this policy, so the small-policy cases are limited to some 40 kernels: every family once, two families
# in every dtype and piece shape, and the special cases (mostly ALiBi float32).
CLUSTER_CASES = [
    (c, SMALL_CLUSTERS)
    for c in family_sweep([(1, 2, 3, 999)], ["float32"])
    + [
        Case(fam, shape, dtype, causal=k % 2 == 0, align=("bottom_right", "top_left")[k % 3 == 0], seed=k)
        for k, (fam, dtype, shape) in enumerate(
            (fam, dtype, shape)
            for fam in ("alibi", "fire")
            for dtype in ("float32", "float16", "float64")
            for shape in ((2, 3, 5, 200), (1, 2, 2, 2000))
        )
    ]
    + special_cases(sk_small=300)
    + [Case("alibi", (1, 2, 3, 999), "float32", causal=True, positions="random", specials="spike", seed=31)]
]
CLUSTER_CASES += [
    (c.with_(seed=c.seed + 7), "1")
    for c in LONG + DECODE + DOUBLES
    if c.shape[-1] > (16384 if c.dtype == "float64" else 8192)
]
CLUSTER_CASES += [
    (Case(fam, (1, 2, 2, 65536), dtype, causal=True, seed=5), "1")
    for fam in ("alibi", "t5_causal", "fire")
    for dtype in ("float32", "float16")
]
CLUSTER_CASES += [
    (Case("alibi", (1, 2, 2, 65536), "float64", causal=True, specials="spike", seed=6), "1"),
    (Case("kerple_log", (1, 2, 2, 16385), "float32", causal=True, mask="keys", seed=7), "1"),  # scalar, idle pieces
]
_cluster_ids = [f"{'small' if pol == SMALL_CLUSTERS else 'default'}-{c.id}" for c, pol in CLUSTER_CASES]
assert len(set(_cluster_ids)) == len(_cluster_ids), "cluster case ids must be unique"


@pytest.fixture
def clusters_on(monkeypatch):
    """Skips (saying why) on GPUs without thread-block clusters; returns a setter for RELPOS_REF_CUDA_CLUSTERS."""
    import cupy as cp

    cc = int(cp.cuda.Device().compute_capability)
    if cc < 90:
        pytest.skip(f"thread-block clusters need compute capability 9.0 or later; this GPU has {cc // 10}.{cc % 10}")

    def enable(value: str) -> None:
        monkeypatch.setenv("RELPOS_REF_CUDA_CLUSTERS", value)

    return enable


def _assert_cluster_launch(built):
    """The policy in force really sends this case to the cluster kernel (a silent fallback would test nothing)."""
    from relpos_ref.cuda._launch import _device_cluster_policy
    from relpos_ref.cuda._source import plan_launch

    case = built.case
    plan = plan_launch(case.shape[-1], case.dtype, clusters=_device_cluster_policy(case.dtype))
    assert plan.kind == "cluster", plan


@pytest.mark.parametrize(("case", "policy"), CLUSTER_CASES, ids=_cluster_ids)
def test_cluster_kernel_matches_reference(case, policy, clusters_on):
    clusters_on(policy)
    built = build(case)
    _assert_cluster_launch(built)
    probs, lse = run_fused(built, family_on_device=case.seed % 2 == 1)
    check(built, probs, lse)


def test_cluster_kernel_deterministic_and_close_to_one_block(clusters_on, monkeypatch):
    """Two runs of the cluster kernel agree bit for bit; the one-block kernel on the same input agrees within the
    error model (both are checked against the reference as well)."""
    built = build(Case("fire", (2, 4, 8, 16384), "float32", causal=True, seed=3))
    clusters_on("1")
    _assert_cluster_launch(built)
    a, la = run_fused(built)
    b, lb = run_fused(built)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    check(built, a, la)
    monkeypatch.setenv("RELPOS_REF_CUDA_CLUSTERS", "0")
    c, lc = run_fused(built)
    check(built, c, lc)


def test_kernel_attributes_readable():
    """The RawModule route works on this toolkit (CuPy 14 / CUDA 13 on the GPU box): attributes of compiled kernels."""
    from relpos_ref.cuda._launch import _function
    from relpos_ref.cuda._source import plan_launch

    for sk in (128, 4096, 32768, 40000):
        k = _function(plan_launch(sk, "float32").kernel_name("alibi", "float32"))
        assert k.num_regs > 0
        assert k.max_threads_per_block >= plan_launch(sk, "float32").block


# ---- window and softcap (feature_cases.py; the same cases run on the CPU emulation in test_emulated.py) ----------


def run_fused_features(fc, built):
    case = built.case
    scores, bias, mask, q_pos, k_pos = to_cupy_inputs(built, family_on_device=False)
    out = fused_biased_softmax(
        scores, bias, q_pos=q_pos, k_pos=k_pos, align=case.align, causal=case.causal, mask=mask, scale=case.scale,
        placement=case.placement, fully_masked=case.fully_masked, return_lse=case.return_lse, window=fc.window,
        softcap=fc.softcap,
    )  # fmt: skip
    probs, lse = out if case.return_lse else (out, None)
    return probs.get(), (None if lse is None else lse.get())


@pytest.mark.parametrize("fc", FEATURE_CASES, ids=[fc.id for fc in FEATURE_CASES])
def test_fused_window_softcap_match_reference(fc):
    """The real kernel with a window and/or softcap against the float64 reference with the same features."""
    built = build_feature(fc)
    check(built, *run_fused_features(fc, built))


def test_fused_window_softcap_check_rejects_the_features_dropped():
    """The comparison can fail on the device: the kernel run without the window and softcap misses the reference
    that has them."""
    fc = FEATURE_MUTANT_CASE
    built = build_feature(fc)
    plain = FeatureCase(fc.case)
    with pytest.raises(AssertionError):
        check(built, *run_fused_features(plain, built))


def test_fused_window_softcap_on_cluster_kernel(clusters_on):
    """A row long enough for the default cluster policy, with a window and a softcap."""
    clusters_on("1")
    fc = FeatureCase(Case("alibi", (1, 1, 2, 16384), "float32", causal=True, seed=3), window=(3000, None), softcap=2.0)
    built = build_feature(fc)
    _assert_cluster_launch(built)
    check(built, *run_fused_features(fc, built))
