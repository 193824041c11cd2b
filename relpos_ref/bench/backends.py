"""Which backends can run here: the optional imports of torch and CuPy, and the reason when a backend cannot run."""

from __future__ import annotations

from typing import Any

from .config import BACKENDS, BenchConfig

__all__ = ["UnavailableError", "backend_status", "import_cupy", "import_torch", "select_backends"]


class UnavailableError(Exception):
    """A backend that cannot run here (missing library or device); the message is the reason."""


def import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise UnavailableError("torch is not installed (pip install torch)") from exc
    return torch


def import_cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise UnavailableError("CuPy is not installed (pip install 'relpos_ref[cuda12]' or '[cuda13]')") from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError without a driver
        raise UnavailableError(f"CuPy sees no CUDA device ({type(exc).__name__}: {exc})") from exc
    if count < 1:
        raise UnavailableError("CuPy sees no CUDA device")
    return cupy


def backend_status(name: str) -> str | None:
    """None when ``name`` can run here, else the reason it cannot."""
    try:
        if name == "numpy":
            return None
        if name in ("cupy", "cupy-fused"):
            import_cupy()
            if name == "cupy-fused":
                try:
                    from ..cuda import fused_biased_softmax  # noqa: F401
                except ImportError as exc:
                    return f"relpos_ref.cuda.fused_biased_softmax is not importable ({exc})"
            return None
        torch = import_torch()
        if name.endswith("-cuda") and not torch.cuda.is_available():
            return f"torch {torch.__version__} has no usable CUDA device"
        if name.startswith("flex"):
            try:
                from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
            except ImportError as exc:
                return f"torch {torch.__version__} has no FlexAttention ({exc})"
        elif not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
            return f"torch {torch.__version__} has no scaled_dot_product_attention"
    except UnavailableError as exc:
        return str(exc)
    if name not in BACKENDS:
        return f"unknown backend {name!r}"
    return None


def select_backends(cfg: BenchConfig) -> tuple[list[str], dict[str, str]]:
    """(backends of ``cfg`` that will run, {backend: reason} for those skipped)."""
    wanted = list(cfg.backends) if cfg.backends is not None else list(BACKENDS)
    skipped: dict[str, str] = {}
    if cfg.backends is None and cfg.quick:
        skipped["flex-cpu"] = "left out of --quick: torch.compile takes 10-60 s per shape on a CPU"
        wanted.remove("flex-cpu")
    run = []
    for b in wanted:
        reason = backend_status(b)
        if reason is None:
            run.append(b)
        else:
            skipped[b] = reason
    return run, skipped
