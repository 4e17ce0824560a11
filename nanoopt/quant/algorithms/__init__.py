"""Post-training quantization algorithms, each a transform of a float or prepared model.

* :mod:`~nanoopt.quant.algorithms.bn_fold` -- BatchNorm folding (Jacob et al. 2018, section 3.2).
"""

from nanoopt.quant.algorithms.bn_fold import fold_batchnorm, fold_bn_parameters

__all__ = ["fold_batchnorm", "fold_bn_parameters"]
