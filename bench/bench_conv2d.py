"""conv2d with a packed weight of every selected format (TINYKERN_BENCH_FORMATS) on SD1.5 UNet
convs at 64/32/16/8 latent sizes (batch 2 for CFG) and RQ-VAE decoder convs, against F.conv2d with
the dense weight and against dequantizing the whole weight first."""


def test_conv2d(run_row, op, case, impl):
    run_row(op, case, impl)
