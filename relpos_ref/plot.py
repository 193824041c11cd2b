r"""``relpos-ref plot``: pictures of the bias families, and the matplotlib helpers the bench plots share.

Figures written by :func:`family_figures` (every value computed by this package's own families and softmax):

``penalty_curves``
    One panel per family: the penalty :math:`b_h(\Delta)` against the offset :math:`\Delta = i - j` for every head.
``penalty_<family>``
    The same curve in more detail: ALiBi with its slopes; T5's bucket function (bidirectional and causal) next to a
    table read through it; KERPLE power and log; FIRE at several absolute query positions, against :math:`\Delta` and
    against :math:`\Delta / i`; Sandwich's oscillation; the clipped per-offset table.
``heatmaps`` and ``heatmap_<family>``
    :math:`b_h(i, j)` and the attention probabilities it alone produces (all query-key scores zero, causal mask) for
    the first and last head.

Parameters of the learned families (T5, offset table, KERPLE, FIRE) are seeded illustrations, not trained weights; the
figures say so. matplotlib is the ``plot`` extra (``pip install 'relpos_ref[plot]'``) and is imported only here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._host import host_numpy
from .families import (
    FAMILIES,
    FIRE,
    ALiBi,
    BiasFamily,
    KerpleLog,
    KerplePower,
    OffsetBias,
    Sandwich,
    T5Bias,
    family_class,
    t5_bucket,
)
from .positions import causal_mask, positions
from .softmax import biased_softmax

__all__ = ["PLOT_FAMILIES", "family_figures", "matplotlib_or_none", "require_matplotlib"]

#: Every registered family with a closed form (the tensor bias has none to draw), in registry order.
PLOT_FAMILIES: tuple[str, ...] = tuple(n for n in FAMILIES if n != "tensor")
_MISSING = (
    "matplotlib is required for plots and is not installed; install the 'plot' extra: pip install 'relpos_ref[plot]'"
)


def matplotlib_or_none() -> Any:
    """The matplotlib module, or None when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    return matplotlib


def require_matplotlib() -> Any:
    """The matplotlib module; ImportError naming the ``plot`` extra when it is missing."""
    mpl = matplotlib_or_none()
    if mpl is None:
        raise ImportError(_MISSING)
    return mpl


def new_figure(mpl: Any, w: float, h: float) -> Any:
    """A constrained-layout Figure of w x h inches."""
    # Figure without pyplot: no global state, no GUI backend, safe in threads and tests.
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def save_figure(mpl: Any, fig: Any, out_dir: str, stem: str, formats: Sequence[str], dpi: int) -> list[str]:
    """Write ``fig`` as out_dir/stem.<format> for each format (reproducible SVG); return the paths."""
    paths = []
    with mpl.rc_context({"svg.fonttype": "none", "svg.hashsalt": "relpos_ref"}):
        for fmt in formats:
            path = os.path.join(out_dir, f"{stem}.{fmt}")
            meta = {"Date": None} if fmt == "svg" else {}
            fig.savefig(path, format=fmt, dpi=dpi, metadata=meta)
            paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# families with illustrative parameters


def illustrative_family(name: str, num_heads: int = 8, head_dim: int = 64, *, seed: int = 0) -> BiasFamily:
    """A float64 family with parameters chosen to show its shape (learned families: seeded, smooth, not trained).

    ``name`` is a registry name (``PLOT_FAMILIES``); an unknown name raises the registry's ValueError.
    """
    family_class(name)  # ValueError naming the registered families for an unknown name
    h = num_heads
    rng = np.random.default_rng([seed, list(FAMILIES).index(name)])
    frac = (np.arange(h) + 1) / h
    if name == "alibi":
        return ALiBi.from_num_heads(h)
    if name == "t5":
        # Bidirectional table (H, 32): buckets 0-15 look back, 16-31 look ahead; steeper heads first, a little noise.
        b = np.arange(16)
        half = -np.outer(1.5 / frac, np.log1p(b)) / 2
        table = np.concatenate([half, 0.7 * half - 0.3], axis=1) + 0.1 * rng.normal(size=(h, 32))
        return T5Bias(table, bidirectional=True, max_distance=128, layout="heads_buckets")
    if name == "offset":
        # Smooth decay, looking back (Delta > 0) a little cheaper than ahead, plus a little seeded noise.
        d = np.arange(-32, 33)
        steep = 1.5 / frac[:, None]
        table = -np.where(d >= 0, 0.6, 1.0) * steep * np.log1p(np.abs(d))[None, :] / 3
        table += 0.15 * rng.normal(size=table.shape)
        return OffsetBias(table)
    if name == "kerple_power":
        return KerplePower(np.linspace(0.1, 1.0, h), np.linspace(0.25, 1.0, h))
    if name == "kerple_log":
        return KerpleLog(np.linspace(0.5, 4.0, h), np.geomspace(0.05, 5.0, h))
    if name == "fire":
        width = 32
        w1 = rng.normal(scale=3.0, size=(width, 1))
        b1 = rng.normal(size=width)
        w2 = rng.normal(size=(h, width)) / math.sqrt(width)
        b2 = np.zeros(h)
        return FIRE(w1, b1, w2, b2, c=0.1, L=512.0)
    if name == "sandwich":
        return Sandwich(h, head_dim)
    msg = f"family: expected one of {PLOT_FAMILIES} (a family with a closed form to draw), got {name!r}"
    raise ValueError(msg)


def penalty(fam: Any, deltas: np.ndarray, *, query_pos: int | None = None) -> np.ndarray:
    r""":math:`b_h(\Delta)` for every head, shape (H, len(deltas)): one query at ``query_pos`` (default
    ``max(deltas)``) and keys at ``query_pos - deltas``."""
    deltas = np.asarray(deltas, dtype=np.int64)
    qp = int(deltas.max()) if query_pos is None else int(query_pos)
    return host_numpy(fam.bias(np.array([qp]), qp - deltas))[:, 0, :]


def _lines(ax: Any, x: np.ndarray, ys: np.ndarray, labels: Sequence[str] | None = None, **kw: Any) -> None:
    import matplotlib as mpl

    cmap = mpl.colormaps["viridis"]
    n = ys.shape[0]
    for i in range(n):
        ax.plot(
            x, ys[i], color=cmap(i / max(1, n - 1) * 0.9), lw=1.4, label=None if labels is None else labels[i], **kw
        )


def _heads_legend(ax: Any, n: int, fmt: str = "h{}", **kw: Any) -> None:
    if n <= 16:
        ax.legend(fontsize=7, ncol=2 if n > 6 else 1, **kw)


def _panel(name: str, ax: Any, fam: Any, max_offset: int, *, detail: bool = False) -> None:
    """The main penalty panel of one family on ``ax``."""
    h = fam.num_heads
    if name in ("t5", "offset"):
        lim = max_offset if name == "t5" else 48
        d = np.arange(-lim, lim + 1)
        ys = penalty(fam, d, query_pos=lim)
        _lines(ax, d, ys, [f"h{i}" for i in range(h)], drawstyle="steps-mid")
        if name == "t5":
            _symlog_offsets(ax, lim)
        ax.axvline(0, color="0.7", lw=0.8)
        if name == "offset":
            k = (fam.parameters()["table"].shape[1] - 1) // 2
            for s in (-k, k):
                ax.axvline(s, color="0.5", ls=":", lw=0.8)
            ax.set_title(f"per-offset table, clipped at |Δ| = {k}")
        else:
            ax.set_title("T5 bias: table[h, bucket(Δ)]")
        ax.set_xlabel("Δ = i - j (negative: key after the query)")
    elif name == "fire":
        heads = [0, 1] if h > 1 else [0]
        styles = ["-", "--"]
        positions = [64, 256, 512, 2048, 8192]
        import matplotlib as mpl

        cmap = mpl.colormaps["plasma"]
        for k, i_pos in enumerate(positions):
            d = np.arange(0, i_pos + 1)
            ys = penalty(fam, d, query_pos=i_pos)
            for hi, st in zip(heads, styles):
                ax.plot(
                    d[1:],
                    ys[hi, 1:],
                    st,
                    color=cmap(k / len(positions)),
                    lw=1.3,
                    label=f"i = {i_pos}" if hi == 0 else None,
                )
        ax.set_xscale("log")
        ax.set_title("FIRE at several query positions i (h0 solid, h1 dashed)")
        ax.set_xlabel("Δ = i - j")
        ax.legend(fontsize=7)
    else:
        d = np.arange(0, max_offset + 1)
        ys = penalty(fam, d)
        labels = [f"h{i}" for i in range(h)]
        if name == "alibi":
            slopes = np.asarray(fam.parameters()["slopes"])
            labels = [f"h{i}: m = 2^{math.log2(s):g}" for i, s in enumerate(slopes)]
            ax.set_title("ALiBi: b = -m_h |Δ|")
        elif name == "kerple_power":
            p = fam.parameters()
            labels = [f"h{i}: r1={a:.2g}, r2={b:.2g}" for i, (a, b) in enumerate(zip(p["r1"], p["r2"]))]
            ax.set_title("KERPLE power: b = -r1 |Δ|^r2")
        elif name == "kerple_log":
            p = fam.parameters()
            labels = [f"h{i}: r1={a:.2g}, r2={b:.2g}" for i, (a, b) in enumerate(zip(p["r1"], p["r2"]))]
            ax.set_title("KERPLE log: b = -r1 log(1 + r2 |Δ|)")
        elif name == "sandwich":
            ax.set_title(f"Sandwich (d = {fam.options()['head_dim']}): oscillating, zero at Δ = 0")
        _lines(ax, d, ys, labels)
        ax.set_xlabel("Δ = i - j")
    ax.set_ylabel("b_h(Δ)")
    ax.grid(True, alpha=0.3)
    if name not in ("fire",):
        _heads_legend(ax, h)


def _symlog_offsets(ax: Any, lim: int) -> None:
    ax.set_xscale("symlog", linthresh=8, linscale=0.6)
    ticks = [t for t in (8, 32, 128, 512, 2048, 8192) if t <= lim]
    ticks = [-t for t in reversed(ticks)] + [0] + ticks
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)


def _t5_buckets_panel(ax: Any, max_offset: int) -> None:
    d = np.arange(-max_offset, max_offset + 1)
    for bidir, st in ((True, "-"), (False, "--")):
        ax.plot(
            d,
            host_numpy(t5_bucket(d, bidirectional=bidir)),
            st,
            drawstyle="steps-mid",
            label=f"bidirectional={bidir}",
        )
    _symlog_offsets(ax, max_offset)
    ax.set_xlabel("Δ = i - j")
    ax.set_ylabel("bucket")
    ax.set_title("T5 buckets (32, max_distance 128): exact for small |Δ|, log-spaced beyond", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def _fire_normalised_panel(ax: Any, fam: Any) -> None:
    import matplotlib as mpl

    cmap = mpl.colormaps["plasma"]
    positions = [64, 256, 512, 2048, 8192]
    p = fam.parameters()
    c, big_l = float(np.asarray(p["c"])), float(np.asarray(p["L"]))
    eps = float(fam.options()["eps"])
    for k, i_pos in enumerate(positions):
        d = np.arange(0, i_pos + 1)
        ys = penalty(fam, d, query_pos=i_pos)
        x = np.log1p(c * d) / (np.log1p(c * max(big_l, i_pos)) + eps)
        ax.plot(x, ys[0], color=cmap(k / len(positions)), lw=4.0 - 0.7 * k, label=f"i = {i_pos}")
    ax.set_xlabel("x = ψ(Δ) / ψ(max(L, i)),  ψ(t) = log(1 + c t)")
    ax.set_ylabel("b_0")
    ax.set_title(
        f"FIRE head 0 against its input x: every i on one curve; i < L = {big_l:g} ends before x = 1", fontsize=8
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def _heat_data(fam: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    q_pos, k_pos = positions(n, n)
    bias = host_numpy(fam.bias(q_pos, k_pos))
    mask = host_numpy(causal_mask(q_pos, k_pos))
    probs = host_numpy(biased_softmax(np.zeros_like(bias), bias, mask=mask[None]))
    return np.where(mask[None], bias, np.nan), np.where(mask[None], probs, np.nan)


def _heat_axes(ax_b: Any, ax_p: Any, fig: Any, bias: np.ndarray, probs: np.ndarray, title: str) -> None:
    from matplotlib.colors import LogNorm

    im = ax_b.imshow(bias, cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=ax_b, shrink=0.8)
    ax_b.set_title(f"{title}\nb(i, j)", fontsize=9)
    pos = probs[np.isfinite(probs) & (probs > 0)]
    vmin = max(float(pos.min()) if pos.size else 1e-6, 1e-8)
    im = ax_p.imshow(probs, cmap="viridis", norm=LogNorm(vmin=vmin, vmax=1.0), interpolation="nearest")
    fig.colorbar(im, ax=ax_p, shrink=0.8)
    ax_p.set_title(f"{title}\nprobabilities (log scale)", fontsize=9)
    for ax in (ax_b, ax_p):
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")


def family_figures(
    out_dir: str,
    *,
    families: Sequence[str] = PLOT_FAMILIES,
    num_heads: int = 8,
    head_dim: int = 64,
    max_offset: int = 512,
    heatmap_len: int = 64,
    formats: Sequence[str] = ("png", "svg"),
    dpi: int = 110,
    seed: int = 0,
) -> list[str]:
    """Write the penalty curves and heatmaps of ``families`` under ``out_dir``; return the paths written."""
    mpl = require_matplotlib()
    for f in families:
        if f not in PLOT_FAMILIES:
            msg = f"families: expected names from {PLOT_FAMILIES}, got {f!r}"
            raise ValueError(msg)
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad or not formats:
        msg = f"formats: expected a non-empty subset of png, svg, pdf, got {list(formats)}"
        raise ValueError(msg)
    os.makedirs(out_dir, exist_ok=True)
    fams = {f: illustrative_family(f, num_heads, head_dim, seed=seed) for f in families}
    note = "learned families: seeded illustrative parameters, not trained weights"
    paths: list[str] = []

    cols = min(4, len(families))
    rows = math.ceil(len(families) / cols)
    fig = new_figure(mpl, 4.2 * cols, 3.4 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, (name, fam) in zip(axes, fams.items()):
        _panel(name, ax, fam, max_offset)
    for ax in axes[len(fams) :]:
        ax.set_visible(False)
    fig.suptitle(f"Penalty b_h(Δ) per head, H = {num_heads} ({note})", fontsize=10)
    paths += save_figure(mpl, fig, out_dir, "penalty_curves", formats, dpi)

    for name, fam in fams.items():
        if name in ("t5", "fire"):
            fig = new_figure(mpl, 11, 4)
            ax1, ax2 = fig.subplots(1, 2)
            if name == "t5":
                _t5_buckets_panel(ax1, max_offset)
                _panel(name, ax2, fam, max_offset)
            else:
                _panel(name, ax1, fam, max_offset)
                _fire_normalised_panel(ax2, fam)
        else:
            fig = new_figure(mpl, 6.5, 4.2)
            _panel(name, fig.subplots(), fam, max_offset)
        paths += save_figure(mpl, fig, out_dir, f"penalty_{name}", formats, dpi)

    n = heatmap_len
    fig = new_figure(mpl, 2.8 * len(fams), 5.8)
    axes = np.atleast_2d(fig.subplots(2, len(fams)))
    if axes.shape[0] != 2:
        axes = axes.T
    for c, (name, fam) in enumerate(fams.items()):
        bias, probs = _heat_data(fam, n)
        _heat_axes(axes[0, c], axes[1, c], fig, bias[0], probs[0], name)
    fig.suptitle(
        f"Head 0, S = {n}, causal: bias (top) and the probabilities it alone gives (bottom, log scale)", fontsize=10
    )
    paths += save_figure(mpl, fig, out_dir, "heatmaps", [f for f in formats if f != "svg"] or ["png"], dpi)

    for name, fam in fams.items():
        bias, probs = _heat_data(fam, n)
        heads = sorted({0, fam.num_heads - 1})
        fig = new_figure(mpl, 8, 3.6 * len(heads))
        axes = np.atleast_2d(fig.subplots(len(heads), 2))
        for r, hh in enumerate(heads):
            _heat_axes(axes[r, 0], axes[r, 1], fig, bias[hh], probs[hh], f"{name} h{hh}")
        paths += save_figure(mpl, fig, out_dir, f"heatmap_{name}", [f for f in formats if f != "svg"] or ["png"], dpi)
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# command line


def add_arguments(p: Any) -> None:
    """The options of ``relpos-ref plot``."""
    p.add_argument("--out", default="relpos-figures", help="output directory (default: relpos-figures)")
    p.add_argument(
        "--formats",
        default="png,svg",
        help="comma-separated subset of png,svg,pdf (default png,svg; heatmaps are raster and skip svg)",
    )
    p.add_argument(
        "--families", default=",".join(PLOT_FAMILIES), help="comma-separated subset of " + ",".join(PLOT_FAMILIES)
    )
    p.add_argument("--heads", type=int, default=8, help="number of heads H (default 8)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension d for Sandwich (default 64)")
    p.add_argument("--max-offset", type=int, default=512, help="largest |Delta| on the penalty curves (default 512)")
    p.add_argument("--heatmap-len", type=int, default=64, help="S of the heatmaps (default 64)")
    p.add_argument("--dpi", type=int, default=110)
    p.add_argument("--seed", type=int, default=0, help="seed of the illustrative learned parameters")


def main_plot(args: Any) -> int:
    import sys

    try:
        paths = family_figures(
            args.out,
            families=[f.strip() for f in args.families.split(",") if f.strip()],
            num_heads=args.heads,
            head_dim=args.head_dim,
            max_offset=args.max_offset,
            heatmap_len=args.heatmap_len,
            formats=[f.strip() for f in args.formats.split(",") if f.strip()],
            dpi=args.dpi,
            seed=args.seed,
        )
    except ImportError as exc:
        print(f"relpos-ref plot: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:
        print(f"relpos-ref plot: {exc}", file=sys.stderr)
        return 2
    print("\n".join(paths))
    return 0
