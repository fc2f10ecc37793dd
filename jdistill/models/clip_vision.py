"""CLIP's vision tower and the full two-tower model in Flax NNX, equal to transformers' ``CLIPVisionModel``,
``CLIPVisionModelWithProjection`` and ``CLIPModel``.

Attribute names follow the hub checkpoints (``vision_model.embeddings.patch_embedding``, ``vision_model.
pre_layrnorm`` -- transformers' spelling --, ``visual_projection``, ``logit_scale``), so ``jdistill.convert.
core``'s generic rules map every key of an ``openai/clip-vit-*`` checkpoint. The encoder layers are the text
tower's (``jdistill.models.clip``) without the causal mask.

Images are NHWC here (transformers takes NCHW ``pixel_values``): (B, image_size, image_size, channels), already
normalised (``jdistill.evaluate.clip_score.preprocess`` does CLIP's resize, crop and normalisation).

Behaviour kept from transformers: the patch embedding is a bias-free convolution with stride = kernel = patch
size; a learned class token is prepended and learned position embeddings added; ``pre_layrnorm`` precedes the
encoder; ``last_hidden_state`` is the last layer's output without a final norm; ``pooler_output`` is
``post_layernorm`` of the class token; ``hidden_states`` = (the encoder input, after ``pre_layrnorm``, then
every layer output). ``CLIPModel.get_image_features`` / ``get_text_features`` return the projected, unnormalised
embeddings (transformers 4's tensors; transformers 5 returns them as ``pooler_output`` of an output object).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.clip import (
    CLIPEncoder,
    CLIPTextConfig,
    CLIPTextTransformer,
    projection,
    tower_config_from_dict,
    tower_net,
    validate_encoder,
)
from jdistill.models.configured import ConfiguredModule
from jdistill.models.layers import FP32, Precision, conv, embed, layer_norm
from jdistill.models.net import Net, sharding_metadata


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' ``CLIPVisionConfig`` fields that shape the network (defaults: transformers')."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPVisionConfig:
        """From a transformers config dict; bookkeeping keys (architectures, dropout, ...) are ignored."""
        return tower_config_from_dict(cls, d, "clip_vision_model", "vision")

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "clip_vision_model", **dataclasses.asdict(self)}

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    def validate(self) -> None:
        validate_encoder(self)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """transformers' ``CLIPConfig``: both towers' configurations, the shared embedding width
    (``projection_dim``, the top-level one, as ``CLIPModel`` uses) and the initial logit scale."""

    text_config: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        """From a transformers ``config.json`` dict (``model_type: clip``).

        Old hub configs also carry ``text_config_dict`` / ``vision_config_dict``; as in transformers, their
        values override those of ``text_config`` / ``vision_config``.
        """
        if d.get("model_type", "clip") != "clip":
            raise ValueError(f"not a CLIP config (model_type={d['model_type']!r}); expected 'clip'")
        text = {**(d.get("text_config") or {}), **(d.get("text_config_dict") or {})}
        vision = {**(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {})}
        top = {k: d[k] for k in ("projection_dim", "logit_scale_init_value") if d.get(k) is not None}
        return cls(CLIPTextConfig.from_dict(text), CLIPVisionConfig.from_dict(vision), **top)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": "clip",
            "text_config": self.text_config.to_dict(),
            "vision_config": self.vision_config.to_dict(),
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
        }


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CLIPVisionOutput:
    """What transformers returns; ``hidden_states`` only with ``output_hidden_states``, ``image_embeds`` only
    from the projection model."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    image_embeds: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CLIPOutput:
    """``CLIPModel``'s outputs: logits = exp(logit_scale) * cosine similarities, embeddings L2-normalised."""

    logits_per_image: jax.Array
    logits_per_text: jax.Array
    text_embeds: jax.Array
    image_embeds: jax.Array


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / ||x|| over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs, p: Precision):
        self.dtype = p.dtype
        self.image_size, self.num_channels = cfg.image_size, cfg.num_channels
        d = cfg.hidden_size
        # A raw parameter (torch key ``class_embedding``); one vector, so it is created eagerly even while a Net
        # computes shapes.
        self.class_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (d,), p.param_dtype) * d**-0.5, **sharding_metadata("embed")
        )
        self.patch_embedding = conv(
            cfg.num_channels, d, cfg.patch_size, rngs, p, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = embed(cfg.num_positions, d, rngs, p, axes=(None, "embed"))

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        b, h, w, c = pixel_values.shape
        if (h, w, c) != (self.image_size, self.image_size, self.num_channels):
            # transformers raises too (it only resizes position embeddings on request; we do not support that).
            raise ValueError(
                f"pixel_values must be (batch, {self.image_size}, {self.image_size}, {self.num_channels}) (NHWC), "
                f"got shape {pixel_values.shape}"
            )
        patches = self.patch_embedding(pixel_values.astype(self.dtype))  # (B, H/p, W/p, D), row-major patches
        patches = patches.reshape(b, -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding(jnp.arange(x.shape[1]))[None]


class CLIPVisionTransformer(nnx.Module):
    """transformers' ``CLIPVisionTransformer`` (``CLIPVisionModel``'s body in transformers 5)."""

    def __init__(
        self, cfg: CLIPVisionConfig, rngs: nnx.Rngs, p: Precision, impl: str = "xla", remat: bool = False
    ):
        self.dtype = p.dtype
        self.embeddings = CLIPVisionEmbeddings(cfg, rngs, p)
        self.pre_layrnorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs, p)
        self.encoder = CLIPEncoder(cfg, rngs, p, impl, remat, causal=False)
        self.post_layernorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs, p)

    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False) -> CLIPVisionOutput:
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be (batch, height, width, channels), got {pixel_values.shape}"
            )
        # Norms compute in float32 (layers.layer_norm); cast back to the compute dtype.
        x = self.pre_layrnorm(self.embeddings(pixel_values)).astype(self.dtype)
        outs = self.encoder(x, None)
        last = outs[-1] if outs else x
        pooled = self.post_layernorm(last[:, 0]).astype(self.dtype)
        hidden = (x, *outs) if output_hidden_states else None
        return CLIPVisionOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)


class CLIPVisionModel(ConfiguredModule):
    """transformers' ``CLIPVisionModel`` (hub layout: every parameter under ``vision_model``)."""

    with_projection: ClassVar[bool] = False  # CLIPVisionModelWithProjection's visual_projection

    def build(
        self, cfg: CLIPVisionConfig, rngs: nnx.Rngs, p: Precision, impl: str, remat: bool | str
    ) -> None:
        self.vision_model = CLIPVisionTransformer(cfg, rngs, p, impl, remat)
        if self.with_projection:
            self.visual_projection = projection(cfg.hidden_size, cfg.projection_dim, rngs, p)

    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False) -> CLIPVisionOutput:
        out = self.vision_model(pixel_values, output_hidden_states)
        if self.with_projection:
            out = dataclasses.replace(out, image_embeds=self.visual_projection(out.pooler_output))
        return out


class CLIPVisionModelWithProjection(CLIPVisionModel):
    """transformers' ``CLIPVisionModelWithProjection``: also ``image_embeds`` = bias-free projection of the
    pooled state."""

    with_projection = True


class CLIPModel(ConfiguredModule):
    """transformers' ``CLIPModel``: both towers, their projections into one embedding space, ``logit_scale``."""

    def build(self, cfg: CLIPConfig, rngs: nnx.Rngs, p: Precision, impl: str, remat: bool | str) -> None:
        text, vision, dim = cfg.text_config, cfg.vision_config, cfg.projection_dim
        self.text_model = CLIPTextTransformer(text, rngs, p, impl, remat)
        self.vision_model = CLIPVisionTransformer(vision, rngs, p, impl, remat)
        self.visual_projection = projection(vision.hidden_size, dim, rngs, p)
        self.text_projection = projection(text.hidden_size, dim, rngs, p)
        self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init_value, p.param_dtype))

    def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """(B, projection_dim): the projected pooled (EOS) state, not normalised."""
        return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """(B, projection_dim): the projected pooled (class token) state, not normalised; NHWC input."""
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def __call__(
        self, input_ids: jax.Array, pixel_values: jax.Array, attention_mask: jax.Array | None = None
    ) -> CLIPOutput:
        image = l2_normalize(self.get_image_features(pixel_values))
        text = l2_normalize(self.get_text_features(input_ids, attention_mask))
        logits_per_text = text @ image.T * jnp.exp(self.logit_scale[...].astype(jnp.float32))
        return CLIPOutput(
            logits_per_image=logits_per_text.T,
            logits_per_text=logits_per_text,
            text_embeds=text,
            image_embeds=image,
        )


def clip_model_net(
    config: CLIPConfig, *, precision: Precision = FP32, attention_impl: str = "xla", remat: bool = False
) -> Net:
    return tower_net(
        "clip", CLIPModel, config, precision=precision, attention_impl=attention_impl, remat=remat
    )


def clip_vision_net(
    config: CLIPVisionConfig,
    *,
    with_projection: bool,
    precision: Precision = FP32,
    attention_impl: str = "xla",
    remat: bool = False,
) -> Net:
    cls = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
    return tower_net(
        "image_encoder", cls, config, precision=precision, attention_impl=attention_impl, remat=remat
    )
