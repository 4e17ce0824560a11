"""CSR sparse matrix times dense vectors on AVX2: products and partial sums eight lanes wide, x loaded lane by lane.

Sparse matrix-vector multiplication (SpMV; Williams et al. 2007, "Optimization of sparse matrix-vector
multiplication on emerging multicore platforms", on why it is bound by memory operations, not arithmetic)
for a pruned layer: ``y = x @ W^T`` for a float32 input x (B, cols) and a weight W in CSR form (``data``,
``indices``, ``indptr`` of :class:`nanoopt.kernels.sparse.CSRMatrix`), bit-identical to
:func:`nanoopt.kernels.sparse.csr_matmul_reference`, whose summation order is the specification: entry e of a
row (e = 0, 1, ... in storage order) is added to partial sum e mod 8, and

    s_j = sum over e with e mod 8 == j, in increasing e, of fl(value_e * x[column_e])   (float32, from +0.0)
    y   = fl(fl(fl(s_0 + s_1) + fl(s_2 + s_3)) + fl(fl(s_4 + s_5) + fl(s_6 + s_7)))

The eight partial sums of a row are the eight lanes of one 256-bit register: a block of 8 consecutive entries
(``k .. k + 7``, k - start a multiple of 8) puts entry e in lane e mod 8, so one vector multiply and one
vector add do the work of eight scalar ones. The product is rounded before the sum (a multiply, then an add;
never a fused multiply-add), as the specification says. A batch runs one pass over W per row of x.

How it is fast (the timings, and the variants tried and dropped: ``docs/kernels.md``):

* **No hardware gather.** The eight values ``x[indices[k + j]]`` are loaded one by one into the register
  (``vmovss`` / ``vinsertps``); ``vgatherdps`` is no faster than the scalar loop.
* **Index pairs as one word.** Two consecutive int32 column indices are read as one 64-bit load and split
  with a shift: 4 index loads per block instead of 8.
* **Balancing the load pipes.** Lanes 0-5 are loaded as floats straight into the vector register; lanes 6-7 are
  loaded as two 32-bit integers, packed into one 64-bit integer and moved over in one instruction
  (``vpbroadcastq`` + ``vblendps``): 7 instead of 9 vector loads per block. The bits are moved, not converted, so
  the values are exactly those of x.
* **Row tails without a second loop.** A row's last ``r = length mod 8`` entries (0 < r < 8) are read as a
  whole block of 8 (the extra entries belong to the following rows, so their column indices are valid and
  every load stays inside the arrays), and the products of lanes r..7 are replaced by +0.0 (a bitwise and
  with a lane mask). Adding +0.0 changes no partial sum: a sum that starts at +0.0 is never -0.0 in
  round-to-nearest, and ``s + (+0.0) = s`` for every other s, infinities and NaN included. Only a block that
  would run past the end of the arrays (the last rows) uses masked loads (``vmaskmovps``) and a masked
  ``vgatherdps``, which touch the row's own entries only.
* **One pass per row, no calls.** The row loop is a single jitted function; one ``vaddps`` per block, then a
  fixed tree of 7 scalar additions for the output.

Batches. One pass over W per row of x is linear in B; the portable kernel's batch-inner loop wins beyond a few
rows, hence ``nanoopt.kernels.sparse.AVX2_MAX_BATCH = 8``.

Safety. The intrinsics read raw memory without bounds checks. :func:`csr_matmul_avx2` checks shapes, dtypes,
contiguity, ``indptr[0] == 0`` and ``indptr[-1] == nnz`` in O(1), and the kernel checks that ``indptr`` never
decreases (one comparison per row), so every data and index load is inside the arrays. Column indices are
*not* checked per call (that would cost more than the product): they must lie in ``[0, cols)``, which
:class:`~nanoopt.kernels.sparse.CSRMatrix` guarantees on construction; :func:`nanoopt.kernels.sparse.csr_matmul`
passes only validated matrices.

Availability. As for :mod:`nanoopt.kernels.avx2`: LLVM aborts the process if it compiles an x86 intrinsic for a
target without it, so :func:`available` first asks :mod:`nanoopt.kernels.cpu_features` (no compilation; it honours
``NANOOPT_CPU_FEATURES`` and ``NANOOPT_DISABLE_AVX2=1``), and only then compiles the kernel and checks one small
exact product. The register types and intrinsic helpers are those of :mod:`nanoopt.kernels.llvm_intrinsics`. The
kernel is module-level code with ``cache=True``.

>>> import numpy as np
>>> from nanoopt.kernels.sparse import CSRMatrix
>>> m = CSRMatrix.from_dense(np.array([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]], np.float32))
>>> x = np.array([[3.0, 5.0, 7.0]], np.float32)
>>> csr_matmul_avx2(x, m.data, m.indices, m.indptr, 2).tolist() if available() else [[17.0, 0.0]]
[[17.0, 0.0]]
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from nanoopt.kernels.cpu_features import DISABLE_ENV, avx2_kernel_works
from nanoopt.kernels.llvm_intrinsics import (
    F32X8,
    I32X8,
    LANES,
    declare,
    element_pointer,
    float32x8,
    int32x8,
    is_c_array,
    lanewise,
    load_vector,
    splat,
    splat_constant,
)

__all__ = ["LANES", "available", "csr_matmul_avx2", "csr_matvec_into", "require_available"]

# LANES: float32 lanes of one 256-bit register = partial sums per output (the specification's 8)
_I64X4 = ir.VectorType(ir.IntType(64), 4)
_I64 = ir.IntType(64)
_I32 = ir.IntType(32)
_LOW_HALF = ir.Constant(_I64, 0xFFFFFFFF)
_HALF_SHIFT = ir.Constant(_I64, 32)

# ---------------------------------------------------------------------------------------------------------
# Intrinsics. Offsets count elements of the array's dtype, in C order.

_zeros = splat_constant("_zeros", float32x8, F32X8, 0.0, "Eight lanes of +0.0.")
_load_values = load_vector("_load_values", float32x8, F32X8, (types.float32,), 4,
                           "``data[offset : offset + 8]`` of a float32 C array (unaligned load).")
_multiply = lanewise("_multiply", float32x8, ir.IRBuilder.fmul,
                     "Lane-wise ``fl(a * b)`` (a rounded product: ``fmul``, never fused with a following add).")
_add = lanewise("_add", float32x8, ir.IRBuilder.fadd, "Lane-wise ``fl(a + b)``.")


@intrinsic
def _load_x(typingctx, x, indices, k):
    """``x[indices[k + j]]`` in lane j, j = 0..7, from scalar loads (see the module docstring).

    Index pair p (entries k + 2p, k + 2p + 1) is one 64-bit load, split into its low and high 32 bits (column
    indices are non-negative int32). Pairs 0-2 load floats into lanes 0-5; pair 3 loads the two values as
    32-bit integers, joins them into one 64-bit word and writes it over lanes 6-7 (a bit copy).
    """
    if not (is_c_array(x, types.float32) and is_c_array(indices, types.int32) and isinstance(k, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        x_values = context.make_array(signature.args[0])(context, builder, args[0]).data
        x_bits = builder.bitcast(x_values, _I32.as_pointer())
        entries = element_pointer(context, builder, signature.args[1], args[1], signature.args[2], args[2])
        pairs = builder.bitcast(entries, _I64.as_pointer())
        columns = []
        for pair in range(4):
            word = builder.load(builder.gep(pairs, [ir.Constant(_I64, pair)]), align=4)
            columns.append((builder.and_(word, _LOW_HALF), builder.lshr(word, _HALF_SHIFT)))
        vector = ir.Constant(F32X8, ir.Undefined)
        for pair in range(3):
            for half in range(2):
                value = builder.load(builder.gep(x_values, [columns[pair][half]]), align=4)
                vector = builder.insert_element(vector, value, ir.Constant(_I32, 2 * pair + half))
        low = builder.zext(builder.load(builder.gep(x_bits, [columns[3][0]]), align=4), _I64)
        high = builder.zext(builder.load(builder.gep(x_bits, [columns[3][1]]), align=4), _I64)
        word = builder.or_(low, builder.shl(high, _HALF_SHIFT))  # little endian: lane 6 low, lane 7 high
        quads = builder.insert_element(builder.bitcast(vector, _I64X4), word, ir.Constant(_I32, 3))
        return builder.bitcast(quads, F32X8)

    return float32x8(x, indices, k), codegen


@intrinsic
def _lanes_below(typingctx, count):
    """Lane mask: all ones in lanes ``j < count``, zeros elsewhere."""
    if not isinstance(count, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        count = context.cast(builder, args[0], signature.args[0], types.int32)
        below = builder.icmp_signed("<", ir.Constant(I32X8, list(range(LANES))), splat(builder, count, I32X8))
        return builder.sext(below, I32X8)

    return int32x8(count), codegen


@intrinsic
def _keep(typingctx, vector, mask):
    """``vector`` in the lanes where ``mask`` is all ones, +0.0 (bits 0) in the others."""
    if not (vector == float32x8 and mask == int32x8):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.and_(builder.bitcast(args[0], I32X8), args[1]), F32X8)

    return float32x8(vector, mask), codegen


@intrinsic
def _load_values_masked(typingctx, data, offset, mask):
    """``data[offset + j]`` in the lanes j of ``mask``, +0.0 elsewhere; other lanes touch no memory."""
    if not (is_c_array(data, types.float32) and isinstance(offset, types.Integer) and mask == int32x8):
        return None

    def codegen(context, builder, signature, args):
        pointer = element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        byte_pointer = ir.IntType(8).as_pointer()
        load = declare(builder, "llvm.x86.avx.maskload.ps.256", F32X8, [byte_pointer, I32X8])
        return builder.call(load, [builder.bitcast(pointer, byte_pointer), args[2]])

    return float32x8(data, offset, mask), codegen


@intrinsic
def _load_x_masked(typingctx, x, indices, k, mask):
    """``x[indices[k + j]]`` in the lanes j of ``mask``, +0.0 elsewhere (masked load + ``vgatherdps``).

    Lanes outside the mask read neither ``indices`` nor ``x``: safe at the very end of the arrays.
    """
    if not (is_c_array(x, types.float32) and is_c_array(indices, types.int32) and isinstance(k, types.Integer)):
        return None
    if mask != int32x8:
        return None

    def codegen(context, builder, signature, args):
        byte_pointer = ir.IntType(8).as_pointer()
        x_values = context.make_array(signature.args[0])(context, builder, args[0]).data
        entries = element_pointer(context, builder, signature.args[1], args[1], signature.args[2], args[2])
        load = declare(builder, "llvm.x86.avx2.maskload.d.256", I32X8, [byte_pointer, I32X8])
        columns = builder.call(load, [builder.bitcast(entries, byte_pointer), args[3]])
        gather = declare(builder, "llvm.x86.avx2.gather.d.ps.256", F32X8,
                          [F32X8, byte_pointer, I32X8, F32X8, ir.IntType(8)])
        arguments = [ir.Constant(F32X8, [0.0] * LANES), builder.bitcast(x_values, byte_pointer), columns,
                     builder.bitcast(args[3], F32X8), ir.Constant(ir.IntType(8), 4)]  # scale: 4 bytes per float
        return builder.call(gather, arguments)

    return float32x8(x, indices, k, mask), codegen


@intrinsic
def _sum_lanes(typingctx, vector):
    """``((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))`` in float32, each addition rounded."""
    if vector != float32x8:
        return None

    def codegen(context, builder, signature, args):
        s = [builder.extract_element(args[0], ir.Constant(_I32, j)) for j in range(LANES)]
        first = builder.fadd(builder.fadd(s[0], s[1]), builder.fadd(s[2], s[3]))
        second = builder.fadd(builder.fadd(s[4], s[5]), builder.fadd(s[6], s[7]))
        return builder.fadd(first, second)

    return types.float32(vector), codegen


# ---------------------------------------------------------------------------------------------------------
# The kernel.


@numba.njit(cache=True)
def csr_matvec_into(x, data, indices, indptr, out):  # pragma: no cover - compiled
    """Overwrite ``out[i]`` with row i of W times x, summed in the specification's order. No Python checks.

    The jitted kernel, for callers that have validated everything (as :func:`nanoopt.kernels.sparse.csr_matmul`
    does with a :class:`~nanoopt.kernels.sparse.CSRMatrix`) and checked :func:`available`: x (cols,) and out
    (rows,) C-contiguous float32; data (nnz,) float32, indices (nnz,) int32 in [0, cols), C-contiguous;
    indptr (rows + 1,) int64 from 0 to nnz. That indptr never decreases is checked here (ValueError).
    """
    rows = out.shape[0]
    nnz = data.shape[0]
    for i in range(rows):
        start = indptr[i]
        end = indptr[i + 1]
        if end < start:
            raise ValueError("csr_matvec_into: indptr must never decrease")
        sums = _zeros()
        k = start
        while k + LANES <= end:  # whole blocks: entry k + j goes to lane j
            sums = _add(sums, _multiply(_load_values(data, k), _load_x(x, indices, k)))
            k += LANES
        if k < end:  # the row's last end - k < 8 entries, in lanes 0 .. end - k - 1
            keep = _lanes_below(end - k)
            if k + LANES <= nnz:  # read a whole block (valid entries of later rows), zero the extra lanes
                products = _multiply(_load_values(data, k), _load_x(x, indices, k))
                sums = _add(sums, _keep(products, keep))
            else:  # the block would pass the end of the arrays: masked loads read only this row
                products = _multiply(_load_values_masked(data, k, keep), _load_x_masked(x, indices, k, keep))
                sums = _add(sums, products)
        out[i] = _sum_lanes(sums)


# ---------------------------------------------------------------------------------------------------------
# Availability and the Python entry point.

_FLOAT32, _INT32, _INT64 = np.dtype(np.float32), np.dtype(np.int32), np.dtype(np.int64)


def _describe(array: object) -> str:
    if not isinstance(array, np.ndarray):
        return type(array).__name__
    layout = "contiguous" if array.flags.c_contiguous else "non-contiguous"
    return f"{layout} {array.dtype} array of shape {array.shape}"


def _self_test() -> bool:
    """Compile the kernel and check a product whose every partial sum is exact (small integers).

    Rows of 0..20 entries cover whole blocks, tails read past the row and the masked tail at the end.
    """
    rng = np.random.default_rng(20240611)
    rows, cols = 23, 37
    lengths = np.arange(rows) % 21  # 0, 1, ..., 20, 0, 1: the last row (1 entry) takes the masked path
    indptr = np.zeros(rows + 1, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    indices = np.concatenate([np.sort(rng.choice(cols, size=n, replace=False)) for n in lengths]).astype(np.int32)
    data = rng.integers(-8, 9, size=indices.size).astype(np.float32)
    x = rng.integers(-8, 9, size=(2, cols)).astype(np.float32)
    out = np.empty((2, rows), np.float32)
    for b in range(2):
        csr_matvec_into(x[b], data, indices, indptr, out[b])
    dense = np.zeros((rows, cols), np.float64)
    dense[np.repeat(np.arange(rows), lengths), indices] = data
    return bool(np.array_equal(out, x.astype(np.float64) @ dense.T))


@functools.cache
def available() -> bool:
    """True if the CSR kernel can run here (:func:`~nanoopt.kernels.cpu_features.avx2_kernel_works`: AVX2 usable,
    ``NANOOPT_DISABLE_AVX2`` off, the self-test exact). Checked once per process; ``available.cache_clear()``
    forgets the answer.

    >>> isinstance(available(), bool)
    True
    """
    return avx2_kernel_works(_self_test)


def require_available(what: str) -> None:
    """Raise ``RuntimeError`` naming ``what`` if :func:`available` is False.

    >>> require_available("this example") if available() else None
    """
    if not available():
        raise RuntimeError(f"{what} needs AVX2, which is not available here (no AVX2 in the CPU or in Numba's "
                           f"target, or {DISABLE_ENV} is set); use the portable Numba kernel instead")


def csr_matmul_avx2(x: np.ndarray, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray,
                    rows: int) -> np.ndarray:
    """``x @ W^T`` (B, rows) for W in CSR: :func:`~nanoopt.kernels.sparse.csr_matmul_reference`'s signature
    and results, bit for bit, on AVX2. Raises ``RuntimeError`` if :func:`available` is False.

    ``indices`` must lie in ``[0, x.shape[1])`` (not checked here; :class:`~nanoopt.kernels.sparse.CSRMatrix`
    checks it once): see the module docstring.

    >>> from nanoopt.kernels.sparse import CSRMatrix
    >>> m = CSRMatrix.from_dense(np.array([[1.0, 2.0], [0.0, -1.0]], np.float32))
    >>> x = np.array([[1.0, 1.0], [2.0, 3.0]], np.float32)
    >>> csr_matmul_avx2(x, m.data, m.indices, m.indptr, 2).tolist() if available() else [[3.0, -1.0], [8.0, -3.0]]
    [[3.0, -1.0], [8.0, -3.0]]
    """
    if not (isinstance(x, np.ndarray) and x.dtype == _FLOAT32 and x.ndim == 2):
        raise TypeError(f"csr_matmul_avx2: x must be a float32 array (B, cols), got {_describe(x)}")
    if not (isinstance(data, np.ndarray) and data.dtype == _FLOAT32 and data.ndim == 1 and data.flags.c_contiguous):
        raise TypeError(f"csr_matmul_avx2: data must be a contiguous 1-D float32 array, got {_describe(data)}")
    if not (isinstance(indices, np.ndarray) and indices.dtype == _INT32 and indices.flags.c_contiguous):
        raise TypeError(f"csr_matmul_avx2: indices must be a contiguous 1-D int32 array, got {_describe(indices)}")
    if not (isinstance(indptr, np.ndarray) and indptr.dtype == _INT64 and indptr.flags.c_contiguous):
        raise TypeError(f"csr_matmul_avx2: indptr must be a contiguous 1-D int64 array, got {_describe(indptr)}")
    if rows < 0 or indices.shape != data.shape or indptr.shape != (rows + 1,) or indptr[0] != 0 \
            or indptr[rows] != data.shape[0]:
        raise ValueError(f"csr_matmul_avx2: need indices {indices.shape} shaped like data {data.shape} and indptr "
                         f"{indptr.shape} of rows + 1 = {rows + 1} entries from 0 to nnz = {data.size}")
    require_available("csr_matmul_avx2")
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)  # a copy with the same values, laid out for the kernel's raw loads
    out = np.empty((x.shape[0], rows), np.float32)  # (B, rows)
    for b in range(x.shape[0]):  # one pass over W per row of x
        csr_matvec_into(x[b], data, indices, indptr, out[b])
    return out
