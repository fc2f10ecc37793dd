"""The digits teacher's components before its UNet is trained: text encoder, VAE, and a pipeline directory.

- Text encoder: a small ``CLIPTextModel`` trained to read the captions: its pooled (EOS) output must predict
  the caption's digit and colour (two linear heads, dropped afterwards). Causal attention makes every
  position after the words that matter carry them, so the UNet's cross-attention finds them too.
- VAE: a small ``AutoencoderKL`` (32x32x3 <-> 8x8x4) trained on the rendered images with L1 + L2
  reconstruction and a light KL term; its ``scaling_factor`` is set to 1 / std of the latents, as SD's was.
- ``write_pipeline``: a ``StableDiffusionPipeline`` directory (tokenizer, text encoder, VAE, an untrained
  UNet, DDIM scheduler with SD's scaled-linear betas) that the ``sft``
  digits preset trains the UNet of.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdistill.convert.clip import clip_state_dict
from jdistill.convert.export import save_weights, write_json
from jdistill.convert.unet import unet_state_dict
from jdistill.convert.vae import vae_state_dict
from jdistill.digits import data
from jdistill.digits.tokenizer import MAX_LENGTH, write_tokenizer
from jdistill.models.clip import CLIPTextConfig, clip_text_net
from jdistill.models.net import Net
from jdistill.models.unet import UNetConfig, unet_net
from jdistill.models.vae import AutoencoderKLConfig, vae_net

PyTree = object

UNET_CONFIG = {
    "sample_size": data.SIDE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 2,  # diffusers' name for the number of heads in SD-style UNets
    "norm_num_groups": 32,
}
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def text_encoder_config(vocab_size: int, bos: int, eos: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        projection_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="gelu",
        pad_token_id=eos,
        bos_token_id=bos,
        eos_token_id=eos,
    )


VAE_CONFIG = AutoencoderKLConfig(
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=data.SIDE,
    scaling_factor=1.0,
)


@dataclasses.dataclass
class Trained:
    net: Net
    params: PyTree
    config: object
    metrics: dict


def _adam_loop(loss, params, steps: int, lr: float, batches, seed: int = 0) -> tuple[PyTree, list[float]]:
    """Minimise ``loss(params, batch, key)`` with AdamW and a cosine schedule over ``batches(i)``."""
    opt = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(optax.cosine_decay_schedule(lr, steps), 1e-4)
    )
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch, key):
        value, grads = jax.value_and_grad(loss)(params, batch, key)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    history = []
    key = jax.random.key(seed)
    for i in range(steps):
        params, state, value = step(params, state, batches(i), jax.random.fold_in(key, i))
        if i % 100 == 0 or i == steps - 1:
            history.append(float(value))
    return params, history


def train_text_encoder(tokenizer, steps: int = 800, batch: int = 128, seed: int = 0) -> Trained:
    config = text_encoder_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    net = clip_text_net(config, with_projection=False)
    key = jax.random.key(seed)
    heads = {
        "digit": jax.random.normal(jax.random.fold_in(key, 1), (config.hidden_size, 10)) * 0.02,
        "colour": jax.random.normal(jax.random.fold_in(key, 2), (config.hidden_size, len(data.COLOUR_NAMES)))
        * 0.02,
    }
    params = {"encoder": net.init(key), "heads": heads}
    rng = np.random.default_rng(seed)

    def batches(i):
        digits = rng.integers(0, 10, batch)
        colours = rng.integers(0, len(data.COLOUR_NAMES), batch)
        ids = tokenizer(
            data.random_captions(rng, digits, colours),
            padding="max_length",
            max_length=MAX_LENGTH,
            truncation=True,
        )["input_ids"]
        return np.asarray(ids, np.int32), digits, colours

    def loss(p, b, key):
        ids, digits, colours = b
        pooled = net.apply(p["encoder"], ids).pooler_output
        ce = optax.softmax_cross_entropy_with_integer_labels
        return jnp.mean(ce(pooled @ p["heads"]["digit"], digits)) + jnp.mean(
            ce(pooled @ p["heads"]["colour"], colours)
        )

    params, history = _adam_loop(loss, params, steps, 1e-3, batches, seed)
    ids, digits, colours = batches(steps)
    pooled = net.apply(params["encoder"], ids).pooler_output
    digit_ok = np.asarray(pooled @ params["heads"]["digit"]).argmax(-1) == digits
    colour_ok = np.asarray(pooled @ params["heads"]["colour"]).argmax(-1) == colours
    acc = float(np.mean(digit_ok & colour_ok))  # both read from a fresh batch of captions
    return Trained(net, params["encoder"], config, {"loss": history, "caption_accuracy": acc})


def train_vae(
    steps: int = 1500,
    batch: int = 32,
    seed: int = 0,
    kl_weight: float = 1e-4,
    config: AutoencoderKLConfig = VAE_CONFIG,
    stats_images: int = 0,
) -> Trained:
    """A VAE of ``config`` trained on the rendered digits. A config with a ``shift_factor`` (FLUX-style) gets
    the latents' mean as its shift and 1 / std of the centred latents as its scale; otherwise (SD-style)
    the scale alone, 1 / std. ``stats_images``: how many of the images (every digit in every colour, in
    order) the statistics and the reconstruction error are measured on; 0: all (shrunk test builds use
    fewer)."""
    net = vae_net(config)
    params = net.init(jax.random.key(seed))
    rng = np.random.default_rng(seed + 1)
    pool = data.split("all")

    def batches(i):
        index = pool[rng.integers(0, len(pool), batch)]
        colours = rng.integers(0, len(data.COLOUR_NAMES), batch)
        return data.render(index, colours).astype(np.float32) / 127.5 - 1.0

    def loss(p, x, key):
        recon, posterior = _vae_run(net, p, x, key)
        kl = jnp.mean(posterior.kl()) / posterior.mean[0].size  # per latent element
        return jnp.mean(jnp.abs(recon - x)) + jnp.mean((recon - x) ** 2) + kl_weight * kl

    params, history = _adam_loop(loss, params, steps, 1e-3, batches, seed)
    # Latent statistics over every image in every colour set the scaling factor (SD: 1 / std of its latents).
    images = data.render(
        np.repeat(pool, len(data.COLOUR_NAMES)), np.tile(np.arange(len(data.COLOUR_NAMES)), len(pool))
    )
    x = images.astype(np.float32) / 127.5 - 1.0
    if stats_images:
        x = x[:stats_images]
    encode = jax.jit(lambda p, x: net.apply(p, x, method="latents_from_images"))
    decode = jax.jit(lambda p, z: net.apply(p, z, method="images_from_latents"))
    latents = np.concatenate([np.asarray(encode(params, x[i : i + 512])) for i in range(0, len(x), 512)])
    scaling = float(1.0 / latents.std())
    recon = np.concatenate([np.asarray(decode(params, latents[i : i + 512])) for i in range(0, len(x), 512)])
    if config.shift_factor is None:
        config = dataclasses.replace(config, scaling_factor=round(scaling, 5))
    else:  # FLUX: (z - shift) * scale has mean 0 and std 1 over the data
        shift = float(latents.mean())
        scaling = float(1.0 / (latents - shift).std())
        config = dataclasses.replace(config, shift_factor=round(shift, 5), scaling_factor=round(scaling, 5))
    metrics = {
        "loss": history,
        "reconstruction_mae": float(np.mean(np.abs(recon - x)) * 127.5),
        "latent_std": float(latents.std()),
        "latent_mean": float(latents.mean()),
    }
    return Trained(vae_net(config), params, config, metrics)


def _vae_run(net: Net, params, x, key):
    from flax import nnx

    module = nnx.merge(net.graphdef, params)
    posterior = module.encode(x)
    return module.decode(posterior.sample(key)), posterior


def write_component(folder: str, name: str, config: dict, state_dict: dict, weights: str) -> None:
    """``folder/name``: its ``config.json`` and float32 ``weights`` safetensors, as diffusers saves them."""
    path = os.path.join(folder, name)
    os.makedirs(path, exist_ok=True)
    write_json(os.path.join(path, "config.json"), config)
    save_weights(path, state_dict, "float32", weights)


def write_vae(folder: str, vae: Trained) -> None:
    """The trained VAE as the pipeline's ``vae/`` component."""
    config = {"_class_name": "AutoencoderKL", **vae.config.to_dict()}
    write_component(folder, "vae", config, vae_state_dict(vae.params), "diffusion_pytorch_model")


def write_pipeline(folder: str, text_encoder: Trained, vae: Trained, seed: int = 0) -> str:
    """A StableDiffusionPipeline directory with the trained text encoder and VAE and an untrained UNet."""
    if os.path.exists(folder) and os.listdir(folder):
        raise FileExistsError(f"{folder} exists and is not empty")
    write_tokenizer(os.path.join(folder, "tokenizer"))

    te = os.path.join(folder, "text_encoder")
    os.makedirs(te, exist_ok=True)
    write_json(
        os.path.join(te, "config.json"),
        {"architectures": ["CLIPTextModel"], **text_encoder.config.to_dict(), "torch_dtype": "float32"},
    )
    save_weights(te, clip_state_dict(text_encoder.params), "float32", "model")

    write_vae(folder, vae)

    # The UNet's weights here are a placeholder with the right shapes: the sft preset starts from its own
    # random initialisation (model.init = "random").
    unet_dir = os.path.join(folder, "unet")
    os.makedirs(unet_dir, exist_ok=True)
    write_json(os.path.join(unet_dir, "config.json"), {"_class_name": "UNet2DConditionModel", **UNET_CONFIG})
    params = unet_net(UNetConfig.from_dict(UNET_CONFIG)).init(jax.random.key(seed))
    save_weights(unet_dir, unet_state_dict(params), "float32", "diffusion_pytorch_model")

    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), SCHEDULER_CONFIG)
    write_json(
        os.path.join(folder, "model_index.json"),
        {
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    with open(os.path.join(folder, "components_metrics.json"), "w") as f:
        json.dump({"text_encoder": text_encoder.metrics, "vae": vae.metrics}, f, indent=2)
    return folder
