"""Integer kernels and the one place that chooses which implementation runs.

Backends, all bit-identical (tested against each other):

* ``"reference"`` -- :mod:`nanoopt.kernels.reference`, pure NumPy in int64: the executable specification;
* ``"numba"`` -- :mod:`nanoopt.kernels.numba_cpu`, portable compiled kernels (any CPU LLVM targets);
* ``"avx2"`` -- the x86 int8 GEMMs: where the CPU has AVX-512 VNNI (with AVX-512F/BW), the 512-bit ``vpdpbusd``
  kernel of :mod:`nanoopt.kernels.avx512`, whose int8 linear layers requantize in registers; else the AVX-VNNI
  (256-bit ``vpdpbusd``) or AVX2 (``vpmaddubsw``) kernel of :mod:`nanoopt.kernels.avx2`; with the Numba
  epilogue (zero-point fold, bias, requantization, ReLU) around it. :func:`int8_gemm_kernel` says which
  (:mod:`nanoopt.kernels.x86_glue` holds the drivers around whichever runs).

``"auto"`` (the default) runs a layer on ``"avx2"`` when the CPU has it and the layer fits it (int8
activations, narrow-range weights in [-127, 127], ``K <= avx2.MAX_K_S8``; 16x8 layers use its int16
kernel), else on ``"numba"``; int8 convolutions with few taps or few channels per group run Numba's direct
"thin" loop, faster there than im2col + any GEMM (:mod:`nanoopt.kernels.thin_conv`). Choose with
:func:`set_backend` or, for a block of code, :func:`use_backend`. "The CPU has it" is decided at run time,
without compiling anything, from the CPU, Numba's target and the ``NANOOPT_CPU_FEATURES`` override
(:func:`nanoopt.kernels.cpu_features.usable_features`): e.g. ``NANOOPT_CPU_FEATURES=avx2`` runs the AVX2
kernel where the CPU also has AVX-VNNI, ``NANOOPT_CPU_FEATURES=none`` the portable kernels only.

Layers prepare their constant operands once: :func:`prepare_linear` / :func:`prepare_conv2d` validate the
parameters, pack the weights (for every backend that may run them) and return a callable; calling it with
the integer input checks only that input; :func:`prepare_gemm` does the same for a raw integer GEMM. The
functions with the reference's signatures (:func:`gemm_s8s8s32`, :func:`quantized_linear`,
:func:`quantized_conv2d`, ...) are the one entry point for each operation: they validate, then dispatch the same
way, and accept either plain weights or a :class:`PreparedWeights`. This module only chooses and dispatches; the
kernels live in the modules named above, each of which imports only from below it.

>>> import numpy as np
>>> from nanoopt.spec import QuantSpec
>>> layer = prepare_linear(np.array([[2, 1], [-1, 4]], np.int8), None, 0, 2**30, 0, 0, QuantSpec())
>>> with use_backend("reference"):
...     layer(np.array([[10, -3]], np.int8))
array([[  9, -11]], dtype=int8)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numba
import numpy as np

from nanoopt.kernels import (
    avx2,
    avx2_linear,
    avx2_operands,
    avx512,
    numba_cpu,
    numba_pointwise,
    reference,
    x86_glue,
)
from nanoopt.kernels.avx2_requant import requantize_rows_s8
from nanoopt.kernels.numba_epilogue import kernel_dtype
from nanoopt.kernels.numba_gemm import MAX_FUSED_K, TILE_COLUMNS, gemm_products, pack_weights, use_threads
from nanoopt.kernels.reference import AccumulatorOverflowError, accumulator_bound, int32_accumulation_is_safe
from nanoopt.kernels.x86_glue import AVX2_PARALLEL_MIN_ROWS
from nanoopt.spec import QuantSpec

BACKENDS = ("auto", "avx2", "numba", "reference")

_state = threading.local()

__all__ = [
    "AVX2_PARALLEL_MIN_ROWS",
    "BACKENDS",
    "AccumulatorOverflowError",
    "PreparedConv2d",
    "PreparedGemm",
    "PreparedLinear",
    "PreparedWeights",
    "accumulator_bound",
    "avx2_available",
    "avx2_obstacle",
    "gemm_s8s8s32",
    "gemm_s16s8s64",
    "gemm_s16s16s64",
    "get_backend",
    "int8_gemm_kernel",
    "int32_accumulation_is_safe",
    "prepare_conv2d",
    "prepare_gemm",
    "prepare_linear",
    "prepare_weights",
    "quantized_add",
    "quantized_avg_pool2d",
    "quantized_conv2d",
    "quantized_linear",
    "quantized_max_pool2d",
    "quantized_relu",
    "set_backend",
    "use_backend",
]


# ------------------------------------------------------------------------------------------ backend choice
def set_backend(name: str) -> None:
    """Choose the backend for this thread: ``"auto"``, ``"avx2"``, ``"numba"`` or ``"reference"``.

    Forcing ``"avx2"`` where it cannot run raises when a layer is called, naming the reason.

    >>> set_backend("numba"); get_backend()
    'numba'
    >>> set_backend("auto")
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _state.backend = name


def get_backend() -> str:
    """The backend chosen for this thread (``"auto"`` unless set).

    >>> get_backend()
    'auto'
    """
    return getattr(_state, "backend", "auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block of code with another backend, then restore the previous one.

    >>> with use_backend("reference"):
    ...     get_backend()
    'reference'
    """
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _avx512_module():
    """:mod:`nanoopt.kernels.avx512` where its 512-bit kernels run (AVX2 and AVX-512F/BW/VNNI in the CPU, Numba's
    target and ``NANOOPT_CPU_FEATURES``; checked once: compiles them), else ``None``."""
    return avx512 if avx512.available() else None


def int8_gemm_kernel() -> str:
    """The int8 GEMM the ``"avx2"`` backend runs here: ``"avx512-vnni"``, ``"avx-vnni"``, ``"avx2"``, or ``"none"``
    (no x86 int8 kernel is available: ``"auto"`` runs ``"numba"``). Decided once per process, by the self-test of
    the kernel that would run (:func:`nanoopt.kernels.x86_glue.s8_kernel`).

    >>> int8_gemm_kernel() in ("avx512-vnni", "avx-vnni", "avx2", "none")
    True
    """
    return x86_glue.s8_kernel()


def avx2_available() -> bool:
    """True when the ``"avx2"`` backend's int8 GEMM (:func:`int8_gemm_kernel`) compiles and is exact on this machine
    (checked once per process: compiles that kernel where :mod:`~nanoopt.kernels.cpu_features` allows it; nothing
    x86 is compiled before that says yes). The 16x8 layers also need ``avx2.available()`` (asked when one runs).

    >>> isinstance(avx2_available(), bool)
    True
    """
    return int8_gemm_kernel() != "none"


# ------------------------------------------------------------------------------------------ weights
class PreparedWeights:
    """Integer weights ``(N, K)`` packed once for every backend that may multiply them.

    ``numba``: :class:`nanoopt.kernels.numba_gemm.PackedWeights` (always); the AVX2 packings are made on
    first use.

    >>> weights = prepare_weights(np.array([[1, -128]], np.int8))
    >>> weights.avx2_reason(np.int8)
    'weights use -128 (the AVX2 int8 kernel needs narrow-range [-127, 127])'
    """

    def __init__(self, w_q: np.ndarray):
        self.numba = pack_weights(w_q)
        self.weight = w_q
        self.narrow_range = w_q.dtype == np.int8 and not (w_q.size and int(w_q.min()) < -127)
        self._avx2_s8 = None
        self._avx2_s16 = None

    def avx2_reason(self, x_dtype=np.int8) -> str | None:
        """``None`` when the AVX2 kernels can multiply ``x_dtype`` activations by these weights, else why not."""
        if self.weight.dtype != np.int8:
            return "int16 weights (the AVX2 kernels multiply int8 weights)"
        if np.dtype(x_dtype) == np.int8 and not self.narrow_range:
            return "weights use -128 (the AVX2 int8 kernel needs narrow-range [-127, 127])"
        return None

    def avx2_s8(self) -> avx2.PackedWeightsS8:
        """The int8 AVX2 packing (``avx2.PackedWeightsS8``), made on first use."""
        if self._avx2_s8 is None:
            self._avx2_s8 = avx2.pack_weights_s8(self.weight)
        return self._avx2_s8

    def avx2_s16(self) -> avx2.PackedWeightsS16:
        """The 16x8 AVX2 packing (``avx2.PackedWeightsS16``), made on first use."""
        if self._avx2_s16 is None:
            self._avx2_s16 = avx2.pack_weights_s16(self.weight)
        return self._avx2_s16


def prepare_weights(w_q: np.ndarray) -> PreparedWeights:
    """Pack ``w_q (N, K)`` (int8 or int16, C-contiguous) once; pass the result to the GEMMs/layers.

    >>> prepare_weights(np.ones((3, 4), np.int8)).numba.parts.shape
    (1, 8, 4)
    """
    return w_q if isinstance(w_q, PreparedWeights) else PreparedWeights(w_q)


def avx2_obstacle(weights: PreparedWeights, x_dtype) -> str | None:
    """Why the AVX2 kernels cannot multiply ``x_dtype`` activations by ``weights`` here (``None`` if they can).

    >>> avx2_obstacle(prepare_weights(np.ones((2, 3), np.int16)), np.int16) is not None
    True
    """
    if not (avx2_available() if np.dtype(x_dtype) == np.int8 else avx2.available()):
        return "the AVX2 kernels are not available on this CPU/target (or NANOOPT_DISABLE_AVX2 is set)"
    reason = weights.avx2_reason(x_dtype)
    if reason is not None:
        return reason
    if np.dtype(x_dtype) == np.int8 and weights.numba.k > avx2.MAX_K_S8:
        return f"K = {weights.numba.k} exceeds the AVX2 int32 limit {avx2.MAX_K_S8}"
    return None


def _resolve(weights: PreparedWeights, x_dtype) -> str:
    """The backend that runs a product of ``x_dtype`` activations with ``weights`` now."""
    backend = get_backend()
    if backend == "auto":
        return "numba" if avx2_obstacle(weights, x_dtype) else "avx2"
    if backend == "avx2":
        obstacle = avx2_obstacle(weights, x_dtype)
        if obstacle:
            raise RuntimeError(f"backend 'avx2' was forced but cannot run this layer: {obstacle}")
    return backend


def _avx2_products(weights: PreparedWeights, a: np.ndarray) -> np.ndarray:
    """Exact ``a @ w.T`` with the AVX2 kernels: int32 for int8 ``a``, int64 for int16 ``a``."""
    return x86_glue.products(a, weights.avx2_s8() if a.dtype == np.int8 else weights.avx2_s16())


# ------------------------------------------------------------------------------------------------ GEMMs
class PreparedGemm:
    """``a -> sum_k (a[m, k] - a_zero_point) w[n, k]`` with ``w`` and the zero point validated once.

    int8 ``a`` and int8 ``w``: int32 results (:func:`reference.gemm_s8s8s32`; the int32 bound
    ``max |a - z| * sum_k |w_nk| < 2^31`` is checked here, once); int16 ``a`` with int8 or int16 ``w``: int64
    (:func:`reference.gemm_s16s8s64` / :func:`reference.gemm_s16s16s64`, zero point 0). Per call only ``a`` is
    checked (dtype, two dimensions, K columns; it is made C-contiguous) and the backend is chosen then
    (:func:`get_backend`): the cheap entry for products repeated with the same weights, e.g. one token at a time.
    Made by :func:`prepare_gemm`.
    """

    def __init__(self, w, a_dtype=np.int8, a_zero_point: int = 0) -> None:
        self.weights = prepare_weights(w)
        self.a_dtype = np.dtype(a_dtype)
        packed = self.weights.numba
        self.k, self.n = packed.k, packed.n
        empty = np.zeros((0, self.k), self.a_dtype)
        if self.a_dtype == np.int8:
            reference.check_gemm_args(empty, self.weights.weight, (np.int8,), (np.int8,))
            self.zero_point = reference.check_int(a_zero_point, "a_zero_point", *reference.INT8_RANGE)
            if not reference.int32_safe_from_sign_sums(packed.positive_sums, packed.negative_sums,
                                                       *reference.INT8_RANGE, self.zero_point):  # fmt: skip
                raise AccumulatorOverflowError(f"int8 GEMM with K={self.k} could overflow int32; use "
                                               "quantized_linear (widens) or split K")  # fmt: skip
            self.correction = np.int32(self.zero_point) * packed.row_sums.astype(np.int32)  # fits: bound checked
        elif self.a_dtype == np.int16:
            reference.check_gemm_args(empty, self.weights.weight, (np.int16,), (np.int8, np.int16))
            self.zero_point = reference.check_int(a_zero_point, "a_zero_point", 0, 0)
        else:
            raise TypeError(f"a_dtype must be int8 or int16, got {self.a_dtype}")
        self.out_dtype = np.dtype(np.int32 if self.a_dtype == np.int8 else np.int64)

    def backend_for(self) -> str:
        """The backend a call would use now."""
        return _resolve(self.weights, self.a_dtype)

    def __call__(self, a: np.ndarray) -> np.ndarray:
        if not isinstance(a, np.ndarray) or a.dtype != self.a_dtype or a.ndim != 2 or a.shape[1] != self.k:
            raise TypeError(f"{type(self).__name__} takes {self.a_dtype} codes (M, {self.k}), got "
                            f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")  # fmt: skip
        a = np.ascontiguousarray(a)
        backend = self.backend_for()
        weight = self.weights.weight
        if backend == "reference" or (backend == "numba" and self.a_dtype == np.int16 and self.k > MAX_FUSED_K):
            if self.a_dtype == np.int8:
                return reference.gemm_s8s8s32(a, weight, self.zero_point)
            if weight.dtype == np.int8:
                return reference.gemm_s16s8s64(a, weight)
            return reference.gemm_s16s16s64(a, weight)
        if backend == "numba":  # int32-safe int8 sums imply every tile sum fits int32
            return gemm_products(a, self.weights.numba, self.zero_point, self.out_dtype)
        products = _avx2_products(self.weights, a)
        return products - self.correction if self.a_dtype == np.int8 else products


def prepare_gemm(w, a_dtype=np.int8, a_zero_point: int = 0) -> PreparedGemm:
    """Validate ``w`` (or a :class:`PreparedWeights`) and the activations' zero point once for repeated GEMMs.

    >>> gemm = prepare_gemm(np.array([[3, 4], [-1, 0]], np.int8), np.int8, 1)
    >>> gemm(np.array([[1, 2]], np.int8))
    array([[4, 0]], dtype=int32)
    """
    return PreparedGemm(w, a_dtype, a_zero_point)


def _gemm(a: np.ndarray, w, a_dtype, w_dtypes: tuple, a_zero_point: int = 0) -> np.ndarray:
    """One checked product: the backend first (a forced ``"avx2"`` that cannot run says why), then the arrays."""
    weights = prepare_weights(w)
    _resolve(weights, a_dtype)
    reference.check_gemm_args(a, weights.weight, (a_dtype,), w_dtypes)
    return PreparedGemm(weights, a_dtype, a_zero_point)(a)


def gemm_s8s8s32(a: np.ndarray, w, a_zero_point: int) -> np.ndarray:
    """``sum_k (a - a_zp) w`` as int32 on the current backend (see :func:`reference.gemm_s8s8s32`).

    >>> gemm_s8s8s32(np.array([[1, 2]], np.int8), np.array([[3, 4], [-1, 0]], np.int8), 1)
    array([[4, 0]], dtype=int32)
    """
    return _gemm(a, w, np.int8, (np.int8,), a_zero_point)


def gemm_s16s8s64(a: np.ndarray, w) -> np.ndarray:
    """int16 x int8 -> int64 ``a @ w.T`` on the current backend (see :func:`reference.gemm_s16s8s64`).

    >>> gemm_s16s8s64(np.array([[32767, -32768]], np.int16), np.array([[127, 127]], np.int8))
    array([[-127]])
    """
    return _gemm(a, w, np.int16, (np.int8,))


def gemm_s16s16s64(a: np.ndarray, w) -> np.ndarray:
    """int16 x int16 -> int64 ``a @ w.T`` (reference or Numba; see :func:`reference.gemm_s16s16s64`).

    >>> gemm_s16s16s64(np.array([[-32768]], np.int16), np.array([[-32768]], np.int16))
    array([[1073741824]])
    """
    return _gemm(a, w, np.int16, (np.int16,))


# ------------------------------------------------------------------------------------------- layers
class PreparedLinear:
    """A quantized linear layer (:func:`reference.quantized_linear`) with everything but its input fixed.

    Made by :func:`prepare_linear`; ``layer(x_q)`` runs on the current backend. ``backend_for(x_q)`` says
    which one that is.
    """

    def __init__(self, w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec: QuantSpec,
                 relu: bool = False, x_dtype=np.int8):  # fmt: skip
        self.weights = prepare_weights(w_q)
        self.plan = numba_cpu.LinearPlan(
            self.weights.numba, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, relu, x_dtype
        )  # validates every argument
        self.arguments = (bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, relu)
        self._requant_s8: tuple | None | bool = False  # the fused AVX-512 epilogue's constants; False: not made yet
        self._requant_lanes: tuple | None | bool = False  # the same constants for the 32-bit-lane requantization

    def requant_s8(self) -> tuple | None:
        """The constants of the AVX-512 int8 layer with requantization in registers (``avx512.requant_s8``), or
        ``None`` where that kernel does not run this layer (no AVX-512 VNNI, int16 input or output, or an epilogue
        that needs the wide int64 form). Made on first use."""
        if self._requant_s8 is False:
            plan, avx512 = self.plan, _avx512_module()
            m0, shift, zero_point, low, high, _, fast = plan.tail
            usable = avx512 is not None and fast and plan.x_dtype == np.int8 and plan.out_dtype == np.int8
            self._requant_s8 = None
            if usable:
                self._requant_s8 = avx512.requant_s8(plan.base_offsets, m0, shift, zero_point, low, high)
        return self._requant_s8

    def requant_lanes(self) -> tuple | None:
        """The constants of the requantization in 32-bit lanes after the AVX2 / AVX-VNNI product
        (:mod:`nanoopt.kernels.avx2_requant`, in the ``avx512.requant_s8`` form), or ``None`` where the layer's
        epilogue does not fit int32 (or its input or output is not int8). Made on first use."""
        if self._requant_lanes is False:
            plan = self.plan
            m0, shift, zero_point, low, high, _, fast = plan.tail
            usable = fast and plan.x_dtype == np.int8 and plan.out_dtype == np.int8
            self._requant_lanes = avx512.requant_s8(plan.base_offsets, m0, shift, zero_point, low, high) if usable \
                else None
        return self._requant_lanes

    def backend_for(self, x_q: np.ndarray | None = None) -> str:
        """The backend a call would use now (``x_q`` is not needed: the input dtype is fixed)."""
        return _resolve(self.weights, self.plan.x_dtype)

    def __call__(self, x_q: np.ndarray) -> np.ndarray:
        backend = self.backend_for()
        if backend == "reference":
            self.plan.check_input(x_q)
            return reference.quantized_linear(x_q, self.weights.weight, *self.arguments)
        if backend == "numba":
            return self.plan(x_q)
        self.plan.check_input(x_q)
        if self.requant_s8() is not None:
            return _avx512_linear(self, x_q)
        constants = self.requant_lanes() if x_q.dtype == np.int8 else None
        if constants is not None and x86_glue.s8_kernel() == "avx2" and self.plan.packed.k <= avx2.S8_BLOCK_K and (
                x_q.shape[0] < 2 * AVX2_PARALLEL_MIN_ROWS or numba.get_num_threads() == 1):
            return _avx2_fused_linear(self, x_q, constants)
        products = _avx2_products(self.weights, x_q)
        if constants is None:
            return self.plan.finish(products)
        out = np.empty(products.shape, np.int8)  # (M, N)
        requantize_rows_s8(products, *constants[:6], out)
        return out


def _avx2_fused_linear(layer: PreparedLinear, x_q: np.ndarray, constants: tuple) -> np.ndarray:
    """The int8 layer on plain AVX2, one thread, K within one block: requantized in the register tiles
    (:mod:`nanoopt.kernels.avx2_linear`), the 7-bit tile when every code lies in [-64, 63] (a read-only pass decides,
    so that only the layer of that tile is compiled), else the sign mask."""
    packed = layer.weights.avx2_s8()
    x_q = np.ascontiguousarray(x_q)
    out = np.empty((x_q.shape[0], packed.n), np.int8)  # (M, N)
    shape_only = np.empty((x_q.shape[0], packed.n), np.int32)  # (M, N): the layers check its shape only
    seven_bit = avx2_operands.fits_seven_bit(x_q)
    layer_kernel = avx2_linear.linear_s8_avx2_7bit_into if seven_bit else avx2_linear.linear_s8_avx2_into
    layer_kernel(x_q, packed.panels, packed.n, packed.k, constants, shape_only, out)
    return out


def _avx512_linear(layer: PreparedLinear, x_q: np.ndarray) -> np.ndarray:
    """The int8 layer on the AVX-512 kernel that requantizes in registers (rows split over threads when large)."""
    packed = layer.weights.avx2_s8()
    out = np.empty((x_q.shape[0], packed.n), np.int8)  # (M, N)
    products = np.empty((x_q.shape[0], packed.n), np.int32)  # scratch, used only when K spans several K blocks
    threads = numba.get_num_threads()
    if threads > 1 and x_q.shape[0] >= 2 * AVX2_PARALLEL_MIN_ROWS:
        rows = max(AVX2_PARALLEL_MIN_ROWS, -(-x_q.shape[0] // threads))
        avx512.linear_s8_rows_parallel(x_q, packed.panels, packed.n, packed.k, layer.requant_s8(), products, out,
                                       rows)
    else:
        rows = np.empty(x_q.shape[0] * -(-packed.k // 4) * 4, np.int8)  # the packed rows (the runtime's signature)
        avx512.linear_s8_into(x_q, packed.panels, packed.n, packed.k, layer.requant_s8(), products, out, rows)
    return out


def prepare_linear(w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec: QuantSpec,
                   relu: bool = False, x_dtype=np.int8) -> PreparedLinear:  # fmt: skip
    """Validate and pack a quantized linear layer once; the result is called with the input codes.

    Arguments as :func:`reference.quantized_linear` (``w_q`` may be a :class:`PreparedWeights`), plus the
    activation dtype ``x_dtype`` (int8, or int16 for the 16x8 / 16x16 modes).

    >>> from nanoopt.spec import QuantSpec
    >>> layer = prepare_linear(np.array([[2, 1], [-1, 4]], np.int8), None, 0, 2**30, 0, 0, QuantSpec())
    >>> layer(np.array([[10, -3]], np.int8))
    array([[  9, -11]], dtype=int8)
    """
    return PreparedLinear(w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, relu, x_dtype)


class PreparedConv2d:
    """A quantized conv2d layer (:func:`reference.quantized_conv2d`) with everything but its input fixed.

    On ``"avx2"`` blocks of 256 output pixels are laid out by the Numba im2col, multiplied by the AVX2 GEMM
    and finished by the Numba epilogue into NCHW (:meth:`numba_cpu.Conv2dPlan.external_arguments`), in parallel
    over blocks; grouped convolutions with fewer than 4 output channels per group
    (depthwise) and int16 inputs run on ``"numba"``.
    """

    def __init__(self, w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec: QuantSpec, stride=1,
                 padding=0, dilation=1, groups: int = 1, relu: bool = False, x_dtype=np.int8):  # fmt: skip
        self.plan = numba_cpu.Conv2dPlan(w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, stride,
                                         padding, dilation, groups, relu, x_dtype)  # fmt: skip
        self.weight = self.plan.packed.weight
        self.arguments = (bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, stride, padding, dilation,
                          groups, relu)  # fmt: skip
        out_channels = self.weight.shape[0]
        self.per_group = out_channels // self.plan.groups
        self._group_weights: list[PreparedWeights] | None = None
        self._avx2_panels: np.ndarray | None = None

    def group_weights(self) -> list[PreparedWeights]:
        """Per group, the ``(OC_g, KH*KW*IC_g)`` weight matrix in the im2col's ``(kh, kw, c)`` order."""
        if self._group_weights is None:
            parts = self.plan.packed.parts  # (groups, 1, OC_g padded, depth) for int8 weights
            self._group_weights = [
                PreparedWeights(np.ascontiguousarray(parts[g, 0, : self.per_group])) for g in range(self.plan.groups)
            ]
        return self._group_weights

    def avx2_panels(self) -> np.ndarray:
        """The AVX2 int8 packings of every group, stacked: ``(groups, ...)``, made on first use; read-only, as each
        packing is (so the kernels compile at the signature their self-tests compiled, not a second time)."""
        if self._avx2_panels is None:
            panels = np.stack([weights.avx2_s8().panels for weights in self.group_weights()])
            panels.flags.writeable = False
            self._avx2_panels = panels
        return self._avx2_panels

    def backend_for(self, x_q: np.ndarray | None = None) -> str:
        """The backend a call would use now."""
        backend = get_backend()
        if backend in ("reference", "numba"):
            return backend
        if backend == "auto" and self.plan.thin:
            return "numba"  # the direct thin loop beats im2col + GEMM on these layers (numba_cpu.Conv2dPlan)
        obstacle = self.avx2_obstacle()
        if obstacle is None:
            return "avx2"
        if backend == "avx2":
            raise RuntimeError(f"backend 'avx2' was forced but cannot run this layer: {obstacle}")
        return "numba"

    def avx2_obstacle(self) -> str | None:
        """Why the AVX2 conv path cannot run this layer here (``None`` if it can)."""
        if self.plan.x_dtype != np.int8:
            return "int16 activations (the AVX2 conv path is int8)"
        if self.per_group < TILE_COLUMNS:
            return "fewer than 4 output channels per group (depthwise runs the direct Numba loop)"
        if self.plan.depth > MAX_FUSED_K:
            return f"reduction depth {self.plan.depth} exceeds {MAX_FUSED_K}"
        return next(filter(None, (avx2_obstacle(weights, np.int8) for weights in self.group_weights())), None)

    def __call__(self, x_q: np.ndarray) -> np.ndarray:
        backend = self.backend_for()
        if backend == "reference":
            self.plan.output_shape(x_q)
            return reference.quantized_conv2d(x_q, self.weight, *self.arguments)
        if backend == "numba":
            return self.plan(x_q)
        out = np.empty(self.plan.output_shape(x_q), dtype=kernel_dtype(self.plan.out_dtype))
        padded, conv, epilogue = self.plan.external_arguments(x_q.shape)
        out3 = out.reshape(out.shape[0], out.shape[1], out.shape[2] * out.shape[3])  # (N, OC, pixels); N may be 0
        arguments = (x_q, np.int64(self.plan.x_zero_point), padded, self.avx2_panels(), conv, epilogue, out3,
                     (1, 1), out)  # no pool: out4 is out
        _, serial, parallel = x86_glue.external_s8_drivers(x86_glue.s8_kernel_for_codes(int8_gemm_kernel()))
        if use_threads(2 * out.size * self.plan.depth):
            parallel(*arguments)
        else:
            serial(*arguments)
        return self.plan.cast_output(out)


def prepare_conv2d(w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec: QuantSpec, stride=1,
                   padding=0, dilation=1, groups: int = 1, relu: bool = False,
                   x_dtype=np.int8) -> PreparedConv2d:  # fmt: skip
    """Validate and pack a quantized conv2d layer once (arguments as :func:`reference.quantized_conv2d`).

    >>> from nanoopt.spec import QuantSpec
    >>> layer = prepare_conv2d(np.ones((1, 1, 3, 3), np.int8), None, 0, 2**30, 0, 0, QuantSpec(), padding=1)
    >>> layer(np.ones((1, 1, 3, 3), np.int8))[0, 0]
    array([[2, 3, 2],
           [3, 5, 3],
           [2, 3, 2]], dtype=int8)
    """
    return PreparedConv2d(w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, stride, padding,
                          dilation, groups, relu, x_dtype)  # fmt: skip


# ------------------------------------------------------------------------- the reference's signatures
def quantized_linear(x_q, w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec: QuantSpec,
                     relu: bool = False) -> np.ndarray:  # fmt: skip
    """:func:`reference.quantized_linear` on the current backend (``w_q`` may be :class:`PreparedWeights`).

    >>> from nanoopt.spec import QuantSpec
    >>> quantized_linear(np.array([[10, -3]], np.int8), np.array([[2, 1], [-1, 4]], np.int8),
    ...                  np.array([1, 0], np.int32), 0, 2**30, 0, 0, QuantSpec())
    array([[  9, -11]], dtype=int8)
    """
    if get_backend() == "reference":
        weight = w_q.weight if isinstance(w_q, PreparedWeights) else w_q
        return reference.quantized_linear(x_q, weight, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec,
                                          relu)  # fmt: skip
    reference.check_array(x_q, "x_q", (np.int8, np.int16), 2)
    layer = PreparedLinear(w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, relu, x_q.dtype)
    if x_q.shape[1] != layer.weights.numba.k:
        raise ValueError(f"x_q (M, K) and w_q (N, K) must share K, got {x_q.shape} and {layer.weights.weight.shape}")
    return layer(x_q)


def quantized_conv2d(x_q, w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec: QuantSpec, stride=1,
                     padding=0, dilation=1, groups: int = 1, relu: bool = False) -> np.ndarray:  # fmt: skip
    """:func:`reference.quantized_conv2d` on the current backend.

    >>> from nanoopt.spec import QuantSpec
    >>> quantized_conv2d(np.ones((1, 1, 3, 3), np.int8), np.ones((1, 1, 3, 3), np.int8), None, 0, 2**30, 0, 0,
    ...                  QuantSpec(), padding=1)[0, 0, 0]
    array([2, 3, 2], dtype=int8)
    """
    if get_backend() == "reference":
        return reference.quantized_conv2d(x_q, w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec,
                                          stride, padding, dilation, groups, relu)  # fmt: skip
    reference.check_array(x_q, "x_q", (np.int8, np.int16), 4)
    reference.check_array(w_q, "w_q", (np.int8, np.int16), 4)
    reference.check_conv_geometry(x_q, w_q, stride, padding, dilation, groups)
    layer = PreparedConv2d(w_q, bias_q, x_zero_point, m0, shift, out_zero_point, out_spec, stride, padding,
                           dilation, groups, relu, x_q.dtype)  # fmt: skip
    return layer(x_q)


def _pointwise(name: str, numba_version):
    """Dispatch a pooling/add/ReLU kernel: the reference when forced, else the Numba one."""
    reference_version = getattr(reference, name)

    def run(*args, **kwargs):
        return (reference_version if get_backend() == "reference" else numba_version)(*args, **kwargs)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = f":func:`reference.{name}` on the current backend (Numba unless ``'reference'`` is forced)."
    return run


quantized_max_pool2d = _pointwise("quantized_max_pool2d", numba_pointwise.max_pool2d)
quantized_avg_pool2d = _pointwise("quantized_avg_pool2d", numba_pointwise.avg_pool2d)
quantized_add = _pointwise("quantized_add", numba_pointwise.add)
quantized_relu = _pointwise("quantized_relu", reference.quantized_relu)  # NumPy's maximum: one vectorised pass
