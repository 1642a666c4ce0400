"""The weight formats tinykern stores, byte for byte as GGUF stores them (docs/formats.md).

FORMATS maps each GGML block format's lower-case type name ("q4_k") to its record
(tinykern.formats.record.Format); everything that handles several formats loops over it.
"""

import importlib

from tinykern.formats.record import Format

# The modules holding one format each; each defines FORMAT, its record.
_MODULES = ("q4k", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q5_k", "q6_k")

FORMATS = dict(
    sorted(((f.name, f) for f in (importlib.import_module(f"tinykern.formats.{m}").FORMAT for m in _MODULES)),
           key=lambda item: item[1].ggml_type)
)
BY_GGML_TYPE = {f.ggml_type: f for f in FORMATS.values()}
# The unquantized GGML types tinykern reads as dense tensors: {name: (GGML type id, torch dtype name)}.
DENSE_TYPES = {"f32": (0, "float32"), "f16": (1, "float16"), "bf16": (30, "bfloat16")}


def get(name, where="tinykern"):
    """The record of format `name` (a FORMATS key or a Format), or ValueError naming `where`."""
    if isinstance(name, Format):
        return name
    fmt = FORMATS.get(name.lower()) if isinstance(name, str) else None
    if fmt is None:
        raise ValueError(f"{where}: unknown format {name!r}; expected one of {list(FORMATS)}")
    return fmt


__all__ = ["BY_GGML_TYPE", "DENSE_TYPES", "FORMATS", "Format", "get"]
