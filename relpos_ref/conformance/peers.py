"""Run the conformance harness on real peer implementations and write their verdicts.

.. code-block:: console

    pip install "relpos_ref[peers]"            # PyTorch (CPU is enough) and HF transformers
    python -m relpos_ref.conformance.peers                      # print the verdict table
    python -m relpos_ref.conformance.peers --write spec/peers.md

Every candidate calls the peer library's own function (HF ``T5Attention._relative_position_bucket`` and
``compute_bias``, HF BLOOM ``build_alibi_tensor``, ``torch.nn.functional.scaled_dot_product_attention``, PyTorch
FlexAttention in eager mode on CPU with a ``score_mod``); only the glue that turns the harness's positions or q, k, v
into the peer's arguments is written here. Backward candidates are ``torch.autograd.grad`` through those peers (and
through a plain materialised attention), with the bias parameters as leaf tensors that require grad. Each case records
the verdict it is expected to get (``expect_pass`` and a phrase of the diagnosis), which ``tests/test_peers.py``
asserts, so the table in ``spec/peers.md`` cannot drift from what the harness says.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..families import ALiBi, alibi_slopes
from ..families import KerpleLog, KerplePower
from ..families import T5Bias
from .attention import check_attention
from .backward import check_attention_backward
from .bias import check_bias
from .buckets import check_buckets
from .report import Report

__all__ = ["PeerCase", "cases", "main", "markdown", "run_case"]


@dataclasses.dataclass
class PeerCase:
    """One peer function checked under one set of conventions."""

    key: str
    peer: str
    call: str
    expect_pass: bool
    expect_text: str | None
    meaning: str
    run: Callable[[], Report]


def _torch() -> Any:
    import torch

    return torch


# -- candidates built on the peers' own functions ---------------------------------------------------------------


def hf_bucket(*, negate: bool, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128) -> Callable:
    """HF ``T5Attention._relative_position_bucket``; ``negate`` passes HF's memory - query = -delta."""
    torch = _torch()
    from transformers.models.t5.modeling_t5 import T5Attention

    def candidate(delta: np.ndarray) -> Any:
        rel = torch.from_numpy(-delta if negate else delta)
        return T5Attention._relative_position_bucket(
            rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
        )

    return candidate


def hf_t5_attention(*, decoder: bool, heads: int = 8, seed: int = 0) -> Any:
    """An HF ``T5Attention`` layer with a relative bias (random weights, float32, eval mode)."""
    torch = _torch()
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    cfg = T5Config(
        d_model=32,
        d_kv=8,
        num_heads=heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        is_decoder=decoder,
    )
    torch.manual_seed(seed)
    layer = T5Attention(cfg, has_relative_attention_bias=True, layer_idx=0).eval()
    with torch.no_grad():
        layer.relative_attention_bias.weight.normal_()
    return layer


def hf_compute_bias(layer: Any) -> Callable:
    """``candidate(q_pos, k_pos)`` from ``layer.compute_bias`` at absolute positions.

    Contiguous query positions go through HF's KV-cache offset (``past_seen_tokens`` in transformers 5,
    ``cache_position`` in 4.x); keys are the columns ``k_pos`` of a bias computed for keys 0..max(k_pos).
    """
    torch = _torch()
    params = inspect.signature(layer.compute_bias).parameters

    def candidate(q_pos: np.ndarray, k_pos: np.ndarray) -> Any:
        if q_pos.min() < 0 or k_pos.min() < 0:
            msg = "HF compute_bias takes non-negative positions"
            raise ValueError(msg)
        k_len = int(k_pos.max()) + 1
        contiguous = bool(np.all(np.diff(q_pos) == 1)) if len(q_pos) > 1 else True
        with torch.no_grad():
            if contiguous and "past_seen_tokens" in params:
                vals = layer.compute_bias(len(q_pos), k_len, past_seen_tokens=int(q_pos[0]))[0]
            elif contiguous and "cache_position" in params:
                vals = layer.compute_bias(len(q_pos), k_len, cache_position=torch.from_numpy(q_pos))[0]
            else:
                vals = layer.compute_bias(int(q_pos.max()) + 1, k_len)[0][:, torch.from_numpy(q_pos)]
        return vals[:, :, torch.from_numpy(k_pos)]

    return candidate


def bloom_alibi(heads: int, dtype: str = "float32") -> Callable:
    """HF BLOOM ``build_alibi_tensor`` (key-only, (B*H, 1, S)) broadcast to (H, Sq, Sk) at the keys ``k_pos``."""
    torch = _torch()
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    tdt = getattr(torch, dtype)

    def candidate(q_pos: np.ndarray, k_pos: np.ndarray) -> Any:
        mask = torch.ones(1, int(k_pos.max()) + 1, dtype=torch.long)
        alibi = build_alibi_tensor(mask, heads, tdt)  # (H, 1, S)
        cols = alibi[:, :, torch.from_numpy(k_pos)]
        return cols.expand(heads, len(q_pos), len(k_pos))

    return candidate


def _positions(sq: int, sk: int, align: str) -> tuple[Any, Any]:
    torch = _torch()
    start = sk - sq if align == "bottom_right" else 0
    return torch.arange(start, start + sq), torch.arange(sk)


def sdpa_alibi(*, causal: bool) -> Callable:
    """SDPA with an additive ALiBi bias built in torch (bottom-right positions), causal part as -inf."""
    torch = _torch()
    import torch.nn.functional as F  # noqa: N812

    def candidate(q: Any, k: Any, v: Any) -> Any:
        _, h, sq, _ = q.shape
        sk = k.shape[2]
        qp, kp = _positions(sq, sk, "bottom_right")
        delta = qp[:, None] - kp[None, :]
        slopes = torch.tensor(np.asarray(alibi_slopes(h)), dtype=torch.float64)
        bias = -slopes[:, None, None] * delta.abs()[None].to(torch.float64)
        if causal:
            bias = bias.masked_fill(delta[None] < 0, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None].to(q.dtype), enable_gqa=k.shape[1] != h)

    return candidate


def sdpa_causal(variant: str) -> Callable:
    """SDPA causal without a bias: ``is_causal=True`` or ``attn_mask=causal_lower_right(Sq, Sk)``."""
    import torch.nn.functional as F  # noqa: N812
    from torch.nn.attention.bias import causal_lower_right

    def candidate(q: Any, k: Any, v: Any) -> Any:
        gqa = k.shape[1] != q.shape[1]
        if variant == "is_causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "will produce NaNs when seq_len_q > seq_len_kv"
            mask = causal_lower_right(q.shape[2], k.shape[2])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    return candidate


def _flex(q: Any, k: Any, v: Any, score_mod: Callable, *, scale: float | None = None, with_lse: bool) -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    kwargs: dict[str, Any] = {"score_mod": score_mod, "scale": scale, "enable_gqa": k.shape[1] != q.shape[1]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()": eager is the point here
        if with_lse:
            try:
                from torch.nn.attention.flex_attention import AuxRequest

                out, aux = flex_attention(q, k, v, return_aux=AuxRequest(lse=True), **kwargs)
                return out, aux.lse
            except ImportError:  # PyTorch < 2.9
                return flex_attention(q, k, v, return_lse=True, **kwargs)
        return flex_attention(q, k, v, **kwargs)


def flex_alibi(form: str, *, causal: bool, with_lse: bool = False) -> Callable:
    """FlexAttention (eager, CPU) with an ALiBi ``score_mod``.

    form: ``"bottom_right"`` -m|q + (Sk - Sq) - kv| (correct); ``"blog"`` the PyTorch blog's
    ``score + slope * (q_idx - kv_idx)`` (with the bottom-right offset added, to isolate its sign); ``"gym"``
    attention-gym's ``score + (kv_idx - q_idx) * slope`` (local indices, as it is written).
    """
    torch = _torch()

    def candidate(q: Any, k: Any, v: Any) -> Any:
        h, sq, sk = q.shape[1], q.shape[2], k.shape[2]
        slopes = torch.tensor(np.asarray(alibi_slopes(h)), dtype=q.dtype)
        off = 0 if form == "gym" else sk - sq  # attention-gym's mod uses the local indices as they come

        def score_mod(score: Any, b: Any, hh: Any, qi: Any, ki: Any) -> Any:
            qa = qi + off
            if form == "bottom_right":
                s = score - slopes[hh] * (qa - ki).abs()
            elif form == "blog":
                s = score + slopes[hh] * (qa - ki)
            else:
                s = score + (ki - qa) * slopes[hh]
            if causal:
                s = torch.where(qa >= ki, s, -float("inf"))
            return s

        return _flex(q, k, v, score_mod, with_lse=with_lse)

    return candidate


def flex_t5(layer: Any) -> Callable:
    """FlexAttention (eager, CPU) with a T5 ``score_mod``: buckets from HF's ``_relative_position_bucket`` and values
    from the HF layer's embedding, no 1/sqrt(d) scale."""
    weight = layer.relative_attention_bias.weight.detach()  # (buckets, heads)
    bidirectional = not layer.is_decoder

    def candidate(q: Any, k: Any, v: Any) -> Any:
        sq, sk = q.shape[2], k.shape[2]
        qp, kp = _positions(sq, sk, "bottom_right")
        buckets = layer._relative_position_bucket(
            kp[None, :] - qp[:, None],
            bidirectional=bidirectional,
            num_buckets=weight.shape[0],
            max_distance=layer.relative_attention_max_distance,
        )
        table = weight.to(q.dtype)

        def score_mod(score: Any, b: Any, hh: Any, qi: Any, ki: Any) -> Any:
            return score + table[buckets[qi, ki], hh]

        return _flex(q, k, v, score_mod, scale=1.0, with_lse=False)

    return candidate


# -- backward candidates: PyTorch autograd on CPU -------------------------------------------------------------
#
# Each returns candidate(q, k, v, d_out) -> {"dq", "dk", "dv", parameter name: gradient}: torch.autograd.grad of the
# peer's forward with respect to q, k, v and the bias parameters, which are leaf tensors with requires_grad.

BiasBuilder = Callable[[int, int, Any], tuple[Any, dict[str, Any]]]


def _offsets(sq: int, sk: int) -> Any:
    qp, kp = _positions(sq, sk, "bottom_right")
    return qp[:, None] - kp[None, :]


def alibi_params(heads: int) -> BiasBuilder:
    """-m_h |i - j| from slopes that require grad: ((1, H, Sq, Sk) bias, {"slopes": leaf})."""
    torch = _torch()

    def build(sq: int, sk: int, dtype: Any) -> tuple[Any, dict[str, Any]]:
        m = torch.tensor(np.asarray(alibi_slopes(heads)), dtype=dtype, requires_grad=True)
        dist = _offsets(sq, sk).abs().to(dtype)
        return (-m[:, None, None] * dist)[None], {"slopes": m}

    return build


def kerple_params(form: str, r1: np.ndarray, r2: np.ndarray) -> BiasBuilder:
    """KERPLE power -r1 |i - j|^r2 or log -r1 log(1 + r2 |i - j|) from r1, r2 that require grad."""
    torch = _torch()

    def build(sq: int, sk: int, dtype: Any) -> tuple[Any, dict[str, Any]]:
        a = torch.tensor(r1, dtype=dtype, requires_grad=True)
        b = torch.tensor(r2, dtype=dtype, requires_grad=True)
        dist = _offsets(sq, sk).abs().to(dtype)
        if form == "power":
            bias = -a[:, None, None] * dist ** b[:, None, None]
        else:
            bias = -a[:, None, None] * torch.log1p(b[:, None, None] * dist)
        return bias[None], {"r1": a, "r2": b}

    return build


def t5_params(layer: Any) -> BiasBuilder:
    """HF ``T5Attention.compute_bias`` of a copy of ``layer`` in the input dtype; {"table": its embedding weight}.

    The query positions go through ``past_seen_tokens = Sk - Sq`` (bottom-right); the weight is HF's
    (buckets, heads) ``nn.Embedding`` parameter, so its gradient is in that layout.
    """
    import copy

    copies: dict[Any, Any] = {}

    def build(sq: int, sk: int, dtype: Any) -> tuple[Any, dict[str, Any]]:
        if dtype not in copies:
            copies[dtype] = copy.deepcopy(layer).to(dtype)
        lay = copies[dtype]
        return lay.compute_bias(sq, sk, past_seen_tokens=sk - sq), {"table": lay.relative_attention_bias.weight}

    return build


def _grads(out: Any, leaves: dict[str, Any], d_out: Any) -> dict[str, Any]:
    torch = _torch()
    return dict(zip(leaves, torch.autograd.grad(out, tuple(leaves.values()), d_out), strict=True))


def _leaves(q: Any, k: Any, v: Any) -> tuple[Any, Any, Any]:
    return tuple(t.detach().clone().requires_grad_() for t in (q, k, v))


def sdpa_backward(build: BiasBuilder, *, causal: bool, scale: float | None = None) -> Callable:
    """Autograd through SDPA with the bias as a float ``attn_mask`` (causal part -inf), GQA via ``enable_gqa``."""
    import torch.nn.functional as F  # noqa: N812

    def candidate(q: Any, k: Any, v: Any, d_out: Any) -> dict[str, Any]:
        q, k, v = _leaves(q, k, v)
        sq, sk = q.shape[2], k.shape[2]
        bias, params = build(sq, sk, q.dtype)
        if causal:
            bias = bias.masked_fill(_offsets(sq, sk) < 0, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
        return _grads(out, {"dq": q, "dk": k, "dv": v, **params}, d_out)

    return candidate


def plain_autograd(build: BiasBuilder, *, causal: bool, scale: float | None = None, mask: str = "additive") -> Callable:
    """Autograd through a materialised attention: scores, bias, causal mask, ``torch.softmax``, ``p @ v``.

    mask "additive": the causal mask added as a tensor of 0 and -inf; "masked_fill": ``z.masked_fill(future, -inf)``,
    whose backward sets the masked entries' cotangent to zero.
    """
    torch = _torch()

    def candidate(q: Any, k: Any, v: Any, d_out: Any) -> dict[str, Any]:
        q, k, v = _leaves(q, k, v)
        sq, sk, d = q.shape[2], k.shape[2], q.shape[3]
        group = q.shape[1] // k.shape[1]
        kk, vv = (t.repeat_interleave(group, dim=1) for t in (k, v))
        bias, params = build(sq, sk, q.dtype)
        z = q @ kk.transpose(-1, -2) * (d**-0.5 if scale is None else scale) + bias
        if causal:
            future = _offsets(sq, sk) < 0
            if mask == "additive":
                z = z + torch.zeros(future.shape, dtype=z.dtype).masked_fill(future, float("-inf"))
            else:
                z = z.masked_fill(future, float("-inf"))
        out = torch.softmax(z, dim=-1) @ vv
        return _grads(out, {"dq": q, "dk": k, "dv": v, **params}, d_out)

    return candidate


def flex_backward(form: str, *, causal: bool, layer: Any = None, params_only: bool) -> Callable:
    """Autograd through FlexAttention (eager, CPU) whose ``score_mod`` captures parameter tensors that require grad.

    form "alibi": ``score - slopes[h] * |q_idx + Sk - Sq - kv_idx|``; form "t5": ``score + table[bucket, h]`` with
    HF's buckets and the HF layer's (buckets, heads) weight, no scale. ``params_only``: q, k, v do not require grad
    (FlexAttention refuses a CPU backward for them) and only the captured tensors' gradients are returned.
    """
    torch = _torch()

    def candidate(q: Any, k: Any, v: Any, d_out: Any) -> dict[str, Any]:
        if not params_only:
            q, k, v = _leaves(q, k, v)
        sq, sk = q.shape[2], k.shape[2]
        off = sk - sq
        if form == "alibi":
            m = torch.tensor(np.asarray(alibi_slopes(q.shape[1])), dtype=q.dtype, requires_grad=True)
            params = {"slopes": m}

            def score_mod(score: Any, b: Any, hh: Any, qi: Any, ki: Any) -> Any:
                s = score - m[hh] * (qi + off - ki).abs()
                return torch.where(qi + off >= ki, s, -float("inf")) if causal else s

            scale = None
        else:
            table = layer.relative_attention_bias.weight.detach().to(q.dtype).requires_grad_()
            params = {"table": table}
            qp, kp = _positions(sq, sk, "bottom_right")
            buckets = layer._relative_position_bucket(
                kp[None, :] - qp[:, None],
                bidirectional=not layer.is_decoder,
                num_buckets=table.shape[0],
                max_distance=layer.relative_attention_max_distance,
            )

            def score_mod(score: Any, b: Any, hh: Any, qi: Any, ki: Any) -> Any:
                return score + table[buckets[qi, ki], hh]

            scale = 1.0
        out = _flex(q, k, v, score_mod, scale=scale, with_lse=False)
        leaves = params if params_only else {"dq": q, "dk": k, "dv": v, **params}
        return _grads(out, leaves, d_out)

    return candidate


# -- the cases ------------------------------------------------------------------------------------------------


def cases() -> list[PeerCase]:
    """Every peer case, in the order of the table."""
    out: list[PeerCase] = []
    hf_rpb = "HF `T5Attention._relative_position_bucket`"
    for bid in (True, False):
        out.append(
            PeerCase(
                f"t5_bucket_{'bi' if bid else 'causal'}",
                hf_rpb,
                f"`check_buckets(bidirectional={bid})`, HF given `-delta`",
                True,
                None,
                f"exact buckets ({'bidirectional' if bid else 'causal'}, B=32, D=128), boundaries 16/32/64 "
                "included: HF's float32 log lands on the exact integer thresholds",
                lambda bid=bid: check_buckets(hf_bucket(negate=True, bidirectional=bid), bidirectional=bid),
            )
        )
    out.append(
        PeerCase(
            "t5_bucket_b64_d256",
            hf_rpb,
            "`check_buckets(bidirectional=True, num_buckets=64, max_distance=256)`",
            True,
            None,
            "exact for a non-default configuration too",
            lambda: check_buckets(
                hf_bucket(negate=True, bidirectional=True, num_buckets=64, max_distance=256),
                bidirectional=True,
                num_buckets=64,
                max_distance=256,
            ),
        )
    )
    out.append(
        PeerCase(
            "t5_bucket_sign",
            hf_rpb,
            "`check_buckets(bidirectional=True)`, HF given `delta` as is",
            False,
            "offset sign flipped",
            "convention: HF's argument is memory - query (key - query), the opposite of relpos_ref's delta",
            lambda: check_buckets(hf_bucket(negate=False, bidirectional=True), bidirectional=True),
        )
    )

    enc = hf_t5_attention(decoder=False)
    dec = hf_t5_attention(decoder=True)
    w_enc = enc.relative_attention_bias.weight.detach().numpy().astype(np.float64)
    w_dec = dec.relative_attention_bias.weight.detach().numpy().astype(np.float64)
    hf_cb = "HF `T5Attention.compute_bias`"
    out.append(
        PeerCase(
            "t5_compute_bias_encoder",
            hf_cb,
            "`check_bias(ref=T5Bias(weight, bidirectional=True, layout='buckets_heads'), q_len=8, k_len=24)`",
            True,
            None,
            "exact, including KV-cache offsets (`past_seen_tokens`); table layout (buckets, heads)",
            lambda: check_bias(
                hf_compute_bias(enc), T5Bias(w_enc, bidirectional=True, layout="buckets_heads"), q_len=8, k_len=24
            ),
        )
    )
    out.append(
        PeerCase(
            "t5_compute_bias_decoder",
            hf_cb,
            "`check_bias(ref=T5Bias(weight, bidirectional=False, layout='buckets_heads'), q_len=8, k_len=24)`",
            True,
            None,
            "exact on every entry: future keys share bucket 0 with delta = 0 in both, and need a causal mask",
            lambda: check_bias(
                hf_compute_bias(dec), T5Bias(w_dec, bidirectional=False, layout="buckets_heads"), q_len=8, k_len=24
            ),
        )
    )
    out.append(
        PeerCase(
            "t5_compute_bias_layout",
            hf_cb,
            "same, reference built with the default `layout='heads_buckets'`",
            False,
            "layout='buckets_heads'",
            "convention: HF's `nn.Embedding(num_buckets, n_heads)` weight is (buckets, heads); t5x/Mesh-TF use "
            "(heads, buckets)",
            lambda: check_bias(hf_compute_bias(enc), T5Bias(w_enc, bidirectional=True), q_len=8, k_len=24),
        )
    )

    bloom = "HF BLOOM `build_alibi_tensor`"
    for h in (12, 8):
        out.append(
            PeerCase(
                f"bloom_alibi_{h}_exact",
                bloom,
                f"`check_bias(ref=ALiBi.from_num_heads({h}), q_len=8, k_len=24)`",
                False,
                "key-only form",
                "convention: key-only form m_h * j; equal to -m_h |i - j| up to the per-row constant m_h * i on the "
                "causal part, different on future keys",
                lambda h=h: check_bias(bloom_alibi(h), ALiBi.from_num_heads(h), q_len=8, k_len=24),
            )
        )
        out.append(
            PeerCase(
                f"bloom_alibi_{h}_row_shift",
                bloom,
                f"`check_bias(ref=ALiBi.from_num_heads({h}), equivalence='row_shift', causal=True)`",
                True,
                None,
                f"same probabilities as -m|i-j| under a causal mask; official slopes for H = {h}"
                + (" (not a power of two: interleaved extras)" if h == 12 else ""),
                lambda h=h: check_bias(
                    bloom_alibi(h), ALiBi.from_num_heads(h), q_len=8, k_len=24, equivalence="row_shift", causal=True
                ),
            )
        )
    out.append(
        PeerCase(
            "bloom_alibi_12_bidirectional",
            bloom,
            "`check_bias(..., equivalence='row_shift', causal=False)`",
            False,
            "future keys",
            "the key-only form is not a relative bias without a causal mask (the penalty grows towards future keys)",
            lambda: check_bias(bloom_alibi(12), ALiBi.from_num_heads(12), q_len=8, k_len=24, equivalence="row_shift"),
        )
    )
    out.append(
        PeerCase(
            "bloom_alibi_12_bf16",
            bloom,
            "`check_bias(..., equivalence='row_shift', causal=True)`, `dtype=torch.bfloat16`",
            True,
            None,
            "within the bfloat16 bias tolerance; the key-only values m*j reach m*k_len, so their bfloat16 "
            "rounding error (max abs err column) grows with the position while -m|i-j| stays exact near the diagonal",
            lambda: check_bias(
                bloom_alibi(12, "bfloat16"),
                ALiBi.from_num_heads(12),
                q_len=8,
                k_len=24,
                equivalence="row_shift",
                causal=True,
            ),
        )
    )

    sdpa = "PyTorch `scaled_dot_product_attention`"
    for causal in (True, False):
        for dtype in ("float32", "float64", "bfloat16"):
            out.append(
                PeerCase(
                    f"sdpa_alibi_{'causal' if causal else 'full'}_{dtype}",
                    sdpa + " + additive ALiBi `attn_mask`",
                    f"`check_attention(bias=ALiBi(8), causal={causal}, dtype='{dtype}', xp='torch')`",
                    True,
                    None,
                    "bias added after the scale (post_scale); GQA via `enable_gqa`"
                    + ("; fully masked rows (Sq > Sk) give 0 (`_safe_softmax`)" if causal else ""),
                    lambda causal=causal, dtype=dtype: check_attention(
                        sdpa_alibi(causal=causal), bias=ALiBi.from_num_heads(8), causal=causal, dtype=dtype, xp="torch"
                    ),
                )
            )
    out.append(
        PeerCase(
            "sdpa_is_causal_bottom_right",
            sdpa + " `is_causal=True`",
            "`check_attention(causal=True, xp='torch')`",
            False,
            "top-left",
            "convention: `is_causal` is top-left when Sq != Sk (equal results for Sq == Sk)",
            lambda: check_attention(sdpa_causal("is_causal"), causal=True, xp="torch"),
        )
    )
    out.append(
        PeerCase(
            "sdpa_is_causal_top_left",
            sdpa + " `is_causal=True`",
            "`check_attention(causal=True, align='top_left', xp='torch')`",
            True,
            None,
            "matches the top-left convention exactly",
            lambda: check_attention(sdpa_causal("is_causal"), causal=True, align="top_left", xp="torch"),
        )
    )
    out.append(
        PeerCase(
            "sdpa_causal_lower_right",
            sdpa + " `attn_mask=causal_lower_right(Sq, Sk)`",
            "`check_attention(causal=True, xp='torch')`",
            True,
            None,
            "bottom-right; rows with no key give 0 although the factory warns about NaN",
            lambda: check_attention(sdpa_causal("lower_right"), causal=True, xp="torch"),
        )
    )

    flex = "PyTorch `flex_attention` (eager, CPU)"
    for dtype in ("float32", "float64"):
        out.append(
            PeerCase(
                f"flex_alibi_{dtype}",
                flex + ", ALiBi `score_mod` -m|q_idx + Sk - Sq - kv_idx|",
                f"`check_attention(bias=ALiBi(8), causal=True, with_lse=True, dtype='{dtype}', xp='torch')`",
                True,
                None,
                "score_mod receives the scaled score (post_scale); natural-log lse; empty rows give "
                "output 0 and lse -inf",
                lambda dtype=dtype: check_attention(
                    flex_alibi("bottom_right", causal=True, with_lse=True),
                    bias=ALiBi.from_num_heads(8),
                    causal=True,
                    with_lse=True,
                    dtype=dtype,
                    xp="torch",
                ),
            )
        )
    out.append(
        PeerCase(
            "flex_alibi_blog",
            flex + ", the blog's ALiBi `score + slope * (q_idx - kv_idx)`",
            "`check_attention(bias=ALiBi(8), causal=True, xp='torch')`",
            False,
            "bias negated",
            "sign error of the blog example (fixed in attention-gym PR #86): a bonus growing with distance",
            lambda: check_attention(
                flex_alibi("blog", causal=True), bias=ALiBi.from_num_heads(8), causal=True, xp="torch"
            ),
        )
    )
    out.append(
        PeerCase(
            "flex_alibi_gym_top_left",
            flex + ", attention-gym's ALiBi `score + (kv_idx - q_idx) * slope`",
            "`check_attention(bias=ALiBi(8), causal=True, align='top_left', xp='torch')`",
            True,
            None,
            "signed form: correct only under a causal mask; local indices make it top-left",
            lambda: check_attention(
                flex_alibi("gym", causal=True), bias=ALiBi.from_num_heads(8), causal=True, align="top_left", xp="torch"
            ),
        )
    )
    out.append(
        PeerCase(
            "flex_alibi_gym_bottom_right",
            flex + ", attention-gym's ALiBi `score + (kv_idx - q_idx) * slope`",
            "`check_attention(bias=ALiBi(8), causal=True, xp='torch')`",
            False,
            "top-left",
            "convention: q_idx and kv_idx are local indices, so Sq != Sk needs an explicit offset for bottom-right",
            lambda: check_attention(
                flex_alibi("gym", causal=True), bias=ALiBi.from_num_heads(8), causal=True, xp="torch"
            ),
        )
    )
    out.append(
        PeerCase(
            "flex_t5",
            flex + ", T5 `score_mod` (HF buckets and HF embedding weight)",
            "`check_attention(bias=T5Bias(weight, bidirectional=True, layout='buckets_heads'), scale=1.0, xp='torch')`",
            True,
            None,
            "T5 bias with no 1/sqrt(d) scale (`scale=1.0`), bidirectional",
            lambda: check_attention(
                flex_t5(enc), bias=T5Bias(w_enc, bidirectional=True, layout="buckets_heads"), scale=1.0, xp="torch"
            ),
        )
    )
    out.extend(_backward_cases(enc, dec, w_enc, w_dec))
    return out


def _backward_cases(enc: Any, dec: Any, w_enc: np.ndarray, w_dec: np.ndarray) -> list[PeerCase]:
    """Backward candidates built on PyTorch autograd on CPU, checked with ``check_attention_backward``."""
    out: list[PeerCase] = []
    alibi8 = ALiBi.from_num_heads(8)
    sdpa = "PyTorch `scaled_dot_product_attention` + autograd, bias as float `attn_mask`"
    for causal, dtypes in ((True, ("float32", "float64")), (False, ("float32",))):
        for dtype in dtypes:
            out.append(
                PeerCase(
                    f"bwd_sdpa_alibi_{'causal' if causal else 'full'}_{dtype}",
                    sdpa + " from slopes with `requires_grad`",
                    f"`check_attention_backward(bias=ALiBi(8), causal={causal}, dtype='{dtype}', xp='torch')`",
                    True,
                    None,
                    "dq, dk, dv (GQA heads summed by `enable_gqa`'s backward) and the slopes' gradient"
                    + (
                        "; the -inf mask gives keys after every query zero dk, dv, and empty rows zero dq"
                        if causal
                        else ""
                    ),
                    lambda causal=causal, dtype=dtype: check_attention_backward(
                        sdpa_backward(alibi_params(8), causal=causal),
                        bias=alibi8,
                        causal=causal,
                        dtype=dtype,
                        xp="torch",
                    ),
                )
            )
    t5_enc = T5Bias(w_enc, bidirectional=True, layout="buckets_heads")
    t5_dec = T5Bias(w_dec, bidirectional=False, layout="buckets_heads")
    for dtype in ("float32", "float64"):
        out.append(
            PeerCase(
                f"bwd_sdpa_t5_encoder_{dtype}",
                sdpa + " from HF `T5Attention.compute_bias`",
                "`check_attention_backward(bias=T5Bias(weight, bidirectional=True, layout='buckets_heads'), "
                f"scale=1.0, dtype='{dtype}', xp='torch')`",
                True,
                None,
                "the HF embedding weight's gradient is the table gradient in the (buckets, heads) layout",
                lambda dtype=dtype: check_attention_backward(
                    sdpa_backward(t5_params(enc), causal=False, scale=1.0),
                    bias=t5_enc,
                    scale=1.0,
                    dtype=dtype,
                    xp="torch",
                ),
            )
        )
    out.append(
        PeerCase(
            "bwd_sdpa_t5_decoder_causal_float32",
            sdpa + " from HF `T5Attention.compute_bias`",
            "`check_attention_backward(bias=T5Bias(weight, bidirectional=False, layout='buckets_heads'), causal=True, "
            "scale=1.0, xp='torch')`",
            True,
            None,
            "decoder buckets under a causal mask: masked entries add nothing to the table gradient",
            lambda: check_attention_backward(
                sdpa_backward(t5_params(dec), causal=True, scale=1.0), bias=t5_dec, causal=True, scale=1.0, xp="torch"
            ),
        )
    )
    rng = np.random.default_rng(0)
    r1, r2 = rng.uniform(0.1, 1.5, 8), rng.uniform(0.2, 1.9, 8)
    for form, fam in (("power", KerplePower(r1, r2)), ("log", KerpleLog(r1, r2))):
        for dtype in ("float32", "float64"):
            out.append(
                PeerCase(
                    f"bwd_sdpa_kerple_{form}_causal_{dtype}",
                    sdpa + " from r1, r2 with `requires_grad`",
                    f"`check_attention_backward(bias=Kerple{form.capitalize()}(r1, r2), causal=True, dtype='{dtype}', "
                    "xp='torch')`",
                    True,
                    None,
                    "r1, r2 gradients"
                    + (
                        "; torch's pow backward gives d/dr2 |0|^r2 = 0, relpos_ref's convention"
                        if form == "power"
                        else ""
                    ),
                    lambda form=form, fam=fam, dtype=dtype: check_attention_backward(
                        sdpa_backward(kerple_params(form, r1, r2), causal=True),
                        bias=fam,
                        causal=True,
                        dtype=dtype,
                        xp="torch",
                    ),
                )
            )
    flex = "PyTorch `flex_attention` (eager, CPU) + autograd, `score_mod` capturing"
    out.append(
        PeerCase(
            "bwd_flex_alibi_qkv",
            flex + " slopes with `requires_grad`; q, k, v with `requires_grad`",
            "`check_attention_backward(bias=ALiBi(8), causal=True, xp='torch')`",
            False,
            "does not support backward on CPU",
            "no CPU backward for q, k, v in PyTorch 2.13: `flex_attention` raises before computing anything (eager "
            "and `torch.compile` alike)",
            lambda: check_attention_backward(
                flex_backward("alibi", causal=True, params_only=False), bias=alibi8, causal=True, xp="torch"
            ),
        )
    )
    no_qkv = {
        "backward.d[qkv].*": "FlexAttention has no CPU backward for q, k, v",
        "backward.causal_future_keys": "needs dk, dv",
        "backward.fully_masked_rows": "needs dq",
    }
    for dtype in ("float32", "float64"):
        out.append(
            PeerCase(
                f"bwd_flex_alibi_params_{dtype}",
                flex + " slopes with `requires_grad`; q, k, v without",
                f"`check_attention_backward(bias=ALiBi(8), causal=True, dtype='{dtype}', xp='torch', "
                "expected_failures={'backward.d[qkv].*': ..., 'backward.causal_future_keys': ..., "
                "'backward.fully_masked_rows': ...})`",
                True,
                None,
                "gradients do flow to tensors captured by the `score_mod` on CPU when q, k, v do not require grad: "
                "the slopes' gradient passes in every case; dq, dk, dv (not returned) are declared known divergences",
                lambda dtype=dtype: check_attention_backward(
                    flex_backward("alibi", causal=True, params_only=True),
                    bias=alibi8,
                    causal=True,
                    dtype=dtype,
                    xp="torch",
                    expected_failures=no_qkv,
                ),
            )
        )
    no_qkv_full = {k: v for k, v in no_qkv.items() if k.startswith("backward.d")}
    for dtype in ("float32", "float64"):
        out.append(
            PeerCase(
                f"bwd_flex_t5_params_{dtype}",
                flex + " the HF T5 weight with `requires_grad`; q, k, v without",
                "`check_attention_backward(bias=T5Bias(weight, bidirectional=True, layout='buckets_heads'), scale=1.0, "
                f"dtype='{dtype}', xp='torch', expected_failures={{'backward.d[qkv].*': ...}})`",
                True,
                None,
                "the table gradient through `table[bucket, h]` indexing in the `score_mod` (a scatter-add in the "
                "backward) passes; dq, dk, dv declared known divergences",
                lambda dtype=dtype: check_attention_backward(
                    flex_backward("t5", causal=False, layer=enc, params_only=True),
                    bias=t5_enc,
                    scale=1.0,
                    dtype=dtype,
                    xp="torch",
                    expected_failures=no_qkv_full,
                ),
            )
        )
    plain = "Materialised attention in PyTorch (`torch.softmax`) + autograd, ALiBi slopes with `requires_grad`"
    plain_cases = (
        (
            "additive",
            "nan",
            True,
            None,
            "causal mask added as 0/-inf: a query that sees no key has a NaN softmax row, and its NaN reaches dq, dk, "
            "dv of its (batch, kv head) and every parameter gradient, as fully_masked='nan' states; everything else "
            "agrees at float64 accuracy",
        ),
        (
            "masked_fill",
            "zero",
            False,
            "NaN in dv only",
            "causal mask by `masked_fill`: its backward zeroes the cotangent of masked entries, so the NaN rows stop "
            "before dq, dk and the slopes (all right) but reach dv = P^T dO: neither convention",
        ),
        (
            "masked_fill",
            "nan",
            False,
            "masked_fill",
            "the same candidate against fully_masked='nan': its empty dq rows are 0, not NaN",
        ),
    )
    for mask, fully_masked, ok, phrase, meaning in plain_cases:
        out.append(
            PeerCase(
                f"bwd_plain_alibi_causal_float64_{mask}_{fully_masked}",
                plain + f", causal mask {'added as -inf' if mask == 'additive' else 'by `masked_fill`'}",
                "`check_attention_backward(bias=ALiBi(8), causal=True, dtype='float64', xp='torch', "
                f"fully_masked='{fully_masked}')`",
                ok,
                phrase,
                meaning,
                lambda mask=mask, fully_masked=fully_masked: check_attention_backward(
                    plain_autograd(alibi_params(8), causal=True, mask=mask),
                    bias=alibi8,
                    causal=True,
                    dtype="float64",
                    xp="torch",
                    fully_masked=fully_masked,
                ),
            )
        )
    out.append(
        PeerCase(
            "bwd_plain_t5_float64",
            "Materialised attention in PyTorch (`torch.softmax`) + autograd, HF `T5Attention.compute_bias`",
            "`check_attention_backward(bias=T5Bias(weight, bidirectional=True, layout='buckets_heads'), scale=1.0, "
            "dtype='float64', xp='torch')`",
            True,
            None,
            "float64 autograd of the plain computation passes every check, the table gradient included",
            lambda: check_attention_backward(
                plain_autograd(t5_params(enc), causal=False, scale=1.0),
                bias=t5_enc,
                scale=1.0,
                dtype="float64",
                xp="torch",
            ),
        )
    )
    return out


def run_case(case: PeerCase) -> tuple[Report, float]:
    t0 = time.perf_counter()
    report = case.run()
    return report, time.perf_counter() - t0


def _verdict_text(report: Report) -> tuple[str, str]:
    if report.passed:
        worst = max((c.max_abs for c in report.checks if c.max_abs is not None), default=None)
        return "PASS", "-" if worst is None else f"{worst:.1e}"
    failed = report.failures
    head = f"FAIL ({len(failed)}/{len(report.checks)})"
    if len(failed) == len(report.checks) and all(c.status == "error" for c in failed):
        return head, "all checks: the candidate raised"
    return head, ", ".join(sorted({c.name.split(".", 1)[1] for c in failed}))


def _diagnosis(report: Report) -> str:
    """The distinct diagnoses of the failed checks (numbers ignored when comparing), at most two."""
    seen: dict[str, str] = {}
    for c in report.failures:
        # An error's summary ends with the file and line that raised: a path of this machine, left out of the table.
        for d in c.diagnosis or ([re.sub(r" \(at [^()]*\)$", "", c.summary)] if c.status == "error" else []):
            key = d.split(" [")[0].split(":")[0]
            seen.setdefault(key, d if len(d) <= 300 else d[:297] + "...")
    return "; ".join(list(seen.values())[:2])


def markdown(results: list[tuple[PeerCase, Report, float]], elapsed: float) -> str:
    import torch
    import transformers

    lines = [
        "# Peers' verdicts",
        "",
        "The conformance harness (`relpos_ref.conformance`) run on real implementations. Every candidate calls the",
        "peer's own function; only the glue from the harness's positions or q, k, v to the peer's arguments is ours",
        "(`relpos_ref/conformance/peers.py`). A FAIL is a convention difference unless the verdict says otherwise;",
        "the diagnosis is the harness's own. `tests/test_peers.py` (marker `peers`) asserts every verdict below.",
        "",
        "Regenerate with `python -m relpos_ref.conformance.peers --write spec/peers.md` (needs the `peers` extra).",
        "",
        f"Generated with PyTorch {torch.__version__}, transformers {transformers.__version__}, NumPy "
        f"{np.__version__}, Python {platform.python_version()} on {platform.machine()} CPU; {len(results)} cases in "
        f"{elapsed:.1f} s.",
        "",
        "| # | peer | harness call | verdict | max abs err / failed checks | meaning | harness diagnosis |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, (case, report, _) in enumerate(results, 1):
        verdict, extra = _verdict_text(report)
        diag = _diagnosis(report) or "-"
        cells = [str(n), case.peer, case.call, f"**{verdict}**", extra, case.meaning, diag]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    lines += [
        "",
        "Reading the table:",
        "",
        "- *max abs err* is the largest error over all checks of a passing case (bias entries, attention outputs,",
        "  lse, gradients), against the float64 reference; the tolerance rule is in",
        "  [tolerances.md](tolerances.md#conformance-tolerance-rule).",
        "- Attention cases use the harness's default shapes: square, Sq < Sk, decode (Sq = 1), grouped-query heads",
        "  (8 query heads on 4 kv heads), Sq > Sk (fully masked rows under a causal mask) and large logits.",
        "- Bias cases compare a main block (Sq = 8, Sk = 24, bottom-right), a KV-cache decode row, a chunked-prefill",
        "  block and an offset probe, plus offset-only dependence, monotonicity (ALiBi) and repeatability.",
        "- Backward cases (`bwd_*`, `check_attention_backward`) hand q, k, v and an output cotangent d_out to",
        "  `torch.autograd.grad` through the peer and compare dq, dk, dv and each parameter gradient returned with",
        "  `relpos_ref.attention_vjp` in float64 on the same shapes, plus zero dk, dv for keys no query with a",
        "  cotangent sees, the dq rows of queries that see no key, and repeatability. A PASS with declared",
        "  `expected_failures` passes every other check; the declared ones fail as stated.",
        "",
    ]
    return "\n".join(lines)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m relpos_ref.conformance.peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--write", metavar="PATH", help="write the markdown verdict table to PATH")
    p.add_argument("--only", action="append", metavar="KEY", help="run only these case keys (repeatable)")
    p.add_argument("--verbose", action="store_true", help="print every report in full")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    results = []
    mismatched = []
    for case in cases():
        if args.only and case.key not in args.only:
            continue
        report, secs = run_case(case)
        results.append((case, report, secs))
        verdict, extra = _verdict_text(report)
        expected = "as recorded" if report.passed == case.expect_pass else "UNEXPECTED"
        if report.passed != case.expect_pass:
            mismatched.append(case.key)
        print(f"{case.key:<34} {verdict:<14} {secs:6.2f} s  {expected}  {extra}")
        if args.verbose or report.passed != case.expect_pass:
            print(report.text())
    elapsed = time.perf_counter() - t0
    text = markdown(results, elapsed)
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
        print(f"wrote {args.write}")
    print(
        f"{len(results)} cases in {elapsed:.1f} s; {len(mismatched)} differ from the recorded expectation"
        + (f": {mismatched}" if mismatched else "")
    )
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
