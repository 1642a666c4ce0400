"""The record of one GGML block format: everything the rest of tinykern asks of a format.

A format is its geometry (weights and bytes per block, GGML type id), its quantizer and
dequantizer (tinykern.formats.<module>), and the decode pieces each backend keeps keyed by the
GGML type (csrc/cpu/formats.h, csrc/cuda/formats.cuh, tinykern/kernels/triton/decode.py).
docs/adding-a-format.md lists the files a new format touches.
"""

import dataclasses
from typing import Callable, Optional


@dataclasses.dataclass(frozen=True, eq=False)
class Format:
    name: str  # the GGML type name in lower case: "q4_k"; the key of FORMATS
    ggml_type: int  # GGMLQuantizationType, as GGUF files store it
    block: int  # weights per block
    block_bytes: int  # bytes per block
    # (blocks uint8 [..., nb*block_bytes], dtype) -> [..., nb*block], bit-identical to gguf-py
    dequantize: Callable
    # (w [..., K] with K a multiple of `block`, name) -> uint8 [..., K/block*block_bytes];
    # None for a format tinykern would read and run but not write.
    quantize: Optional[Callable]
    # The public op names are f"{op_prefix}_matmul" etc.: "q4k" for Q4_K (its name before the
    # formats were generic), the format's name otherwise.
    op_prefix: str = ""
    # The names in tinykern.nn of the module classes that hold this format.
    linear: str = "QuantLinear"
    conv: str = "QuantConv2d"

    def __post_init__(self):
        if not self.op_prefix:
            object.__setattr__(self, "op_prefix", self.name)

    @property
    def bits_per_weight(self):
        return self.block_bytes * 8 / self.block

    def op(self, kind):
        """The backend registry's name of this format's `kind` op ("matmul", "dequantize",
        "conv2d", "conv2d_grouped"): "q4k_matmul", "q5_k_matmul", ..."""
        return f"{self.op_prefix}_{kind}"

    @property
    def linear_class(self):
        import tinykern.nn

        return getattr(tinykern.nn, self.linear)

    @property
    def conv_class(self):
        import tinykern.nn

        return getattr(tinykern.nn, self.conv)

    def padded(self, features):
        """features rounded up to whole blocks."""
        return -(-features // self.block) * self.block

    def row_bytes(self, features):
        """Bytes of one row of `features` weights, zero-padded to whole blocks."""
        return -(-features // self.block) * self.block_bytes

    def __repr__(self):
        return f"Format({self.name!r})"

    # One record per format: copies and unpickled modules share FORMATS' record.
    def __reduce__(self):
        return _registered, (self.name,)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def _registered(name):
    from tinykern.formats import FORMATS

    return FORMATS[name]
