"""rvq_encode (residual VQ, L levels) against torch.cdist + argmin per level and
vector_quantize_pytorch's ResidualVQ in eval mode, with the peak extra memory of one call in
extra_info["peak_memory_bytes"] (on CPU: torch's own allocations, from torch.profiler)."""


def test_rvq_encode(run_row, case, impl):
    run_row("rvq_encode", case, impl)
