"""Exact int8 GEMM and fused int8 linear layer on AVX-512 VNNI from Numba (512-bit ``vpdpbusd``).

Computes ``C = A @ W.T`` for int8 activations ``A`` (M, K) and narrow-range int8 weights ``W`` (N, K), exactly
as :func:`nanoopt.kernels.avx2.gemm_s8s8s32_vnni_into` does and with the same arguments -- the same packed panels
(:func:`nanoopt.kernels.avx2.pack_weights_s8`), the same arithmetic -- on 512-bit registers, and the whole
quantized linear layer (Jacob et al. 2018, eq. 7) with the requantization done on the accumulators while they are
still in registers.

* **Instruction.** ``vpdpbusd`` on zmm (``llvm.x86.avx512.vpdpbusd.512``): u8 x s8, groups of 4 products summed
  into 16 int32 lanes, wrapping, no saturation; 64 products per instruction, twice the 256-bit form.
* **The offset trick, as the AVX-VNNI kernel.** ``sum_k (a_k + 128) w_k = sum_k a_k w_k + 128 sum_k w_k``: the
  unsigned operand is ``a XOR 0x80`` and the accumulators start at ``-128 * sum_k W[n, k]``, read from the
  row-sum footer of the packed panels. Every int32 addition wraps modulo 2**32 and the true result fits int32
  (``K <= avx2.MAX_K_S8``), so the wrapped result is the exact one: bit-identical to int64 arithmetic.
* **Layout.** The packed panel ``panels[p, g]`` is 64 contiguous bytes, 4 K values of the 16 output channels
  ``16 p .. 16 p + 15`` (``panels[p, g, r, j, t] = W[16 p + 8 r + j, 4 g + t]``): exactly one zmm operand, lane
  ``8 r + j`` = channel ``16 p + 8 r + j``. So the weights are packed once for every x86 kernel.
* **Activations.** One pass (:func:`pack_rows`) adds 128 and lays the rows out for the tiles: each group of 8
  rows interleaved by 4-byte groups, so that an 8-row tile reads one contiguous stream of 32 bytes per K step (the
  broadcasts of a step share a cache line and the hardware prefetcher sees one stream, not eight); rows left
  after the last group of 8 follow in order. A caller that runs a layer again and again passes the buffer
  (``linear_s8_into(..., packed)``).
* **Register tile.** 8 rows of A x 2 panels (32 channels): 16 zmm accumulators, per step of 4 K values two
  64-byte weight loads and 8 four-byte broadcasts for 16 ``vpdpbusd``. An odd last panel uses an 8 x 1 tile;
  rows left over below a multiple of 8 use one-row tiles whose accumulators are split over even and odd K steps
  (4 and 2 independent chains, so that a single row is not bound by the instruction's latency). The 8-row tiles
  are inlined into the driver, and the driver and the one-row tiles are compiled without Numba's reference
  counting (they allocate nothing): counting the arrays an inlined tile takes costs library calls per tile that
  were measured at 5-20% of a layer.
* **Edges.** A partial last panel (N not a multiple of 16) is written with masked stores (``llvm.masked.store``:
  ``vpmovdb``/``vmovdqu32`` under a lane mask), and read back between K blocks with masked loads; nothing past
  column N is touched.
* **Blocking.** K blocks of ``avx2.S8_BLOCK_K`` values (one block up to K = 4096), row blocks of ``ROW_BLOCK``
  rows; a tile starts from ``-128 * rowsum`` in the first K block and from its stored int32 partial products
  after it.
* **Fused requantization** (:func:`linear_s8_into`). When the layer's accumulator bound fits int32 and every
  shift is a right shift of at most 30 (``numba_cpu`` calls this the "fast" epilogue), the accumulators start from
  the per-channel offset ``bias - x_zp * rowsum(W)`` as well, and after the last K block they are requantized in
  registers --
  :func:`nanoopt.kernels.requant.multiply_fast` (``floor((v m0 + 2^30) / 2^31)``, then gemmlowp's rounding divide
  by ``2^shift``) folded into one rounding shift of the 64-bit product (:func:`_emit` derives it), clamp (ReLU =
  clamp at the zero point), zero point -- and stored as int8; no int32 product matrix is written or read back.
  Equal bit for bit to :func:`nanoopt.kernels.reference.quantized_linear` (tested, extreme sums included).

Availability: the 512-bit kernels compile only for a target with AVX-512F, AVX-512BW and AVX-512 VNNI (and
AVX2, for the rest of the x86 path); LLVM aborts the process on any other, so :func:`target_has_avx512_vnni`
checks the CPU, Numba's target and ``NANOOPT_CPU_FEATURES`` (:func:`nanoopt.kernels.cpu_features.usable_features`: e.g.
``NANOOPT_CPU_FEATURES=avx2`` or ``avx2,avx512vnni,avx512vl`` keep the 256-bit kernels, ``none`` the portable ones)
*before* anything is compiled, and :func:`available` then compiles and checks a small product. Callers of the
jitted functions must check :func:`available` first. On CPUs that split 512-bit instructions in two 256-bit
halves (AMD Zen 4) the instruction throughput in products per cycle is the 256-bit one; the gain there comes
from half the instructions, loads and broadcasts per product and from the fused epilogue.

>>> w = np.array([[1, -2, 3], [-127, 0, 127]], dtype=np.int8)
>>> a = np.array([[4, 5, -128]], dtype=np.int8)
>>> out = np.empty((1, 2), np.int32)
>>> if available(): gemm_s8s8s32_avx512_into(a, avx2.pack_weights_s8(w).panels, 2, 3, out)
... else: out[:] = [[-390, -16764]]
>>> out.tolist()
[[-390, -16764]]
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, models, register_model

from nanoopt.kernels import avx2
from nanoopt.kernels.cpu_features import DISABLE_VNNI_ENV, avx2_kernel_works, switched_on, usable_features
from nanoopt.kernels.llvm_intrinsics import declare, element_pointer, splat
from nanoopt.spec import multiply_by_quantized_multiplier

__all__ = [
    "FEATURES",
    "ROW_BLOCK",
    "available",
    "gemm_s8s8s32_avx512_into",
    "linear_s8_chain",
    "linear_s8_into",
    "linear_s8_reference",
    "linear_s8_rows_parallel",
    "pack_rows",
    "pack_rows_into",
    "pack_rows_reference",
    "requant_s8",
    "target_has_avx512_vnni",
]

FEATURES = frozenset({"avx2", "avx512f", "avx512bw", "avx512vnni"})  # what the 512-bit kernels need
LANES = 16  # int32 lanes in one 512-bit register (= output channels of one packed panel)
TILE_ROWS = 8  # rows of A per register tile
STEP = avx2.S8_STEP  # int8 elements of one panel step: 64 bytes, one zmm
GROUP = avx2.S8_GROUP  # K values per step
ROW_BLOCK = 256  # rows of A per cache block (a multiple of TILE_ROWS)

_I8X16, _I8X64, _I32X16, _I64X8 = (ir.VectorType(ir.IntType(bits), lanes) for bits, lanes in
                                    ((8, 16), (8, 64), (32, 16), (64, 8)))


class Int32x16Type(types.Type):
    """Numba type of one AVX-512 register, viewed as sixteen int32 lanes (``<16 x i32>`` in LLVM): values of it stay
    in registers across calls and loop iterations."""

    def __init__(self) -> None:
        super().__init__(name="int32x16")


int32x16 = Int32x16Type()
register_model(Int32x16Type)(functools.partial(models.PrimitiveModel, be_type=_I32X16))


def _pointer(context, builder, signature, args, vector_type):
    """``args[0]`` (a C array) advanced by ``args[1]`` elements, cast to a pointer to ``vector_type``."""
    address = element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
    return builder.bitcast(address, vector_type.as_pointer())


def _c_array(array, dtypes) -> bool:
    return isinstance(array, types.Array) and array.layout == "C" and array.dtype in dtypes


# ---------------------------------------------------------------------------------------------------------
# Intrinsics. Offsets count elements of the array's dtype; no bounds checks (the drivers check shapes).


def _named(definition, name: str, doc: str):
    definition.__name__ = definition.__qualname__ = name
    definition.__doc__ = doc
    return intrinsic(definition)


def _vector_signature(operands: tuple, emit):
    """The typing answer of a lane-wise intrinsic: int32x16 ``emit(builder, *operands)``, or None if an operand is
    not an int32x16."""
    if any(operand != int32x16 for operand in operands):
        return None

    def codegen(context, builder, signature, args):
        return emit(builder, *args)

    return int32x16(*operands), codegen


def _lanewise(name: str, arity: int, emit, doc: str):
    """An intrinsic of ``arity`` (0 to 3) int32x16 operands returning the int32x16 ``emit(builder, *operands)``
    (Numba's intrinsics take no ``*args``, hence one definition per arity)."""
    definitions = (lambda typingctx: _vector_signature((), emit),
                   lambda typingctx, x: _vector_signature((x,), emit),
                   lambda typingctx, x, y: _vector_signature((x, y), emit),
                   lambda typingctx, x, y, z: _vector_signature((x, y, z), emit))
    return _named(definitions[arity], name, doc)


def _memory_signature(array, offset, vector: tuple, dtypes: tuple, emit):
    """The typing answer of a load (``vector == ()``) or a store (``vector == (int32x16,)``)."""
    if not (_c_array(array, dtypes) and isinstance(offset, types.Integer)):
        return None
    if vector and vector[0] != int32x16:
        return None

    def codegen(context, builder, signature, args):
        value = emit(context, builder, signature, args)
        return context.get_dummy_value() if vector else value

    return (types.none(array, offset, *vector) if vector else int32x16(array, offset)), codegen


def _memory(name: str, dtypes: tuple, emit, doc: str, stores: bool = False):
    """An intrinsic ``(array, offset)`` -> int32x16 (a load), or ``(array, offset, vector)`` -> None (a store), on a
    C array of one of ``dtypes``; ``emit(context, builder, signature, args)`` makes the LLVM value."""
    if stores:
        return _named(lambda typingctx, array, offset, vector: _memory_signature(array, offset, (vector,), dtypes,
                                                                                 emit), name, doc)
    return _named(lambda typingctx, array, offset: _memory_signature(array, offset, (), dtypes, emit), name, doc)


def _vpdpbusd(builder, accumulator, a_unsigned, w_bytes):
    dot = declare(builder, "llvm.x86.avx512.vpdpbusd.512", _I32X16, [_I32X16, _I8X64, _I8X64])
    return builder.call(dot, [accumulator, builder.bitcast(a_unsigned, _I8X64), builder.bitcast(w_bytes, _I8X64)])


_zero = _lanewise("_zero", 0, lambda builder: ir.Constant(_I32X16, [0] * LANES), "An int32x16 of zeros.")
_add = _lanewise("_add", 2, lambda builder, x, y: builder.add(x, y), "Lane-wise int32 sum, modulo 2**32.")
_times_minus_128 = _lanewise("_times_minus_128", 1,
                             lambda builder, x: builder.mul(x, ir.Constant(_I32X16, [-128] * LANES)),
                             "Lane-wise ``-128 * x``, modulo 2**32.")
_dot = _lanewise("_dot", 3, _vpdpbusd, "``accumulator + sum_t a[t] * w[j, t]`` per lane j over its 4 bytes, ``a`` as "
                 "u8, ``w`` as s8 (vpdpbusd zmm); no saturation, the sum wraps modulo 2**32.")
_load = _memory("_load", (types.int8, types.int32, types.int64),
                lambda context, builder, signature, args: builder.load(
                    _pointer(context, builder, signature, args, _I32X16), align=1),
                "The 64 bytes at element ``offset`` of an int8/int32/int64 C array (unaligned).")
_broadcast4 = _memory("_broadcast4", (types.int8,),
                      lambda context, builder, signature, args: splat(builder, builder.load(
                          _pointer(context, builder, signature, args, ir.IntType(32)), align=1), _I32X16),
                      "The 4 bytes at element ``offset`` of an int8 C array, repeated in all 16 lanes (vpbroadcastd).")
def _requantize_ir(builder, value, constants, zero, low, high):
    """LLVM IR of the fused epilogue on one vector (see :func:`_emit`): ``constants`` as LLVM values, ``zero``,
    ``low``, ``high`` splatted int32 vectors."""
    m0, add_even, add_odd, negative_even, negative_odd, exponent_even, exponent_odd = (
        builder.bitcast(constant, _I64X8) if i >= 1 else constant for i, constant in enumerate(constants))
    total = builder.bitcast(value, _I64X8)  # the sum with the offset (the tile started from it)
    multiplier = builder.bitcast(m0, _I64X8)
    thirty_two = ir.Constant(_I64X8, [32] * 8)

    def even_lanes(x):  # the even 32-bit lanes, sign-extended to 64 bits
        return builder.ashr(builder.shl(x, thirty_two), thirty_two)

    def odd_lanes(x):  # the odd 32-bit lanes, sign-extended
        return builder.ashr(x, thirty_two)

    limit = ir.Constant(_I64X8, [-(1 << 30)] * 8)
    zeros = ir.Constant(_I64X8, [0] * 8)
    halves = []
    for lanes, add, negative, exponent in ((even_lanes, add_even, negative_even, exponent_even),
                                           (odd_lanes, add_odd, negative_odd, exponent_odd)):
        product = builder.mul(lanes(total), lanes(multiplier))  # vpmuldq, exact
        below = builder.icmp_signed("<", product, limit)
        nudged = builder.sub(builder.add(product, add), builder.select(below, negative, zeros))
        halves.append(builder.ashr(nudged, exponent))
    even = builder.bitcast(halves[0], _I32X16)
    odd = builder.bitcast(builder.shl(halves[1], thirty_two), _I32X16)
    scaled = builder.shuffle_vector(even, odd, ir.Constant(ir.VectorType(ir.IntType(32), LANES),
                                                           [i + LANES * (i % 2) for i in range(LANES)]))
    floor, ceiling = builder.sub(low, zero), builder.sub(high, zero)
    scaled = builder.select(builder.icmp_signed("<", scaled, floor), floor, scaled)
    scaled = builder.select(builder.icmp_signed(">", scaled, ceiling), ceiling, scaled)
    return builder.add(scaled, zero)


def _lane_mask(context, builder, count, count_type):
    """``<16 x i1>``: lanes ``0 .. count - 1`` on (all of them from ``count >= 16``; ``count >= 1``)."""
    count = context.cast(builder, count, count_type, types.int64)
    clipped = builder.select(builder.icmp_signed("<", count, ir.Constant(ir.IntType(64), LANES)), count,
                             ir.Constant(ir.IntType(64), LANES))
    bits = builder.sub(builder.shl(ir.Constant(ir.IntType(64), 1), clipped), ir.Constant(ir.IntType(64), 1))
    return builder.bitcast(builder.trunc(bits, ir.IntType(LANES)), ir.VectorType(ir.IntType(1), LANES))


def _vector_name(vector_type) -> str:
    """LLVM's mangling of a vector type in an intrinsic's name, e.g. ``v16i8``."""
    return f"v{vector_type.count}i{vector_type.element.width}"


def _pointer_name(pointer_type) -> str:
    """LLVM's mangling of a pointer to a vector: ``p0v16i8`` for a typed pointer (what LLVM 14 expects; newer LLVMs,
    whose pointers are opaque, remangle such a name to ``p0`` when they read the module), ``p0`` for an opaque one."""
    pointee = getattr(pointer_type, "pointee", None)
    return "p0" if pointee is None or getattr(pointer_type, "is_opaque", True) else f"p0{_vector_name(pointee)}"


def _masked_store(builder, value, pointer, mask):
    """``llvm.masked.store`` of the lanes of ``value`` that ``mask`` selects (the name mangled for this LLVM)."""
    name = f"llvm.masked.store.{_vector_name(value.type)}.{_pointer_name(pointer.type)}"
    store = declare(builder, name, ir.VoidType(), [value.type, pointer.type, ir.IntType(32), mask.type])
    builder.call(store, [value, pointer, ir.Constant(ir.IntType(32), 1), mask])


def _masked_load(builder, pointer, mask, vector_type):
    """``llvm.masked.load`` of the lanes ``mask`` selects, zeros elsewhere (nothing else is read)."""
    name = f"llvm.masked.load.{_vector_name(vector_type)}.{_pointer_name(pointer.type)}"
    load = declare(builder, name, vector_type, [pointer.type, ir.IntType(32), mask.type, vector_type])
    return builder.call(load, [pointer, ir.Constant(ir.IntType(32), 1), mask, ir.Constant(vector_type, None)])


@intrinsic
def _begin(typingctx, products, offset, count, first, start):
    """A tile accumulator's start: ``start`` in the first K block (``first``), else the int32 partial products at
    element ``offset`` of ``products``, its first ``count`` lanes (the rest zero; nothing past them is read)."""
    if not (_c_array(products, (types.int32,)) and isinstance(offset, types.Integer)
            and isinstance(count, types.Integer) and isinstance(first, types.Boolean) and start == int32x16):
        return None

    def codegen(context, builder, signature, args):
        products, offset, count, first, start = args
        with builder.if_else(first) as (then, otherwise):
            with then:
                from_start = start
                start_block = builder.block
            with otherwise:
                pointer = _pointer(context, builder, signature, args, _I32X16)
                stored = _masked_load(builder, pointer, _lane_mask(context, builder, count, signature.args[2]),
                                      _I32X16)
                stored_block = builder.block
        result = builder.phi(_I32X16)
        result.add_incoming(from_start, start_block)
        result.add_incoming(stored, stored_block)
        return result

    return int32x16(products, offset, count, first, start), codegen


@intrinsic
def _panel_constants(typingctx, m0, wide, panel, requantize):
    """The seven int32x16 of the fused epilogue for panel ``panel`` (:func:`_emit`): its ``m0`` (16 channels), then
    the six 8-lane int64 vectors of ``wide`` (:func:`requant_s8`); zeros unless ``requantize`` (nothing is read
    then)."""
    if not (_c_array(m0, (types.int32,)) and _c_array(wide, (types.int64,)) and isinstance(panel, types.Integer)
            and isinstance(requantize, types.Boolean)):
        return None
    result_type = types.UniTuple(int32x16, 7)

    def codegen(context, builder, signature, args):
        m0, wide, panel, requantize = args
        panel = context.cast(builder, panel, signature.args[2], types.int64)
        tuple_type = context.get_value_type(result_type)

        def load(array_index, element):
            address = element_pointer(context, builder, signature.args[array_index], args[array_index], types.int64,
                                      element)
            return builder.load(builder.bitcast(address, _I32X16.as_pointer()), align=1)

        with builder.if_else(requantize) as (then, otherwise):
            with then:
                channel = builder.mul(panel, ir.Constant(ir.IntType(64), LANES))
                base = builder.mul(panel, ir.Constant(ir.IntType(64), 3 * LANES))
                values = [load(0, channel)]
                values += [load(1, builder.add(base, ir.Constant(ir.IntType(64), 8 * i))) for i in range(6)]
                loaded = ir.Constant(tuple_type, ir.Undefined)
                for i, value in enumerate(values):
                    loaded = builder.insert_value(loaded, value, i)
                loaded_block = builder.block
            with otherwise:
                otherwise_block = builder.block
        result = builder.phi(tuple_type)
        result.add_incoming(loaded, loaded_block)
        result.add_incoming(ir.Constant(tuple_type, None), otherwise_block)
        return result

    return result_type(m0, wide, panel, requantize), codegen


@intrinsic
def _emit(typingctx, products, out, offset, count, vector, constants, zero_point, low, high, requantize):
    """Write the first ``count`` lanes (all 16 from ``count >= 16``) of a tile accumulator at element ``offset``:
    when ``requantize``, requantized to int8 into ``out``, else as int32 into ``products``; nothing past them is
    written (masked stores).

    The requantization, lane-wise, is ``clip(rdivpot(floor((v m0 + 2^30) / 2^31), shift), low - zp, high - zp) +
    zp`` for the sum ``v`` (offset included) in one rounding step on 64-bit products: with ``P = v m0`` (exact in
    int64) and ``T = floor((P + 2^30) / 2^31)`` (:func:`nanoopt.kernels.requant.multiply_fast`), gemmlowp's rounding
    divide ``rdivpot(T, s) = floor((T + 2^(s-1) - [T < 0]) / 2^s)`` (s >= 1; ``T`` for s = 0) and nested floors
    ``floor(floor(X / a) / b) = floor(X / (a b))`` give

        ``rdivpot(T, s) = (P + add - [P < -2^30] negative) >> (31 + s)``,
        ``add = 2^30 + 2^(30+s) [s >= 1]``, ``negative = 2^31 [s >= 1]``

    (arithmetic shift; no overflow in int64 as ``|P| < 2^62``; the result fits int32). ``constants``: the panel's
    :func:`_panel_constants`; the products are ``vpmuldq`` on the even and the odd 32-bit lanes, merged back into
    32-bit lanes before the clamp.
    """
    if not (_c_array(products, (types.int32,)) and _c_array(out, (types.int8,)) and isinstance(offset, types.Integer)
            and isinstance(count, types.Integer) and vector == int32x16 and isinstance(constants, types.UniTuple)
            and constants.dtype == int32x16 and constants.count == 7
            and all(isinstance(s, types.Integer) for s in (zero_point, low, high))
            and isinstance(requantize, types.Boolean)):
        return None

    def codegen(context, builder, signature, args):
        products, out, offset, count, vector, constants, zero_point, low, high, requantize = args
        mask = _lane_mask(context, builder, count, signature.args[3])
        with builder.if_else(requantize) as (then, otherwise):
            with then:
                zero, low, high = (splat(builder, context.cast(builder, arg, typ, types.int32), _I32X16)
                                   for arg, typ in zip(args[6:9], signature.args[6:9], strict=True))
                values = [builder.extract_value(constants, i) for i in range(7)]
                codes = builder.trunc(_requantize_ir(builder, vector, values, zero, low, high), _I8X16)
                address = element_pointer(context, builder, signature.args[1], out, signature.args[2], offset)
                _masked_store(builder, codes, builder.bitcast(address, _I8X16.as_pointer()), mask)
            with otherwise:
                address = element_pointer(context, builder, signature.args[0], products, signature.args[2], offset)
                _masked_store(builder, vector, builder.bitcast(address, _I32X16.as_pointer()), mask)
        return context.get_dummy_value()

    return types.none(products, out, offset, count, vector, constants, zero_point, low, high, requantize), codegen


def _shuffle(builder, a, b, mask):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), len(mask)), mask))


@intrinsic
def _interleave_8x16(typingctx, words, source, stride, target, destination):
    """Rows ``r = 0..7`` of 16 int32 words at ``words[source + r * stride ..]``, each byte + 128 (``XOR 0x80``),
    written to ``target[destination .. + 128]`` word-interleaved: ``target[destination + 8 g + r] = words[source + r
    stride + g] ^ 0x80808080`` (8 loads, 24 two-source shuffles -- pairs of rows, then quads, then all 8 -- and 8
    stores). Portable LLVM IR: no x86 instruction is named."""
    if not (_c_array(words, (types.int32,)) and _c_array(target, (types.int32,))
            and all(isinstance(value, types.Integer) for value in (source, stride, destination))):
        return None

    def codegen(context, builder, signature, args):
        words, source, stride, target, destination = args
        source, stride, destination = (context.cast(builder, value, typ, types.int64) for value, typ in
                                       ((source, signature.args[1]), (stride, signature.args[2]),
                                        (destination, signature.args[4])))
        flip = ir.Constant(_I32X16, [-2139062144] * LANES)  # 0x80808080
        rows = []
        for r in range(TILE_ROWS):
            offset = builder.add(source, builder.mul(stride, ir.Constant(ir.IntType(64), r)))
            address = element_pointer(context, builder, signature.args[0], words, types.int64, offset)
            rows.append(builder.xor(builder.load(builder.bitcast(address, _I32X16.as_pointer()), align=1), flip))
        pairs = {(p, h): _shuffle(builder, rows[2 * p], rows[2 * p + 1],
                                  [x for g in range(8 * h, 8 * h + 8) for x in (g, 16 + g)])
                 for p in range(4) for h in range(2)}  # groups 8h..8h+7 x rows 2p, 2p+1
        quads = {(q, h, part): _shuffle(builder, pairs[(2 * q, h)], pairs[(2 * q + 1, h)],
                                        [x for g in range(4 * part, 4 * part + 4)
                                         for x in (2 * g, 2 * g + 1, 16 + 2 * g, 17 + 2 * g)])
                 for q in range(2) for h in range(2) for part in range(2)}  # 4 groups x rows 4q..4q+3
        for h in range(2):
            for part in range(2):
                for s in range(2):  # 2 groups x all 8 rows: output vector 4 h + 2 part + s
                    mask = [x for g in (2 * s, 2 * s + 1) for x in [*range(4 * g, 4 * g + 4),
                                                                       *range(16 + 4 * g, 16 + 4 * g + 4)]]
                    vector = _shuffle(builder, quads[(0, h, part)], quads[(1, h, part)], mask)
                    offset = builder.add(destination, ir.Constant(ir.IntType(64), LANES * (4 * h + 2 * part + s)))
                    address = element_pointer(context, builder, signature.args[3], target, types.int64, offset)
                    builder.store(vector, builder.bitcast(address, _I32X16.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.none(words, source, stride, target, destination), codegen


# ---------------------------------------------------------------------------------------------------------
# The activations, laid out for the register tiles: one pass that also adds 128.


@numba.njit(cache=True)
def pack_rows(a: np.ndarray, padded_k: int) -> np.ndarray:
    """The int8 activations ``a`` (M, K) as the offset-binary bytes ``a + 128`` (``a XOR 0x80``) the tiles read:
    a flat int8 array of ``M * padded_k`` bytes (``padded_k``: K rounded up to a multiple of 4; the padding bytes
    meet zero weights, so any value would do), equal to :func:`pack_rows_reference`.

    Rows in whole groups of :data:`TILE_ROWS` are interleaved by 4-byte groups -- bytes ``[32 g + 4 r, 32 g + 4 r
    + 4)`` of the tile's block are ``a[8 t + r, 4 g : 4 g + 4] + 128`` -- so that an 8-row tile reads one
    contiguous stream of 32 bytes per K step; the rows after the last whole tile follow row by row (the one-row
    tiles read them). Portable code (no x86 instruction): it runs anywhere.

    >>> pack_rows(np.array([[0, 1, 2, 3, -128]], np.int8), 8)[:5].tolist()
    [-128, -127, -126, -125, 0]
    """
    packed = np.empty(a.shape[0] * padded_k, np.int8)  # (M * K padded,)
    pack_rows_into(a, padded_k, packed)
    return packed


@numba.njit(cache=True)
def pack_rows_into(a: np.ndarray, padded_k: int, packed: np.ndarray) -> None:
    """:func:`pack_rows` into the first ``M * padded_k`` bytes of the int8 buffer ``packed`` (for a caller that
    keeps the buffer: a fresh one costs page faults at every call, about 2.6 us for 200 KB).

    >>> buffer = np.zeros(8, np.int8); pack_rows_into(np.array([[0, 1, 2, 3, -128]], np.int8), 8, buffer)
    >>> buffer[:5].tolist()
    [-128, -127, -126, -125, 0]
    """
    m, k = a.shape
    groups = padded_k // GROUP
    if padded_k % GROUP or padded_k < k or packed.shape[0] < m * padded_k:
        raise ValueError("pack_rows_into: padded_k must be K rounded up to a multiple of 4 and packed must hold "
                         "M * padded_k bytes")
    if m == 0 or groups == 0:
        return
    source = a
    if k != padded_k:  # whole 4-byte groups; the padding is 0 here, 0x80 once offset
        source = np.zeros((m, padded_k), np.int8)  # (M, K padded)
        for i in range(m):
            for j in range(k):
                source[i, j] = a[i, j]
    target = packed[: m * padded_k].view(np.int32)
    words = source.reshape(-1).view(np.int32)  # (M * groups,): 4 K values per word
    flip = np.int32(-2139062144)  # 0x80808080: +128 on each byte
    tiles = m // TILE_ROWS
    for t in range(tiles):
        base = t * TILE_ROWS * groups
        if groups >= LANES:  # 16 groups of the 8 rows at a time, in registers; the last block may overlap
            for g in range(0, groups, LANES):
                g = min(g, groups - LANES)
                _interleave_8x16(words, base + g, groups, target, base + g * TILE_ROWS)
        else:
            for g in range(groups):
                for r in range(TILE_ROWS):
                    target[base + g * TILE_ROWS + r] = words[(t * TILE_ROWS + r) * groups + g] ^ flip
    for index in range(tiles * TILE_ROWS * groups, m * groups):
        target[index] = words[index] ^ flip


def pack_rows_reference(a: np.ndarray) -> np.ndarray:
    """NumPy reference of :func:`pack_rows` (padding bytes as there: ``0x80``).

    >>> pack_rows_reference(np.array([[0, 1, 2, 3, -128]], np.int8))[:5].tolist()
    [-128, -127, -126, -125, 0]
    """
    m, k = a.shape
    groups = -(-k // GROUP)
    shifted = np.zeros((m, groups * GROUP), np.int8)  # (M, K padded)
    shifted[:, :k] = a
    shifted = shifted ^ np.int8(-128)
    tiles = m // TILE_ROWS
    head = shifted[: tiles * TILE_ROWS].reshape(tiles, TILE_ROWS, groups, GROUP).transpose(0, 2, 1, 3)
    return np.concatenate([head.reshape(-1), shifted[tiles * TILE_ROWS :].reshape(-1)])


# ---------------------------------------------------------------------------------------------------------
# Register tiles on the packed rows, inlined into the driver. Each starts its accumulators (:func:`_begin`), runs
# ``steps`` K steps and writes them (:func:`_emit`). Only intrinsics touch the arrays here: an inlined Numba helper
# that takes an array and branches makes Numba count references around it, a library call each time.


@numba.njit(cache=True, inline="always")
def _dot2(c0, c1, x, v0, v1):
    """One broadcast row step against two panels: ``(c0 + x . v0, c1 + x . v1)``."""
    return _dot(c0, x, v0), _dot(c1, x, v1)


@numba.njit(cache=True, inline="always")
def _begin_pair(products, o, left, first, s0, s1):
    """:func:`_begin` of a row's two accumulators (panels at columns ``o`` and ``o + 16``, ``left`` columns left)."""
    return _begin(products, o, left, first, s0), _begin(products, o + LANES, left - LANES, first, s1)


@numba.njit(cache=True, inline="always")
def _emit_pair(products, out, o, left, c0, c1, constants, epilogue, requantize):
    """:func:`_emit` of a row's two accumulators; ``constants``: the two panels' :func:`_panel_constants`."""
    _emit(products, out, o, left, c0, constants[0], epilogue[3], epilogue[4], epilogue[5], requantize)
    _emit(products, out, o + LANES, left - LANES, c1, constants[1], epilogue[3], epilogue[4], epilogue[5], requantize)


@numba.njit(cache=True, inline="always")
def _tile_8x2(a, a0, panels, w0, w1, steps, s0, s1, first, products, out, row, col, n, epilogue, requantize):
    """8 packed rows (their block at ``a0``) x 32 channels (panels at ``w0``/``w1``, both with columns left)."""
    o, left = row * n + col, n - col
    c00, c01 = _begin_pair(products, o, left, first, s0, s1)
    c10, c11 = _begin_pair(products, o + n, left, first, s0, s1)
    c20, c21 = _begin_pair(products, o + 2 * n, left, first, s0, s1)
    c30, c31 = _begin_pair(products, o + 3 * n, left, first, s0, s1)
    c40, c41 = _begin_pair(products, o + 4 * n, left, first, s0, s1)
    c50, c51 = _begin_pair(products, o + 5 * n, left, first, s0, s1)
    c60, c61 = _begin_pair(products, o + 6 * n, left, first, s0, s1)
    c70, c71 = _begin_pair(products, o + 7 * n, left, first, s0, s1)
    for step in range(steps):
        v0, v1 = _load(panels, w0 + step * STEP), _load(panels, w1 + step * STEP)
        k = a0 + step * TILE_ROWS * GROUP  # row r's 4 bytes of this step at k + 4 r
        c00, c01 = _dot2(c00, c01, _broadcast4(a, k), v0, v1)
        c10, c11 = _dot2(c10, c11, _broadcast4(a, k + 4), v0, v1)
        c20, c21 = _dot2(c20, c21, _broadcast4(a, k + 8), v0, v1)
        c30, c31 = _dot2(c30, c31, _broadcast4(a, k + 12), v0, v1)
        c40, c41 = _dot2(c40, c41, _broadcast4(a, k + 16), v0, v1)
        c50, c51 = _dot2(c50, c51, _broadcast4(a, k + 20), v0, v1)
        c60, c61 = _dot2(c60, c61, _broadcast4(a, k + 24), v0, v1)
        c70, c71 = _dot2(c70, c71, _broadcast4(a, k + 28), v0, v1)
    q = _panel_constants(epilogue[1], epilogue[2], col // LANES, requantize), \
        _panel_constants(epilogue[1], epilogue[2], col // LANES + 1, requantize)
    _emit_pair(products, out, o, left, c00, c01, q, epilogue, requantize)
    _emit_pair(products, out, o + n, left, c10, c11, q, epilogue, requantize)
    _emit_pair(products, out, o + 2 * n, left, c20, c21, q, epilogue, requantize)
    _emit_pair(products, out, o + 3 * n, left, c30, c31, q, epilogue, requantize)
    _emit_pair(products, out, o + 4 * n, left, c40, c41, q, epilogue, requantize)
    _emit_pair(products, out, o + 5 * n, left, c50, c51, q, epilogue, requantize)
    _emit_pair(products, out, o + 6 * n, left, c60, c61, q, epilogue, requantize)
    _emit_pair(products, out, o + 7 * n, left, c70, c71, q, epilogue, requantize)


@numba.njit(cache=True, inline="always")
def _tile_8x1(a, a0, panels, w0, steps, s0, first, products, out, row, col, n, epilogue, requantize):
    """8 packed rows x 16 channels (one panel)."""
    m0, wide, zero_point, low, high = epilogue[1:]
    o, left = row * n + col, n - col
    c0, c1 = _begin(products, o, left, first, s0), _begin(products, o + n, left, first, s0)
    c2, c3 = _begin(products, o + 2 * n, left, first, s0), _begin(products, o + 3 * n, left, first, s0)
    c4, c5 = _begin(products, o + 4 * n, left, first, s0), _begin(products, o + 5 * n, left, first, s0)
    c6, c7 = _begin(products, o + 6 * n, left, first, s0), _begin(products, o + 7 * n, left, first, s0)
    for step in range(steps):
        v0 = _load(panels, w0 + step * STEP)
        k = a0 + step * TILE_ROWS * GROUP
        c0, c1 = _dot(c0, _broadcast4(a, k), v0), _dot(c1, _broadcast4(a, k + 4), v0)
        c2, c3 = _dot(c2, _broadcast4(a, k + 8), v0), _dot(c3, _broadcast4(a, k + 12), v0)
        c4, c5 = _dot(c4, _broadcast4(a, k + 16), v0), _dot(c5, _broadcast4(a, k + 20), v0)
        c6, c7 = _dot(c6, _broadcast4(a, k + 24), v0), _dot(c7, _broadcast4(a, k + 28), v0)
    q0 = _panel_constants(m0, wide, col // LANES, requantize)
    _emit(products, out, o, left, c0, q0, zero_point, low, high, requantize)
    _emit(products, out, o + n, left, c1, q0, zero_point, low, high, requantize)
    _emit(products, out, o + 2 * n, left, c2, q0, zero_point, low, high, requantize)
    _emit(products, out, o + 3 * n, left, c3, q0, zero_point, low, high, requantize)
    _emit(products, out, o + 4 * n, left, c4, q0, zero_point, low, high, requantize)
    _emit(products, out, o + 5 * n, left, c5, q0, zero_point, low, high, requantize)
    _emit(products, out, o + 6 * n, left, c6, q0, zero_point, low, high, requantize)
    _emit(products, out, o + 7 * n, left, c7, q0, zero_point, low, high, requantize)


@numba.njit(cache=True, _nrt=False)
def _tile_1x2(a, a0, panels, w0, w1, steps, s0, s1, first, products, out, row, col, n, epilogue, requantize):
    """One row (its bytes from ``a0``, in order) x 32 channels; even and odd K steps in separate accumulators (4
    chains, so that a single row is not bound by the instruction's latency), summed at the end."""
    o, left = row * n + col, n - col
    c0, c1 = _begin_pair(products, o, left, first, s0, s1)
    d0 = d1 = _zero()
    step = 0
    while step + 1 < steps:
        x = _broadcast4(a, a0 + step * GROUP)
        c0, c1 = _dot2(c0, c1, x, _load(panels, w0 + step * STEP), _load(panels, w1 + step * STEP))
        x = _broadcast4(a, a0 + (step + 1) * GROUP)
        d0, d1 = _dot2(d0, d1, x, _load(panels, w0 + (step + 1) * STEP), _load(panels, w1 + (step + 1) * STEP))
        step += 2
    if step < steps:
        x = _broadcast4(a, a0 + step * GROUP)
        c0, c1 = _dot2(c0, c1, x, _load(panels, w0 + step * STEP), _load(panels, w1 + step * STEP))
    q = _panel_constants(epilogue[1], epilogue[2], col // LANES, requantize), \
        _panel_constants(epilogue[1], epilogue[2], col // LANES + 1, requantize)
    _emit_pair(products, out, o, left, _add(c0, d0), _add(c1, d1), q, epilogue, requantize)


@numba.njit(cache=True, _nrt=False)
def _tile_1x1(a, a0, panels, w0, steps, s0, first, products, out, row, col, n, epilogue, requantize):
    """One row x 16 channels, even and odd K steps in separate accumulators."""
    m0, wide, zero_point, low, high = epilogue[1:]
    o, left = row * n + col, n - col
    c0 = _begin(products, o, left, first, s0)
    d0 = _zero()
    step = 0
    while step + 1 < steps:
        c0 = _dot(c0, _broadcast4(a, a0 + step * GROUP), _load(panels, w0 + step * STEP))
        d0 = _dot(d0, _broadcast4(a, a0 + (step + 1) * GROUP), _load(panels, w0 + (step + 1) * STEP))
        step += 2
    if step < steps:
        c0 = _dot(c0, _broadcast4(a, a0 + step * GROUP), _load(panels, w0 + step * STEP))
    q0 = _panel_constants(m0, wide, col // LANES, requantize)
    _emit(products, out, o, left, _add(c0, d0), q0, zero_point, low, high, requantize)


# ---------------------------------------------------------------------------------------------------------
# Drivers.


@numba.njit(cache=True)
def _start(panels, p, panel_size, groups):
    """The accumulators' start for panel ``p`` in the first K block: ``-128 * rowsum`` (the panel's footer)."""
    return _times_minus_128(_load(panels, p * panel_size + groups * STEP))


@numba.njit(cache=True, _nrt=False)
def _product(packed, m, padded_k, panels, n, products, out, epilogue, fused):
    """``a @ W.T`` from the packed rows (:func:`pack_rows`) by K blocks of ``avx2.S8_BLOCK_K`` values, row blocks
    of :data:`ROW_BLOCK` rows, panel pairs and register tiles. Every K block but the last stores int32 partial
    products in ``products``; the last writes int32 products there too, or, when ``fused``, requantized int8 into
    ``out``. ``epilogue``: ``(offsets, m0, wide, zero_point, low, high)`` of :func:`requant_s8`."""
    groups = padded_k // GROUP
    n_panels = (n + LANES - 1) // LANES
    panel_size = (groups + 1) * STEP
    block = avx2.S8_BLOCK_K // GROUP
    full = m // TILE_ROWS * TILE_ROWS
    for g0 in range(0, groups, block):
        steps = min(block, groups - g0)
        first = g0 == 0
        requantize = fused and g0 + steps == groups
        for i0 in range(0, m, ROW_BLOCK):
            i1 = min(m, i0 + ROW_BLOCK)
            for p in range(0, n_panels, 2):
                col = p * LANES
                w0 = p * panel_size + g0 * STEP
                s0 = _start(panels, p, panel_size, groups)
                if fused:  # the layer's offsets too: the epilogue finds the sum it requantizes
                    s0 = _add(s0, _load(epilogue[0], col))
                if p + 1 < n_panels:
                    s1 = _start(panels, p + 1, panel_size, groups)
                    if fused:
                        s1 = _add(s1, _load(epilogue[0], col + LANES))
                    w1 = w0 + panel_size
                    for i in range(i0, min(i1, full), TILE_ROWS):
                        _tile_8x2(packed, i * padded_k + g0 * TILE_ROWS * GROUP, panels, w0, w1, steps, s0, s1, first,
                                  products, out, i, col, n, epilogue, requantize)
                    for i in range(max(i0, full), i1):
                        _tile_1x2(packed, i * padded_k + g0 * GROUP, panels, w0, w1, steps, s0, s1, first, products,
                                  out, i, col, n, epilogue, requantize)
                else:
                    for i in range(i0, min(i1, full), TILE_ROWS):
                        _tile_8x1(packed, i * padded_k + g0 * TILE_ROWS * GROUP, panels, w0, steps, s0, first,
                                  products, out, i, col, n, epilogue, requantize)
                    for i in range(max(i0, full), i1):
                        _tile_1x1(packed, i * padded_k + g0 * GROUP, panels, w0, steps, s0, first, products, out, i,
                                  col, n, epilogue, requantize)


@numba.njit(cache=True)
def _no_epilogue():
    """A placeholder epilogue for the raw GEMM (never read: ``fused`` is False)."""
    empty = np.zeros(0, np.int32)
    return empty, empty, np.zeros(0, np.int64), np.int64(0), np.int64(0), np.int64(0)


@numba.njit(cache=True)
def _epilogue(requant):
    """What the tiles read of :func:`requant_s8`'s constants: ``(offsets, m0, wide, zero_point, low, high)``."""
    return requant[0], requant[1], requant[6], requant[3], requant[4], requant[5]


@numba.njit(cache=True)
def gemm_s8s8s32_avx512_into(a: np.ndarray, panels: np.ndarray, n: int, k: int, out: np.ndarray) -> None:
    """``out[:, :] = a @ W.T`` exactly with 512-bit ``vpdpbusd``; arguments and result as
    :func:`nanoopt.kernels.avx2.gemm_s8s8s32_vnni_into` (int8 ``a`` (M, K), ``panels = pack_weights_s8(W).panels``,
    int32 ``out`` (M, N) overwritten; shapes checked, dtypes at compile time). Call only where :func:`available`.

    >>> w = np.array([[1, -2, 3]], dtype=np.int8)
    >>> a = np.array([[4, 5, -128]], dtype=np.int8)
    >>> out = np.empty((1, 1), np.int32)
    >>> if available(): gemm_s8s8s32_avx512_into(a, avx2.pack_weights_s8(w).panels, 1, 3, out)
    ... else: out[:] = 4 - 10 - 384
    >>> out.tolist()
    [[-390]]
    """
    groups = avx2._check_s8_arguments(a, panels, n, k, out)  # zeroes out for K = 0
    if groups:
        padded_k = groups * GROUP
        _product(pack_rows(a, padded_k), a.shape[0], padded_k, panels, n, out, np.empty((0, 0), np.int8),
                 _no_epilogue(), False)


@numba.njit(cache=True)
def linear_s8_into(x, panels, n, k, requant, products, out, packed=None):
    """One int8 linear layer: ``out = requantize(x @ W.T + offsets)`` as int8 (M, N), exact.

    ``requant``: the constants from :func:`requant_s8`; ``products``: an int32 (M, N) scratch array, used only
    when K spans more than one K block (the partial products between blocks). ``out``: int8 (M, N), C order.
    ``packed``: optional int8 buffer of at least ``M * ceil(K / 4) * 4`` bytes for the rows as the tiles read them
    (:func:`pack_rows_into`), overwritten; a caller that runs the layer again and again keeps one (a fresh buffer
    costs page faults at every call), else one is allocated. Equals :func:`linear_s8_reference` (and
    :func:`nanoopt.kernels.reference.quantized_linear`). Call only where :func:`available`.

    >>> w, x = np.array([[2, 1], [-1, 4]], np.int8), np.array([[10, -3]], np.int8)
    >>> requant = requant_s8(np.array([1, 0]), np.array([2**30, 2**30]), np.array([0, 0]), 0, -128, 127)
    >>> out, scratch = np.empty((1, 2), np.int8), np.empty((1, 2), np.int32)
    >>> if available(): linear_s8_into(x, avx2.pack_weights_s8(w).panels, 2, 2, requant, scratch, out)
    ... else: out[:] = linear_s8_reference(x, w, requant)
    >>> out
    array([[  9, -11]], dtype=int8)
    """
    avx2._check_s8_arguments(x, panels, n, k, products)
    _check_requant(requant, n)
    if out.shape[0] != x.shape[0] or out.shape[1] != n:
        raise ValueError("linear_s8_into: out must have shape (x.shape[0], n)")
    padded_k = (k + GROUP - 1) // GROUP * GROUP
    if packed is None:
        rows = np.empty(x.shape[0] * padded_k, np.int8)  # (M * K padded,)
    else:
        rows = packed
    pack_rows_into(x, padded_k, rows)
    _linear_packed(rows, x.shape[0], padded_k, panels, n, requant, products, out)


@numba.njit(cache=True)
def linear_s8_chain(arguments):
    """Consecutive int8 linear layers in one call: :func:`linear_s8_into` ``(*arguments[i])`` for ``i = 0, 1, ...``
    in turn (the next layer's ``x`` a view of this one's ``out``): the same kernels in the same order, so the same
    integers, without a return to Python between layers (a plan's chain, ``nanoopt.runtime.plan.CHAINS``). The
    argument tuples are all of one Numba type. Call only where :func:`available`.

    >>> w, x = np.array([[2, 1], [-1, 4]], np.int8), np.array([[10, -3]], np.int8)
    >>> requant = requant_s8(np.array([1, 0]), np.array([2**30, 2**30]), np.array([0, 0]), 0, -128, 127)
    >>> panels, scratch = avx2.pack_weights_s8(w).panels, np.empty((1, 2), np.int32)
    >>> middle, out = np.empty((1, 2), np.int8), np.empty((1, 2), np.int8)
    >>> layers = ((x, panels, 2, 2, requant, scratch, middle), (middle, panels, 2, 2, requant, scratch, out))
    >>> if available(): linear_s8_chain(layers)
    ... else: out[:] = linear_s8_reference(linear_s8_reference(x, w, requant), w, requant)
    >>> out
    array([[  4, -26]], dtype=int8)
    """
    for i in range(len(arguments)):
        linear_s8_into(*arguments[i])


@numba.njit(cache=True)
def _check_requant(requant, n):
    """ValueError unless the epilogue constants cover ``n`` channels in whole panels."""
    offsets, m0, shift, wide = requant[0], requant[1], requant[2], requant[6]
    padded_n = (n + LANES - 1) // LANES * LANES
    if offsets.shape[0] < padded_n or m0.shape[0] < padded_n or shift.shape[0] < padded_n or \
            wide.shape[0] < 3 * padded_n:
        raise ValueError("linear_s8_into: the requantization vectors need ceil(n/16)*16 entries")


@numba.njit(cache=True)
def _linear_packed(packed, m, padded_k, panels, n, requant, products, out):
    """:func:`linear_s8_into` on rows already packed by :func:`pack_rows` (``m`` rows, ``padded_k`` bytes each);
    shapes checked by the caller."""
    epilogue = _epilogue(requant)
    if padded_k == 0:  # the empty product: the epilogue of the offsets alone
        for i in range(m):
            for col in range(0, n, LANES):
                constants = _panel_constants(epilogue[1], epilogue[2], col // LANES, True)
                _emit(products, out, i * n + col, n - col, _load(epilogue[0], col), constants, epilogue[3],
                      epilogue[4], epilogue[5], True)
        return
    _product(packed, m, padded_k, panels, n, products, out, epilogue, True)


@numba.njit(cache=True, parallel=True)
def linear_s8_rows_parallel(x, panels, n, k, requant, products, out, rows_per_item):
    """:func:`linear_s8_into` on row blocks of ``x`` in parallel (each block is C-contiguous)."""
    for item in prange((x.shape[0] + rows_per_item - 1) // rows_per_item):
        lo, hi = item * rows_per_item, min((item + 1) * rows_per_item, x.shape[0])
        linear_s8_into(x[lo:hi], panels, n, k, requant, products[lo:hi], out[lo:hi])

# ---------------------------------------------------------------------------------------------------------
# The requantization constants, the NumPy reference and availability.


def requant_s8(offsets: np.ndarray, m0: np.ndarray, shift: np.ndarray, zero_point: int, low: int,
               high: int) -> tuple | None:  # fmt: skip
    """The constants of the fused int8 epilogue, ``(offsets, m0, shift, zero_point, low, high, wide)`` (int32
    vectors padded to whole panels, int64 scalars, and the int64 vectors of :func:`_emit`), or ``None`` where
    it does not apply.

    ``offsets`` = ``bias - x_zp * rowsum(W)`` (N,), ``m0``/``shift`` per channel (N,), the output zero point and
    the clamp ``[low, high]`` (``low`` is the zero point under a fused ReLU). It applies when every offset fits
    int32, ``m0`` is in [2^30, 2^31) and every shift is a right shift in [0, 30]; the caller also guarantees that
    the layer's accumulator bound fits int32 (``numba_cpu`` "fast" epilogue), so ``product + offset`` does too.
    ``wide`` holds, per panel of 16 channels, ``add = 2^30 + 2^(30+s) [s >= 1]``, ``negative = 2^31 [s >= 1]`` and
    ``exponent = 31 + s`` for its even channels then its odd ones (6 vectors of 8).

    >>> constants = requant_s8(np.array([5, -7]), np.array([2**30, 2**30]), np.array([0, 1]), 3, -128, 127)
    >>> constants[0][:3].tolist(), constants[2][:3].tolist(), len(constants[0])
    ([5, -7, 0], [0, 1, 0], 16)
    >>> constants[6][[0, 8, 16, 24, 32, 40]].tolist()  # channel 0 (s = 0), then channel 1 (s = 1)
    [1073741824, 3221225472, 0, 2147483648, 31, 32]
    """
    offsets, m0, shift = (np.asarray(v, np.int64).reshape(-1) for v in (offsets, m0, shift))
    if not (offsets.shape == m0.shape == shift.shape):
        raise ValueError(f"requant_s8: offsets, m0 and shift need one entry per channel, got {offsets.shape}, "
                         f"{m0.shape}, {shift.shape}")
    n = offsets.shape[0]
    if n and (np.abs(offsets).max() > 2**31 - 1 or m0.min() < 2**30 or m0.max() >= 2**31 or shift.min() < 0
              or shift.max() > 30):
        return None
    padded = -(-max(n, 1) // LANES) * LANES
    vectors = []
    for values, fill in ((offsets, 0), (m0, 2**30), (shift, 0)):
        vector = np.full(padded, fill, np.int32)
        vector[:n] = values
        vectors.append(vector)
    s = vectors[2].astype(np.int64)
    rounds = s >= 1
    add = np.int64(1 << 30) + np.where(rounds, np.left_shift(np.int64(1), s + 30), 0)
    negative = np.where(rounds, np.int64(1 << 31), 0)
    parts = [values.reshape(-1, LANES // 2, 2)[:, :, lane] for values in (add, negative, s + 31) for lane in (0, 1)]
    wide = np.ascontiguousarray(np.stack(parts, axis=1), np.int64).reshape(-1)  # (panels * 6 * 8,)
    return (*vectors, np.int64(zero_point), np.int64(low), np.int64(high), wide)


def linear_s8_reference(x: np.ndarray, w: np.ndarray, requant: tuple) -> np.ndarray:
    """NumPy reference of :func:`linear_s8_into`: ``spec.requantize(x @ w.T + offsets)`` clamped, in int64.

    >>> requant = requant_s8(np.array([1, 0]), np.array([2**30, 2**30]), np.array([0, 0]), 0, -128, 127)
    >>> linear_s8_reference(np.array([[10, -3]], np.int8), np.array([[2, 1], [-1, 4]], np.int8), requant)
    array([[  9, -11]], dtype=int8)
    """
    offsets, m0, shift, zero_point, low, high = requant[:6]
    n = w.shape[0]
    acc = x.astype(np.int64) @ w.T.astype(np.int64) + offsets[:n].astype(np.int64)  # (M, N)
    scaled = multiply_by_quantized_multiplier(acc, m0[:n].astype(np.int64), shift[:n].astype(np.int64))
    return np.clip(scaled + int(zero_point), int(low), int(high)).astype(np.int8)


def target_has_avx512_vnni() -> bool:
    """True if AVX-512F, -BW, -VNNI and AVX2 are usable (CPU, Numba's target, ``NANOOPT_CPU_FEATURES``), checked
    without compiling anything.

    >>> isinstance(target_has_avx512_vnni(), bool)
    True
    """
    return FEATURES <= usable_features()


def _self_test() -> bool:
    """Compile the 512-bit GEMM and the fused layer, compare them with int64 NumPy on a product with edge cases."""
    rng = np.random.default_rng(2027)
    m, k, n = 11, 4099, 37  # an 8-row tile plus single rows, 2 K blocks with K % 4 = 3, an odd last panel
    a = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    w = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
    a[0] = -128
    w[0], w[1] = 127, -127
    packed = avx2.pack_weights_s8(w)
    out = np.empty((m, n), np.int32)
    gemm_s8s8s32_avx512_into(a, packed.panels, n, k, out)
    exact = bool(np.array_equal(out, a.astype(np.int64) @ w.T.astype(np.int64)))
    requant = requant_s8(rng.integers(-1000, 1000, n), rng.integers(2**30, 2**31, n), rng.integers(0, 31, n), -3,
                         -128, 127)
    small = a[:, :100].copy()
    fused = np.empty((m, n), np.int8)
    rows = np.empty(m * 100, np.int8)  # the packed rows' buffer, as the runtime's int8 linear step passes one
    linear_s8_into(small, avx2.pack_weights_s8(w[:, :100].copy()).panels, n, 100, requant, out, fused, rows)
    return exact and bool(np.array_equal(fused, linear_s8_reference(small, w[:, :100], requant)))


@functools.cache
def available() -> bool:
    """True if the 512-bit kernels run here: :func:`target_has_avx512_vnni`, neither ``NANOOPT_DISABLE_AVX2`` nor
    ``NANOOPT_DISABLE_AVX_VNNI`` is set, and this module's self-test is exact (it compiles the GEMM and the fused
    layer at the signatures the runtime calls them with -- read-only packed panels, C-contiguous int8 rows -- so
    on an empty cache nothing is compiled twice; the 256-bit kernels of :mod:`nanoopt.kernels.avx2`, which do not
    run where these do, are not compiled for it). Computed once per process; never an exception.

    >>> isinstance(available(), bool)
    True
    """
    if switched_on(DISABLE_VNNI_ENV) or not target_has_avx512_vnni():  # checked without compiling anything
        return False
    return avx2_kernel_works(_self_test)  # NANOOPT_DISABLE_AVX2, then the self-test; any failure: the 256-bit path
