"""Registers, stack and spill bytes of every fused-kernel instantiation, from ptxas through NVRTC (no GPU needed).

    PYTHONPATH=. python bench/cuda_resources.py --arch sm_90 --out resources.json --md resources.md

Needs CuPy's NVRTC bindings and libnvrtc (``pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12``). About 3 minutes for
all ~870 instantiations on one core. Spill counts include registers saved around calls to the IEEE division and
libm slow paths, which sit on rarely taken branches.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relpos_ref.cuda import all_kernel_names
from relpos_ref.cuda._nvrtc import nvrtc_module, resource_usage


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--md", type=Path, required=True)
    ap.add_argument("--dtypes", default="float32,float16,float64")
    args = ap.parse_args(argv)
    names = [n for n in all_kernel_names(None, args.dtypes.split(",")) if "<" in n]
    t0 = time.perf_counter()
    usage: dict[str, dict[str, int]] = {}
    for k in range(0, len(names), 100):
        usage.update(resource_usage(names[k : k + 100], args.arch))
    meta = {"arch": args.arch, "nvrtc": list(nvrtc_module().getVersion()), "seconds": time.perf_counter() - t0}
    args.out.write_text(json.dumps({"meta": meta, "kernels": usage}, indent=1))
    lines = [
        f"# Fused kernels: ptxas resource usage ({args.arch}, NVRTC {'.'.join(map(str, meta['nvrtc']))})",
        "",
        "| kernel | registers | stack B | spill stores B | spill loads B |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(usage):
        u = usage[name]
        lines.append(
            f"| `{name}` | {u.get('registers', '?')} | {u.get('stack', 0)} | {u.get('spill_stores', 0)} | "
            f"{u.get('spill_loads', 0)} |"
        )
    args.md.write_text("\n".join(lines) + "\n")
    print(f"{len(usage)} kernels in {meta['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
