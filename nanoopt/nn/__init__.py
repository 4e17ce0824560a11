"""Layers and the Module tree, with PyTorch's names and semantics (see DESIGN.md)."""

from nanoopt.nn import functional, init, utils
from nanoopt.nn.attention import Embedding, ModuleDict, MultiheadAttention
from nanoopt.nn.layers import (
    GELU,
    AdaptiveAvgPool2d,
    Add,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    Identity,
    LayerNorm,
    Linear,
    MaxPool2d,
    ModuleList,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
)
from nanoopt.nn.module import Module, Parameter, RemovableHandle

__all__ = [
    "Add", "AdaptiveAvgPool2d", "AvgPool2d", "BatchNorm1d", "BatchNorm2d", "Conv2d", "Dropout",
    "Flatten", "GELU", "Identity", "LayerNorm", "Linear", "MaxPool2d", "Module", "ModuleList", "Parameter",
    "ReLU", "RemovableHandle", "Sequential", "Sigmoid", "Tanh", "functional", "init",
    "Embedding", "ModuleDict", "MultiheadAttention", "utils",
]
