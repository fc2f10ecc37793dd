"""Tiny random FLUX and SD3 pipelines saved as diffusers directories, built offline for the conversion tests.

Their sizes and options differ from the model tests' (tests/test_flux.py, test_sd3.py, test_t5.py): the
conversion tool must work on pipelines it was not tuned on.
"""

from __future__ import annotations

import pathlib

import tiny_configs
import torch
from tiny_pipeline import _randomize, text_encoder, tiny_tokenizer


def t5_tokenizer():
    """A T5TokenizerFast over a small unigram vocabulary of whole words (no sentencepiece model, no
    download); T5's own tokenizer is a unigram model too, so it saves and reloads as one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    words = [
        "<pad>",
        "</s>",
        "<unk>",
        *["a", "an", "the", "red", "blue", "green", "circle", "square", "digit", "on", "of"],
        *"0123456789",
    ]
    tok = Tokenizer(models.Unigram([(w, -1.0) for w in words], unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def t5_encoder(gated: bool = True, width: int = 24):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        **tiny_configs.t5(
            vocab_size=40,
            d_model=width,
            d_kv=6,
            d_ff=40,
            relative_attention_num_buckets=6,
            relative_attention_max_distance=12,
            feed_forward_proj="gated-gelu" if gated else "relu",
            decoder_start_token_id=0,
        )
    )
    return _randomize(T5EncoderModel(config), 0.2)


def vae16():
    from diffusers import AutoencoderKL

    return _randomize(
        AutoencoderKL(
            **tiny_configs.vae(
                block_out_channels=(32, 32),
                latent_channels=16,
                norm_num_groups=16,
                scaling_factor=0.5,
                shift_factor=0.1,
                use_quant_conv=False,
                use_post_quant_conv=False,
            )
        )
    )


def save_flux_pipeline(path: pathlib.Path, *, guidance: bool = True) -> pathlib.Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(1)
    transformer = FluxTransformer2DModel(
        **tiny_configs.flux(
            in_channels=64,  # 16 latent channels packed 2x2
            num_layers=1,
            attention_head_dim=24,
            num_attention_heads=3,
            joint_attention_dim=24,
            pooled_projection_dim=32,
            guidance_embeds=guidance,
            axes_dims_rope=(8, 8, 8),
        )
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=vae16(),
        text_encoder=text_encoder(tiny_tokenizer()),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=t5_encoder(),
        tokenizer_2=t5_tokenizer(),
        transformer=_randomize(transformer, 0.1),
    )
    pipe.save_pretrained(path)
    return path


def save_sd3_pipeline(path: pathlib.Path, *, sd35: bool = True) -> pathlib.Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(2)
    options = dict(qk_norm="rms_norm", dual_attention_layers=(0,)) if sd35 else {}
    transformer = SD3Transformer2DModel(
        **tiny_configs.sd3(
            in_channels=16,
            attention_head_dim=12,
            joint_attention_dim=72,  # T5's width, above the two CLIP encoders' 64 (SD3 pads CLIP up to it)
            caption_projection_dim=24,
            pooled_projection_dim=64,  # the two CLIP encoders' pooled outputs, concatenated
            out_channels=16,
            pos_embed_max_size=12,
            **options,
        )
    )
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae16(),
        text_encoder=text_encoder(tiny_tokenizer(), projection=32),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=text_encoder(tiny_tokenizer(), projection=32),
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=t5_encoder(gated=False, width=72),
        tokenizer_3=t5_tokenizer(),
        transformer=_randomize(transformer, 0.1),
    )
    pipe.save_pretrained(path)
    return path


def save_flow_pipelines(root: pathlib.Path, prompts: list[str]) -> dict[str, pathlib.Path]:
    """A FLUX pipeline and an SD3.5 one under ``root``, by the teacher preset they stand for, and a prompt file
    of ``prompts`` (key "prompts")."""
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return {
        "flux_dev": save_flux_pipeline(root / "flux"),
        "sd35_medium": save_sd3_pipeline(root / "sd3"),
        "prompts": root / "prompts.txt",
    }
