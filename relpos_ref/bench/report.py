"""What a bench run writes: progress lines on stderr, results.json and results.md (and the plots, with matplotlib)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

from .config import MiB, Shape
from .measure import blas_threads_text

__all__ = ["Progress", "markdown_report", "write_outputs"]


class Progress:
    """One stderr line per step (rewritten in place on a terminal); no dependency."""

    def __init__(self, total: int, *, enabled: bool = True, stream: Any = None) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self._width = 0

    def step(self, label: str) -> None:
        self.done += 1
        self.show(label)

    def show(self, label: str, *, transient: bool = False) -> None:
        if not self.enabled or (transient and not self.tty):
            return
        frac = self.done / max(1, self.total)
        bar = "#" * int(20 * frac)
        line = f"[{bar:<20}] {self.done}/{self.total} {time.perf_counter() - self.t0:6.1f}s {label}"
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def write_outputs(result: dict, out_dir: str, *, plots: bool = True) -> list[str]:
    """Write results.json, results.md and (with matplotlib) the PNG plots; return the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    p = os.path.join(out_dir, "results.json")
    with open(p, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=_json_default)
        f.write("\n")
    paths.append(p)
    p = os.path.join(out_dir, "results.md")
    with open(p, "w", encoding="utf-8") as f:
        f.write(markdown_report(result))
    paths.append(p)
    if plots:
        from .plots import bench_plots

        paths += bench_plots(result, out_dir)
    return paths


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _fmt_bytes(n: float | None) -> str:
    return "n/a" if n is None else f"{n / MiB:.1f}"


def _g(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if x == 0 or not math.isfinite(x):
        return f"{x}"
    return f"{x:.{digits}g}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _machine_markdown(result: dict) -> list[str]:
    m = result.get("machine", {})
    lines = [f"Run {result.get('created_utc', '?')} (UTC), {result.get('wall_s', 0):.0f} s wall.", ""]
    libs = m.get("libraries", {})
    lines.append(
        f"Machine: {m.get('cpu', '?')}, {m.get('usable_cores', '?')} usable cores, "
        f"{(m.get('memory_total_bytes') or 0) / 2**30:.1f} GiB, {m.get('os', '?')}; Python {m.get('python', '?')}; "
        + ", ".join(f"{k} {v}" for k, v in libs.items())
        + "."
    )
    blas = [b for b in m.get("blas", []) if b.get("user_api") == "blas"]
    if blas:
        names = [
            f"{b.get('internal_api') or b.get('name') or 'unnamed library'} {b.get('version') or ''} "
            f"({blas_threads_text(b)})"
            for b in blas
        ]
        lines.append("BLAS: " + "; ".join(names) + ".")
    la = m.get("load_average_1min") or {}
    if la.get("start") is not None:
        lines.append(
            f"1-minute load average {la['start']:.1f} at the start and {la['end']:.1f} at the end "
            f"(other processes on the same cores slow every backend; compare rows of one run)."
        )
    if m.get("gpu"):
        g = m["gpu"]
        lines.append(f"GPU: {g.get('name', '?')} ({_fmt_bytes(g.get('memory_bytes'))} MiB).")
    lines += ["", "Rooflines measured in this run:", ""]
    for dev, r in result.get("rooflines", {}).items():
        lines.append(
            f"- {dev}: {r['gemm_dtype']} GEMM {r['gemm_n']}x{r['gemm_n']}: {r['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s; "
            f"copy bandwidth {r['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write{_copy_from(r)})."
        )
    lines.append("")
    return lines


def _copy_from(r: dict) -> str:
    src = r.get("copy_from")
    if src is None:
        return ""
    cache = r.get("cache_bytes")
    return f"; {2 * r['copy_bytes'] / MiB:.0f} MiB touched, from {src}" + (
        f", caches {cache / MiB:.1f} MiB" if cache else ""
    )


def _rotation_lines(rows: list[dict]) -> list[str]:
    seen: dict[tuple, dict] = {}
    for r in rows:
        rot = r.get("kv_rotation")
        if rot and r.get("status") == "ok":
            seen.setdefault((r["device"], Shape(**r["shape"]).label()), rot)
    lines = []
    for (dev, label), rot in seen.items():
        cache = rot.get("cache_bytes")
        cache_s = f"{cache / MiB:.1f} MiB of caches" if cache else rot.get("cache_method", "cache size unknown")
        lines.append(
            f"- decode {label} on {dev}: K/V read from {rot['kv_from']}: {rot['copies']} copies, "
            f"{rot['rotation_bytes'] / MiB:.0f} MiB in rotation ({cache_s})."
        )
    return [*lines, ""] if lines else []


def _rows_markdown(rows: list[dict]) -> list[str]:
    lines = [
        "Times are medians over the repetitions (min-max in brackets), warm-up excluded; GPU times from CUDA "
        "events. GFLOP/s count 4·B·H·D·S²/2 for causal prefill; decode rows give GB/s of the minimum traffic "
        "(q, K, V read once, output written once). A decode step reads a K/V cache last touched a whole forward "
        "pass ago, so the decode calls rotate over copies of K/V spanning several times the caches (listed below). "
        "`% read BW` is the decode's GB/s over that of a plain read (the fastest of the listed methods in "
        "results.json: a BLAS dot on the CPU, a sum on a GPU) of the same K/V copies in the same rotation: the "
        "same bytes from the same place. Prefill rows have none: they are compute-bound (see % GEMM). Peak extra "
        "memory: see the method column in results.json (NumPy: tracemalloc; n/a where not measured).",
        "",
        *_rotation_lines(rows),
        "| family | kind | shape | backend | median ms | min-max ms | GFLOP/s | % GEMM | GB/s | % read BW "
        "| peak extra MiB | max abs err |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = Shape(**r["shape"])
        if r["status"] != "ok":
            lines.append(
                f"| {r['family']} | {r['kind']} | {s.label()} | {r['backend']} | {r['status']}: "
                f"{r.get('reason', '')[:80]} | | | | | | | |"
            )
            continue
        ref = r.get("error_reference")
        bw_s = _pct(r.get("bandwidth_fraction")) if r["kind"] == "decode" else "-"
        err_s = "ref" if ref == "self" else ("n/a" if ref is None else _g(r.get("max_abs_err"), 2))
        lines.append(
            f"| {r['family']} | {r['kind']} | {s.label()} | {r['backend']} | {r['median_s'] * 1e3:.2f} "
            f"| {r['min_s'] * 1e3:.2f}-{r['max_s'] * 1e3:.2f} | {r['flops_per_s'] / 1e9:.2f} "
            f"| {_pct(r.get('roofline_fraction'))} | {r['bytes_per_s'] / 1e9:.2f} "
            f"| {bw_s} | {_fmt_bytes(r.get('peak_extra_bytes'))} | {err_s} |"
        )
    lines.append("")
    lines.append("`max abs err`: largest |difference| from the NumPy reference output (`ref` marks the reference).")
    lines.append("")
    return lines


def markdown_report(result: dict) -> str:
    """results.md: the machine, the rooflines, one table row per case, skipped backends and the CPU targets."""
    lines = ["# relpos-ref bench", "", *_machine_markdown(result)]
    rows = result.get("results", [])
    if rows:
        lines += _rows_markdown(rows)
    if result.get("skipped_backends"):
        lines.append("Backends not run:")
        lines.append("")
        for b, why in result["skipped_backends"].items():
            lines.append(f"- {b}: {why}")
        lines.append("")
    t = result.get("targets")
    if t:
        lines += _targets_markdown(t)
    return "\n".join(lines) + "\n"


def _targets_markdown(t: dict) -> list[str]:
    s = Shape(**t["shape"])
    lines = [
        "## CPU targets",
        "",
        f"{s.label()}, float32, causal ALiBi; bias construction counted on both sides; repetitions interleaved.",
        "",
        "| target | measured | required | met |",
        "|---|---:|---:|---|",
    ]
    for c in t.get("checks", []):
        val = "n/a" if c["measured"] is None else f"{c['measured']:.3g}{(' ' + c['unit']) if c['unit'] else ''}"
        met = "n/a" if c["met"] is None else ("yes" if c["met"] else "no")
        lines.append(f"| {c['target']} | {val} | {c['op']} {c['limit']} | {met} |")
    lines.append("")
    ref, sd = t.get("reference", {}), t.get("sdpa", {})
    lines.append(
        f"- rp.attention: median {ref.get('median_s', float('nan')):.3f} s "
        f"({ref.get('flops_per_s', 0) / 1e9:.1f} GFLOP/s); NumPy float32 {t.get('gemm_n', 2048)}^2 GEMM "
        f"{t['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s (median of the repetitions interleaved with the attention calls)."
    )
    if "median_s" in sd:
        lines.append(
            f"- SDPA with float mask: median {sd['median_s']:.3f} s; max |difference| of outputs "
            f"{t.get('max_abs_diff_vs_sdpa', float('nan')):.2g}."
        )
    else:
        lines.append(f"- SDPA: {sd.get('reason', 'not run')}.")
    for key, name in (("memory_reference", "rp.attention"), ("memory_sdpa", "SDPA with mask")):
        mm = t.get(key)
        if not mm:
            continue
        if mm.get("status") != "ok":
            lines.append(f"- memory, {name}: {mm.get('status')}: {mm.get('reason')}")
            continue
        extra = (
            f"; tracemalloc peak {_fmt_bytes(mm.get('tracemalloc_peak_bytes'))} MiB"
            if "tracemalloc_peak_bytes" in mm
            else ""
        )
        lines.append(
            f"- memory, {name}: peak extra {_fmt_bytes(mm.get('peak_extra_bytes'))} MiB "
            f"(output {_fmt_bytes(mm.get('output_bytes'))} MiB included){extra}."
        )
    lg = t.get("long", {})
    if lg.get("status") == "ok":
        ls = Shape(**lg["shape"])
        lines.append(
            f"- {ls.label()}: completed in {lg['seconds']:.1f} s; process peak RSS "
            f"{lg['process_peak_rss_bytes'] / MiB:.0f} MiB, of which {_fmt_bytes(lg.get('peak_extra_bytes'))} MiB "
            "during the call."
        )
    elif lg:
        lines.append(f"- long sequence: {lg.get('status')}: {lg.get('reason')}")
    mr = t.get("memory_reference", {})
    if mr.get("method"):
        lines.append(f"- memory method: {mr['method']}.")
    lines.append("")
    return lines
