"""The Flax FluxTransformer2DModel against diffusers: outputs, JVPs, packing and ids, strict conversion both
ways, configs, and the full-size parameter count."""

from __future__ import annotations

import copy
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs
import torch
from diffusers import FluxTransformer2DModel as TorchFlux
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from helpers import assert_same_state_dict
from torch.nn.attention import SDPBackend, sdpa_kernel

from jdistill.convert.core import ConversionError, load_state_dict
from jdistill.convert.flux import flux_state_dict, load_flux
from jdistill.models.attention import forward_mode_attention
from jdistill.models.flux import (
    FluxConfig,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
    flux_net,
    image_ids,
    pack_latents,
    rope_frequencies,
    text_ids,
    unpack_latents,
)
from jdistill.models.layers import FP32, Precision
from jdistill.models.net import Net

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "jdistill" / "teachers" / "configs"
TINY = tiny_configs.flux()
LATENT = (16, 12)  # an 8x6 grid of packed tokens: non-square, so a row/column mix-up in ids or RoPE shows
TEXT = 7
FLUX_DEV = dict(
    _class_name="FluxTransformer2DModel",
    _diffusers_version="0.30.0.dev0",
    _name_or_path="../checkpoints/flux-dev/transformer",
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)


def torch_flux(guidance: bool) -> TorchFlux:
    torch.manual_seed(0)
    model = TorchFlux(**TINY, guidance_embeds=guidance).eval()
    with torch.no_grad():  # no constant parameter: every weight and bias takes part in the comparison
        for name, p in model.named_parameters():
            is_rms_weight = p.ndim == 1 and ".norm" in name and ".linear." not in name
            p.copy_(1 + 0.2 * torch.randn_like(p) if is_rms_weight else 0.2 * torch.randn_like(p))
    return model


def inputs(guidance: bool, batch: int = 2, seed: int = 0):
    """NHWC latents, timesteps in [0, 1] and the condition dict (numpy)."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, *LATENT, TINY["in_channels"] // 4)).astype(np.float32)
    t = np.array([0.3, 0.85][:batch], np.float32)
    cond = {
        "encoder_hidden_states": rng.standard_normal((batch, TEXT, TINY["joint_attention_dim"])).astype(
            np.float32
        ),
        "pooled_projections": rng.standard_normal((batch, TINY["pooled_projection_dim"])).astype(np.float32),
    }
    if guidance:
        cond["guidance"] = np.array([3.5, 1.0][:batch], np.float32)
    return latents, t, cond


def torch_forward(model: TorchFlux, packed, t, cond) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    as_t = lambda a: torch.as_tensor(a).to(dtype)  # noqa: E731
    h, w = LATENT[0] // 2, LATENT[1] // 2
    return model(
        hidden_states=as_t(packed),
        encoder_hidden_states=as_t(cond["encoder_hidden_states"]),
        pooled_projections=as_t(cond["pooled_projections"]),
        timestep=as_t(t),
        img_ids=torch.tensor(image_ids(h, w)),
        txt_ids=torch.tensor(text_ids(TEXT)),
        guidance=as_t(cond["guidance"]) if "guidance" in cond else None,
    ).sample


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def build_variant(guidance: bool):
    """(torch model, its state dict, our Net, our params)."""
    model = torch_flux(guidance)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    net, params = load_flux(state, FluxConfig.from_dict(dict(model.config)))
    return model, state, net, params


@pytest.fixture(scope="module")
def variants():
    """guidance -> build_variant(guidance), each built once per module."""
    return functools.cache(build_variant)


@pytest.fixture(scope="module", params=[True, False], ids=["guidance", "no_guidance"])
def pair(request, variants):
    return request.param, *variants(request.param)


def test_packing_and_ids_match_the_pipeline():
    latents, _, _ = inputs(False)
    nchw = torch.tensor(latents.transpose(0, 3, 1, 2))
    b, c, h, w = nchw.shape
    packed = pack_latents(latents)
    np.testing.assert_array_equal(packed, FluxPipeline._pack_latents(nchw, b, c, h, w).numpy())
    np.testing.assert_array_equal(unpack_latents(packed, h, w), latents)
    unpacked = FluxPipeline._unpack_latents(torch.tensor(packed), 8 * h, 8 * w, 8).numpy()  # vae factor 8
    np.testing.assert_array_equal(unpacked, latents.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(
        np.asarray(unpack_latents(pack_latents(jnp.asarray(latents)), h, w)), latents
    )
    ref_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    np.testing.assert_array_equal(image_ids(h // 2, w // 2), ref_ids.numpy())
    assert image_ids(8, 6)[7].tolist() == [0, 1, 1]  # row-major: token 7 of an 8x6 grid is row 1, column 1
    np.testing.assert_array_equal(text_ids(TEXT), np.zeros((TEXT, 3), np.float32))


def test_outputs_match_diffusers(pair):
    guidance, model, _, net, params = pair
    latents, t, cond = inputs(guidance)
    packed = pack_latents(latents)
    with torch.no_grad():
        ref = torch_forward(model, packed, t, cond).numpy()
    grid = image_ids(LATENT[0] // 2, LATENT[1] // 2)

    @jax.jit
    def run(params, packed, latents, t, cond, traced_ids):
        static = net.apply(params, packed, t, cond, img_ids=grid)  # numpy ids: float64 frequencies
        traced = net.apply(params, packed, t, cond, img_ids=traced_ids)  # float32 frequencies
        nhwc = net.apply(params, latents, t, cond, method="on_latents")
        return static, traced, nhwc

    jcond = jax.tree.map(jnp.asarray, cond)
    static, traced, nhwc = run(params, packed, latents, t, jcond, jnp.asarray(grid))
    assert static.shape == ref.shape == (2, 48, TINY["in_channels"])
    assert rel_err(static, ref) < 1e-4
    assert rel_err(traced, ref) < 1e-4
    assert rel_err(nhwc, unpack_latents(ref, *LATENT)) < 1e-4
    # The image positions matter: the same tokens on a transposed 6x8 grid give another output.
    swapped = jax.jit(lambda p: net.apply(p, packed, t, jcond, img_ids=image_ids(6, 8)))(params)
    assert rel_err(swapped, ref) > 1e-2
    # The guidance input is required exactly when the transformer embeds it.
    wrong = {k: v for k, v in jcond.items() if k != "guidance"} if guidance else dict(jcond, guidance=t)
    with pytest.raises(ValueError, match="guidance"):
        jax.eval_shape(lambda p: net.apply(p, packed, t, wrong, img_ids=grid), params)


def standalone(block_cls, torch_block, cfg: FluxConfig):
    """One of our blocks, unstacked, with the weights of a diffusers block: a jitted ``f(*args)``."""
    net = Net("block", lambda r: block_cls(cfg, r, FP32, "xla"))
    params = load_state_dict(net.abstract, {k: v.numpy() for k, v in torch_block.state_dict().items()})
    return jax.jit(functools.partial(net.apply, params))


def test_rope_and_blocks_match_diffusers_closely(variants):
    """The rotary tables, one double and one single block alone, at float32 round-off: the whole network's
    1e-4 bound would let through near misses such as the exact gelu for the tanh approximation."""
    model, _, net, _ = variants(True)
    cfg = net.config
    rng = np.random.default_rng(2)
    x, c = (2 * rng.standard_normal((2, n, 32)).astype(np.float32) for n in (48, TEXT))
    temb = rng.standard_normal((2, 32)).astype(np.float32)
    ids = np.concatenate([text_ids(TEXT), image_ids(LATENT[0] // 2, LATENT[1] // 2)])
    rope = rope_frequencies(ids, cfg.axes_dims_rope)
    with torch.no_grad():
        want_rope = model.pos_embed(torch.tensor(ids))
        want_c, want_x = model.transformer_blocks[1](
            torch.tensor(x), torch.tensor(c), torch.tensor(temb), want_rope
        )
        want_sc, want_sx = model.single_transformer_blocks[1](
            torch.tensor(x), torch.tensor(c), torch.tensor(temb), want_rope
        )
    for ours, theirs in zip(rope, want_rope, strict=True):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=1e-6)
    double = standalone(FluxTransformerBlock, model.transformer_blocks[1], cfg)
    got_x, got_c = double((x, c), temb, rope)
    assert rel_err(got_x, want_x.numpy()) < 1e-5 and rel_err(got_c, want_c.numpy()) < 1e-5
    single = standalone(FluxSingleTransformerBlock, model.single_transformer_blocks[1], cfg)
    got = single(np.concatenate([c, x], axis=1), temb, rope)
    assert rel_err(got[:, :TEXT], want_sc.numpy()) < 1e-5 and rel_err(got[:, TEXT:], want_sx.numpy()) < 1e-5


def test_round_trip_is_bit_identical(pair):
    _, _, state, _, params = pair
    assert_same_state_dict(flux_state_dict(params), state)


def test_bad_checkpoints_name_the_key(pair):
    guidance, _, state, _, _ = pair
    cfg = FluxConfig(**TINY, guidance_embeds=guidance)
    missing = {k: v for k, v in state.items() if k != "transformer_blocks.1.attn.norm_added_k.weight"}
    with pytest.raises(
        ConversionError, match=r"1 missing: transformer_blocks\.1\.attn\.norm_added_k\.weight"
    ):
        load_flux(missing, cfg)
    extra = {
        **state,
        "single_transformer_blocks.2.proj_out.bias": state["single_transformer_blocks.0.proj_out.bias"],
    }
    with pytest.raises(ConversionError, match=r"1 unexpected: single_transformer_blocks\.2\.proj_out\.bias"):
        load_flux(extra, cfg)
    wrong = {**state, "single_transformer_blocks.1.proj_out.weight": np.zeros((32, 128), np.float32)}
    with pytest.raises(
        ConversionError,
        match=r"single_transformer_blocks\.1\.proj_out\.weight: checkpoint \(32, 128\), model expects \(32, 160\)",
    ):
        load_flux(wrong, cfg)
    # A guidance-distilled checkpoint does not load into a transformer without the guidance embedding.
    other = FluxConfig(**TINY, guidance_embeds=not guidance)
    side = "unexpected" if guidance else "missing"
    with pytest.raises(
        ConversionError, match=rf"4 {side}: time_text_embed\.guidance_embedder\.linear_1\.bias"
    ):
        load_flux(state, other)


def test_jvp_matches_diffusers_in_float64(variants):
    """Our float32 JVP in (latents, timestep) against the diffusers twin in float64: its forward-mode JVP (math
    attention, which has forward AD) and central differences in the latents alone. (diffusers' RoPE computes
    in float32 even in a float64 model, so its differences are noisy below eps ~ 1e-3.)"""
    model, _, net, params = variants(True)
    model64 = copy.deepcopy(model).double()
    latents, t, cond = inputs(True, batch=1)
    packed = pack_latents(latents)
    rng = np.random.default_rng(1)
    vx, vt = rng.standard_normal(packed.shape), np.ones_like(t)

    def f(x, tt):
        return torch_forward(model64, x, tt, cond)

    x64, t64 = torch.tensor(packed, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        want = torch.func.jvp(f, (x64, t64), (torch.tensor(vx), torch.tensor(vt, dtype=torch.float64)))[1]
        eps = 1e-3
        dx = eps * torch.tensor(vx)
        fd_x = ((f(x64 + dx, t64) - f(x64 - dx, t64)) / (2 * eps)).numpy()
    grid = image_ids(LATENT[0] // 2, LATENT[1] // 2)
    jcond = jax.tree.map(jnp.asarray, cond)

    @jax.jit
    def tangents(x, tt, vx, vt):
        g = lambda x, tt: net.apply(params, x, tt, jcond, img_ids=grid)  # noqa: E731
        return jax.jvp(g, (x, tt), (vx, vt))[1], jax.jvp(lambda x: g(x, tt), (x,), (vx,))[1]

    both, x_only = tangents(
        jnp.asarray(packed), jnp.asarray(t), jnp.asarray(vx, jnp.float32), jnp.asarray(vt)
    )
    assert rel_err(both, want.numpy()) < 1e-4
    assert rel_err(x_only, fd_x) < 2e-4
    # A fused attention kernel has no forward mode; inside forward_mode_attention it resolves to "chunked".
    fused = flux_net(net.config, attention_impl="cudnn")
    with forward_mode_attention():
        g = lambda x, tt: fused.apply(params, x, tt, jcond, img_ids=grid)  # noqa: E731
        tangent = jax.jit(lambda *a: jax.jvp(g, a[:2], a[2:])[1])(
            jnp.asarray(packed), jnp.asarray(t), jnp.asarray(vx, jnp.float32), jnp.asarray(vt)
        )
    assert rel_err(tangent, both) < 1e-5


def test_rematerialised_gradients_match_diffusers(variants):
    """Parameter gradients of a loss through the scanned stacks with full remat, against torch autograd."""
    model, _, net, params = variants(True)
    latents, t, cond = inputs(True, batch=1)
    packed = pack_latents(latents)
    model.zero_grad()
    (torch_forward(model, packed, t, cond) ** 2).mean().backward()
    want = {k: p.grad.numpy() for k, p in model.named_parameters()}
    remat = flux_net(net.config, remat="full")
    jcond = jax.tree.map(jnp.asarray, cond)
    grid = image_ids(LATENT[0] // 2, LATENT[1] // 2)
    loss = lambda p: jnp.mean(remat.apply(p, jnp.asarray(packed), t, jcond, img_ids=grid) ** 2)  # noqa: E731
    got = flux_state_dict(jax.jit(jax.grad(loss))(params))
    assert got.keys() == want.keys()
    worst = max((rel_err(got[k], want[k]), k) for k in want)
    assert worst[0] < 3e-4, worst  # float32 on both sides: median 2e-5, the worst is the guidance sinusoids
    with pytest.raises(ValueError, match="remat 'some'"):
        flux_net(net.config, remat="some")


def test_bfloat16_path_runs(variants):
    _, _, net, params = variants(True)
    latents, t, cond = inputs(True, batch=1)
    jcond = jax.tree.map(jnp.asarray, cond)
    packed = jnp.asarray(pack_latents(latents))
    grid = image_ids(LATENT[0] // 2, LATENT[1] // 2)
    bf16 = flux_net(net.config, precision=Precision(dtype=jnp.bfloat16))
    out_bf16 = jax.jit(lambda p: bf16.apply(p, packed, t, jcond, img_ids=grid))(params)
    out_f32 = jax.jit(lambda p: net.apply(p, packed, t, jcond, img_ids=grid))(params)
    assert out_bf16.dtype == jnp.bfloat16
    assert rel_err(np.asarray(out_bf16, np.float32), out_f32) < 0.1


def test_config_from_diffusers_and_unsupported_options():
    cfg = FluxConfig.from_dict(FLUX_DEV)  # bookkeeping keys ignored
    assert cfg == FluxConfig.from_dict(
        json.loads((CONFIGS / "flux_dev" / "transformer" / "config.json").read_text())
    )
    assert cfg.guidance_embeds and cfg.axes_dims_rope == (16, 56, 56) and cfg.output_channels == 64
    assert FluxConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="patch_size=2 is not supported"):
        FluxConfig.from_dict(dict(FLUX_DEV, patch_size=2))
    with pytest.raises(ValueError, match="option 'use_rope_v2' is not supported"):
        FluxConfig.from_dict(dict(FLUX_DEV, use_rope_v2=True))
    with pytest.raises(ValueError, match="_class_name='SD3Transformer2DModel'"):
        FluxConfig.from_dict(dict(FLUX_DEV, _class_name="SD3Transformer2DModel"))
    with pytest.raises(ValueError, match="axes_dims_rope"):
        FluxConfig.from_dict(dict(FLUX_DEV, axes_dims_rope=[16, 56, 48]))


# Parameter counts of the published transformers (diffusers' count on the meta device agrees).
FULL_SIZE = {"flux_dev": 11_901_408_320, "flux_schnell": 11_891_178_560, "flux_lite": 8_163_264_064}


@pytest.mark.parametrize("preset", list(FULL_SIZE))
def test_full_size_parameter_counts_and_sharding_names(preset):
    config = json.loads((CONFIGS / preset / "transformer" / "config.json").read_text())
    net = flux_net(FluxConfig.from_dict(config))  # abstract: no weights allocated
    with torch.device("meta"):
        theirs = sum(p.numel() for p in TorchFlux.from_config(config).parameters())
    assert net.num_params() == theirs == FULL_SIZE[preset]
    # Every kernel has a dimension that FSDP splits (the default rules map "mlp" and "heads" to fsdp).
    flat = jax.tree_util.tree_flatten_with_path(net.logical_axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    kernels = [(jax.tree_util.keystr(p), axes) for p, axes in flat if "kernel" in jax.tree_util.keystr(p)]
    assert len(kernels) == 28 + 2 * config["guidance_embeds"]
    assert all({"mlp", "heads"} & set(axes) for _, axes in kernels), kernels
