"""CUDA source checks that need no GPU: NVRTC compiles the kernels to PTX for sm_80 and sm_90, the source stays
include-free, importing relpos_ref.cuda never touches CUDA, and the fused entry point rejects non-CuPy input.

NVRTC needs no device (NVIDIA NVRTC guide, section 2.1); CuPy's ``RawModule`` does (it asks the device for its
architecture), so these tests drive CuPy's low-level NVRTC bindings with an explicit ``-arch``. They skip, saying
why, when CuPy or libnvrtc is missing (``pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12``).

The default run compiles every family x dtype for a representative subset of launch shapes (warp, block and stream
kernels, vector and scalar accesses); ``RELPOS_REF_FULL_COMPILE=1`` compiles all instantiations the launcher can
pick (about 870, a minute or two per architecture).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from relpos_ref.cuda._source import (
    CLUSTER_POLICIES,
    FAMILY_STRUCTS,
    STORAGE_TYPES,
    ClusterPolicy,
    all_kernel_names,
    cluster_policy,
    kernel_source,
    plan_launch,
)


def _nvrtc_reason() -> str | None:
    try:
        from relpos_ref.cuda._nvrtc import nvrtc_module

        nvrtc_module()
    except ImportError as exc:
        return f"NVRTC unavailable: {exc} (install cupy-cuda12x and nvidia-cuda-nvrtc-cu12)"
    return None


NVRTC_REASON = _nvrtc_reason()
needs_nvrtc = pytest.mark.skipif(NVRTC_REASON is not None, reason=NVRTC_REASON or "")


def representative_plans(dtype: str) -> list:
    """Warp with vectors, warp scalar, small block, largest block, stream."""
    return [
        plan_launch(128, dtype),
        plan_launch(1000 + 3, dtype),  # 1003 keys: warp, 32 values per lane, scalar accesses
        plan_launch(4096, dtype),
        plan_launch(32768 if dtype != "float64" else 16384, dtype, vector_ok=False),
        plan_launch(100_000, dtype),
    ]


def representative_names() -> list[str]:
    """Every family x dtype on each representative launch shape (the full matrix: 136 kernels)."""
    names = {p.kernel_name(fam, dtype) for dtype in STORAGE_TYPES for p in representative_plans(dtype)
             for fam in FAMILY_STRUCTS}  # fmt: skip
    return [*sorted(names), "rp::sandwich_profile_kernel"]


def covering_names(shift: int) -> list[str]:
    """A subset of :func:`representative_names` in which every (family, dtype) pair and every (launch shape,
    dtype) pair occurs: family f of dtype d on shape (f + d + shift) mod 5. A different ``shift`` per architecture
    puts different families on each shape, so the default run covers more of the matrix than one subset would."""
    names = set()
    for d, dtype in enumerate(STORAGE_TYPES):
        plans = representative_plans(dtype)
        for f, fam in enumerate(FAMILY_STRUCTS):
            names.add(plans[(f + d + shift) % len(plans)].kernel_name(fam, dtype))
    return [*sorted(names), "rp::sandwich_profile_kernel"]


def full_compile() -> bool:
    """RELPOS_REF_FULL_COMPILE=1: the default test compiles every instantiation the launcher can pick."""
    return os.environ.get("RELPOS_REF_FULL_COMPILE") == "1"


ARCH_SHIFT = {"compute_80": 0, "compute_90": 2}


def selected_names(arch: str) -> list[str]:
    return all_kernel_names() if full_compile() else covering_names(ARCH_SHIFT[arch])


def rest_of_matrix(arch: str) -> list[str]:
    """The representative kernels the default test does not compile for ``arch`` (the slow test's share)."""
    done = set(selected_names(arch))
    return [n for n in representative_names() if n not in done]


def _check_ptx(names: list[str], arch: str) -> None:
    from relpos_ref.cuda._nvrtc import nvrtc_compile

    res = nvrtc_compile(names, arch)
    ptx = res.output.decode()
    assert f".target sm_{arch.split('_')[1]}" in ptx
    for name in names:
        lowered = res.lowered[name]
        assert re.search(rf"\.entry {re.escape(lowered)}\s*\(", ptx), f"no PTX entry for {name}"
    # NVRTC warnings are errors waiting to happen on the other toolkit (CUDA 12 here, 13 on the GPU box).
    assert "warning" not in res.log.lower(), res.log


@needs_nvrtc
@pytest.mark.cuda_compile
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_nvrtc_compiles_to_ptx(arch):
    """Every family and every launch shape of each dtype (28 kernels); the rest of the matrix is the slow test's."""
    _check_ptx(selected_names(arch), arch)


@needs_nvrtc
@pytest.mark.cuda_compile
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_nvrtc_compiles_rest_of_matrix_to_ptx(arch):
    """With the default test, every family x dtype x representative launch shape compiles for ``arch``."""
    names = rest_of_matrix(arch)
    if not names:
        pytest.skip("RELPOS_REF_FULL_COMPILE=1: the default test compiled every instantiation")
    _check_ptx(names, arch)


def test_default_and_slow_compiles_cover_the_matrix_once():
    """The default subset covers every (family, dtype) and (launch shape, dtype) pair; with the slow test's share
    it is exactly the representative matrix, no kernel compiled twice."""
    full = set(representative_names())
    for arch, shift in ARCH_SHIFT.items():
        subset = covering_names(shift)
        assert set(subset) <= full
        for dtype in STORAGE_TYPES:
            for fam in FAMILY_STRUCTS:
                assert any(n == p.kernel_name(fam, dtype) for p in representative_plans(dtype) for n in subset)
            for p in representative_plans(dtype):
                assert any(n == p.kernel_name(fam, dtype) for fam in FAMILY_STRUCTS for n in subset)
        if not full_compile():
            rest = rest_of_matrix(arch)
            assert not set(rest) & set(subset)
            assert set(rest) | set(subset) == full
    assert covering_names(0) != covering_names(2)


def diagonal(rows: int, cols: int, shift: int = 0) -> list[tuple[int, int]]:
    """max(rows, cols) cells (row, col) of a shifted diagonal: every row and every column occurs at least once."""
    return [((k + shift) % rows, k % cols) for k in range(max(rows, cols))]


# The benchmarked kernels of the spill check: (dtype, keys) x family.
SPILL_SHAPES = [(dtype, sk) for dtype in ("float32", "float16") for sk in (1024, 4096, 32768)]
SPILL_FAMILIES = ("none", "alibi", "t5", "fire")


def spill_names(which: str) -> list[str]:
    """The kernels of ``which`` ("default" or "rest") of the spill matrix. Default: every shape and every family,
    and all families on the 1024-thread x 32-value float32 block (the tightest register budget). Rest: the others
    (slow)."""
    cells = set(diagonal(len(SPILL_SHAPES), len(SPILL_FAMILIES)))
    cells |= {(SPILL_SHAPES.index(("float32", 32768)), f) for f in range(len(SPILL_FAMILIES))}
    if which == "rest":
        cells = {(r, c) for r in range(len(SPILL_SHAPES)) for c in range(len(SPILL_FAMILIES))} - cells
    return sorted(
        plan_launch(SPILL_SHAPES[r][1], SPILL_SHAPES[r][0]).kernel_name(SPILL_FAMILIES[c], SPILL_SHAPES[r][0])
        for r, c in cells
    )


def _check_spills(names: list[str]) -> None:
    from relpos_ref.cuda._nvrtc import resource_usage

    usage = resource_usage(names, "sm_90")
    assert set(usage) == set(names)
    for name, u in usage.items():
        assert u["registers"] <= 255
        assert u["spill_stores"] <= 160, f"{name} spills: {u}"


@needs_nvrtc
@pytest.mark.cuda_compile
@pytest.mark.parametrize("which", ["default", pytest.param("rest", marks=pytest.mark.slow)])
def test_register_spills_bounded_sm90(which):
    """ptxas -v through NVRTC for sm_90: the benchmarked kernels (float32/float16; ALiBi, T5, FIRE, no bias; warp,
    4096-key block, 32768-key block) compile with at most 160 bytes of spill stores. The default run checks a
    covering subset (:func:`spill_names`), the slow run the rest of the matrix.

    Small spill counts are expected in two places: around calls to the IEEE division and libm slow paths (registers
    saved across a call are counted as spills; the calls sit on rarely taken branches), and in the 1024-thread x
    32-value block kernels, where the 64-register cap of a full 1024-thread block applies and 32 of them hold the
    row. A change that makes the row array itself spill (hundreds of bytes) fails here. ``bench/cuda_resources.py``
    reports every instantiation.
    """
    _check_spills(spill_names(which))


def cluster_shapes() -> list[tuple[str, tuple[int, int, int]]]:
    """(dtype, (blocks per cluster, threads, values per thread)) of the default cluster policies."""
    return [
        (dtype, cfg)
        for dtype in STORAGE_TYPES
        for cfg in CLUSTER_POLICIES["double" if dtype == "float64" else "float"].configs
    ]


def _cluster_name(dtype: str, cfg: tuple[int, int, int], fam: str, vector_ok: bool = True) -> str:
    policy = CLUSTER_POLICIES["double" if dtype == "float64" else "float"]
    c, nt, vpt = cfg
    plan = plan_launch(c * nt * vpt, dtype, vector_ok=vector_ok, clusters=policy)
    assert plan.kind == "cluster"
    return plan.kernel_name(fam, dtype)


def cluster_names(vector_ok: bool = True) -> list[str]:
    """The default cluster kernels, every family x dtype x configuration (vector accesses, or scalar)."""
    return sorted({_cluster_name(d, cfg, fam, vector_ok) for d, cfg in cluster_shapes() for fam in FAMILY_STRUCTS})


def cluster_ptx_names(which: str) -> list[str]:
    """The kernels of ``which`` ("default" or "rest") of the cluster matrix. Default: per dtype, every configuration
    and every family (a diagonal), and two scalar-access kernels. Rest: the other vector kernels and four more
    scalar ones (slow). Together: the whole cluster matrix."""
    fams = list(FAMILY_STRUCTS)
    default = set()
    for d, dtype in enumerate(STORAGE_TYPES):
        shapes = [cfg for dt, cfg in cluster_shapes() if dt == dtype]
        default |= {_cluster_name(dtype, shapes[r], fams[c]) for r, c in diagonal(len(shapes), len(fams), d)}
    scalar = cluster_names(vector_ok=False)[:6]
    if which == "default":
        return sorted(default) + scalar[:2]
    return sorted(set(cluster_names()) - default) + scalar[2:]


@needs_nvrtc
@pytest.mark.cuda_compile
@pytest.mark.parametrize("which", ["default", pytest.param("rest", marks=pytest.mark.slow)])
def test_nvrtc_compiles_cluster_kernels_sm90(which):
    """The cluster kernels compile for sm_90 with their cluster size fixed in the PTX (.reqnctapercluster, so a plain
    launch gets clusters), the split cluster barrier and distributed-shared-memory address mapping."""
    from relpos_ref.cuda._nvrtc import nvrtc_compile

    names = cluster_ptx_names(which)
    res = nvrtc_compile(names, "compute_90")
    ptx = res.output.decode()
    assert "warning" not in res.log.lower(), res.log
    entries = re.split(r"\.entry ", ptx)[1:]
    by_name = {e.split("(", 1)[0].strip(): e for e in entries}
    for name in names:
        body = by_name[res.lowered[name]]
        size = int(re.search(r"softmax_cluster<[^,]+, [^,]+, (\d+),", name).group(1))
        assert re.search(rf"\.reqnctapercluster {size}, 1, 1", body), f"{name}: no cluster size {size} in the PTX"
        assert "barrier.cluster.arrive" in body, name
        assert "barrier.cluster.wait" in body, name
        assert "mapa" in body, name


@needs_nvrtc
@pytest.mark.cuda_compile
def test_cluster_kernels_are_absent_before_sm90():
    """Clusters are an sm_90 feature: the kernel template is compiled out for older targets (the loader only asks
    for it on devices of compute capability 9.0 and later), while the other kernels still compile there."""
    from relpos_ref.cuda._nvrtc import nvrtc_compile

    with pytest.raises(RuntimeError, match="softmax_cluster"):
        nvrtc_compile(cluster_names()[:1], "compute_80")


REGISTER_FAMILIES = ("none", "alibi", "t5", "fire")


def cluster_register_names(which: str) -> list[str]:
    """The kernels of ``which`` ("default" or "rest") of the cluster register matrix. Default: every configuration
    and every family (a diagonal), and all families on the float32 8 x 256 x 32 configuration (the largest
    pieces). Rest: the others (slow)."""
    shapes = cluster_shapes()
    cells = set(diagonal(len(shapes), len(REGISTER_FAMILIES)))
    cells |= {(shapes.index(("float32", (8, 256, 32))), f) for f in range(len(REGISTER_FAMILIES))}
    if which == "rest":
        cells = {(r, c) for r in range(len(shapes)) for c in range(len(REGISTER_FAMILIES))} - cells
    return sorted(_cluster_name(*shapes[r], REGISTER_FAMILIES[c]) for r, c in cells)


@needs_nvrtc
@pytest.mark.cuda_compile
@pytest.mark.parametrize("which", ["default", pytest.param("rest", marks=pytest.mark.slow)])
def test_cluster_kernel_registers_sm90(which):
    """ptxas for sm_90: float32/float16 pieces of 16 values in at most 64 registers (four or more 256-thread blocks
    per SM), of 32 values in at most 128; float64 (not a bandwidth target) within the 255-register limit; at most
    160 bytes of spill stores everywhere (see the block-kernel test)."""
    from relpos_ref.cuda._nvrtc import resource_usage

    names = cluster_register_names(which)
    usage = resource_usage(names, "sm_90")
    assert set(usage) == set(names)
    for name, u in usage.items():
        vpt = int(re.search(r", (\d+), \d+>$", name).group(1))
        limit = 255 if ", double," in name else {16: 64, 32: 128}[vpt]
        assert u["registers"] <= limit, f"{name}: {u}"
        assert u["spill_stores"] <= 160, f"{name} spills: {u}"


def test_default_and_slow_subsets_partition_each_matrix():
    """Each slow compile test checks exactly what its default test leaves out of the matrix the test had before the
    split: no kernel is lost, none compiled twice, and the default subsets reach every family and every shape."""
    spills = {plan_launch(sk, dtype).kernel_name(fam, dtype) for dtype, sk in SPILL_SHAPES for fam in SPILL_FAMILIES}
    clusters = set(cluster_names()) | set(cluster_names(vector_ok=False)[:6])
    registers = {n for n in cluster_names() if any(f in n for f in ("FamNone", "FamAlibi", "FamT5", "FamFire"))}
    for split, full in ((spill_names, spills), (cluster_ptx_names, clusters), (cluster_register_names, registers)):
        default, rest = set(split("default")), set(split("rest"))
        assert not default & rest, split.__name__
        assert default | rest == full, split.__name__
        assert rest, split.__name__
    for fam in FAMILY_STRUCTS:
        struct = re.search(r"rp::Fam\w+,", _cluster_name("float32", (4, 256, 16), fam)).group(0)
        assert any(struct in n for n in cluster_ptx_names("default")), fam
    for dtype, cfg in cluster_shapes():
        assert any(_cluster_name(dtype, cfg, f) in cluster_ptx_names("default") for f in FAMILY_STRUCTS)
        assert any(_cluster_name(dtype, cfg, f) in cluster_register_names("default") for f in REGISTER_FAMILIES)
    for dtype, sk in SPILL_SHAPES:
        assert any(plan_launch(sk, dtype).kernel_name(f, dtype) in spill_names("default") for f in SPILL_FAMILIES)


def test_plan_launch_with_clusters():
    """With a cluster policy, rows longer than its from_sk go to the smallest cluster configuration that holds them;
    shorter rows, and rows beyond every configuration, keep the kernels they had without it."""
    for dtype in STORAGE_TYPES:
        policy = CLUSTER_POLICIES["double" if dtype == "float64" else "float"]
        largest = max(c * nt * v for c, nt, v in policy.configs)
        for sk in [1, 100, 1024, 4096, 8191, 8192, 8193, 12000, 16384, 16385, 32767, 32768, 32769, 65535, 65536, 65537]:
            p = plan_launch(sk, dtype, clusters=policy)
            if policy.from_sk < sk <= largest:
                assert p.kind == "cluster"
                capacity = p.cluster * p.threads_per_row * p.vpt
                assert sk <= capacity
                smaller = [c * nt * v for c, nt, v in policy.configs if c * nt * v < capacity]
                assert all(sk > cap for cap in smaller), "the smallest configuration that fits"
                assert p.grid(10) == 10 * p.cluster
                assert p.block == p.threads_per_row
                assert sk % p.vec == 0
                assert p.vpt % p.vec == 0
            else:
                assert p == plan_launch(sk, dtype), sk
    assert plan_launch(16384, "float32").kind == "block"  # no policy, no clusters
    small = ClusterPolicy(0, ((2, 32, 4),))
    assert plan_launch(200, "float32", clusters=small).kind == "cluster"
    assert plan_launch(300, "float32", clusters=small).kind == "warp"  # fits no configuration


def test_cluster_policy_from_environment():
    assert cluster_policy("float32", {}) is None
    assert cluster_policy("float32", {"RELPOS_REF_CUDA_CLUSTERS": "0"}) is None
    assert cluster_policy("float16", {"RELPOS_REF_CUDA_CLUSTERS": "1"}) == CLUSTER_POLICIES["float"]
    assert cluster_policy("float64", {"RELPOS_REF_CUDA_CLUSTERS": "1"}) == CLUSTER_POLICIES["double"]
    tuned = cluster_policy("float32", {"RELPOS_REF_CUDA_CLUSTERS": "4096:2x256x16, 4x256x16"})
    assert tuned == ClusterPolicy(4096, ((2, 256, 16), (4, 256, 16)))
    for bad in ("yes", "4096", "4096:2x256", "4096:1x256x16", "4096:16x256x16", "4096:2x100x16", "4096:2x256x12"):
        with pytest.raises(ValueError, match=r"RELPOS_REF_CUDA_CLUSTERS: expected 0, 1 or FROM:CxNTxVPT.*got"):
            cluster_policy("float32", {"RELPOS_REF_CUDA_CLUSTERS": bad})


def test_source_is_include_free():
    """No #include survives the splicing: NVRTC of CUDA 12 and 13 compiles it without any header search path."""
    src = kernel_source()
    assert not [line for line in src.splitlines() if line.lstrip().startswith("#include")]
    assert "struct FamAlibi" in src
    assert "softmax_warp" in src


def test_import_needs_no_cuda():
    """Importing relpos_ref (and relpos_ref.cuda) must not import CuPy."""
    import relpos_ref

    code = "import sys, relpos_ref, relpos_ref.cuda, relpos_ref.cuda.bounds; print('cupy' in sys.modules)"
    root = str(Path(relpos_ref.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120, env=env)
    assert out.stdout.strip() == "False"


def test_plan_launch_covers_every_length():
    """Every row length maps to a kernel whose registers hold the row (or the stream kernel), with valid vectors."""
    for dtype in STORAGE_TYPES:
        itemsize = {"float16": 2, "float32": 4, "float64": 8}[dtype]
        for sk in [*range(1, 2100), 4095, 4096, 4097, 8192, 16384, 16385, 32768, 32769, 10**5]:
            p = plan_launch(sk, dtype)
            assert p.vec * itemsize <= 16
            assert p.vpt % p.vec == 0
            assert sk % p.vec == 0
            if p.kind in ("warp", "block"):
                assert sk <= p.threads_per_row * p.vpt
            if p.kind == "warp":
                assert sk > 16 * p.vpt or p.vpt == 1  # the smallest warp shape that fits
            assert plan_launch(sk, dtype, vector_ok=False).vec == 1
    assert plan_launch(32768, "float32").kind == "block"
    assert plan_launch(32769, "float32").kind == "stream"
    assert plan_launch(16385, "float64").kind == "stream"


def test_fused_rejects_numpy_scores():
    import relpos_ref as rp
    from relpos_ref.cuda import fused_biased_softmax

    scores = np.zeros((1, 2, 3, 4), dtype=np.float32)
    with pytest.raises(TypeError, match=r"scores: expected a CuPy array.*numpy\.ndarray"):
        fused_biased_softmax(scores, rp.ALiBi.from_num_heads(2))


# ---- window and softcap: kernel arguments of every kernel ----------------------------------------------------------

# The launch's argument count (relpos_ref.cuda._launch._prepare): 22 before the window and softcap, then
# wl, wr, cap, inv_cap.
KERNEL_ARGS = 26


def feature_names() -> list[str]:
    """A small subset with the window and softcap code paths: every kernel kind, every storage type, a cheap family
    and a skip_masked one (FIRE, KERPLE: the window-emptied chunk branch)."""
    names = [
        plan_launch(128, "float32").kernel_name("alibi", "float32"),
        plan_launch(1003, "float16").kernel_name("fire", "float16"),
        plan_launch(4096, "float64").kernel_name("kerple_log", "float64"),
        plan_launch(100_000, "float32").kernel_name("t5", "float32"),
    ]
    return sorted(names)


def _entry_params(ptx: str, lowered: str) -> int:
    body = ptx.split(f".entry {lowered}(", 1)[1].split(")", 1)[0]
    return body.count(".param")


def _check_feature_ptx(names: list[str], arch: str, source: str | None = None) -> None:
    from relpos_ref.cuda._nvrtc import nvrtc_compile

    res = nvrtc_compile(names, arch, source=source)
    ptx = res.output.decode()
    assert "warning" not in res.log.lower(), res.log
    for name in names:
        assert _entry_params(ptx, res.lowered[name]) == KERNEL_ARGS, name


@needs_nvrtc
@pytest.mark.cuda_compile
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_nvrtc_compiles_window_softcap_kernels(arch):
    """The kernels with the window test and the softcap (tanhf/tanh, uniform flag branches) compile without
    warnings and take the 26 arguments the launcher passes."""
    _check_feature_ptx(feature_names(), arch)


@needs_nvrtc
@pytest.mark.cuda_compile
@pytest.mark.slow
def test_nvrtc_window_softcap_arguments_full_matrix():
    """Every representative kernel (all families, dtypes and launch shapes) takes the 26 launch arguments."""
    _check_feature_ptx(representative_names()[:-1], "compute_90")


@needs_nvrtc
@pytest.mark.cuda_compile
def test_feature_argument_check_rejects_old_signature():
    """The argument-count check can fail: the kernel source without the four feature parameters has 22."""
    src = kernel_source()
    old = ", int wl, int wr, typename Traits<T>::acc cap, typename Traits<T>::acc inv_cap"
    assert src.count(old) == 1
    mutant = src.replace(old, "").replace("wl, wr, cap, inv_cap);", "0, 0, (A)0, (A)0);")
    with pytest.raises(AssertionError):
        _check_feature_ptx(feature_names()[:1], "compute_90", source=mutant)
