"""Unmerged LoRA factors held in Q8_0 (8.5 bits a weight instead of 16): about half the bytes
of an fp16 branch, its effect off by Q8_0's rounding of each factor (about 0.3% of the factor's
RMS for Gaussian factors), with nothing re-quantized in the base weight (merging into a Q4_K
weight costs far more: see tinykern.pipelines.sd.lora).

Each call dequantizes the two factors (rank x in*kh*kw and out x rank: at most a few MB) to the
input's dtype and adds the branch into the layer's output in place.
"""

import torch

from tinykern import ops
from tinykern.formats import FORMATS
from tinykern.formats.common import quantize_rows
from tinykern.pipelines.sd.lora import LoRABranch


_Q8_0 = FORMATS["q8_0"]


def _pack(factor):
    """[rows, ...] float factor -> (Q8_0 blocks [rows, nb*34], features before padding)."""
    rows = factor.reshape(factor.shape[0], -1)
    features = rows.shape[1]
    if rows.is_meta:
        return torch.empty(rows.shape[0], _Q8_0.row_bytes(features), dtype=torch.uint8, device="meta"), features
    return quantize_rows(_Q8_0, rows, "LoRA factor"), features


class Q8LoRABranch(LoRABranch):
    """LoRABranch whose down/up factors are Q8_0 blocks (buffers `down`, `up`, uint8)."""

    in_place = True  # factors() dequantizes: copies

    def __init__(self, target, down, up, scale, dtype=torch.float16):
        super().__init__(target, down, up, scale, dtype=down.dtype if down.is_floating_point() else torch.float32)
        self.down_shape, self.up_shape = tuple(self.down.shape), tuple(self.up.shape)
        self.down, self._down_features = _pack(self.down)
        self.up, self._up_features = _pack(self.up)

    def factors(self, dtype):
        down = ops.dequantize(self.down, _Q8_0, dtype)[:, :self._down_features].reshape(self.down_shape)
        up = ops.dequantize(self.up, _Q8_0, dtype)[:, :self._up_features].reshape(self.up_shape)
        return down, up
