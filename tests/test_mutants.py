"""Meta tests: the property tests of ``test_properties.py`` must reject the mutants of ``mutants.py``.

Each case runs the *same* Hypothesis body as the real test, with the mutant implementation injected, under the
loaded profile's ``max_examples`` but derandomized (the same examples on every run), without a database and without
shrinking (only finding the failure matters here), and requires an ``AssertionError`` from a property check. Any
other exception (a ValueError from an ill-formed mutant, a warning turned into an error) fails the meta test.

The control case runs the correct ``naive_attention`` (the base of the attention mutants) through the same
attention bodies and requires them to pass, so an attention mutant fails because of its one bug.
"""

from __future__ import annotations

import array_api_compat.numpy as np_xp
import array_api_strict
import pytest
from hypothesis import Phase, settings

from tests.support.mutants import (
    MUTANTS,
    NAIVE_CONTROL,
    NAIVE_CONTROL_BODIES,
    NAIVE_VJP_CONTROL,
    NAIVE_VJP_CONTROL_BODIES,
)
from tests.test_gradient_properties import GRAD_BODIES
from tests.test_properties import BODIES, run, run_alibi_slopes

pytestmark = pytest.mark.meta

CASES = [(name, body) for name, (_, bodies) in MUTANTS.items() for body in bodies]


def _config() -> settings:
    return settings(
        derandomize=True,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        report_multiple_bugs=False,
    )


def _strict():
    array_api_strict.set_array_api_strict_flags(api_version="2025.12")
    return array_api_strict


@pytest.mark.parametrize(("mutant", "body"), CASES, ids=[f"{m}-{b}" for m, b in CASES])
def test_property_rejects_mutant(mutant, body):
    impl, _ = MUTANTS[mutant]
    if body == "alibi_slopes":
        with pytest.raises(AssertionError):
            run_alibi_slopes(np_xp, impl)
        return
    # Property 9 compares a backend with NumPy: the mutant misbehaves off NumPy, so it runs on array_api_strict.
    xp = _strict() if body == "backend_agreement" else np_xp
    # A NaN parameter gradient is refused by BiasFamily.bias_vjp itself (a ValueError naming d_bias) before a property
    # sees it: for that mutant the library's own check is the rejection.
    expected = (AssertionError, ValueError) if mutant in _LIBRARY_REFUSES else AssertionError
    with pytest.raises(expected):
        run({**BODIES, **GRAD_BODIES}[body], xp, impl, config=_config())


_LIBRARY_REFUSES = {"kerple_power_grad_nan_at_zero"}


@pytest.mark.parametrize("body", NAIVE_CONTROL_BODIES)
def test_naive_attention_control_passes(body):
    run(BODIES[body], np_xp, NAIVE_CONTROL, config=_config())


@pytest.mark.parametrize("body", NAIVE_VJP_CONTROL_BODIES)
def test_naive_attention_vjp_control_passes(body):
    run(GRAD_BODIES[body], np_xp, NAIVE_VJP_CONTROL, config=_config())


# -- Kernel features ---------------------------------------------------------------------------------------------------
# Each check of the window, softcap, positions, lengths and segments tests (tests/test_attention.py,
# tests/test_gradients.py) must reject an implementation with one bug: the keywords rewritten before the call, or an
# internal step of relpos_ref replaced for the duration of the test. The checks pass on relpos_ref itself (the tests
# that call them with rp.attention and rp.attention_vjp).

import dataclasses  # noqa: E402
import importlib  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402

import relpos_ref as rp  # noqa: E402
import relpos_ref.gradients as rp_gradients  # noqa: E402
import relpos_ref.masks as rp_masks  # noqa: E402
from tests import test_attention as ta  # noqa: E402
from tests import test_gradients as tg  # noqa: E402

# The package re-exports the function attention under the module's name: reach the module itself.
rp_attention = importlib.import_module("relpos_ref.attention")


def _rewritten(change, fn=None):
    def impl(*args, **kw):
        return (fn or rp.attention)(*args, **change(args, dict(kw)))

    return impl


def _window_off_by_one(args, kw):
    w = kw.get("window")
    if w is not None and w[0] is not None:
        kw["window"] = (w[0] + 1, w[1])
    return kw


def _window_swapped(args, kw):
    if kw.get("window") is not None:
        kw["window"] = kw["window"][::-1]
    return kw


def _window_none_is_zero(args, kw):
    if kw.get("window") is not None:
        kw["window"] = tuple(0 if w is None else w for w in kw["window"])
    return kw


def _without(*names):
    def change(args, kw):
        for n in names:
            kw.pop(n, None)
        return kw

    return change


def _lengths_aligned_on_the_padded_shape(args, kw):
    # bottom_right from Sq and Sk instead of each row's lengths: the bug FlashAttention's cache_seqlens avoids.
    if kw.get("q_lens") is not None or kw.get("k_lens") is not None:
        sq, sk = args[0].shape[2], args[1].shape[2]
        if kw.get("align", "bottom_right") == "bottom_right":
            kw["q_pos"] = np.arange(sk - sq, sk)
    return kw


def _restart_as_global(args, kw):
    kw["segment_positions"] = "global"
    return kw


def _softcap_after_bias(monkeypatch):
    real = rp_attention._logits

    def broken(spec, qb, k_g, qs, qe, ks, ke, e=0, *, with_tanh=False):
        if spec.softcap is None:
            return real(spec, qb, k_g, qs, qe, ks, ke, e, with_tanh=with_tanh)
        z = real(dataclasses.replace(spec, softcap=None), qb, k_g, qs, qe, ks, ke, e)
        cap = spec.softcap * 2.0**-e
        t = spec.xp.tanh(z / cap)
        z = spec.xp.where(z == -math.inf, z, cap * t)
        return (z, t) if with_tanh else z

    monkeypatch.setattr(rp_attention, "_logits", broken)
    return rp.attention


def _plan_drops_the_last_key_block(monkeypatch):
    real = rp_masks._plan
    monkeypatch.setattr(rp_masks, "_plan", lambda *a: tuple(row[:-1] if len(row) > 1 else row for row in real(*a)))
    return rp.attention


def _vjp_without_the_tanh_derivative(monkeypatch):
    real = rp_gradients._logits

    def broken(*args, with_tanh=False, **kw):
        z = real(*args, **kw)
        return (z, None) if with_tanh else z

    monkeypatch.setattr(rp_gradients, "_logits", broken)
    return rp.attention_vjp


def _fixed(impl):
    return lambda monkeypatch: impl


VJP = tg.FEATURE_VJP_CASES
FEATURE_MUTANTS = {
    "window_off_by_one": (_fixed(_rewritten(_window_off_by_one)), ta.check_window_against_dense),
    "window_off_by_one_diagonal": (_fixed(_rewritten(_window_off_by_one)), ta.check_window_zero_causal_diagonal),
    "window_sides_swapped": (_fixed(_rewritten(_window_swapped)), ta.check_window_against_dense),
    "window_none_is_zero": (_fixed(_rewritten(_window_none_is_zero)), ta.check_window_unbounded),
    "softcap_after_bias": (_softcap_after_bias, ta.check_softcap_against_dense),
    "softcap_dropped": (_fixed(_rewritten(_without("softcap"))), ta.check_softcap_against_dense),
    "positions_dropped": (_fixed(_rewritten(_without("q_pos", "k_pos"))), ta.check_positions_equal_align),
    "lengths_on_padded_shape": (_fixed(_rewritten(_lengths_aligned_on_the_padded_shape)), ta.check_lengths_rowwise),
    "padding_rows_attend": (_fixed(_rewritten(_without("q_lens"))), ta.check_lengths_rowwise),
    "segments_dropped": (
        _fixed(_rewritten(_without("q_segment_ids", "k_segment_ids", "segment_positions"))),
        lambda impl, xp: ta.check_segments_separately(impl, xp, "global"),
    ),
    "restart_as_global": (
        _fixed(_rewritten(_restart_as_global)),
        lambda impl, xp: ta.check_segments_separately(impl, xp, "restart"),
    ),
    "plan_drops_a_tile": (_plan_drops_the_last_key_block, ta.check_streamed_equals_one_block),
    "vjp_no_tanh_derivative": (
        _vjp_without_the_tanh_derivative,
        lambda impl, xp: tg.check_feature_vjp_central_differences(impl, VJP["softcap_post"]),
    ),
    "vjp_window_off_by_one": (
        _fixed(_rewritten(_window_off_by_one, rp.attention_vjp)),
        lambda impl, xp: tg.check_feature_vjp_central_differences(impl, VJP["window"]),
    ),
    "vjp_padding_rows_attend": (
        _fixed(_rewritten(_without("q_lens"), rp.attention_vjp)),
        lambda impl, xp: tg.check_feature_vjp_central_differences(impl, VJP["lengths"]),
    ),
    "vjp_segments_dropped": (
        _fixed(_rewritten(_without("q_segment_ids", "k_segment_ids"), rp.attention_vjp)),
        lambda impl, xp: tg.check_feature_vjp_central_differences(impl, VJP["segments"]),
    ),
}


@pytest.mark.parametrize("name", list(FEATURE_MUTANTS))
def test_feature_check_rejects_mutant(name, monkeypatch):
    make, check = FEATURE_MUTANTS[name]
    impl = make(monkeypatch)
    with pytest.raises(AssertionError):
        check(impl, np_xp)
