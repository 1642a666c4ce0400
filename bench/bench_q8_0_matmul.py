"""q8_0_matmul (x @ dequant(W).T + bias, W in Q8_0) on CLIP-L and LLM shapes, against F.linear
with the dense weight and against dequantizing the whole weight first (diffusers' GGUFLinear)."""


def test_q8_0_matmul(run_row, case, impl):
    run_row("q8_0_matmul", case, impl)
