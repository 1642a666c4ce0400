"""Hyper-SD presets and scheduler names select diffusers' schedulers with the right settings."""

import json

import pytest

pytest.importorskip("diffusers")

from tinykern.pipelines.sd import PRESETS, apply_preset, make_scheduler, sd15_config_dir  # noqa: E402


def _base():
    return json.loads((sd15_config_dir() / "scheduler" / "scheduler_config.json").read_text())


class _Pipe:  # apply_preset only swaps the scheduler
    def __init__(self):
        self.scheduler = make_scheduler("pndm", _base())


@pytest.mark.parametrize("name, scheduler, steps, guidance", [
    ("hyper-sd-2step", "DDIMScheduler", 2, 0.0), ("hyper-sd-4step", "DDIMScheduler", 4, 0.0),
    ("hyper-sd-8step", "DDIMScheduler", 8, 0.0), ("hyper-sd-8step-cfg", "DDIMScheduler", 8, 5.0),
    ("hyper-sd-12step-cfg", "DDIMScheduler", 12, 5.0),
])
def test_ddim_presets(name, scheduler, steps, guidance):
    pipe = _Pipe()
    kwargs = apply_preset(pipe, name)
    assert kwargs == {"num_inference_steps": steps, "guidance_scale": guidance}
    assert type(pipe.scheduler).__name__ == scheduler
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"  # SD1.5's training schedule kept
    pipe.scheduler.set_timesteps(steps)
    assert int(pipe.scheduler.timesteps[0]) == 999  # trailing: the first step starts from pure noise


def test_four_step_timesteps():
    pipe = _Pipe()
    apply_preset(pipe, "hyper-sd-4step")
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]


def test_one_step_tcd():
    pipe = _Pipe()
    kwargs = apply_preset(pipe, "hyper-sd-1step")
    assert type(pipe.scheduler).__name__ == "TCDScheduler"
    assert kwargs == {"num_inference_steps": 1, "guidance_scale": 0.0, "eta": 1.0}
    assert PRESETS["hyper-sd-1step"].lora == "Hyper-SD15-1step-lora.safetensors"


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown preset"):
        apply_preset(_Pipe(), "hyper-sd-3step")
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("k_lms_turbo", _base())
