"""IDX reader: round trip for every type code, and a clear error for every kind of malformed file."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nanoopt.data import load_idx
from nanoopt.data.idx import IDX_DTYPES, parse_idx

TYPE_CODE = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``, written independently of the reader (struct header, big-endian data)."""
    code = TYPE_CODE[array.dtype]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes(order="C")


def write(path, content: bytes, compress: bool) -> None:
    path.write_bytes(gzip.compress(content) if compress else content)


arrays = st.sampled_from(sorted(TYPE_CODE, key=str)).flatmap(
    lambda dtype: hnp.arrays(
        dtype,
        hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6),
        elements={"allow_nan": False} if dtype.kind == "f" else None,
    )
)


@settings(max_examples=60, deadline=None)
@given(array=arrays, compress=st.booleans())
def test_round_trip_every_type_code(tmp_path_factory, array, compress):
    path = tmp_path_factory.mktemp("idx") / "x.idx"
    write(path, idx_bytes(array), compress)
    loaded = load_idx(path)
    assert loaded.dtype == array.dtype and loaded.dtype.isnative
    assert loaded.shape == array.shape
    np.testing.assert_array_equal(loaded, array)
    assert loaded.flags.writeable


def test_known_bytes_decode_big_endian():
    # int16 0x0102 = 258 and -2 (0xFFFE); float32 1.5 = 0x3FC00000.
    shorts = bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 0x01, 0x02, 0xFF, 0xFE])
    np.testing.assert_array_equal(parse_idx(shorts), np.array([258, -2], dtype=np.int16))
    floats = bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0x3F, 0xC0, 0, 0])
    np.testing.assert_array_equal(parse_idx(floats), np.array([1.5], dtype=np.float32))


@settings(max_examples=40, deadline=None)
@given(array=arrays.filter(lambda a: a.size > 0), cut=st.integers(1, 64), compress=st.booleans())
def test_truncated_payload_is_an_error(tmp_path_factory, array, cut, compress):
    content = idx_bytes(array)
    payload = array.nbytes
    cut = min(cut, payload)
    path = tmp_path_factory.mktemp("idx") / "short.idx"
    write(path, content[:-cut], compress)
    with pytest.raises(ValueError, match="truncated") as info:
        load_idx(path)
    message = str(info.value)
    assert str(path) in message
    assert f"({payload} payload bytes)" in message and f"holds {payload - cut} payload bytes" in message


@settings(max_examples=40, deadline=None)
@given(array=arrays, extra=st.binary(min_size=1, max_size=32), compress=st.booleans())
def test_trailing_bytes_are_an_error(tmp_path_factory, array, extra, compress):
    path = tmp_path_factory.mktemp("idx") / "long.idx"
    write(path, idx_bytes(array) + extra, compress)
    with pytest.raises(ValueError, match="trailing bytes") as info:
        load_idx(path)
    assert f"holds {array.nbytes + len(extra)} payload bytes" in str(info.value)


def test_truncated_header_is_an_error(tmp_path):
    path = tmp_path / "header.idx"
    path.write_bytes(bytes([0, 0, 0x08, 3, 0, 0, 0, 5, 0, 0]))
    with pytest.raises(ValueError, match="truncated header: 3 dimensions need 16 header bytes"):
        load_idx(path)
    path.write_bytes(bytes([0, 0]))
    with pytest.raises(ValueError, match="4-byte magic"):
        load_idx(path)


@pytest.mark.parametrize("first_two", [b"\x00\x01", b"\x01\x00", b"PK"])
def test_bad_magic_is_an_error(tmp_path, first_two):
    path = tmp_path / "magic.idx"
    path.write_bytes(first_two + bytes([0x08, 1, 0, 0, 0, 1, 42]))
    with pytest.raises(ValueError, match="not an IDX file") as info:
        load_idx(path)
    assert str(path) in str(info.value)


@settings(max_examples=25, deadline=None)
@given(code=st.integers(0, 255).filter(lambda code: code not in IDX_DTYPES))
def test_unknown_type_code_is_an_error(code):
    content = bytes([0, 0, code, 1, 0, 0, 0, 1, 0])
    with pytest.raises(ValueError, match=f"unknown IDX data type code 0x{code:02X}"):
        parse_idx(content)


def test_zero_dimensions_is_an_error():
    with pytest.raises(ValueError, match="declares 0 dimensions"):
        parse_idx(bytes([0, 0, 0x08, 0, 7]))


def test_corrupted_gzip_is_an_error(tmp_path):
    compressed = bytearray(gzip.compress(idx_bytes(np.arange(500, dtype=np.int32))))
    path = tmp_path / "corrupt.idx.gz"
    path.write_bytes(bytes(compressed[: len(compressed) // 2]))  # cut mid-stream
    with pytest.raises(ValueError, match="corrupted gzip") as info:
        load_idx(path)
    assert str(path) in str(info.value)
    compressed[len(compressed) // 2] ^= 0xFF  # flip bits inside the deflate stream
    path.write_bytes(bytes(compressed))
    with pytest.raises(ValueError, match="corrupted gzip"):
        load_idx(path)
    compressed = bytearray(gzip.compress(idx_bytes(np.arange(500, dtype=np.int32))))
    compressed[-8] ^= 0xFF  # wrong CRC32 in the trailer
    path.write_bytes(bytes(compressed))
    with pytest.raises(ValueError, match="corrupted gzip"):
        load_idx(path)


def test_path_type_is_checked():
    with pytest.raises(TypeError, match="expects a file path"):
        load_idx(3)
