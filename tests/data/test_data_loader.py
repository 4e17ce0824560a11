"""DataLoader: every example once per epoch, drop_last, len, views vs copies, seeded and global shuffling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt.data import DataLoader
from nanoopt.random import manual_seed


def dataset(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``i`` is filled with ``i`` so rows can be matched with their labels."""
    images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 1, 2, 3)).copy()
    return images, np.arange(n, dtype=np.int64)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 70),
    batch_size=st.integers(1, 20),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_example_once_per_epoch(n, batch_size, shuffle, drop_last, seed):
    images, labels = dataset(n)
    loader = DataLoader(images, labels, batch_size=batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
    for _epoch in range(2):
        batches = list(loader)
        assert len(batches) == len(loader)
        expected_len = n // batch_size if drop_last else -(-n // batch_size)
        assert len(loader) == expected_len
        sizes = [len(y) for _, y in batches]
        assert all(size == batch_size for size in sizes[:-1])
        if batches and drop_last:
            assert sizes[-1] == batch_size
        for x, y in batches:
            assert x.shape == (len(y), 1, 2, 3)
            np.testing.assert_array_equal(x[:, 0, 0, 0], y)  # rows stay with their labels
        seen = np.concatenate([y for _, y in batches]) if batches else np.array([], dtype=np.int64)
        assert len(np.unique(seen)) == len(seen)  # nothing twice
        if drop_last:
            assert len(seen) == (n // batch_size) * batch_size
        else:
            np.testing.assert_array_equal(np.sort(seen), labels)  # everything once
        if not shuffle:
            np.testing.assert_array_equal(seen, labels[: len(seen)])


def epochs(loader: DataLoader, count: int) -> list[np.ndarray]:
    return [np.concatenate([y for _, y in loader]) for _ in range(count)]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch_size=st.integers(1, 16))
def test_seeded_shuffle_is_reproducible_and_changes_per_epoch(seed, batch_size):
    images, labels = dataset(40)
    first = epochs(DataLoader(images, labels, batch_size, shuffle=True, seed=seed), 3)
    second = epochs(DataLoader(images, labels, batch_size, shuffle=True, seed=seed), 3)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], first[1])  # 1 / 40! chance of a false failure
    assert not np.array_equal(first[0], labels)
    other = epochs(DataLoader(images, labels, batch_size, shuffle=True, seed=seed + 1), 1)
    assert not np.array_equal(first[0], other[0])


def test_unseeded_shuffle_follows_manual_seed():
    images, labels = dataset(30)
    manual_seed(7)
    first = epochs(DataLoader(images, labels, 8, shuffle=True), 2)
    manual_seed(7)
    second = epochs(DataLoader(images, labels, 8, shuffle=True), 2)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], first[1])


def test_unshuffled_batches_are_views_shuffled_are_copies():
    images, labels = dataset(10)
    x, y = next(iter(DataLoader(images, labels, 4)))
    assert np.shares_memory(x, images) and np.shares_memory(y, labels)
    x, y = next(iter(DataLoader(images, labels, 4, shuffle=True, seed=0)))
    assert not np.shares_memory(x, images) and not np.shares_memory(y, labels)


def test_bad_arguments():
    images, labels = dataset(5)
    with pytest.raises(ValueError, match="same length, got 5 images .* and 4 labels"):
        DataLoader(images, labels[:4])
    with pytest.raises(TypeError, match="images as a numpy array, got list"):
        DataLoader(images.tolist(), labels)
    with pytest.raises(ValueError, match="at least one dimension"):
        DataLoader(images, np.array(3))
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        DataLoader(images, labels, batch_size=0)
    with pytest.raises(TypeError, match="batch_size must be an int, got float"):
        DataLoader(images, labels, batch_size=2.0)
    with pytest.raises(TypeError, match="batch_size must be an int, got bool"):
        DataLoader(images, labels, batch_size=True)
    with pytest.raises(TypeError, match="shuffle must be a bool"):
        DataLoader(images, labels, shuffle=1)
    with pytest.raises(TypeError, match="drop_last must be a bool"):
        DataLoader(images, labels, drop_last="yes")
    with pytest.raises(ValueError, match="seed must be a non-negative int or None, got -1"):
        DataLoader(images, labels, shuffle=True, seed=-1)
    with pytest.raises(TypeError, match="seed must be"):
        DataLoader(images, labels, shuffle=True, seed=1.5)
