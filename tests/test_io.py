"""Checkpoints: lossless round trip, and every kind of bad file refused with a clear message."""

import os
import zipfile

import numpy as np
import pytest

import nanoopt as no
from nanoopt import io, models


@pytest.fixture
def checkpoint(tmp_path):
    no.manual_seed(0)
    model = models.small_resnet(widths=(4, 8))
    path = tmp_path / "model.npz"
    io.save(model, path)
    return model, path


def test_round_trip_is_lossless_and_keeps_dtypes(checkpoint):
    model, path = checkpoint
    no.manual_seed(1)
    other = models.small_resnet(widths=(4, 8))
    io.load_into(other, path)
    for key, value in model.state_dict().items():
        restored = other.state_dict()[key]
        assert restored.dtype == value.dtype
        np.testing.assert_array_equal(restored, value)
    assert io.describe(path)["stem.1.num_batches_tracked"] == ((), "int64")


def test_mismatched_model_raises_and_leaves_it_unchanged(checkpoint):
    _, path = checkpoint
    other = models.small_resnet(widths=(4, 16))
    before = other.state_dict()
    with pytest.raises(ValueError, match="shape"):
        io.load_into(other, path)
    for key, value in before.items():
        np.testing.assert_array_equal(other.state_dict()[key], value)
    with pytest.raises(KeyError, match="missing keys"):
        io.load_into(models.tiny_mlp(), path)


def test_truncated_file_raises_value_error(checkpoint, tmp_path):
    _, path = checkpoint
    data = path.read_bytes()
    broken = tmp_path / "broken.npz"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="broken.npz"):
        io.load(broken)


def test_flipped_byte_is_caught_by_the_crc(checkpoint, tmp_path):
    _, path = checkpoint
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("stem.0.weight.npy")
    data[info.header_offset + 30 + len(info.filename) + info.extra.__len__() + 200] ^= 0xFF
    broken = tmp_path / "flipped.npz"
    broken.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted|unreadable"):
        io.load(broken)


def test_pickled_objects_are_never_loaded(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, **{"weight": np.array([object()], dtype=object), "__nanoopt__": np.frombuffer(
        b'{"format": "nanoopt-state-dict", "version": 1, "keys": ["weight"]}', dtype=np.uint8)})
    with pytest.raises(ValueError, match="unreadable"):
        io.load(path)


def test_foreign_npz_and_missing_files(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, a=np.ones(2))
    with pytest.raises(ValueError, match="not a nanoopt checkpoint"):
        io.load(path)
    with pytest.raises(FileNotFoundError):
        io.load(tmp_path / "absent.npz")
    assert not os.path.exists(str(tmp_path / "model.npz.partial"))
