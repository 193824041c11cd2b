"""Copy-pasteable reproduction snippets for failed checks."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..families import BiasFamily, T5Bias, alibi_slopes

__all__: list[str] = []

_MAX_INLINE = 4096  # parameter elements written out in full; beyond that the snippet asks for the object

#: The gradients every attention backward returns, in the order of its tuple.
GRADS = ("dq", "dk", "dv")


def candidate_source(candidate: Any, target: str | None) -> str:
    """Line(s) that bind ``candidate`` in a fresh interpreter."""
    if target:
        return f"from relpos_ref.conformance import load_target\ncandidate = load_target({target!r})"
    module = getattr(candidate, "__module__", None)
    qualname = getattr(candidate, "__qualname__", None)
    if module and qualname and module != "__main__" and "<" not in qualname:
        head = qualname.split(".")[0]
        line = f"from {module} import {head}"
        return line if qualname == "candidate" else f"{line}\ncandidate = {qualname}"
    return "candidate = ...  # the callable you passed (a lambda, closure or __main__ object: paste its definition)"


def array_source(arr: Any) -> str:
    a = np.asarray(arr, dtype=np.float64)
    return f"np.array({a.tolist()!r})"


def positions_source(pos: np.ndarray) -> str:
    pos = np.asarray(pos, dtype=np.int64)
    if len(pos) > 1 and np.all(np.diff(pos) == 1):
        return f"np.arange({int(pos[0])}, {int(pos[-1]) + 1})"
    return f"np.array({pos.tolist()!r}, dtype=np.int64)"


def family_source(fam: BiasFamily | None) -> str:
    """Python that rebuilds ``fam`` with NumPy float64 parameters (exact: repr of a float round-trips)."""
    if fam is None:
        return "None"
    name = type(fam).__name__
    params = fam.parameters()
    opts = fam.options()
    kind = type(fam).name
    if kind == "sandwich":
        return f"rp.Sandwich({opts['num_heads']}, {opts['head_dim']})"
    if kind == "alibi":
        slopes = np.asarray(params["slopes"], dtype=np.float64)
        if np.array_equal(slopes, np.asarray(alibi_slopes(fam.num_heads))):
            return f"rp.ALiBi.from_num_heads({fam.num_heads})"
    if sum(int(np.asarray(v).size) for v in params.values()) > _MAX_INLINE:
        return "...  # your reference family object (its parameters are too large to write out here)"
    args = ", ".join(f"{k}={array_source(np.asarray(v, dtype=np.float64))}" for k, v in params.items())
    kw = ", ".join(f"{k}={v!r}" for k, v in opts.items())
    return f"rp.{name}({', '.join(s for s in (args, kw) if s)})"


def _preamble(candidate: Any, target: str | None, names: str, *, mapping: bool = False) -> list[str]:
    """The imports and the candidate's binding that start every snippet."""
    head = [
        "import numpy as np",
        "import relpos_ref as rp",
        *(["from collections.abc import Mapping"] if mapping else []),
    ]
    return [*head, f"from relpos_ref.conformance import {names}", candidate_source(candidate, target)]


def bias_snippet(
    candidate: Any,
    target: str | None,
    reference: BiasFamily,
    q_pos: np.ndarray,
    k_pos: np.ndarray,
    index: tuple[int, ...] | None,
) -> str:
    lines = [
        *_preamble(candidate, target, "as_numpy"),
        f"reference = {family_source(reference)}",
        f"q_pos = {positions_source(q_pos)}",
        f"k_pos = {positions_source(k_pos)}",
        "got = as_numpy(candidate(q_pos, k_pos))",
        "want = reference.astype(np.float64).bias(q_pos, k_pos)",
    ]
    if index is not None:
        lines.append(f"print(got[{', '.join(map(str, index))}], want[{', '.join(map(str, index))}])")
    return "\n".join(lines)


def bucket_snippet(
    candidate: Any, target: str | None, delta: np.ndarray, opts: dict[str, Any], *, first: int | None = None
) -> str:
    """Python that prints the candidate's and the reference's buckets of the offsets ``delta``, led by ``first``
    (the reported mismatch, so the snippet always shows it)."""
    if first is not None:
        delta = np.concatenate([[first], np.asarray(delta)[np.asarray(delta) != first]])
    kw = ", ".join(f"{k}={v!r}" for k, v in opts.items())
    return "\n".join(
        [
            *_preamble(candidate, target, "as_numpy"),
            f"delta = np.array({np.asarray(delta).tolist()!r}, dtype=np.int64)  # query minus key",
            "print(as_numpy(candidate(delta)))",
            f"print(rp.t5_bucket(delta, {kw}))",
        ]
    )


def attention_snippet(
    candidate: Any,
    target: str | None,
    bias: BiasFamily | None,
    shape: Any,
    *,
    dtype: str,
    seed: int,
    xp_name: str,
    options: dict[str, Any],
    index: tuple[int, ...] | None,
    with_lse: bool = False,
    what: str = "output",
    layout: str = "bhsd",
    features: dict[str, np.ndarray] | None = None,
) -> str:
    """Python that recomputes one array of the candidate and of the reference: ``what`` is the forward's "output" or
    "lse", or the name of a gradient of the backward (dq, dk, dv or a bias parameter); ``layout`` is the
    candidate's tensor layout (its arrays are read back as (B, H, S, D)); ``features`` the case's integer keywords
    (lengths, segment ids), handed to the candidate as int32 arrays of its namespace and to the reference."""
    grad = what not in ("output", "lse")
    args, make = ("q, k, v, d_out", "backward_inputs") if grad else ("q, k, v", "attention_inputs")
    over = "" if layout == "bhsd" else f", layout={layout!r}"
    swap = ".swapaxes(1, 2)  # the candidate's (B, S, H, D) as (B, H, S, D)"
    if xp_name == "numpy" and not over:
        hand = f"candidate({args})"
    else:
        hand = f"candidate(*hand_over(({args}){'' if xp_name == 'numpy' else f', xp={xp_name!r}'}{over}))"
    feats = features or {}
    names, ns = ", ".join(feats), "" if xp_name == "numpy" else f", xp={xp_name!r}"
    if feats:
        hand = hand[:-1] + ", **given)"
    opts = ", ".join([*(f"{k}={v!r}" for k, v in options.items()), *(f"{n}={n}" for n in feats)])
    ref = f"rp.{'attention_vjp' if grad else 'attention'}(*(a.astype(np.float64) for a in ({args})), bias=bias, {opts}"
    if not grad:
        pos = int(what == "lse")
        got, want = (f"result[{pos}]" if with_lse else "result"), f"{ref}, return_lse=True)[{pos}]"
    elif what in GRADS:
        got, want = (
            f"result[{what!r}] if isinstance(result, Mapping) else result[{GRADS.index(what)}]",
            f"{ref}).{what}",
        )
    else:
        got, want = (
            f"result[{what!r}] if isinstance(result, Mapping) else result[3][{what!r}]",
            f"{ref}).dbias[{what!r}]",
        )
        if what == "table" and isinstance(bias, T5Bias) and bias._layout == "buckets_heads":
            want += ".T  # the reference below is built (heads, buckets); the candidate's layout is (buckets, heads)"
    lines = [
        *_preamble(candidate, target, f"AttentionShape, as_numpy, {make}, hand_over", mapping=grad),
        f"bias = {family_source(bias)}",
        f"shape = {shape!r}",
        f"{args} = {make}(shape, dtype={dtype!r}, seed={seed})",
        *(f"{n} = np.array({np.asarray(a).tolist()!r}, dtype=np.int64)" for n, a in feats.items()),
        *(
            [f"given = dict(zip({tuple(feats)!r}, hand_over(({names},){ns})))  # int32 arrays of its namespace"]
            * bool(feats)
        ),
        f"result = {hand}",
        f"got = as_numpy({got})" + (swap if over and what in ("output", *GRADS) else ""),
        f"want = {want}",
    ]
    if index is not None:
        sel = ", ".join(map(str, index[:3]))
        lines.append(f"print(got[{sel}].tolist())")
        lines.append(f"print(want[{sel}].tolist())")
    return "\n".join(lines)
