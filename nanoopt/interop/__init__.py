"""Models in and out of other formats: PyTorch checkpoints (read without torch), ONNX, safetensors, inspection.

* :mod:`~nanoopt.interop.torch_pickle` -- ``load_torch``: ``.pth``/``.pt`` through a restricted unpickler;
* :mod:`~nanoopt.interop.onnx_import`, :mod:`~nanoopt.interop.onnx_export` -- ``no.onnx.load`` / ``no.onnx.export``
  (optional extra ``onnx``), with the operator modules of :mod:`~nanoopt.interop.onnx_modules`;
* :mod:`~nanoopt.interop.safetensors_io` -- ``save_safetensors`` / ``load_safetensors`` (optional extra);
* :mod:`~nanoopt.interop.inspection` -- ``nanoopt inspect FILE``: it reads every format, nanoopt's own
  checkpoints through :mod:`nanoopt.io` (which reads PyTorch checkpoints through this package), so it is
  imported as ``nanoopt.interop.inspection``, not re-exported here.

The ONNX and safetensors modules import their optional package when called.
"""

from nanoopt.interop.safetensors_io import load_safetensors, save_safetensors
from nanoopt.interop.torch_pickle import RestrictedUnpickler, UnsafeCheckpointError, load_torch, load_torch_checkpoint

__all__ = ["RestrictedUnpickler", "UnsafeCheckpointError", "load_safetensors", "load_torch", "load_torch_checkpoint",
           "save_safetensors"]
