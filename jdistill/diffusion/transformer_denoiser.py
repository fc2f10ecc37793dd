"""Denoisers of the flow-matching transformer teachers (FLUX.1, SD3, SD3.5) on NHWC latents.

Both transformers predict the rectified-flow velocity v = eps - x0 on x_t = (1 - t) x0 + t eps (``FlowSchedule``).
Their time inputs differ as diffusers' do: the FLUX transformer takes t in [0, 1] and scales it (and the
guidance) by 1000 itself; SD3's takes 1000 t, as its pipelines pass sigma * 1000. FLUX works on 2x2-packed
tokens: ``on_latents`` packs, builds the position ids and unpacks.

Guidance-distilled FLUX (dev, lite: ``guidance_embeds``) takes the guidance scale as an input instead of
running an unconditional pass: ``embedded_guidance`` tells ``denoiser.predict_cfg`` to put a recipe's scale into
the conditioning (convention "uncond": w as is; "cond": w + 1) and run one pass. SD3 uses true CFG with its
negative-prompt conditioning, like the UNet teachers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jdistill.diffusion.parameterization import Prediction, to_prediction
from jdistill.diffusion.schedules import FlowSchedule
from jdistill.models.net import Net

PyTree = Any
FAMILIES = ("flux", "sd3")


@dataclasses.dataclass(frozen=True, eq=False)
class FlowTransformerDenoiser:
    net: Net
    schedule: FlowSchedule
    family: str  # "flux" or "sd3"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown transformer family {self.family!r}; choose one of {FAMILIES}")

    @property
    def embedded_guidance(self) -> bool:
        """True for a guidance-distilled teacher: the scale is an input, there is no unconditional pass."""
        config = getattr(getattr(self.net, "base", self.net), "config", None)  # a LoRA's base holds it
        return self.family == "flux" and bool(getattr(config, "guidance_embeds", False))

    def predict(self, params: PyTree, x_t: jax.Array, t: jax.Array, cond: PyTree) -> Prediction:
        """The prediction at (x_t, t); a guidance-distilled FLUX called without a ``guidance`` input gets 1
        (no guidance, as ``predict_cfg`` with no scale gives it)."""
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_t.shape[0],))
        if self.embedded_guidance and "guidance" not in cond:
            cond = {**cond, "guidance": jnp.ones((x_t.shape[0],), jnp.float32)}
        if self.family == "flux":
            out = self.net.apply(params, x_t, t, cond, method="on_latents")
        else:
            out = self.net.apply(params, x_t, self.schedule.model_time(t), cond)
        return to_prediction(out, "velocity", x_t, self.schedule, t)


def transformer_family(net: Any) -> str | None:
    """ "flux" or "sd3" for a FLUX / SD3 transformer network (or a LoRA on one), None otherwise."""
    from jdistill.models.flux import FluxConfig
    from jdistill.models.sd3 import SD3Config

    config = getattr(getattr(net, "base", net), "config", None)
    if isinstance(config, FluxConfig):
        return "flux"
    if isinstance(config, SD3Config):
        return "sd3"
    return None
