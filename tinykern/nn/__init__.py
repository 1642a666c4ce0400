"""Drop-in quantized modules."""

from tinykern.nn.conv import Q4Conv2d
from tinykern.nn.linear import Q4Linear, Q8Linear

__all__ = ["Q4Conv2d", "Q4Linear", "Q8Linear"]
