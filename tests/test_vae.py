"""The Flax AutoencoderKL against diffusers: posterior, decoder, scaling helpers, conversion, full-size counts.

Every numeric reference is diffusers' torch model holding the same (random) weights; data crosses the
boundary as NCHW <-> NHWC.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs
import torch
from diffusers import AutoencoderKL as TorchVAE
from flax import nnx

from jdistill.convert.core import ConversionError, expected_keys
from jdistill.convert.vae import load_vae, rename_legacy, vae_state_dict
from jdistill.models.layers import Precision
from jdistill.models.vae import AutoencoderKLConfig, vae_net

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "jdistill" / "teachers" / "configs"
SD_VAE_PARAMS = 83_653_863  # the published size of the SD1.x / SD2.x / SDXL VAE
# max abs error / max abs reference value, float32. Measured <= 8e-6 on CPU; 3e-5 still catches a norm
# epsilon of 1e-5 instead of 1e-6 (errors 4e-5 to 1e-4 in mean and decode), which 1e-4 would let through.
RTOL = 3e-5
GRAD_RTOL = 1e-4

VARIANTS = {
    "two_blocks": tiny_configs.vae(),
    # SD3-style latent space: shift and scale, no quant convolutions.
    "three_blocks": tiny_configs.vae(
        block_out_channels=(32, 64, 64),
        latent_channels=16,
        norm_num_groups=32,
        layers_per_block=2,
        scaling_factor=1.5035,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    "no_mid_attention": tiny_configs.vae(
        block_out_channels=(16,), sample_size=16, mid_block_add_attention=False
    ),
}


@functools.cache
def reference(variant: str) -> tuple[TorchVAE, AutoencoderKLConfig]:
    """diffusers' model for a variant (random weights) and the config jdistill reads from it."""
    model = torch_vae(VARIANTS[variant])
    return model, AutoencoderKLConfig.from_dict(dict(model.config))


@functools.cache
def converted(variant: str):
    """(net, params) loaded from the reference's state dict; shared by the tests that only read them."""
    model, cfg = reference(variant)
    return load_vae(state_dict(model), cfg)


def torch_vae(kw: dict) -> TorchVAE:
    torch.manual_seed(0)
    model = TorchVAE(**kw).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # torch initialises norms to (1, 0); perturb them so a swapped norm shows
                p.add_(0.2 * torch.randn_like(p))
        if model.quant_conv is not None:  # push two logvar channels past diffusers' clamp to [-30, 20]
            c = model.config.latent_channels
            model.quant_conv.bias[c] += 60.0
            model.quant_conv.bias[c + 1] -= 60.0
    return model


def state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)


def rel_err(ours, ref, *, per_channel: bool = True) -> float:
    """max |ours - ref| / max |ref|, per channel for NCHW arrays (the worst channel), so that channels pushed
    to the logvar clamp (constant, or e^10 times larger) cannot hide errors in the others."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    axes = (0, 2, 3) if per_channel and ref.ndim == 4 else None
    return float(np.max(np.abs(ours - ref).max(axis=axes) / np.abs(ref).max(axis=axes)))


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request):
    """(variant, torch model, config, net, params, our outputs, diffusers' outputs) on the same inputs."""
    model, cfg = reference(request.param)
    net, params = converted(request.param)
    f = cfg.downsample_factor
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    z = rng.standard_normal((2, cfg.latent_channels, 32 // f, 32 // f)).astype(np.float32)
    key = jax.random.key(3)

    @jax.jit
    def run(params, x, z, key):  # one compilation per variant for every method under test
        vae = nnx.merge(net.graphdef, params)
        post = vae.encode(x)
        return dict(
            mean=post.mean,
            logvar=post.logvar,
            std=post.std,
            kl=post.kl(),
            sample=post.sample(key),
            decode=vae.decode(z),
            latents=vae.latents_from_images(x),
            images=vae.images_from_latents(z),
        )

    ours = jax.tree.map(np.asarray, run(params, nhwc(x), nhwc(z), key))
    scale, shift = model.config.scaling_factor, model.config.shift_factor or 0.0
    with torch.no_grad():
        tx, tz = torch.from_numpy(x), torch.from_numpy(z)
        post = model.encode(tx).latent_dist
        eps = torch.from_numpy(nchw(jax.random.normal(key, ours["mean"].shape)).copy())
        ref = dict(
            mean=post.mean,
            logvar=post.logvar,
            std=post.std,
            kl=post.kl(),
            sample=post.mean + post.std * eps,  # diffusers' sample() with jdistill's noise
            decode=model.decode(tz).sample,
            latents=(post.mean - shift) * scale,  # the diffusers training scripts' convention
            images=model.decode(tz / scale + shift).sample,  # and the pipelines' inverse
        )
    ref = {k: v.numpy() for k, v in ref.items()}
    return request.param, model, cfg, net, params, ours, ref


@pytest.mark.parametrize("name", ["mean", "logvar", "std", "kl", "sample", "decode", "latents", "images"])
def test_matches_diffusers(pair, name):
    variant, _, _, _, _, ours, ref = pair
    got = ours[name] if ours[name].ndim != 4 else nchw(ours[name])
    err = rel_err(got, ref[name])
    assert err < RTOL, f"{variant} {name}: relative error {err:.2e}"


def test_logvar_clamped(pair):
    _, model, *_, ours, ref = pair
    if model.quant_conv is None:
        pytest.skip("no quant_conv bias to push")
    logvar = nchw(ours["logvar"])
    assert np.all(logvar[:, 0] == 20.0) and np.all(logvar[:, 1] == -30.0)
    np.testing.assert_array_equal(logvar[:, :2], ref["logvar"][:, :2])


def test_shapes_and_dtypes(pair):
    _, _, cfg, _, _, ours, _ = pair
    f = cfg.downsample_factor
    assert ours["mean"].shape == (2, 32 // f, 32 // f, cfg.latent_channels)
    assert ours["decode"].shape == (2, 32, 32, cfg.out_channels)
    assert all(v.dtype == np.float32 for v in ours.values())


def test_state_dict_round_trip(pair):
    _, model, _, _, params, _, _ = pair
    original = state_dict(model)
    back = vae_state_dict(params)
    assert sorted(back) == sorted(original)
    for k, v in original.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def _assert_same_params(a, b) -> None:
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _legacy(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pre-rename attention names; the encoder's projections also shaped as LDM-era 1x1 convolutions."""
    out = {}
    for k, v in sd.items():
        for new, old in LEGACY.items():
            if ".mid_block.attentions.0." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                if k.startswith("encoder.") and k.endswith(".weight"):
                    v = v[:, :, None, None]
        out[k] = v
    return out


def test_legacy_attention_names():
    model, cfg = reference("two_blocks")
    current = state_dict(model)
    legacy = _legacy(current)
    assert {
        "encoder.mid_block.attentions.0.query.weight",
        "decoder.mid_block.attentions.0.proj_attn.bias",
    } <= set(legacy)
    # The reference renaming is diffusers' own, applied when it loads such a checkpoint.
    fixed = model._fix_state_dict_keys_on_load(dict(legacy))
    assert sorted(rename_legacy(k) for k in legacy) == sorted(fixed) == sorted(current)
    _, loaded = load_vae(legacy, cfg)
    _assert_same_params(loaded, converted("two_blocks")[1])


def test_legacy_and_current_name_together_refused():
    model, cfg = reference("two_blocks")
    sd = state_dict(model)
    key = "encoder.mid_block.attentions.0.to_q.weight"
    sd[key.replace("to_q", "query")] = sd[key]
    with pytest.raises(ConversionError, match=r"encoder\.mid_block\.attentions\.0\.to_q\.weight"):
        load_vae(sd, cfg)


def test_wrong_shape_and_missing_keys_raise():
    model, cfg = reference("no_mid_attention")
    sd = state_dict(model)
    bad = dict(sd)
    bad["decoder.up_blocks.0.resnets.1.conv2.weight"] = np.zeros((16, 16, 1, 1), np.float32)
    with pytest.raises(
        ConversionError, match=r"decoder\.up_blocks\.0\.resnets\.1\.conv2\.weight.*\(16, 16, 1, 1\)"
    ):
        load_vae(bad, cfg)
    missing = dict(sd)
    del missing["quant_conv.bias"]
    with pytest.raises(ConversionError, match=r"missing: quant_conv\.bias"):
        load_vae(missing, cfg)
    extra = dict(sd, **{"encoder.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected: encoder\.extra\.weight"):
        load_vae(extra, cfg)


def test_load_from_diffusers_folder(tmp_path):
    model, _ = reference("three_blocks")
    model.save_pretrained(tmp_path, safe_serialization=True)
    net, params = load_vae(str(tmp_path))  # config.json written by diffusers, weights read lazily
    assert nnx.graphdef(nnx.merge(net.graphdef, params)) == converted("three_blocks")[0].graphdef
    _assert_same_params(params, converted("three_blocks")[1])


def test_config_from_dict():
    cfg = AutoencoderKLConfig.from_dict(
        {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "foo": 1}
    )
    with torch.device("meta"):  # diffusers' defaults, for a config.json that omits everything
        defaults = TorchVAE().config
    for field in ("in_channels", "latent_channels", "layers_per_block", "norm_num_groups", "scaling_factor"):
        assert getattr(cfg, field) == defaults[field], field
    assert cfg.force_upcast is defaults["force_upcast"] and cfg.shift_factor is defaults["shift_factor"]
    assert cfg.block_out_channels == tuple(defaults["block_out_channels"])
    with pytest.raises(ValueError, match="unsupported VAE blocks"):
        AutoencoderKLConfig.from_dict({"down_block_types": ["AttnDownEncoderBlock2D"]})
    with pytest.raises(ValueError, match="latents_mean"):
        AutoencoderKLConfig.from_dict({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})
    with pytest.raises(ValueError, match="act_fn"):
        AutoencoderKLConfig.from_dict({"act_fn": "gelu"})


def test_forward_and_remat_gradients_match_torch():
    """``__call__`` is diffusers' forward (decode the mode); with remat its gradients equal torch autograd's."""
    model, cfg = reference("no_mid_attention")
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    model.zero_grad()
    out = model(torch.from_numpy(x)).sample
    (out**2).sum().backward()
    torch_grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
    model.zero_grad()

    net, params = load_vae(state_dict(model), cfg, remat=True)

    def loss(params):
        y = net.apply(params, nhwc(x))
        return jnp.sum(jnp.square(y)), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert rel_err(nchw(y), out.detach().numpy()) < RTOL
    ours = vae_state_dict(grads)  # gradients share the parameters' tree, so the torch names and layouts
    assert sorted(ours) == sorted(torch_grads)
    for k, g in torch_grads.items():
        assert rel_err(ours[k], g, per_channel=False) < GRAD_RTOL, k


def test_bfloat16_compute_stays_close():
    """A bf16 dtype policy runs every layer, the mid-block attention included, near the float32 reference."""
    model, cfg = reference("two_blocks")
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).sample.numpy()
    net, params = load_vae(state_dict(model), cfg, precision=Precision(dtype=jnp.bfloat16))
    out = jax.jit(net.apply)(params, nhwc(x))
    assert out.dtype == jnp.float32
    assert rel_err(nchw(out), ref) < 0.1  # measured 3e-2: bf16 rounding, not a wrong layer (errors ~1)


ARCHITECTURE = (
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "act_fn",
    "latent_channels",
    "norm_num_groups",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
)


@functools.cache
def _full_size_shapes(architecture: tuple) -> tuple[dict, dict, int, int]:
    """torch-layout shapes and parameter counts of jdistill's and diffusers' models (no arrays allocated);
    cached because the three SD VAEs share one architecture."""
    raw = {k: list(v) if isinstance(v, tuple) else v for k, v in architecture}
    net = vae_net(AutoencoderKLConfig.from_dict(raw))  # eval_shape: abstract parameters only
    with torch.device("meta"):
        model = TorchVAE.from_config(raw)
    ours = {}
    for key, (path, shape, _) in expected_keys(net.abstract).items():
        if path[-1] == "kernel" and len(shape) == 4:  # HWIO -> OIHW
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif path[-1] == "kernel":  # (in, out) -> (out, in)
            shape = shape[::-1]
        ours[key] = shape
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return ours, theirs, net.num_params(), sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("teacher", ["sd15", "sd21", "sdxl"])
def test_full_size_matches_diffusers_on_meta(teacher):
    """The real SD VAE configs: same keys, shapes and parameter count as diffusers, built without memory."""
    raw = json.loads((CONFIGS / teacher / "vae" / "config.json").read_text())
    cfg = AutoencoderKLConfig.from_dict(raw)
    architecture = tuple((k, getattr(cfg, k)) for k in ARCHITECTURE)
    ours, theirs, n_ours, n_theirs = _full_size_shapes(architecture)
    assert ours == theirs
    assert n_ours == n_theirs == SD_VAE_PARAMS
    with torch.device("meta"):
        diffusers_config = TorchVAE.from_config(raw).config  # how diffusers reads the same file
    for field in ("scaling_factor", "shift_factor", "force_upcast", "sample_size", *ARCHITECTURE):
        ours_value, theirs_value = getattr(cfg, field), diffusers_config[field]
        theirs_value = tuple(theirs_value) if isinstance(theirs_value, list) else theirs_value
        assert ours_value == theirs_value, field
    expected_scale = {"sd15": 0.18215, "sd21": 0.18215, "sdxl": 0.13025}[teacher]
    assert cfg.scaling_factor == expected_scale
    assert cfg.force_upcast  # diffusers' default where the file is silent, explicit in SDXL's
