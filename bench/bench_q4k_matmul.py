"""q4k_matmul (x @ dequant(W).T + bias, W in Q4_K) on SD1.5 UNet, CLIP-L and LLM shapes: every
tinykern backend `auto` could pick here, against F.linear with the dense weight and against
dequantizing the whole weight first (diffusers' GGUFLinear)."""


def test_q4k_matmul(run_row, case, impl):
    run_row("q4k_matmul", case, impl)
