"""Tiny diffusers pipelines with random weights, written to disk like a hub checkpoint (tests only)."""

from __future__ import annotations

import pathlib

import tiny_configs
import torch

TOKEN_LENGTH = 16


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, the base alphabet of CLIP's BPE."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def tiny_tokenizer():
    """A CLIPTokenizer over single characters (no merges): works offline, 514 tokens."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TOKEN_LENGTH)


def _randomize(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Replace zero-initialised layers too, so that every weight matters in comparisons."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(
                ("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "layer_norm.weight")
            ):
                continue
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def text_encoder(tokenizer, hidden: int = 32, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=600,
        max_position_embeddings=TOKEN_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection or hidden,
        hidden_act="gelu",
    )
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return _randomize(model)


def vae():
    from diffusers import AutoencoderKL

    return _randomize(AutoencoderKL(**tiny_configs.vae(norm_num_groups=32)))


def unet(xl: bool = False, **overrides):
    from diffusers import UNet2DConditionModel

    kw = tiny_configs.unet()
    if xl:
        kw.update(
            cross_attention_dim=64,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        )
    kw.update(overrides)
    return _randomize(UNet2DConditionModel(**kw), 0.1)


def save_sd_pipeline(
    path: pathlib.Path, *, prediction_type: str = "epsilon", **unet_overrides
) -> pathlib.Path:
    """A StableDiffusionPipeline directory (safetensors) with tiny random components."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tok = tiny_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=vae(),
        text_encoder=text_encoder(tok),
        tokenizer=tok,
        unet=unet(**unet_overrides),
        scheduler=DDIMScheduler(
            **tiny_configs.SD_BETAS,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type=prediction_type,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def save_sdxl_pipeline(path: pathlib.Path) -> pathlib.Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tok = tiny_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=vae(),
        text_encoder=text_encoder(tok),
        text_encoder_2=text_encoder(tok, projection=32),
        tokenizer=tok,
        tokenizer_2=tiny_tokenizer(),
        unet=unet(xl=True),
        scheduler=EulerDiscreteScheduler(**tiny_configs.SD_BETAS, steps_offset=1),
    )
    pipe.save_pretrained(path)
    return path
