"""Post-training quantization algorithms, each with its paper and equation in its module docstring.

* :mod:`~nanoopt.quant.algorithms.bn_fold` -- BatchNorm folding (Jacob et al. 2018, section 3.2);
* :mod:`~nanoopt.quant.algorithms.cross_layer_equalization` -- CLE (Nagel et al. 2019, section 4.1);
* :mod:`~nanoopt.quant.algorithms.bias_correction` -- empirical bias correction (Nagel et al. 2019, 4.2);
* :mod:`~nanoopt.quant.algorithms.adaround` -- AdaRound (Nagel et al. 2020);
* weight-only, for the Linear layers of any model: :mod:`~nanoopt.quant.algorithms.rtn` (round to nearest per
  group), :mod:`~nanoopt.quant.algorithms.gptq` (Frantar et al. 2022), :mod:`~nanoopt.quant.algorithms.awq`
  (Lin et al. 2023).
* :mod:`~nanoopt.quant.algorithms.smoothquant` -- SmoothQuant (Xiao et al. 2022).

The names are loaded on first use (PEP 562): the prepared-model algorithms import :mod:`nanoopt.quant.ptq`,
which itself imports :mod:`~nanoopt.quant.algorithms.bn_fold`.
"""

import importlib
from typing import Any

_LAZY = {
    "fold_batchnorm": "nanoopt.quant.algorithms.bn_fold",
    "fold_bn_parameters": "nanoopt.quant.algorithms.bn_fold",
    "cross_layer_equalization": "nanoopt.quant.algorithms.cross_layer_equalization",
    "bias_correction": "nanoopt.quant.algorithms.bias_correction",
    "adaround": "nanoopt.quant.algorithms.adaround",
    "rtn": "nanoopt.quant.algorithms.rtn",
    "gptq": "nanoopt.quant.algorithms.gptq",
    "awq": "nanoopt.quant.algorithms.awq",
    "smooth_quant": "nanoopt.quant.algorithms.smoothquant",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nanoopt.quant.algorithms' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
