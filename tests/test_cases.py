"""relpos_ref.cases: the kernel-shaped case sets, the declaration limits, the layouts and the seeded inputs."""

import numpy as np
import pytest

from relpos_ref.cases import AttentionShape, attention_inputs, from_layout, kernel_cases, to_layout

TILES = (16, 32, 64, 128, 256)


def _partial_for_every_tile(lengths):
    """Every usual tile width leaves a partial last tile in at least one of ``lengths``."""
    return all(any(n % t for n in lengths) for t in TILES)


@pytest.mark.parametrize("level", ["quick", "default", "thorough"])
def test_every_level_crosses_tile_boundaries(level):
    cases, _ = kernel_cases(level=level, heads=8)
    shapes = [c.shape for c in cases]
    assert _partial_for_every_tile([s.k_len for s in shapes])
    assert any(s.q_len == 1 for s in shapes)  # decode
    assert any(1 < s.q_len < s.k_len for s in shapes)
    assert any(s.q_len > s.k_len for s in shapes)
    assert any(s.kv_heads < s.heads for s in shapes)
    assert len({c.name for c in cases}) == len(cases)
    assert all(c.purpose for c in cases)


def test_default_is_kernel_scale():
    shapes = [c.shape for c in kernel_cases(heads=8)[0]]
    assert {64, 128} <= {s.head_dim for s in shapes}
    assert max(s.k_len for s in shapes) > 4096  # long decode caches
    assert max(s.k_len - 1 for s in shapes) > 2048  # offsets a float16 integer no longer holds
    assert any(s.batch > 1 for s in shapes)
    assert any(s.logit_scale >= 40 for s in shapes)
    assert any(1 < s.q_len < 32 and s.k_len > 2048 for s in shapes)  # chunked prefill
    # several key tiles per row at 128 and more than one query tile at 128
    assert any(s.k_len > 4 * 128 and s.q_len > 128 for s in shapes)
    gqa = [s for s in shapes if s.kv_heads < s.heads]
    assert gqa
    assert all(s.heads // s.kv_heads > 2 and s.kv_heads >= 2 for s in gqa)


@pytest.mark.parametrize(("heads", "ratio"), [(1, 1), (2, 2), (3, 3), (4, 2), (6, 3), (8, 4), (12, 3), (16, 4)])
def test_gqa_ratio(heads, ratio):
    gqa = [c.shape for c in kernel_cases(heads=heads)[0] if c.name == "gqa"]
    assert gqa[0].heads // gqa[0].kv_heads == ratio


def test_declaration_limits_are_honoured_and_reported():
    cases, notes = kernel_cases(heads=12, head_dims=(64,), max_q_len=1, max_k_len=3000, gqa=False)
    shapes = [c.shape for c in cases]
    assert all(s.head_dim == 64 and s.q_len == 1 and s.k_len <= 3000 and s.kv_heads == 12 for s in shapes)
    assert len(set(shapes)) == len(shapes)
    assert any("grouped-query" in n for n in notes)
    assert any("q_len 129 -> 1" in n for n in notes)
    assert any("k_len 4099 -> 3000" in n for n in notes)
    # quick, cut to one query and 33 keys: the decode case becomes the q<k case, and is dropped
    _, notes = kernel_cases(level="quick", heads=4, max_q_len=1, max_k_len=33, gqa=False)
    assert any(n.startswith("decode:") and "dropped" in n for n in notes)


def test_head_dims_pick_the_nearest_accepted():
    shapes = [c.shape for c in kernel_cases(heads=4, head_dims=(128, 256))[0]]
    assert {s.head_dim for s in shapes} == {128}


def test_min_k_len_adds_a_far_case():
    names = [c.name for c in kernel_cases(heads=4, min_k_len=10_000)[0]]
    assert "far_decode" in names
    assert "far_decode" not in [c.name for c in kernel_cases(heads=4, min_k_len=256)[0]]


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"level": "nightly"}, ValueError, "level"),
        ({"heads": 0}, ValueError, "heads"),
        ({"head_dims": ()}, ValueError, "head_dims"),
        ({"head_dims": (64.0,)}, TypeError, "head_dims"),
        ({"max_q_len": 0}, ValueError, "max_q_len"),
        ({"gqa": 1}, TypeError, "gqa"),
    ],
)
def test_bad_declarations(kwargs, error, text):
    with pytest.raises(error, match=text):
        kernel_cases(**{"heads": 4, **kwargs})


def test_layout_round_trip():
    q, _, _ = attention_inputs(AttentionShape(2, 3, 3, 5, 7, 4))
    t = to_layout(q, "bshd")
    assert t.shape == (2, 5, 3, 4)
    assert t.flags.c_contiguous
    assert t[1, 4, 2, 3] == q[1, 2, 4, 3]
    np.testing.assert_array_equal(from_layout(t, "bshd"), q)
    assert to_layout(q, "bhsd") is q
    with pytest.raises(ValueError, match="layout"):
        to_layout(q, "bsdh")


def test_inputs_are_seeded_and_rounded():
    shape = AttentionShape(1, 2, 1, 3, 4, 8, 2.0)
    a = attention_inputs(shape, dtype="float16", seed=3)
    b = attention_inputs(shape, dtype="float16", seed=3)
    c = attention_inputs(shape, dtype="float16", seed=4)
    assert all(x.dtype == np.float16 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])
    assert a[1].shape == (1, 1, 4, 8)
