"""Datasets and batching for nanoopt, in plain NumPy (independent of the autograd).

- :func:`load_digits`: the bundled 8x8 handwritten digits (1,797 images, UCI / Alpaydin & Kaynak 1998).
- :func:`load_idx`: any IDX (MNIST-format) file, plain or gzip-compressed, fully validated.
- :func:`stratified_split`: deterministic class-balanced train/test indices.
"""

from nanoopt.data.digits import load_digits
from nanoopt.data.idx import load_idx
from nanoopt.data.split import stratified_split

__all__ = ["load_digits", "load_idx", "stratified_split"]
