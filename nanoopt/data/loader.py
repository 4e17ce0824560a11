"""Mini-batches over in-memory arrays: the NumPy counterpart of ``torch.utils.data.DataLoader``.

One pass over a :class:`DataLoader` is one epoch. Without shuffling the batches are consecutive slices
``[0, B), [B, 2B), ...``; with shuffling, epoch ``k`` visits the examples in the order of the ``k``-th
permutation drawn from one generator, ``numpy.random.default_rng(seed)`` created once with the loader,
so every epoch differs and the whole sequence of epochs is reproducible. With ``seed=None`` the
permutations come from nanoopt's global generator (:func:`nanoopt.random.get_rng`), which
``nanoopt.manual_seed`` resets. ``len(loader)`` is ``ceil(N / B)``, or ``floor(N / B)`` with
``drop_last=True`` (the last, short batch is then left out).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from nanoopt.random import get_rng


class DataLoader:
    """Iterate over ``(images[batch], labels[batch])`` pairs of NumPy arrays, ``batch_size`` at a time.

    ``images`` and ``labels`` are arrays with the same first dimension ``N`` (the examples). Unshuffled
    batches are views into them (read-only if they are); shuffled batches are fresh copies.

    >>> images, labels = np.arange(10.0).reshape(5, 2), np.arange(5)
    >>> loader = DataLoader(images, labels, batch_size=2)
    >>> len(loader), [y.tolist() for _, y in loader]
    (3, [[0, 1], [2, 3], [4]])
    >>> [y.tolist() for _, y in DataLoader(images, labels, batch_size=2, drop_last=True)]
    [[0, 1], [2, 3]]
    >>> sorted(np.concatenate([y for _, y in DataLoader(images, labels, 2, shuffle=True, seed=0)]).tolist())
    [0, 1, 2, 3, 4]
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int = 64,
        shuffle: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
    ) -> None:
        for name, array in (("images", images), ("labels", labels)):
            if not isinstance(array, np.ndarray):
                raise TypeError(f"DataLoader expects {name} as a numpy array, got {type(array).__name__}")
            if array.ndim < 1:
                raise ValueError(f"DataLoader expects {name} with at least one dimension, got a 0-d array")
        if len(images) != len(labels):
            raise ValueError(
                f"images and labels must have the same length, got {len(images)} images "
                f"(shape {images.shape}) and {len(labels)} labels (shape {labels.shape})"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
                raise TypeError(f"seed must be a non-negative int or None, got {type(seed).__name__}")
            if seed < 0:
                raise ValueError(f"seed must be a non-negative int or None, got {seed}")
        self.images = images
        self.labels = labels
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self._rng = np.random.default_rng(int(seed)) if seed is not None else None

    def __len__(self) -> int:
        """Number of batches per epoch."""
        full, rest = divmod(len(self.labels), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One epoch; a shuffled loader draws this epoch's permutation now, when iteration starts."""
        if self.shuffle:
            rng = self._rng if self._rng is not None else get_rng()
            return self._shuffled_batches(rng.permutation(len(self.labels)))
        return self._sequential_batches()

    def _sequential_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            stop = start + self.batch_size
            yield self.images[start:stop], self.labels[start:stop]

    def _shuffled_batches(self, order: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = order[start : start + self.batch_size]
            yield self.images[batch], self.labels[batch]

    def __repr__(self) -> str:
        return (
            f"DataLoader(examples={len(self.labels)}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"seed={self.seed}, drop_last={self.drop_last})"
        )
