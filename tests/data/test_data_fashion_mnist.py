"""Fashion-MNIST loader: the real files when installed (else skipped), synthetic IDX folders always."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from nanoopt.data import FASHION_MNIST_CLASSES, fashion_mnist_available, load_fashion_mnist
from nanoopt.data.fashion_mnist import DEBIAN_FASHION_MNIST_DIR

needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason=f"Fashion-MNIST not found in {DEBIAN_FASHION_MNIST_DIR} "
    "(install with `apt-get install dataset-fashion-mnist`)",
)


@needs_fashion_mnist
@pytest.mark.parametrize("split, count", [("train", 60000), ("test", 10000)])
def test_real_fashion_mnist(split, count):
    images, labels = load_fashion_mnist(split)
    assert images.shape == (count, 1, 28, 28) and images.dtype == np.float32
    assert labels.shape == (count,) and labels.dtype == np.int64
    assert images.min() == 0.0 and images.max() == 1.0
    assert np.bincount(labels).tolist() == [count // 10] * 10  # balanced, labels in 0..9
    again_images, _ = load_fashion_mnist(split)
    assert again_images is images  # served from the in-process cache
    with pytest.raises(ValueError, match="read-only"):
        images[0, 0, 0, 0] = 1.0


def idx_file(path, array: np.ndarray, code: int, compress: bool) -> None:
    content = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    content += array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        content = gzip.compress(content)
    path.write_bytes(content)


def make_folder(folder, n_train=12, n_test=5, compress=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for (images_stem, labels_stem), count in [
        (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), n_train),
        (("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), n_test),
    ]:
        pixels = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        idx_file(folder / images_stem, pixels, 0x08, compress)
        idx_file(folder / labels_stem, labels, 0x08, compress)
        arrays[images_stem[:4]] = (pixels, labels)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_synthetic_folder_round_trip(tmp_path, compress):
    arrays = make_folder(tmp_path, compress=compress)
    assert fashion_mnist_available(tmp_path)
    for split, key in [("train", "trai"), ("test", "t10k")]:
        images, labels = load_fashion_mnist(split, path=str(tmp_path))
        pixels, raw_labels = arrays[key]
        assert images.shape == (len(pixels), 1, 28, 28) and images.dtype == np.float32
        np.testing.assert_array_equal(images[:, 0], pixels.astype(np.float32) / np.float32(255))
        np.testing.assert_array_equal(labels, raw_labels.astype(np.int64))
        assert not images.flags.writeable and not labels.flags.writeable


def test_cache_follows_file_changes(tmp_path):
    make_folder(tmp_path, n_test=5)
    first, _ = load_fashion_mnist("test", path=tmp_path)
    make_folder(tmp_path, n_test=7, seed=1)
    second, _ = load_fashion_mnist("test", path=tmp_path)
    assert len(first) == 5 and len(second) == 7


def test_missing_files_say_where_and_how(tmp_path):
    assert not fashion_mnist_available(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist("train", path=tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "train-images-idx3-ubyte(.gz)" in message
    assert "apt-get install dataset-fashion-mnist" in message and "path=" in message
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_fashion_mnist("test", path=tmp_path / "absent")


def test_mismatched_counts_and_bad_contents(tmp_path):
    make_folder(tmp_path, n_train=4)
    idx_file(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8), 0x08, False)
    with pytest.raises(ValueError, match="holds 4 images.*holds 3 labels"):
        load_fashion_mnist("train", path=tmp_path)
    idx_file(tmp_path / "train-labels-idx1-ubyte", np.full(4, 10, dtype=np.uint8), 0x08, False)
    with pytest.raises(ValueError, match="labels must lie in 0..9, found 10"):
        load_fashion_mnist("train", path=tmp_path)
    idx_file(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 8, 8), dtype=np.uint8), 0x08, False)
    with pytest.raises(ValueError, match=r"shape \(N, 28, 28\), got uint8 of shape \(4, 8, 8\)"):
        load_fashion_mnist("train", path=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00")
    with pytest.raises(ValueError, match="truncated header"):
        load_fashion_mnist("test", path=tmp_path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist("all")
    with pytest.raises(TypeError, match="path must be a folder"):
        load_fashion_mnist("train", path=5)
    assert len(FASHION_MNIST_CLASSES) == 10
