"""Stable Diffusion 1.x in about 1 GB of VRAM: Q4_K UNet (convs included), Q8_0 CLIP text
encoder, VAE decoding on the CPU, LoRA beside the packed weights, Hyper-SD presets.

Needs the `sd` extra (diffusers, transformers): pip install 'tinykern[sd]'. Names are imported
on first use, so `tinykern.pipelines.sd.cli` and `.presets` load without the extra.
"""

import importlib
import logging

_EXPORTS = {
    "SDQuantConfig": "layout", "load_pipeline": "loaders", "save_pipeline": "loaders", "sd15_config_dir": "loaders",
    "LoRA": "lora", "load_lora": "lora", "TinySDPipeline": "pipeline", "PRESETS": "presets", "SCHEDULERS": "presets",
    "apply_preset": "presets", "make_scheduler": "presets", "clip_tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)
_TORCHVISION_NOTICE = "requires torchvision (not installed); falling back to"


class _DropTorchvisionNotice(logging.Filter):
    """Importing diffusers makes transformers warn that its image processors fall back from
    torchvision to PIL; these pipelines use no image processor, so only that notice is dropped."""

    def filter(self, record):
        return _TORCHVISION_NOTICE not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionNotice())


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require_extra()
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def require_extra():
    """Raise an ImportError that says how to install diffusers and transformers."""
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError(f"tinykern's SD pipeline needs diffusers and transformers: pip install 'tinykern[sd]' ({e})") from e
