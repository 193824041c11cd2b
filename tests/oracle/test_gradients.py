"""The central-difference gradient oracle against closed forms derived by hand.

``oracle.bias_vjp`` and ``oracle.attention_vjp`` are the yardstick for the library's backward (and for the golden
vectors in ``spec/vectors/gradients.json``), so they are checked here without any of the library's array code: every
expected value below is a formula written out in mpmath at 60 digits (the ALiBi slope gradient, KERPLE's and FIRE's
parameter derivatives, the softmax Jacobian-vector product, ``P^T dO`` and the full attention backward), and the
agreement asked for is 1e-40, far below anything a float64 test can see.
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest

from relpos_ref import oracle

MP = mpmath.MPContext()
MP.dps = 60
TOL = MP.mpf("1e-40")


def _close(got, want, what=""):
    """Every leaf of ``got`` within 1e-40 * max(1, |want|) of ``want`` (nested lists or scalars)."""
    if isinstance(want, list):
        assert isinstance(got, list), what
        assert len(got) == len(want), what
        for n, (a, b) in enumerate(zip(got, want)):
            _close(a, b, f"{what}[{n}]")
        return
    a, b = MP.mpf(got), MP.mpf(want)
    if MP.isnan(b):
        assert MP.isnan(a), f"{what}: expected NaN, got {a}"
        return
    assert abs(a - b) <= TOL * max(1, abs(b)), f"{what}: oracle {MP.nstr(a, 25)}, closed form {MP.nstr(b, 25)}"


def _affine(shape, a, c, mod=17, off=8, den=8):
    """Deterministic dyadic inputs: ((a . idx + c) mod M - off) / den."""
    return np.fromfunction(lambda *idx: ((sum(x * i for x, i in zip(a, idx)) + c) % mod - off) / den, shape).tolist()


def _mp(x):
    return [_mp(t) for t in x] if isinstance(x, list) else MP.mpf(x)


# ---------------------------------------------------------------------------------------------------------------------
# Bias families: bias_vjp
# ---------------------------------------------------------------------------------------------------------------------

Q_POS, K_POS = [3, 4, 5], [0, 1, 2, 3, 4, 5, 7]


def _cotangent(h, sq=None, sk=None):
    return _affine((h, sq or len(Q_POS), sk or len(K_POS)), [5, 3, 7], 2, mod=13, off=6, den=4)


def test_alibi_slope_gradient_is_minus_sum_d_times_distance():
    d = _cotangent(3)
    got = oracle.bias_vjp("alibi", {"slopes": [0.5, 0.25, 2.0**-7]}, Q_POS, K_POS, d)
    want = [-MP.fsum(MP.mpf(d[h][a][b]) * abs(i - j) for a, i in enumerate(Q_POS) for b, j in enumerate(K_POS))
            for h in range(3)]  # fmt: skip
    _close(got["slopes"], want, "slopes")


def test_kerple_power_gradients_and_r2_at_zero_offset():
    r1, r2 = [0.75, 2.0], [1.5, 0.375]
    d = _cotangent(2)
    got = oracle.bias_vjp("kerple_power", {"r1": r1, "r2": r2}, Q_POS, K_POS, d)
    d_r1, d_r2 = [], []
    for h in range(2):
        t1, t2 = [], []
        for a, i in enumerate(Q_POS):
            for b, j in enumerate(K_POS):
                n = abs(i - j)
                pw = MP.power(n, r2[h]) if n else MP.mpf(0)
                t1.append(-MP.mpf(d[h][a][b]) * pw)
                # d/dr2 of -r1 n**r2 = -r1 n**r2 log n, and 0 at n = 0 (0**r2 = 0 for every r2 > 0)
                t2.append(-MP.mpf(d[h][a][b]) * r1[h] * pw * MP.log(n) if n else MP.mpf(0))
        d_r1.append(MP.fsum(t1))
        d_r2.append(MP.fsum(t2))
    _close(got["r1"], d_r1, "r1")
    _close(got["r2"], d_r2, "r2")
    # A cotangent only on Delta = 0 (and on Delta = 1, where 1**r2 = 1): the r2-gradient is exactly 0.
    only = [[[1.0 if abs(i - j) <= 1 else 0.0 for j in K_POS] for i in Q_POS] for _ in range(2)]
    zero = oracle.bias_vjp("kerple_power", {"r1": r1, "r2": r2}, Q_POS, K_POS, only)
    assert all(x == 0 for x in zero["r2"])


def test_kerple_log_gradients():
    r1, r2 = [0.75, 3.0], [0.5, 2.0**-6]
    d = _cotangent(2)
    got = oracle.bias_vjp("kerple_log", {"r1": r1, "r2": r2}, Q_POS, K_POS, d)
    for h in range(2):
        t1 = t2 = MP.mpf(0)
        for a, i in enumerate(Q_POS):
            for b, j in enumerate(K_POS):
                n, g = abs(i - j), MP.mpf(d[h][a][b])
                t1 += -g * MP.log1p(r2[h] * n)
                t2 += -g * r1[h] * n / (1 + r2[h] * n)
        _close(got["r1"][h], t1, f"r1[{h}]")
        _close(got["r2"][h], t2, f"r2[{h}]")


def _fire_closed_form(w1, b1, w2, b2, c, L, eps, q_pos, k_pos, d, tie_factor):
    """FIRE parameter gradients written out: x = N / Den, N = log1p(c|D|), Den = log1p(c max(L, i)) + eps."""
    c, L, eps = MP.mpf(c), MP.mpf(L), MP.mpf(eps)
    heads, width = len(w2), len(b1)
    g = {"w1": [[MP.mpf(0)] for _ in range(width)], "b1": [MP.mpf(0)] * width, "c": MP.mpf(0), "L": MP.mpf(0)}
    g["w2"] = [[MP.mpf(0)] * width for _ in range(heads)]
    g["b2"] = [MP.mpf(0)] * heads
    for a, i in enumerate(q_pos):
        top = max(L, MP.mpf(i))
        den = MP.log1p(c * top) + eps
        # d max(L, i) / dL: 1 below the tie, 0 above it, tie_factor at L == i
        slope = 1 if i < L else (0 if i > L else tie_factor)
        for b, j in enumerate(k_pos):
            n = abs(i - j)
            x = MP.log1p(c * n) / den
            dx_dc = n / ((1 + c * n) * den) - x * top / ((1 + c * top) * den)
            dx_dl = -x * c / ((1 + c * top) * den) * slope
            for h in range(heads):
                gv = MP.mpf(d[h][a][b])
                g["b2"][h] += gv
                for w in range(width):
                    pre = w1[w][0] * x + b1[w]
                    if pre > 0:
                        g["w2"][h][w] += gv * pre
                        gp = gv * w2[h][w]
                        g["b1"][w] += gp
                        g["w1"][w][0] += gp * x
                        g["c"] += gp * w1[w][0] * dx_dc
                        g["L"] += gp * w1[w][0] * dx_dl
    return g


FIRE_PARAMS = {
    "w1": [[1.5], [-2.25], [0.75]],
    "b1": [-0.375, 1.0625, 0.0625],
    "w2": [[0.5, -1.0, 2.0], [-0.25, 0.75, 1.25]],
    "b2": [0.125, -0.5],
    "c": 0.25,
    "L": 4.0,
}


@pytest.mark.parametrize("eps", [0.0, 2.0**-10])
def test_fire_gradients_with_the_tie_at_L_counted_half(eps):
    q_pos, k_pos = [3, 4, 5, 9], [0, 2, 3, 4, 5, 6]  # i < L, i == L, i > L twice; keys after the query too
    d = _cotangent(2, len(q_pos), len(k_pos))
    got = oracle.bias_vjp("fire", FIRE_PARAMS, q_pos, k_pos, d, options={"eps": eps})
    want = _fire_closed_form(**FIRE_PARAMS, eps=eps, q_pos=q_pos, k_pos=k_pos, d=d, tie_factor=MP.mpf(1) / 2)
    for name in oracle.FAMILY_PARAMS["fire"]:
        _close(got[name], want[name], name)
    # The tie matters: counting it fully is a different number, far outside the tolerance.
    full = _fire_closed_form(**FIRE_PARAMS, eps=eps, q_pos=q_pos, k_pos=k_pos, d=d, tie_factor=1)
    assert abs(MP.mpf(got["L"]) - full["L"]) > 1e-3


def test_fire_rejects_a_relu_preactivation_at_zero():
    params = dict(FIRE_PARAMS, b1=[-0.375, 1.0625, 0.0])  # x = 0 at Delta = 0, so w1[2]*0 + 0 = 0
    with pytest.raises(ValueError, match="pre-activation"):
        oracle.bias_vjp("fire", params, [3], [3], [[[1.0]], [[1.0]]])


@pytest.mark.parametrize("layout", ["heads_buckets", "buckets_heads"])
def test_t5_table_gradient_is_the_cotangent_summed_per_bucket(layout):
    nb, md = 8, 20
    q_pos, k_pos = [0, 3, 12], [0, 1, 2, 5, 9, 30]
    table_hb = _affine((2, nb), [3, 5], 1)
    table = table_hb if layout == "heads_buckets" else [list(col) for col in zip(*table_hb)]
    d = _cotangent(2, 3, 6)
    opts = {"bidirectional": True, "max_distance": md, "layout": layout}
    got = oracle.bias_vjp("t5", {"table": table}, q_pos, k_pos, d, options=opts)
    want = [[MP.mpf(0)] * nb for _ in range(2)]
    for a, i in enumerate(q_pos):
        for b, j in enumerate(k_pos):
            bucket = oracle.t5_bucket(i - j, bidirectional=True, num_buckets=nb, max_distance=md)
            for h in range(2):
                want[h][bucket] += d[h][a][b]
    if layout == "buckets_heads":
        want = [list(col) for col in zip(*want)]
    _close(got["table"], want, "table")


def test_offset_table_and_tensor_gradients():
    q_pos, k_pos = [0, 2, 9], [0, 1, 2, 3, 8]
    d = _cotangent(2, 3, 5)
    got = oracle.bias_vjp("offset", {"table": _affine((2, 5), [1, 3], 0)}, q_pos, k_pos, d)
    want = [[MP.mpf(0)] * 5 for _ in range(2)]
    for a, i in enumerate(q_pos):
        for b, j in enumerate(k_pos):
            for h in range(2):
                want[h][min(max(i - j, -2), 2) + 2] += d[h][a][b]
    _close(got["table"], want, "table")
    arr = _affine((2, 3, 5), [1, 2, 3], 4)
    arr[1][2][0] = -np.inf
    got = oracle.bias_vjp("tensor", {"array": arr}, q_pos, k_pos, d)
    _close(got["array"], d, "array")  # the identity, -inf entry included
    assert oracle.bias_vjp("sandwich", {}, q_pos, k_pos, d, options={"num_heads": 2, "head_dim": 8}) == {}


# ---------------------------------------------------------------------------------------------------------------------
# Attention: closed forms of the backward
# ---------------------------------------------------------------------------------------------------------------------


def _probs(q, k, scale, bias, keep, placement="post_scale"):
    """P (B, H, Sq, Sk) and lse by hand at 60 digits; ``bias`` and ``keep`` full 4-D lists."""
    nb, nh, sq, d = len(q), len(q[0]), len(q[0][0]), len(q[0][0][0])
    nkv, sk = len(k[0]), len(k[0][0])
    group = nh // nkv
    p_all, lse_all = [], []
    for b in range(nb):
        pb, lb = [], []
        for h in range(nh):
            ph, lh = [], []
            for i in range(sq):
                z = []
                for j in range(sk):
                    s = MP.fsum(MP.mpf(q[b][h][i][t]) * k[b][h // group][j][t] for t in range(d))
                    bb = MP.mpf(bias[b][h][i][j]) if bias is not None else 0
                    z.append(scale * s + bb if placement == "post_scale" else scale * (s + bb))
                live = [z[j] for j in range(sk) if keep[b][h][i][j]]
                if not live:
                    ph.append([MP.mpf(0)] * sk)
                    lh.append(MP.ninf)
                    continue
                lse = MP.log(MP.fsum(MP.exp(t) for t in live))
                ph.append([MP.exp(z[j] - lse) if keep[b][h][i][j] else MP.mpf(0) for j in range(sk)])
                lh.append(lse)
            pb.append(ph)
            lb.append(lh)
        p_all.append(pb)
        lse_all.append(lb)
    return p_all, lse_all


def _backward(q, k, v, d_out, p, scale, d_lse=None, placement="post_scale"):
    """The attention backward written out: dV = P^T dO, dz = P (dO v^T - delta + dl), dQ = s dz K, dK = s dz^T Q."""
    nb, nh, sq, d = len(q), len(q[0]), len(q[0][0]), len(q[0][0][0])
    nkv, sk, dv = len(k[0]), len(k[0][0]), len(v[0][0][0])
    group = nh // nkv
    dq = [[[[MP.mpf(0)] * d for _ in range(sq)] for _ in range(nh)] for _ in range(nb)]
    dk = [[[[MP.mpf(0)] * d for _ in range(sk)] for _ in range(nkv)] for _ in range(nb)]
    dvv = [[[[MP.mpf(0)] * dv for _ in range(sk)] for _ in range(nkv)] for _ in range(nb)]
    dz = [[[[MP.mpf(0)] * sk for _ in range(sq)] for _ in range(nh)] for _ in range(nb)]
    for b in range(nb):
        for h in range(nh):
            g = h // group
            for i in range(sq):
                pr = p[b][h][i]
                if not any(pr):
                    continue  # a row with nothing to attend contributes nothing (its d_lse included)
                dp = [MP.fsum(MP.mpf(d_out[b][h][i][c]) * v[b][g][j][c] for c in range(dv)) for j in range(sk)]
                delta = MP.fsum(pr[j] * dp[j] for j in range(sk))
                dl = MP.mpf(d_lse[b][h][i]) if d_lse is not None else 0
                for j in range(sk):
                    dz[b][h][i][j] = pr[j] * (dp[j] - delta + dl)
                    for c in range(dv):
                        dvv[b][g][j][c] += pr[j] * d_out[b][h][i][c]
                    for t in range(d):
                        dq[b][h][i][t] += scale * dz[b][h][i][j] * k[b][g][j][t]
                        dk[b][g][j][t] += scale * dz[b][h][i][j] * q[b][h][i][t]
    db = dz if placement == "post_scale" else [[[[scale * x for x in r] for r in m] for m in hh] for hh in dz]
    return {"dq": dq, "dk": dk, "dv": dvv, "dbias": db}


def _full_keep(nb, nh, sq, sk, causal=False, align="bottom_right", mask=None):
    qp, kp = oracle.positions(sq, sk, align=align)
    return [
        [
            [[(not causal or kp[j] <= qp[i]) and (mask is None or bool(mask[i][j])) for j in range(sk)]
             for i in range(sq)]
            for _ in range(nh)
        ]
        for _ in range(nb)
    ]  # fmt: skip


@pytest.mark.parametrize("placement", ["post_scale", "pre_scale"])
def test_bias_gradient_is_the_softmax_jvp(placement):
    """With v = I (so out = P) and d_out = g, the bias cotangent is P * (g - sum(P * g)) (times the scale if pre)."""
    sq, sk, scale = 3, 4, 0.5
    q = _affine((1, 1, sq, 2), [0, 0, 3, 5], 1)
    k = _affine((1, 1, sk, 2), [0, 0, 7, 2], 3)
    v = [[[[1.0 if c == j else 0.0 for c in range(sk)] for j in range(sk)]]]
    g = _affine((1, 1, sq, sk), [0, 0, 5, 3], 2)
    bias = _affine((1, 1, sq, sk), [0, 0, 1, 4], 5)
    got = oracle.attention_vjp(q, k, v, g, bias=bias, scale=scale, placement=placement)
    p, _ = _probs(q, k, MP.mpf(scale), bias, _full_keep(1, 1, sq, sk), placement)
    factor = MP.mpf(scale) if placement == "pre_scale" else 1
    want = []
    for i in range(sq):
        pr, gr = p[0][0][i], [MP.mpf(x) for x in g[0][0][i]]
        mean = MP.fsum(a * b for a, b in zip(pr, gr))
        want.append([factor * pr[j] * (gr[j] - mean) for j in range(sk)])
    _close(got["dbias"][0][0], want, "dbias")
    # Meta-test: the softmax JVP without its centring term is a different answer, and the check notices.
    wrong = [[factor * p[0][0][i][j] * MP.mpf(g[0][0][i][j]) for j in range(sk)] for i in range(sq)]
    with pytest.raises(AssertionError):
        _close(got["dbias"][0][0], wrong, "dbias")


@pytest.mark.parametrize(
    ("causal", "align", "sq", "sk"),
    [
        (False, "bottom_right", 3, 4),
        (True, "bottom_right", 3, 5),
        (True, "top_left", 4, 3),
        (True, "bottom_right", 5, 3),
    ],
)
def test_attention_backward_closed_form_grouped_heads(causal, align, sq, sk):
    """dv = P^T dO summed over the query heads of each kv head; dq, dk, dbias from the written-out backward."""
    nb, nh, nkv, d, dv, scale = 2, 4, 2, 3, 2, 0.625
    q = _affine((nb, nh, sq, d), [1, 3, 5, 7], 1)
    k = _affine((nb, nkv, sk, d), [2, 5, 3, 1], 2)
    v = _affine((nb, nkv, sk, dv), [3, 1, 4, 2], 3)
    d_out = _affine((nb, nh, sq, dv), [5, 2, 7, 3], 4)
    d_lse = _affine((nb, nh, sq), [3, 1, 2], 6)
    bias = _affine((nh, sq, sk), [1, 2, 3], 4, den=4)
    got = oracle.attention_vjp(
        q, k, v, d_out, bias=bias, causal=causal, align=align, scale=scale, d_lse=d_lse, step=1e-45
    )
    bias4 = [bias] * nb
    keep = _full_keep(nb, nh, sq, sk, causal, align)
    p, _ = _probs(q, k, MP.mpf(scale), bias4, keep)
    want = _backward(q, k, v, d_out, p, MP.mpf(scale), d_lse)
    for name in ("dq", "dk", "dv"):
        _close(got[name], want[name], name)
    # the (H, Sq, Sk) bias is shared by both batch entries: its gradient is the sum over the batch
    summed = [[[want["dbias"][0][h][i][j] + want["dbias"][1][h][i][j] for j in range(sk)] for i in range(sq)]
              for h in range(nh)]  # fmt: skip
    _close(got["dbias"], summed, "dbias")
    # the dv closed form on its own terms: P^T dO over the two query heads of each kv head
    for b in range(nb):
        for g in range(nkv):
            for j in range(sk):
                for c in range(dv):
                    pt = MP.fsum(p[b][h][i][j] * d_out[b][h][i][c] for h in (2 * g, 2 * g + 1) for i in range(sq))
                    _close(got["dv"][b][g][j][c], pt, "dv")


def test_lse_cotangent_alone_gives_the_probabilities():
    """d lse / d z = P: with d_out = 0 and d_lse = 1 the bias gradient is P and dq = scale * P K."""
    sq, sk, scale = 2, 3, 0.25
    q, k = _affine((1, 1, sq, 2), [0, 0, 3, 1], 0), _affine((1, 1, sk, 2), [0, 0, 5, 3], 1)
    v = _affine((1, 1, sk, 2), [0, 0, 1, 1], 2)
    zero = [[[[0.0, 0.0] for _ in range(sq)]]]
    bias = [[[0.0] * sk for _ in range(sq)]]
    got = oracle.attention_vjp(q, k, v, zero, bias=bias, scale=scale, d_lse=[[[1.0] * sq]])
    p, _ = _probs(q, k, MP.mpf(scale), [bias], _full_keep(1, 1, sq, sk))
    _close(got["dbias"][0], p[0][0], "dbias")
    pk = [[scale * MP.fsum(p[0][0][i][j] * k[0][0][j][t] for j in range(sk)) for t in range(2)] for i in range(sq)]
    _close(got["dq"][0][0], pk, "dq")
    assert all(x == 0 for x in oracle._leaves(got["dv"]))


FAMILY_CASES = {
    "alibi": ({"slopes": [0.5, 0.25]}, None),
    "kerple_power": ({"r1": [0.5, 1.25], "r2": [1.5, 0.75]}, None),
    "kerple_log": ({"r1": [0.5, 1.25], "r2": [2.0, 0.25]}, None),
    "t5": (
        {"table": _affine((8, 2), [3, 1], 2)},
        {"bidirectional": True, "max_distance": 20, "layout": "buckets_heads"},
    ),
    "offset": ({"table": _affine((2, 5), [1, 3], 0)}, None),
    "fire": (FIRE_PARAMS, {"eps": 0.0}),
    "sandwich": ({}, {"num_heads": 2, "head_dim": 4}),
}


@pytest.mark.parametrize("family", sorted(FAMILY_CASES))
def test_family_parameter_gradients_chain_through_bias_vjp(family):
    """Inside attention a family's gradient is bias_vjp of the summed bias cotangent (checked on the oracle's own
    bias-array gradient and on the written-out backward)."""
    params, options = FAMILY_CASES[family]
    sq, sk = 3, 5
    q = _affine((1, 2, sq, 2), [1, 3, 5, 7], 1)
    k = _affine((1, 1, sk, 2), [2, 5, 3, 1], 2)
    v = _affine((1, 1, sk, 2), [3, 1, 4, 2], 3)
    d_out = _affine((1, 2, sq, 2), [5, 2, 7, 3], 4)
    got = oracle.attention_vjp(q, k, v, d_out, family=family, params=params, options=options, causal=True)
    qp, kp = oracle.positions(sq, sk)
    bias = oracle.family_bias(family, params, qp, kp, options=options, dps=60)
    keep = _full_keep(1, 2, sq, sk, True)
    p, _ = _probs(q, k, 1 / MP.sqrt(2), [bias], keep)
    want = _backward(q, k, v, d_out, p, 1 / MP.sqrt(2))
    for name in ("dq", "dk", "dv"):
        _close(got[name], want[name], name)
    chained = oracle.bias_vjp(family, params, qp, kp, want["dbias"][0], options=options)
    for name in oracle.FAMILY_PARAMS[family]:
        _close(got["params"][name], chained[name], name)


def test_fire_tie_inside_attention():
    """FIRE with L at a query position (L == i) inside attention, against the FIRE closed form of the chain."""
    sq = sk = 5  # positions 0..4, L = 4 is the last query
    q = _affine((1, 2, sq, 2), [1, 3, 5, 7], 1)
    k = _affine((1, 1, sk, 2), [2, 5, 3, 1], 2)
    v = _affine((1, 1, sk, 2), [3, 1, 4, 2], 3)
    d_out = _affine((1, 2, sq, 2), [5, 2, 7, 3], 4)
    got = oracle.attention_vjp(q, k, v, d_out, family="fire", params=FIRE_PARAMS, causal=True)
    qp, kp = oracle.positions(sq, sk)
    bias = oracle.fire_bias(**{n: FIRE_PARAMS[n] for n in ("w1", "b1", "w2", "b2")}, q_pos=qp, k_pos=kp,
                            c=FIRE_PARAMS["c"], L=FIRE_PARAMS["L"], dps=60)  # fmt: skip
    p, _ = _probs(q, k, 1 / MP.sqrt(2), [bias], _full_keep(1, 2, sq, sk, True))
    want = _backward(q, k, v, d_out, p, 1 / MP.sqrt(2))
    closed = _fire_closed_form(**FIRE_PARAMS, eps=0, q_pos=qp, k_pos=kp, d=want["dbias"][0], tie_factor=MP.mpf(1) / 2)
    for name in oracle.FAMILY_PARAMS["fire"]:
        _close(got["params"][name], closed[name], name)


# ---------------------------------------------------------------------------------------------------------------------
# Masks, fully masked rows and the NaN convention
# ---------------------------------------------------------------------------------------------------------------------


def _mqa_case(sq=5, sk=3):
    q = _affine((1, 2, sq, 2), [1, 3, 5, 7], 1)
    k = _affine((1, 1, sk, 2), [2, 5, 3, 1], 2)
    v = _affine((1, 1, sk, 3), [3, 1, 4, 2], 3)
    d_out = _affine((1, 2, sq, 3), [5, 2, 7, 3], 4)
    d_lse = _affine((1, 2, sq), [3, 1, 2], 6)
    return q, k, v, d_out, d_lse


def test_fully_masked_rows_zero_mode_give_exact_zeros_and_ignore_d_lse():
    q, k, v, d_out, d_lse = _mqa_case()  # bottom-right causal, Sq = 5 > Sk = 3: queries 0 and 1 see nothing
    got = oracle.attention_vjp(q, k, v, d_out, family="alibi", params={"slopes": [0.5, 0.25]}, causal=True,
                               d_lse=d_lse)  # fmt: skip
    for h in range(2):
        for i in (0, 1):
            assert all(x == 0 for x in got["dq"][0][h][i])
    # a different d_lse on the empty rows changes nothing at all (bit for bit)
    other = [[[99.0 if i < 2 else d_lse[0][h][i] for i in range(5)] for h in range(2)]]
    again = oracle.attention_vjp(q, k, v, d_out, family="alibi", params={"slopes": [0.5, 0.25]}, causal=True,
                                 d_lse=other)  # fmt: skip
    assert again == got
    # and the rest is the written-out backward, which skips those rows
    qp, kp = oracle.positions(5, 3)
    bias = oracle.alibi_bias([0.5, 0.25], qp, kp, dps=60)
    p, _ = _probs(q, k, 1 / MP.sqrt(2), [bias], _full_keep(1, 2, 5, 3, True))
    want = _backward(q, k, v, d_out, p, 1 / MP.sqrt(2), d_lse)
    for name in ("dq", "dk", "dv"):
        _close(got[name], want[name], name)


def test_nan_mode_spreads_nan_as_autograd_of_a_naive_softmax():
    q, k, v, d_out, _ = _mqa_case()
    zero = oracle.attention_vjp(q, k, v, d_out, family="alibi", params={"slopes": [0.5, 0.25]}, causal=True)
    nan = oracle.attention_vjp(
        q, k, v, d_out, family="alibi", params={"slopes": [0.5, 0.25]}, causal=True, fully_masked="nan"
    )
    for h in range(2):
        for i in range(5):
            row = nan["dq"][0][h][i]
            assert all(MP.isnan(x) for x in row) if i < 2 else row == zero["dq"][0][h][i]
    assert all(MP.isnan(x) for x in oracle._leaves([nan["dk"], nan["dv"], nan["params"]["slopes"]]))
    # a user mask with one empty row in head 1 only, two kv heads: only that (batch, kv head) is NaN
    q2 = _affine((1, 2, 3, 2), [1, 3, 5, 7], 1)
    k2 = _affine((1, 2, 3, 2), [2, 5, 3, 1], 2)
    v2 = _affine((1, 2, 3, 2), [3, 1, 4, 2], 3)
    do2 = _affine((1, 2, 3, 2), [5, 2, 7, 3], 4)
    mask = [[[[1, 1, 1]] * 3, [[1, 0, 1], [0, 0, 0], [1, 1, 1]]]]
    bias = _affine((1, 2, 3, 3), [1, 1, 2, 3], 0)
    got = oracle.attention_vjp(q2, k2, v2, do2, bias=bias, mask=mask, fully_masked="nan")
    assert not any(MP.isnan(x) for x in oracle._leaves([got["dk"][0][0], got["dv"][0][0], got["dbias"][0][0]]))
    assert all(MP.isnan(x) for x in oracle._leaves([got["dk"][0][1], got["dv"][0][1], got["dq"][0][1][1]]))
    assert all(MP.isnan(x) for x in got["dbias"][0][1][1])
    assert not any(MP.isnan(x) for x in oracle._leaves([got["dbias"][0][1][0], got["dbias"][0][1][2]]))


def test_minus_inf_bias_entry_is_a_mask_with_zero_gradient():
    sq, sk = 2, 3
    q, k = _affine((1, 1, sq, 2), [0, 0, 3, 1], 0), _affine((1, 1, sk, 2), [0, 0, 5, 3], 1)
    v, d_out = _affine((1, 1, sk, 2), [0, 0, 1, 1], 2), _affine((1, 1, sq, 2), [0, 0, 2, 3], 5)
    arr = [[[0.5, -np.inf, -0.25], [0.125, 1.0, -0.75]]]
    got = oracle.attention_vjp(q, k, v, d_out, family="tensor", params={"array": arr})
    assert got["params"]["array"][0][0][1] == 0
    masked = oracle.attention_vjp(
        q, k, v, d_out, bias=[[[0.5, 0.0, -0.25], [0.125, 1.0, -0.75]]], mask=[[1, 0, 1], [1, 1, 1]]
    )
    assert got["dq"] == masked["dq"]
    assert got["params"]["array"][0] == [[x if j != 1 or i else 0 for j, x in enumerate(r)]
                                         for i, r in enumerate(masked["dbias"][0])]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Accuracy of the differences themselves, and the checks on the checks
# ---------------------------------------------------------------------------------------------------------------------


def test_step_and_precision_do_not_move_the_result():
    """Three different steps and two precisions agree to 1e-40: truncation and rounding are both negligible."""
    q, k, v, d_out, d_lse = _mqa_case(4, 4)
    kw = {"family": "kerple_log", "params": {"r1": [0.5, 1.25], "r2": [2.0, 0.25]}, "causal": True, "d_lse": d_lse}
    a = oracle.attention_vjp(q, k, v, d_out, **kw)
    b = oracle.attention_vjp(q, k, v, d_out, step=1e-35, **kw)
    c = oracle.attention_vjp(q, k, v, d_out, dps=60, **kw)
    for other in (b, c):
        _close([a["dq"], a["dk"], a["dv"], a["params"]["r1"], a["params"]["r2"]],
               [other["dq"], other["dk"], other["dv"], other["params"]["r1"], other["params"]["r2"]])  # fmt: skip
    # a coarse step is visibly worse: the comparison has the power to see truncation error
    coarse = oracle.attention_vjp(q, k, v, d_out, step=1e-6, **kw)
    with pytest.raises(AssertionError):
        _close(coarse["params"]["r2"], a["params"]["r2"])


def test_wrong_closed_forms_are_detected():
    """The comparison is sharp: a sign error, a missing factor and a shifted offset each fail it."""
    d = _cotangent(2)
    got = oracle.bias_vjp("alibi", {"slopes": [0.5, 0.25]}, Q_POS, K_POS, d)["slopes"]
    right = [-MP.fsum(MP.mpf(d[h][a][b]) * abs(i - j) for a, i in enumerate(Q_POS) for b, j in enumerate(K_POS))
             for h in range(2)]  # fmt: skip
    _close(got, right)
    for wrong in (
        [-x for x in right],
        [x * (1 + MP.mpf("1e-30")) for x in right],
        [-MP.fsum(MP.mpf(d[h][a][b]) * abs(i - j + 1) for a, i in enumerate(Q_POS) for b, j in enumerate(K_POS))
         for h in range(2)],
    ):  # fmt: skip
        with pytest.raises(AssertionError):
            _close(got, wrong)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="family must be one of"):
        oracle.bias_vjp("rope", {}, [0], [0], [[[1.0]]])
    with pytest.raises(ValueError, match="must have the keys"):
        oracle.bias_vjp("alibi", {"slope": [1.0]}, [0], [0], [[[1.0]]])
    with pytest.raises(ValueError, match="d_bias must have"):
        oracle.bias_vjp("alibi", {"slopes": [1.0]}, [0], [0, 1], [[[1.0]]])
    with pytest.raises(ValueError, match="must give 'bidirectional'"):
        oracle.bias_vjp("t5", {"table": [[1.0] * 8]}, [0], [0], [[[1.0]]])
    q = [[[[1.0]]]]
    with pytest.raises(ValueError, match="not both"):
        oracle.attention_vjp(q, q, q, q, family="alibi", params={"slopes": [1.0]}, bias=[[1.0]])
    with pytest.raises(ValueError, match="d_out must have"):
        oracle.attention_vjp(q, q, q, [[[[1.0, 2.0]]]])
    with pytest.raises(ValueError, match="step must be positive"):
        oracle.attention_vjp(q, q, q, q, step=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Attention features: softcap, lengths, windows, segments, explicit positions
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["post_scale", "pre_scale"])
def test_softcap_gradient_is_the_chain_rule_through_tanh(placement):
    """One query, two keys: z_j = c tanh(tau s_j / c) + b_j (pre_scale: + tau b_j), so ds_j = tau (1 - tanh^2) dz_j
    with dz the softmax JVP of dO v^T and d_lse; dq = sum ds_j k_j, dk_j = ds_j q, dv_j = p_j dO."""
    q = [[[[1.5, -0.75]]]]
    k = [[[[2.0, 0.5], [-1.25, 1.0]]]]
    v = [[[[0.5, -1.0], [2.0, 0.25]]]]
    d_out = [[[[0.75, -0.5]]]]
    d_lse = [[[0.375]]]
    bias = [[[[0.25, -0.5]]]]
    c, tau = 1.5, 1.25
    got = oracle.attention_vjp(
        q, k, v, d_out, bias=bias, scale=tau, placement=placement, softcap=c, d_lse=d_lse, step=1e-45
    )
    qi, kk, vv, do = [MP.mpf(x) for x in q[0][0][0]], _mp(k[0][0]), _mp(v[0][0]), _mp(d_out[0][0][0])
    t = [MP.tanh(tau * MP.fsum(a * b for a, b in zip(qi, kj)) / c) for kj in kk]
    bf = 1 if placement == "post_scale" else tau
    z = [c * t[j] + bf * bias[0][0][0][j] for j in range(2)]
    lse = MP.log(MP.exp(z[0]) + MP.exp(z[1]))
    p = [MP.exp(zj - lse) for zj in z]
    dp = [MP.fsum(a * b for a, b in zip(do, vj)) for vj in vv]
    delta = p[0] * dp[0] + p[1] * dp[1]
    dz = [p[j] * (dp[j] - delta + d_lse[0][0][0]) for j in range(2)]
    ds = [tau * (1 - t[j] ** 2) * dz[j] for j in range(2)]
    _close(got["dq"][0][0][0], [ds[0] * kk[0][m] + ds[1] * kk[1][m] for m in range(2)], "dq")
    _close(got["dk"][0][0], [[ds[j] * qi[m] for m in range(2)] for j in range(2)], "dk")
    _close(got["dv"][0][0], [[p[j] * do[m] for m in range(2)] for j in range(2)], "dv")
    _close(got["dbias"][0][0][0], [bf * dz[j] for j in range(2)], "dbias")
    # Meta-test: forgetting the tanh' factor is a different answer (|tanh| is far from 0 here) and is noticed.
    with pytest.raises(AssertionError):
        _close(got["dq"][0][0][0], [tau * (dz[0] * kk[0][m] + dz[1] * kk[1][m]) for m in range(2)], "dq")


@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
def test_padding_contributes_nothing_to_any_gradient(align):
    """Lengths per row, fully_masked='nan' and a d_lse on every row: padded queries get exact zeros (not NaN), keys
    beyond k_lens get exact zeros, and the rest equals the gradient of each row's truncated problem."""
    nb, sq, sk = 2, 3, 4
    q = _affine((nb, 2, sq, 2), [1, 3, 5, 7], 1)
    k = _affine((nb, 1, sk, 2), [2, 5, 3, 1], 2)
    v = _affine((nb, 1, sk, 2), [3, 1, 4, 2], 3)
    d_out = _affine((nb, 2, sq, 2), [5, 2, 7, 3], 4)
    d_lse = _affine((nb, 2, sq), [3, 1, 2], 6)
    q_lens, k_lens = [2, 3], [3, 4]
    fam = {"family": "alibi", "params": {"slopes": [0.5, 0.25]}}
    kw = {"causal": True, "align": align, "fully_masked": "nan", **fam}
    got = oracle.attention_vjp(q, k, v, d_out, q_lens=q_lens, k_lens=k_lens, d_lse=d_lse, **kw)
    assert not any(MP.isnan(x) for x in oracle._leaves([got["dq"], got["dk"], got["dv"], got["params"]["slopes"]]))
    slope_sum = [MP.mpf(0), MP.mpf(0)]
    for b in range(nb):
        nq, nk = q_lens[b], k_lens[b]
        for h in range(2):
            for i in range(nq, sq):
                assert got["dq"][b][h][i] == [0, 0]
        for j in range(nk, sk):
            assert got["dk"][b][0][j] == [0, 0]
            assert got["dv"][b][0][j] == [0, 0]
        cut = [
            [[row[:n] for row in x[b]]]
            for x, n in ((q, nq), (k, nk), (v, nk), (d_out, nq))
        ]  # fmt: skip
        ref = oracle.attention_vjp(*cut, d_lse=[[row[:nq] for row in d_lse[b]]], **kw)
        for h in range(2):
            _close(got["dq"][b][h][:nq], ref["dq"][0][h], "dq")
        _close(got["dk"][b][0][:nk], ref["dk"][0][0], "dk")
        _close(got["dv"][b][0][:nk], ref["dv"][0][0], "dv")
        slope_sum = [a + g for a, g in zip(slope_sum, ref["params"]["slopes"])]
    _close(got["params"]["slopes"], slope_sum, "slopes")


def test_window_segments_and_positions_gradients_equal_their_mask_and_bias_array():
    """The structural keywords are a mask and the family is evaluated at each row's own positions: the gradients
    equal those with the hand-written mask and the ALiBi bias array at those positions, and d slope_h is
    -sum dbias_h |q_pos - k_pos| (summed over the batch)."""
    nb, sq, sk = 2, 3, 4
    q = _affine((nb, 2, sq, 2), [1, 3, 5, 7], 1)
    k = _affine((nb, 2, sk, 2), [2, 5, 3, 1], 2)
    v = _affine((nb, 2, sk, 2), [3, 1, 4, 2], 3)
    d_out = _affine((nb, 2, sq, 2), [5, 2, 7, 3], 4)
    q_pos, k_pos = [[2, 3, 5], [7, 9, 10]], [[0, 1, 3, 4], [6, 7, 8, 9]]
    q_seg, k_seg = [[0, 1, 1], [3, 3, 3]], [[0, 0, 1, 1], [2, 3, 3, 3]]
    slopes = [0.5, 0.125]
    got = oracle.attention_vjp(
        q, k, v, d_out, family="alibi", params={"slopes": slopes}, window=(2, 0), causal=True,
        q_pos=q_pos, k_pos=k_pos, q_segment_ids=q_seg, k_segment_ids=k_seg,
    )  # fmt: skip
    mask = [
        [[[0 <= q_pos[b][i] - k_pos[b][j] <= 2 and q_seg[b][i] == k_seg[b][j] for j in range(sk)] for i in range(sq)]]
        for b in range(nb)
    ]
    dist = [[[abs(a - c) for c in k_pos[b]] for a in q_pos[b]] for b in range(nb)]
    bias = [[[[-m * d for d in row] for row in dist[b]] for m in slopes] for b in range(nb)]
    ref = oracle.attention_vjp(q, k, v, d_out, bias=bias, mask=mask)
    for name in ("dq", "dk", "dv"):
        _close(got[name], ref[name], name)
    want = [
        -MP.fsum(ref["dbias"][b][h][i][j] * dist[b][i][j] for b in range(nb) for i in range(sq) for j in range(sk))
        for h in range(2)
    ]
    _close(got["params"]["slopes"], want, "slopes")
    assert any(not x for x in oracle._leaves(mask))
    assert any(oracle._leaves(mask))
