"""Neural-network building blocks shared by the RNA and multimodal models."""

from regvi.nn.gemm import Linear, cpu_gemm_backend, linear
from regvi.nn.layers import (
    CategoricalInjection,
    Decoder,
    Encoder,
    FCLayers,
    InputLinear,
    sparse_input_linear,
)

__all__ = [
    "CategoricalInjection",
    "Decoder",
    "Encoder",
    "FCLayers",
    "InputLinear",
    "Linear",
    "cpu_gemm_backend",
    "linear",
    "sparse_input_linear",
]
