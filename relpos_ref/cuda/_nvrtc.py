"""Compile the kernel source with NVRTC directly, without a GPU (CI compile checks, register reports).

CuPy's ``RawModule`` asks the current device for its architecture, so it cannot compile on a machine without a GPU.
NVRTC itself needs no device: this module drives CuPy's low-level NVRTC bindings with an explicit ``-arch``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ._source import kernel_source

__all__ = ["CompileResult", "nvrtc_compile", "nvrtc_module", "resource_usage"]


def nvrtc_module() -> Any:
    """CuPy's NVRTC bindings; raises ImportError (with the reason) when CuPy or libnvrtc is unavailable."""
    try:
        from cupy_backends.cuda.libs import nvrtc
    except Exception as exc:
        msg = f"CuPy's NVRTC bindings are not importable ({type(exc).__name__}: {exc})"
        raise ImportError(msg) from exc
    try:
        nvrtc.getVersion()
    except Exception as exc:
        msg = f"libnvrtc cannot be loaded ({type(exc).__name__}: {exc})"
        raise ImportError(msg) from exc
    return nvrtc


@dataclass
class CompileResult:
    arch: str
    output: bytes  # PTX text or CUBIN
    log: str
    lowered: dict[str, str] = field(default_factory=dict)
    version: tuple[int, int] = (0, 0)


def nvrtc_compile(
    names: list[str],
    arch: str,
    *,
    cubin: bool = False,
    options: tuple[str, ...] = (),
    source: str | None = None,
) -> CompileResult:
    """Compile ``names`` (name expressions of the kernel source) for ``arch`` ("compute_90" for PTX, "sm_90" for
    CUBIN). Raises RuntimeError carrying the NVRTC log when compilation fails."""
    nvrtc = nvrtc_module()
    src = kernel_source() if source is None else source
    prog = nvrtc.createProgram(src, "biased_softmax.cu", [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        opts = ["--std=c++17", f"-arch={arch}", *options]
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as exc:
            msg = f"NVRTC failed for {arch}: {exc}\n{nvrtc.getProgramLog(prog)}"
            raise RuntimeError(msg) from exc
        log = nvrtc.getProgramLog(prog)
        lowered = {n: nvrtc.getLoweredName(prog, n) for n in names}
        out = nvrtc.getCUBIN(prog) if cubin else nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    if isinstance(out, str):
        out = out.encode()
    return CompileResult(arch, out, log, lowered, tuple(nvrtc.getVersion()))


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def resource_usage(names: list[str], arch: str = "sm_90") -> dict[str, dict[str, int]]:
    """Registers, stack and spill bytes per kernel (from ``ptxas -v`` through NVRTC), keyed by name expression."""
    res = nvrtc_compile(names, arch, cubin=True, options=("--ptxas-options=-v",))
    by_lowered = {v: k for k, v in res.lowered.items()}
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in res.log.splitlines():
        if m := _ENTRY.search(line):
            current = by_lowered.get(m.group(1))
            if current is not None:
                out[current] = {}
        elif current is not None and (m := _SPILL.search(line)):
            out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _REGS.search(line)):
            out[current]["registers"] = int(m.group(1))
    return out
