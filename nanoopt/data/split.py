"""Deterministic stratified train/test split: every class keeps the same share in both parts.

For each class ``c`` with ``n_c`` examples, ``n_test_c = round(test_fraction * n_c)`` of them, clipped to
``[1, n_c - 1]`` so that every class appears on both sides, go to the test part; which ones is decided by
a permutation from ``numpy.random.default_rng(seed)``, drawn class by class in increasing label order.
The same labels, fraction and seed always give the same split.
"""

from __future__ import annotations

import numpy as np


def stratified_split(
    labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split the indices of ``labels`` into sorted ``(train_indices, test_indices)``, stratified by class.

    The two index arrays (int64) are disjoint and together cover ``0 .. len(labels) - 1``.

    >>> labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    >>> train, test = stratified_split(labels, test_fraction=0.4, seed=0)
    >>> len(train), len(test), np.bincount(labels[test]).tolist()
    (6, 4, [2, 2])
    """
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or labels.dtype.kind not in "iu":
        if isinstance(labels, np.ndarray):
            given = f"a {labels.dtype} array of shape {labels.shape}"
        else:
            given = type(labels).__name__
        raise TypeError(f"stratified_split expects a 1-D integer numpy array of labels, got {given}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float, np.floating)):
        raise TypeError(f"test_fraction must be a float in (0, 1), got {type(test_fraction).__name__}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in the open interval (0, 1), got {test_fraction}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    rng = np.random.default_rng(int(seed))
    test_parts = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            raise ValueError(
                f"class {label} has {len(members)} example; a stratified split needs at least 2 per class"
            )
        n_test = min(max(round(test_fraction * len(members)), 1), len(members) - 1)
        test_parts.append(rng.permutation(members)[:n_test])
    is_test = np.zeros(len(labels), dtype=bool)
    if test_parts:
        is_test[np.concatenate(test_parts)] = True
    return np.flatnonzero(~is_test).astype(np.int64), np.flatnonzero(is_test).astype(np.int64)
