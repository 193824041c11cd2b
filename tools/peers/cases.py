"""The table of peer cases: each peer candidate, the harness call it gets and the verdict it is expected to get."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

import relpos_ref as rp
from relpos_ref.conformance import (
    Report,
    check_attention,
    check_attention_backward,
    check_bias,
    check_buckets,
    check_paged_attention,
)

from .adapters import (
    alibi_params,
    bloom_alibi,
    fa_attention_ref,
    flex_alibi,
    flex_backward,
    flex_t5,
    hf_bucket,
    hf_compute_bias,
    hf_t5_attention,
    kerple_params,
    plain_autograd,
    sdpa_alibi,
    sdpa_backward,
    sdpa_causal,
    t5_params,
    vllm_ref_paged_attn,
    xformers_mask_attention,
)

__all__ = ["PeerCase", "cases"]


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
    needs: str | None = None  # a module the case imports when run (skipped by the tests without it)


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
                hf_compute_bias(enc), rp.T5Bias(w_enc, bidirectional=True, layout="buckets_heads"), q_len=8, k_len=24
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
                hf_compute_bias(dec), rp.T5Bias(w_dec, bidirectional=False, layout="buckets_heads"), q_len=8, k_len=24
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
            lambda: check_bias(
                hf_compute_bias(enc), rp.T5Bias(w_enc, bidirectional=True, layout="heads_buckets"), q_len=8, k_len=24
            ),
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
                lambda h=h: check_bias(bloom_alibi(h), rp.ALiBi.from_num_heads(h), q_len=8, k_len=24),
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
                    bloom_alibi(h), rp.ALiBi.from_num_heads(h), q_len=8, k_len=24, equivalence="row_shift", causal=True
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
            lambda: check_bias(
                bloom_alibi(12), rp.ALiBi.from_num_heads(12), q_len=8, k_len=24, equivalence="row_shift"
            ),
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
                rp.ALiBi.from_num_heads(12),
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
                        sdpa_alibi(causal=causal),
                        bias=rp.ALiBi.from_num_heads(8),
                        causal=causal,
                        dtype=dtype,
                        xp="torch",
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
                    bias=rp.ALiBi.from_num_heads(8),
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
                flex_alibi("blog", causal=True), bias=rp.ALiBi.from_num_heads(8), causal=True, xp="torch"
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
                flex_alibi("gym", causal=True),
                bias=rp.ALiBi.from_num_heads(8),
                causal=True,
                align="top_left",
                xp="torch",
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
                flex_alibi("gym", causal=True), bias=rp.ALiBi.from_num_heads(8), causal=True, xp="torch"
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
                flex_t5(enc), bias=rp.T5Bias(w_enc, bidirectional=True, layout="buckets_heads"), scale=1.0, xp="torch"
            ),
        )
    )
    out.extend(_kernel_cases())
    out.extend(_backward_cases(enc, dec, w_enc, w_dec))
    return out


def _kernel_cases() -> list[PeerCase]:
    """Kernel test references (FlashAttention, vLLM) written in torch from their steps, and xformers' masks."""
    out: list[PeerCase] = []
    alibi8 = rp.ALiBi.from_num_heads(8)
    fa = (
        "FlashAttention `tests/test_flash_attn.py::attention_ref` + `construct_local_mask` "
        "(torch, written from its steps)"
    )
    fa_src = (
        "Dao-AILab/flash-attention `tests/test_flash_attn.py::attention_ref`, `construct_local_mask`, "
        "`attn_bias_from_alibi_slopes` (non-causal form)"
    )
    win, cap = (8, 4), 10.0

    def fa_check(mutant: str | None = None, **kw: Any) -> Report:
        return check_attention(
            fa_attention_ref(window=win, softcap=cap, alibi=True, mutant=mutant),
            bias=alibi8,
            window=win,
            softcap=cap,
            layout="bshd",
            xp="torch",
            **kw,
        )

    for dtype in ("float32", "bfloat16"):
        out.append(
            PeerCase(
                f"fa_ref_window_softcap_alibi_{dtype}",
                fa + ", `window_size=(8, 4)`, `softcap=10`, ALiBi `attn_bias`",
                f"`check_attention(bias=ALiBi(8), window=(8, 4), softcap=10.0, layout='bshd', dtype='{dtype}', "
                "xp='torch')`",
                True,
                None,
                f"{fa_src}: (B, S, H, D), computed in float32 (`upcast`), kv heads repeated (h uses h // g); softcap "
                "on the scaled scores, then the window as -inf (bottom-right, -right <= Delta <= left), then the bias "
                "-m|i + Sk - Sq - j| added; rows the window empties set to 0: relpos_ref's order (softcap, bias, mask)"
                + (
                    "; the bfloat16 output is within FlashAttention's rule against the float64 reference"
                    if dtype == "bfloat16"
                    else ""
                ),
                lambda dtype=dtype: fa_check(dtype=dtype),
            )
        )
    out.append(
        PeerCase(
            "fa_ref_causal_window_softcap",
            fa + ", `causal=True`, `window_size=(16, -1)`, `softcap=5`",
            "`check_attention(causal=True, window=(16, None), softcap=5.0, layout='bshd', xp='torch')`",
            True,
            None,
            f"{fa_src}: `causal` forces right = 0 (so -1 there is no matter); -1 = unbounded, our `None`; empty rows "
            "(Sq > Sk) set to 0 by the reference, fully_masked='zero'",
            lambda: check_attention(
                fa_attention_ref(window=(16, -1), causal=True, softcap=5.0),
                causal=True,
                window=(16, None),
                softcap=5.0,
                layout="bshd",
                xp="torch",
            ),
        )
    )
    out.append(
        PeerCase(
            "fa_ref_varlen_window_softcap_alibi",
            fa + " with `query_padding_mask`, `key_padding_mask` from the lengths",
            "`check_attention(bias=ALiBi(8), window=(8, 4), softcap=10.0, layout='bshd', varlen=True, level='quick', "
            "xp='torch')` (quick: the point is the per-row alignment, not the size)",
            True,
            None,
            f"{fa_src}: with padding masks, Sk and Sq in the window and the ALiBi bias are each row's "
            "`mask.sum(-1)`, so bottom-right is per row (our k_lens, q_lens); padding query rows 0 in the output",
            lambda: fa_check(varlen=True, level="quick"),
        )
    )
    mutants = (
        (
            "fa_ref_window_top_left",
            "top_left",
            "window aligned top-left",
            "mutant: the window measured from local query indices (row i, no Sk - Sq offset, as with SDPA/Flex "
            "`q_idx`) while the bias stays bottom-right; equal only for Sq = Sk",
        ),
        (
            "fa_ref_softcap_after_bias",
            "softcap_after_bias",
            "softcap applied after the bias",
            "mutant: the cap applied to score + ALiBi bias (c tanh((s + b) / c)) instead of before adding the bias, "
            "as FlashAttention's reference and kernels do",
        ),
        (
            "fa_ref_window_off_by_one",
            "left_off_by_one",
            "window off by one on the left",
            "mutant: the left edge masks keys j <= p_i - left instead of j < p_i - left (one key fewer per row)",
        ),
    )
    for key, mutant, phrase, meaning in mutants:
        out.append(
            PeerCase(
                key,
                fa + f", mutant `{mutant}`",
                "`check_attention(bias=ALiBi(8), window=(8, 4), softcap=10.0, layout='bshd', level='quick', "
                "xp='torch')` (quick: the point is the convention)",
                False,
                phrase,
                meaning,
                lambda mutant=mutant: fa_check(mutant, level="quick"),
            )
        )

    vllm = (
        "vLLM `tests/kernels/attention/test_flash_attn.py::ref_paged_attn` (torch, written from its steps), "
        "`sliding_window=32`, `soft_cap=10`"
    )
    vllm_src = "vllm-project/vllm `tests/kernels/attention/test_flash_attn.py::ref_paged_attn`"
    for dtype in ("float32", "bfloat16"):
        out.append(
            PeerCase(
                f"vllm_ref_paged_window_softcap_{dtype}",
                vllm,
                "`check_paged_attention(causal=True, window=(31, 0), softcap=10.0, layout='flash', "
                f"page_block_size=16, dtype='{dtype}', xp='torch')`",
                True,
                None,
                f"{vllm_src}: always causal, bottom-right per sequence (`triu(diagonal=kv_len - q_len + 1)`); the "
                "sliding window keeps Delta <= sliding_window - 1 (the vLLM test passes FlashAttention "
                "`window_size=(sliding_window - 1, 0)`); softcap on the scaled scores before the masks; cache "
                "(num_blocks, page, H_kv, D) read through the block table"
                + ("; scores in bfloat16 then float32, within the bfloat16 rule" if dtype == "bfloat16" else ""),
                lambda dtype=dtype: check_paged_attention(
                    vllm_ref_paged_attn(sliding_window=32, soft_cap=10.0),
                    causal=True,
                    window=(31, 0),
                    softcap=10.0,
                    layout="flash",
                    page_block_size=16,
                    dtype=dtype,
                    xp="torch",
                ),
            )
        )
    out.append(
        PeerCase(
            "vllm_ref_paged_window_off_by_one",
            vllm + ", mutant: window mask `diagonal=kv_len - (q_len + sliding_window)`",
            "`check_paged_attention(causal=True, window=(31, 0), softcap=10.0, layout='flash', page_block_size=16, "
            "xp='torch')`",
            False,
            "window off by one on the left",
            "mutant: the `+ 1` dropped from the sliding-window `triu` diagonal, so sliding_window = 32 keeps 33 keys "
            "(Delta <= 32): the sliding_window vs window_size=(sliding_window - 1, 0) confusion",
            lambda: check_paged_attention(
                vllm_ref_paged_attn(sliding_window=32, soft_cap=10.0, mutant="window_off_by_one"),
                causal=True,
                window=(31, 0),
                softcap=10.0,
                layout="flash",
                page_block_size=16,
                xp="torch",
            ),
        )
    )

    xf = "xformers `fmha.attn_bias` mask `.materialize()` on CPU + float32 softmax attention in torch"
    out.append(
        PeerCase(
            "xformers_local_bottom_right",
            xf + ", `LocalAttentionFromBottomRightMask(window_left=8, window_right=4)`",
            "`check_attention(window=(8, 4), level='quick', xp='torch')` (quick: the point is the convention)",
            True,
            None,
            "facebookresearch/xformers `xformers/ops/fmha/attn_bias.py`: keeps -right <= Delta <= left with "
            "bottom-right positions, our window=(left, right); empty rows (Sq > Sk) give 0 here (NaN set to 0 by the "
            "glue, xformers' mask alone leaves them -inf)",
            lambda: check_attention(
                xformers_mask_attention("local_bottom_right", window=(8, 4)), window=(8, 4), level="quick", xp="torch"
            ),
            needs="xformers",
        )
    )
    out.append(
        PeerCase(
            "xformers_block_diagonal",
            xf + ", `BlockDiagonalMask.from_seqlens` of each row's segments",
            "`check_attention(segments=True, level='quick', xp='torch')` (quick: the point is the convention)",
            True,
            None,
            "facebookresearch/xformers `attn_bias.py` `BlockDiagonalMask`: packed sequences attend only within their "
            "block (q and kv block lengths per segment, 0 allowed for a chunk); dense cases as one block per row",
            lambda: check_attention(
                xformers_mask_attention("block_diagonal"), segments=True, level="quick", xp="torch"
            ),
            needs="xformers",
        )
    )
    return out


def _backward_cases(enc: Any, dec: Any, w_enc: np.ndarray, w_dec: np.ndarray) -> list[PeerCase]:
    """Backward candidates built on PyTorch autograd on CPU, checked with ``check_attention_backward``."""
    out: list[PeerCase] = []
    alibi8 = rp.ALiBi.from_num_heads(8)
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
    t5_enc = rp.T5Bias(w_enc, bidirectional=True, layout="buckets_heads")
    t5_dec = rp.T5Bias(w_dec, bidirectional=False, layout="buckets_heads")
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
    for form, fam in (("power", rp.KerplePower(r1, r2)), ("log", rp.KerpleLog(r1, r2))):
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
