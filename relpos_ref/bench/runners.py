"""The per-backend callables a bench run times: NumPy and CuPy reference, CuPy fused, torch SDPA, FlexAttention."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._checks import array_namespace, compat_namespace
from .._host import to_host
from ..attention import attention
from ..families import FIRE
from ..positions import causal_mask, positions
from .backends import UnavailableError, import_cupy, import_torch
from .config import BACKENDS, Shape
from .measure import Runner, cupy_events, cupy_peak, numpy_reads, torch_cuda_peak, torch_events, tracemalloc_peak

__all__ = ["host_copy", "make_runner"]


def host_copy(x: Any) -> np.ndarray:
    """A float64 host NumPy copy of a backend's output (NumPy, CuPy or torch on any device)."""
    return to_host(x, name="backend output")[0]


def _numpy_runner(fam: Any, q: Any, k: Any, v: Any, shape: Shape, attn_kwargs: dict) -> Runner:
    def fn() -> Any:
        return attention(q, k, v, bias=fam, causal=shape.causal, **attn_kwargs)

    return Runner(
        fn=fn,
        device="cpu",
        to_host=host_copy,
        peak_memory=lambda: tracemalloc_peak(fn),
        reads=numpy_reads((k, v)),
        read_bytes=int(k.nbytes + v.nbytes),
    )


def _cupy_runner(name: str, fam: Any, q: Any, k: Any, v: Any, shape: Shape, attn_kwargs: dict) -> Runner:
    cupy = import_cupy()
    qc, kc, vc = (cupy.asarray(x) for x in (q, k, v))
    xp = array_namespace(qc)
    fam_c = None if fam is None else fam.astype(xp=xp)
    b, h, hkv, sq, sk, d = shape.batch, shape.heads, shape.kv_heads, shape.q_len, shape.k_len, shape.head_dim
    scale = 1.0 / math.sqrt(d)

    if name == "cupy":

        def fn() -> Any:
            return attention(qc, kc, vc, bias=fam_c, causal=shape.causal, **attn_kwargs)

    else:
        from ..cuda import fused_biased_softmax, supported_family

        if fam is not None and supported_family(fam) is None:
            raise UnavailableError(f"relpos_ref.cuda has no in-kernel form of {type(fam).__name__}")
        g = h // hkv

        def fn() -> Any:
            qg = qc.reshape(b, hkv, g, sq, d)
            scores = (qg @ kc[:, :, None].swapaxes(-1, -2)).reshape(b, h, sq, sk)
            probs = fused_biased_softmax(scores, fam_c, causal=shape.causal, scale=scale)
            del scores
            return (probs.reshape(b, hkv, g, sq, sk) @ vc[:, :, None]).reshape(b, h, sq, d)

    return Runner(
        fn=fn,
        device="cuda",
        to_host=host_copy,
        peak_memory=lambda: cupy_peak(cupy, fn),
        sync=lambda: cupy.cuda.Device().synchronize(),
        events=lambda: cupy_events(cupy),
        reads={"cupy sum per array": lambda: [x.sum() for x in (kc, vc)]},
        read_bytes=int(kc.nbytes + vc.nbytes),
    )


_COMPILED_FLEX: dict[str, Any] = {}


def _torch_runner(name: str, fam: Any, q: Any, k: Any, v: Any, shape: Shape, attn_kwargs: dict) -> Runner:
    torch = import_torch()
    xt = compat_namespace("torch")

    dev = "cuda" if name.endswith("cuda") else "cpu"
    qt, kt, vt = (torch.from_numpy(np.ascontiguousarray(x)).to(dev) for x in (q, k, v))
    fam_t = None if fam is None else fam.astype(xp=xt, device=dev)
    sq, sk, h, hkv = shape.q_len, shape.k_len, shape.heads, shape.kv_heads
    gqa = {"enable_gqa": True} if h != hkv else {}
    scale = 1.0 / math.sqrt(shape.head_dim)
    shift = sk - sq  # bottom-right alignment: query i sits at position shift + i
    sdpa = torch.nn.functional.scaled_dot_product_attention

    if name.startswith("sdpa"):

        def fn() -> Any:
            q_pos, k_pos = positions(sq, sk, xp=xt, device=dev)
            if fam_t is None:
                if not shape.causal:
                    return sdpa(qt, kt, vt, scale=scale, **gqa)
                if sq == sk:
                    return sdpa(qt, kt, vt, is_causal=True, scale=scale, **gqa)
                return sdpa(qt, kt, vt, attn_mask=causal_mask(q_pos, k_pos), scale=scale, **gqa)
            bias = fam_t.bias(q_pos, k_pos)
            if shape.causal:
                bias.masked_fill_(k_pos[None, :] > q_pos[:, None], -math.inf)
            return sdpa(qt, kt, vt, attn_mask=bias[None], scale=scale, **gqa)

    else:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if dev not in _COMPILED_FLEX:
            _COMPILED_FLEX[dev] = torch.compile(flex_attention, dynamic=False)
        compiled = _COMPILED_FLEX[dev]
        relative = fam is not None and not isinstance(fam, FIRE)

        def fn() -> Any:
            mod = None
            if relative:
                # table[:, t] = b(Delta) with Delta = t + 1 - Sq, so the score of (q_idx, kv_idx) reads
                # t = q_idx - kv_idx + Sk - 1 (Delta = shift + q_idx - kv_idx); Delta spans 1 - Sq .. Sk - 1.
                q_pos = torch.tensor([sk - 1], device=dev)
                k_pos = torch.arange(sk + sq - 2, -1, -1, device=dev)
                table = fam_t.bias(q_pos, k_pos)[:, 0, :].contiguous()
                off = sk - 1

                def mod(score: Any, b: Any, hh: Any, qi: Any, ki: Any) -> Any:
                    return score + table[hh, qi - ki + off]

            elif fam_t is not None:
                full = fam_t.bias(*positions(sq, sk, xp=xt, device=dev))

                def mod(score: Any, b: Any, hh: Any, qi: Any, ki: Any) -> Any:
                    return score + full[hh, qi, ki]

            block_mask = None
            if shape.causal:

                def causal(b: Any, hh: Any, qi: Any, ki: Any) -> Any:
                    return qi + shift >= ki

                block_mask = create_block_mask(causal, None, None, sq, sk, device=dev)
            return compiled(qt, kt, vt, score_mod=mod, block_mask=block_mask, scale=scale, **gqa)

    if dev == "cuda":
        return Runner(
            fn=fn,
            device="cuda",
            to_host=host_copy,
            peak_memory=lambda: torch_cuda_peak(torch, fn),
            sync=torch.cuda.synchronize,
            events=lambda: torch_events(torch),
            reads={"torch sum per tensor": lambda: [x.sum() for x in (kt, vt)]},
            read_bytes=int(k.nbytes + v.nbytes),
        )
    return Runner(
        fn=fn,
        device="cpu",
        to_host=host_copy,
        peak_memory=lambda: (None, "torch CPU allocations are invisible to tracemalloc; see the targets (RSS)"),
        # torch.from_numpy shares the arrays' memory, so the NumPy reads read the very bytes SDPA reads.
        reads=numpy_reads((k, v)),
        read_bytes=int(k.nbytes + v.nbytes),
    )


def make_runner(
    backend: str, fam: Any, q: Any, k: Any, v: Any, shape: Shape, attn_kwargs: dict | None = None
) -> Runner:
    """A runner of ``backend`` on NumPy inputs (copied to the backend's device once, outside any timing)."""
    attn_kwargs = dict(attn_kwargs or {})
    if backend == "numpy":
        return _numpy_runner(fam, q, k, v, shape, attn_kwargs)
    if backend in ("cupy", "cupy-fused"):
        return _cupy_runner(backend, fam, q, k, v, shape, attn_kwargs)
    if backend in ("sdpa-cpu", "sdpa-cuda", "flex-cpu", "flex-cuda"):
        return _torch_runner(backend, fam, q, k, v, shape, attn_kwargs)
    msg = f"backend: expected one of {BACKENDS}, got {backend!r}"
    raise ValueError(msg)
