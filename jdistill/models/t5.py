"""The T5 text encoder in Flax NNX, equal to transformers' ``T5EncoderModel`` (FLUX's and SD3's T5-XXL v1.1).

Parameter paths are transformers' module names (``shared``, ``encoder.block.3.layer.0.SelfAttention.q``,
``encoder.block.3.layer.1.DenseReluDense.wi_0``, ``encoder.final_layer_norm``), so ``jdistill.convert.core``'s
generic rules map every torch key, with two exceptions handled by ``jdistill.convert.t5``: the blocks are a
scanned ``Stack`` (compile time flat in depth), and the relative position bias, which transformers keeps in
block 0 and shares with every block, lives outside the stack as ``encoder.relative_attention_bias``.

T5's math, kept: RMS norms without mean or bias, no 1/sqrt(d_kv) scaling of attention scores, bidirectional
bucketed relative position bias, an inner attention width ``num_heads * d_kv`` independent of ``d_model``, and
the feed-forward "relu" (T5 v1.0: wi, relu, wo) or "gated-gelu" (v1.1: gelu_new(wi_0) * wi_1, wo). Dropout is
off. Data is (B, T) token ids; the output is last_hidden_state (B, T, d_model).

Precision: matrix products run in ``precision.dtype``; norms, the position bias, the attention scores and the
softmax run in float32, so a bfloat16 run does not overflow (transformers' float16 clamp is not needed).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdistill.models.layers import FP32, Precision, embed, linear
from jdistill.models.net import Net, sharding_metadata
from jdistill.models.stack import Stack

FEED_FORWARD = ("relu", "gated-gelu")
# transformers' attribute_map: alternative names config.json files may use for the same fields.
ALIASES = {
    "hidden_size": "d_model",
    "num_attention_heads": "num_heads",
    "num_hidden_layers": "num_layers",
    "head_dim": "d_kv",
}
# Options that change the encoder's computation or weights and that jdistill does not implement, with the only
# value accepted. Everything else in config.json (decoder sizes, dropout, token ids, tie_word_embeddings,
# dense_act_fn / is_gated_act, which transformers re-derives from feed_forward_proj) does not affect the encoder.
UNSUPPORTED_OPTIONS = {"is_decoder": False, "quantization_config": None}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """transformers' ``T5Config`` fields that shape the encoder (defaults: transformers')."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> T5Config:
        """From a transformers ``config.json`` dict; bookkeeping keys are ignored, unsupported options refused."""
        if d.get("model_type", "t5") != "t5":
            raise ValueError(f"model_type {d['model_type']!r} is not supported (only 't5')")
        for key, accepted in UNSUPPORTED_OPTIONS.items():
            if d.get(key, accepted) != accepted:
                raise ValueError(f"T5 config {key}={d[key]!r} is not supported (only {accepted!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields and v is not None}
        for alias, name in ALIASES.items():
            if d.get(alias) is None:
                continue
            if kwargs.setdefault(name, d[alias]) != d[alias]:
                raise ValueError(f"T5 config {alias}={d[alias]!r} contradicts {name}={kwargs[name]!r}")
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": "t5",
            "architectures": ["T5EncoderModel"],
            "is_decoder": False,
            **dataclasses.asdict(self),
        }

    def validate(self) -> None:
        if self.feed_forward_proj not in FEED_FORWARD:
            raise ValueError(
                f"feed_forward_proj {self.feed_forward_proj!r} is not supported; choose one of {FEED_FORWARD}"
            )
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"T5 config {name} must be positive, got {getattr(self, name)}")
        exact = self.relative_attention_num_buckets // 4
        if exact < 1 or self.relative_attention_max_distance <= exact:
            # transformers' bucketing divides by log(max_distance / exact): undefined for these.
            raise ValueError(
                f"relative_attention_num_buckets {self.relative_attention_num_buckets} and "
                f"relative_attention_max_distance {self.relative_attention_max_distance} are not supported: "
                "need at least 4 buckets and a max distance above num_buckets // 4"
            )

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"


# ------------------------------------------------------------------------------------- relative positions


def _ceil_root(x: int, m: int) -> int:
    """The smallest integer n with n**m >= x (exact, for Python ints of any size)."""
    n = max(1, round(x ** (1.0 / m)))
    while n**m < x:
        n += 1
    while n > 1 and (n - 1) ** m >= x:
        n -= 1
    return n


@functools.lru_cache(maxsize=32)
def _log_thresholds(num_buckets: int, max_distance: int) -> tuple[int, ...]:
    """Distances at which the logarithmic buckets start: the k-th (k >= 1) is the smallest n with
    floor(m * log(n / exact) / log(max_distance / exact)) >= k, i.e. n**m * exact**(m - k) >= max_distance**k."""
    half = num_buckets // 2
    exact = half // 2
    m = half - exact
    return tuple(_ceil_root(max_distance**k * exact ** (m - k), m) for k in range(1, m))


def relative_position_bucket(
    relative_position: np.ndarray, num_buckets: int, max_distance: int
) -> np.ndarray:
    """transformers' bidirectional ``T5Attention._relative_position_bucket`` in integer arithmetic.

    Half the buckets for keys after the query, half for the rest; within each half, distances below
    ``num_buckets // 4`` get a bucket each and larger ones logarithmic bins up to ``max_distance`` (the last bin
    takes everything beyond). transformers computes the bins with float32 logarithms; the thresholds here are
    exact, which agrees with it wherever it is not off by a rounding (tests compare them over long ranges).
    """
    relative_position = np.asarray(relative_position, np.int64)
    half = num_buckets // 2
    exact = half // 2
    distance = np.abs(relative_position)
    large = exact + np.searchsorted(np.asarray(_log_thresholds(num_buckets, max_distance)), distance, "right")
    return np.where(relative_position > 0, half, 0) + np.where(distance < exact, distance, large)


def position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(length queries, length keys) buckets of key position minus query position; a host constant."""
    positions = np.arange(length)
    return relative_position_bucket(positions[None, :] - positions[:, None], num_buckets, max_distance)


# ------------------------------------------------------------------------------------------------ layers


class T5LayerNorm(nnx.Module):
    """RMS norm (no mean, no bias) with statistics in float32; half-precision weights multiply a normalised
    input cast to their dtype, as transformers does."""

    def __init__(self, dim: int, eps: float, p: Precision):
        self.eps = eps
        # One vector, created eagerly even while a Net computes shapes.
        self.weight = nnx.Param(jnp.ones((dim,), p.param_dtype), **sharding_metadata("embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        weight = self.weight[...]
        if weight.dtype in (jnp.float16, jnp.bfloat16):
            x = x.astype(weight.dtype)
        return weight * x


class T5Attention(nnx.Module):
    """Self-attention without score scaling; the position bias (and padding mask) come from the encoder."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs, p: Precision):
        inner = cfg.num_heads * cfg.d_kv
        self.heads, self.dtype = cfg.num_heads, p.dtype
        self.q = linear(cfg.d_model, inner, rngs, p, bias=False, axes=("embed", "heads"))
        self.k = linear(cfg.d_model, inner, rngs, p, bias=False, axes=("embed", "heads"))
        self.v = linear(cfg.d_model, inner, rngs, p, bias=False, axes=("embed", "heads"))
        self.o = linear(inner, cfg.d_model, rngs, p, bias=False, axes=("heads", "embed"))

    def __call__(self, x: jax.Array, position_bias: jax.Array, mask_bias: jax.Array | None) -> jax.Array:
        b, t, _ = x.shape
        q, k, v = (f(x).reshape(b, t, self.heads, -1) for f in (self.q, self.k, self.v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + position_bias
        if mask_bias is not None:
            scores = scores + mask_bias
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, -1)
        return self.o(out)


class T5DenseActDense(nnx.Module):
    """T5 v1.0's feed-forward: wo(relu(wi(x)))."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs, p: Precision):
        self.wi = linear(cfg.d_model, cfg.d_ff, rngs, p, bias=False, axes=("embed", "mlp"))
        self.wo = linear(cfg.d_ff, cfg.d_model, rngs, p, bias=False, axes=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(jax.nn.relu(self.wi(x)))


class T5DenseGatedActDense(nnx.Module):
    """T5 v1.1's feed-forward: wo(gelu_new(wi_0(x)) * wi_1(x)), gelu_new being the tanh approximation."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs, p: Precision):
        self.wi_0 = linear(cfg.d_model, cfg.d_ff, rngs, p, bias=False, axes=("embed", "mlp"))
        self.wi_1 = linear(cfg.d_model, cfg.d_ff, rngs, p, bias=False, axes=("embed", "mlp"))
        self.wo = linear(cfg.d_ff, cfg.d_model, rngs, p, bias=False, axes=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg: T5Config, rngs: nnx.Rngs, p: Precision):
        self.dtype = p.dtype
        self.SelfAttention = T5Attention(cfg, rngs, p)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, p)

    def __call__(self, x: jax.Array, position_bias: jax.Array, mask_bias: jax.Array | None) -> jax.Array:
        return x + self.SelfAttention(self.layer_norm(x).astype(self.dtype), position_bias, mask_bias)


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: T5Config, rngs: nnx.Rngs, p: Precision):
        self.dtype = p.dtype
        ff = T5DenseGatedActDense if cfg.gated else T5DenseActDense
        self.DenseReluDense = ff(cfg, rngs, p)  # transformers' name, whatever the activation
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, p)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.DenseReluDense(self.layer_norm(x).astype(self.dtype))


class T5Block(nnx.Module):
    """``layer.0`` = pre-norm self-attention, ``layer.1`` = pre-norm feed-forward, each with a residual."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs, p: Precision):
        self.layer = nnx.List([T5LayerSelfAttention(cfg, rngs, p), T5LayerFF(cfg, rngs, p)])

    def __call__(self, x: jax.Array, position_bias: jax.Array, mask_bias: jax.Array | None) -> jax.Array:
        return self.layer[1](self.layer[0](x, position_bias, mask_bias))


class T5Encoder(nnx.Module):
    """transformers' encoder ``T5Stack`` without its token embedding (tied to the model's ``shared``)."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs, p: Precision, remat: bool | str):
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.block = Stack(lambda r: T5Block(cfg, r, p), cfg.num_layers, rngs, remat=remat)
        # (buckets, heads): block 0's table in transformers, shared by every block.
        self.relative_attention_bias = embed(
            cfg.relative_attention_num_buckets, cfg.num_heads, rngs, p, axes=(None, "heads")
        )
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, p)

    def position_bias(self, length: int) -> jax.Array:
        """(1, heads, length queries, length keys) float32 relative position bias."""
        buckets = position_buckets(length, self.num_buckets, self.max_distance)
        table = self.relative_attention_bias.embedding[...].astype(jnp.float32)
        return jnp.transpose(table[buckets], (2, 0, 1))[None]

    def __call__(self, x: jax.Array, mask_bias: jax.Array | None) -> jax.Array:
        x = self.block(x, self.position_bias(x.shape[1]), mask_bias)
        return self.final_layer_norm(x)


def mask_bias(attention_mask: jax.Array | None) -> jax.Array | None:
    """(B, 1, 1, T keys) float32 additive bias of a (B, T) 1/0 padding mask: the float32 minimum on padding,
    as transformers' eager attention adds (a fully padded row then attends uniformly instead of giving NaN)."""
    if attention_mask is None:
        return None
    keep = attention_mask.astype(bool)[:, None, None, :]
    return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


class T5EncoderModel(nnx.Module):
    """transformers' ``T5EncoderModel``: ``(input_ids (B, T), attention_mask (B, T) of 1/0 or None)`` ->
    last_hidden_state (B, T, d_model) in the compute dtype."""

    def __init__(
        self,
        config: T5Config,
        *,
        rngs: nnx.Rngs,
        precision: Precision = FP32,
        remat: bool | str = False,
    ):
        config.validate()
        self.config = config
        self.dtype = precision.dtype
        self.shared = embed(config.vocab_size, config.d_model, rngs, precision)
        self.encoder = T5Encoder(config, rngs, precision, remat)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {attention_mask.shape} must have the shape of input_ids {input_ids.shape}"
            )
        x = self.shared(input_ids)
        return self.encoder(x, mask_bias(attention_mask)).astype(self.dtype)


def t5_net(config: T5Config, *, precision: Precision = FP32, remat: bool | str = False) -> Net:
    """The T5 encoder as a Net; ``net.variant(...)`` builds it with other config fields, and
    ``net.remake(config, dtype=..., param_dtype=..., remat_policy=...)`` with other options (None: these)."""

    def remake(cfg: T5Config, *, dtype=None, param_dtype=None, remat_policy=None):
        p = Precision(dtype=dtype or precision.dtype, param_dtype=param_dtype or precision.param_dtype)
        r = remat if remat_policy is None else remat_policy
        return lambda rngs: T5EncoderModel(cfg, rngs=rngs, precision=p, remat=r)

    return Net("t5", remake(config), config=config, remake=remake)
