"""CLIP text encoders in Flax NNX, equal to transformers' ``CLIPTextModel`` and ``CLIPTextModelWithProjection``.

Attribute names follow the hub checkpoints, ``text_model.`` prefix included (``text_model.encoder.layers.3.
self_attn.q_proj``, ``text_projection``), so ``jdistill.convert.core``'s generic rules map every torch key; the
converter also reads the unprefixed layout transformers 5 saves for ``CLIPTextModel``. Data is (B, T, D).

Behaviour kept from transformers: pre-norm blocks with a causal mask (plus an optional padding mask),
quick_gelu / gelu activations, pooling at the EOS token -- argmax of the ids for configs with the legacy
``eos_token_id == 2`` (SD1.x, SD2.x, SDXL), first occurrence of ``eos_token_id`` otherwise -- and
``hidden_states`` = (embeddings, every layer output), the last one before ``final_layer_norm``.

The encoder (``CLIPEncoder`` and its layers) is shared with the vision tower (``jdistill.models.clip_vision``),
which runs it without the causal mask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.attention import attention, merge_heads, split_heads
from jdistill.models.configured import ConfiguredModule
from jdistill.models.layers import FP32, Precision, embed, layer_norm, linear
from jdistill.models.net import Net


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names: "gelu" is the exact erf form, "gelu_new" / "gelu_pytorch_tanh" the tanh form.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
PROMPT_LAYERS = ("last", "penultimate")
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers' ``CLIPTextConfig`` fields that shape the network (defaults: transformers')."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPTextConfig:
        """From a transformers ``config.json`` dict; bookkeeping keys (architectures, torch_dtype, ...) are ignored."""
        return tower_config_from_dict(cls, d, "clip_text_model", "text")

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "clip_text_model", **dataclasses.asdict(self)}

    def validate(self) -> None:
        validate_encoder(self)
        if not isinstance(self.eos_token_id, int):  # transformers' pooling also needs a single id
            raise ValueError(f"eos_token_id must be one integer, got {self.eos_token_id!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CLIPTextOutput:
    """What transformers returns; ``hidden_states`` only with ``output_hidden_states``, ``text_embeds`` only
    from the projection model."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    text_embeds: jax.Array | None = None


def prompt_embeds(out: CLIPTextOutput, layer: str = "last") -> jax.Array:
    """The (B, T, D) prompt embedding of the SD pipelines: ``"last"`` = last_hidden_state (SD1.x / SD2.x),
    ``"penultimate"`` = hidden_states[-2], the second-to-last layer's output without the final norm (SDXL)."""
    if layer == "last":
        return out.last_hidden_state
    if layer == "penultimate":
        if out.hidden_states is None:
            raise ValueError('layer="penultimate" needs an output computed with output_hidden_states=True')
        return out.hidden_states[-2]
    raise ValueError(f"unknown prompt layer {layer!r}; choose one of {PROMPT_LAYERS}")


class CLIPEncoderConfig(Protocol):
    """The fields the encoder layers read: ``CLIPTextConfig`` and the vision tower's ``CLIPVisionConfig`` both
    have them (transformers shares ``CLIPEncoder`` between the towers too)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str
    layer_norm_eps: float


def tower_config_from_dict(cls: type, d: dict[str, Any], model_type: str, tower: str) -> Any:
    """A tower's config (``cls``) from a transformers dict of ``model_type``: the keys that are fields of ``cls``
    (None meaning transformers' default), validated; bookkeeping keys are ignored."""
    if d.get("model_type", model_type) != model_type:
        raise ValueError(f"not a CLIP {tower} config (model_type={d['model_type']!r})")
    fields = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: v for k, v in d.items() if k in fields and v is not None})
    cfg.validate()
    return cfg


def validate_encoder(cfg: CLIPEncoderConfig) -> None:
    """The checks both towers' configs share: a supported activation and a whole number of heads."""
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(
            f"hidden_act {cfg.hidden_act!r} is not supported; choose one of {sorted(ACTIVATIONS)}"
        )
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
            f"hidden_size {cfg.hidden_size} is not a multiple of {cfg.num_attention_heads} heads"
        )


def projection(d_in: int, d_out: int, rngs: nnx.Rngs, p: Precision) -> nnx.Module:
    """CLIP's bias-free projection of a pooled state into the shared embedding space."""
    return linear(d_in, d_out, rngs, p, bias=False, axes=("embed", "mlp"))


def tower_net(
    name: str, module_cls: type, config: Any, *, precision: Precision, attention_impl: str, remat: bool
) -> Net:
    """A Net of ``module_cls(config, rngs=, precision=, attention_impl=, remat=)`` (the CLIP models' constructor)."""
    return Net(
        name,
        lambda rngs: module_cls(
            config, rngs=rngs, precision=precision, attention_impl=attention_impl, remat=remat
        ),
        config=config,
    )


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs, p: Precision):
        self.token_embedding = embed(cfg.vocab_size, cfg.hidden_size, rngs, p)
        self.position_embedding = embed(cfg.max_position_embeddings, cfg.hidden_size, rngs, p)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        t = input_ids.shape[-1]
        if t > self.position_embedding.num_embeddings:
            raise ValueError(
                f"sequence length {t} exceeds max_position_embeddings {self.position_embedding.num_embeddings}"
            )
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(t))[None]


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPEncoderConfig, rngs: nnx.Rngs, p: Precision, impl: str, causal: bool = True):
        d = cfg.hidden_size
        self.heads, self.impl, self.causal = cfg.num_attention_heads, impl, causal
        self.k_proj = linear(d, d, rngs, p, axes=("embed", "heads"))
        self.v_proj = linear(d, d, rngs, p, axes=("embed", "heads"))
        self.q_proj = linear(d, d, rngs, p, axes=("embed", "heads"))
        self.out_proj = linear(d, d, rngs, p, axes=("heads", "embed"))

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        q, k, v = (split_heads(f(x), self.heads) for f in (self.q_proj, self.k_proj, self.v_proj))
        # Default scale 1/sqrt(head_dim), as CLIP's.
        out = attention(q, k, v, impl=self.impl, is_causal=self.causal, mask=mask)
        return self.out_proj(merge_heads(out))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPEncoderConfig, rngs: nnx.Rngs, p: Precision):
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, rngs, p, axes=("embed", "mlp"))
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, rngs, p, axes=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPEncoderConfig, rngs: nnx.Rngs, p: Precision, impl: str, causal: bool = True):
        self.dtype = p.dtype
        self.self_attn = CLIPAttention(cfg, rngs, p, impl, causal)
        self.layer_norm1 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs, p)
        self.mlp = CLIPMLP(cfg, rngs, p)
        self.layer_norm2 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs, p)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        # Norms compute in float32 (layers.layer_norm); cast back so the residual stream keeps the compute dtype.
        x = x + self.self_attn(self.layer_norm1(x).astype(self.dtype), mask)
        return x + self.mlp(self.layer_norm2(x).astype(self.dtype))


def _call(layer: CLIPEncoderLayer, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    return layer(x, mask)


_call_remat = nnx.remat(_call)


class CLIPEncoder(nnx.Module):
    """The stack of pre-norm layers: causal for the text tower, bidirectional (``causal=False``) for vision."""

    def __init__(
        self,
        cfg: CLIPEncoderConfig,
        rngs: nnx.Rngs,
        p: Precision,
        impl: str,
        remat: bool,
        causal: bool = True,
    ):
        self.remat = remat
        self.layers = nnx.List(
            [CLIPEncoderLayer(cfg, rngs, p, impl, causal) for _ in range(cfg.num_hidden_layers)]
        )

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> list[jax.Array]:
        """Every layer's output, in order."""
        call = _call_remat if self.remat else _call
        outs = []
        for layer in self.layers:
            x = call(layer, x, mask)
            outs.append(x)
        return outs


class CLIPTextTransformer(nnx.Module):
    """transformers' pre-5 ``CLIPTextTransformer``: embeddings, causal encoder, final norm, EOS pooling."""

    def __init__(
        self, cfg: CLIPTextConfig, rngs: nnx.Rngs, p: Precision, impl: str = "xla", remat: bool = False
    ):
        self.dtype = p.dtype
        self.eos_token_id = cfg.eos_token_id
        self.embeddings = CLIPTextEmbeddings(cfg, rngs, p)
        self.encoder = CLIPEncoder(cfg, rngs, p, impl, remat)
        self.final_layer_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs, p)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        x = self.embeddings(input_ids)
        # Padding mask on keys, combined with the causal mask inside attention(): (B, 1 head, 1 query, T keys).
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        outs = self.encoder(x, mask)
        last = self.final_layer_norm(outs[-1] if outs else x).astype(self.dtype)
        if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
            # Configs from before transformers PR #24773: the EOS token has the highest id of CLIP's vocabulary.
            eos = jnp.argmax(input_ids.astype(jnp.int32), axis=-1)
        else:
            # First occurrence of the EOS id (padding may reuse it).
            eos = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = last[jnp.arange(last.shape[0]), eos]
        hidden = (x, *outs) if output_hidden_states else None
        return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)


class CLIPTextModel(ConfiguredModule):
    """transformers' ``CLIPTextModel`` (hub layout: every parameter under ``text_model``)."""

    with_projection: ClassVar[bool] = False  # CLIPTextModelWithProjection's text_projection

    def build(self, cfg: CLIPTextConfig, rngs: nnx.Rngs, p: Precision, impl: str, remat: bool | str) -> None:
        self.text_model = CLIPTextTransformer(cfg, rngs, p, impl, remat)
        if self.with_projection:
            self.text_projection = projection(cfg.hidden_size, cfg.projection_dim, rngs, p)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        out = self.text_model(input_ids, attention_mask, output_hidden_states)
        if self.with_projection:
            out = dataclasses.replace(out, text_embeds=self.text_projection(out.pooler_output))
        return out

    def encode_prompt(
        self, input_ids: jax.Array, layer: str = "last", attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """(prompt embedding per ``prompt_embeds``, pooled embedding: pooler_output here, text_embeds with projection)."""
        out = self(input_ids, attention_mask, output_hidden_states=layer == "penultimate")
        pooled = out.text_embeds if out.text_embeds is not None else out.pooler_output
        return prompt_embeds(out, layer), pooled


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers' ``CLIPTextModelWithProjection``: also ``text_embeds`` = bias-free projection of the pooled
    state (SDXL's ``text_encoder_2`` pooled prompt embedding)."""

    with_projection = True


def clip_text_net(
    config: CLIPTextConfig,
    *,
    with_projection: bool,
    precision: Precision = FP32,
    attention_impl: str = "xla",
    remat: bool = False,
) -> Net:
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return tower_net(
        "text_encoder", cls, config, precision=precision, attention_impl=attention_impl, remat=remat
    )
