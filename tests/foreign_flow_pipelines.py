"""FLUX and SD3 pipelines sized like the dummy pipelines of diffusers' own test suite (built offline).

No one on the jdistill team chose these sizes or options; they are the facts of diffusers' tests
(``tests/pipelines/flux/test_pipeline_flux.py``, ``tests/pipelines/stable_diffusion_3/
test_pipeline_stable_diffusion_3.py`` and the SD3.5 transformer of ``tests/models/transformers/
test_models_transformer_sd3.py``) and of hf-internal-testing/tiny-random-t5, rebuilt here without a download:

* FLUX: patch_size 1 with 4 input channels (one latent channel packed 2x2), one joint and one single block,
  2 heads of 16, rope axes (4, 4, 8); with and without the guidance embedder.
* SD3: patch_size 1, 4 latent channels, one joint block (the context-pre-only last block alone), 4 heads of 8,
  the default 96-wide position-embedding table; SD3.5: 4 blocks, RMS QK norm, a dual-attention first block.
* CLIP text encoders: width 32, 5 layers, vocab 1000, 77 positions, the legacy ``eos_token_id == 2`` config
  (pooling at the argmax of the ids), with a projection of 32 for SD3.
* T5: tiny-random-t5's encoder: d_model 32, d_kv 8, 4 heads, d_ff 37, 5 layers, vocab 1103, T5 v1.0 ReLU
  feed-forward, 8 relative-attention buckets, initializer factor 0.002: the defaults of transformers'
  T5ModelTester (which made that checkpoint) and the numbers a port of the checkpoint's config records.
* VAE: one block of 4 channels (no down-sampling), GroupNorm with a single group, no quant convs, latent
  shift 0.0609 and scale 1.5035.

The tokenizers differ from the team's test tokenizers (tests/tiny_pipeline.py, tests/tiny_flow_pipeline.py):
a byte-level CLIP BPE with merges and 77 positions, and a SentencePiece-style T5 unigram with metaspace pieces.
Every weight is jittered so that small or zero initial values do not hide a mistake.
"""

from __future__ import annotations

import pathlib

import torch

CLIP_POSITIONS = 77  # CLIPTextConfig's default, which diffusers' dummy config leaves alone
T5_LENGTH = 48  # the max_sequence_length of diffusers' FLUX dummy inputs
SD3_DUAL = dict(qk_norm="rms_norm", dual_attention_layers=(0,))


def jitter(model: torch.nn.Module, seed: int, scale: float = 0.03) -> torch.nn.Module:
    """Add Gaussian noise to every parameter, norms included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (bytes that print as themselves keep their character)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


# Merges a BPE learns first on English captions, written in CLIP's "</w>" end-of-word convention.
_MERGES = [
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("i", "n"),
    ("in", "g</w>"),
    ("o", "n</w>"),
    ("e", "r</w>"),
    ("o", "f</w>"),
    ("a", "t</w>"),
    ("s", "q"),
    ("sq", "u"),
    ("squ", "i"),
    ("squi", "r"),
    ("squir", "r"),
    ("b", "u"),
    ("bu", "r"),
    ("p", "a"),
    ("pa", "in"),
    ("b", "e"),
    ("be", "r"),
]


def clip_tokenizer():
    """A byte-level CLIP BPE with merges (about 560 tokens, below the encoders' 1000) and 77 positions."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet)]
    tokens += ["".join(m) for m in _MERGES if "".join(m) not in tokens]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1} | {t: i + 2 for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=list(_MERGES), model_max_length=CLIP_POSITIONS)


def t5_tokenizer():
    """A SentencePiece-style unigram (metaspace "▁" word starts, T5's pad/eos/unk ids 0/1/2) whose pieces
    split words into sub-words, with diffusers' 48-token length."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    words = ["▁a", "▁painting", "▁of", "▁squirrel", "▁eating", "▁burger", "▁photo", "▁cat", "▁dog", "▁the"]
    pieces += [(w, -2.0 - 0.1 * i) for i, w in enumerate(words)]
    pieces += [(s, -4.0) for s in ["▁", "ing", "er", "s", "ed", "paint", "eat", "burg"]]
    pieces += [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=T5_LENGTH,
        extra_ids=0,
    )


def clip_encoder(projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,  # transformers' legacy value: pooling at the argmax of the ids
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        layer_norm_eps=1e-5,
        vocab_size=1000,
        hidden_act="gelu",
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return jitter(model, seed)


def t5_encoder(seed: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=1103,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=5,
        num_decoder_layers=5,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="relu",
        layer_norm_epsilon=1e-6,
        initializer_factor=0.002,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return jitter(T5EncoderModel(config), seed)


def vae(latent_channels: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return jitter(
        AutoencoderKL(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(4,),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=1,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        ),
        seed,
    )


def save_flux(path: pathlib.Path, *, guidance: bool = False) -> pathlib.Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(10)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance,
        axes_dims_rope=[4, 4, 8],
    )
    FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(1, 11),
        text_encoder=clip_encoder(False, 12),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5_encoder(13),
        tokenizer_2=t5_tokenizer(),
        transformer=jitter(transformer, 14),
    ).save_pretrained(path)
    return path


def save_sd3(path: pathlib.Path, *, sd35: bool = False) -> pathlib.Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(20)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=4 if sd35 else 1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=96,
        **(SD3_DUAL if sd35 else {}),
    )
    StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(4, 21),
        text_encoder=clip_encoder(True, 22),
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip_encoder(True, 23),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(24),
        tokenizer_3=t5_tokenizer(),
        transformer=jitter(transformer, 25),
    ).save_pretrained(path)
    return path


BUILDERS = {
    "flux": lambda path: save_flux(path),
    "flux_guidance": lambda path: save_flux(path, guidance=True),
    "sd3": lambda path: save_sd3(path),
    "sd35": lambda path: save_sd3(path, sd35=True),
}
