"""Models in and out of other formats: PyTorch checkpoints (read without torch), ONNX, safetensors, inspection.

* :mod:`~nanoopt.interop.torch_pickle` -- ``load_torch``: ``.pth``/``.pt`` through a restricted unpickler;
* :mod:`~nanoopt.interop.onnx_import`, :mod:`~nanoopt.interop.onnx_export` -- ``no.onnx.load`` / ``no.onnx.export``
  (optional extra ``onnx``), with the operator modules of :mod:`~nanoopt.interop.onnx_modules`;
* :mod:`~nanoopt.interop.safetensors_io` -- ``save_safetensors`` / ``load_safetensors`` (optional extra);
* :mod:`~nanoopt.interop.inspection` -- ``nanoopt inspect FILE``.

Only the torch reader is imported here; the others import their optional package when called.
"""

from nanoopt.interop.inspection import format_inspection, inspect_file
from nanoopt.interop.safetensors_io import load_safetensors, save_safetensors
from nanoopt.interop.torch_pickle import RestrictedUnpickler, UnsafeCheckpointError, load_torch, load_torch_checkpoint

__all__ = ["RestrictedUnpickler", "UnsafeCheckpointError", "format_inspection", "inspect_file", "load_safetensors",
           "load_torch", "load_torch_checkpoint", "save_safetensors"]
