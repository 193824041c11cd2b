"""The PNG plots of a bench run: median time against sequence length, and achieved rates against the rooflines."""

from __future__ import annotations

import math

import numpy as np

from ..plot import new_figure, require_matplotlib, save_figure

__all__ = ["bench_plots"]


def bench_plots(result: dict, out_dir: str, *, dpi: int = 110) -> list[str]:
    """time_vs_seqlen.png and roofline.png from a ``relpos-ref bench`` result."""
    mpl = require_matplotlib()
    rows = [r for r in result.get("results", []) if r.get("status") == "ok"]
    if not rows:
        return []
    paths = []
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    colors = {b: mpl.colormaps["tab10"](i % 10) for i, b in enumerate(backends)}

    prefill = [r for r in rows if r["kind"] == "prefill"]
    families = list(dict.fromkeys(r["family"] for r in prefill))
    if prefill:
        cols = min(4, len(families))
        nrows = math.ceil(len(families) / cols)
        fig = new_figure(mpl, 4.0 * cols, 3.3 * nrows)
        axes = np.atleast_1d(fig.subplots(nrows, cols)).ravel()
        for ax, fam in zip(axes, families):
            for b in backends:
                pts = sorted(
                    (r["shape"]["q_len"], r["median_s"], r["min_s"], r["max_s"])
                    for r in prefill
                    if r["family"] == fam and r["backend"] == b
                )
                if not pts:
                    continue
                s, med, lo, hi = (np.array(x) for x in zip(*pts))
                ax.errorbar(
                    s,
                    med * 1e3,
                    yerr=[(med - lo) * 1e3, (hi - med) * 1e3],
                    marker="o",
                    ms=3,
                    capsize=2,
                    color=colors[b],
                    label=b,
                )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(fam, fontsize=9)
            ax.set_xlabel("S (Sq = Sk)")
            ax.set_ylabel("median ms (min-max bars)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in axes[len(families) :]:
            ax.set_visible(False)
        shp = prefill[0]["shape"]
        fig.suptitle(
            f"Causal prefill, B={shp['batch']} H={shp['heads']} D={shp['head_dim']} {prefill[0]['dtype']}", fontsize=10
        )
        paths += save_figure(mpl, fig, out_dir, "time_vs_seqlen", ["png"], dpi)

    roofs = result.get("rooflines", {})
    fam0 = families[0] if families else rows[0]["family"]
    fig = new_figure(mpl, 11, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    for b in backends:
        pts = sorted(
            (r["shape"]["q_len"], r["flops_per_s"]) for r in prefill if r["family"] == fam0 and r["backend"] == b
        )
        if pts:
            s, f = zip(*pts)
            ax1.plot(s, np.array(f) / 1e9, "o-", color=colors[b], label=b)
        dec = sorted(
            (r["shape"]["k_len"], r["bytes_per_s"])
            for r in rows
            if r["kind"] == "decode" and r["family"] == fam0 and r["backend"] == b
        )
        if dec:
            s, g = zip(*dec)
            ax2.plot(s, np.array(g) / 1e9, "o-", color=colors[b], label=b)
    for dev, rf in roofs.items():
        ls = "--" if dev == "cpu" else "-."
        gemm = f"{dev} GEMM {rf['gemm_n']}² ({rf['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s)"
        copy = f"{dev} copy ({rf['copy_bytes_per_s'] / 1e9:.0f} GB/s)"
        for ax, rate, label in ((ax1, rf["gemm_flops_per_s"], gemm), (ax2, rf["copy_bytes_per_s"], copy)):
            ax.axhline(rate / 1e9, color="k", ls=ls, lw=1, label=label)
    for ax, title, ylabel in (
        (ax1, f"prefill ({fam0}): achieved GFLOP/s", "GFLOP/s (4·B·H·D·S²/2 causal)"),
        (ax2, f"decode Sq = 1 ({fam0}): achieved GB/s", "GB/s (q, K, V, out once)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax1.set_xlabel("S")
    ax2.set_xlabel("Sk (KV cache length)")
    paths += save_figure(mpl, fig, out_dir, "roofline", ["png"], dpi)
    return paths
