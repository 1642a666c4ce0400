"""Reading and writing other tools' files."""

from tinykern.io.gguf import GGUFTensor, read_gguf, write_gguf

__all__ = ["GGUFTensor", "read_gguf", "write_gguf"]
