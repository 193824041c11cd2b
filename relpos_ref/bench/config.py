"""What a bench run measures: family and backend names, shapes and their FLOP/byte counts, inputs, config, targets."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .._host import numpy_dtype
from ..families import FAMILIES as REGISTRY
from ..families import BiasFamily, example_family

__all__ = [
    "BACKENDS",
    "DEFAULT_FAMILIES",
    "FAMILIES",
    "GPU_BACKENDS",
    "MiB",
    "SCHEMA",
    "TARGET_SHAPE",
    "BenchConfig",
    "Shape",
    "attended_pairs",
    "attention_flops",
    "bench_dtype",
    "make_family",
    "make_inputs",
    "min_bytes",
    "target_checks",
]

#: Every registered family with a closed form (the tensor bias has none), in registry order.
DEFAULT_FAMILIES: tuple[str, ...] = tuple(n for n in REGISTRY if n != "tensor")
#: What ``--families`` accepts: the families, and ``"none"`` (attention without a bias).
FAMILIES: tuple[str, ...] = (*DEFAULT_FAMILIES, "none")
BACKENDS = ("numpy", "cupy", "cupy-fused", "sdpa-cpu", "sdpa-cuda", "flex-cpu", "flex-cuda")
GPU_BACKENDS = ("cupy", "cupy-fused", "sdpa-cuda", "flex-cuda")
SCHEMA = "relpos_ref.bench/1"
MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Shape:
    """One attention problem: q (B, H, Sq, D), k and v (B, H_kv, Sk, D); causal with bottom-right alignment."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    causal: bool = True

    @property
    def kind(self) -> str:
        return "decode" if self.q_len == 1 and self.k_len > 1 else "prefill"

    def label(self) -> str:
        kv = f"/{self.kv_heads}" if self.kv_heads != self.heads else ""
        return f"B{self.batch} H{self.heads}{kv} Sq{self.q_len} Sk{self.k_len} D{self.head_dim}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The shape of the CPU targets: S = 4096, B = 1, H = 8, D = 64.
TARGET_SHAPE = Shape(1, 8, 8, 4096, 4096, 64)


def attended_pairs(shape: Shape) -> int:
    """Number of (query, key) pairs a causal bottom-right mask keeps (all Sq * Sk without ``causal``)."""
    sq, sk = shape.q_len, shape.k_len
    if not shape.causal:
        return sq * sk
    # Query i (0-based) sits at position sk - sq + i and sees max(0, sk - sq + i + 1) keys.
    if sk >= sq:
        return sq * (sk - sq + 1) + sq * (sq - 1) // 2
    return sk * (sk + 1) // 2


def attention_flops(shape: Shape) -> float:
    r"""FLOPs of the two products :math:`QK^\top` and :math:`PV` (a multiply-add counts 2).

    Causal square attention uses the FlashAttention benchmark convention :math:`4 B H S^2 D / 2`; other shapes count
    the attended pairs exactly, :math:`4 B H D \cdot \#\text{pairs}`.
    """
    b, h, d = shape.batch, shape.heads, shape.head_dim
    if shape.causal and shape.q_len == shape.k_len:
        return 4.0 * b * h * shape.q_len * shape.k_len * d / 2
    return 4.0 * b * h * d * attended_pairs(shape)


def min_bytes(shape: Shape, itemsize: int) -> int:
    """Bytes any implementation must move: q, K and V read once and the output written once."""
    b, h, hkv, d = shape.batch, shape.heads, shape.kv_heads, shape.head_dim
    return itemsize * b * (2 * h * shape.q_len * d + 2 * hkv * shape.k_len * d)


def bench_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a bench run: float32 or float64."""
    if name not in ("float32", "float64"):
        msg = f"dtype: expected 'float32' or 'float64', got {name!r}"
        raise ValueError(msg)
    return numpy_dtype(name)


def make_family(
    name: str, num_heads: int, head_dim: int, *, dtype: Any = np.float32, seed: int = 0
) -> BiasFamily | None:
    """The project's seeded example of family ``name`` (``example_family``) in ``dtype``; None for ``"none"``."""
    if name == "none":
        return None
    return example_family(name, num_heads, head_dim=head_dim, seed=seed, dtype=dtype)


def make_inputs(shape: Shape, dtype: Any, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded standard normal q, k and v of ``shape`` in ``dtype``."""
    rng = np.random.default_rng([seed, shape.q_len, shape.k_len])
    b, h, hkv, d = shape.batch, shape.heads, shape.kv_heads, shape.head_dim
    q = rng.standard_normal((b, h, shape.q_len, d), dtype=np.float32).astype(dtype, copy=False)
    k = rng.standard_normal((b, hkv, shape.k_len, d), dtype=np.float32).astype(dtype, copy=False)
    v = rng.standard_normal((b, hkv, shape.k_len, d), dtype=np.float32).astype(dtype, copy=False)
    return q, k, v


@dataclasses.dataclass
class BenchConfig:
    families: tuple[str, ...] = DEFAULT_FAMILIES
    backends: tuple[str, ...] | None = None  # None: every available backend except flex-cpu in quick mode
    seq_lens: tuple[int, ...] = (512, 1024, 2048, 4096)
    decode_lens: tuple[int, ...] = (4096, 16384)
    batch: int = 1
    heads: int = 8
    kv_heads: int | None = None
    head_dim: int = 64
    dtype: str = "float32"
    reps: int = 5
    warmup: int = 1
    budget_s: float = 20.0
    memory: bool = True
    targets: bool = True
    matrix: bool = True
    long_len: int = 32768
    seed: int = 0
    numpy_max_len: int | None = None  # skip the NumPy reference above this Sk (GPU runs)
    attn_kwargs: dict = dataclasses.field(default_factory=dict)
    quick: bool = False
    gpu: bool = False
    progress: bool = True
    subprocess_timeout_s: float = 1800.0
    roofline_gemm_n: int = 2048
    roofline_copy_mib: int = 128

    @classmethod
    def quick_config(cls, *, gpu: bool = False) -> BenchConfig:
        if gpu:
            return cls(
                families=("alibi", "t5"),
                backends=("numpy", *GPU_BACKENDS),
                seq_lens=(1024, 4096),
                decode_lens=(16384,),
                reps=5,
                budget_s=5.0,
                targets=False,
                numpy_max_len=1024,
                quick=True,
                gpu=True,
            )
        return cls(
            families=("alibi", "t5"),
            seq_lens=(256, 512, 1024),
            decode_lens=(4096,),
            reps=3,
            budget_s=3.0,
            targets=False,
            quick=True,
        )

    @classmethod
    def gpu_config(cls) -> BenchConfig:
        return cls(
            backends=("numpy", *GPU_BACKENDS),
            seq_lens=(1024, 2048, 4096, 8192, 16384),
            decode_lens=(16384, 65536),
            reps=10,
            numpy_max_len=2048,
            targets=False,
            gpu=True,
        )

    def shapes(self) -> list[Shape]:
        hkv = self.kv_heads or self.heads
        out = [Shape(self.batch, self.heads, hkv, s, s, self.head_dim) for s in self.seq_lens]
        out += [Shape(self.batch, self.heads, hkv, 1, s, self.head_dim) for s in self.decode_lens]
        return out


def target_checks(t: dict) -> list[dict]:
    """The CPU targets, each with its value measured in the targets result ``t``, its limit and whether it is met."""
    rows = []

    def add(name: str, value: float | None, limit: float, better: str, unit: str = "") -> None:
        met = None if value is None else (value <= limit if better == "<=" else value >= limit)
        rows.append({"target": name, "measured": value, "limit": limit, "op": better, "unit": unit, "met": met})

    add("time(rp.attention) / time(SDPA + float ALiBi mask), S=4096", t.get("time_ratio"), 0.8, "<=")
    add("fraction of causal-FLOP roofline (NumPy 2048^2 GEMM rate), S=4096", t.get("roofline_fraction"), 0.5, ">=")
    add("peak extra memory rp.attention / SDPA-with-mask, S=4096", t.get("memory_ratio"), 0.25, "<=")
    peak = t.get("long", {}).get("process_peak_rss_bytes")
    add(
        f"process peak RSS at S={t.get('long', {}).get('shape', {}).get('q_len', '?')}, H=1",
        None if peak is None else peak / 2**30,
        2.0,
        "<=",
        "GiB",
    )
    return rows
