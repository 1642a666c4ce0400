"""The weight formats tinykern stores, byte for byte as GGUF stores them."""

from tinykern.formats import q4k, q8_0

FORMATS = {"q4_k": q4k, "q8_0": q8_0}

__all__ = ["FORMATS", "q4k", "q8_0"]
