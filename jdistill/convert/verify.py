"""Check converted pipeline components against their PyTorch twins on the same random inputs.

Each component runs once in diffusers/transformers (float32, CPU) and once in jdistill; every output is
compared by its maximum absolute error and that error relative to the largest reference magnitude. The torch
twin is built from the original source, so the check covers the conversion and whatever form the converted
weights were stored in. Components are checked one at a time to bound host memory (full-size SDXL: about
twice the UNet's float32 size at the peak).
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class OutputError:
    component: str
    output: str
    max_abs: float
    max_rel: float  # max |ours - ref| / max |ref|


def compare(component: str, output: str, ours, ref) -> OutputError:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"{component}.{output}: shape {ours.shape} vs reference {ref.shape}")
    diff = float(np.abs(ours - ref).max())
    return OutputError(component, output, diff, diff / max(float(np.abs(ref).max()), 1e-30))


def _nhwc(x: np.ndarray) -> jax.Array:
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def _nchw(x) -> np.ndarray:
    return np.asarray(x, np.float32).transpose(0, 3, 1, 2)


def _torch_twin(cls_name: str, name: str, src: str, variant: str | None, allow_pickle: bool):
    import diffusers
    import torch
    import transformers

    kwargs = dict(subfolder=name, variant=variant, use_safetensors=not allow_pickle)
    cls = getattr(diffusers, cls_name, None) or getattr(transformers, cls_name)
    return cls.from_pretrained(src, torch_dtype=torch.float32, **kwargs).eval()


def _unet_errors(component, model, rng) -> list[OutputError]:
    import torch

    cfg = dict(model.config)
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    size = 2 * factor
    x = rng.standard_normal((1, cfg["in_channels"], size, size)).astype(np.float32)
    t = np.array([500])
    ctx = rng.standard_normal((1, 8, cfg["cross_attention_dim"])).astype(np.float32)
    cond = {"encoder_hidden_states": ctx}
    extra = {}
    if cfg.get("addition_embed_type") == "text_time":
        width = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        cond["text_embeds"] = rng.standard_normal((1, width)).astype(np.float32)
        cond["time_ids"] = np.array([[size * 8, size * 8, 0, 0, size * 8, size * 8]], np.float32)
        extra["added_cond_kwargs"] = {k: torch.from_numpy(cond[k]) for k in ("text_embeds", "time_ids")}
    if cfg.get("time_cond_proj_dim"):
        cond["timestep_cond"] = rng.standard_normal((1, cfg["time_cond_proj_dim"])).astype(np.float32)
        extra["timestep_cond"] = torch.from_numpy(cond["timestep_cond"])
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), **extra).sample.numpy()
    net, params = component.net, component.params
    ours = jax.jit(net.apply)(params, _nhwc(x), jnp.asarray(t), jax.tree.map(jnp.asarray, cond))
    return [compare("unet", "sample", _nchw(ours), ref)]


def _vae_errors(component, model, rng) -> list[OutputError]:
    import torch
    from flax import nnx

    cfg = dict(model.config)
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    x = rng.uniform(-1, 1, (1, cfg["in_channels"], 4 * factor, 4 * factor)).astype(np.float32)
    z = rng.standard_normal((1, cfg["latent_channels"], 4, 4)).astype(np.float32)

    @jax.jit
    def run(params, x, z):
        vae = nnx.merge(component.net.graphdef, params)
        post = vae.encode(x)
        return post.mean, post.logvar, vae.decode(z)

    mean, logvar, decoded = run(component.params, _nhwc(x), _nhwc(z))
    with torch.no_grad():
        post = model.encode(torch.from_numpy(x)).latent_dist
        ref_decoded = model.decode(torch.from_numpy(z)).sample
    return [
        compare("vae", "latent_mean", _nchw(mean), post.mean.numpy()),
        compare("vae", "latent_logvar", _nchw(logvar), post.logvar.numpy()),
        compare("vae", "decode", _nchw(decoded), ref_decoded.numpy()),
    ]


def _text_errors(name, component, model, rng) -> list[OutputError]:
    import torch

    cfg = model.config
    length = min(cfg.max_position_embeddings, 77)
    ids = rng.integers(0, cfg.vocab_size, (2, length)).astype(np.int32)
    ids[:, -1] = cfg.eos_token_id if 0 <= cfg.eos_token_id < cfg.vocab_size else cfg.vocab_size - 1
    with torch.no_grad():
        ref = model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    run = jax.jit(component.net.apply, static_argnames="output_hidden_states")
    out = run(component.params, jnp.asarray(ids), output_hidden_states=True)
    errors = [
        compare(name, "last_hidden_state", out.last_hidden_state, ref.last_hidden_state.numpy()),
        compare(name, "penultimate_hidden_state", out.hidden_states[-2], ref.hidden_states[-2].numpy()),
    ]
    if getattr(ref, "text_embeds", None) is not None:
        errors.append(compare(name, "text_embeds", out.text_embeds, ref.text_embeds.numpy()))
    else:
        errors.append(compare(name, "pooler_output", out.pooler_output, ref.pooler_output.numpy()))
    return errors


def _t5_errors(name, component, model, rng) -> list[OutputError]:
    import torch

    cfg = model.config
    ids = rng.integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 11:] = 0  # a padded prompt
    with torch.no_grad():
        ref = model(
            torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state
    out = jax.jit(component.net.apply)(component.params, jnp.asarray(ids), jnp.asarray(mask))
    return [compare(name, "last_hidden_state", out, ref.numpy())]


def _text_conditioning(cfg: dict, rng, tokens: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Random (context, pooled) text features of a transformer's config, and the same as jdistill's cond."""
    ctx = rng.standard_normal((1, tokens, cfg["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((1, cfg["pooled_projection_dim"])).astype(np.float32)
    return ctx, pooled, {"encoder_hidden_states": jnp.asarray(ctx), "pooled_projections": jnp.asarray(pooled)}


def _transformer_sample(model, x, ctx, pooled, t, **extra: np.ndarray | None) -> np.ndarray:
    """A diffusers flow transformer's ``sample`` for numpy inputs (an extra input given as None stays None)."""
    import torch

    inputs = dict(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t, **extra)
    with torch.no_grad():
        out = model(**{k: None if v is None else torch.from_numpy(v) for k, v in inputs.items()})
    return out.sample.numpy()


def _flux_errors(component, model, rng) -> list[OutputError]:
    from jdistill.models.flux import image_ids, text_ids

    cfg = dict(model.config)
    h, w, text = 4, 6, 8  # packed token grid, T5 tokens
    x = rng.standard_normal((1, h * w, cfg["in_channels"])).astype(np.float32)
    ctx, pooled, cond = _text_conditioning(cfg, rng, text)
    t, g = np.array([0.7], np.float32), np.array([3.5], np.float32)
    img, txt = image_ids(h, w), text_ids(text)
    guidance = cfg.get("guidance_embeds")
    ref = _transformer_sample(
        model,
        x,
        ctx,
        pooled,
        t,
        img_ids=np.asarray(img, np.float32),
        txt_ids=np.asarray(txt, np.float32),
        guidance=g if guidance else None,
    )
    if guidance:
        cond["guidance"] = jnp.asarray(g)
    run = jax.jit(lambda p, x, t, c: component.net.apply(p, x, t, c, img_ids=img, txt_ids=txt))
    return [
        compare("transformer", "sample", run(component.params, jnp.asarray(x), jnp.asarray(t), cond), ref)
    ]


def _sd3_errors(component, model, rng) -> list[OutputError]:
    cfg = dict(model.config)
    p = cfg["patch_size"]
    x = rng.standard_normal((1, cfg["in_channels"], 4 * p, 6 * p)).astype(np.float32)  # non-square
    ctx, pooled, cond = _text_conditioning(cfg, rng, 8)
    t = np.array([700.0], np.float32)
    ref = _transformer_sample(model, x, ctx, pooled, t)
    ours = jax.jit(component.net.apply)(component.params, _nhwc(x), jnp.asarray(t), cond)
    return [compare("transformer", "sample", _nchw(ours), ref)]


def verify_component(
    name: str, component, src: str, *, variant: str | None = None, allow_pickle: bool = False, seed: int = 0
) -> list[OutputError]:
    """Errors of one converted component (``convert.pipeline.Component``) against its twin loaded from ``src``."""
    from jdistill.models.registry import class_of

    cls = class_of(component.config) or "CLIPTextModel"  # older CLIP configs name no architecture
    model = _torch_twin(cls, name, src, variant, allow_pickle)
    rng = np.random.default_rng(seed)
    try:
        if cls == "UNet2DConditionModel":
            return _unet_errors(component, model, rng)
        if cls == "AutoencoderKL":
            return _vae_errors(component, model, rng)
        if cls == "T5EncoderModel":
            return _t5_errors(name, component, model, rng)
        if cls == "FluxTransformer2DModel":
            return _flux_errors(component, model, rng)
        if cls == "SD3Transformer2DModel":
            return _sd3_errors(component, model, rng)
        return _text_errors(name, component, model, rng)
    finally:
        del model
        gc.collect()


def format_errors(errors: list[OutputError], tolerance: float) -> str:
    lines = [f"{'component':<16}{'output':<28}{'max abs':>12}{'max rel':>12}"]
    for e in errors:
        flag = "" if e.max_rel <= tolerance else "  FAIL"
        lines.append(f"{e.component:<16}{e.output:<28}{e.max_abs:>12.3e}{e.max_rel:>12.3e}{flag}")
    return "\n".join(lines)
