"""Datasets and batching for nanoopt, in plain NumPy (independent of the autograd).

- :func:`load_digits`: the bundled 8x8 handwritten digits (1,797 images, UCI / Alpaydin & Kaynak 1998).
- :func:`load_fashion_mnist`: Fashion-MNIST (Xiao et al. 2017, MIT) from a folder or Debian's package.
- :func:`load_idx`: any IDX (MNIST-format) file, plain or gzip-compressed, fully validated.
- :func:`stratified_split`: deterministic class-balanced train/test indices.
- :func:`load_shakespeare`: the bundled complete works of Shakespeare (5.06 M characters), with
  :class:`CharTokenizer`, :func:`sample_windows` and :func:`validation_windows` for character-level models.
- :class:`DataLoader`: mini-batches, optionally shuffled with a seed, optionally dropping the last one.
"""

from nanoopt.data.digits import load_digits
from nanoopt.data.fashion_mnist import FASHION_MNIST_CLASSES, fashion_mnist_available, load_fashion_mnist
from nanoopt.data.idx import load_idx
from nanoopt.data.loader import DataLoader
from nanoopt.data.split import stratified_split
from nanoopt.data.text import CharTokenizer, load_shakespeare, sample_windows, validation_windows

__all__ = [
    "CharTokenizer",
    "DataLoader",
    "FASHION_MNIST_CLASSES",
    "fashion_mnist_available",
    "load_digits",
    "load_fashion_mnist",
    "load_idx",
    "load_shakespeare",
    "sample_windows",
    "stratified_split",
    "validation_windows",
]
