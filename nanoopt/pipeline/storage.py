"""Compact, lossless storage of a model's state: sparse weights with relative indices, entropy-coded.

The last stage of Deep Compression (Han, Mao & Dally 2016, "Deep Compression", ICLR; section 4 and Fig. 2):
the surviving weights of a pruned, quantized layer are stored as small integer codes, their positions as
*relative* indices (the number of zeros skipped since the previous survivor), and both streams are
entropy-coded. Han et al. use Huffman codes; here the standard library's ``lzma`` (LZMA2, a range coder over a
Lempel-Ziv parse) or ``zlib`` (DEFLATE: LZ77 + Huffman) is applied to each stream *where it pays* -- each
stream keeps the smallest of raw / zlib / lzma.

How one array is stored (``encode_state``):

* weight tensors (a packed int4 array is unpacked to its codes first) with at least half zeros are split into
  an **index stream** and a **value stream**, as the smaller of

  - ``gaps``: for the flat positions p_1 < p_2 < ... of the non-zeros, the gaps g_k = p_k - p_{k-1} - 1 as bytes;
    a gap of 255 or more is written as 255 (a filler: skip 255 zeros, no value) repeated, then the rest
    (Han et al. 2016, Fig. 2, with 8-bit instead of 4-bit relative indices);
  - ``bitmap``: one bit per entry (non-zero or not), ``np.packbits``;

  and the values as one byte per code (or the array's own dtype for float weights), or two 4-bit codes per
  byte when the codes fit in [-8, 7]; the positions of negative zeros of a float array (a pruned negative
  weight is ``-0.0``), if any, as a third stream of relative indices;
* every other array (biases, scales, fixed-point multipliers, dense weights) goes into one shared stream, each
  array's bytes split into byte planes (the "shuffle" filter of Blosc/HDF5: the high bytes of similar numbers
  are alike, so the planes compress better), when that pays.

Decoding rebuilds every array with its exact dtype, shape and bytes, so a model loaded from the file gives the
same outputs bit for bit. :func:`encode_state` checks this itself before it returns (a mismatch raises).

File layout: ``b"NANOOPTZ"``, a version byte, the header codec byte, the header length (uint32 little endian),
the header (JSON, compressed), then the streams. The header lists every array (key, dtype, shape, how it is
stored) and carries the descriptions of the entries (``state_dict().metadata``) and a free ``info`` dict (the
pipeline stores there how to rebuild the model). Nothing is unpickled: a file holds only numbers and JSON.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> codes = (rng.integers(-7, 8, size=(300, 784)) * (rng.random((300, 784)) < 0.05)).astype(np.int8)
>>> state = {"fc.weight": codes, "fc.bias": rng.normal(size=300).astype(np.float32)}
>>> blob = encode_state(state)
>>> decoded, info = decode_state(blob)
>>> all(np.array_equal(decoded[k], v) and decoded[k].dtype == v.dtype for k, v in state.items())
True
>>> codes.nbytes / len(blob) > 8     # 5% survivors of 4-bit codes: far less than one byte per entry
True
"""

from __future__ import annotations

import json
import lzma
import os
import struct
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from nanoopt.quant.packing import pack_int4, unpack_int4

__all__ = ["MAGIC", "decode_state", "encode_state", "load_state", "save_state", "stored_streams"]

MAGIC = b"NANOOPTZ"
VERSION = 1
FILLER = 255                 # a relative index of 255: skip 255 zeros, no value follows
MIN_ZERO_FRACTION = 0.5      # arrays with fewer zeros are stored densely
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
_CODECS = ("raw", "zlib", "lzma")


# ============================================================================ entropy coding of one stream
def _compress(data: bytes, codec: str) -> bytes:
    if codec == "raw":
        return data
    if codec == "zlib":
        return zlib.compress(data, 9)
    # the same preset with a dictionary no larger than the data: the same bytes (a match cannot reach further back
    # than the data's start), without preparing preset 9's 64 MiB dictionary for a stream of a few kilobytes
    fitted = [{**_LZMA_FILTERS[0], "dict_size": max(4096, 1 << max(len(data) - 1, 1).bit_length())}]
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=fitted)


def _decompress(data: bytes, codec: str) -> bytes:
    if codec == "raw":
        return data
    if codec == "zlib":
        return zlib.decompress(data)
    if codec == "lzma":
        return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    raise ValueError(f"unknown stream codec {codec!r} in a compact file")


def _best(data: bytes, entropy: bool) -> tuple[str, bytes]:
    """The smallest of raw / zlib / lzma (only raw with ``entropy=False``)."""
    options = [("raw", data)]
    if entropy and data:
        options += [(codec, _compress(data, codec)) for codec in ("zlib", "lzma")]
    return min(options, key=lambda option: len(option[1]))


# ============================================================================ relative indices
def gaps_encode(flat: np.ndarray) -> np.ndarray:
    """Relative indices of the non-zeros of a flat array, as uint8 with fillers (module docstring).

    >>> gaps_encode(np.array([0, 3, 0, 0, 5] + [0] * 300 + [1])).tolist()
    [1, 2, 255, 45]
    """
    positions = np.flatnonzero(flat)
    gaps = np.diff(positions, prepend=-1) - 1                       # zeros skipped before each survivor
    fillers = gaps // FILLER
    out = np.empty(int(fillers.sum()) + len(gaps), np.uint8)
    # each survivor k occupies slot (k + fillers before and at it); fillers fill the slots in front of it
    slots = np.arange(len(gaps)) + np.cumsum(fillers)
    out[:] = FILLER
    out[slots] = (gaps - fillers * FILLER).astype(np.uint8)
    return out


def gaps_decode(gaps: np.ndarray, size: int) -> np.ndarray:
    """Flat positions of the non-zeros from :func:`gaps_encode` output (``size``: the array's length).

    >>> gaps_decode(np.array([1, 2, 255, 45], np.uint8), 306).tolist()
    [1, 4, 305]
    """
    steps = gaps.astype(np.int64) + 1                        # a survivor advances gap + 1; a filler 255
    steps[gaps == FILLER] = FILLER
    ends = np.cumsum(steps) - 1
    positions = ends[gaps != FILLER]
    if len(positions) and (positions[-1] >= size or positions[0] < 0):
        raise ValueError(f"compact file: relative indices run past the array's {size} entries")
    return positions


# ============================================================================ one array
def _codes_of(key: str, array: np.ndarray, description: Mapping[str, Any] | None) -> tuple[np.ndarray, str]:
    """The array to sparsify and how it was derived: int4 codes of a packed array, else the array itself."""
    if description and description.get("packed") and array.dtype == np.uint8 and array.ndim == 1:
        return unpack_int4(array, 2 * array.size), "int4"
    return array, "none"


def _values_bytes(values: np.ndarray) -> list[tuple[str, bytes]]:
    """Candidate encodings of the non-zero values: their bytes, and 4-bit packing when the codes fit."""
    options = [("bytes", values.tobytes())]
    if values.dtype.kind == "i" and values.size and values.min() >= -8 and values.max() <= 7:
        options.append(("nibbles", pack_int4(values.astype(np.int8)).tobytes()))
    return options


def _encode_sparse(codes: np.ndarray, entropy: bool) -> tuple[dict[str, Any], list[bytes]]:
    """The smallest (indices, values) encoding of a flat array with many zeros."""
    flat = codes.ravel()
    values = flat[flat != 0]
    best: tuple[int, dict[str, Any], list[bytes]] | None = None
    index_options = [("gaps", gaps_encode(flat).tobytes()), ("bitmap", np.packbits(flat != 0).tobytes())]
    for index_kind, index_raw in index_options:
        index_codec, index_blob = _best(index_raw, entropy)
        for value_kind, value_raw in _values_bytes(values):
            value_codec, value_blob = _best(value_raw, entropy)
            total = len(index_blob) + len(value_blob)
            if best is None or total < best[0]:
                spec = {"indices": index_kind, "index_codec": index_codec, "values": value_kind,
                        "value_codec": value_codec, "count": int(values.size), "value_dtype": str(values.dtype)}
                best = (total, spec, [index_blob, value_blob])
    assert best is not None
    spec, blobs = best[1], best[2]
    negative_zeros = (flat == 0) & np.signbit(flat) if flat.dtype.kind == "f" else np.zeros(0, bool)
    if negative_zeros.any():   # -0.0 (a pruned negative weight) is kept: the bytes must come back the same
        codec, blob = _best(gaps_encode(negative_zeros).tobytes(), entropy)
        spec["negative_zero_codec"] = codec
        blobs = blobs + [blob]
    return spec, blobs


def _decode_sparse(spec: Mapping[str, Any], blobs: list[bytes], size: int) -> np.ndarray:
    index_raw = np.frombuffer(_decompress(blobs[0], spec["index_codec"]), np.uint8)
    value_raw = _decompress(blobs[1], spec["value_codec"])
    dtype, count = np.dtype(spec["value_dtype"]), int(spec["count"])
    if spec["values"] == "nibbles":
        values = unpack_int4(np.frombuffer(value_raw, np.uint8), count).astype(dtype)
    else:
        values = np.frombuffer(value_raw, dtype)
    if spec["indices"] == "gaps":
        positions = gaps_decode(index_raw, size)
    else:
        positions = np.flatnonzero(np.unpackbits(index_raw, count=size))
    if len(positions) != count or len(values) != count:
        raise ValueError(f"compact file: {len(positions)} indices and {len(values)} values for {count} survivors")
    flat = np.zeros(size, dtype)
    flat[positions] = values
    if "negative_zero_codec" in spec:
        flat[gaps_decode(np.frombuffer(_decompress(blobs[2], spec["negative_zero_codec"]), np.uint8), size)] = -0.0
    return flat


def _shuffle(raw: bytes, itemsize: int) -> bytes:
    """Byte planes: all first bytes, then all second bytes, ... (lossless; undone by :func:`_unshuffle`)."""
    if itemsize == 1:
        return raw
    return np.frombuffer(raw, np.uint8).reshape(-1, itemsize).T.tobytes()


def _unshuffle(raw: bytes, itemsize: int) -> bytes:
    if itemsize == 1:
        return raw
    return np.frombuffer(raw, np.uint8).reshape(itemsize, -1).T.tobytes()


# ============================================================================ the whole state
def encode_state(state: Mapping[str, np.ndarray], metadata: Mapping[str, Mapping[str, Any]] | None = None,
                 info: Mapping[str, Any] | None = None, entropy: bool = True) -> bytes:
    """The compact file's bytes for a state dict (see the module docstring); ``entropy=False`` stores every
    stream raw (sparse layout and 4-bit packing only), which shows what the entropy coding adds.

    ``metadata`` defaults to ``state.metadata`` (what :meth:`~nanoopt.nn.Module.state_dict` attaches). The
    result is decoded again and compared with ``state`` before it is returned: a mismatch raises."""
    if not isinstance(state, Mapping):
        raise TypeError(f"encode_state: expected a dict of arrays keyed by name, got {type(state).__name__}")
    metadata = dict(metadata if metadata is not None else (getattr(state, "metadata", None) or {}))
    entries, streams = [], []
    shared: list[bytes] = []
    shared_plain: list[bytes] = []
    for key, value in state.items():
        array = np.asarray(value)
        array = array if array.flags.c_contiguous else array.copy()   # (ascontiguousarray would make 0-d 1-d)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"encode_state: {key!r} has dtype {array.dtype}; only numeric arrays can be stored")
        entry: dict[str, Any] = {"key": key, "dtype": array.dtype.str, "shape": list(array.shape)}
        codes, derived = _codes_of(key, array, metadata.get(key))
        zeros = codes.size - np.count_nonzero(codes)
        if codes.ndim >= 1 and codes.size >= 64 and zeros >= MIN_ZERO_FRACTION * codes.size:
            spec, blobs = _encode_sparse(codes, entropy)
            entry.update(layout="sparse", derived=derived, size=int(codes.size), **spec,
                         streams=list(range(len(streams), len(streams) + len(blobs))))
            streams += blobs
        else:
            entry["layout"] = "dense"
            shared.append(_shuffle(array.tobytes(), array.itemsize))
            shared_plain.append(array.tobytes())
        entries.append(entry)
    shuffled_codec, shuffled_blob = _best(b"".join(shared), entropy)
    plain_codec, plain_blob = _best(b"".join(shared_plain), entropy)
    shuffle = len(shuffled_blob) < len(plain_blob)
    shared_codec, shared_blob = (shuffled_codec, shuffled_blob) if shuffle else (plain_codec, plain_blob)
    streams.append(shared_blob)
    header = {"format": "nanoopt-compact", "version": VERSION, "entries": entries, "metadata": metadata,
              "info": dict(info or {}), "stream_lengths": [len(s) for s in streams],
              "shared": {"codec": shared_codec, "shuffle": shuffle}}
    header_raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_codec, header_blob = _best(header_raw, True)   # the header is always worth compressing
    blob = (MAGIC + struct.pack("<BBI", VERSION, _CODECS.index(header_codec), len(header_blob)) + header_blob
            + b"".join(streams))
    decoded, _ = decode_state(blob)
    for key, value in state.items():
        original = np.asarray(value)
        if decoded[key].dtype != original.dtype or decoded[key].shape != original.shape \
                or decoded[key].tobytes() != original.tobytes():
            raise AssertionError(f"encode_state: {key!r} does not decode to the same bytes")  # a codec bug
    return blob


def _read_header(blob: bytes) -> tuple[dict[str, Any], int]:
    if blob[:len(MAGIC)] != MAGIC:
        raise ValueError(f"not a nanoopt compact file (it starts with {blob[:8]!r}, expected {MAGIC!r})")
    if len(blob) < len(MAGIC) + 6:
        raise ValueError("truncated nanoopt compact file (no header)")
    version, header_codec, length = struct.unpack_from("<BBI", blob, len(MAGIC))
    if version != VERSION:
        raise ValueError(f"compact file version {version}; this nanoopt reads version {VERSION}")
    start = len(MAGIC) + 6
    if header_codec >= len(_CODECS) or start + length > len(blob):
        raise ValueError("corrupted or truncated nanoopt compact file (header)")
    try:
        header = json.loads(_decompress(blob[start:start + length], _CODECS[header_codec]).decode("utf-8"))
    except (lzma.LZMAError, zlib.error, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"corrupted nanoopt compact file header ({type(error).__name__}: {error})") from None
    return header, start + length


def decode_state(blob: bytes) -> tuple[OrderedDict[str, np.ndarray], dict[str, Any]]:
    """The state dict (with ``.metadata``) and the ``info`` dict stored by :func:`encode_state`."""
    header, offset = _read_header(blob)
    streams, position = [], offset
    for length in header["stream_lengths"]:
        streams.append(blob[position:position + length])
        position += length
    if position != len(blob):
        raise ValueError(f"corrupted or truncated nanoopt compact file: {len(blob)} bytes, the header lists "
                         f"{position}")
    try:
        shared = _decompress(streams[-1], header["shared"]["codec"])
    except (lzma.LZMAError, zlib.error) as error:
        raise ValueError(f"corrupted nanoopt compact file ({error})") from None
    state: OrderedDict[str, np.ndarray] = OrderedDict()
    cursor = 0
    for entry in header["entries"]:
        dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
        if entry["layout"] == "dense":
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            raw = shared[cursor:cursor + nbytes]
            if len(raw) != nbytes:
                raise ValueError(f"corrupted nanoopt compact file: {entry['key']!r} is cut short")
            cursor += nbytes
            if header["shared"]["shuffle"]:
                raw = _unshuffle(raw, dtype.itemsize)
            array = np.frombuffer(raw, dtype).reshape(shape).copy()
        else:
            try:
                flat = _decode_sparse(entry, [streams[i] for i in entry["streams"]], entry["size"])
            except (lzma.LZMAError, zlib.error) as error:
                raise ValueError(f"corrupted nanoopt compact file at {entry['key']!r} ({error})") from None
            if entry["derived"] == "int4":
                flat = pack_int4(flat.astype(np.int8))
            array = flat.astype(dtype).reshape(shape)
        state[entry["key"]] = array
    state.metadata = header["metadata"] or None  # type: ignore[attr-defined]
    return state, header["info"]


def stored_streams(blob: bytes) -> list[dict[str, Any]]:
    """Per array: how it is stored and how many bytes its streams take (the shared dense stream is listed once,
    under ``"(dense arrays)"``), for reports.

    >>> import numpy as np
    >>> [row["key"] for row in stored_streams(encode_state({"w": np.zeros((8, 8), np.int8)}))]
    ['w', '(dense arrays)', '(header)']
    """
    header, offset = _read_header(blob)
    lengths = header["stream_lengths"]
    rows = []
    for entry in header["entries"]:
        if entry["layout"] == "sparse":
            rows.append({"key": entry["key"], "layout": f"sparse ({entry['indices']}, {entry['values']})",
                         "bytes": int(sum(lengths[i] for i in entry["streams"])), "count": entry["count"],
                         "size": entry["size"]})
    rows.append({"key": "(dense arrays)", "layout": f"dense ({header['shared']['codec']})", "bytes": lengths[-1],
                 "count": None, "size": None})
    rows.append({"key": "(header)", "layout": "json", "bytes": offset, "count": None, "size": None})
    return rows


def save_state(state: Mapping[str, np.ndarray], path: str | os.PathLike, info: Mapping[str, Any] | None = None,
               entropy: bool = True) -> int:
    """Write :func:`encode_state` to ``path`` (via a temporary name, renamed); returns the bytes written."""
    blob = encode_state(state, info=info, entropy=entropy)
    path = os.fspath(path)
    temporary = path + ".partial"
    try:
        with open(temporary, "wb") as handle:
            handle.write(blob)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return len(blob)


def load_state(path: str | os.PathLike) -> tuple[OrderedDict[str, np.ndarray], dict[str, Any]]:
    """Read a compact file: ``(state dict with .metadata, info)``."""
    with open(os.fspath(path), "rb") as handle:
        return decode_state(handle.read())
