"""The bias families, their registry by name, and one seeded example of each for verify, bench and the tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._checks import integer, namespace_arg
from .base import FAMILIES, BiasFamily, family_class

# isort: off
# Import order is registration order: FAMILIES (and every name list drawn from it) reads alibi, t5, offset,
# kerple_power, kerple_log, fire, sandwich, tensor.
from .alibi import ALiBi, alibi_slopes
from .t5 import T5Bias, t5_bucket, t5_bucket_thresholds
from .offset import OffsetBias
from .kerple import KerpleLog, KerplePower
from .fire import FIRE
from .sandwich import Sandwich
from .tensor_bias import TensorBias

# isort: on

__all__ = [
    "FAMILIES",
    "FIRE",
    "ALiBi",
    "BiasFamily",
    "KerpleLog",
    "KerplePower",
    "OffsetBias",
    "Sandwich",
    "T5Bias",
    "TensorBias",
    "alibi_slopes",
    "example_family",
    "family_class",
    "t5_bucket",
    "t5_bucket_thresholds",
]


def example_family(
    name: str,
    num_heads: int = 4,
    *,
    head_dim: int = 64,
    shape: tuple[int, int] | None = None,
    width: int = 16,
    rng: np.random.Generator | None = None,
    seed: int = 0,
    dtype: Any = None,
    xp: Any = None,
    **options: Any,
) -> BiasFamily:
    r"""A family with seeded, plausible parameters: the one example that verify, bench, the CLI and the tests share.

    Parameters
    ----------
    name : str
        A registry name (``FAMILIES``): alibi, t5, offset, kerple_power, kerple_log, fire, sandwich, tensor.
    num_heads : int
        H.
    head_dim : int
        d, for Sandwich.
    shape : (Sq, Sk), optional
        Required for ``"tensor"`` (the bias array's last two axes).
    width : int
        Hidden width W of FIRE's MLP.
    rng : numpy.random.Generator, optional
        Draw from this generator (in the order the parameters are listed); by default a new generator seeded with
        ``[seed, FAMILIES index of name]``, so each family's draws do not depend on which others are made.
    seed : int
        Seed when ``rng`` is not given.
    dtype, xp : optional
        Parameters are drawn in float64 NumPy and converted once to ``dtype`` (a dtype of ``xp``) and ``xp``.
    **options
        Constructor keywords that replace the example's (``bidirectional``, ``max_distance``, ``c``, ``L``, ``eps``).

    Notes
    -----
    T5: table :math:`\mathcal N(0, 1)^{H \times 32}`, causal (``bidirectional=False``) unless overridden. Offset:
    table :math:`\mathcal N(0, 1)^{H \times 17}` (offsets clipped at 8). ALiBi: the official slopes. KERPLE power:
    :math:`r_1 \sim U(0.05, 1)`, :math:`r_2` evenly spaced in [0.5, 2]. KERPLE log: :math:`r_1 \sim U(0.05, 2)`,
    :math:`r_2 \sim U(0.05, 1)`. FIRE: standard normal MLP weights (output weights / 4), c = 0.1, L = 20, so the
    normaliser :math:`\max(L, i)` takes both branches at small sizes. Sandwich: d = ``head_dim``. Tensor:
    :math:`\mathcal N(0, 1)^{H \times S_q \times S_k}`.
    """
    cls = family_class(name)
    h = integer("num_heads", num_heads, minimum=1)
    if rng is None:
        rng = np.random.default_rng([integer("seed", seed, minimum=0), list(FAMILIES).index(name)])
    if cls is T5Bias:
        opts = {"bidirectional": False, "layout": "heads_buckets", **options}
        fam: BiasFamily = T5Bias(rng.standard_normal((h, 32)), **opts)
    elif cls is OffsetBias:
        fam = OffsetBias(rng.standard_normal((h, 2 * 8 + 1)), **options)
    elif cls is ALiBi:
        fam = ALiBi.from_num_heads(h)
    elif cls is KerplePower:
        fam = KerplePower(rng.uniform(0.05, 1.0, h), np.linspace(0.5, 2.0, h), **options)
    elif cls is KerpleLog:
        fam = KerpleLog(rng.uniform(0.05, 2.0, h), rng.uniform(0.05, 1.0, h), **options)
    elif cls is FIRE:
        w = integer("width", width, minimum=1)
        opts = {"c": 0.1, "L": 20.0, **options}
        weights = (rng.standard_normal((w, 1)), rng.standard_normal(w), rng.standard_normal((h, w)) / 4)
        fam = FIRE(*weights, rng.standard_normal(h), **opts)
    elif cls is Sandwich:
        fam = Sandwich(h, head_dim)
    else:  # TensorBias
        if shape is None:
            msg = "shape: expected (Sq, Sk) for the tensor example, got None"
            raise ValueError(msg)
        fam = TensorBias(rng.standard_normal((h, *shape)))
    if dtype is None and xp is None:
        return fam
    target = namespace_arg(xp)
    return fam.astype(dtype if dtype is not None else target.float64, xp=target)
