"""Bundled digits: file contents, shapes, ranges; stratified split: disjoint, covering, proportional."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nanoopt.data import load_digits, stratified_split
from nanoopt.data.digits import DIGITS_PATH, read_digits_csv


def test_bundled_file_and_licence_are_present():
    assert DIGITS_PATH.is_file()
    licence = DIGITS_PATH.with_name("DIGITS_LICENSE.txt").read_text()
    assert "Alpaydin" in licence and "Kaynak" in licence and "BSD 3-Clause" in licence


@pytest.mark.parametrize("split, count", [("all", 1797), ("train", 1438), ("test", 359)])
def test_shapes_dtypes_and_ranges(split, count):
    images, labels = load_digits(split)
    assert images.shape == (count, 1, 8, 8) and images.dtype == np.float32
    assert labels.shape == (count,) and labels.dtype == np.int64
    assert images.min() == 0.0 and images.max() == 1.0
    np.testing.assert_array_equal(images * 16, np.round(images * 16))  # exactly p / 16
    assert set(labels.tolist()) == set(range(10))


def test_all_matches_the_csv_file():
    images, labels = load_digits("all")
    with gzip.open(DIGITS_PATH, "rt") as file:
        first = [int(value) for value in file.readline().split(",")]
    np.testing.assert_array_equal(images[0, 0] * 16, np.array(first[:64]).reshape(8, 8))
    assert labels[0] == first[64]
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@settings(max_examples=25, deadline=None)
@given(test_fraction=st.floats(0.05, 0.95), seed=st.integers(0, 2**32 - 1))
def test_train_and_test_partition_all_images(test_fraction, seed):
    all_images, all_labels = load_digits("all")
    train_images, train_labels = load_digits("train", test_fraction=test_fraction, seed=seed)
    test_images, test_labels = load_digits("test", test_fraction=test_fraction, seed=seed)
    assert len(train_labels) + len(test_labels) == 1797
    # the union of both parts is the whole set, as a multiset of (image, label) rows
    def rows(images, labels):
        return np.concatenate([images.reshape(len(images), -1) * 16, labels[:, None]], axis=1)
    combined = np.concatenate([rows(train_images, train_labels), rows(test_images, test_labels)])
    whole = rows(all_images, all_labels)
    np.testing.assert_array_equal(np.unique(combined, axis=0), np.unique(whole, axis=0))
    # each class contributes round(test_fraction * n_c) test images
    class_counts = np.bincount(all_labels, minlength=10)
    test_counts = np.bincount(test_labels, minlength=10)
    assert np.all(np.abs(test_counts - test_fraction * class_counts) <= 0.5 + 1e-9)


def test_split_is_deterministic_and_depends_on_seed():
    first, _ = load_digits("test", seed=3)
    again, _ = load_digits("test", seed=3)
    other, _ = load_digits("test", seed=4)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_returned_arrays_are_private_copies():
    images, labels = load_digits("all")
    images[:] = -1.0
    labels[:] = -1
    fresh_images, fresh_labels = load_digits("all")
    assert fresh_images.min() == 0.0 and fresh_labels.min() == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        load_digits("validation")
    with pytest.raises(ValueError, match=r"open interval \(0, 1\), got 1.0"):
        load_digits("train", test_fraction=1.0)
    with pytest.raises(TypeError, match="seed must be an int"):
        load_digits("train", seed=0.5)


labels_strategy = hnp.arrays(
    np.int64, st.integers(2, 300), elements=st.integers(0, 6)
).filter(lambda labels: np.bincount(labels)[np.unique(labels)].min() >= 2)


@settings(max_examples=50, deadline=None)
@given(labels=labels_strategy, test_fraction=st.floats(0.01, 0.99), seed=st.integers(0, 1000))
def test_stratified_split_contract(labels, test_fraction, seed):
    train, test = stratified_split(labels, test_fraction=test_fraction, seed=seed)
    assert train.dtype == np.int64 and test.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)  # sorted, no repeats
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    for label in np.unique(labels):
        n_class = np.sum(labels == label)
        n_test = np.sum(labels[test] == label)
        assert 1 <= n_test <= n_class - 1  # every class on both sides
        expected = min(max(round(test_fraction * n_class), 1), n_class - 1)
        assert n_test == expected
    again = stratified_split(labels, test_fraction=test_fraction, seed=seed)
    np.testing.assert_array_equal(again[1], test)


def test_stratified_split_rejects_bad_input():
    with pytest.raises(ValueError, match="class 2 has 1 example"):
        stratified_split(np.array([0, 0, 1, 1, 2]))
    with pytest.raises(TypeError, match="1-D integer numpy array"):
        stratified_split(np.array([0.0, 1.0]))
    with pytest.raises(TypeError, match="1-D integer numpy array"):
        stratified_split([0, 0, 1, 1])
    with pytest.raises(ValueError, match="open interval"):
        stratified_split(np.array([0, 0, 1, 1]), test_fraction=0.0)


def write_csv(path, table):
    with gzip.open(path, "wt") as file:
        for row in table:
            file.write(",".join(str(value) for value in row) + "\n")


def valid_table():
    pixels, labels = read_digits_csv()
    return np.concatenate([pixels.astype(np.int64), labels[:, None]], axis=1)


def test_read_digits_csv_validates_contents(tmp_path):
    path = tmp_path / "digits.csv.gz"
    table = valid_table()
    write_csv(path, table[:-1])
    with pytest.raises(ValueError, match=r"expected a table of shape \(1797, 65\), got \(1796, 65\)"):
        read_digits_csv(path)
    bad = table.copy()
    bad[5, 3] = 17
    write_csv(path, bad)
    with pytest.raises(ValueError, match=r"pixels must lie in 0..16, got range 0..17"):
        read_digits_csv(path)
    bad = table.copy()
    bad[7, -1] = 10
    write_csv(path, bad)
    with pytest.raises(ValueError, match=r"labels must lie in 0..9, got range 0..10"):
        read_digits_csv(path)
    lines = [",".join(str(value) for value in row) for row in table]
    lines[0] = lines[0].replace("0,", "0.5,", 1)
    with gzip.open(path, "wt") as file:
        file.write("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="integer values only"):
        read_digits_csv(path)
    path.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="not a readable digits CSV"):
        read_digits_csv(path)
