"""The x86 int8 GEMMs (AVX2, AVX-VNNI, AVX-512 VNNI) inside the portable Numba drivers: threaded row blocks, an
int8 linear layer (product, then the Numba epilogue), and convolution blocks (Numba im2col -> x86 product -> Numba
epilogue into NCHW); and which of the int8 GEMMs runs here (:func:`s8_kernel`).

Each driver is a compiled closure over the kernel's compile-time constant ``kind`` (``avx2.SIGN_MASK``,
``avx2.VNNI`` or :data:`AVX512`), made once per kind by :func:`external_s8_drivers` / :func:`linear_s8_driver`,
and calls that kernel by its own name (:func:`_s8_product`), never the alias ``avx2.gemm_s8s8s32_into``: Numba's
cache keys a function on its own code, its closure variables, its argument types and the target CPU, not on what
the globals it names were bound to, so a cached driver that called the alias would keep the kernel of the process
that compiled it (and a process with VNNI masked would run VNNI code). A dispatcher passed as an argument would
defeat the cache. The drivers compile only when first called, which the dispatch (:mod:`nanoopt.kernels`) does
only for the kind :func:`s8_kernel` names: elsewhere they never compile, and a specialization compiles only its
own kernel. Each driver holds its loop itself (the conv block is inlined before typing) instead of calling a
compiled function that takes ``kind``: Numba links and optimises every callee again into each compiled caller, so
a level less is a re-optimisation of the whole GEMM less on an empty cache. The products are exact, so the results
are those of the reference (:func:`nanoopt.kernels.reference.gemm_s8s8s32`, ``quantized_linear``,
``quantized_conv2d``).

>>> callable(external_s8_drivers("avx2")[0])
True
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from nanoopt.kernels import avx2, avx2_linear, avx512
from nanoopt.kernels.avx2_requant import requantize_rows_s8
from nanoopt.kernels.numba_conv import EXTERNAL_PIXELS, im2col_rows, pad_nhwc
from nanoopt.kernels.numba_epilogue import CONV_PIXEL_MAJOR, epilogue_block, finish_run, max_pool_planes

__all__ = [
    "AVX2_PARALLEL_MIN_ROWS",
    "avx2_s16_rows_parallel",
    "conv_requant_avx512",
    "conv_requant_scratch",
    "external_s8_drivers",
    "linear_s8_driver",
    "linear_s8_requant_driver",
    "products",
    "s8_kernel",
    "s8_kernel_for_codes",
]

AVX2_PARALLEL_MIN_ROWS = 64  # the AVX2 GEMM is split over threads by row blocks of at least this many rows
AVX512 = 3  # the kind of the 512-bit VNNI GEMM (nanoopt.kernels.avx512), beside avx2.SIGN_MASK and avx2.VNNI
AVX2_AUTO = 5  # the AVX2 GEMM that picks the 7-bit or the sign-mask tile from the codes, per call
# by kernels.int8_gemm_kernel(), and the two AVX2 variants that s8_kernel_for_codes() adds on a plain AVX2 CPU
KINDS = {"avx2": avx2.SIGN_MASK, "avx-vnni": avx2.VNNI, "avx512-vnni": AVX512, "avx2-7bit": avx2.SEVEN_BIT,
         "avx2-auto": AVX2_AUTO}


def _s8_product(kind, a, panels, n, k, out):
    """Jitted code only: ``out = a @ W.T`` with the int8 x86 GEMM that ``kind`` names (``avx2.SIGN_MASK``: the
    plain AVX2 kernel, ``avx2.SEVEN_BIT``: its 7-bit tile, :data:`AVX2_AUTO`: either, from the codes, ``avx2.VNNI``:
    the AVX-VNNI one, :data:`AVX512`: the 512-bit one), chosen when the caller
    is compiled for that constant: the other kernels are never compiled, and each cached specialization names
    its own kernel."""
    raise NotImplementedError("_s8_product is only callable from Numba-compiled code")


@overload(_s8_product)
def _s8_product_typing(kind, a, panels, n, k, out):
    if not (isinstance(kind, types.IntegerLiteral) and kind.literal_value in KINDS.values()):
        return None
    kernel = {avx2.SIGN_MASK: avx2.gemm_s8s8s32_avx2_into, avx2.VNNI: avx2.gemm_s8s8s32_vnni_into,
              AVX512: avx512.gemm_s8s8s32_avx512_into, avx2.SEVEN_BIT: avx2.gemm_s8s8s32_avx2_7bit_into,
              AVX2_AUTO: avx2.gemm_s8s8s32_avx2_auto_into}[kind.literal_value]

    def product(kind, a, panels, n, k, out):
        kernel(a, panels, n, k, out)

    return product


@njit(cache=True, parallel=True)
def avx2_s16_rows_parallel(a, panels, n, k, out, rows_per_item):
    """The AVX2 int16 x int8 GEMM on row blocks of ``a`` in parallel."""
    for item in prange((a.shape[0] + rows_per_item - 1) // rows_per_item):
        lo, hi = item * rows_per_item, min((item + 1) * rows_per_item, a.shape[0])
        avx2.gemm_s16s8s64_into(a[lo:hi], panels, n, k, out[lo:hi])


@njit(cache=True)
def _external_conv_block(padded, item, conv):
    """The im2col rows of one 256-pixel work item of an int8 conv, an int32 buffer for their products, the
    item's group and its epilogue geometry."""
    groups, channels, per_group, pixels = conv[0], conv[1], conv[2], conv[10]
    blocks = (pixels + EXTERNAL_PIXELS - 1) // EXTERNAL_PIXELS
    n, group = item // (groups * blocks), (item // blocks) % groups
    p_lo = (item % blocks) * EXTERNAL_PIXELS
    rows = min(p_lo + EXTERNAL_PIXELS, pixels) - p_lo
    cols = np.empty((rows, conv[3] * conv[4] * channels), dtype=np.int8)
    im2col_rows(padded, 0, n, group * channels, channels, conv, p_lo, rows, cols)
    products = np.empty((rows, per_group), dtype=np.int32)
    return cols, products, group, (n, group * per_group, per_group, p_lo, CONV_PIXEL_MAJOR)


@njit(cache=True, inline="always")
def _conv_item(kind, padded, panels, item, conv, epilogue, out3):
    """One 256-pixel block of an int8 conv: Numba im2col -> the x86 product of ``kind`` -> Numba epilogue (NCHW).
    Inlined into the drivers (before typing, so ``kind`` is their closure's constant there)."""
    cols, products, group, geometry = _external_conv_block(padded, item, conv)
    _s8_product(kind, cols, panels[group], products.shape[1], cols.shape[1], products)
    epilogue_block(products.reshape(-1), products.shape[0], products.shape[1], 0, 0, epilogue, geometry, out3)


def _drivers_for(kind: int) -> tuple:
    """The three drivers of :func:`external_s8_drivers` around the kernel ``kind``."""

    @njit(cache=True, parallel=True)
    def rows_parallel(a, panels, n, k, out, rows_per_item):
        """The int8 GEMM of ``kind`` on row blocks of ``a`` in parallel (each block is C-contiguous)."""
        for item in prange((a.shape[0] + rows_per_item - 1) // rows_per_item):
            lo, hi = item * rows_per_item, min((item + 1) * rows_per_item, a.shape[0])
            _s8_product(kind, a[lo:hi], panels, n, k, out[lo:hi])

    @njit(cache=True)
    def conv_serial(x, zero_point, padded, panels, conv, epilogue, out3, pool, out4):
        """A whole int8 conv layer: the zero-point-padded NHWC copy of ``x`` into ``padded``
        (:func:`~nanoopt.kernels.numba_conv.pad_nhwc`), then image by image every 256-pixel block
        (:func:`_conv_item`) into ``out3 (N, OC, OH * OW)``, and, when ``pool = (pool_h, pool_w)`` is not 1x1,
        that image's max pool into ``out4`` while its planes are in cache (else ``out4`` is ``out3``)."""
        pad_nhwc(x, zero_point, (padded.shape[2] - x.shape[2]) // 2, (padded.shape[3] - x.shape[3]) // 2, padded)
        per_image = conv[0] * ((conv[10] + EXTERNAL_PIXELS - 1) // EXTERNAL_PIXELS)
        for n in range(x.shape[0]):
            for item in range(n * per_image, (n + 1) * per_image):
                _conv_item(kind, padded, panels, item, conv, epilogue, out3)
            if pool[0] > 1 or pool[1] > 1:
                max_pool_planes(out3[n], conv[9], pool[0], pool[1], out4[n])

    @njit(cache=True, parallel=True)
    def conv_parallel(x, zero_point, padded, panels, conv, epilogue, out3, pool, out4):
        """:func:`conv_serial` with the blocks, then the images' pools, in parallel."""
        pad_nhwc(x, zero_point, (padded.shape[2] - x.shape[2]) // 2, (padded.shape[3] - x.shape[3]) // 2, padded)
        per_image = conv[0] * ((conv[10] + EXTERNAL_PIXELS - 1) // EXTERNAL_PIXELS)
        for item in prange(x.shape[0] * per_image):
            _conv_item(kind, padded, panels, item, conv, epilogue, out3)
        if pool[0] > 1 or pool[1] > 1:
            for n in prange(x.shape[0]):
                max_pool_planes(out3[n], conv[9], pool[0], pool[1], out4[n])

    return rows_parallel, conv_serial, conv_parallel


@njit(cache=True)
def conv_requant_avx512(x, zero_point, padded, panels, conv, requant, scratch, out3, pool, out4):
    """An ungrouped int8 conv layer on the 512-bit layer kernel that requantizes in registers
    (:func:`nanoopt.kernels.avx512.linear_s8_into`): the zero-point-padded NHWC copy of ``x`` into ``padded``, then
    per image and block of up to 256 output pixels the im2col rows (``(kh, kw, c)`` order, as the packed weights
    ``panels``), the layer kernel on them -- int8 codes per (pixel, channel), ``requant`` from
    ``avx512.requant_s8(bias - x_zp rowsum(W), m0, shift, ...)`` -- and their transpose into the NCHW planes of
    ``out3 (N, OC, OH * OW)``; when ``pool`` is not 1x1 each image's max pool into ``out4`` while its planes are in
    cache. ``scratch = (cols (256, K) int8, products (256, OC) int32, codes (256, OC) int8, packed (256 * ceil(K / 4)
    * 4,) int8)``. The products are exact and the epilogue is the reference's, so this equals
    :func:`nanoopt.kernels.reference.quantized_conv2d` (then ``quantized_max_pool2d``). Call only where
    ``avx512.available()`` and the layer's accumulator bound fits int32."""
    cols, products, codes, packed = scratch
    channels, per_group, pixels, out_w = conv[1], conv[2], conv[10], conv[9]
    depth = conv[3] * conv[4] * channels
    pad_nhwc(x, zero_point, (padded.shape[2] - x.shape[2]) // 2, (padded.shape[3] - x.shape[3]) // 2, padded)
    pooled = pool[0] > 1 or pool[1] > 1
    best = np.empty(per_group, np.int8)
    for n in range(x.shape[0]):
        for p_lo in range(0, pixels, EXTERNAL_PIXELS):
            rows = min(p_lo + EXTERNAL_PIXELS, pixels) - p_lo
            im2col_rows(padded, 0, n, 0, channels, conv, p_lo, rows, cols)
            avx512.linear_s8_into(cols[:rows], panels, per_group, depth, requant, products[:rows], codes[:rows],
                                  packed)  # fmt: skip
            if pooled and rows == pixels:  # the whole image in one block: pooled from the codes directly
                _pool_pixel_major(codes, out_w, pool[0], pool[1], best, out4[n])
                continue
            for c in range(per_group):
                plane = out3[n, c, p_lo : p_lo + rows]
                for r in range(rows):
                    plane[r] = codes[r, c]
        if pooled and pixels > EXTERNAL_PIXELS:
            max_pool_planes(out3[n], out_w, pool[0], pool[1], out4[n])


@njit(cache=True, inline="always")
def _pool_pixel_major(codes, out_w, pool_h, pool_w, best, target):
    """``target[c, y, x] = max(codes[(y pool_h + i) out_w + x pool_w + j, c])`` over the window: a max over the
    window's rows of channels (contiguous, vectorised), then written to the channels' planes."""
    channels = target.shape[0]
    for y in range(target.shape[1]):
        for x in range(target.shape[2]):
            corner = y * pool_h * out_w + x * pool_w
            first = codes[corner]
            for c in range(channels):
                best[c] = first[c]
            for i in range(pool_h):
                for j in range(pool_w):
                    row = codes[corner + i * out_w + j]
                    for c in range(channels):
                        value = row[c]
                        best[c] = value if value > best[c] else best[c]
            for c in range(channels):
                target[c, y, x] = best[c]


def conv_requant_scratch(depth: int, channels: int) -> tuple:
    """The scratch arrays of :func:`conv_requant_avx512` for a layer of reduction depth ``depth`` and ``channels``
    output channels.

    >>> [a.shape for a in conv_requant_scratch(150, 16)]
    [(256, 150), (256, 16), (256, 16), (38912,)]
    """
    rows = EXTERNAL_PIXELS
    return (np.empty((rows, depth), np.int8), np.empty((rows, channels), np.int32),
            np.empty((rows, channels), np.int8), np.empty(rows * (-(-depth // 4) * 4), np.int8))


def _linear_for(kind: int):
    @njit(cache=True, nogil=True)
    def linear(x, panels, n, k, products, epilogue, out):
        """One int8 linear layer: the product of ``kind`` into ``products`` (M, N) int32, then the Numba epilogue
        (zero-point fold, bias, requantization, ReLU) row by row into the C-contiguous ``out`` (M, N)."""
        _s8_product(kind, x, panels, n, k, products)
        offsets, row_offsets, m0, shift = epilogue[0], epilogue[1], epilogue[2], epilogue[3]
        for r in range(x.shape[0]):
            finish_run(products[r], offsets, row_offsets[r], m0, shift, epilogue, out[r])
    return linear


def _s8_fused_linear(kind, x, panels, n, k, products, requant, out):
    """Jitted code only: one int8 linear layer on plain AVX2 (``avx2.SIGN_MASK``, ``avx2.SEVEN_BIT``,
    :data:`AVX2_AUTO`) requantized in the register tiles (:mod:`nanoopt.kernels.avx2_linear`; K at most
    ``avx2.S8_BLOCK_K``)."""
    raise NotImplementedError("_s8_fused_linear is only callable from Numba-compiled code")


@overload(_s8_fused_linear)
def _s8_fused_linear_typing(kind, x, panels, n, k, products, requant, out):
    if not isinstance(kind, types.IntegerLiteral):
        return None
    layer = {avx2.SIGN_MASK: avx2_linear.linear_s8_avx2_into, avx2.SEVEN_BIT: avx2_linear.linear_s8_avx2_7bit_into,
             AVX2_AUTO: avx2_linear.linear_s8_avx2_auto_into}.get(kind.literal_value)
    if layer is None:
        return None

    def fused(kind, x, panels, n, k, products, requant, out):
        layer(x, panels, n, k, requant, products, out)

    return fused


FUSED_KINDS = (avx2.SIGN_MASK, avx2.SEVEN_BIT, AVX2_AUTO)  # the kinds whose layer requantizes in the tiles


def _linear_requant_for(kind: int, fused: bool):
    if fused:
        @njit(cache=True, nogil=True)
        def fused_linear(x, panels, n, k, products, requant, out):
            """One int8 linear layer on plain AVX2, requantized in the register tiles (:func:`_s8_fused_linear`)
            into the int8 ``out`` (M, N); ``requant = avx512.requant_s8(...)``; K at most ``avx2.S8_BLOCK_K``."""
            _s8_fused_linear(kind, x, panels, n, k, products, requant, out)
        return fused_linear

    @njit(cache=True, nogil=True)
    def linear(x, panels, n, k, products, requant, out):
        """One int8 linear layer whose epilogue fits int32: the product of ``kind`` into ``products`` (M, N) int32,
        then the requantization in 32-bit lanes (:func:`nanoopt.kernels.avx2_requant.requantize_rows_s8`) into the
        int8 ``out`` (M, N); ``requant = avx512.requant_s8(...)``."""
        _s8_product(kind, x, panels, n, k, products)
        requantize_rows_s8(products, requant[0], requant[1], requant[2], requant[3], requant[4], requant[5], out)
    return linear


@functools.cache
def linear_s8_requant_driver(kernel: str, k: int | None = None):
    """``linear(x, panels, n, k, products, requant, out)``: :func:`linear_s8_driver` for a layer whose epilogue fits
    int32 (``requant = avx512.requant_s8(base_offsets, m0, shift, zero_point, low, high)``, not ``None``), the
    requantization eight int32 lanes at a time instead of the general Numba epilogue; the same codes. On plain AVX2
    and for a reduction length ``k`` at most ``avx2.S8_BLOCK_K`` (the layer's K, known when the driver is chosen), in
    the register tiles (:mod:`nanoopt.kernels.avx2_linear`: no int32 products written), else after the product (any
    K; ``k=None``). Each driver compiles only its own path, when first called.

    >>> callable(linear_s8_requant_driver("avx2-7bit", 784))
    True
    """
    if kernel not in KINDS:
        raise ValueError(f"kernel must be one of {sorted(KINDS)}, got {kernel!r}")
    fused = KINDS[kernel] in FUSED_KINDS and k is not None and 0 <= k <= avx2.S8_BLOCK_K
    return _linear_requant_for(KINDS[kernel], fused)


@functools.cache
def external_s8_drivers(kernel: str) -> tuple:
    """``(rows_parallel, conv_serial, conv_parallel)`` around the int8 GEMM ``kernel`` (``"avx2"``, ``"avx-vnni"``
    or ``"avx512-vnni"``, as :func:`nanoopt.kernels.int8_gemm_kernel` names them, or the AVX2 variants
    ``"avx2-7bit"`` and ``"avx2-auto"`` of :func:`s8_kernel_for_codes`), with the kernel bound:
    ``rows_parallel(a, panels, n, k, out, rows_per_item)``,
    ``conv_serial(x, zero_point, padded, panels, conv, epilogue, out3, pool, out4)`` (pads ``x``, then the conv,
    then an optional fused max pool; see ``_drivers_for``). Nothing is compiled until a driver is called.

    Each is a compiled function in which ``kind`` is a constant (a closure variable, part of Numba's cache key),
    so the kernel is chosen once, when the driver compiles. (A driver called from Python with ``kind`` as a plain
    int argument would need ``numba.literally``, which makes Numba retype the call on every call: about 5 ms each.)

    >>> callable(external_s8_drivers("avx2")[0])
    True
    """
    if kernel not in KINDS:
        raise ValueError(f"kernel must be one of {sorted(KINDS)}, got {kernel!r}")
    kind = KINDS[kernel]
    return _drivers_for(kind)


@functools.cache
def linear_s8_driver(kernel: str):
    """``linear(x, panels, n, k, products, epilogue, out)``: one int8 linear layer on the int8 GEMM ``kernel`` (as
    :func:`external_s8_drivers`), the product into the int32 (M, N) ``products``, then the Numba epilogue
    (:meth:`nanoopt.kernels.numba_cpu.LinearPlan.finish`'s per-element ``numba_epilogue.finish_run``, on contiguous
    rows so that LLVM vectorises it) into the int8 (M, N) ``out``; ``epilogue = (base_offsets, row_offsets) +
    plan.tail``. Nothing is compiled until it is called.

    >>> callable(linear_s8_driver("avx2"))
    True
    """
    if kernel not in KINDS:
        raise ValueError(f"kernel must be one of {sorted(KINDS)}, got {kernel!r}")
    return _linear_for(KINDS[kernel])


def products(a: np.ndarray, packed: avx2.PackedWeightsS8 | avx2.PackedWeightsS16) -> np.ndarray:
    """Exact ``a @ W.T`` with the x86 kernels: int32 for int8 ``a`` (``packed = avx2.pack_weights_s8(W)``), int64
    for int16 ``a`` (``avx2.pack_weights_s16``); split over threads by row blocks when ``a`` is tall enough.
    Call only where the kernel runs (``s8_kernel() != "none"`` for int8 ``a``, with ``K <= avx2.MAX_K_S8``;
    ``avx2.available()`` for int16).

    >>> w = np.array([[1, 2], [-127, 127]], np.int8)
    >>> a = np.array([[-128, 1]], np.int8)
    >>> products(a, avx2.pack_weights_s8(w)).tolist() if s8_kernel() != "none" else [[-126, 16383]]
    [[-126, 16383]]
    """
    int8 = a.dtype == np.int8
    if a.shape[0] >= 2 * AVX2_PARALLEL_MIN_ROWS and numba.get_num_threads() > 1:  # short rows: no thread query
        threads = numba.get_num_threads()
        out = np.empty((a.shape[0], packed.n), np.int32 if int8 else np.int64)
        rows = max(AVX2_PARALLEL_MIN_ROWS, -(-a.shape[0] // threads))
        parallel = external_s8_drivers(s8_kernel_for_codes(s8_kernel()))[0] if int8 else avx2_s16_rows_parallel
        parallel(a, packed.panels, packed.n, packed.k, out, rows)
        return out
    if int8 and avx512.available():
        out = np.empty((a.shape[0], packed.n), np.int32)  # (M, N)
        avx512.gemm_s8s8s32_avx512_into(np.ascontiguousarray(a), packed.panels, packed.n, packed.k, out)
        return out
    return avx2.gemm_s8s8s32_packed(a, packed) if int8 else avx2.gemm_s16s8s64_packed(a, packed)


def s8_kernel_for_codes(kernel: str, low: int | None = None, high: int | None = None) -> str:
    """The driver kernel (a key of ``KINDS``) for int8 activation codes known to lie in ``[low, high]`` (``None``:
    not known) where ``kernel`` (:func:`s8_kernel`) runs: on plain AVX2, ``"avx2-7bit"`` (the 3-instruction tile,
    exact for codes in [-64, 63]: 7-bit activations, PyTorch's ``reduce_range``) when the range fits it, ``"avx2"``
    (the sign mask) when the range is known and does not, ``"avx2-auto"`` (range checked per call, in the pass
    that prepares the 7-bit operand) when it is not known. Other kernels need no such choice: returned as they are.

    >>> s8_kernel_for_codes("avx2", -64, 63), s8_kernel_for_codes("avx2", -128, 127), s8_kernel_for_codes("avx2")
    ('avx2-7bit', 'avx2', 'avx2-auto')
    >>> s8_kernel_for_codes("avx512-vnni", -64, 63)
    'avx512-vnni'
    """
    if kernel != "avx2":
        return kernel
    if low is None or high is None:
        return "avx2-auto"
    return "avx2-7bit" if avx2.seven_bit_fits(low, high) else "avx2"


def s8_kernel() -> str:
    """The int8 x86 GEMM that runs here: ``"avx512-vnni"`` where :func:`nanoopt.kernels.avx512.available`, else
    ``avx2.KERNEL_S8`` (``"avx-vnni"`` or ``"avx2"``) where :func:`nanoopt.kernels.avx2.available`, else ``"none"``.

    Each answer rests on the self-test of the kernel that runs (compiled at the signature the runtime then calls,
    so its compilation is not wasted): where the 512-bit kernels pass theirs, the 256-bit int8 kernel is neither
    tested nor compiled (a process that needs the int16 kernel asks ``avx2.available()`` itself).

    >>> s8_kernel() in ("avx512-vnni", "avx-vnni", "avx2", "none")
    True
    """
    if avx512.available():
        return "avx512-vnni"
    return avx2.KERNEL_S8 if avx2.available() else "none"
