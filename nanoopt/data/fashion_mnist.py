"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747; MIT licence), read from IDX files.

70,000 grey-scale 28x28 images of Zalando articles in 10 classes (:data:`FASHION_MNIST_CLASSES`):
60,000 for training, 10,000 for testing. The data is not bundled; it is read from

- the folder passed as ``path=``, holding the four IDX files of the Fashion-MNIST repository
  (https://github.com/zalandoresearch/fashion-mnist, ``data/fashion``), plain or ``.gz``; or
- Debian's package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist`` on Debian
  and Ubuntu), which installs them under ``/usr/share/datasets/fashion-mnist/``.

Pixels ``p`` in ``0..255`` become ``x = p / 255`` in ``[0, 1]`` (float32). Decoding the gzip files
takes a moment, so decoded arrays are cached in-process, keyed on the files' paths, sizes and
modification times; callers get read-only arrays so nobody can corrupt the cache (``.copy()`` one to
modify it).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from nanoopt.data.idx import load_idx

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_SIDE = 28


def _folder(path: str | os.PathLike | None) -> Path:
    if path is None:
        return DEBIAN_FASHION_MNIST_DIR
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder (str or os.PathLike) or None, got {type(path).__name__}")
    return Path(path)


def _find(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` if it exists, else ``folder/stem.gz`` if that exists, else None."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def fashion_mnist_available(path: str | os.PathLike | None = None) -> bool:
    """Whether all four Fashion-MNIST IDX files (plain or .gz) are in ``path`` (default: Debian's folder).

    Only checks that the files exist; :func:`load_fashion_mnist` validates their contents.

    >>> fashion_mnist_available("/nonexistent/folder")
    False
    """
    folder = _folder(path)
    return all(_find(folder, stem) is not None for stems in FASHION_MNIST_FILES.values() for stem in stems)


def _file_key(file: Path) -> tuple[str, int, int]:
    status = file.stat()
    return str(file.resolve()), status.st_size, status.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _decode(
    images_key: tuple[str, int, int], labels_key: tuple[str, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Read, validate and convert one split; the arrays are made read-only because they are shared."""
    images_path, labels_path = images_key[0], labels_key[0]
    pixels = load_idx(images_path)
    labels = load_idx(labels_path)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(
            f"{images_path}: expected uint8 images of shape (N, {IMAGE_SIDE}, {IMAGE_SIDE}), "
            f"got {pixels.dtype} of shape {pixels.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(
            f"{labels_path}: expected uint8 labels of shape (N,), got {labels.dtype} of shape {labels.shape}"
        )
    if len(pixels) != len(labels):
        raise ValueError(
            f"Fashion-MNIST images and labels disagree: {images_path} holds {len(pixels)} images, "
            f"{labels_path} holds {len(labels)} labels"
        )
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path}: labels must lie in 0..9, found {int(labels.max())}")
    images = (pixels.astype(np.float32) / np.float32(255.0))[:, None]  # (N, 1, 28, 28)
    labels = labels.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_fashion_mnist(
    split: str = "train", path: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` as read-only ``(images float32 (N, 1, 28, 28) in [0, 1], labels int64 (N,))``.

    ``split`` is ``"train"`` (``train-*-ubyte``, 60,000 images) or ``"test"`` (``t10k-*-ubyte``, 10,000).
    Files are looked up in ``path``, or in ``/usr/share/datasets/fashion-mnist/`` when ``path`` is None;
    if they are missing, :class:`FileNotFoundError` says where it looked and how to get them. Malformed
    files, or image and label counts that disagree, raise :class:`ValueError`. Repeated calls return the
    same cached arrays; they are read-only, ``.copy()`` them to modify.

    >>> images, labels = load_fashion_mnist("test")  # doctest: +SKIP
    >>> images.shape, labels.shape, FASHION_MNIST_CLASSES[labels[0]]  # doctest: +SKIP
    ((10000, 1, 28, 28), (10000,), 'Ankle boot')
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {tuple(FASHION_MNIST_FILES)}, got {split!r}")
    folder = _folder(path)
    images_stem, labels_stem = FASHION_MNIST_FILES[split]
    images_file, labels_file = _find(folder, images_stem), _find(folder, labels_stem)
    if images_file is None or labels_file is None:
        wanted = ((images_stem, images_file), (labels_stem, labels_file))
        missing = " and ".join(f"{stem}(.gz)" for stem, file in wanted if file is None)
        raise FileNotFoundError(
            f"Fashion-MNIST {split} split not found: looked for {missing} "
            f"in {folder}{'' if folder.is_dir() else ' (no such folder)'}. "
            "On Debian/Ubuntu install it with `apt-get install dataset-fashion-mnist` (files go to "
            f"{DEBIAN_FASHION_MNIST_DIR}), or pass path= to a folder holding the IDX files from "
            "https://github.com/zalandoresearch/fashion-mnist (data/fashion)."
        )
    return _decode(_file_key(images_file), _file_key(labels_file))
