"""Schedulers by name, and sampling presets (Hyper-SD's SD1.5 LoRAs)."""

import dataclasses

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
}


def make_scheduler(name, base_config, **overrides):
    """The diffusers scheduler `name` (a key of SCHEDULERS) built from `base_config` (the
    model's scheduler config, which carries the training betas) with `overrides`."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(base_config, **overrides)


@dataclasses.dataclass(frozen=True)
class Preset:
    """How to sample with a distilled LoRA: scheduler, steps, guidance and the LoRA it is for."""

    name: str
    lora: str  # the file the preset is for (ByteDance/Hyper-SD on the Hugging Face Hub)
    scheduler: str
    scheduler_overrides: dict
    steps: int
    guidance: float
    eta: float | None = None  # TCD's gamma: 1.0 is the most stochastic, Hyper-SD's choice at 1 step

    def call_kwargs(self):
        kwargs = {"num_inference_steps": self.steps, "guidance_scale": self.guidance}
        if self.eta is not None:
            kwargs["eta"] = self.eta
        return kwargs


_TRAILING = {"timestep_spacing": "trailing"}
PRESETS = {p.name: p for p in (
    Preset("hyper-sd-1step", "Hyper-SD15-1step-lora.safetensors", "tcd", {}, 1, 0.0, eta=1.0),
    Preset("hyper-sd-2step", "Hyper-SD15-2steps-lora.safetensors", "ddim", _TRAILING, 2, 0.0),
    Preset("hyper-sd-4step", "Hyper-SD15-4steps-lora.safetensors", "ddim", _TRAILING, 4, 0.0),
    Preset("hyper-sd-8step", "Hyper-SD15-8steps-lora.safetensors", "ddim", _TRAILING, 8, 0.0),
    Preset("hyper-sd-8step-cfg", "Hyper-SD15-8steps-CFG-lora.safetensors", "ddim", _TRAILING, 8, 5.0),
    Preset("hyper-sd-12step-cfg", "Hyper-SD15-12steps-CFG-lora.safetensors", "ddim", _TRAILING, 12, 5.0),
)}


def apply_preset(pipe, name):
    """Give `pipe` the preset's scheduler; return the call arguments (steps, guidance, eta)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    pipe.scheduler = make_scheduler(preset.scheduler, pipe.scheduler.config, **preset.scheduler_overrides)
    return preset.call_kwargs()
