"""Models in and out of other formats: PyTorch checkpoints (read without torch), ONNX, safetensors."""

from nanoopt.interop.torch_pickle import RestrictedUnpickler, UnsafeCheckpointError, load_torch, load_torch_checkpoint

__all__ = ["RestrictedUnpickler", "UnsafeCheckpointError", "load_torch", "load_torch_checkpoint"]
