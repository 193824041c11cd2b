"""Central-difference gradient oracle: bias_vjp and attention_vjp at twice the working precision."""

from __future__ import annotations

from ._mp import DEFAULT_DPS, _exact, _int_list, _leaves, _map, _shape, _tree, context
from .attention import _as4, _check_options, _softcap, attention
from .families import FAMILY_PARAMS, _option, family_bias, fire_inputs
from .positions import attention_layout

# ---------------------------------------------------------------------------------------------
# Gradients by central differences
# ---------------------------------------------------------------------------------------------


def work_dps(dps=DEFAULT_DPS):
    """Digits at which the central differences evaluate the loss: ``2 * dps + 10``."""
    context(dps)  # validates dps
    return 2 * dps + 10


def _difference(holder, key, f, step):
    """Central difference of ``f()`` with respect to ``holder[key]`` (restored afterwards).

    The step is ``step * max(1, |x|)``. The divisor is the step actually taken, ``(x + h) - (x - h)``, which is exact
    (the two values are within a factor 2 of each other, or ``x = 0``), so rounding ``x +- h`` costs nothing.
    """
    x = holder[key]
    h = step * max(1, abs(x))
    xp, xm = x + h, x - h
    holder[key] = xp
    fp = f()
    holder[key] = xm
    fm = f()
    holder[key] = x
    return (fp - fm) / (xp - xm)


def _gradient(holder, key, f, step, leaf=None):
    """Gradient of ``f()`` with respect to every leaf under ``holder[key]``, with its nesting.

    ``f`` receives the index path of the perturbed leaf below ``holder[key]``. ``leaf(x)`` may return a value to use
    instead of a difference (None: differentiate).
    """

    def walk(parent, k, path):
        val = parent[k]
        if isinstance(val, list):
            return [walk(val, s, (*path, s)) for s in range(len(val))]
        if leaf is not None:
            got = leaf(val)
            if got is not None:
                return got
        return _difference(parent, k, lambda: f(path), step)

    return walk(holder, key, ())


def _family_params(cw, family, params):
    if family not in FAMILY_PARAMS:
        raise ValueError(f"family must be one of {', '.join(FAMILY_PARAMS)}, got {family!r}")
    want = FAMILY_PARAMS[family]
    got = sorted(params or {})
    if got != sorted(want):
        raise ValueError(f"params for family {family!r} must have the keys {list(want)}, got {got}")
    return {name: _tree(cw, params[name], name) for name in want}


def _check_relu_margin(params, q_pos, k_pos, options, dps):
    """Raise if a FIRE relu pre-activation ``w1[w] * x + b1[w]`` is within ``10**-(dps//2)`` (relative) of 0.

    A central difference across relu's kink measures the average of its one-sided slopes (half the active one),
    while the library's convention is relu'(0) = 0. Away from the kink (perturbations are ~10**-dps) both agree.
    """
    ctx = context(dps)
    eps = _exact(_option(dict(options or {}), "eps", "fire", 0.0))
    x = fire_inputs(q_pos, k_pos, c=_exact(params["c"]), L=_exact(params["L"]), eps=eps, dps=dps)
    w1 = [ctx.mpf(t) for t in _leaves(params["w1"])]
    b1 = [ctx.mpf(t) for t in _leaves(params["b1"])]
    tol = ctx.mpf(10) ** (-(dps // 2))
    for w, (a, c) in enumerate(zip(w1, b1)):
        for r, row in enumerate(x):
            for col, xv in enumerate(row):
                pre = a * xv + c
                if abs(pre) <= tol * (1 + abs(a * xv) + abs(c)):
                    raise ValueError(
                        f"FIRE relu pre-activation w1[{w}]*x + b1[{w}] = {ctx.nstr(pre, 5)} at query {q_pos[r]}, key "
                        f"{k_pos[col]} is within {ctx.nstr(tol, 3)} (relative) of 0: a central difference there "
                        "averages relu's one-sided slopes, the library takes relu'(0) = 0; choose w1, b1 that keep "
                        "every pre-activation away from 0"
                    )


def _step(dps, step):
    cw = context(work_dps(dps))
    if step is None:
        return cw.mpf(10) ** (-dps)
    step = _tree(cw, step, "step")
    if not step > 0:
        raise ValueError(f"step must be positive, got {step}")
    return step


def bias_vjp(family, params, q_pos, k_pos, d_bias, *, options=None, dps=DEFAULT_DPS, step=None):
    """Parameter gradients of ``sum(d_bias * bias)`` by central differences of the bias functions above.

    Parameters
    ----------
    family : str
        ``alibi``, ``kerple_power``, ``kerple_log``, ``t5``, ``offset``, ``fire``, ``sandwich`` or ``tensor`` (the
        array itself is the bias).
    params : dict
        The family's parameters named as the library's constructor arguments (:data:`FAMILY_PARAMS`): ``slopes``;
        ``r1``, ``r2``; ``table`` (T5: in the layout ``options["layout"]``); ``w1`` (W, 1), ``b1``, ``w2`` (H, W),
        ``b2``, ``c``, ``L``; nothing for Sandwich; ``array`` (H, Sq, Sk) for a tensor.
    q_pos, k_pos : sequences of int
    d_bias : nested list (H, Sq, Sk)
        Cotangent of the bias; finite.
    options : dict, optional
        T5 ``bidirectional``, ``max_distance``, ``layout``; FIRE ``eps``; Sandwich ``num_heads``, ``head_dim``.
    dps : int
        Digits of the result. The loss is evaluated at :func:`work_dps` digits.
    step : number, optional
        Relative step; ``10**-dps`` by default.

    Returns
    -------
    dict
        ``{name: gradient}`` with each parameter's nesting (0-d ``c`` and ``L`` as plain ``mpf``); ``{}`` for
        Sandwich.

    Notes
    -----
    Step and error budget. Each parameter ``x`` moves by ``h = step * max(1, |x|)`` (``10**-dps`` relative) and the
    loss is evaluated at ``w = 2 dps + 10`` digits.

    * Truncation: ``h**2 |f'''| / 6``, about ``10**-(2 dps)`` relative where the loss is smooth. At a kink the
      central difference gives the average of the one-sided slopes plus ``O(h)``, about ``10**-dps``.
    * Rounding: ``10**-w * sum|terms| / h``, about ``10**-(dps + 10)`` relative to the sum of the absolute terms of
      the loss.

    At dps = 50 each part is below 1e-45, far below the 1e-25 asked of the oracle and the 20 digits stored in the
    golden vectors.

    The only kinks are FIRE's ``max(L, i)`` at ``L == i``, where the average (half the slope for ``L > i``) is also
    the library's convention, and relu at 0, where it is not (the library takes relu'(0) = 0): FIRE parameters must
    keep every pre-activation away from 0, and a ``ValueError`` says so otherwise. KERPLE's ``|Delta|**r2`` is 0 at
    ``Delta = 0`` for every r2, so its r2-derivative there is 0, as in the library. A tensor entry at -inf gets its
    ``d_bias`` (the derivative of the identity is 1 at every entry; no difference exists there).
    """
    ctx = context(dps)
    wdps = work_dps(dps)
    cw = context(wdps)
    h_rel = _step(dps, step)
    holder = _family_params(cw, family, params)
    q_pos = _int_list(q_pos, "q_pos")
    k_pos = _int_list(k_pos, "k_pos")
    g = _tree(cw, d_bias, "d_bias")
    base = family_bias(family, holder, q_pos, k_pos, options=options, dps=wdps)
    if _shape(g) != _shape(base):
        raise ValueError(f"d_bias must have the bias's shape (H, Sq, Sk) = {_shape(base)}, got {_shape(g)}")
    if not all(cw.isfinite(t) for t in _leaves(g)):
        raise ValueError("d_bias must be finite")
    if family == "fire":
        _check_relu_margin(holder, q_pos, k_pos, options, dps)
    g_flat = list(_leaves(g))

    def loss(_path):
        b = family_bias(family, holder, q_pos, k_pos, options=options, dps=wdps)
        # An infinite entry (a tensor's -inf) is a constant term of the loss: leaving it out changes no difference.
        return cw.fsum(gv * bv for gv, bv in zip(g_flat, _leaves(b)) if cw.isfinite(bv))

    out = {}
    for name in FAMILY_PARAMS[family]:
        grad = _gradient(holder, name, loss, h_rel)
        if family == "tensor":
            # The bias is the array itself; d loss / d array = d_bias, also at -inf where no difference exists.
            grad = [
                [[g[h][i][j] if cw.isinf(holder[name][h][i][j]) else val for j, val in enumerate(row)]
                 for i, row in enumerate(plane)]
                for h, plane in enumerate(grad)
            ]  # fmt: skip
        out[name] = _map(ctx.mpf, grad)
    return out


def attention_vjp(
    q,
    k,
    v,
    d_out,
    *,
    family=None,
    params=None,
    options=None,
    bias=None,
    causal=False,
    align="bottom_right",
    scale=None,
    placement="post_scale",
    mask=None,
    fully_masked="zero",
    d_lse=None,
    window=None,
    softcap=None,
    q_pos=None,
    k_pos=None,
    q_lens=None,
    k_lens=None,
    q_segment_ids=None,
    k_segment_ids=None,
    segment_positions="global",
    dps=DEFAULT_DPS,
    step=None,
):
    """Gradients of ``L = sum(d_out * out) + sum(d_lse * lse)`` through :func:`attention`, by central differences.

    Parameters
    ----------
    q, k, v, causal, align, scale, placement, mask, fully_masked
        As in :func:`attention`.
    window, softcap, q_pos, k_pos, q_lens, k_lens, q_segment_ids, k_segment_ids, segment_positions
        As in :func:`attention` (softcap is a constant, not differentiated). Padding queries contribute nothing,
        in both ``fully_masked`` modes.
    d_out : nested list (B, H, Sq, Dv)
    family, params, options : optional
        A bias family as in :func:`bias_vjp`. Its bias (H, Sq, Sk) is built inside the perturbed function from the
        parameters and each batch row's positions (:func:`attention_layout`: ``positions(Sq, Sk, align=align)``
        unless positions, lengths or restarted segments say otherwise).
    bias : nested list, optional
        A bias array broadcastable to (B, H, Sq, Sk) (not together with ``family``).
    d_lse : nested list (B, H, Sq), optional
    dps, step
        As in :func:`bias_vjp` (same step rule and error budget).

    Returns
    -------
    dict
        ``dq`` (B, H, Sq, D), ``dk`` (B, Hkv, Sk, D), ``dv`` (B, Hkv, Sk, Dv); ``params`` (as :func:`bias_vjp`)
        for a family, or ``dbias`` (the bias array's own shape) for a bias array.

    Notes
    -----
    The loss is a sum over (batch, key/value head) blocks that do not interact. A perturbation of q, k, v or of a
    bias-array entry re-evaluates only the blocks it reaches; a family parameter re-evaluates all of them.

    * A bias entry at -inf is a mask (probability exactly 0, as in the library); its gradient is 0, as that of every
      masked entry.
    * ``fully_masked="zero"``: the loss is evaluated with zero rows and lse -inf, and the d_lse of a row with nothing
      to attend is left out (its lse is -inf whatever the inputs). Such a row contributes exactly nothing: every
      difference it could enter is a difference of two equal numbers.
    * ``fully_masked="nan"``: the same differences, then NaN written where autograd through a naive softmax puts it,
      per the library's convention: the dq row and the bias-array gradient entries of an empty row, dk and dv of its
      (batch, key/value head), and every family parameter gradient. This part is a rule, not a measurement: a NaN
      loss has no differences to take.
    """
    ctx = context(dps)
    _check_options(placement, fully_masked)
    if family is not None and bias is not None:
        raise ValueError("family and bias: give a bias family or a bias array, not both")
    wdps = work_dps(dps)
    cw = context(wdps)
    h_rel = _step(dps, step)
    qkv = {name: _tree(cw, x, name) for name, x in (("q", q), ("k", k), ("v", v))}
    for name, x in qkv.items():
        if len(_shape(x)) != 4:
            raise ValueError(f"{name} must be 4-D, got shape {_shape(x)}")
    nb, nh, sq, dim = _shape(qkv["q"])
    nkv, sk = _shape(qkv["k"])[1:3]
    dv = _shape(qkv["v"])[3]
    if _shape(qkv["k"]) != (nb, nkv, sk, dim) or _shape(qkv["v"])[:3] != (nb, nkv, sk):
        raise ValueError(f"k, v must be (B, Hkv, Sk, D), (B, Hkv, Sk, Dv), got {_shape(qkv['k'])}, {_shape(qkv['v'])}")
    if nh % nkv:
        raise ValueError(f"the number of query heads {nh} must be a multiple of kv heads {nkv}")
    group = nh // nkv
    d_o = _tree(cw, d_out, "d_out")
    if _shape(d_o) != (nb, nh, sq, dv):
        raise ValueError(f"d_out must have the output's shape {(nb, nh, sq, dv)}, got {_shape(d_o)}")
    d_l = None if d_lse is None else _tree(cw, d_lse, "d_lse")
    if d_l is not None and _shape(d_l) != (nb, nh, sq):
        raise ValueError(f"d_lse must have the lse's shape {(nb, nh, sq)}, got {_shape(d_l)}")
    if not all(cw.isfinite(x) for x in (*_leaves(d_o), *(_leaves(d_l) if d_l is not None else ()))):
        raise ValueError("d_out and d_lse must be finite")
    sc = None if scale is None else _exact(_tree(cw, scale, "scale"))
    cap = _softcap(cw, softcap)
    cap = None if cap is None else _exact(cap)
    q_pos, k_pos, structural, padded = attention_layout(
        nb,
        sq,
        sk,
        causal=causal,
        align=align,
        window=window,
        q_pos=q_pos,
        k_pos=k_pos,
        q_lens=q_lens,
        k_lens=k_lens,
        q_segment_ids=q_segment_ids,
        k_segment_ids=k_segment_ids,
        segment_positions=segment_positions,
    )
    # Batch rows that share their positions share one bias evaluation (every perturbation re-evaluates it).
    rows_at = {}
    for b in range(nb):
        rows_at.setdefault((tuple(q_pos[b]), tuple(k_pos[b])), []).append(b)
    shape4 = (nb, nh, sq, sk)

    # What gets perturbed for the bias: a family's parameters, or an array. A tensor family's array is perturbed as
    # an array (each entry reaches one head); it stays a family for the NaN rule and the result's keys.
    fam = None
    if family is not None:
        fam = _family_params(cw, family, params)
        for qp, kp in rows_at:
            family_bias(family, fam, qp, kp, options=options, dps=wdps)  # validates the options and shapes
            if family == "fire":
                _check_relu_margin(fam, qp, kp, options, dps)
    holder, hkey = ({"bias": _tree(cw, bias, "bias")}, "bias") if bias is not None else (fam, "array")
    has_array = bias is not None or family == "tensor"

    def current_bias():
        if has_array:
            return holder[hkey]
        if family is None:
            return None
        per_row = [None] * nb
        for (qp, kp), rows in rows_at.items():
            plane = family_bias(family, fam, qp, kp, options=options, dps=wdps)
            for b in rows:
                per_row[b] = plane
        return per_row

    base = current_bias()
    get_b = _as4(base, "bias", shape4) if base is not None else None
    if base is not None and any(cw.isnan(x) or x == cw.inf for x in _leaves(base)):
        raise ValueError("bias must be finite or -inf (a mask)")
    get_m = _as4(mask, "mask", shape4) if mask is not None else None

    def attend(b, h, i, j):
        return (
            structural[b][i][j]
            and (get_m is None or bool(get_m(b, h, i, j)))
            and (get_b is None or get_b(b, h, i, j) != cw.ninf)
        )

    keep = [[[[attend(b, h, i, j) for j in range(sk)] for i in range(sq)] for h in range(nh)] for b in range(nb)]

    def block_loss(b, g, bias_now, heads=None):
        """The loss terms of batch b, kv head g (only query ``heads`` of that group, when given)."""
        heads = range(g * group, (g + 1) * group) if heads is None else heads
        bs = None
        if bias_now is not None:
            getb = _as4(bias_now, "bias", shape4)
            # Masked entries (the -inf ones among them) are excluded by the mask; their value does not matter.
            bs = [
                [[[getb(b, h, i, j) if keep[b][h][i][j] else 0 for j in range(sk)] for i in range(sq)] for h in heads]
            ]
        out, lse = attention(
            _exact([[qkv["q"][b][h] for h in heads]]),
            _exact([[qkv["k"][b][g]]]),
            _exact([[qkv["v"][b][g]]]),
            bias=_exact(bs) if bs is not None else None,
            scale=sc,
            placement=placement,
            mask=[[keep[b][h] for h in heads]],
            fully_masked="zero",
            softcap=cap,
            dps=wdps,
        )
        terms = []
        for hh, h in enumerate(heads):
            for i in range(sq):
                terms.extend(d_o[b][h][i][c] * out[0][hh][i][c] for c in range(dv))
                if d_l is not None and cw.isfinite(lse[0][hh][i]):
                    terms.append(d_l[b][h][i] * lse[0][hh][i])
        return cw.fsum(terms)

    def reached(name, b, hd):
        """The loss terms an entry of q[b][hd] (its own query head) or of k, v[b][hd] (every head of group hd) reach."""
        if name == "q":
            return lambda _path: block_loss(b, hd // group, base, [hd])
        return lambda _path: block_loss(b, hd, base)

    res = {
        "d" + name: [[_gradient(qkv[name][b], hd, reached(name, b, hd), h_rel) for hd in range(len(qkv[name][b]))]
                     for b in range(nb)]
        for name in ("q", "k", "v")
    }  # fmt: skip

    grads = {}
    if has_array:
        rank = len(_shape(holder[hkey]))
        dims = (1,) * (4 - rank) + _shape(holder[hkey])

        def array_loss(path):
            # an entry reaches its own batch and head, or all of them along an axis it is broadcast over
            path4 = (0,) * (4 - rank) + path
            bs_ = range(nb) if dims[0] == 1 else [path4[0]]
            if dims[1] == 1:
                return cw.fsum(block_loss(b, g, holder[hkey]) for b in bs_ for g in range(nkv))
            h = path4[1]
            return cw.fsum(block_loss(b, h // group, holder[hkey], [h]) for b in bs_)

        grads[hkey] = _gradient(holder, hkey, array_loss, h_rel, leaf=lambda x: cw.mpf(0) if x == cw.ninf else None)
    elif family is not None:

        def family_loss(_path):
            now = current_bias()
            return cw.fsum(block_loss(b, g, now) for b in range(nb) for g in range(nkv))

        for name in FAMILY_PARAMS[family]:
            grads[name] = _gradient(fam, name, family_loss, h_rel)

    if fully_masked == "nan":
        _nan_rule(cw, keep, padded, res, grads, family, group)

    result = {name: _map(ctx.mpf, res[name]) for name in ("dq", "dk", "dv")}
    if family is not None:
        result["params"] = {n: _map(ctx.mpf, gr) for n, gr in grads.items()}
    elif bias is not None:
        result["dbias"] = _map(ctx.mpf, grads["bias"])
    return result


def _nan_rule(cw, keep, padded, res, grads, family, group):
    """Write NaN where autograd through a naive softmax puts it for rows with nothing to attend (in place).

    Padding queries are not such rows: they are left out of the loss, not fully masked.
    """
    nb, nh, sq = len(keep), len(keep[0]), len(keep[0][0])
    empty = [[[not padded[b][i] and not any(keep[b][h][i]) for i in range(sq)] for h in range(nh)] for b in range(nb)]
    if not any(_leaves(empty)):
        return
    nan = cw.nan
    for b in range(nb):
        for h in range(nh):
            for i in range(sq):
                if empty[b][h][i]:
                    res["dq"][b][h][i] = _map(lambda _: nan, res["dq"][b][h][i])
        # A NaN probability row reaches every key of its (batch, kv head) through P^T dO and dz^T q.
        for g in range(len(res["dk"][b])):
            if any(empty[b][h][i] for h in range(g * group, (g + 1) * group) for i in range(sq)):
                res["dk"][b][g] = _map(lambda _: nan, res["dk"][b][g])
                res["dv"][b][g] = _map(lambda _: nan, res["dv"][b][g])
    if family == "tensor":
        # The tensor is the bias itself: only the rows of empty queries are NaN, as autograd gives.
        arr = grads["array"]
        for b in range(nb):
            for h in range(nh):
                for i in range(sq):
                    if empty[b][h][i]:
                        arr[h][i] = [nan] * len(arr[h][i])
        return
    if family is not None:
        for name in grads:
            grads[name] = _map(lambda _: nan, grads[name])
        return
    if "bias" in grads:
        arr = grads["bias"]
        rank = len(_shape(arr))
        dims = (1,) * (4 - rank) + _shape(arr)
        for b in range(nb):
            for h in range(nh):
                for i in range(sq):
                    if empty[b][h][i]:
                        row = arr
                        for ax, ix in enumerate((b, h, i)):
                            if ax >= 4 - rank:
                                row = row[ix if dims[ax] > 1 else 0]
                        # the entries this row reads: the whole key axis (or its single broadcast entry)
                        if rank == 0:
                            grads["bias"] = nan
                        else:
                            for j in range(len(row)):
                                row[j] = nan
