"""Presets of the supported UNet teachers: where they live, how they predict, how they encode prompts.

The real ``config.json`` files of each model's components are kept in ``teachers/configs/<preset>/`` so the
full-size architectures can be built (``jax.eval_shape``) without a download.
"""

from __future__ import annotations

import dataclasses
import json
import os

CONFIG_ROOT = os.path.join(os.path.dirname(__file__), "configs")
# The miniature digits world's teacher, trained by tools/build_digits_world.py and shipped with the package.
DIGITS_ROOT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "digits")
DIGITS_TEACHER = os.path.join(DIGITS_ROOT, "teacher")
DIGITS_CLASSIFIER = os.path.join(DIGITS_ROOT, "classifier")
UNCOND_RULES = ("empty_prompt", "zeros")


@dataclasses.dataclass(frozen=True)
class TeacherPreset:
    name: str
    hub_id: str
    prediction: str  # the UNet's parameterization: "eps" or "v"
    resolution: int  # image side in pixels
    encoders: tuple[tuple[str, str], ...]  # (component, hidden-state choice "last" | "penultimate")
    pooled_from: str | None  # component whose pooled embedding conditions the UNet (SDXL), if any
    uncond: str  # unconditional input: "empty_prompt" (encode "") or "zeros" (SDXL recipes)
    config_dir: str  # a directory of real configs (sd21base shares sd21's encoder and VAE)

    def component_config(self, component: str) -> dict:
        for name in (self.name, self.config_dir):
            path = os.path.join(CONFIG_ROOT, name, component, "config.json")
            if os.path.exists(path):
                with open(path) as f:
                    return json.load(f)
        raise FileNotFoundError(f"no stored config for {component} of {self.name}")

    @property
    def scheduler_config(self) -> dict:
        with open(os.path.join(CONFIG_ROOT, self.name, "scheduler", "scheduler_config.json")) as f:
            return json.load(f)


PRESETS = {
    "sd15": TeacherPreset(
        "sd15",
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "eps",
        512,
        (("text_encoder", "last"),),
        None,
        "empty_prompt",
        "sd15",
    ),
    "sd21base": TeacherPreset(
        "sd21base",
        "stabilityai/stable-diffusion-2-1-base",
        "eps",
        512,
        (("text_encoder", "last"),),
        None,
        "empty_prompt",
        "sd21",
    ),
    "sd21": TeacherPreset(
        "sd21",
        "stabilityai/stable-diffusion-2-1",
        "v",
        768,
        (("text_encoder", "last"),),
        None,
        "empty_prompt",
        "sd21",
    ),
    "sdxl": TeacherPreset(
        "sdxl",
        "stabilityai/stable-diffusion-xl-base-1.0",
        "eps",
        1024,
        (("text_encoder", "penultimate"), ("text_encoder_2", "penultimate")),
        "text_encoder_2",
        "zeros",
        "sdxl",
    ),
    # 32x32 RGB images, 8x8x4 latents, a 2-layer CLIP text encoder: see jdistill/digits.
    "digits": TeacherPreset(
        "digits", DIGITS_TEACHER, "eps", 32, (("text_encoder", "last"),), None, "empty_prompt", "digits"
    ),
}


def get_preset(name: str) -> TeacherPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown teacher preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
