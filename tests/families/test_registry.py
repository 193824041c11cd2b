"""The family registry, the traits on each class, example_family, and the conventions module."""

from __future__ import annotations

import typing

import numpy as np
import pytest

import relpos_ref as rp
from relpos_ref import conventions
from relpos_ref.cuda._source import FAMILY_STRUCTS
from relpos_ref.families import FAMILIES, example_family, family_class

ORDER = ["alibi", "t5", "offset", "kerple_power", "kerple_log", "fire", "sandwich", "tensor"]


def test_registry_holds_every_public_family_in_order():
    assert list(FAMILIES) == ORDER
    public = {getattr(rp, n) for n in rp.__all__ if isinstance(getattr(rp, n), type)}
    assert set(FAMILIES.values()) == {c for c in public if issubclass(c, rp.BiasFamily) and c is not rp.BiasFamily}
    for name, cls in FAMILIES.items():
        assert cls.name == name
        assert family_class(name) is cls


def test_unknown_family_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"family: expected one of .*'alibi'.*, got 'alibl'"):
        family_class("alibl")


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="name: expected a new family name, got 'alibi'"):

        class Again(rp.BiasFamily, name="alibi"):
            pass

    assert FAMILIES["alibi"] is rp.ALiBi


def test_every_registered_family_has_a_kernel_struct():
    assert set(FAMILIES) <= set(FAMILY_STRUCTS)


@pytest.mark.parametrize(
    ("name", "offset_only", "monotone", "zero_at_zero", "learned"),
    [
        ("alibi", True, True, True, True),
        ("t5", True, False, False, True),
        ("offset", True, False, False, True),
        ("kerple_power", True, True, True, True),
        ("kerple_log", True, True, True, True),
        ("fire", False, False, False, True),
        ("sandwich", True, False, True, False),
        ("tensor", False, False, False, True),
    ],
)
def test_traits(name, offset_only, monotone, zero_at_zero, learned):
    cls = FAMILIES[name]
    assert (cls.offset_only, cls.monotone, cls.zero_at_zero, cls.learned) == (
        offset_only,
        monotone,
        zero_at_zero,
        learned,
    )


@pytest.mark.parametrize("name", ORDER)
def test_example_family_is_seeded(name):
    kw = {"shape": (5, 7)} if name == "tensor" else {}
    a = example_family(name, 3, seed=4, **kw)
    b = example_family(name, 3, seed=4, **kw)
    assert type(a) is FAMILIES[name]
    assert a.num_heads == 3
    q, k = rp.positions(5, 7)
    np.testing.assert_array_equal(a.bias(q, k), b.bias(q, k))
    if a.learned and name != "alibi":
        c = example_family(name, 3, seed=5, **kw)
        assert not np.array_equal(a.bias(q, k), c.bias(q, k))


def test_example_family_dtype_and_overrides():
    fam = example_family("fire", 2, dtype=np.float32, L=512.0, width=8)
    assert fam.dtype == np.float32
    assert fam.width == 8
    assert float(fam.parameters()["L"]) == 512.0
    assert example_family("t5", 2, bidirectional=True).options()["bidirectional"] is True
    with pytest.raises(ValueError, match=r"shape: expected \(Sq, Sk\)"):
        example_family("tensor", 2)


@pytest.mark.parametrize(
    ("literal", "values"),
    [
        (conventions.Placement, conventions.PLACEMENTS),
        (conventions.FullyMasked, conventions.FULLY_MASKED),
        (conventions.Alignment, conventions.ALIGNMENTS),
        (conventions.Backend, conventions.BACKENDS),
        (conventions.Layout, conventions.LAYOUTS),
        (conventions.Equivalence, conventions.EQUIVALENCES),
        (conventions.FloatDtype, conventions.FLOAT_DTYPES),
    ],
)
def test_each_convention_is_one_literal_and_its_tuple(literal, values):
    assert typing.get_args(literal) == values
    assert len(set(values)) == len(values) >= 2


def test_validators_use_the_convention_tuples():
    q = np.zeros((1, 1, 2, 4))
    for kw, values in (
        ("placement", conventions.PLACEMENTS),
        ("fully_masked", conventions.FULLY_MASKED),
        ("align", conventions.ALIGNMENTS),
        ("backend", conventions.BACKENDS),
    ):
        expected = ", ".join(repr(v) for v in values)
        with pytest.raises(ValueError, match=f"{kw}: expected one of {expected}, got 'bogus'"):
            rp.attention(q, q, q, **{kw: "bogus"})
