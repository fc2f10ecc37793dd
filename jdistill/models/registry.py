"""Which Flax module stands for which diffusers / transformers class, built from that class's config dict.

A pipeline's ``model_index.json`` names each component's class; ``component_net(class_name, config)`` builds
jdistill's twin as a ``Net`` (abstract parameters only until ``init`` or a conversion fills them). Factories
are imported when first used, so reading this table costs nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

from jdistill.models.net import Net


@dataclasses.dataclass(frozen=True)
class Twin:
    module: str  # jdistill.models.<module>
    config: str  # its config dataclass (``from_dict``)
    factory: str  # its ``(config, **options) -> Net``
    options: tuple[tuple[str, Any], ...] = ()  # fixed keyword arguments of the factory for this class


CLASSES: dict[str, Twin] = {
    "UNet2DConditionModel": Twin("unet", "UNetConfig", "unet_net"),
    "AutoencoderKL": Twin("vae", "AutoencoderKLConfig", "vae_net"),
    "CLIPTextModel": Twin("clip", "CLIPTextConfig", "clip_text_net", (("with_projection", False),)),
    "CLIPTextModelWithProjection": Twin(
        "clip", "CLIPTextConfig", "clip_text_net", (("with_projection", True),)
    ),
    "T5EncoderModel": Twin("t5", "T5Config", "t5_net"),
    "FluxTransformer2DModel": Twin("flux", "FluxConfig", "flux_net"),
    "SD3Transformer2DModel": Twin("sd3", "SD3Config", "sd3_net"),
}


def class_of(config: dict, index_entry: Any = None) -> str | None:
    """A component's class: from its ``model_index.json`` entry ([library, class]) or, for transformers
    configs, their ``architectures`` (the index of some pipelines lists a base class)."""
    archs = config.get("architectures") or []
    if archs and archs[0] in CLASSES:
        return archs[0]
    if isinstance(index_entry, list | tuple) and len(index_entry) == 2 and index_entry[1]:
        return str(index_entry[1])
    return config.get("_class_name")


def component_net(class_name: str, config: dict, **options: Any) -> Net:
    """jdistill's module for ``class_name`` built from ``config``; ``options`` (precision, attention_impl,
    remat) are passed where the factory takes them."""
    if class_name not in CLASSES:
        raise ValueError(f"no jdistill model for {class_name!r}; supported: {sorted(CLASSES)}")
    twin = CLASSES[class_name]
    module = importlib.import_module(f"jdistill.models.{twin.module}")
    factory = getattr(module, twin.factory)
    accepted = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in options.items() if k in accepted}
    cfg = getattr(module, twin.config).from_dict(config)
    return factory(cfg, **kwargs, **dict(twin.options))
