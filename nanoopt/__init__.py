"""nanoopt: transparent quantization, pruning and distillation for CPUs."""
