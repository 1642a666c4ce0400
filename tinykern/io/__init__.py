"""Reading and writing other tools' files."""

from tinykern.io.gguf import GGUFFile, GGUFTensor, open_gguf, read_gguf, write_gguf

__all__ = ["GGUFFile", "GGUFTensor", "open_gguf", "read_gguf", "write_gguf"]
