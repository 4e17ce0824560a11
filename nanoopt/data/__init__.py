"""Datasets and batching for nanoopt, in plain NumPy (independent of the autograd).

- :func:`load_digits`: the bundled 8x8 handwritten digits (1,797 images, UCI / Alpaydin & Kaynak 1998).
- :func:`load_fashion_mnist`: Fashion-MNIST (Xiao et al. 2017, MIT) from a folder or Debian's package.
- :func:`load_idx`: any IDX (MNIST-format) file, plain or gzip-compressed, fully validated.
- :func:`stratified_split`: deterministic class-balanced train/test indices.
- :class:`DataLoader`: mini-batches, optionally shuffled with a seed, optionally dropping the last one.
"""

from nanoopt.data.digits import load_digits
from nanoopt.data.fashion_mnist import FASHION_MNIST_CLASSES, fashion_mnist_available, load_fashion_mnist
from nanoopt.data.idx import load_idx
from nanoopt.data.loader import DataLoader
from nanoopt.data.split import stratified_split

__all__ = [
    "DataLoader",
    "FASHION_MNIST_CLASSES",
    "fashion_mnist_available",
    "load_digits",
    "load_fashion_mnist",
    "load_idx",
    "stratified_split",
]
