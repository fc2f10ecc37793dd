"""Presets of the supported teachers (UNets; FLUX and SD3 transformers): where they live, how they predict,
how they encode prompts.

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
# The miniature flow world's FLUX-architecture teacher (tools/build_flux_digits_world.py); scored by the digits
# classifier above.
DIGITS_FLUX_ROOT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "digits_flux")
DIGITS_FLUX_TEACHER = os.path.join(DIGITS_FLUX_ROOT, "teacher")
UNCOND_RULES = ("empty_prompt", "zeros")


class StoredConfigs:
    """The real component and scheduler configs of a preset, kept in ``teachers/configs/``."""

    name: str
    config_dir: str

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


@dataclasses.dataclass(frozen=True)
class TeacherPreset(StoredConfigs):
    """A UNet teacher (``teacher.kind = "diffusers"``)."""

    name: str
    hub_id: str
    prediction: str  # the UNet's parameterization: "eps" or "v"
    resolution: int  # image side in pixels
    encoders: tuple[tuple[str, str], ...]  # (component, hidden-state choice "last" | "penultimate")
    pooled_from: str | None  # component whose pooled embedding conditions the UNet (SDXL), if any
    uncond: str  # unconditional input: "empty_prompt" (encode "") or "zeros" (SDXL recipes)
    config_dir: str  # a directory of real configs (sd21base shares sd21's encoder and VAE)


@dataclasses.dataclass(frozen=True)
class FlowTeacherPreset(StoredConfigs):
    """A flow-matching transformer teacher (``teacher.kind = "flow"``): FLUX.1 or SD3 / SD3.5."""

    name: str
    hub_id: str
    family: str  # "flux" or "sd3" (jdistill.diffusion.transformer_denoiser)
    resolution: int
    clips: tuple[str, ...]  # the CLIP encoders' components, in the pipeline's order
    t5: str  # the T5 encoder's component
    t5_length: int  # T5 tokens per prompt (the pipelines' max_sequence_length default)
    config_dir: str
    uncond: str = "empty_prompt"  # SD3's negative prompt ""; FLUX-dev/lite need none (guidance embedding)

    @property
    def encoders(self) -> tuple[str, ...]:
        return (*self.clips, self.t5)


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
    "flux_dev": FlowTeacherPreset(
        "flux_dev",
        "black-forest-labs/FLUX.1-dev",
        "flux",
        1024,
        ("text_encoder",),
        "text_encoder_2",
        512,
        "flux_dev",
    ),
    "flux_schnell": FlowTeacherPreset(
        "flux_schnell",
        "black-forest-labs/FLUX.1-schnell",
        "flux",
        1024,
        ("text_encoder",),
        "text_encoder_2",
        256,
        "flux_schnell",
    ),
    "flux_lite": FlowTeacherPreset(
        "flux_lite",
        "Freepik/flux.1-lite-8B",
        "flux",
        1024,
        ("text_encoder",),
        "text_encoder_2",
        512,
        "flux_lite",
    ),
    **{
        name: FlowTeacherPreset(
            name, hub, "sd3", 1024, ("text_encoder", "text_encoder_2"), "text_encoder_3", 256, name
        )
        for name, hub in (
            ("sd3_medium", "stabilityai/stable-diffusion-3-medium-diffusers"),
            ("sd35_medium", "stabilityai/stable-diffusion-3.5-medium"),
            ("sd35_large", "stabilityai/stable-diffusion-3.5-large"),
        )
    },
    # 32x32 RGB images, 8x8x4 latents, a 2-layer CLIP text encoder: see jdistill/digits.
    "digits": TeacherPreset(
        "digits", DIGITS_TEACHER, "eps", 32, (("text_encoder", "last"),), None, "empty_prompt", "digits"
    ),
    # 32x32 RGB images, 8x8x16 latents (16 tokens), the digits CLIP encoder and a tiny T5: see
    # jdistill/digits/flux_components.py. Its world (teacher.kind "flow") has the digits world's built-in
    # captions, images and classifier metrics (teachers/digits_world.py).
    "digits_flux": FlowTeacherPreset(
        "digits_flux", DIGITS_FLUX_TEACHER, "flux", 32, ("text_encoder",), "text_encoder_2", 16, "digits_flux"
    ),
}


def get_preset(name: str, kind: type = TeacherPreset) -> TeacherPreset | FlowTeacherPreset:
    """The preset ``name``, which must be of class ``kind`` (a UNet preset for the diffusers world, a flow
    preset for the flow world)."""
    if name not in PRESETS:
        raise ValueError(f"unknown teacher preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    if not isinstance(preset, kind):
        fitting = sorted(n for n, p in PRESETS.items() if isinstance(p, kind))
        world = "flow" if kind is FlowTeacherPreset else "diffusers"
        raise ValueError(f"teacher preset {name!r} is not a {world} teacher; choose one of {fitting}")
    return preset
