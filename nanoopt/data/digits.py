"""The bundled 8x8 handwritten digits: 1,797 real images, so nanoopt trains offline out of the box.

Source: the test set of the UCI "Optical Recognition of Handwritten Digits" data (E. Alpaydin and
C. Kaynak, 1998; Alpaydin & Kaynak, "Cascading Classifiers", Kybernetika 1998), as redistributed by
scikit-learn (BSD-3) in ``sklearn/datasets/data/digits.csv.gz``. Attribution and licence text:
``DIGITS_LICENSE.txt`` beside this file. scikit-learn itself is not needed.

Each 32x32 binary bitmap was cut into 4x4 blocks and the on-pixels of each block counted, so a pixel
``p`` is an integer in ``0..16``; :func:`load_digits` returns ``x = p / 16`` in ``[0, 1]`` (exact in
float32). File format: one image per line, 64 pixels (row-major) then the label ``0..9``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from nanoopt.data.split import stratified_split

DIGITS_PATH = Path(__file__).with_name("digits.csv.gz")
NUM_DIGITS = 1797
IMAGE_SIDE = 8
MAX_PIXEL = 16
SPLITS = ("train", "test", "all")


def read_digits_csv(path: str | os.PathLike = DIGITS_PATH) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate the digits CSV: ``(pixels uint8 (1797, 64) in 0..16, labels int64 (1797,) in 0..9)``.

    Any deviation (unparsable text, other shape, non-integer values, values out of range) raises
    :class:`ValueError` naming the file.

    >>> pixels, labels = read_digits_csv()
    >>> pixels.shape, int(pixels.max()), labels[:5].tolist()
    ((1797, 64), 16, [0, 1, 2, 3, 4])
    """
    path = os.fspath(path)
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path}: not a readable digits CSV ({type(error).__name__}: {error})") from error
    expected_shape = (NUM_DIGITS, IMAGE_SIDE * IMAGE_SIDE + 1)
    if table.shape != expected_shape:
        raise ValueError(f"{path}: expected a table of shape {expected_shape}, got {table.shape}")
    if not np.array_equal(table, np.round(table)):
        raise ValueError(f"{path}: expected integer values only, found non-integers")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > MAX_PIXEL:
        raise ValueError(
            f"{path}: pixels must lie in 0..{MAX_PIXEL}, got range {pixels.min():g}..{pixels.max():g}"
        )
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: labels must lie in 0..9, got range {labels.min():g}..{labels.max():g}")
    return pixels.astype(np.uint8), labels.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """The validated bundled file as read-only ``(images float32 (1797, 1, 8, 8), labels int64)``."""
    pixels, labels = read_digits_csv(DIGITS_PATH)
    images = (pixels.astype(np.float32) / MAX_PIXEL).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)  # (N, 1, 8, 8)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_digits(
    split: str = "train", test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits as ``(images float32 (N, 1, 8, 8) in [0, 1], labels int64 (N,))``.

    ``split`` is ``"train"``, ``"test"`` or ``"all"`` (all 1,797 in file order). Train and test come
    from :func:`~nanoopt.data.split.stratified_split` with ``test_fraction`` and ``seed``: disjoint,
    together all 1,797 images, each class in proportion, and the same for the same arguments. With the
    defaults: 1,438 train and 359 test images. The arrays are fresh copies, safe to modify.

    >>> images, labels = load_digits("test")
    >>> images.shape, images.dtype, float(images.max()), labels.dtype
    ((359, 1, 8, 8), dtype('float32'), 1.0, dtype('int64'))
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels = _bundled_digits()
    train_indices, test_indices = stratified_split(labels, test_fraction=test_fraction, seed=seed)
    if split == "all":
        return images.copy(), labels.copy()
    indices = train_indices if split == "train" else test_indices
    return images[indices], labels[indices]  # fancy indexing copies
