"""Hypothesis properties of the gradients (``rp.attention_vjp`` and ``BiasFamily.bias_vjp``), on every backend.

The bodies follow ``test_properties.py``: ``body_x(xp, impl, data)`` draws inputs and checks ``impl``; the mutants
of ``tests/support/mutants.py`` (the "backward" section) must fail them (``tests/test_mutants.py``).

G1  every gradient equals the central difference of the forward ``rp.attention`` along a random direction (float64);
G2  causal: keys after every query get exactly zero dk and dv, masked entries a zero bias gradient, and queries
    that see nothing a zero dq row;
G3  the bias gradient of each query row sums to its d_lse (0 without one): softmax shift invariance;
G4  T5 and OffsetBias table gradients are the bucket sums of the (H, Sq, Sk) bias gradient, ALiBi's slope gradient
    is -sum |Delta| times it;
G5  the gradients do not depend on the tile sizes;
G6  grouped-query heads: dk, dv equal the sums over each group of the gradients with the kv heads repeated;
G7  pre_scale with bias b gives scale times the bias gradient of post_scale with bias scale * b, and the same dq;
G8  fully_masked="nan" spreads NaN exactly as documented, "zero" gives finite gradients with zero rows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import strategies as st

import relpos_ref as rp
from relpos_ref.testing import to_numpy
from tests.support.properties import REAL, FamilySpec, Impl
from tests.test_properties import Body, draw_attention_inputs, draw_family, draw_rng, draw_scale, run


def _xp_arrays(xp: Any, *arrays: np.ndarray) -> tuple[Any, ...]:
    return tuple(xp.asarray(a) for a in arrays)


def _family(xp: Any, impl: Impl, spec: FamilySpec | None, params: dict[str, np.ndarray] | None = None) -> Any:
    if spec is None:
        return None
    if params is not None:
        spec = FamilySpec(spec.kind, spec.num_heads, params, spec.options)
    return spec.build(xp, impl)


def _loss(xp, q, k, v, bias, d_out, d_lse, **opts) -> float:
    out, lse = rp.attention(*_xp_arrays(xp, q, k, v), bias=bias, return_lse=True, **opts)
    out, lse = to_numpy(out), to_numpy(lse)
    live = np.isfinite(lse)
    return float(np.sum(out * d_out) + np.sum(np.where(live, lse, 0.0) * d_lse))


def _grads(impl: Impl, xp: Any, q, k, v, d_out, *, bias=None, d_lse=None, **opts) -> dict[str, np.ndarray]:
    dl = None if d_lse is None else xp.asarray(d_lse)
    g = impl.attention_vjp(*_xp_arrays(xp, q, k, v, d_out), bias=bias, d_lse=dl, **opts)
    out = {"dq": to_numpy(g.dq), "dk": to_numpy(g.dk), "dv": to_numpy(g.dv)}
    if isinstance(g.dbias, dict):
        out.update({f"param:{n}": to_numpy(a) for n, a in g.dbias.items()})
    elif g.dbias is not None:
        out["dbias"] = to_numpy(g.dbias)
    return out


def _options(data: Any, *, causal: bool | None = None) -> dict[str, Any]:
    return {
        "causal": data.draw(st.booleans(), label="causal") if causal is None else causal,
        "align": data.draw(st.sampled_from(["bottom_right", "top_left"]), label="align"),
        "placement": data.draw(st.sampled_from(["post_scale", "pre_scale"]), label="placement"),
        "scale": draw_scale(data),
    }


# -- G1: central differences of the forward ----------------------------------------------------------------------


def body_grad_fd(xp: Any, impl: Impl, data: Any) -> None:
    """G1: <grad, u> equals (L(x + h u) - L(x - h u)) / 2h for the forward rp.attention, in float64."""
    q, k, v, spec, rng = draw_attention_inputs(data, impl, max_len=7, bias="optional")
    opts = _options(data)
    d_out = rng.uniform(-1, 1, size=(*q.shape[:3], v.shape[3]))
    d_lse = rng.uniform(-1, 1, size=q.shape[:3]) if data.draw(st.booleans(), label="with_d_lse") else None
    dl = np.zeros(q.shape[:3]) if d_lse is None else d_lse
    fam = _family(xp, impl, spec)
    g = _grads(impl, xp, q, k, v, d_out, bias=fam, d_lse=d_lse, **opts)
    for name in g:
        assert np.all(np.isfinite(g[name])), f"G1: non-finite gradient {name}"
    dirs = {n: rng.uniform(-1, 1, size=a.shape) for n, a in (("q", q), ("k", k), ("v", v))}
    params = {n: np.asarray(a, dtype=np.float64) for n, a in (spec.arrays.items() if spec is not None else [])}
    pdirs = {n: rng.uniform(-1, 1, size=np.shape(a)) for n, a in params.items()}
    if spec is not None and spec.kind == "kerple_power":
        pdirs["r2"] = np.where(params["r2"] > 1.99, 0.0, pdirs["r2"])  # r2 <= 2 is a constraint: stay inside
    if spec is not None and spec.kind == "tensor":
        pdirs["array"] = np.where(np.isfinite(params["array"]), pdirs["array"], 0.0)
    h = 1e-6

    def at(sign: float) -> float:
        moved = {n: params[n] + sign * h * pdirs[n] for n in params}
        fam_h = _family(xp, REAL, spec, moved) if spec is not None else None
        return _loss(
            xp, q + sign * h * dirs["q"], k + sign * h * dirs["k"], v + sign * h * dirs["v"], fam_h, d_out, dl, **opts
        )

    fd = (at(1.0) - at(-1.0)) / (2 * h)
    grads = {"q": g["dq"], "k": g["dk"], "v": g["dv"]}
    grads.update({n: g[f"param:{n}"] if f"param:{n}" in g else g["dbias"] for n in params})
    dirs.update(pdirs)
    dot = sum(float(np.sum(grads[n] * dirs[n])) for n in grads)
    mag = 1.0 + sum(float(np.sum(np.abs(grads[n] * dirs[n]))) for n in grads)
    # Truncation (h^2 times the third derivative) and rounding (eps |L| / h) stay near 1e-8 of the magnitude here.
    assert abs(fd - dot) <= 1e-6 * mag, f"G1: directional derivative {dot!r} vs central difference {fd!r}"


def body_bias_vjp_fd(xp: Any, impl: Impl, data: Any) -> None:
    """G1 for bias_vjp alone, at arbitrary (non-consecutive) and consecutive positions."""
    kinds = tuple(k for k in impl.kinds if k not in ("tensor", "sandwich"))
    if not kinds:
        return
    spec = draw_family(data, kinds)
    rng = draw_rng(data)
    consecutive = data.draw(st.booleans(), label="consecutive")
    if consecutive:
        q0, k0 = data.draw(st.integers(0, 30), label="q0"), data.draw(st.integers(0, 30), label="k0")
        q_pos = np.arange(q0, q0 + data.draw(st.integers(1, 6), label="Sq"))
        k_pos = np.arange(k0, k0 + data.draw(st.integers(1, 6), label="Sk"))
    else:
        q_pos = np.asarray(data.draw(st.lists(st.integers(0, 40), min_size=1, max_size=5), label="q_pos"))
        k_pos = np.asarray(data.draw(st.lists(st.integers(0, 40), min_size=1, max_size=5), label="k_pos"))
    big_l = float(spec.arrays["L"]) if spec.kind == "fire" else 0.5
    if big_l.is_integer() and data.draw(st.booleans(), label="tie_at_L"):
        # FIRE's max(L, i) has a kink at i = L: put a query there (its derivative in L is 1/2 by convention).
        off = min(int(big_l), q_pos.size - 1)
        q_pos = (
            np.arange(int(big_l) - off, int(big_l) - off + q_pos.size) if consecutive else np.append(q_pos, int(big_l))
        )
    g = rng.uniform(-1, 1, size=(spec.num_heads, q_pos.size, k_pos.size))
    fam = spec.build(xp, impl)
    grads = {n: to_numpy(a) for n, a in fam.bias_vjp(xp.asarray(q_pos), xp.asarray(k_pos), xp.asarray(g)).items()}
    params = {n: np.asarray(a, dtype=np.float64) for n, a in spec.arrays.items()}
    assert set(grads) == set(params), f"G1: gradient names {sorted(grads)} vs parameters {sorted(params)}"
    h = 1e-6
    for n, p in params.items():
        assert grads[n].shape == np.shape(p), f"G1: {n} gradient shape {grads[n].shape} vs {np.shape(p)}"
        u = rng.uniform(-1, 1, size=np.shape(p))
        if spec.kind == "kerple_power" and n == "r2":
            u = np.where(p > 1.99, 0.0, u)

        def bias_sum(sign: float, n=n, u=u) -> float:
            moved = {**params, n: params[n] + sign * h * u}
            b = FamilySpec(spec.kind, spec.num_heads, moved, spec.options).build(xp, REAL)
            return float(np.sum(to_numpy(b.bias(xp.asarray(q_pos), xp.asarray(k_pos))) * g))

        fd = (bias_sum(1.0) - bias_sum(-1.0)) / (2 * h)
        dot = float(np.sum(grads[n] * u))
        mag = 1.0 + float(np.sum(np.abs(grads[n] * u)))
        assert abs(fd - dot) <= 1e-6 * mag, f"G1: {spec.kind}.{n}: {dot} vs {fd}"


# -- G2, G3: masking and row sums --------------------------------------------------------------------------------


def body_grad_causal(xp: Any, impl: Impl, data: Any) -> None:
    """G2: keys no query sees get zero dk, dv; masked entries zero bias gradient; empty queries zero dq."""
    q, k, v, _, rng = draw_attention_inputs(data, impl, max_len=9, bias="none")
    opts = _options(data, causal=True)
    sq, sk = q.shape[2], k.shape[2]
    d_out = rng.uniform(-1, 1, size=(*q.shape[:3], v.shape[3]))
    arr = rng.normal(size=(q.shape[1], sq, sk))
    g = _grads(impl, xp, q, k, v, d_out, bias=xp.asarray(arr), **opts)
    q_pos, k_pos = (np.asarray(p) for p in rp.positions(sq, sk, align=opts["align"]))
    unseen = k_pos > q_pos.max()
    assert np.all(g["dk"][:, :, unseen] == 0), "G2: dk of keys after every query is not zero"
    assert np.all(g["dv"][:, :, unseen] == 0), "G2: dv of keys after every query is not zero"
    masked = k_pos[None, :] > q_pos[:, None]
    assert np.all(g["dbias"][..., masked] == 0), "G2: bias gradient of a masked entry is not zero"
    empty = ~(~masked).any(axis=1)
    assert np.all(g["dq"][:, :, empty] == 0), "G2: dq of a query that sees no key is not zero"


def body_grad_row_sums(xp: Any, impl: Impl, data: Any) -> None:
    """G3: sum_j dbias[b, h, i, j] = d_lse[b, h, i] (0 without d_lse) for every query that sees a key."""
    q, k, v, _, rng = draw_attention_inputs(data, impl, max_len=9, bias="none")
    opts = _options(data)
    d_out = rng.uniform(-1, 1, size=(*q.shape[:3], v.shape[3]))
    d_lse = rng.uniform(-1, 1, size=q.shape[:3]) if data.draw(st.booleans(), label="with_d_lse") else None
    arr = rng.normal(size=(q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    g = _grads(impl, xp, q, k, v, d_out, bias=xp.asarray(arr), d_lse=d_lse, **opts)
    sums = g["dbias"].sum(axis=-1)
    q_pos, k_pos = (np.asarray(p) for p in rp.positions(q.shape[2], k.shape[2], align=opts["align"]))
    live = (k_pos[None, :] <= q_pos[:, None]).any(axis=1) if opts["causal"] else np.ones(q.shape[2], bool)
    want = np.zeros_like(sums) if d_lse is None else d_lse
    scale = opts["scale"] if opts["placement"] == "pre_scale" else 1.0
    tol = 64 * np.finfo(np.float64).eps * (1.0 + np.abs(g["dbias"]).sum(axis=-1))
    err = np.abs(sums - want * scale)[:, :, live]
    assert np.all(err <= tol[:, :, live]), f"G3: bias-gradient row sums off by {err.max():.3g}"


# -- G4: table gradients are bucket sums --------------------------------------------------------------------------


def _bucket_index(spec: FamilySpec, delta: np.ndarray) -> tuple[np.ndarray, int]:
    if spec.kind == "t5":
        nb = spec.arrays["table"].shape[1]
        idx = np.asarray(rp.t5_bucket(delta, bidirectional=spec.options["bidirectional"], num_buckets=nb,
                                      max_distance=spec.options["max_distance"]))  # fmt: skip
        return idx, nb
    kmax = (spec.arrays["table"].shape[1] - 1) // 2
    return np.clip(delta, -kmax, kmax) + kmax, 2 * kmax + 1


def body_grad_tables(xp: Any, impl: Impl, data: Any) -> None:
    """G4: table gradient = bucket sums of the TensorBias gradient; ALiBi slopes = -sum |Delta| of it."""
    kinds = tuple(k for k in impl.kinds if k in ("t5", "offset", "alibi"))
    if not kinds:
        return
    q, k, v, _, rng = draw_attention_inputs(data, impl, max_len=9, bias="none")
    h = q.shape[1]
    spec = draw_family(data, kinds, num_heads=h)
    opts = _options(data)
    d_out = rng.uniform(-1, 1, size=(*q.shape[:3], v.shape[3]))
    fam = spec.build(xp, impl)
    g = _grads(impl, xp, q, k, v, d_out, bias=fam, **opts)
    q_pos, k_pos = rp.positions(q.shape[2], k.shape[2], align=opts["align"])
    tensor = rp.TensorBias(REAL.classes[spec.kind](**{n: np.asarray(a) for n, a in spec.arrays.items()},
                                                    **spec.options).bias(q_pos, k_pos))  # fmt: skip
    gt = _grads(REAL, np, q, k, v, d_out, bias=tensor, **opts)["param:array"]
    delta = np.asarray(q_pos)[:, None] - np.asarray(k_pos)[None, :]
    if spec.kind == "alibi":
        want = {"slopes": -np.sum(gt * np.abs(delta)[None], axis=(1, 2))}
    else:
        idx, ncols = _bucket_index(spec, delta)
        want = {"table": np.stack([np.sum(gt[:, idx == c], axis=1) for c in range(ncols)], axis=1)}
    for n, w in want.items():
        got = g[f"param:{n}"]
        tol = 64 * np.finfo(np.float64).eps * (1.0 + np.abs(gt).sum() * (1 + np.abs(delta).max()))
        assert np.allclose(got, w, rtol=0, atol=tol), f"G4: {spec.kind}.{n} gradient differs from bucket sums"


# -- G5, G6, G7: tiles, grouped heads, placement --------------------------------------------------------------------


def _close(a: dict, b: dict, tol: float, what: str) -> None:
    assert set(a) == set(b), f"{what}: gradient names differ"
    for n in a:
        mag = 1.0 + float(np.max(np.abs(b[n]), initial=0.0))
        err = float(np.max(np.abs(a[n] - b[n]), initial=0.0))
        assert err <= tol * mag, f"{what}: {n} differs by {err:.3g}"


def body_grad_block_size(xp: Any, impl: Impl, data: Any) -> None:
    """G5: gradients agree for query and key tiles of 1, drawn sizes and the whole sequence."""
    q, k, v, spec, rng = draw_attention_inputs(data, impl, max_len=10, bias="optional")
    opts = _options(data)
    d_out = rng.uniform(-1, 1, size=(*q.shape[:3], v.shape[3]))
    fam = _family(xp, impl, spec)
    ref = _grads(impl, xp, q, k, v, d_out, bias=fam, block_size=q.shape[2], kv_block_size=k.shape[2], **opts)
    bq = data.draw(st.integers(1, q.shape[2]), label="block_size")
    bk = data.draw(st.integers(1, k.shape[2]), label="kv_block_size")
    for sizes in ((1, 1), (bq, bk), (bq, None), (None, bk)):
        got = _grads(impl, xp, q, k, v, d_out, bias=fam, block_size=sizes[0], kv_block_size=sizes[1], **opts)
        _close(got, ref, 1e-12, f"G5 tiles {sizes}")


def body_grad_gqa(xp: Any, impl: Impl, data: Any) -> None:
    """G6: with H_kv < H, dk and dv are the group sums of the gradients with the kv heads repeated."""
    q, k, v, spec, rng = draw_attention_inputs(data, impl, max_len=7, max_kv=2, max_group=3, bias="optional")
    group = q.shape[1] // k.shape[1]
    opts = _options(data)
    d_out = rng.uniform(-1, 1, size=(*q.shape[:3], v.shape[3]))
    fam = _family(xp, impl, spec)
    got = _grads(impl, xp, q, k, v, d_out, bias=fam, **opts)
    rep = _grads(impl, xp, q, np.repeat(k, group, axis=1), np.repeat(v, group, axis=1), d_out, bias=fam, **opts)
    nb, nkv = k.shape[:2]
    for n in ("dk", "dv"):
        rep[n] = rep[n].reshape(nb, nkv, group, *rep[n].shape[2:]).sum(axis=2)
    _close(got, rep, 1e-12, "G6")


def body_grad_placement(xp: Any, impl: Impl, data: Any) -> None:
    """G7: pre_scale(b) has dbias = scale * dbias of post_scale(scale * b), and the same dq, dk, dv."""
    q, k, v, _, rng = draw_attention_inputs(data, impl, max_len=8, bias="none")
    scale = draw_scale(data)
    causal = data.draw(st.booleans(), label="causal")
    d_out = rng.uniform(-1, 1, size=(*q.shape[:3], v.shape[3]))
    b = rng.normal(size=(q.shape[1], q.shape[2], k.shape[2]))
    pre = _grads(impl, xp, q, k, v, d_out, bias=xp.asarray(b), placement="pre_scale", scale=scale, causal=causal)
    post = _grads(impl, xp, q, k, v, d_out, bias=xp.asarray(b * scale), placement="post_scale", scale=scale,
                  causal=causal)  # fmt: skip
    post["dbias"] = post["dbias"] * scale
    _close(pre, post, 1e-12, "G7")


# -- G8: fully masked rows -----------------------------------------------------------------------------------------


def body_grad_fully_masked(xp: Any, impl: Impl, data: Any) -> None:
    """G8: Sq > Sk, causal, bottom-right: rows that see nothing; "zero" and "nan" as documented."""
    nb, nkv, group = (data.draw(st.integers(1, 2), label=n) for n in ("batch", "kv_heads", "group"))
    sk = data.draw(st.integers(1, 5), label="Sk")
    sq = sk + data.draw(st.integers(1, 4), label="extra_queries")
    rng = draw_rng(data)
    h = nkv * group
    q = rng.uniform(-2, 2, size=(nb, h, sq, 3))
    k = rng.uniform(-2, 2, size=(nb, nkv, sk, 3))
    v = rng.uniform(-2, 2, size=(nb, nkv, sk, 2))
    d_out = rng.uniform(-1, 1, size=(nb, h, sq, 2))
    spec = draw_family(data, tuple(k_ for k_ in impl.kinds if k_ != "tensor"), num_heads=h)
    fam = spec.build(xp, impl)
    empty = np.arange(sq) < sq - sk  # bottom-right: the first Sq - Sk queries precede every key
    zero = _grads(impl, xp, q, k, v, d_out, bias=fam, causal=True)
    assert all(np.all(np.isfinite(a)) for a in zero.values()), "G8: zero mode gave a non-finite gradient"
    assert np.all(zero["dq"][:, :, empty] == 0), "G8: zero mode, dq of an empty row is not zero"
    nan = _grads(impl, xp, q, k, v, d_out, bias=fam, causal=True, fully_masked="nan")
    assert np.all(np.isnan(nan["dq"][:, :, empty])), "G8: nan mode, dq of an empty row is not NaN"
    assert np.array_equal(nan["dq"][:, :, ~empty], zero["dq"][:, :, ~empty]), "G8: nan mode changed a live dq row"
    assert np.all(np.isnan(nan["dk"])), "G8: nan mode, dk not NaN"
    assert np.all(np.isnan(nan["dv"])), "G8: nan mode, dv not NaN"
    for n in (n for n in nan if n.startswith("param:")):
        assert np.all(np.isnan(nan[n])), f"G8: nan mode, {n} not NaN"


GRAD_BODIES: dict[str, Body] = {
    "grad_fd": body_grad_fd,
    "bias_vjp_fd": body_bias_vjp_fd,
    "grad_causal": body_grad_causal,
    "grad_row_sums": body_grad_row_sums,
    "grad_tables": body_grad_tables,
    "grad_block_size": body_grad_block_size,
    "grad_gqa": body_grad_gqa,
    "grad_placement": body_grad_placement,
    "grad_fully_masked": body_grad_fully_masked,
}


@pytest.mark.parametrize("body", sorted(GRAD_BODIES))
def test_gradient_property(xp, body):
    run(GRAD_BODIES[body], xp)


def test_bias_vjp_rejects_bad_cotangent():
    fam = rp.ALiBi.from_num_heads(2)
    q_pos, k_pos = rp.positions(3, 4)
    with pytest.raises(ValueError, match=r"d_bias: expected shape \(H, Sq, Sk\) = \(2, 3, 4\)"):
        fam.bias_vjp(q_pos, k_pos, np.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match="d_bias"):
        fam.bias_vjp(q_pos, k_pos, np.full((2, 3, 4), math.nan))
    with pytest.raises(TypeError, match="d_bias"):
        fam.bias_vjp(q_pos, k_pos, np.zeros((2, 3, 4), dtype=np.int64))
