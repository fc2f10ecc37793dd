"""The Flax SD3Transformer2DModel against diffusers: outputs, JVPs, strict conversion both ways, configs and
the full-size parameter counts (built abstractly, no weights)."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs
import torch
from diffusers import SD3Transformer2DModel as TorchSD3
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from flax import nnx
from helpers import assert_same_state_dict

from jdistill.config_base import base_config
from jdistill.convert.core import ConversionError
from jdistill.convert.sd3 import load_sd3, sd3_state_dict
from jdistill.models.layers import FP32, Precision
from jdistill.models.sd3 import PatchEmbed, SD3Config, pos_table, sd3_net

TINY = tiny_configs.sd3()
VARIANTS = {
    "sd3": TINY,
    # Four layers: two dual-attention blocks, one plain block (model index 0 = diffusers' 2), the last block.
    "sd35": dict(TINY, num_layers=4, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}
CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "jdistill" / "teachers" / "configs"
# Parameters of the released transformers (diffusers' ``parameters()``: without the position table).
FULL_SIZE = {"sd3_medium": 2_028_328_000, "sd35_medium": 2_243_171_520, "sd35_large": 8_056_627_520}
# Logical axis names that the default sharding rules split over the fsdp mesh axis.
FSDP_AXES = {name for name, axis in base_config().sharding.rules if axis == "fsdp"}


def torch_sd3(kw: dict, dtype=torch.float32) -> TorchSD3:
    torch.manual_seed(0)
    model = TorchSD3(**kw).eval()
    with torch.no_grad():  # diffusers zero-initialises some layers; random values everywhere test every path
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        table = model.pos_embed.pos_embed  # a buffer: random too, so that a mis-cropped window shows
        table.copy_(torch.randn_like(table))
    return model if dtype == torch.float32 else model.to(dtype)


def inputs(kw: dict, batch: int = 2, height: int = 16, width: int = 12, seed: int = 0):
    """NCHW latents (non-square: the position crop differs per axis), text states, pooled text, timesteps."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, kw["in_channels"], height, width)).astype(np.float32)
    ctx = rng.standard_normal((batch, 7, kw["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((batch, kw["pooled_projection_dim"])).astype(np.float32)
    t = np.array([3.0, 870.5][:batch], np.float32)
    return x, ctx, pooled, t


def nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def jax_cond(ctx, pooled) -> dict:
    return {"encoder_hidden_states": jnp.asarray(ctx), "pooled_projections": jnp.asarray(pooled)}


def load_pair(name: str):
    kw = VARIANTS[name]
    model = torch_sd3(kw)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert all(v.std() > 0 for v in state.values())  # nothing constant left (norm weights, the table)
    net, params = load_sd3(state, SD3Config.from_dict(dict(model.config)))
    return name, kw, model, state, net, params


@pytest.fixture(scope="module")
def loaded() -> dict:
    return {name: load_pair(name) for name in VARIANTS}


@pytest.fixture(params=list(VARIANTS))
def pair(request, loaded):
    return loaded[request.param]


def test_outputs_match_diffusers(pair):
    name, kw, model, _, net, params = pair
    x, ctx, pooled, t = inputs(kw)
    with torch.no_grad():
        ref = model(torch.tensor(x), torch.tensor(ctx), torch.tensor(pooled), torch.tensor(t)).sample.numpy()
    out = jax.jit(net.apply)(params, nhwc(x), jnp.asarray(t), jax_cond(ctx, pooled))
    assert out.shape == (2, 16, 12, kw["out_channels"])
    assert rel_err(nchw(out), ref) < 1e-4, name


def test_round_trip_is_bit_identical(pair):
    _, _, _, state, _, params = pair
    assert_same_state_dict(sd3_state_dict(params), state)


def test_bad_checkpoints_name_the_key(pair):
    _, kw, _, state, _, _ = pair
    cfg = SD3Config.from_dict(kw)
    last = kw["num_layers"] - 1
    # Keys of the plain run and of the last block are named in diffusers' numbering, not the model's.
    gone = [f"transformer_blocks.{last - 1}.attn.to_q.bias", f"transformer_blocks.{last}.ff.net.2.bias"]
    extra = {
        f"transformer_blocks.{last + 1}.attn.to_q.weight": np.zeros((16, 16), np.float32),
        # The model's own name of a parameter is no checkpoint key (convert.core alone would take it).
        "last_block.attn.to_q.bias": state[f"transformer_blocks.{last}.attn.to_q.bias"],
    }
    broken = {k: v for k, v in state.items() if k not in gone} | extra
    with pytest.raises(ConversionError) as err:
        load_sd3(broken, cfg)
    assert f"2 missing: {', '.join(sorted(gone))}; 2 unexpected: {', '.join(sorted(extra))}" in str(err.value)
    for key, shape, want in (
        (
            "transformer_blocks.1.norm1.linear.weight",
            (5, 16),
            state["transformer_blocks.1.norm1.linear.weight"].shape,
        ),
        ("pos_embed.pos_embed", (1, 64, 16), (1, 256, 16)),
    ):
        with pytest.raises(
            ConversionError,
            match=rf"{key}: checkpoint \({shape[0]}, {shape[1]}.*model expects \({want[0]}, {want[1]}",
        ):
            load_sd3({**state, key: np.zeros(shape, np.float32)}, cfg)


def test_jvp_matches_central_differences_of_diffusers():
    """d/dx of our float32 transformer along v vs central differences of the diffusers twin in float64."""
    kw = VARIANTS["sd35"]
    model = torch_sd3(kw, torch.float64)
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    net, params = load_sd3(state, SD3Config.from_dict(kw))
    x, ctx, pooled, t = inputs(kw, batch=1)
    v = np.random.default_rng(1).standard_normal(x.shape)
    tctx, tpooled = (torch.tensor(a, dtype=torch.float64) for a in (ctx, pooled))

    def torch_f(xx):
        with torch.no_grad():
            return model(torch.tensor(xx, dtype=torch.float64), tctx, tpooled, torch.tensor(t)).sample.numpy()

    eps = 1e-4
    fd = (torch_f(x + eps * v) - torch_f(x - eps * v)) / (2 * eps)
    cond = jax_cond(ctx, pooled)

    @jax.jit
    def tangent(x, v):
        return jax.jvp(lambda y: net.apply(params, y, jnp.asarray(t), cond), (x,), (v,))[1]

    out = tangent(nhwc(x), nhwc(v.astype(np.float32)))
    assert rel_err(nchw(out), fd) < 1e-4


def test_bfloat16_with_remat_stays_close(loaded):
    """bfloat16 compute through the scanned carries and the rematerialised blocks."""
    _, kw, _, _, net, params = loaded["sd35"]
    x, ctx, pooled, t = inputs(kw)
    args = (nhwc(x), jnp.asarray(t), jax_cond(ctx, pooled))
    bf16 = sd3_net(net.config, precision=Precision(dtype=jnp.bfloat16), remat="full")
    out = jax.jit(bf16.apply)(params, *args)
    assert out.dtype == jnp.bfloat16
    assert rel_err(np.asarray(out, np.float32), jax.jit(net.apply)(params, *args)) < 0.05


def test_position_table_is_diffusers_and_gets_no_gradient():
    embed = PatchEmbed(SD3Config.from_dict(TINY), nnx.Rngs(0), FP32)
    np.testing.assert_allclose(embed.pos_embed[...], TorchSD3(**TINY).pos_embed.pos_embed.numpy(), atol=1e-6)
    # SD3's position range (192 positions at base 64: up to 64 rad): float32 here, float64 in diffusers.
    want = get_2d_sincos_pos_embed(64, 192, base_size=64, output_type="pt").float().numpy()
    np.testing.assert_allclose(np.asarray(pos_table(64, 192, 64))[0], want, atol=2e-5)
    graphdef, state = nnx.split(embed)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 16, 12, 4)), jnp.float32)
    grads = jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(x) ** 2))(state)
    assert not np.any(grads["pos_embed"][...])  # a buffer in torch: never trained
    assert np.any(grads["proj"]["kernel"][...])


def test_config_round_trip_and_refusals():
    model_config = dict(TorchSD3(**VARIANTS["sd35"]).config)  # with diffusers' bookkeeping keys
    cfg = SD3Config.from_dict(
        {**model_config, "_class_name": "SD3Transformer2DModel", "_diffusers_version": "0"}
    )
    assert cfg == SD3Config.from_dict(VARIANTS["sd35"]) == SD3Config.from_dict(cfg.to_dict())
    assert cfg.dual_attention_layers == (0, 1) and cfg.qk_norm == "rms_norm"
    assert SD3Config.from_dict(dict(TINY, out_channels=None)).out_channels == TINY["in_channels"]
    refused = {
        "qk_norm='layer_norm'": dict(TINY, qk_norm="layer_norm"),
        r"\['use_pooled_guidance'\]": dict(TINY, use_pooled_guidance=True),
        r"dual_attention_layers=\(1, 2\)": dict(TINY, dual_attention_layers=[1, 2]),
        "pos_embed_max_size=None": dict(TINY, pos_embed_max_size=None),
        "caption_projection_dim=24": dict(TINY, caption_projection_dim=24),
    }
    for message, d in refused.items():
        with pytest.raises(ValueError, match=message):
            SD3Config.from_dict(d)


def stored_config(preset: str) -> dict:
    return json.loads((CONFIGS / preset / "transformer" / "config.json").read_text())


@pytest.mark.parametrize("preset", list(FULL_SIZE))
def test_full_size_parameter_counts(preset):
    """The stored configs, built abstractly on both sides; ours also holds the position table (diffusers'
    persistent buffer, in the state dict but not in ``parameters()``)."""
    config = stored_config(preset)
    net = sd3_net(SD3Config.from_dict(config))
    with torch.device("meta"):
        model = TorchSD3.from_config(config)
    table = model.pos_embed.pos_embed.numel()
    assert net.num_params() == sum(v.numel() for v in model.state_dict().values())
    assert net.num_params() - table == sum(p.numel() for p in model.parameters()) == FULL_SIZE[preset]


def test_every_kernel_is_shardable():
    net = sd3_net(SD3Config.from_dict(stored_config("sd35_medium")))
    flat = jax.tree_util.tree_flatten_with_path(
        net.logical_axes, is_leaf=lambda a: a is None or isinstance(a, tuple)
    )
    shapes = dict(jax.tree_util.tree_flatten_with_path(net.abstract)[0])
    for path, axes in flat[0]:
        if len(shapes[path].shape) - ("stacked" in str(path)) >= 2:
            assert axes and FSDP_AXES & set(axes), (jax.tree_util.keystr(path), axes)
        if "stacked" in str(path) and axes:
            assert axes[0] is None  # the layer axis is never sharded
    assert net.logical_axes["pos_embed"]["pos_embed"] == (None, "vocab", "embed")
