"""Datasets and batching for nanoopt, in plain NumPy (independent of the autograd).

- :func:`load_idx` reads any IDX (MNIST-format) file, plain or gzip-compressed, with full validation.
"""

from nanoopt.data.idx import load_idx

__all__ = ["load_idx"]
