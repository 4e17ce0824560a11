"""Which kernel runs each integer operation on this machine, as the dispatch of :mod:`nanoopt.kernels` decides.

:func:`kernel_choices` asks the real dispatch (``backend_for`` of small prepared layers, the sparse kernels'
``auto`` rule) rather than restating its rules, so what ``nanoopt info`` prints is what a model would run: the
choice depends on the CPU (AVX2, AVX-VNNI), on ``NANOOPT_DISABLE_AVX2``, on the current backend
(:func:`nanoopt.kernels.set_backend`; the sparse kernels take ``backend=`` per call and run ``"auto"`` in
:class:`~nanoopt.prune.SparseLinear`) and on the layer (dtype, shape, weight range).

>>> from nanoopt.kernels import BACKENDS
>>> choices = kernel_choices()
>>> choices[0].operation, choices[0].backend in BACKENDS
('int8 linear', True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nanoopt import kernels
from nanoopt.kernels import sparse, sparse_avx2
from nanoopt.spec import QuantSpec

__all__ = ["KernelChoice", "kernel_choices"]


@dataclass(frozen=True)
class KernelChoice:
    """One operation, the backend that runs it here, and why (empty when nothing stands in the way)."""

    operation: str  # e.g. "int8 linear"
    backend: str  # "avx2", "numba" or "reference"
    reason: str  # why not a faster backend ("" if none is faster)


def kernel_choices() -> list[KernelChoice]:
    """The backend of each integer operation on this machine under the current backend setting (see the module
    docstring)."""
    forced = kernels.get_backend()
    int8, int16 = QuantSpec(), QuantSpec(bits=16, symmetric=True)
    weights8 = np.ones((8, 64), np.int8)
    choices = []

    def add(operation: str, layer, reason: str | None = None, backend: str | None = None,
            global_setting: bool = True) -> None:
        try:
            backend = backend or layer.backend_for()
        except RuntimeError as error:  # "avx2" forced where it cannot run
            choices.append(KernelChoice(operation, "none", str(error)))
            return
        if global_setting and forced != "auto" and backend == forced:
            reason = f"backend {forced!r} is forced (kernels.set_backend)"
        elif backend == "avx2":
            reason = ""
        choices.append(KernelChoice(operation, backend, reason or ""))

    linear = kernels.prepare_linear(weights8, None, 0, 2**30, 0, 0, int8)
    add("int8 linear", linear, kernels.avx2_obstacle(linear.weights, np.int8))
    linear16 = kernels.prepare_linear(weights8, None, 0, 2**30, 0, 0, int16, x_dtype=np.int16)
    add("16x8 linear (int16 activations)", linear16, kernels.avx2_obstacle(linear16.weights, np.int16))
    wide = kernels.prepare_linear(np.ones((8, 64), np.int16), None, 0, 2**30, 0, 0, int16, x_dtype=np.int16)
    add("16x16 linear", wide, "the AVX2 kernels multiply int8 weights")
    conv = kernels.prepare_conv2d(np.ones((64, 32, 3, 3), np.int8), None, 0, 2**30, 0, 0, int8, padding=1)
    add("int8 conv2d (3x3, 32 -> 64 channels)", conv,
        "the direct Numba loop is faster on few taps or channels" if conv.plan.thin else conv.avx2_obstacle())
    depthwise = kernels.prepare_conv2d(np.ones((32, 1, 3, 3), np.int8), None, 0, 2**30, 0, 0, int8, padding=1,
                                       groups=32)
    add("int8 depthwise conv2d (3x3, 32 channels)", depthwise,
        "the direct Numba loop is faster than im2col + GEMM on depthwise layers")
    portable = "reference" if forced == "reference" else "numba"
    add("int8/int16 add, relu, max and average pooling", None, "Numba kernels only", portable)
    small = "avx2" if sparse_avx2.available() else "numba"  # the sparse kernels take backend= per call
    add(f"sparse CSR matmul, batch <= {sparse.AVX2_MAX_BATCH}", None,
        "AVX2 not available here (or NANOOPT_DISABLE_AVX2 is set)", small, global_setting=False)
    add(f"sparse CSR matmul, batch > {sparse.AVX2_MAX_BATCH}", None, "the portable batch-inner loop is faster there",
        "numba", global_setting=False)
    add("sparse N:M matmul", None, "Numba kernel only", "numba", global_setting=False)
    return choices
