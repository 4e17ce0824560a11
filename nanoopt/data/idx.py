"""Reader for the IDX file format of MNIST and Fashion-MNIST (LeCun et al. 1998; Xiao et al. 2017).

An IDX file is a header followed by a dense array, everything big-endian::

    bytes 0-1   0x00 0x00                      magic
    byte  2     type code                      0x08 ubyte, 0x09 sbyte, 0x0B int16,
                                               0x0C int32, 0x0D float32, 0x0E float64
    byte  3     ndim                           number of dimensions, >= 1
    4 * ndim    sizes d_0, ..., d_{ndim-1}     unsigned 32-bit big-endian
    payload     prod(d_i) * itemsize bytes     row-major (C order), big-endian

The file may be gzip-compressed as distributed (``train-images-idx3-ubyte.gz``); compression is
recognised from the gzip magic bytes ``0x1f 0x8b``, not from the file name. The reader checks every
field and that the payload is *exactly* ``prod(d_i) * itemsize`` bytes long: a truncated download or
trailing garbage raises :class:`ValueError` instead of returning a silently wrong array.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
"""IDX type code -> big-endian NumPy dtype of the payload."""

_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic."""
    with open(path, "rb") as file:
        raw = file.read()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: corrupted gzip data ({type(error).__name__}: {error})") from error


def parse_idx(content: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode the (uncompressed) bytes of an IDX file into a native-endian array.

    ``name`` only appears in error messages.

    >>> parse_idx(bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 7, 8, 9]))
    array([7, 8, 9], dtype=uint8)
    """
    if len(content) < 4:
        raise ValueError(
            f"{name}: an IDX file starts with a 4-byte magic, but it holds only {len(content)} bytes"
        )
    if content[0] != 0 or content[1] != 0:
        raise ValueError(
            f"{name}: not an IDX file: the magic must start with bytes 0x00 0x00, "
            f"got 0x{content[0]:02X} 0x{content[1]:02X}"
        )
    type_code, ndim = content[2], content[3]
    if type_code not in IDX_DTYPES:
        known = ", ".join(f"0x{code:02X}" for code in IDX_DTYPES)
        raise ValueError(f"{name}: unknown IDX data type code 0x{type_code:02X}; expected one of {known}")
    if ndim < 1:
        raise ValueError(f"{name}: the IDX header declares {ndim} dimensions; expected at least 1")
    header_size = 4 + 4 * ndim
    if len(content) < header_size:
        raise ValueError(
            f"{name}: truncated header: {ndim} dimensions need {header_size} header bytes, "
            f"the file holds {len(content)} bytes"
        )
    shape = tuple(int(size) for size in np.frombuffer(content, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[type_code]
    expected = math.prod(shape) * dtype.itemsize
    given = len(content) - header_size
    if given != expected:
        problem = "truncated" if given < expected else "trailing bytes after the data"
        raise ValueError(
            f"{name}: {problem}: the header declares shape {shape} of {dtype.name} "
            f"({expected} payload bytes), but the file holds {given} payload bytes"
        )
    data = np.frombuffer(content, dtype=dtype, offset=header_size).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # a writable native-endian copy


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX (MNIST-format) file, plain or gzip-compressed, into a native-endian array.

    The result has the dtype of the header's type code (uint8, int8, int16, int32, float32, float64) and
    the shape of its dimension sizes; it is a fresh writable array. Malformed files (bad magic, unknown
    type code, truncated or trailing bytes, corrupted gzip) raise :class:`ValueError` naming the file.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny-idx2-ubyte")
    >>> _ = open(path, "wb").write(bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6)))
    >>> load_idx(path)
    array([[0, 1, 2],
           [3, 4, 5]], dtype=uint8)
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_idx expects a file path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    return parse_idx(_read_bytes(path), name=path)
