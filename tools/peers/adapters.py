"""Peer candidates: glue from the harness's positions or q, k, v to PyTorch and HF transformers functions.

Every candidate calls the peer library's own function (HF ``T5Attention._relative_position_bucket`` and
``compute_bias``, HF BLOOM ``build_alibi_tensor``, ``torch.nn.functional.scaled_dot_product_attention``, PyTorch
FlexAttention in eager mode on CPU with a ``score_mod``). Backward candidates are ``torch.autograd.grad`` through those
peers (and through a plain materialised attention), with the bias parameters as leaf tensors that require grad.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

import relpos_ref as rp

__all__ = [
    "BiasBuilder",
    "alibi_params",
    "bloom_alibi",
    "fa_attention_ref",
    "flex_alibi",
    "flex_backward",
    "flex_t5",
    "hf_bucket",
    "hf_compute_bias",
    "hf_t5_attention",
    "kerple_params",
    "plain_autograd",
    "sdpa_alibi",
    "sdpa_backward",
    "sdpa_causal",
    "t5_params",
    "vllm_ref_paged_attn",
    "xformers_mask_attention",
]


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
        slopes = torch.tensor(np.asarray(rp.alibi_slopes(h)), dtype=torch.float64)
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
        slopes = torch.tensor(np.asarray(rp.alibi_slopes(h)), dtype=q.dtype)
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
        m = torch.tensor(np.asarray(rp.alibi_slopes(heads)), dtype=dtype, requires_grad=True)
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
            m = torch.tensor(np.asarray(rp.alibi_slopes(q.shape[1])), dtype=q.dtype, requires_grad=True)
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


# -- kernel test references, written in torch from their documented steps ------------------------------------


def _fa_local_mask(sq: int, sk: int, window: tuple[int, int], lq: Any, lk: Any, *, mutant: str | None) -> Any:
    """FlashAttention ``construct_local_mask``: True where masked; -1 = unbounded side; per-row Sq, Sk (B, 1, 1, 1).

    ``mutant="top_left"`` drops the ``Sk - Sq`` offset (local indices); ``"left_off_by_one"`` compares the left edge
    with ``<=`` where ``<`` was meant (one key fewer on the left)."""
    torch = _torch()
    row = torch.arange(sq)[:, None]
    col = torch.arange(sk)
    off = 0 if mutant == "top_left" else lk - lq
    left, right = window
    if left < 0:
        return col > row + off + right
    over = col > torch.minimum(row + off + right, lk) if right >= 0 else torch.zeros_like(col > row + off)
    lo = row + off - left
    under = col <= lo if mutant == "left_off_by_one" else col < lo
    return over | under


def fa_attention_ref(
    *,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    causal: bool = False,
    alibi: bool = False,
    mutant: str | None = None,
) -> Callable:
    """FlashAttention's ``tests/test_flash_attn.py::attention_ref`` (with ``construct_local_mask`` and the
    non-causal ``attn_bias_from_alibi_slopes``), (B, S, H, D), upcast to float32, official ALiBi slopes.

    Steps: GQA by repeating kv heads (query head h uses kv head h // g); scores = (q / sqrt(d)) . k; softcap
    c tanh(s / c) on them; key padding and the local window as -inf (bottom-right per row with the rows' lengths;
    ``causal`` forces right = 0); then the bias -m |i + Sk_b - Sq_b - j|; softmax; rows the window empties and query
    padding rows set to 0. ``mutant="softcap_after_bias"`` caps s + b instead (and the others of ``_fa_local_mask``).
    Called as ``candidate(q, k, v)`` or, with per-row lengths, ``candidate(q, k, v, q_lens=..., k_lens=...)``."""
    torch = _torch()
    if causal:
        window = (window[0], 0)

    def candidate(q: Any, k: Any, v: Any, q_lens: Any = None, k_lens: Any = None) -> Any:
        dtype_og = q.dtype
        q, k, v = q.float(), k.float(), v.float()
        b, sq, h, d = q.shape
        sk = k.shape[1]
        k = k.repeat_interleave(h // k.shape[2], dim=2)
        v = v.repeat_interleave(h // v.shape[2], dim=2)
        lq = torch.full((b,), sq) if q_lens is None else q_lens.long()
        lk = torch.full((b,), sk) if k_lens is None else k_lens.long()
        lq4, lk4 = lq[:, None, None, None], lk[:, None, None, None]
        scores = torch.einsum("bthd,bshd->bhts", q / d**0.5, k)
        bias = None
        if alibi:
            slopes = torch.tensor(np.asarray(rp.alibi_slopes(h)), dtype=torch.float32)[None, :, None, None]
            rel = (torch.arange(sq)[:, None] + lk4 - lq4 - torch.arange(sk)).abs()
            bias = -slopes * rel.to(torch.float32)
        if softcap > 0 and mutant != "softcap_after_bias":
            scores = torch.tanh(scores / softcap) * softcap
        if mutant == "softcap_after_bias":
            scores = torch.tanh((scores + bias) / softcap) * softcap
            bias = None
        key_pad = torch.arange(sk)[None, :] >= lk[:, None]
        scores = scores.masked_fill(key_pad[:, None, None, :], float("-inf"))
        local = None
        if window[0] >= 0 or window[1] >= 0:
            local = _fa_local_mask(sq, sk, window, lq4, lk4, mutant=mutant)
            scores = scores.masked_fill(local, float("-inf"))
        if bias is not None:
            scores = scores + bias
        attention = torch.softmax(scores, dim=-1)
        if local is not None:
            attention = attention.masked_fill(local.all(dim=-1, keepdim=True), 0.0)
        q_pad = (torch.arange(sq)[None, :] >= lq[:, None])[:, None, :, None]
        attention = attention.masked_fill(q_pad, 0.0)
        out = torch.einsum("bhts,bshd->bthd", attention, v)
        out = out.masked_fill(q_pad.permute(0, 2, 1, 3), 0.0)
        return out.to(dtype_og)

    return candidate


def vllm_ref_paged_attn(*, sliding_window: int | None = None, soft_cap: float | None = None, mutant: str | None = None):
    """vLLM's ``tests/kernels/attention/test_flash_attn.py::ref_paged_attn`` on a (num_blocks, P, H_kv, D) cache.

    Per sequence: q scaled by 1/sqrt(d) in the input dtype; keys and values gathered through the block table and cut
    to ``kv_len``; kv heads repeated (``repeat_interleave``); scores in the input dtype, then float32; causal
    bottom-right mask ``triu(diagonal=kv_len - q_len + 1)``; the sliding-window mask, the complement of
    ``triu(diagonal=kv_len - (q_len + sliding_window) + 1)`` (keys with Delta >= sliding_window masked, i.e.
    ``window=(sliding_window - 1, 0)``); softcap on the scaled scores before the masks; softmax cast to v's dtype.
    ``mutant="window_off_by_one"`` uses ``diagonal=kv_len - (q_len + sliding_window)`` (one key more)."""
    torch = _torch()

    def candidate(q: Any, k_cache: Any, v_cache: Any, block_table: Any, cache_seqlens: Any) -> Any:
        nb, sq, h, d = q.shape
        _, page, hk, _ = k_cache.shape
        table = block_table.long()
        outs = []
        for i in range(nb):
            kv_len = int(cache_seqlens[i])
            qi = q[i] * d**-0.5
            blocks = table[i, : (kv_len + page - 1) // page]
            k = k_cache[blocks].reshape(-1, hk, d)[:kv_len]
            v = v_cache[blocks].reshape(-1, hk, d)[:kv_len]
            if h != hk:
                k, v = (t.repeat_interleave(h // hk, dim=1) for t in (k, v))
            attn = torch.einsum("qhd,khd->hqk", qi, k).float()
            ones = torch.ones(sq, kv_len)
            mask = torch.triu(ones, diagonal=kv_len - sq + 1).bool()
            if sliding_window is not None:
                extra = 0 if mutant == "window_off_by_one" else 1
                mask |= torch.triu(ones, diagonal=kv_len - (sq + sliding_window) + extra).bool().logical_not()
            if soft_cap is not None:
                attn = soft_cap * torch.tanh(attn / soft_cap)
            attn = attn.masked_fill(mask, float("-inf"))
            attn = torch.softmax(attn, dim=-1).to(v.dtype)
            outs.append(torch.einsum("hqk,khd->qhd", attn, v))
        return torch.stack(outs)

    return candidate


def xformers_mask_attention(mask: str, *, window: tuple[int, int] | None = None) -> Callable:
    """An xformers ``attn_bias`` mask materialised on CPU (``.materialize(shape)``) and applied by a float32 softmax
    attention in torch ((B, H, S, D); rows with no key give 0, NaN set to 0 here). ``mask``:
    ``"local_bottom_right"`` (``LocalAttentionFromBottomRightMask(window_left, window_right)``), ``"block_diagonal"``
    or ``"block_diagonal_causal_bottom_right"`` (``BlockDiagonalMask`` / ``BlockDiagonalCausalFromBottomRightMask``
    ``.from_seqlens`` of each row's per-segment q and kv counts, called with segment ids)."""
    torch = _torch()
    from xformers.ops.fmha import attn_bias as ab

    def attend(q: Any, k: Any, v: Any, add: Any) -> Any:
        dt = q.dtype
        q, k, v = q.float(), k.float(), v.float()
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        s = torch.einsum("bhtd,bhsd->bhts", q / q.shape[-1] ** 0.5, k) + add
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        return torch.einsum("bhts,bhsd->bhtd", p, v).to(dt)

    def counts(ids: Any, n: int) -> list[int]:
        return torch.bincount(ids.long(), minlength=n).tolist()  # ids 0..n-1 in contiguous runs, as the cases have

    def candidate(q: Any, k: Any, v: Any, q_segment_ids: Any = None, k_segment_ids: Any = None) -> Any:
        sq, sk = q.shape[2], k.shape[2]
        if mask == "local_bottom_right":
            left, right = window
            m = ab.LocalAttentionFromBottomRightMask(window_left=left, window_right=right)
            return attend(q, k, v, m.materialize((sq, sk), dtype=torch.float32))
        cls = ab.BlockDiagonalMask if mask == "block_diagonal" else ab.BlockDiagonalCausalFromBottomRightMask
        rows = []
        if q_segment_ids is None:  # the dense cases: one segment per row
            q_segment_ids = torch.zeros(q.shape[0], sq, dtype=torch.int32)
            k_segment_ids = torch.zeros(k.shape[0], sk, dtype=torch.int32)
        for b in range(q.shape[0]):
            n = int(k_segment_ids[b].max()) + 1
            m = cls.from_seqlens(q_seqlen=counts(q_segment_ids[b], n), kv_seqlen=counts(k_segment_ids[b], n))
            add = m.materialize((sq, sk), dtype=torch.float32)
            rows.append(attend(q[b : b + 1], k[b : b + 1], v[b : b + 1], add))
        return torch.cat(rows)

    return candidate
