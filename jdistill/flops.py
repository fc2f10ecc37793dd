"""Analytic FLOP counts of the networks' forward passes, by hand from their configurations.

These are the independent side of ``tools/plan.py``'s check: the plan reads a step's FLOPs from XLA's cost
analysis and compares them with these counts times the recipe's declared passes (``methods.recipe.Pass``).
Counted: every matrix product, convolution and attention product at 2 FLOPs per multiply-add, per sample;
not counted: normalisations, activations and other elementwise work (a few percent of XLA's count).
"""

from __future__ import annotations

from jdistill.models.clip import CLIPTextConfig
from jdistill.models.unet import UNetConfig, _layer_depths
from jdistill.models.vae import AutoencoderKLConfig


def conv(cin: int, cout: int, kernel: int, h: int, w: int) -> float:
    """A convolution producing an (h, w) output."""
    return 2.0 * kernel * kernel * cin * cout * h * w


def linear(din: int, dout: int, tokens: int) -> float:
    return 2.0 * din * dout * tokens


def attention_core(queries: int, keys: int, inner: int) -> float:
    """softmax(Q K^T) V over all heads: two products of (queries x keys x inner)."""
    return 4.0 * queries * keys * inner


def _resnet(cin: int, cout: int, temb: int, h: int, w: int) -> float:
    flops = conv(cin, cout, 3, h, w) + conv(cout, cout, 3, h, w) + linear(temb, cout, 1)
    return flops + (conv(cin, cout, 1, h, w) if cin != cout else 0.0)


def _projections(c: int, context_dim: int, context_len: int, depth: int, h: int, w: int) -> float:
    """The attention projections (to_q, to_k, to_v, to_out.0) of a transformer: LoRA's default targets."""
    tokens = h * w
    return depth * (
        4 * linear(c, c, tokens) + 2 * linear(c, c, tokens) + 2 * linear(context_dim, c, context_len)
    )


def _transformer(c: int, context_dim: int, context_len: int, depth: int, h: int, w: int) -> float:
    tokens = h * w
    flops = 2 * linear(c, c, tokens)  # proj_in, proj_out (1x1 convolutions or linears: the same count)
    for _ in range(depth):
        flops += 4 * linear(c, c, tokens) + attention_core(tokens, tokens, c)  # self-attention
        flops += 2 * linear(c, c, tokens) + 2 * linear(
            context_dim, c, context_len
        )  # cross-attention q, out; k, v
        flops += attention_core(tokens, context_len, c)
        flops += linear(c, 8 * c, tokens) + linear(4 * c, c, tokens)  # GEGLU feed-forward
    return flops


def unet_forward(
    cfg: UNetConfig,
    height: int,
    width: int,
    context_len: int = 77,
    *,
    projections_only: bool = False,
    trunk: bool = False,
) -> float:
    """One sample through diffusers' ``UNet2DConditionModel`` on (height, width) latents; with
    ``projections_only``, just its attention projections (what a LoRA on them must differentiate); with
    ``trunk``, only up to the mid block's output."""
    if projections_only:
        return _unet_walk(
            cfg, height, width, context_len, _projections, lambda *a: 0.0, lambda *a: 0.0, trunk
        )
    return _unet_walk(cfg, height, width, context_len, _transformer, _resnet, conv, trunk)


def _unet_walk(
    cfg: UNetConfig, height: int, width: int, context_len: int, transformer, resnet, conv, trunk: bool
) -> float:
    ch = cfg.block_out_channels
    n = len(ch)
    temb = 4 * ch[0]
    flops = conv(cfg.in_channels, ch[0], 3, height, width)
    if resnet is _resnet:  # the embeddings' linears
        flops += linear(ch[0], temb, 1) + linear(temb, temb, 1)
        if cfg.time_cond_proj_dim:
            flops += linear(cfg.time_cond_proj_dim, ch[0], 1)
        if cfg.addition_embed_type == "text_time":
            flops += linear(cfg.projection_class_embeddings_input_dim, temb, 1) + linear(temb, temb, 1)
    depths = _layer_depths(cfg.transformer_layers_per_block, n, cfg.layers_per_block)
    h, w = height, width
    skips = [ch[0]]
    for i, kind in enumerate(cfg.down_block_types):
        cin = ch[max(i - 1, 0)]
        for j in range(cfg.layers_per_block):
            flops += resnet(cin if j == 0 else ch[i], ch[i], temb, h, w)
            if kind == "CrossAttnDownBlock2D":
                flops += transformer(ch[i], cfg.cross_attention_dim, context_len, depths[i][j], h, w)
            skips.append(ch[i])
        if i < n - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            flops += conv(ch[i], ch[i], 3, h, w)
            skips.append(ch[i])
    flops += 2 * resnet(ch[-1], ch[-1], temb, h, w)
    flops += transformer(ch[-1], cfg.cross_attention_dim, context_len, depths[-1][0], h, w)
    if trunk:
        return flops
    rch = ch[::-1]
    if cfg.reverse_transformer_layers_per_block is not None:
        up_depths = _layer_depths(cfg.reverse_transformer_layers_per_block, n, cfg.layers_per_block + 1)
    else:
        up_depths = _layer_depths(
            tuple(reversed(cfg.per_block(cfg.transformer_layers_per_block))), n, cfg.layers_per_block + 1
        )
    prev = rch[0]
    for i, kind in enumerate(cfg.up_block_types):
        for j in range(cfg.layers_per_block + 1):
            skip = skips.pop()
            flops += resnet((prev if j == 0 else rch[i]) + skip, rch[i], temb, h, w)
            if kind == "CrossAttnUpBlock2D":
                flops += transformer(rch[i], cfg.cross_attention_dim, context_len, up_depths[i][j], h, w)
        prev = rch[i]
        if i < n - 1:
            h, w = 2 * h, 2 * w
            flops += conv(rch[i], rch[i], 3, h, w)
    return flops + conv(ch[0], cfg.out_channels, 3, h, w)


def clip_text_forward(cfg: CLIPTextConfig, tokens: int, *, projection: bool = False) -> float:
    """One prompt of ``tokens`` tokens through a CLIP text encoder (all layers; plus the projection)."""
    d = cfg.hidden_size
    per_layer = 4 * linear(d, d, tokens) + attention_core(tokens, tokens, d)
    per_layer += linear(d, cfg.intermediate_size, tokens) + linear(cfg.intermediate_size, d, tokens)
    return cfg.num_hidden_layers * per_layer + (linear(d, cfg.projection_dim, 1) if projection else 0.0)


def _vae_resnet(cin: int, cout: int, h: int, w: int) -> float:
    flops = conv(cin, cout, 3, h, w) + conv(cout, cout, 3, h, w)
    return flops + (conv(cin, cout, 1, h, w) if cin != cout else 0.0)


def _vae_mid(c: int, h: int, w: int) -> float:
    tokens = h * w
    return 2 * _vae_resnet(c, c, h, w) + 4 * linear(c, c, tokens) + attention_core(tokens, tokens, c)


def vae_encode(cfg: AutoencoderKLConfig, height: int, width: int) -> float:
    """One image through the VAE's encoder and ``quant_conv`` (pixels -> latent moments)."""
    ch = cfg.block_out_channels
    h, w = height, width
    flops = conv(cfg.in_channels, ch[0], 3, h, w)
    for i in range(len(ch)):
        for j in range(cfg.layers_per_block):
            flops += _vae_resnet(ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i], h, w)
        if i < len(ch) - 1:
            h, w = h // 2, w // 2
            flops += conv(ch[i], ch[i], 3, h, w)
    flops += _vae_mid(ch[-1], h, w)
    moments = 2 * cfg.latent_channels
    return flops + conv(ch[-1], moments, 3, h, w) + conv(moments, moments, 1, h, w)


def vae_decode(cfg: AutoencoderKLConfig, height: int, width: int) -> float:
    """(height, width) latents through ``post_quant_conv`` and the decoder, to pixels."""
    ch = cfg.block_out_channels[::-1]
    h, w = height, width
    z = cfg.latent_channels
    flops = conv(z, z, 1, h, w) + conv(z, ch[0], 3, h, w) + _vae_mid(ch[0], h, w)
    for i in range(len(ch)):
        for j in range(cfg.layers_per_block + 1):
            flops += _vae_resnet(ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i], h, w)
        if i < len(ch) - 1:
            h, w = 2 * h, 2 * w
            flops += conv(ch[i], ch[i], 3, h, w)
    return flops + conv(ch[-1], cfg.out_channels, 3, h, w)


# ------------------------------------------------------------------------------------------------ transformers


def _time_text_embedding(dim: int, pooled: int, guidance: bool) -> float:
    """Timestep (and guidance) MLPs on 256 sinusoidal features, and the pooled-text MLP: one token each."""
    mlps = 2 + (1 if guidance else 0)
    return (
        (mlps - 1) * (linear(256, dim, 1) + linear(dim, dim, 1))
        + linear(pooled, dim, 1)
        + linear(dim, dim, 1)
    )


def flux_forward(cfg, image_tokens: int, text_tokens: int = 512) -> float:
    """One sample through diffusers' ``FluxTransformer2DModel`` (``cfg`` a ``FluxConfig``) on
    ``image_tokens`` packed latent tokens (a 1024 px image: 64 x 64 = 4096) and ``text_tokens`` T5 tokens."""
    d, n, t = cfg.inner_dim, image_tokens, text_tokens
    length = n + t
    flops = linear(cfg.in_channels, d, n) + linear(cfg.joint_attention_dim, d, t)
    flops += _time_text_embedding(d, cfg.pooled_projection_dim, cfg.guidance_embeds)
    double = 2 * linear(d, 6 * d, 1)  # AdaLN-Zero of both streams
    double += 3 * linear(d, d, n) + 3 * linear(d, d, t) + attention_core(length, length, d)
    double += linear(d, d, n) + linear(d, d, t)  # to_out, to_add_out
    double += linear(d, 4 * d, n) + linear(4 * d, d, n) + linear(d, 4 * d, t) + linear(4 * d, d, t)
    single = linear(d, 3 * d, 1) + 3 * linear(d, d, length) + attention_core(length, length, d)
    single += linear(d, 4 * d, length) + linear(5 * d, d, length)  # proj_mlp; proj_out of [attn, mlp]
    flops += cfg.num_layers * double + cfg.num_single_layers * single
    return flops + linear(d, 2 * d, 1) + linear(d, cfg.output_channels, n)


def t5_encoder_forward(cfg, tokens: int) -> float:
    """One sequence of ``tokens`` through transformers' ``T5EncoderModel`` (``cfg`` a ``T5Config``)."""
    inner = cfg.num_heads * cfg.d_kv
    gated = cfg.feed_forward_proj.startswith("gated")
    layer = 3 * linear(cfg.d_model, inner, tokens) + linear(inner, cfg.d_model, tokens)
    layer += attention_core(tokens, tokens, inner)
    layer += (2 if gated else 1) * linear(cfg.d_model, cfg.d_ff, tokens) + linear(
        cfg.d_ff, cfg.d_model, tokens
    )
    return cfg.num_layers * layer


def sd3_forward(cfg, height: int, width: int, text_tokens: int = 333) -> float:
    """One sample through diffusers' ``SD3Transformer2DModel`` (``cfg`` an ``SD3Config``) on (height, width)
    latents and ``text_tokens`` joint context tokens (77 CLIP + 256 T5 in the SD3 pipeline)."""
    d, p, t = cfg.inner_dim, cfg.patch_size, text_tokens
    n = (height // p) * (width // p)
    length = n + t
    flops = conv(cfg.in_channels, d, p, height // p, width // p) + linear(cfg.joint_attention_dim, d, t)
    flops += _time_text_embedding(d, cfg.pooled_projection_dim, False)
    mlp = linear(d, 4 * d, n) + linear(4 * d, d, n)
    for i in range(cfg.num_layers):
        last, dual = i == cfg.num_layers - 1, i in tuple(cfg.dual_attention_layers)
        flops += linear(d, (9 if dual else 6) * d, 1) + linear(
            d, (2 if last else 6) * d, 1
        )  # AdaLN of both streams
        flops += (
            3 * linear(d, d, n) + 3 * linear(d, d, t) + attention_core(length, length, d) + linear(d, d, n)
        )
        if dual:  # the image stream's second self-attention
            flops += 4 * linear(d, d, n) + attention_core(n, n, d)
        flops += mlp
        if not last:  # the context stream's output projection and feed-forward
            flops += linear(d, d, t) + linear(d, 4 * d, t) + linear(4 * d, d, t)
    return flops + linear(d, 2 * d, 1) + linear(d, p * p * cfg.out_channels, n)
