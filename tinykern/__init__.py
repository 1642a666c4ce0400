"""tinykern: GGML block-format (Q4_K, Q8_0, ...) and residual-VQ kernels and modules for image generation in little GPU memory."""

from tinykern import _ext  # noqa: F401  (loads _C, which registers the native ops)
from tinykern import formats, ops, profile  # noqa: F401  (profile honours TINYKERN_NVTX=1)
from tinykern.backends import backend
from tinykern.nn import Q4Conv2d, Q4Linear, Q8Linear, QuantConv2d, QuantLinear, ResidualVQ
from tinykern.quantize import QuantConfig, QuantReport, quantize_
from tinykern.serialization import load_quantized, save_quantized

__version__ = "0.1.0"
__all__ = [
    "Q4Conv2d", "Q4Linear", "Q8Linear", "QuantConfig", "QuantConv2d", "QuantLinear", "QuantReport", "backend", "formats",
    "load_quantized", "ops", "quantize_", "ResidualVQ", "save_quantized",
]
