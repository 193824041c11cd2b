"""The kernel emulation of test_emulated.py can fail: deliberately broken variants of ``biased_softmax.cu`` (its
KERNEL_MUTANTS) are each caught on a case that the real kernel passes.

A file of its own so that xdist can run it beside test_emulated.py, whose module fixtures keep that file on one
worker: each mutant is a separate host build of the kernel source.
"""

from __future__ import annotations

import shutil

import pytest

from tests.cuda.feature_cases import FEATURE_MUTANT_CASE, build_feature, prepare_feature
from tests.cuda.test_emulated import (
    CUDA_DIR,
    CXX,
    KERNEL_MUTANTS,
    MUTANT_CASE,
    MUTANT_CASES,
    SMALL_CLUSTERS,
    _probe,
    compile_emulation,
    prepare,
)
from tests.support.fused_cases import build, check

pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler (g++ or clang++ or $CXX) for the emulation")


@pytest.fixture
def mutant_emulators(tmp_path_factory):
    """One host library per mutant, holding the kernel its case needs: {mutant: (built case, emulator)}."""
    source = (CUDA_DIR / "biased_softmax.cu").read_text()
    out = {}
    for mutant, (old, new) in KERNEL_MUTANTS.items():
        assert source.count(old) == 1, f"mutant {mutant}: {old!r} must occur once in biased_softmax.cu"
        built = build(MUTANT_CASES.get(mutant, MUTANT_CASE))
        d = tmp_path_factory.mktemp(f"mutant_{mutant}")
        (d / "biased_softmax.cu").write_text(source.replace(old, new))
        shutil.copy(CUDA_DIR / "bias.cuh", d / "bias.cuh")
        out[mutant] = (built, compile_emulation([prepare(built, _probe(SMALL_CLUSTERS)).name], d, cuda_dir=d))
    return out


def test_kernel_mutants_are_detected(mutant_emulators):
    """Each broken kernel fails the comparison (or faults in the emulator) on its case, which the real kernel
    passes (both cases are among CLUSTER_CASES)."""
    survivors = []
    for mutant, (built, emu) in mutant_emulators.items():
        launch = prepare(built, emu.backend_with(SMALL_CLUSTERS))
        assert launch.cluster == 4
        try:
            emu.run(built, launch)
            check(built, launch.probs, launch.lse.reshape(launch.lse_shape))
        except AssertionError:
            continue
        survivors.append(mutant)
    assert not survivors, f"mutants not detected: {survivors}"


# Broken window and softcap arithmetic: (file, old text, new text), each caught on FEATURE_MUTANT_CASE.
FEATURE_MUTANTS = {
    "window_left_off_by_one": (
        "bias.cuh",
        "return delta <= left && delta >= -right;",
        "return delta < left && delta >= -right;",
    ),
    "window_right_off_by_one": (
        "bias.cuh",
        "return delta <= left && delta >= -right;",
        "return delta <= left && delta > -right;",
    ),
    "window_ignored": (
        "biased_softmax.cu",
        "attend = attend && in_window(rc.qpos - kp, rc.wl, rc.wr);",
        "attend = attend;",
    ),
    "softcap_after_bias": (
        "bias.cuh",
        "const A t = m_tanh((s * alpha) * inv_cap);\n    return m_fma(cap, t, bterm);",
        "const A t = m_tanh((s * alpha + bterm) * inv_cap);\n    return cap * t;",
    ),
    "softcap_dropped": (
        "bias.cuh",
        "const A t = m_tanh((s * alpha) * inv_cap);\n    return m_fma(cap, t, bterm);",
        "return m_fma(s, alpha, bterm);",
    ),
}


def test_unmutated_feature_case_passes(tmp_path):
    """The mutants' case passes on the real source (so a failure below is the mutant's)."""
    built = build_feature(FEATURE_MUTANT_CASE)
    emu = compile_emulation([prepare_feature(FEATURE_MUTANT_CASE, built, _probe()).name], tmp_path)
    launch = prepare_feature(FEATURE_MUTANT_CASE, built, emu.backend)
    emu.run(built, launch)
    check(built, launch.probs, launch.lse.reshape(launch.lse_shape))


def test_window_softcap_mutants_are_detected(tmp_path_factory):
    built = build_feature(FEATURE_MUTANT_CASE)
    name = prepare_feature(FEATURE_MUTANT_CASE, built, _probe()).name
    survivors = []
    for mutant, (fname, old, new) in FEATURE_MUTANTS.items():
        d = tmp_path_factory.mktemp(f"feature_mutant_{mutant}")
        for f in ("biased_softmax.cu", "bias.cuh"):
            text = (CUDA_DIR / f).read_text()
            if f == fname:
                assert text.count(old) == 1, f"mutant {mutant}: {old!r} must occur once in {f}"
                text = text.replace(old, new)
            (d / f).write_text(text)
        emu = compile_emulation([name], d, cuda_dir=d)
        launch = prepare_feature(FEATURE_MUTANT_CASE, built, emu.backend)
        try:
            emu.run(built, launch)
            check(built, launch.probs, launch.lse.reshape(launch.lse_shape))
        except AssertionError:
            continue
        survivors.append(mutant)
    assert not survivors, f"mutants not detected: {survivors}"
