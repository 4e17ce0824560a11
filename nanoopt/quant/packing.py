"""Storing 4-bit integers two per byte, so that 4-bit weights really take half a byte each.

``pack_int4`` writes element ``2 i`` in the low nibble and element ``2 i + 1`` in the high nibble of byte ``i``
(two's complement, 4 bits each; an odd count is padded with a zero nibble); ``unpack_int4`` sign-extends the
nibbles back. Values must lie in ``[-8, 7]``.

>>> packed = pack_int4(np.array([-8, 7, -1], np.int8))
>>> packed, unpack_int4(packed, 3)
(array([120,  15], dtype=uint8), array([-8,  7, -1], dtype=int8))
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack_int4", "unpack_int4"]


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Pack int8 values in ``[-8, 7]`` (any shape, read in C order) into ``ceil(n / 2)`` bytes."""
    if not isinstance(values, np.ndarray) or values.dtype != np.int8:
        raise TypeError(f"pack_int4 needs an int8 array, got {getattr(values, 'dtype', type(values).__name__)}")
    if values.size and (values.min() < -8 or values.max() > 7):
        raise ValueError(f"pack_int4 packs values in [-8, 7], got range [{values.min()}, {values.max()}]")
    flat = values.ravel().astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` int8 values stored in ``packed`` by :func:`pack_int4` (a flat array)."""
    if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8 or packed.ndim != 1:
        raise TypeError("unpack_int4 needs a 1-D uint8 array")
    if not 0 <= count <= 2 * packed.size:
        raise ValueError(f"count must be in [0, {2 * packed.size}] for {packed.size} bytes, got {count}")
    nibbles = np.empty(2 * packed.size, np.uint8)
    nibbles[0::2] = packed & 0x0F
    nibbles[1::2] = packed >> 4
    signed = nibbles.astype(np.int8)
    signed[signed > 7] -= 16
    return signed[:count]
