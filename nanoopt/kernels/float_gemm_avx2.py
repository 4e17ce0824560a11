"""Float32 matrix product by a constant weight, in register tiles (AVX2 + FMA), for small batches of rows.

``out = a @ W^T`` for ``a (M, K)`` and a weight whose transpose ``W^T (K, N)`` is packed once into column panels
(:func:`pack_panels`: panel ``p`` holds columns ``16 p .. 16 p + 15`` of ``W^T``, row ``k`` after row ``k - 1``,
zeros past ``N``). A register tile holds ``6 x 16`` outputs in 12 accumulators of 8 float32 lanes; each step
``k`` loads the panel's two vectors ``W^T[k, 16 p : 16 p + 16]`` once, broadcasts ``a[i, k]`` of each of the 6
rows and adds the 12 products with fused multiply-adds (Goto & van de Geijn 2008, "Anatomy of high-performance
matrix multiplication", the micro-kernel of section 5; BLIS's 6 x 16 AVX2 shape). With 12 accumulators, 2 weight
vectors and a broadcast, the tile uses 15 of the 16 ymm registers of an AVX2 core; the whole ``K`` stays in the
registers, each output is written once (the shape of :mod:`nanoopt.kernels.float_conv_avx2`'s channel tiles, whose
taps are its K; here the whole K loop is one intrinsic, and the rows are strided, not gathered). The rows left
below a multiple of 6 take tiles of 4, 2 and 1 rows; a partial last panel goes through a 6 x 16 scratch.

Why not BLAS: at the sizes of a GPT window (M = 64 rows, K = 128-512, N = 128-512) a BLAS call spends a good part
of its time packing both operands on every call; here the weights are packed once (per generation) and the rows
are read where they lie. Measured on the Zen 4 host, one thread, in one process: see ``docs/kernels.md`` ("The
64-token window recompute").

The same tiles compute causal self-attention's two products per head (:func:`causal_scores_into`: the queries times
the keys' panels, row tiles skipping the key panels that lie wholly beyond their last query; :func:`causal_attend_into`:
the probabilities times the values' panels, each row tile summing only the keys its last query sees), on panels laid
out by :func:`nanoopt.float_kernels.attention_heads.qkv_heads_panels_into`.

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
from nanoopt.kernels.llvm_intrinsics import F32X8, LANES, declare, is_c_array, splat

__all__ = ["PANEL", "TILE_ROWS", "available", "causal_attend_into", "causal_scores_into", "matmul_packed",
           "matmul_packed_into", "matmul_reference", "pack_panels"]

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
                broadcast = splat(builder, builder.load(builder.gep(a_data, [builder.add(row_starts[r], k)])), F32X8)
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
def _tiles(rows, flat_a, a_at, lda, depth, flat_panels, p_at, flat_out, o_at, ldo, width, scratch):  # pragma: no cover
    """One tile of ``rows`` rows: ``a`` rows from ``a_at`` (stride ``lda``) times the panel at ``p_at`` over
    ``depth`` steps, into ``out`` from ``o_at`` (stride ``ldo``) where the panel's 16 columns are all wanted
    (``width == 16``), else into ``scratch`` and its first ``width`` columns copied."""
    numba.literally(rows)
    if width == PANEL:
        _tile(flat_a, a_at, lda, flat_panels, p_at, depth, flat_out, o_at, ldo, rows)
    else:
        _tile(flat_a, a_at, lda, flat_panels, p_at, depth, scratch, 0, PANEL, rows)
        for r in range(rows):
            for j in range(width):
                flat_out[o_at + r * ldo + j] = scratch[r * PANEL + j]


PLAIN, CAUSAL_COLUMNS, CAUSAL_DEPTH = 0, 1, 2  # which products a row tile computes (see _products)


@numba.njit(cache=True, nogil=True)
def _products(flat_a, m, lda, panels, flat_out, o_at, ldo, n, mode):  # pragma: no cover - compiled
    """``out[i, j] = sum_k a[i, k] W^T[k, j]`` for ``i < m``, ``j < n``, ``k < K`` (the panels' depth), the rows in
    tiles of 6 (then 4, 2, 1). ``mode`` PLAIN: everything. CAUSAL_COLUMNS: a tile of rows ``i .. i + r - 1``
    skips the panels whose columns all lie beyond ``i + r - 1`` (outputs with ``j > i`` may be left unwritten or
    hold partial sums: a causal mask overwrites them). CAUSAL_DEPTH: the tile sums ``k < min(K, i + r)`` only
    (``a[i, k]`` is zero for ``k > i``, as causal attention probabilities are)."""
    depth = panels.shape[1]
    flat_panels = panels.reshape(-1)
    scratch = np.empty(TILE_ROWS * PANEL if n % PANEL else 0, np.float32)  # only a partial last panel needs it
    for p in range((n + PANEL - 1) // PANEL):
        col, p_at = p * PANEL, p * depth * PANEL
        width = min(PANEL, n - col)
        i = 0
        while i < m:
            rows = TILE_ROWS if i + TILE_ROWS <= m else 4 if i + 4 <= m else 2 if i + 2 <= m else 1
            if mode != CAUSAL_COLUMNS or col <= i + rows - 1:
                steps = min(depth, i + rows) if mode == CAUSAL_DEPTH else depth
                at = o_at + i * ldo + col
                if rows == TILE_ROWS:
                    _tiles(TILE_ROWS, flat_a, i * lda, lda, steps, flat_panels, p_at, flat_out, at, ldo, width, scratch)
                elif rows == 4:
                    _tiles(4, flat_a, i * lda, lda, steps, flat_panels, p_at, flat_out, at, ldo, width, scratch)
                elif rows == 2:
                    _tiles(2, flat_a, i * lda, lda, steps, flat_panels, p_at, flat_out, at, ldo, width, scratch)
                else:
                    _tiles(1, flat_a, i * lda, lda, steps, flat_panels, p_at, flat_out, at, ldo, width, scratch)
            i += rows


@numba.njit(cache=True, nogil=True)
def matmul_packed_into(a, panels, out):  # pragma: no cover - compiled
    """``out = a @ W^T`` for C-contiguous float32 ``a (M, K)``, ``panels = pack_panels(W^T)`` (``(P, K, 16)``,
    ``16 P >= N``) and ``out (M, N)``. No checks beyond Numba's typing: call through :func:`matmul_packed`, or as a
    plan does with operands it has checked, where :func:`available` is True."""
    _products(a.reshape(-1), a.shape[0], a.shape[1], panels, out.reshape(-1), 0, out.shape[1], out.shape[1], PLAIN)


@numba.njit(cache=True, nogil=True)
def causal_scores_into(queries, key_panels, scores):  # pragma: no cover - compiled
    """Per head ``h``: ``scores[h, t, j] = sum_d queries[h, t, d] keys[h, j, d]`` for ``j <= t`` at least, the keys
    packed as the panels of ``K_h^T`` (``key_panels (H, ceil(T / 16), D, 16)``, as
    :func:`nanoopt.float_kernels.attention_heads.qkv_heads_panels_into` writes them); ``queries (H, T, D)``,
    ``scores (H, T, T)``. Entries above the diagonal are left unwritten or partial (CAUSAL_COLUMNS): the causal
    softmax overwrites them. No checks."""
    heads, length = scores.shape[0], scores.shape[1]
    for h in range(heads):
        _products(queries[h].reshape(-1), length, queries.shape[2], key_panels[h], scores[h].reshape(-1), 0, length,
                  length, CAUSAL_COLUMNS)


@numba.njit(cache=True, nogil=True)
def causal_attend_into(probabilities, value_panels, out):  # pragma: no cover - compiled
    """Per head ``h``: ``out[t, h D + e] = sum_{j <= t} probabilities[h, t, j] values[h, j, e]``, the values packed
    as panels (``value_panels (H, ceil(D / 16), T, 16)``); ``probabilities (H, T, T)`` zero above the diagonal (the
    terms ``j > t`` are not added: CAUSAL_DEPTH), ``out (T, H D)``, the heads side by side. No checks."""
    heads, length = probabilities.shape[0], probabilities.shape[1]
    depth = out.shape[1] // heads
    flat_out = out.reshape(-1)
    for h in range(heads):
        _products(probabilities[h].reshape(-1), length, length, value_panels[h], flat_out, h * depth, out.shape[1],
                  depth, CAUSAL_DEPTH)


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
