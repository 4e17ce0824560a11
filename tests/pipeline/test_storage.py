"""Compact storage: lossless for every array (hypothesis), relative indices and fillers, corrupted files refused,
and every model kind a recipe can save loads back to bit-identical outputs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nanoopt.pipeline import storage
from nanoopt.quant.packing import pack_int4


def roundtrip(state, **options):
    decoded, info = storage.decode_state(storage.encode_state(state, **options))
    assert list(decoded) == list(state)
    for key, value in state.items():
        assert decoded[key].dtype == value.dtype and decoded[key].shape == value.shape
        assert decoded[key].tobytes() == value.tobytes(), key
    return decoded


sparse_arrays = hnp.arrays(
    dtype=st.sampled_from([np.int8, np.int32, np.float32, np.float64]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=40),
    elements=st.sampled_from([0, 0, 0, 0, 1, -1, 7, -8, 3, 100]))


@settings(max_examples=60, deadline=None)
@given(sparse_arrays, st.booleans(), st.booleans())
def test_any_array_round_trips_bit_for_bit(array, entropy, negative_zeros):
    if negative_zeros and array.dtype.kind == "f":
        array = np.where(np.arange(array.size).reshape(array.shape) % 3 == 0, -array, array)  # -0.0 entries too
    roundtrip({"a": array, "b": np.arange(3, dtype=np.float32), "scalar": np.array(0.25, np.float32),
               "zero_point": np.array(-128, np.int32)}, entropy=entropy)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 1200), min_size=0, max_size=40), st.integers(1, 3000))
def test_relative_indices_with_fillers(positions, size):
    flat = np.zeros(max(size, 1 + max(positions, default=0)), np.int8)
    flat[positions] = 1
    gaps = storage.gaps_encode(flat)
    assert gaps.dtype == np.uint8
    assert storage.gaps_decode(gaps, flat.size).tolist() == sorted(set(positions))


def test_negative_zeros_and_packed_int4_are_kept():
    weight = np.array([[0.5, -0.0, 0.0, -1.5] * 40], np.float32)
    roundtrip({"w": weight})
    codes = (np.arange(301) % 15 - 7).astype(np.int8) * (np.arange(301) % 5 == 0)
    packed = pack_int4(codes)
    state = {"w": packed}
    state_meta = storage.encode_state(state, metadata={"w": {"bits": 4, "packed": True}})
    decoded, _ = storage.decode_state(state_meta)
    assert decoded["w"].tobytes() == packed.tobytes()


def test_sparse_low_bit_weights_take_far_less_than_a_byte_each():
    rng = np.random.default_rng(0)
    codes = (rng.integers(-7, 8, size=(300, 784)) * (rng.random((300, 784)) < 0.05)).astype(np.int8)
    raw = len(storage.encode_state({"w": codes}, entropy=False))
    coded = len(storage.encode_state({"w": codes}))
    assert coded <= raw                      # entropy coding is used only where it pays
    assert codes.size / coded > 15           # < 0.55 bit per entry at 5% density (dense int8: 8 bits)


def test_corrupted_files_are_refused(tmp_path):
    blob = storage.encode_state({"w": np.eye(20, dtype=np.float32)})
    with pytest.raises(ValueError, match="not a nanoopt compact file"):
        storage.decode_state(b"PK\x03\x04" + blob[4:])
    with pytest.raises(ValueError, match="truncated"):
        storage.decode_state(blob[:-3])
    with pytest.raises(ValueError, match="version"):
        storage.decode_state(blob[:8] + bytes([9]) + blob[9:])
