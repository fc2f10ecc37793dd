"""Tiny model configurations shared by the tests, as keyword arguments in diffusers' / transformers' names
(which jdistill's configs read too). Each builder's keywords override its defaults: a test names only what
it sizes otherwise, and the pipelines built to differ from the model tests (tiny_flow_pipeline.py,
foreign_flow_pipelines.py) say plainly how they differ.

Plain dicts, no torch or jax import: benchmarks/compile_depth.py reads them too.
"""

from __future__ import annotations

from typing import Any

# Stable Diffusion's training noise schedule, as diffusers' schedulers take it.
SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def flux(**overrides: Any) -> dict[str, Any]:
    """A FluxTransformer2DModel of two double and two single blocks, two heads of 16."""
    return {
        "in_channels": 16,  # 4 latent channels packed 2x2
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 24,
        "axes_dims_rope": (4, 6, 6),
        **overrides,
    }


def sd3(**overrides: Any) -> dict[str, Any]:
    """An SD3Transformer2DModel of three blocks, two heads of 8, over 4-channel latents."""
    return {
        "sample_size": 16,
        "patch_size": 2,
        "in_channels": 4,
        "num_layers": 3,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 24,
        "caption_projection_dim": 16,
        "pooled_projection_dim": 12,
        "out_channels": 4,
        "pos_embed_max_size": 16,
        **overrides,
    }


def t5(**overrides: Any) -> dict[str, Any]:
    """A T5 encoder of three layers, four heads of 8, d_model 32."""
    return {
        "vocab_size": 100,
        "d_model": 32,
        "d_kv": 8,
        "num_heads": 4,
        "d_ff": 48,
        "num_layers": 3,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 16,
        **overrides,
    }


def unet(**overrides: Any) -> dict[str, Any]:
    """An SD1.x-style UNet2DConditionModel of two levels (32 and 64 channels), cross-attention at the first."""
    return {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "sample_size": 16,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        **overrides,
    }


def vae(**overrides: Any) -> dict[str, Any]:
    """An AutoencoderKL of two blocks (32 and 64 channels), one layer each, 4 latent channels; a plain
    encoder and decoder block for each entry of ``block_out_channels``."""
    kw = {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 32,
        **overrides,
    }
    blocks = len(kw["block_out_channels"])
    return {
        "down_block_types": ("DownEncoderBlock2D",) * blocks,
        "up_block_types": ("UpDecoderBlock2D",) * blocks,
        **kw,
    }
