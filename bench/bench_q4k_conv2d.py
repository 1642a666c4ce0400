"""q4k_conv2d (conv2d with a Q4_K weight) on SD1.5 UNet convs at 64/32/16/8 latent sizes (batch 2
for CFG) and RQ-VAE decoder convs, against F.conv2d with the dense weight and against
dequantizing the whole weight first."""


def test_q4k_conv2d(run_row, case, impl):
    run_row("q4k_conv2d", case, impl)
