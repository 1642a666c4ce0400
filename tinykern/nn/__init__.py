"""Drop-in quantized modules."""

from tinykern.nn.conv import Q4Conv2d, QuantConv2d
from tinykern.nn.linear import Q4Linear, Q8Linear, QuantLinear
from tinykern.nn.residual_vq import ResidualVQ

__all__ = ["Q4Conv2d", "Q4Linear", "Q8Linear", "QuantConv2d", "QuantLinear", "ResidualVQ"]
