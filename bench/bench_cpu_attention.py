"""Issue 17 measurement: float32 causal ALiBi attention on CPU, rp.attention against SDPA, FlexAttention, sgemm."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

import relpos_ref as rp

B, H, D = 1, 8, 64
TOL = {"float32": 2e-4, "float64": 2e-4}  # max abs difference to the SDPA-mask output (outputs are O(1))
IMPLS = ["rp_f32", "rp_f64", "rp_vjp_f32", "sdpa_mask", "flex_compiled", "sdpa_causal"]
LABELS = {
    "rp_f32": "rp.attention f32",
    "rp_f64": "rp.attention f64",
    "rp_vjp_f32": "rp.attention_vjp f32 (fwd+bwd)",
    "sdpa_mask": "SDPA float mask",
    "flex_compiled": "compiled FlexAttention",
    "sdpa_causal": "SDPA is_causal, no bias",
    "roofline": "sgemm roofline",
}


def machine_info() -> dict[str, Any]:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    blas: dict[str, Any] = {}
    try:
        dep = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas["numpy_blas"] = f"{dep.get('name')} {dep.get('version')}"
    except Exception as exc:
        blas["numpy_blas"] = f"unknown ({exc})"
    try:
        import threadpoolctl

        blas["threadpools"] = [
            {k: p.get(k) for k in ("internal_api", "version", "num_threads", "filepath")}
            for p in threadpoolctl.threadpool_info()
        ]
    except ImportError:
        blas["threadpools"] = "unknown (threadpoolctl not installed)"
    return {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "env_threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
        **blas,
        "loadavg_start": os.getloadavg(),
    }


def time_fn(fn: Any, reps: int, warmup: int = 1) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"times_ms": ts, "median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "reps": reps}


def adaptive_reps(fn: Any, reps: int, slow_s: float) -> tuple[int, float]:
    """One warm-up call; fewer reps (3) when that call alone takes longer than ``slow_s``."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    return (3 if first > slow_s else reps), first


def measure_sgemm(reps: int) -> dict[str, Any]:
    import torch

    n = 2048
    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    flops = 2.0 * n**3
    out = {"shape": f"({n},{n}) @ ({n},{n}) float32", "flops": flops}
    r_np = time_fn(lambda: a @ b, reps)
    r_t = time_fn(lambda: ta @ tb, reps)
    out["numpy"] = {**r_np, "gflops": flops / (r_np["median_ms"] * 1e-3) / 1e9}
    out["torch"] = {**r_t, "gflops": flops / (r_t["median_ms"] * 1e-3) / 1e9}
    out["rate_gflops"] = max(out["numpy"]["gflops"], out["torch"]["gflops"])
    out["rate_source"] = "numpy" if out["numpy"]["gflops"] >= out["torch"]["gflops"] else "torch"
    return out


def causal_gemm_flops(s: int) -> float:
    """QK^T and PV restricted to the S(S+1)/2 causal (i >= j) pairs: 2 products * 2*D flops * H * S(S+1)/2."""
    return 2.0 * 2.0 * D * H * s * (s + 1) / 2.0


def run_seq(s: int, reps: int, slow_s: float, compiled_flex: Any, notes: list[str]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F  # noqa: N812

    rng = np.random.default_rng(s)
    q, k, v = (rng.standard_normal((B, H, s, D), dtype=np.float32) for _ in range(3))
    d_out = rng.standard_normal((B, H, s, D), dtype=np.float32)
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    slopes = rp.alibi_slopes(H)
    al32 = rp.ALiBi(slopes.astype(np.float32))
    al64 = rp.ALiBi(slopes.astype(np.float64))
    qt, kt, vt = (torch.from_numpy(x) for x in (q, k, v))
    slopes_t = torch.from_numpy(slopes.astype(np.float32))

    # Materialised float mask, built once outside the timing: -m_h |i - j|, -inf above the diagonal.
    idx = torch.arange(s)
    rel = (idx[:, None] - idx[None, :]).abs().to(torch.float32)
    mask = (-slopes_t[:, None, None] * rel[None]).masked_fill(idx[None, None, :] > idx[None, :, None], -math.inf)
    mask = mask[None]  # (1, H, S, S)
    del rel

    fns: dict[str, Any] = {
        "rp_f32": lambda: rp.attention(q, k, v, bias=al32, causal=True),
        "rp_f64": lambda: rp.attention(q64, k64, v64, bias=al64, causal=True),
        "rp_vjp_f32": lambda: rp.attention_vjp(q, k, v, d_out, bias=al32, causal=True),
        "sdpa_mask": lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask),
        "sdpa_causal": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
    }

    row: dict[str, Any] = {"S": s, "impls": {}, "checks": {}}
    flex_err = None
    if isinstance(compiled_flex, str):
        flex_err = compiled_flex
    else:
        try:
            from torch.nn.attention.flex_attention import create_block_mask

            def alibi_mod(score: Any, b: Any, h: Any, qi: Any, ki: Any) -> Any:
                return score - slopes_t[h] * (qi - ki).abs()

            def causal_mod(b: Any, h: Any, qi: Any, ki: Any) -> Any:
                return qi >= ki

            block_mask = create_block_mask(causal_mod, None, None, s, s, device="cpu")
            t0 = time.perf_counter()
            with torch.no_grad():
                compiled_flex(qt, kt, vt, score_mod=alibi_mod, block_mask=block_mask)
            row["flex_first_call_s"] = time.perf_counter() - t0

            def flex_call() -> Any:
                with torch.no_grad():
                    return compiled_flex(qt, kt, vt, score_mod=alibi_mod, block_mask=block_mask)

            fns["flex_compiled"] = flex_call
        except Exception as exc:
            flex_err = f"{type(exc).__name__}: {exc}".strip()[:2000]
            row["flex_traceback"] = traceback.format_exc()[-4000:]
    if flex_err is not None:
        row["impls"]["flex_compiled"] = {"error": flex_err}
        notes.append(f"S={s}: compiled FlexAttention failed: {flex_err.splitlines()[0][:300]}")

    # Correctness once per S, before any timing: every forward against the SDPA-mask output.
    with torch.no_grad():
        ref = fns["sdpa_mask"]().numpy().astype(np.float64)
        ref_causal = fns["sdpa_causal"]()
    o32 = fns["rp_f32"]()
    o64 = fns["rp_f64"]()
    row["checks"]["rp_f32_vs_sdpa_mask"] = float(np.max(np.abs(o32.astype(np.float64) - ref)))
    row["checks"]["rp_f64_vs_sdpa_mask"] = float(np.max(np.abs(o64 - ref)))
    row["checks"]["max_abs_sdpa_mask_out"] = float(np.max(np.abs(ref)))
    if "flex_compiled" in fns:
        row["checks"]["flex_vs_sdpa_mask"] = float(np.max(np.abs(fns["flex_compiled"]().numpy() - ref)))
    # The biasless ceiling computes a different function; its check is against a plain causal rp.attention.
    o_nob = rp.attention(q, k, v, causal=True)
    row["checks"]["sdpa_causal_vs_rp_nobias"] = float(np.max(np.abs(ref_causal.numpy() - o_nob)))
    # vjp: its dv must match autograd of the SDPA-mask path (the cheapest independent gradient check).
    qg, kg, vg = (x.clone().requires_grad_(True) for x in (qt, kt, vt))
    out_g = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask)
    _, _, dv_t = torch.autograd.grad(out_g, (qg, kg, vg), torch.from_numpy(d_out))
    grads = fns["rp_vjp_f32"]()
    row["checks"]["rp_vjp_dv_vs_sdpa_autograd"] = float(np.max(np.abs(grads.dv - dv_t.numpy())))
    row["checks"]["max_abs_dv"] = float(dv_t.abs().max())
    del qg, kg, vg, out_g, dv_t, grads

    bad = []
    for key, tol in (
        ("rp_f32_vs_sdpa_mask", TOL["float32"]),
        ("rp_f64_vs_sdpa_mask", TOL["float64"]),
        ("flex_vs_sdpa_mask", TOL["float32"]),
        ("sdpa_causal_vs_rp_nobias", TOL["float32"]),
        ("rp_vjp_dv_vs_sdpa_autograd", 1e-3 * max(1.0, row["checks"]["max_abs_dv"])),
    ):
        if key in row["checks"] and not row["checks"][key] <= tol:
            bad.append(f"{key}={row['checks'][key]:.3g} > {tol:.3g}")
    if bad:
        raise RuntimeError(f"S={s}: correctness check failed, no timings reported: {'; '.join(bad)}")
    print(f"S={s} checks ok: {row['checks']}", flush=True)

    for name in IMPLS:
        if name not in fns:
            continue
        n, first = adaptive_reps(fns[name], reps, slow_s)
        r = time_fn(fns[name], n, warmup=0)  # adaptive_reps already made the warm-up call
        r["warmup_call_ms"] = first * 1e3
        if n < reps:
            notes.append(f"S={s}: {LABELS[name]} timed with {n} repetitions (warm-up call {first:.1f} s > {slow_s} s)")
        row["impls"][name] = r
        print(f"S={s} {name:14s} median {r['median_ms']:10.2f} ms  (min {r['min_ms']:.2f}, max {r['max_ms']:.2f})")
    fns.clear()  # drops the closures holding the (1, H, S, S) mask
    return row


def fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def write_outputs(result: dict[str, Any], out: Path) -> None:
    rows = result["rows"]
    rate = result["sgemm"]["rate_gflops"]
    lines = [
        "# Causal ALiBi attention on CPU (issue 17 measurement)",
        "",
        f"Run {result['date']}: B = {B}, H = {H}, H_kv = {H}, D = {D}, causal, ALiBi slopes `rp.alibi_slopes(8)`, "
        f"random normal inputs. Median of {result['config']['reps']} repetitions after one warm-up call "
        "(exceptions in the notes), times in ms; min and max in `attention_cpu.json`.",
        "",
        "Machine: " + result["machine_line"],
        "",
        "| S | rp f32 | rp f64 | rp vjp f32 | SDPA mask | Flex compiled | SDPA causal (no bias) | sgemm roofline "
        "| rp f32 / Flex | roofline / rp f32 | rp f64 / rp f32 | vjp / fwd |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def med(row: dict[str, Any], name: str) -> float | None:
        return row["impls"].get(name, {}).get("median_ms")

    for row in rows:
        ratios = row["ratios"]
        flex_cell = fmt(med(row, "flex_compiled"), 1) if med(row, "flex_compiled") is not None else "error"
        lines.append(
            f"| {row['S']} | {fmt(med(row, 'rp_f32'))} | {fmt(med(row, 'rp_f64'))} | {fmt(med(row, 'rp_vjp_f32'))} "
            f"| {fmt(med(row, 'sdpa_mask'))} | {flex_cell} | {fmt(med(row, 'sdpa_causal'))} "
            f"| {fmt(row['roofline_ms'], 2)} | {fmt(ratios.get('rp_f32_over_flex'), 2)} "
            f"| {fmt(ratios.get('rp_f32_fraction_of_roofline'), 3)} | {fmt(ratios.get('rp_f64_over_rp_f32'), 2)} "
            f"| {fmt(ratios.get('vjp_over_fwd'), 2)} |"
        )
    sg = result["sgemm"]
    lines += [
        "",
        "## Definitions",
        "",
        "- **rp f32 / f64**: `rp.attention(q, k, v, bias=rp.ALiBi(slopes), causal=True)` on NumPy arrays, the bias "
        "generated per tile inside the call. **rp vjp**: `rp.attention_vjp` with a random output cotangent, which runs "
        "its own forward for the log-sum-exp and then the backward (so it is forward + backward).",
        "- **SDPA mask**: `torch.nn.functional.scaled_dot_product_attention` with a (1, H, S, S) float32 `attn_mask` "
        "(-m_h |i - j|, -inf above the diagonal) built once outside the timing. **SDPA causal**: `is_causal=True`, "
        "no bias (a different, cheaper function: the practical ceiling).",
        "- **Flex compiled**: `torch.compile(flex_attention, dynamic=False)`, "
        "`score_mod = score - m_h |q_idx - kv_idx|`, "
        "causal `block_mask` from `create_block_mask(q_idx >= kv_idx)`; the block mask is built and the first "
        "(compiling) call made outside the timing, under `torch.no_grad()`.",
        f"- **sgemm roofline**: FLOPs of the two products restricted to the S(S+1)/2 causal pairs, "
        f"2 products x 2D flops x H x S(S+1)/2 = 2 D H S (S+1) (no exp, no bias, no partial-tile waste counted), "
        f"divided by the measured sgemm rate {rate:.1f} GFLOP/s (the better of NumPy {sg['numpy']['gflops']:.1f} and "
        f"torch {sg['torch']['gflops']:.1f} GFLOP/s on {sg['shape']}, median of {sg['numpy']['reps']}, same run).",
        "- Ratios: **rp f32 / Flex** = median rp f32 / median compiled Flex; "
        "**roofline / rp f32** = sgemm roofline time "
        "/ rp f32 time (the fraction of the roofline rp reaches); **rp f64 / rp f32**; **vjp / fwd** = rp vjp f32 / "
        "rp f32.",
        "",
        "## Notes",
        "",
    ]
    for row in rows:
        c = row["checks"]
        parts = [f"{k} = {v:.3g}" for k, v in c.items()]
        extra = f"; Flex first (compiling) call {row['flex_first_call_s']:.1f} s" if "flex_first_call_s" in row else ""
        lines.append(f"- S = {row['S']}: max abs differences, checked before timing: {', '.join(parts)}{extra}.")
    lines += [f"- {n}" for n in result["notes"]]
    lines.append("")
    (out / "attention_cpu.md").write_text("\n".join(lines))
    (out / "attention_cpu.json").write_text(json.dumps(result, indent=2, default=float))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    seqs = [r["S"] for r in rows]
    for name in [*IMPLS, "roofline"]:
        xs, ys, lo, hi = [], [], [], []
        for r in rows:
            if name == "roofline":
                xs.append(r["S"])
                ys.append(r["roofline_ms"])
                lo.append(0.0)
                hi.append(0.0)
                continue
            im = r["impls"].get(name, {})
            if "median_ms" in im:
                xs.append(r["S"])
                ys.append(im["median_ms"])
                lo.append(im["median_ms"] - im["min_ms"])
                hi.append(im["max_ms"] - im["median_ms"])
        if xs:
            ls = "--" if name == "roofline" else "-"
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ls=ls, capsize=3, label=LABELS[name])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(seqs, [str(x) for x in seqs])
    ax.set_xlabel("S (= Sq = Sk)")
    ax.set_ylabel("median time (ms), min-max bars")
    ax.set_title(f"Causal ALiBi attention, CPU, B={B} H={H} D={D}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "attention_cpu.png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq-lens", default="1024,2048,4096")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--slow-s", type=float, default=8.0, help="warm-up call longer than this: 3 repetitions")
    ap.add_argument("--out", default=f"bench/results/{datetime.date.today().isoformat()}-cpu")
    args = ap.parse_args()
    seqs = [int(x) for x in args.seq_lens.split(",") if x]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    torch.manual_seed(0)
    machine = machine_info()
    tp = machine["threadpools"]
    blas_threads = (
        ", ".join(f"{p['internal_api']} {p['version']} x{p['num_threads']}" for p in tp) if isinstance(tp, list) else tp
    )
    machine_line = (
        f"{machine['cpu_model']}, {machine['logical_cores']} logical cores, NumPy {machine['numpy']} "
        f"({machine['numpy_blas']}), torch {machine['torch']} ({machine['torch_threads']} threads), "
        f"BLAS threads: {blas_threads}"
    )
    print(machine_line, flush=True)
    notes: list[str] = []

    sgemm = measure_sgemm(max(args.reps, 5))
    print(f"sgemm: numpy {sgemm['numpy']['gflops']:.1f} GFLOP/s, torch {sgemm['torch']['gflops']:.1f} GFLOP/s")

    try:
        from torch.nn.attention.flex_attention import flex_attention

        compiled_flex: Any = torch.compile(flex_attention, dynamic=False)
    except Exception as exc:
        compiled_flex = f"{type(exc).__name__}: {exc}"

    rows = []
    for s in seqs:
        row = run_seq(s, args.reps, args.slow_s, compiled_flex, notes)
        row["roofline_flops"] = causal_gemm_flops(s)
        row["roofline_ms"] = row["roofline_flops"] / (sgemm["rate_gflops"] * 1e9) * 1e3
        m = {k: v.get("median_ms") for k, v in row["impls"].items()}
        ratios = {}
        if m.get("rp_f32") and m.get("flex_compiled"):
            ratios["rp_f32_over_flex"] = m["rp_f32"] / m["flex_compiled"]
        if m.get("rp_f32"):
            ratios["rp_f32_fraction_of_roofline"] = row["roofline_ms"] / m["rp_f32"]
            if m.get("rp_f64"):
                ratios["rp_f64_over_rp_f32"] = m["rp_f64"] / m["rp_f32"]
            if m.get("rp_vjp_f32"):
                ratios["vjp_over_fwd"] = m["rp_vjp_f32"] / m["rp_f32"]
        row["ratios"] = ratios
        rows.append(row)
        print(f"S={s} ratios {ratios}", flush=True)

    machine["loadavg_end"] = os.getloadavg()
    result = {
        "schema": "relpos_ref.bench_cpu_attention/1",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": {"B": B, "H": H, "H_kv": H, "D": D, "dtype": "float32", "causal": True, "bias": "ALiBi"}
        | {"seq_lens": seqs, "reps": args.reps, "slow_s": args.slow_s},
        "machine": machine,
        "machine_line": machine_line,
        "sgemm": sgemm,
        "rows": rows,
        "notes": notes,
    }
    write_outputs(result, out)
    print(f"wrote {out}/attention_cpu.md, .json, .png")


if __name__ == "__main__":
    main()
