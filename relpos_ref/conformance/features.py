"""Ragged-batch and packed-sequence attention cases (``varlen=True``, ``segments=True`` of ``check_attention``).

A candidate of these suites is called ``candidate(q, k, v, q_lens=..., k_lens=...)`` (padded (B, H, S, D) tensors in
its layout, (B,) int32 lengths) or ``candidate(q, k, v, q_segment_ids=..., k_segment_ids=...)`` ((B, S) int32 ids,
with the positions ``segment_positions`` names). The reference is :func:`relpos_ref.attention` with the same
keywords; every row is compared, padding query rows with 0 (the reference's output there, in both ``fully_masked``
modes) and real rows that see no key with the ``fully_masked`` convention.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .._host import abs_errors
from ..cases import PACKED_CASES, VARLEN_CASES, AttentionShape, to_layout
from ..families import TensorBias
from . import _repro, diagnose
from ._arrays import from_host
from ._core import Check
from .attention import FEATURE_CHECKS, _AttentionSuite
from .options import AttentionOptions
from .report import CheckResult
from .tolerance import _plain_forward, _plain_outputs, worse_of

__all__: list[str] = []


class _FeatureCase(NamedTuple):
    name: str
    shape: AttentionShape
    features: dict[str, np.ndarray]


class _FeatureSuite(_AttentionSuite):
    """The forward suite on cases with per-row lengths or segment ids: the candidate takes them as keywords."""

    def __init__(self, candidate: Any, options: AttentionOptions, *, label: str, kind: str) -> None:
        self.kind, self._current = kind, None
        self.signature = (
            "candidate(q, k, v, q_lens=..., k_lens=...)"
            if kind == "varlen"
            else "candidate(q, k, v, q_segment_ids=..., k_segment_ids=...)"
        )
        super().__init__(candidate, options, label=f"{label}.{kind}")

    def _make_cases(self, shapes: Any) -> dict[str, Any]:
        o = self.options
        h = self.bias64.num_heads if self.bias64 is not None else 6
        g = next((f for f in (2, 3) if h % f == 0 and h // f >= 2), 1) if o.gqa else 1
        group = "quick" if o.level == "quick" else "default"
        dims = sorted(o.head_dims) if o.head_dims else None
        d = 16 if group == "quick" else 64
        d = min(dims, key=lambda x: (abs(x - d), x)) if dims else d
        cases: dict[str, Any] = {}
        self.purposes: dict[str, str] = {}
        if self.kind == "varlen":
            for name, sq, sk, lq, lk, purpose in VARLEN_CASES[group]:
                sh = AttentionShape(len(lq), h, h // g, sq, sk, d)
                cases[name] = _FeatureCase(name, sh, {"q_lens": np.array(lq), "k_lens": np.array(lk)})
                self.purposes[name] = purpose
        else:
            for name, sq, sk, runs, purpose in PACKED_CASES[group]:
                k_ids = np.stack([np.repeat(np.arange(len(r)), r) for r in runs])
                sh = AttentionShape(len(runs), h, h // g, sq, sk, d)
                feats = {"q_segment_ids": k_ids[:, sk - sq :], "k_segment_ids": k_ids}
                cases[name] = _FeatureCase(name, sh, feats)
                self.purposes[name] = purpose
        if o.shapes is not None:
            self.notes.append(f"{self.kind}: its own cases (shapes= applies to the dense cases)")
        for name, c in list(cases.items()):  # inside the declared lengths, or left out with a note
            if (o.max_q_len or c.shape.q_len) < c.shape.q_len or (o.max_k_len or c.shape.k_len) < c.shape.k_len:
                del cases[name]
                self.notes.append(f"{self.kind}.{name}: not run, longer than the declared max_q_len/max_k_len")
        return cases

    def header(self) -> dict[str, Any]:
        return {**super().header(), **self.header_extra()}

    def header_extra(self) -> dict[str, Any]:
        """What the report header adds for these cases: the call, and each case with its lengths or segments."""
        what = "(B,) int32 lengths" if self.kind == "varlen" else "(B, S) int32 segment ids"
        pos = f", segment_positions={self.options.segment_positions}" if self.kind == "segments" else ""
        cases = "; ".join(
            f"{n} {tuple(c.shape)} ({self.purposes[n]}): "
            + ", ".join(
                f"{k}={v.tolist()}" if k.endswith("lens") else f"{k}[{b}] runs {_runs(v[b])}"
                for k, v in c.features.items()
                for b in ([0] if k.endswith("lens") else range(len(v)))
            )
            for n, c in self.cases.items()
        )
        return {f"{self.kind} cases": f"{self.signature} with {what}{pos}: {cases}"}

    # -- the case's keywords -------------------------------------------------------------------------------
    def case_features(self, case: Any) -> dict[str, Any]:
        feats = dict(case.features)
        if self.kind == "segments":
            feats["segment_positions"] = self.options.segment_positions
        return feats

    def row_lengths(self, case: Any, sq: int, sk: int) -> tuple[np.ndarray, np.ndarray]:
        f, nb = case.features, case.shape.batch
        return np.asarray(f.get("q_lens", np.full(nb, sq))), np.asarray(f.get("k_lens", np.full(nb, sk)))

    def row_positions(self, case: Any, e: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(e["q_pos"]), np.asarray(e["k_pos"])

    def positions_of(self, case: Any) -> tuple[np.ndarray, np.ndarray]:
        """Per-row positions (B, Sq), (B, Sk) by the definition (spec/softmax_attention.md, Kernel features)."""
        sh, f = case.shape, case.features
        lq, lk = self.row_lengths(case, sh.q_len, sh.k_len)
        i, j = np.arange(sh.q_len)[None, :], np.arange(sh.k_len)[None, :]
        qp = i + (lk - lq)[:, None] if self.align == "bottom_right" else np.broadcast_to(i, (sh.batch, sh.q_len))
        kp = np.broadcast_to(j, (sh.batch, sh.k_len))
        if self.kind == "segments" and self.options.segment_positions == "restart":
            qp, kp = (_restart(f[n]) for n in ("q_segment_ids", "k_segment_ids"))
        return np.asarray(qp, dtype=np.int64), np.asarray(kp, dtype=np.int64)

    def keep_of(self, case: Any, qp: np.ndarray, kp: np.ndarray) -> np.ndarray:
        """(B, 1, Sq, Sk): causal, window, lengths and segments."""
        sh, f = case.shape, case.features
        keep = diagnose.keep_mask(qp, kp, self.causal, self.window)
        keep = np.ones((sh.batch, sh.q_len, sh.k_len), dtype=bool) if keep is None else keep
        lq, lk = self.row_lengths(case, sh.q_len, sh.k_len)
        keep = keep & (np.arange(sh.q_len)[None, :, None] < lq[:, None, None])
        keep = keep & (np.arange(sh.k_len)[None, None, :] < lk[:, None, None])
        if "q_segment_ids" in f:
            keep = keep & (f["q_segment_ids"][:, :, None] == f["k_segment_ids"][:, None, :])
        return keep[:, None]

    def padding_rows(self, case: Any) -> np.ndarray:
        sh = case.shape
        lq, _ = self.row_lengths(case, sh.q_len, sh.k_len)
        return np.broadcast_to((np.arange(sh.q_len)[None, :] >= lq[:, None])[:, None], (sh.batch, sh.heads, sh.q_len))

    # -- evaluation ----------------------------------------------------------------------------------------
    def reference(self, case: Any, inputs: tuple[np.ndarray, ...], **over: Any) -> tuple[np.ndarray, np.ndarray]:
        return super().reference(
            case, inputs, **{**self.case_features(case), "fully_masked": self.fully_masked, **over}
        )

    def plain(
        self,
        case: Any,
        inputs: Any,
        q_pos: np.ndarray,
        k_pos: np.ndarray,
        dtype: str | None = None,
        *,
        sequential: bool = False,
    ) -> Any:
        """The plain baseline with this case's per-row bias and masks (lengths, segments, causal, window)."""
        bias = None
        if isinstance(self.bias64, TensorBias):
            bias = np.asarray(self.bias64.parameters()["array"])[None]
        elif self.bias64 is not None:
            bias = diagnose.family_bias(self.bias64, q_pos, k_pos)
        q, k, v = (a.astype(np.float64) for a in inputs[:3])
        kw = {"scale": self.scale_of(case.shape), "placement": self.placement, "softcap": self.softcap}
        return _plain_forward(
            q, k, v, bias, self.keep_of(case, q_pos, k_pos), dtype=dtype or self.dtype, sequential=sequential, **kw
        )

    def _expected(self, case: Any) -> dict[str, Any]:
        inputs = self.inputs(case)
        ref_out, ref_lse = self.reference(case, inputs)
        qp, kp = self.positions_of(case)
        bases = [self.plain(case, inputs, qp, kp, sequential=o) for o in {False, self.sequential_baseline()}]
        outs = [_plain_outputs(b) for b in bases]
        base_out = worse_of(ref_out, *(o for o, _ in outs))
        base_lse = worse_of(ref_lse, *(lse for _, lse in outs))
        # Rows the reference leaves NaN (fully_masked="nan"): the baseline agrees there, so they add no error.
        base_out = np.where(np.isnan(ref_out), np.nan, base_out)
        base_lse = np.where(np.isnan(ref_lse), np.nan, base_lse)
        return {
            "inputs": inputs,
            "ref_out": ref_out,
            "ref_lse": ref_lse,
            "base_out": base_out,
            "base_lse": base_lse,
            "empty": np.zeros(ref_lse.shape, dtype=bool),  # every row compared: padding with 0, empty ones by mode
            "q_pos": qp,
            "k_pos": kp,
        }

    def hand_features(self, case: Any) -> dict[str, Any]:
        names = list(case.features)
        arrays = self.hand([np.asarray(case.features[n]) for n in names])
        return dict(zip(names, arrays, strict=True))

    def _got(self, case: Any, e: dict[str, Any]) -> dict[str, Any]:
        out, lse = self.call(e["inputs"], case.shape, **self.hand_features(case))
        return {"out": out, "lse": lse}

    def hand(self, inputs: Any) -> tuple[Any, ...]:
        lay = self.options.layout
        return tuple(
            from_host(
                a if np.issubdtype(a.dtype, np.integer) else to_layout(a, lay), self.xp_kind, self.xp_mod, self.device
            )
            for a in inputs
        )

    def _where(self, what: str, idx: tuple[int, ...], e: dict[str, Any]) -> dict[str, Any]:
        pad = bool(self._padding_of(idx))
        return {"q_pos": int(e["q_pos"][idx[0], idx[2]]), **({"padding_row": True} if pad else {})}

    def _padding_of(self, idx: tuple[int, ...]) -> bool:
        case = self._current
        return bool(self.padding_rows(case)[idx[0], idx[1], idx[2]]) if case is not None else False

    def values_check(self, case: Any, *, lse: bool) -> Any:
        self._current = case
        res = super().values_check(case, lse=lse)
        if not res.passed and res.mismatch is not None and "q_lens" in case.features:
            pad, e = self.padding_rows(case), self.evaluated(case)
            got, ref = (e["lse"], e["ref_lse"]) if lse else (e["out"], e["ref_out"])
            pad = pad if lse else np.broadcast_to(pad[..., None], ref.shape)
            real = (abs_errors(got, ref) <= res.bound)[~pad]
            if pad.any() and real.all():
                res.diagnosis.insert(
                    0,
                    "only padding query rows (i >= q_lens[b]) differ: their "
                    + ("lse must be -inf" if lse else "output must be 0")
                    + " (the reference's in both fully_masked modes); the kernel computed or left them unwritten",
                )
        return res

    def snippet(self, case: Any, index: tuple[int, ...] | None, what: str = "output") -> str:
        opts = {**self.reference_options(), "fully_masked": self.fully_masked}
        if self.kind == "segments":
            opts["segment_positions"] = self.options.segment_positions
        return _repro.attention_snippet(
            self.candidate,
            self.target,
            self.bias64,
            case.shape,
            dtype=self.dtype,
            seed=self.seed,
            xp_name=self.xp_name,
            options=opts,
            index=index,
            with_lse=self.with_lse,
            what=what,
            layout=self.options.layout,
            features=dict(case.features),
        )

    def hypotheses(self, case: Any, e: dict[str, Any]) -> list[tuple[str, Callable[..., Any]]]:
        """The feature hypotheses, then the mask and bias ones that hold per row, on the whole case."""
        hyps = diagnose.feature_hypotheses(self, case, e)

        def whole(label: str, **over: Any) -> None:
            hyps.append(
                (
                    label,
                    lambda rows=slice(None): self.reference(case, e["inputs"], **over) if rows == slice(None) else None,
                )
            )

        if self.causal:
            whole("no causal mask applied", causal=False)
        else:
            whole("a causal mask was applied although causal=False", causal=True)
        if self.bias64 is not None:
            whole("bias ignored", bias=None)
        return hyps


def _runs(ids: np.ndarray) -> list[int]:
    return np.diff(np.flatnonzero(np.r_[True, ids[1:] != ids[:-1], True])).tolist()


def _restart(ids: np.ndarray) -> np.ndarray:
    """Each token's index minus the index of its segment's first token, per row."""
    ids = np.asarray(ids)
    idx = np.broadcast_to(np.arange(ids.shape[-1]), ids.shape)
    start = np.concatenate([np.ones((ids.shape[0], 1), dtype=bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    first = np.maximum.accumulate(np.where(start, idx, 0), axis=1)
    return idx - first


def feature_checks(candidate: Any, options: AttentionOptions, *, label: str = "attention") -> list[Check]:
    """The output (and lse) checks of the varlen and segments cases the options ask for, unrun."""
    checks: list[Check] = []
    for kind in ("varlen", "segments"):
        if not getattr(options, kind):
            continue
        s = _FeatureSuite(candidate, options, label=label, kind=kind)
        if isinstance(options.bias64, TensorBias):
            why = f"a TensorBias has fixed (Sq, Sk); the {kind} cases have their own lengths"
            res = CheckResult(f"{s.label}.output", False, summary=why, status="not_checked")
            checks.append(Check(f"{s.label}.output", f"{kind} cases", lambda r=res: r, s))
            continue
        if not s.cases:
            res = CheckResult(f"{s.label}.output", False, summary="; ".join(s.notes), status="not_checked")
            checks.append(Check(f"{s.label}.output", f"{kind} cases", lambda r=res: r, s))
        checks += s.values_checks(lambda c: f"{c.shape} with {', '.join(c.features)}")
    return checks


FEATURE_CHECKS.append(feature_checks)
