"""The flow digits teacher's components before its transformer is trained: a FluxPipeline directory.

- CLIP tokenizer and text encoder: the digits world's own (``jdistill/assets/digits/teacher``), copied. Its
  pooled output was trained to name the caption's digit and colour, which is exactly what FLUX reads from
  CLIP (the pooled projection modulating every block), so there is nothing to retrain.
- T5 tokenizer: a ``T5TokenizerFast`` over a unigram vocabulary of the captions' whole words (plus T5's pad,
  end and unknown tokens), ``</s>`` appended as T5's tokenizer does.
- T5 encoder: a tiny gated-GELU ``T5EncoderModel``, trained like the CLIP encoder (``components.
  train_text_encoder``): two linear heads on the mean of its output states over all positions, padding
  included (FluxPipeline passes no attention mask) must name the caption's digit and colour. Trained rather
  than random because a number word and its numeral ("seven", "7") must read alike: the transformer then
  learns one mapping from the sequence it attends to, not two.
- VAE: a 16-channel ``AutoencoderKL`` (32x32x3 <-> 8x8x16, no quant convs, as FLUX's), trained by
  ``components.train_vae``; ``shift_factor`` and ``scaling_factor`` from the latents' mean and std (FLUX's
  convention: (z - shift) * scale).
- Transformer: a tiny ``FluxTransformer2DModel`` (placeholder weights; the ``sft`` preset ``digits_flux``
  trains it from its own initialisation). 8x8 latents pack 2x2 into 16 tokens of 64 channels.
  No guidance embedding (``guidance_embeds`` False, FLUX.1-schnell's shape): the transformer is trained by
  plain flow matching with 10% of captions dropped and sampled with true CFG against the empty prompt
  (FluxPipeline's ``true_cfg_scale``), as the digits UNet is. A FLUX.1-dev/lite-shaped teacher (guidance as
  an input, one pass per step) would need a second training stage that distils this CFG into a guidance
  embedding; jdistill has no such method yet, and a guidance embedding trained without it would not know
  what its input means. Recipes on this world therefore see a true-CFG teacher, as on SD3.
- Scheduler: ``FlowMatchEulerDiscreteScheduler`` with a static shift (``SCHEDULER_CONFIG``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdistill.convert.export import save_weights, write_json
from jdistill.convert.flux import flux_state_dict
from jdistill.convert.t5 import t5_state_dict
from jdistill.digits import data
from jdistill.digits.components import VAE_CONFIG, Trained, _adam_loop, write_vae
from jdistill.models.flux import FluxConfig, flux_net
from jdistill.models.t5 import T5Config, t5_net
from jdistill.teachers.presets import DIGITS_TEACHER

T5_LENGTH = 16  # the longest caption is 8 words; with </s> 9 tokens
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"

T5_CONFIG = dict(
    d_model=64,
    d_kv=16,
    num_heads=4,
    d_ff=128,
    num_layers=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    feed_forward_proj="gated-gelu",
)
# The UNet world's VAE with 16 latent channels, a shift factor and no quant convolutions, as FLUX's.
VAE16_CONFIG = dataclasses.replace(
    VAE_CONFIG,
    latent_channels=16,
    shift_factor=0.0,  # set from the latents by train_vae
    use_quant_conv=False,
    use_post_quant_conv=False,
)
TRANSFORMER_CONFIG = FluxConfig(
    in_channels=64,  # 16 latent channels packed 2x2
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=3,
    joint_attention_dim=T5_CONFIG["d_model"],
    pooled_projection_dim=64,  # the digits CLIP encoder's width (its pooler output)
    guidance_embeds=False,  # true CFG against the empty prompt, trained with caption dropout
    axes_dims_rope=(8, 12, 12),
)
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def caption_words() -> list[str]:
    """Every word of every caption, sorted (the T5 vocabulary after the special tokens)."""
    return sorted({w for text in data.corpus() for w in text.split()})


def t5_tokenizer():
    """The T5 tokenizer: whole caption words as sentencepiece-style pieces ("▁seven"), anything else
    ``<unk>``; ids 0, 1, 2 are pad, end and unknown as in T5's vocabulary, no sentinel tokens. Built through
    ``T5TokenizerFast(vocab=...)`` so that it reloads as the same tokenizer (transformers rebuilds a T5
    tokenizer from its vocabulary, with its own whitespace and metaspace pre-tokenizers)."""
    from transformers import T5TokenizerFast

    # Equal scores: a word in the vocabulary is always one piece (one piece beats any split of it).
    vocab = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0), *(("▁" + w, -1.0) for w in caption_words())]
    return T5TokenizerFast(
        vocab=vocab, eos_token=EOS, pad_token=PAD, unk_token=UNK, extra_ids=0, model_max_length=T5_LENGTH
    )


def t5_config(vocab_size: int) -> T5Config:
    return T5Config(vocab_size=vocab_size, **T5_CONFIG)


def train_t5(tokenizer, steps: int = 600, batch: int = 128, seed: int = 0) -> Trained:
    config = t5_config(len(tokenizer))
    net = t5_net(config)
    key = jax.random.key(seed)
    n_colours = len(data.COLOUR_NAMES)
    heads = {
        "digit": jax.random.normal(jax.random.fold_in(key, 1), (config.d_model, 10)) * 0.02,
        "colour": jax.random.normal(jax.random.fold_in(key, 2), (config.d_model, n_colours)) * 0.02,
    }
    params = {"encoder": net.init(key), "heads": heads}
    rng = np.random.default_rng(seed + 2)

    def batches(i):
        digits = rng.integers(0, 10, batch)
        colours = rng.integers(0, n_colours, batch)
        texts = data.random_captions(rng, digits, colours)
        ids = tokenizer(texts, padding="max_length", max_length=T5_LENGTH, truncation=True)["input_ids"]
        return np.asarray(ids, np.int32), digits, colours

    def logits(p, ids):
        pooled = jnp.mean(
            net.apply(p["encoder"], ids), axis=1
        )  # every position, as the transformer sees them
        return pooled @ p["heads"]["digit"], pooled @ p["heads"]["colour"]

    def loss(p, b, key):
        ids, digits, colours = b
        d, c = logits(p, ids)
        ce = optax.softmax_cross_entropy_with_integer_labels
        return jnp.mean(ce(d, digits)) + jnp.mean(ce(c, colours))

    params, history = _adam_loop(loss, params, steps, 1e-3, batches, seed)
    ids, digits, colours = batches(steps)
    d, c = logits(params, ids)
    ok = (np.asarray(d).argmax(-1) == digits) & (np.asarray(c).argmax(-1) == colours)
    return Trained(net, params["encoder"], config, {"loss": history, "caption_accuracy": float(np.mean(ok))})


def write_flux_pipeline(
    folder: str, t5: Trained, vae: Trained, seed: int = 0, clip_source: str = DIGITS_TEACHER
) -> str:
    """A FluxPipeline directory: the digits CLIP tokenizer and encoder (copied from ``clip_source``), the
    trained T5 and VAE, an untrained transformer and the flow scheduler."""
    if os.path.exists(folder) and os.listdir(folder):
        raise FileExistsError(f"{folder} exists and is not empty")
    for part in ("tokenizer", "text_encoder"):
        if not os.path.isdir(os.path.join(clip_source, part)):
            raise FileNotFoundError(f"{clip_source} has no {part}/: the digits world's teacher is missing")
        shutil.copytree(os.path.join(clip_source, part), os.path.join(folder, part))

    t5_tokenizer().save_pretrained(os.path.join(folder, "tokenizer_2"))
    te2 = os.path.join(folder, "text_encoder_2")
    os.makedirs(te2, exist_ok=True)
    t5_json = {
        **t5.config.to_dict(),
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "torch_dtype": "float32",
    }
    write_json(os.path.join(te2, "config.json"), t5_json)
    save_weights(te2, t5_state_dict(t5.params), "float32", "model")

    write_vae(folder, vae)

    # Placeholder weights of the right shapes: the sft preset starts from its own initialisation.
    tr = os.path.join(folder, "transformer")
    os.makedirs(tr, exist_ok=True)
    write_json(
        os.path.join(tr, "config.json"),
        {"_class_name": "FluxTransformer2DModel", **TRANSFORMER_CONFIG.to_dict()},
    )
    params = flux_net(TRANSFORMER_CONFIG).init(jax.random.key(seed))
    save_weights(tr, flux_state_dict(params), "float32", "diffusion_pytorch_model")

    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), SCHEDULER_CONFIG)
    write_json(os.path.join(folder, "model_index.json"), MODEL_INDEX)
    with open(os.path.join(folder, "components_metrics.json"), "w") as f:
        json.dump({"text_encoder_2": t5.metrics, "vae": vae.metrics}, f, indent=2)
    return folder
