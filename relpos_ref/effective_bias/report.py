"""What a conformance check reports of effective-bias readouts, reproduction snippets, and the heatmap (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from .. import _checks
from .compare import EffectiveBiasResult
from .readout import _shape

__all__ = [
    "ReadoutSummary",
    "RowSumFaults",
    "plot_effective_bias",
    "probe_snippet",
    "readout_summary",
    "row_sum_faults",
    "save_plot",
]


class ReadoutSummary(NamedTuple):
    """What a conformance check reports of the readouts of several cases (:func:`readout_summary`)."""

    passed: bool
    summary: str
    max_error: float
    bound: float
    diagnosis: list[str]
    details: list[str]
    mismatch: dict[str, Any] | None
    worst_case: str | None
    tolerance: str


def readout_summary(results: Sequence[tuple[str, EffectiveBiasResult]], notes: Sequence[str] = ()) -> ReadoutSummary:
    """The verdict, summary line, diagnosis (findings and worst groups of each failing case), details (counts, all
    worst groups, failing heads, ``notes``) and first mismatch (the worst entry of the worst case) of ``results``."""
    if not results:
        msg = "results: expected at least one (case name, EffectiveBiasResult), got none"
        raise ValueError(msg)
    many = len(results) > 1
    failing = [(n, r) for n, r in results if not r.passed]
    diagnosis: list[str] = []
    for name, r in failing:
        diagnosis += [f"case {name}: {line}" if many else line for line in r.diagnosis()]
    details = [f"case {name}: {line}" for name, r in results for line in r.details()] + list(notes)
    mismatch = worst_case = None
    if failing:
        worst_case, r = max(failing, key=lambda t: t[1].worst_ratio)
        assert r.worst_index is not None  # a failing result has a worst entry
        assert r.worst_values is not None
        i, j = r.worst_index[2], r.worst_index[3]
        mismatch = {
            "index": r.worst_index,
            "case": worst_case,
            "q_pos": int(r.q_pos[i]),
            "k_pos": int(r.k_pos[j]),
            "Delta": int(r.q_pos[i]) - int(r.k_pos[j]),
            "candidate": r.worst_values[0],
            "reference": r.worst_values[1],
        }
    dtype = results[0][1].dtype
    read = ", ".join(f"{n} ({r.counts['readable']} readable entries)" for n, r in results)
    summary = (
        f"bias read through one-hot V probes at q = 0 on {read}: log P against the family's bias elementwise, up "
        f"to one constant per row; entries below what {dtype} resolves are counted, not passed"
    )
    return ReadoutSummary(
        passed=not failing,
        summary=summary,
        max_error=max(r.max_error for _, r in results),
        bound=max(r.bound for _, r in results),
        diagnosis=diagnosis,
        details=details,
        mismatch=mismatch,
        worst_case=worst_case,
        tolerance=results[0][1].tolerance,
    )


class RowSumFaults(NamedTuple):
    """What :func:`row_sum_faults` found: the worst fault (inf for a negative P, mass on a masked key or a NaN),
    the first faulty entry or row as a mismatch, and the diagnosis."""

    worst: float
    mismatch: dict[str, Any] | None
    diagnosis: list[str]


def row_sum_faults(probs: Any, masked: Any, rows: Any, q_pos: Any, k_pos: Any, /, *, slack: float) -> RowSumFaults:
    """The faults of probabilities (B, H, Sq, Sk) read by probes on the ``rows`` (B, H, Sq) that see a key: a row
    sum off 1 by more than ``slack``, a negative (or NaN) entry, a nonzero entry on a ``masked`` key."""
    p = np.asarray(probs, dtype=np.float64)
    rows = np.asarray(rows, dtype=bool)
    live = np.broadcast_to(rows[..., None], p.shape)
    masked = np.broadcast_to(np.asarray(masked, dtype=bool), p.shape)
    sums = np.sum(np.where(live, p, 0.0), axis=-1)
    dev = np.where(rows, np.abs(sums - 1.0), 0.0)
    dev = np.where(np.isnan(dev), np.inf, dev)
    negative = live & ~(p >= 0)  # NaN counts: it is no probability
    leak = live & masked & (p != 0) & ~negative
    worst = float(np.max(dev, initial=0.0))
    mismatch, diagnosis = None, []
    if negative.any() or leak.any():
        worst = np.inf
        idx = tuple(int(i) for i in np.argwhere(negative if negative.any() else leak)[0])
        dl = int(q_pos[idx[2]]) - int(k_pos[idx[3]])
        what = "negative or NaN probability" if negative.any() else "probability on a masked key"
        mismatch = {"index": idx, "what": what, "Delta": dl, "candidate": float(p[idx]), "reference": 0.0}
        if negative.any():
            diagnosis.append("negative (or NaN) probabilities")
        else:
            deltas = np.broadcast_to(np.subtract.outer(np.asarray(q_pos), np.asarray(k_pos)), p.shape)[leak]
            nxt = " (only Delta = -1, the next key: the causal mask is off by one)" if np.all(deltas == -1) else ""
            diagnosis.append(f"probability mass on keys the mask removes{nxt}")
    elif worst > slack:
        idx = tuple(int(i) for i in np.argwhere(dev > slack)[0])
        mismatch = {"index": idx, "what": "row sum", "candidate": float(sums[idx]), "reference": 1.0}
    return RowSumFaults(worst, mismatch, diagnosis)


def probe_snippet(snippet: str, block: int, *, shape: Any, dtype: str, seed: int) -> str:
    """A reproduction ``snippet`` (``attention_inputs(shape, ..., seed=seed)`` then the candidate and the
    reference) turned into the readout of probe ``block``: q = 0 and the one-hot v of :func:`probe_values`."""
    sh = _shape(shape)
    start = block * sh.head_dim
    probe = (
        f"seed={seed})\nfrom relpos_ref.effective_bias import probe_values\n"
        "q = np.zeros_like(q)  # every logit is 0: the output is softmax(bias) @ v\n"
        f"v = probe_values(shape, {block}, dtype={dtype!r})  # output column c = probability of key {start} + c"
    )
    return snippet.replace(f"seed={seed})", probe, 1)


def save_plot(result: EffectiveBiasResult, directory: Any, stem: str) -> str:
    """Write :func:`plot_effective_bias` as ``directory/stem.png`` (``stem`` made a safe file name, the directory
    created) and return a note saying where; without matplotlib the note says why nothing was written."""
    import os

    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem)
    try:
        os.makedirs(os.fspath(directory), exist_ok=True)
        path = plot_effective_bias(result, os.path.join(os.fspath(directory), f"{safe}.png"))
    except ImportError as exc:
        return f"effective-bias plot not written: {exc}"
    return f"effective-bias plot written to {path}"


def plot_effective_bias(result: EffectiveBiasResult, path: Any, /, *, dpi: int = 110, batch: int = 0) -> str:
    """Write a PNG heatmap of effective minus reference bias (the row constant removed) per head; return the path.

    One panel per head, queries down and keys across (one panel of heads x Delta when Sq = 1); grey: not compared
    (masked, not readable, not read), black: a masked key with P > 0 or P = 0 on a kept key. matplotlib is imported
    here (ImportError naming the ``plot`` extra when it is missing).
    """
    import os

    from ..plot import new_figure, require_matplotlib

    if not isinstance(result, EffectiveBiasResult):
        msg = f"result: expected an EffectiveBiasResult, got {type(result).__name__}"
        raise TypeError(msg)
    mpl = require_matplotlib()
    from matplotlib.colors import Normalize

    res = result.residual
    bi = _checks.integer("batch", batch, minimum=0)
    if bi >= res.shape[0]:
        msg = f"batch: expected 0 <= batch < {res.shape[0]}, got {bi}"
        raise ValueError(msg)
    r = res[bi]

    def norm(x: np.ndarray) -> Any:
        """A colour scale symmetric about 0 over the finite entries of ``x`` (at least the bound)."""
        v = max(float(np.abs(x[np.isfinite(x)]).max(initial=0.0)), result.bound, 1e-300)
        return Normalize(vmin=-v, vmax=v)

    cmap = mpl.colormaps["RdBu_r"].with_extremes(bad="0.85", over="black", under="black")
    style = {"cmap": cmap, "aspect": "auto", "interpolation": "nearest"}
    h, sq = r.shape[0], r.shape[1]
    title = (
        f"effective - reference bias ({result.dtype}, row constant removed): max error {result.max_error:.3g}, "
        f"bound {result.bound:.2g}; grey: not compared, black: P on a masked key or P = 0 on a kept one"
    )
    kp, qp = result.k_pos, result.q_pos
    if sq == 1:
        fig = new_figure(mpl, 9, 1.2 + 0.35 * h)
        ax = fig.subplots()
        order = np.argsort(qp[0] - kp)
        dl = (qp[0] - kp)[order]
        im = ax.imshow(r[:, 0, order], extent=(dl[0] - 0.5, dl[-1] + 0.5, h - 0.5, -0.5), norm=norm(r), **style)
        ax.set_xlabel("Delta = q_pos - k_pos")
        ax.set_ylabel("head")
        fig.colorbar(im, ax=ax, extend="both")
    else:
        cols = min(4, h)
        rows = -(-h // cols)
        fig = new_figure(mpl, 3.2 * cols, 2.8 * rows + 0.6)
        axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
        for hh, ax in enumerate(axes):
            if hh >= h:
                ax.set_visible(False)
                continue
            box = (kp[0] - 0.5, kp[-1] + 0.5, qp[-1] + 0.5, qp[0] - 0.5)
            im = ax.imshow(r[hh], extent=box, norm=norm(r[hh]), **style)
            fig.colorbar(im, ax=ax, extend="both", shrink=0.8)
            hs = result.heads[hh]
            ax.set_title(f"head {hh}: max error {hs.max_error:.2g}", fontsize=8)
            ax.set_xlabel("key position", fontsize=7)
            ax.set_ylabel("query position", fontsize=7)
    fig.suptitle(title, fontsize=8)
    out = os.fspath(path)
    fig.savefig(out, format="png", dpi=_checks.integer("dpi", dpi, minimum=1))
    return out
