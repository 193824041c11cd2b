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
    with pytest.raises(AssertionError):
        run({**BODIES, **GRAD_BODIES}[body], xp, impl, config=_config())


@pytest.mark.parametrize("body", NAIVE_CONTROL_BODIES)
def test_naive_attention_control_passes(body):
    run(BODIES[body], np_xp, NAIVE_CONTROL, config=_config())


@pytest.mark.parametrize("body", NAIVE_VJP_CONTROL_BODIES)
def test_naive_attention_vjp_control_passes(body):
    run(GRAD_BODIES[body], np_xp, NAIVE_VJP_CONTROL, config=_config())
