"""The Flax UNet2DConditionModel against diffusers: outputs, mid-block features, JVPs, conversion, full-size counts."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from helpers import assert_same_state_dict

from jdistill.convert.core import ConversionError
from jdistill.convert.unet import load_unet, unet_state_dict
from jdistill.models.unet import UNetConfig, unet_net

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "jdistill" / "teachers" / "configs"
VARIANTS = {
    "sd15": tiny_configs.unet(),
    # v-prediction is a scheduler setting; the network side of SD2 is linear projections, per-block heads, upcast.
    "sd2": tiny_configs.unet(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        cross_attention_dim=24,
        attention_head_dim=(2, 4, 8),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        use_linear_projection=True,
        upcast_attention=True,
    ),
    "sdxl": tiny_configs.unet(
        attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
    ),
    "lcm": tiny_configs.unet(time_cond_proj_dim=16),
}


def torch_unet(kw: dict, dtype=torch.float32) -> TorchUNet:
    torch.manual_seed(0)
    model = TorchUNet(**kw).eval().to(dtype)
    with torch.no_grad():  # diffusers zero-initialises some layers; random weights everywhere test every path
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def inputs(kw: dict, batch: int = 2, size: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, size, size)).astype(np.float32)
    t = np.array([10, 700][:batch])
    ctx = rng.standard_normal((batch, 7, kw["cross_attention_dim"])).astype(np.float32)
    cond = {"encoder_hidden_states": ctx}
    torch_kwargs = {}
    if kw.get("addition_embed_type"):
        cond["text_embeds"] = rng.standard_normal((batch, 80 - 6 * 8)).astype(np.float32)
        cond["time_ids"] = rng.uniform(0, 1024, (batch, 6)).astype(np.float32)
        torch_kwargs["added_cond_kwargs"] = {k: torch.tensor(cond[k]) for k in ("text_embeds", "time_ids")}
    if kw.get("time_cond_proj_dim"):
        cond["timestep_cond"] = rng.standard_normal((batch, kw["time_cond_proj_dim"])).astype(np.float32)
        torch_kwargs["timestep_cond"] = torch.tensor(cond["timestep_cond"])
    return x, t, cond, torch_kwargs


def nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request):
    kw = VARIANTS[request.param]
    model = torch_unet(kw)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    net, params = load_unet(state, UNetConfig.from_dict(dict(model.config)))
    return request.param, kw, model, state, net, params


def test_outputs_and_mid_features_match_diffusers(pair):
    name, kw, model, _, net, params = pair
    x, t, cond, tkw = inputs(kw)
    captured = {}
    hook = model.mid_block.register_forward_hook(lambda m, i, o: captured.setdefault("mid", o))
    with torch.no_grad():
        ref = model(
            torch.tensor(x), torch.tensor(t), torch.tensor(cond["encoder_hidden_states"]), **tkw
        ).sample.numpy()
    hook.remove()
    jcond = jax.tree.map(jnp.asarray, cond)
    out, mid = net.apply(params, nhwc(x), jnp.asarray(t), jcond, return_mid=True)
    assert rel_err(np.asarray(out).transpose(0, 3, 1, 2), ref) < 1e-4, name
    assert rel_err(np.asarray(mid).transpose(0, 3, 1, 2), captured["mid"].numpy()) < 1e-4, name


def test_round_trip_is_bit_identical(pair):
    _, _, _, state, _, params = pair
    assert_same_state_dict(unet_state_dict(params), state)


def test_bad_checkpoints_name_the_key(pair):
    _, kw, _, state, _, _ = pair
    cfg = UNetConfig.from_dict(kw)
    wrong = dict(state)
    wrong["conv_in.weight"] = np.zeros((32, 4, 1, 1), np.float32)
    with pytest.raises(
        ConversionError, match=r"conv_in.weight: checkpoint \(32, 4, 1, 1\), model expects \(32, 4, 3, 3\)"
    ):
        load_unet(wrong, cfg)
    missing = {k: v for k, v in state.items() if k != "conv_out.bias"}
    missing["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match=r"1 missing: conv_out.bias; 1 unexpected: extra.weight"):
        load_unet(missing, cfg)


def test_jvp_matches_central_differences_of_diffusers():
    """d/dx of our float32 UNet along v vs central differences of the diffusers twin in float64."""
    kw = VARIANTS["sd15"]
    model = torch_unet(kw, torch.float64)
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    net, params = load_unet(state, UNetConfig.from_dict(dict(model.config)))
    x, t, cond, _ = inputs(kw, batch=1)
    v = np.random.default_rng(1).standard_normal(x.shape)
    ctx = torch.tensor(cond["encoder_hidden_states"], dtype=torch.float64)

    def torch_f(xx):
        with torch.no_grad():
            return model(torch.tensor(xx, dtype=torch.float64), torch.tensor(t), ctx).sample.numpy()

    eps = 1e-4
    fd = (torch_f(x + eps * v) - torch_f(x - eps * v)) / (2 * eps)
    jcond = jax.tree.map(jnp.asarray, cond)

    @jax.jit
    def tangent(x, v):
        return jax.jvp(lambda y: net.apply(params, y, jnp.asarray(t), jcond), (x,), (v,))[1]

    out = tangent(nhwc(x), nhwc(v.astype(np.float32)))
    assert rel_err(np.asarray(out).transpose(0, 3, 1, 2), fd) < 1e-4


def test_remat_and_bfloat16_paths_run():
    from jdistill.models.layers import Precision

    kw = VARIANTS["sd15"]
    cfg = UNetConfig.from_dict(kw)
    x, t, cond, _ = inputs(kw, batch=1)
    jcond = jax.tree.map(jnp.asarray, cond)
    ref_net = unet_net(cfg)
    params = ref_net.init(jax.random.key(0))

    def grads(net):
        return jax.jit(jax.grad(lambda p: jnp.mean(net.apply(p, nhwc(x), jnp.asarray(t), jcond) ** 2)))(
            params
        )

    g1 = grads(ref_net)
    for policy in ("attention", "dots", "full", True):  # rematerialising changes memory, not the gradients
        g2 = grads(unet_net(cfg, remat=policy))
        diff = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True)
        )
        assert diff < 1e-5, (policy, diff)
    with pytest.raises(ValueError, match="remat 'some'"):
        unet_net(cfg, remat="some").init(jax.random.key(0))
    bf16 = unet_net(cfg, precision=Precision(dtype=jnp.bfloat16))
    out_bf16 = jax.jit(bf16.apply)(params, nhwc(x), jnp.asarray(t), jcond)
    out_f32 = jax.jit(ref_net.apply)(params, nhwc(x), jnp.asarray(t), jcond)
    assert out_bf16.dtype == jnp.bfloat16
    assert rel_err(np.asarray(out_bf16, np.float32), np.asarray(out_f32)) < 0.1


# Published parameter counts of the real UNets.
FULL_SIZE = {"sd15": 859_520_964, "sd21": 865_910_724, "sd21base": 865_910_724, "sdxl": 2_567_463_684}


@pytest.mark.parametrize("preset", list(FULL_SIZE))
def test_full_size_parameter_counts(preset):
    config = json.loads((CONFIGS / preset / "unet" / "config.json").read_text())
    net = unet_net(UNetConfig.from_dict(config))
    ours = net.num_params()
    with torch.device("meta"):
        theirs = sum(p.numel() for p in TorchUNet.from_config(config).parameters())
    assert ours == theirs == FULL_SIZE[preset]


def test_unsupported_options_are_refused():
    with pytest.raises(ValueError, match="class_embed_type='timestep' is not supported"):
        UNetConfig.from_dict(dict(VARIANTS["sd15"], class_embed_type="timestep"))
    with pytest.raises(ValueError, match="unsupported UNet blocks"):
        UNetConfig.from_dict(
            dict(VARIANTS["sd15"], down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D"))
        )


@pytest.mark.slow
def test_full_size_sd15_forward_matches_diffusers():
    config = json.loads((CONFIGS / "sd15" / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    model = TorchUNet.from_config(config).eval()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    net, params = load_unet(state, UNetConfig.from_dict(config))
    del state
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 32, 32)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, 768)).astype(np.float32)
    t = np.array([500])
    with torch.no_grad():
        ref = model(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample.numpy()
    out = jax.jit(net.apply)(params, nhwc(x), jnp.asarray(t), {"encoder_hidden_states": jnp.asarray(ctx)})
    assert rel_err(np.asarray(out).transpose(0, 3, 1, 2), ref) < 1e-4
