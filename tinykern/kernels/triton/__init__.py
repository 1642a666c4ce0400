"""Triton kernels, one file per op: the "triton" backend."""

from tinykern.kernels.triton import block_conv2d, block_matmul, q4k_conv2d, q4k_matmul, q8_0_matmul, rvq  # noqa: F401
