"""Cost of the reference backward: ``rp.attention_vjp`` against its own forward and PyTorch autograd, one run.

Usage (from the repository root)::

    python bench/bench_backward.py                       # S = 1024, 2048; writes bench/results/<date>-cpu/backward.*
    python bench/bench_backward.py --seq 512 --out /tmp   # other sizes or place

For each sequence length (B = 1, H = 8, H_kv = 8, D = 64, float32, causal, bottom-right):

- ``rp.attention`` (forward) and ``rp.attention_vjp`` (forward + backward, parameter gradients included), NumPy;
- PyTorch autograd on CPU: SDPA with the bias as a float ``attn_mask`` built from a slope or table tensor that
  requires grad, forward + backward (``torch.autograd.grad``);
- peak traced memory of ``attention_vjp`` (tracemalloc) against one (B, H, S, S) float32 array;
- the largest difference between the two backwards over the largest torch magnitude (float32 against float32, so
  it is rounding, not a verdict).

The median of ``--reps`` calls after one warm-up is reported; run on an idle machine and quote ratios of one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
import tracemalloc
from pathlib import Path

import numpy as np

import relpos_ref as rp
from relpos_ref import bench as rb


def _median(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _torch_case(torch, family: str, q, k, v, d_out, params):
    """SDPA forward + autograd backward with the bias built in torch from a parameter that requires grad."""
    s = q.shape[2]
    pos = torch.arange(s)
    delta = pos[:, None] - pos[None, :]
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tp = torch.tensor(params, requires_grad=True)
    mask = delta >= 0
    if family == "alibi":
        bias = -tp[:, None, None] * delta.abs().to(tp.dtype)
    else:
        buckets = torch.as_tensor(np.asarray(rp.t5_bucket(delta.numpy(), bidirectional=False)))
        bias = tp[:, buckets]
    bias = bias.masked_fill(~mask, -math.inf)[None]
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=bias)
    return torch.autograd.grad(out, (tq, tk, tv, tp), torch.tensor(d_out))


def _measure(torch, family, fam, params, q, k, v, d_out, reps: int) -> dict:
    t_fwd = _median(lambda: rp.attention(q, k, v, bias=fam, causal=True), reps)
    t_vjp = _median(lambda: rp.attention_vjp(q, k, v, d_out, bias=fam, causal=True), reps)
    t_torch = _median(lambda: _torch_case(torch, family, q, k, v, d_out, params), reps)
    tracemalloc.start()
    ours = rp.attention_vjp(q, k, v, d_out, bias=fam, causal=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    theirs = _torch_case(torch, family, q, k, v, d_out, params)
    key = "slopes" if family == "alibi" else "table"
    # Normwise: the largest difference over the largest magnitude of the torch array (a slope gradient sums
    # millions of terms, so its absolute difference says little on its own).
    diffs = {
        n: float(np.max(np.abs(np.asarray(a) - b.detach().numpy())) / max(1.0, float(b.abs().max())))
        for n, a, b in zip(("dq", "dk", "dv", key), (*ours[:3], ours.dbias[key]), theirs)
    }
    s = q.shape[2]
    return {
        "forward_s": t_fwd,
        "vjp_s": t_vjp,
        "torch_sdpa_fwd_bwd_s": t_torch,
        "vjp_over_forward": t_vjp / t_fwd,
        "vjp_over_torch": t_vjp / t_torch,
        "vjp_peak_bytes": peak,
        "full_logits_bytes": q.shape[0] * q.shape[1] * s * s * 4,
        "max_normwise_diff_vs_torch_float32": diffs,
    }


def run(seqs: list[int], reps: int) -> dict:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for s in seqs:
        shape = rb.Shape(batch=1, heads=8, kv_heads=8, q_len=s, k_len=s, head_dim=64)
        q, k, v = rb.make_inputs(shape, np.float32, 0)
        d_out = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
        for family in ("alibi", "t5"):
            if family == "alibi":
                fam = rp.ALiBi.from_num_heads(8, dtype=np.float32)
                params = np.asarray(fam.parameters()["slopes"])
            else:
                params = np.random.default_rng(2).standard_normal((8, 32)).astype(np.float32)
                fam = rp.T5Bias(params, bidirectional=False, layout="heads_buckets")
            row = _measure(torch, family, fam, params, q, k, v, d_out, reps)
            rows.append({"seq": s, "family": family, **row})
            print(
                f"S={s} {family}: forward {row['forward_s']:.3f} s, vjp {row['vjp_s']:.3f} s "
                f"({row['vjp_over_forward']:.2f}x forward), torch SDPA fwd+bwd {row['torch_sdpa_fwd_bwd_s']:.3f} s "
                f"(vjp/torch {row['vjp_over_torch']:.2f}), peak {row['vjp_peak_bytes'] / 2**20:.0f} MiB vs "
                f"{row['full_logits_bytes'] / 2**20:.0f} MiB"
            )
    return {"machine": rb.machine_info(), "torch": torch.__version__, "reps": reps, "rows": rows}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Reference backward: `rp.attention_vjp` (NumPy) vs PyTorch autograd through SDPA (CPU)",
        "",
        f"Machine: {m.get('cpu')}, {m.get('usable_cores')} cores, {m.get('os')}; numpy "
        f"{m.get('libraries', {}).get('numpy')}, torch {result['torch']}; median of {result['reps']} calls after a "
        "warm-up, one run.",
        "B = 1, H = 8, D = 64, float32, causal. `vjp` includes its own forward pass (for the log-sum-exp) and the "
        "parameter gradients; torch is SDPA forward + `torch.autograd.grad` with a float mask built from the "
        "parameters. The backward's peak memory is set by its tiles (about 1 Mi logits each), not by S.",
        "",
        "| S | family | forward s | vjp s | vjp / forward | torch fwd+bwd s | vjp / torch | vjp peak MiB | "
        "(B,H,S,S) f32 MiB | max diff vs torch / max(1, max abs torch) (f32) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        diffs = ", ".join(f"{n} {d:.1e}" for n, d in r["max_normwise_diff_vs_torch_float32"].items())
        lines.append(
            f"| {r['seq']} | {r['family']} | {r['forward_s']:.3f} | {r['vjp_s']:.3f} | {r['vjp_over_forward']:.2f} | "
            f"{r['torch_sdpa_fwd_bwd_s']:.3f} | {r['vjp_over_torch']:.2f} | {r['vjp_peak_bytes'] / 2**20:.0f} | "
            f"{r['full_logits_bytes'] / 2**20:.0f} | {diffs} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None, help="output folder (default bench/results/<date>-cpu)")
    args = p.parse_args()
    result = run(args.seq, args.reps)
    out = Path(args.out or Path(__file__).parent / "results" / f"{datetime.date.today().isoformat()}-cpu")
    out.mkdir(parents=True, exist_ok=True)
    (out / "backward.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "backward.md").write_text(markdown(result))
    print(f"wrote {out / 'backward.json'} and {out / 'backward.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
