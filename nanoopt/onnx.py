"""ONNX in and out (optional extra ``onnx``): ``no.onnx.load(path)`` and ``no.onnx.export(model, path, x)``.

The ``onnx`` package is imported only when one of these is called, so ``import nanoopt`` never needs it. See
:mod:`nanoopt.interop.onnx_import` and :mod:`nanoopt.interop.onnx_export` for what is supported and how.
"""

from __future__ import annotations

from nanoopt.interop.onnx_export import OnnxExportError, compare, export
from nanoopt.interop.onnx_import import OnnxImportError, load

__all__ = ["OnnxExportError", "OnnxImportError", "compare", "export", "load"]
