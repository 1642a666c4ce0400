"""matmul (x @ dequant(W).T + bias) of every selected format (TINYKERN_BENCH_FORMATS) on SD1.5
UNet, CLIP-L and LLM shapes: every tinykern backend `auto` could pick here, against F.linear with
the dense weight and against dequantizing the whole weight first (diffusers' GGUFLinear)."""


def test_matmul(run_row, op, case, impl):
    run_row(op, case, impl)
