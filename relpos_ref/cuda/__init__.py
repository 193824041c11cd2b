r"""Fused CUDA biased softmax for CuPy arrays, with the bias computed inside the kernel.

:func:`fused_biased_softmax` computes, for scores of shape (B, H, Sq, Sk),

.. math::

    p_{bhij} = \frac{[M_{bhij}]\, e^{z_{bhij}}}{\sum_k [M_{bhik}]\, e^{z_{bhik}}}, \qquad
    z_{bhij} = \begin{cases} s_{bhij}\,\tau + b_h(q_i, k_j) & \text{post\_scale} \\
                             (s_{bhij} + b_h(q_i, k_j))\,\tau & \text{pre\_scale} \end{cases}

in one kernel that reads each score once and writes each probability once (rows up to 32768 keys, or 65536 with the
cluster kernel; longer rows read the scores twice). :math:`b_h(q_i, k_j)` is evaluated from the family's parameters
(``bias.cuh``): no (H, Sq, Sk) bias is materialised except for :class:`relpos_ref.TensorBias` and plain arrays,
which the kernel reads with broadcasting strides. The conventions are those of :func:`relpos_ref.biased_softmax` and
:func:`relpos_ref.positions`.

Rows longer than 8192 keys (float16/float32) or 16384 (float64) can instead go to a kernel that splits each row
over a thread-block cluster of 4 or 8 blocks (compute capability 9.0 and later). It is off by default until it has
been measured on a GPU: set ``RELPOS_REF_CUDA_CLUSTERS=1`` to use it (see :func:`relpos_ref.cuda._source.cluster_policy`
for the tuning syntax). Results are the same to within the documented error model, not bitwise.

Importing this module needs neither CuPy nor CUDA: CuPy is imported on the first call, and kernels are compiled by
NVRTC on first use of each (family, dtype, row-length class), then cached by CuPy in memory and on disk.
"""

from __future__ import annotations

from ._launch import fused_biased_softmax, supported_family
from ._source import all_kernel_names, kernel_source

__all__ = ["all_kernel_names", "fused_biased_softmax", "kernel_source", "supported_family"]
