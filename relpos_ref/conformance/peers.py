"""Run the conformance harness on real peer implementations and write their verdicts.

.. code-block:: console

    pip install "relpos_ref[peers]"            # PyTorch (CPU is enough) and HF transformers
    python -m relpos_ref.conformance.peers                      # print the verdict table
    python -m relpos_ref.conformance.peers --write spec/peers.md

Every candidate calls the peer library's own function (HF ``T5Attention._relative_position_bucket`` and
``compute_bias``, HF BLOOM ``build_alibi_tensor``, ``torch.nn.functional.scaled_dot_product_attention``, PyTorch
FlexAttention in eager mode on CPU with a ``score_mod``); only the glue that turns the harness's positions or q, k, v
into the peer's arguments is written here. Each case records the verdict it is expected to get (``expect_pass`` and a
phrase of the diagnosis), which ``tests/test_peers.py`` asserts, so the table in ``spec/peers.md`` cannot drift from
what the harness says.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..alibi import ALiBi, alibi_slopes
from ..t5 import T5Bias
from .attention import check_attention
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
    return f"FAIL ({len(failed)}/{len(report.checks)})", ", ".join(sorted({c.name.split(".", 1)[1] for c in failed}))


def _diagnosis(report: Report) -> str:
    """The distinct diagnoses of the failed checks (numbers ignored when comparing), at most two."""
    seen: dict[str, str] = {}
    for c in report.failures:
        for d in c.diagnosis or ([c.summary] if c.status == "error" else []):
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
        "  lse), against the float64 reference; the tolerance rule is in",
        "  [tolerances.md](tolerances.md#conformance-tolerance-rule).",
        "- Attention cases use the harness's default shapes: square, Sq < Sk, decode (Sq = 1), grouped-query heads",
        "  (8 query heads on 4 kv heads), Sq > Sk (fully masked rows under a causal mask) and large logits.",
        "- Bias cases compare a main block (Sq = 8, Sk = 24, bottom-right), a KV-cache decode row, a chunked-prefill",
        "  block and an offset probe, plus offset-only dependence, monotonicity (ALiBi) and repeatability.",
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
