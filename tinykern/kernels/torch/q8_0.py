"""Q8_0 ops in plain torch: dequantize the whole weight, then matmul."""

import torch.nn.functional as F

from tinykern import backends
from tinykern.formats import q8_0


@backends.register("q8_0_dequantize", "torch")
def q8_0_dequantize(blocks, dtype):
    return q8_0.dequantize(blocks, dtype)


@backends.register("q8_0_matmul", "torch")
def q8_0_matmul(x, w, bias):
    weight = q8_0.dequantize(w, x.dtype)[:, : x.shape[-1]]
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
