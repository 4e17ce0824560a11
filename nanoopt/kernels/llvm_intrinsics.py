"""256-bit registers as Numba types, and the small LLVM helpers every x86 kernel module builds its intrinsics from.

``numba.extending.intrinsic`` lets jitted code emit LLVM IR. A 256-bit register is a Numba type whose data model
is an LLVM vector (:data:`int32x8`: ``<8 x i32>``; :data:`float32x8`: ``<8 x float>``), so values of that type
stay in registers across calls and loop iterations. This module holds the types, the lane-wise operations that
do not depend on a CPU feature (add, constant vectors, unaligned loads) and three helpers for writing intrinsics:
:func:`is_c_array` (typing), :func:`element_pointer` (address of an element of a C-contiguous array) and
:func:`declare` (an LLVM intrinsic such as ``llvm.x86.avx2.pmadd.wd``, declared once per module).

Nothing here names an x86 instruction: what emits one (:mod:`nanoopt.kernels.avx2`,
:mod:`nanoopt.kernels.sparse_avx2`) may only be compiled where :mod:`nanoopt.kernels.cpu_features` says the CPU
and Numba's target have it.

>>> int32x8, float32x8
(int32x8, float32x8)
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

__all__ = [
    "F32X8",
    "I8X32",
    "I16X16",
    "I32X8",
    "I64X8",
    "LANES",
    "declare",
    "element_pointer",
    "float32x8",
    "int32x8",
    "is_c_array",
    "lanewise",
    "load_at",
    "load_vector",
    "splat",
    "splat_constant",
]

LANES = 8  # 32-bit lanes of one 256-bit register

I8X32 = ir.VectorType(ir.IntType(8), 32)
I16X16 = ir.VectorType(ir.IntType(16), 16)
I32X8 = ir.VectorType(ir.IntType(32), LANES)
I64X8 = ir.VectorType(ir.IntType(64), LANES)
F32X8 = ir.VectorType(ir.FloatType(), LANES)


class Int32x8Type(types.Type):
    """Numba type of one 256-bit register viewed as eight int32 lanes (``<8 x i32>`` in LLVM)."""

    def __init__(self) -> None:
        super().__init__(name="int32x8")


class Float32x8Type(types.Type):
    """Numba type of one 256-bit register viewed as eight float32 lanes (``<8 x float>`` in LLVM)."""

    def __init__(self) -> None:
        super().__init__(name="float32x8")


int32x8 = Int32x8Type()
float32x8 = Float32x8Type()


@register_model(Int32x8Type)
class _Int32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, I32X8)


@register_model(Float32x8Type)
class _Float32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, F32X8)


def is_c_array(array_type, dtype) -> bool:
    """True if the Numba type ``array_type`` is a C-contiguous array of ``dtype`` (typing time).

    >>> is_c_array(types.int8[::1], types.int8), is_c_array(types.int8[:], types.int8)
    (True, False)
    """
    return isinstance(array_type, types.Array) and array_type.dtype == dtype and array_type.layout == "C"


def element_pointer(context, builder, array_type, array_value, offset_type, offset_value):
    """Pointer to element ``offset`` (in elements, counted in C order) of a C-contiguous array (code generation)."""
    array = context.make_array(array_type)(context, builder, array_value)
    offset = context.cast(builder, offset_value, offset_type, types.intp)
    return builder.gep(array.data, [offset])


def load_at(context, builder, array_type, array_value, offset_value, vector_type, align: int = 1):
    """The ``vector_type`` register loaded from element ``offset_value`` (an intp) of a C array (code generation;
    an unaligned load when ``align`` is 1)."""
    pointer = element_pointer(context, builder, array_type, array_value, types.intp, offset_value)
    return builder.load(builder.bitcast(pointer, vector_type.as_pointer()), align=align)


def splat(builder, value, vector_type):
    """The scalar ``value`` (already of the lane type) in every lane of a ``vector_type`` (code generation)."""
    lanes = vector_type.count
    vector = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    indices = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
    return builder.shuffle_vector(vector, ir.Constant(vector_type, ir.Undefined), indices)


def declare(builder, name: str, return_type, argument_types):
    """The LLVM function ``name`` (e.g. ``"llvm.x86.avx2.pmadd.wd"``), declared in the module being built."""
    function_type = ir.FunctionType(return_type, argument_types)
    return cgutils.get_or_insert_function(builder.module, function_type, name)


def splat_constant(name: str, vector_type, llvm_type, value, doc: str):
    """An intrinsic with no arguments returning ``value`` in every lane of a ``vector_type`` register.

    >>> zero = splat_constant("zero", int32x8, I32X8, 0, "Eight int32 zeros.")
    >>> zero.__doc__
    'Eight int32 zeros.'
    """

    def typer(typingctx):
        def codegen(context, builder, signature, args):
            return ir.Constant(llvm_type, [value] * llvm_type.count)

        return vector_type(), codegen

    typer.__name__ = typer.__qualname__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


def lanewise(name: str, vector_type, emit, doc: str):
    """An intrinsic ``f(x, y)`` on two ``vector_type`` registers, the lanes combined by ``emit(builder, x, y)``
    (e.g. ``ir.IRBuilder.add``: modulo 2**32 for int32 lanes; ``ir.IRBuilder.fadd``: rounded float32 sums).

    >>> add = lanewise("add", int32x8, ir.IRBuilder.add, "Lane-wise int32 sum.")
    >>> add.__doc__
    'Lane-wise int32 sum.'
    """

    def typer(typingctx, x, y):
        if not (x == vector_type and y == vector_type):
            return None

        def codegen(context, builder, signature, args):
            return emit(builder, args[0], args[1])

        return vector_type(x, y), codegen

    typer.__name__ = typer.__qualname__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


def load_vector(name: str, vector_type, llvm_type, dtypes, align: int, doc: str):
    """An intrinsic ``f(array, offset)``: the 32 bytes from element ``offset`` of a C array whose dtype is one
    of ``dtypes``, as a ``vector_type`` register (an unaligned load when ``align`` is 1).

    >>> load = load_vector("load", float32x8, F32X8, (types.float32,), 4, "Eight floats.")
    >>> load.__doc__
    'Eight floats.'
    """

    def typer(typingctx, array, offset):
        if not (isinstance(offset, types.Integer) and isinstance(array, types.Array) and array.layout == "C"):
            return None
        if array.dtype not in dtypes:
            return None

        def codegen(context, builder, signature, args):
            offset = context.cast(builder, args[1], signature.args[1], types.intp)
            return load_at(context, builder, signature.args[0], args[0], offset, llvm_type, align)

        return vector_type(array, offset), codegen

    typer.__name__ = typer.__qualname__ = name
    typer.__doc__ = doc
    return intrinsic(typer)
