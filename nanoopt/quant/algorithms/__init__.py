"""Post-training quantization algorithms, each with its paper and equation in its module docstring.

* :mod:`~nanoopt.quant.algorithms.cross_layer_equalization` -- CLE (Nagel et al. 2019, section 4.1);
* :mod:`~nanoopt.quant.algorithms.bias_correction` -- empirical bias correction (Nagel et al. 2019, 4.2);
* :mod:`~nanoopt.quant.algorithms.adaround` -- AdaRound (Nagel et al. 2020);
* weight-only, for the Linear layers of any model: :mod:`~nanoopt.quant.algorithms.rtn` (round to nearest per
  group), :mod:`~nanoopt.quant.algorithms.gptq` (Frantar et al. 2022), :mod:`~nanoopt.quant.algorithms.awq`
  (Lin et al. 2023).

Also exported here, from the modules of :mod:`nanoopt.quant` that the flows themselves call (so they sit below
:mod:`~nanoopt.quant.ptq`, which the algorithms on prepared models import): BatchNorm folding
(:mod:`~nanoopt.quant.bn_fold`, Jacob et al. 2018, section 3.2; ``prepare`` folds) and SmoothQuant
(:mod:`~nanoopt.quant.smoothquant`, Xiao et al. 2022; ``quantize_w8a8`` smooths).
"""

from nanoopt.quant.algorithms.adaround import adaround
from nanoopt.quant.algorithms.awq import awq
from nanoopt.quant.algorithms.bias_correction import bias_correction
from nanoopt.quant.algorithms.cross_layer_equalization import cross_layer_equalization
from nanoopt.quant.algorithms.gptq import gptq
from nanoopt.quant.algorithms.rtn import rtn
from nanoopt.quant.bn_fold import fold_batchnorm, fold_bn_parameters
from nanoopt.quant.smoothquant import smooth_quant

__all__ = ["fold_batchnorm", "fold_bn_parameters", "cross_layer_equalization", "bias_correction", "adaround", "rtn",
           "gptq", "awq", "smooth_quant"]
