"""Ready-made low-VRAM pipelines built from tinykern's quantized modules (optional extras)."""
