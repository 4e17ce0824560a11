"""Float32 matrix product by a constant weight, in register tiles (AVX2 + FMA), for small batches of rows.

``out = a @ W^T`` for ``a (M, K)`` and a weight whose transpose ``W^T (K, N)`` is packed once into column panels
(:func:`pack_panels`: panel ``p`` holds columns ``16 p .. 16 p + 15`` of ``W^T``, row ``k`` after row ``k - 1``,
zeros past ``N``). A register tile holds ``6 x 16`` outputs in 12 accumulators of 8 float32 lanes; each step
``k`` loads the panel's two vectors ``W^T[k, 16 p : 16 p + 16]`` once, broadcasts ``a[i, k]`` of each of the 6
rows and adds the 12 products with fused multiply-adds (Goto & van de Geijn 2008, "Anatomy of high-performance
matrix multiplication", the micro-kernel of section 5; BLIS's 6 x 16 AVX2 shape). With 12 accumulators, 2 weight
vectors and a broadcast, the tile uses 15 of the 16 ymm registers of an AVX2 core; the whole ``K`` stays in the
registers, each output is written once. The rows left below a multiple of 6 take tiles of 4, 2 and 1 rows; a
partial last panel goes through a 6 x 16 scratch.

Why not BLAS: at the sizes of a GPT window (M = 64 rows, K = 128-512, N = 128-512) a BLAS call spends a good part
of its time packing both operands on every call; here the weights are packed once (per generation) and the rows
are read where they lie. Measured on the Zen 4 host, one thread, in one process: see ``docs/kernels.md`` ("The
64-token window recompute").

Summation order: each output's products over ``k`` in increasing order from 0, one rounding per fused multiply-add
(``llvm.fmuladd``: fused where the target has FMA). That is not BLAS's order, so the result equals
:func:`matmul_reference` (float64 sums, rounded once) to float32 tolerance, and bit for bit where every partial sum
is exact (small integers, as the tests use).

Availability: plain LLVM vector IR (``<8 x float>``, ``llvm.fmuladd``), compiled for any target but chosen only
where :func:`available` (AVX2 usable, :mod:`nanoopt.kernels.cpu_features`, and a small exact product checked).

>>> w_t = np.arange(6, dtype=np.float32).reshape(2, 3)          # W^T (K=2, N=3)
>>> a = np.array([[1.0, 2.0]], np.float32)
>>> out = np.empty((1, 3), np.float32)
>>> if available(): matmul_packed_into(a, pack_panels(w_t), out)
... else: out[:] = matmul_reference(a, w_t)
>>> out.tolist()
[[6.0, 9.0, 12.0]]
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from nanoopt.kernels.cpu_features import avx2_kernel_works
from nanoopt.kernels.llvm_intrinsics import F32X8, LANES, declare, is_c_array

__all__ = ["PANEL", "TILE_ROWS", "available", "matmul_packed", "matmul_packed_into", "matmul_reference",
           "pack_panels"]

TILE_ROWS = 6  # rows of a register tile
VECTORS = 2  # 8-lane vectors of a tile row: 6 x 2 = 12 accumulators, 2 weight vectors, 1 broadcast (of 16)
PANEL = LANES * VECTORS  # columns of W^T per packed panel


def pack_panels(weight_t: np.ndarray) -> np.ndarray:
    """``W^T (K, N)`` float32 as ``(ceil(N / 16), K, 16)`` panels (zeros past ``N``), for :func:`matmul_packed_into`.

    >>> pack_panels(np.arange(3, dtype=np.float32).reshape(1, 3))[0, 0, :4].tolist()
    [0.0, 1.0, 2.0, 0.0]
    """
    if not isinstance(weight_t, np.ndarray) or weight_t.dtype != np.float32 or weight_t.ndim != 2:
        raise TypeError(f"pack_panels: weight_t must be a 2-D float32 array (K, N), got "
                        f"{getattr(weight_t, 'dtype', type(weight_t).__name__)} {getattr(weight_t, 'shape', '')}")
    depth, n = weight_t.shape
    panels = -(-n // PANEL)
    padded = np.zeros((depth, panels * PANEL), np.float32)
    padded[:, :n] = weight_t
    return np.ascontiguousarray(padded.reshape(depth, panels, PANEL).transpose(1, 0, 2))


def matmul_reference(a: np.ndarray, weight_t: np.ndarray) -> np.ndarray:
    """``a @ W^T`` with float64 sums, rounded to float32 once (the specification, to float32 tolerance).

    >>> matmul_reference(np.ones((1, 2), np.float32), np.ones((2, 2), np.float32)).tolist()
    [[2.0, 2.0]]
    """
    return (a.astype(np.float64) @ weight_t.astype(np.float64)).astype(np.float32)


@intrinsic
def _tile(typingctx, a, a_at, lda, panels, p_at, depth, out, o_at, ldo, rows):
    """One register tile: for ``r < rows`` (a compile-time constant) and ``j < 16``, ``out[o_at + r ldo + j] =
    sum_k a[a_at + r lda + k] * panels[p_at + 16 k + j]`` over ``k < depth`` in order (flat offsets into C
    arrays of float32)."""
    count = rows.literal_value if isinstance(rows, types.IntegerLiteral) else None
    if count is None or not (is_c_array(a, types.float32) and is_c_array(panels, types.float32)
                             and is_c_array(out, types.float32)):
        return None
    if not all(isinstance(value, types.Integer) for value in (a_at, lda, p_at, depth, o_at, ldo)):
        return None

    def codegen(context, builder, signature, args):
        intp = context.get_value_type(types.intp)

        def offset(index):
            return context.cast(builder, args[index], signature.args[index], types.intp)

        def data(index):
            return context.make_array(signature.args[index])(context, builder, args[index]).data

        a_data, panel_data, out_data = data(0), data(3), data(6)
        a_at, lda, p_at, depth, o_at, ldo = (offset(i) for i in (1, 2, 4, 5, 7, 8))
        fused = declare(builder, "llvm.fmuladd.v8f32", F32X8, [F32X8, F32X8, F32X8])
        zero = ir.Constant(F32X8, [0.0] * LANES)
        splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)
        sums = [[cgutils.alloca_once_value(builder, zero) for _ in range(VECTORS)] for _ in range(count)]
        row_starts = [builder.add(a_at, builder.mul(lda, ir.Constant(intp, r))) for r in range(count)]

        def vector_at(pointer_base, index):
            return builder.bitcast(builder.gep(pointer_base, [index]), F32X8.as_pointer())

        with cgutils.for_range(builder, depth) as loop:  # registers after LLVM's mem2reg: the allocas are scalars
            k = loop.index
            w_at = builder.add(p_at, builder.mul(k, ir.Constant(intp, PANEL)))
            weights = [builder.load(vector_at(panel_data, builder.add(w_at, ir.Constant(intp, v * LANES))), align=4)
                       for v in range(VECTORS)]
            for r in range(count):
                value = builder.load(builder.gep(a_data, [builder.add(row_starts[r], k)]))
                broadcast = builder.shuffle_vector(
                    builder.insert_element(ir.Constant(F32X8, ir.Undefined), value, ir.Constant(ir.IntType(32), 0)),
                    ir.Constant(F32X8, ir.Undefined), splat_mask)
                for v in range(VECTORS):
                    builder.store(builder.call(fused, [broadcast, weights[v], builder.load(sums[r][v])]), sums[r][v])
        for r in range(count):
            start = builder.add(o_at, builder.mul(ldo, ir.Constant(intp, r)))
            for v in range(VECTORS):
                pointer = vector_at(out_data, builder.add(start, ir.Constant(intp, v * LANES)))
                builder.store(builder.load(sums[r][v]), pointer, align=4)
        return context.get_dummy_value()

    return types.none(a, a_at, lda, panels, p_at, depth, out, o_at, ldo, rows), codegen


@numba.njit(cache=True, nogil=True)
def _tiles(rows, flat_a, i, depth, flat_panels, p_at, flat_out, n, col, scratch, whole):  # pragma: no cover
    """The tile of ``rows`` rows from row ``i`` at panel offset ``p_at``: into ``out`` where the panel is whole,
    else into ``scratch`` and its ``n - col`` columns copied."""
    numba.literally(rows)
    if whole:
        _tile(flat_a, i * depth, depth, flat_panels, p_at, depth, flat_out, i * n + col, n, rows)
    else:
        _tile(flat_a, i * depth, depth, flat_panels, p_at, depth, scratch, 0, PANEL, rows)
        for r in range(rows):
            for j in range(n - col):
                flat_out[(i + r) * n + col + j] = scratch[r * PANEL + j]


@numba.njit(cache=True, nogil=True)
def matmul_packed_into(a, panels, out):  # pragma: no cover - compiled
    """``out = a @ W^T`` for C-contiguous float32 ``a (M, K)``, ``panels = pack_panels(W^T)`` (``(P, K, 16)``,
    ``16 P >= N``) and ``out (M, N)``. No checks beyond Numba's typing: call through :func:`matmul_packed`, or as a
    plan does with operands it has checked, where :func:`available` is True."""
    m, depth = a.shape
    n = out.shape[1]
    flat_a, flat_panels, flat_out = a.reshape(-1), panels.reshape(-1), out.reshape(-1)
    scratch = np.empty(TILE_ROWS * PANEL, np.float32)
    for p in range((n + PANEL - 1) // PANEL):
        col, p_at = p * PANEL, p * depth * PANEL
        whole = col + PANEL <= n
        i = 0
        while i + TILE_ROWS <= m:
            _tiles(TILE_ROWS, flat_a, i, depth, flat_panels, p_at, flat_out, n, col, scratch, whole)
            i += TILE_ROWS
        if i + 4 <= m:
            _tiles(4, flat_a, i, depth, flat_panels, p_at, flat_out, n, col, scratch, whole)
            i += 4
        if i + 2 <= m:
            _tiles(2, flat_a, i, depth, flat_panels, p_at, flat_out, n, col, scratch, whole)
            i += 2
        if i < m:
            _tiles(1, flat_a, i, depth, flat_panels, p_at, flat_out, n, col, scratch, whole)


def matmul_packed(a: np.ndarray, panels: np.ndarray, n: int, out: np.ndarray | None = None) -> np.ndarray:
    """``a @ W^T`` for float32 ``a (M, K)`` and ``panels = pack_panels(W^T)`` of ``W^T (K, n)``, into ``out (M, n)``
    (a new array if None), checked: ``TypeError``/``ValueError`` naming the argument for a wrong dtype or shape,
    ``RuntimeError`` where :func:`available` is False.

    >>> panels = pack_panels(np.eye(3, dtype=np.float32))
    >>> matmul_packed(np.array([[1.0, 2.0, 3.0]], np.float32), panels, 3).tolist() if available() else [[1.0, 2.0, 3.0]]
    [[1.0, 2.0, 3.0]]
    """
    for name, value, ndim in (("a", a, 2), ("panels", panels, 3)):
        if not isinstance(value, np.ndarray) or value.dtype != np.float32 or value.ndim != ndim:
            raise TypeError(f"matmul_packed: {name} must be a {ndim}-D float32 array, got "
                            f"{getattr(value, 'dtype', type(value).__name__)} {getattr(value, 'shape', '')}")
    if panels.shape[1:] != (a.shape[1], PANEL) or not 0 <= n <= panels.shape[0] * PANEL:
        raise ValueError(f"matmul_packed: panels of shape (P, {a.shape[1]}, {PANEL}) with 16 P >= n expected for a of "
                         f"shape {a.shape} and n={n}, got panels {panels.shape}")
    if out is None:
        out = np.empty((a.shape[0], n), np.float32)
    elif out.shape != (a.shape[0], n) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"matmul_packed: out must be a C-contiguous float32 array of shape {(a.shape[0], n)}, got "
                         f"{out.dtype} {out.shape}")
    if not available():
        raise RuntimeError("matmul_packed needs AVX2 and FMA, which are not usable here (see "
                           "nanoopt.kernels.cpu_features); use np.matmul")
    matmul_packed_into(np.ascontiguousarray(a), np.ascontiguousarray(panels), out)
    return out


def _self_test() -> bool:
    """Compile the kernel and check a product whose sums are exact (small integers): 13 rows (tiles of 6, 6 and 1)
    by 20 columns (a whole and a partial panel)."""
    rng = np.random.default_rng(20261205)
    a = rng.integers(-4, 5, size=(13, 7)).astype(np.float32)
    weight_t = rng.integers(-4, 5, size=(7, 20)).astype(np.float32)
    out = np.empty((13, 20), np.float32)
    matmul_packed_into(a, pack_panels(weight_t), out)
    return bool(np.array_equal(out, matmul_reference(a, weight_t)))


@functools.cache
def available() -> bool:
    """True if this kernel is chosen here: AVX2 usable (:func:`~nanoopt.kernels.cpu_features.avx2_kernel_works`;
    FMA comes with it on every AVX2 CPU) and the self-test exact. Checked once per process.

    >>> isinstance(available(), bool)
    True
    """
    return avx2_kernel_works(_self_test)
