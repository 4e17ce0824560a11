"""What a checkpoint records about quantized tensors, and the checks a quantized layer runs on loaded codes.

``Module.describe_state()`` (see :meth:`nanoopt.nn.Module.load_state_dict`) describes, per state entry,
the quantization it holds as a JSON-serialisable dict; ``nanoopt.io`` writes these descriptions into the
checkpoint header and a tensor loads only into a model whose description is the same. A dtype alone does not
say enough: 3- and 4-bit codes are both int8 (or both packed bytes), an int8 and an int16 grid both have float32
scales. So the description of a grid is its :class:`~nanoopt.spec.QuantSpec` (bits, signedness, symmetry,
per-channel axis, narrow range), plus the layout of the codes (packing, group size) where it varies.

>>> from nanoopt.spec import QuantSpec
>>> spec_metadata(QuantSpec(bits=4, symmetric=True))
{'bits': 4, 'signed': True, 'symmetric': True, 'per_channel': False, 'axis': 0, 'narrow_range': False}
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from nanoopt.spec import QuantSpec

__all__ = ["check_codes_fit", "qparams_metadata", "spec_metadata"]


def spec_metadata(spec: QuantSpec) -> dict[str, Any]:
    """The fields of ``spec`` as plain Python values."""
    return {key: (bool(value) if isinstance(value, bool | np.bool_) else int(value))
            for key, value in dataclasses.asdict(spec).items()}


def qparams_metadata(module: Any, prefixes: list[str]) -> dict[str, dict[str, Any]]:
    """``{"<p>_scale": spec, "<p>_zero_point": spec}`` for each prefix ``p`` whose ``<p>_spec`` the module has
    (the grids registered by ``nanoopt.quant.qmodules``).

    >>> from types import SimpleNamespace
    >>> sorted(qparams_metadata(SimpleNamespace(input_spec=QuantSpec()), ["input", "output"]))
    ['input_scale', 'input_zero_point']
    """
    metadata = {}
    for prefix in prefixes:
        spec = getattr(module, f"{prefix}_spec", None)
        if isinstance(spec, QuantSpec):
            description = spec_metadata(spec)
            metadata[f"{prefix}_scale"] = description
            metadata[f"{prefix}_zero_point"] = dict(description)
    return metadata


def check_codes_fit(codes: np.ndarray, low: int, high: int, what: str) -> None:
    """Raise ``ValueError`` if an integer array has values outside ``[low, high]`` (naming ``what``).

    >>> check_codes_fit(np.array([-8, 7], np.int8), -7, 7, "weight")
    Traceback (most recent call last):
    ...
    ValueError: weight holds codes in [-8, 7], outside the layer's range [-7, 7]
    """
    if codes.size and (int(codes.min()) < low or int(codes.max()) > high):
        raise ValueError(f"{what} holds codes in [{int(codes.min())}, {int(codes.max())}], outside the layer's "
                         f"range [{low}, {high}]")
