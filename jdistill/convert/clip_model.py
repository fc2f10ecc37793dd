"""Full CLIP weights (both towers) -> jdistill's ``CLIPModel``: transformers checkpoints and OpenCLIP ones.

transformers layout (``openai/clip-vit-large-patch14`` on the hub, ``CLIPModel.save_pretrained``):
``text_model.*``, ``vision_model.*``, ``text_projection.weight``, ``visual_projection.weight``, ``logit_scale``,
with ``config.json`` (``text_config`` / ``vision_config``). Our modules carry these names, so ``convert.core``'s
generic rules map every key; ``position_ids`` buffers are skipped.

OpenCLIP layout (``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``; OpenAI's original CLIP uses
the same names). The file carries no architecture: it comes from OpenCLIP's model config (the ``model_cfg`` of
the ``open_clip_config.json`` shipped beside hub checkpoints, or a ``model_configs/<name>.json`` of the
open_clip package), translated by ``open_clip_config``, or from a ``CLIPConfig``. Only the standard ViT CLIP is
supported (no ResNet or timm towers, layer scale, attentional pooling, ...): other options are refused by name.

    OpenCLIP key                             transformers key (rows of the fused in_proj: q, k, v)
    visual.conv1.weight                      vision_model.embeddings.patch_embedding.weight
    visual.class_embedding                   vision_model.embeddings.class_embedding
    visual.positional_embedding              vision_model.embeddings.position_embedding.weight
    visual.ln_pre / visual.ln_post           vision_model.pre_layrnorm / vision_model.post_layernorm
    visual.proj  (width, embed)              visual_projection.weight, transposed
    token_embedding.weight                   text_model.embeddings.token_embedding.weight
    positional_embedding                     text_model.embeddings.position_embedding.weight
    ln_final                                 text_model.final_layer_norm
    text_projection  (width, embed)          text_projection.weight, transposed
    logit_scale  (() or (1,))                logit_scale
    [visual.]transformer.resblocks.N.        {vision,text}_model.encoder.layers.N.
        attn.in_proj_weight / _bias (3w,..)      self_attn.{q,k,v}_proj.weight / .bias
        attn.out_proj                            self_attn.out_proj
        ln_1 / ln_2                              layer_norm1 / layer_norm2
        mlp.c_fc / mlp.c_proj                    mlp.fc1 / mlp.fc2

OpenCLIP's ``CustomTextCLIP`` keeps the text tower under ``text.``; that prefix is accepted. Checkpoints are
checked in OpenCLIP's own names (missing, unexpected, mis-shaped) before anything is converted.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, Unpack

import numpy as np

from jdistill.convert.clip import IGNORE as HF_IGNORE
from jdistill.convert.clip import Tower, load_tower
from jdistill.convert.core import ConversionError, load_state_dict
from jdistill.convert.io import PICKLE_SUFFIXES, lazy_state_dict, read_json
from jdistill.convert.loader import LoadOptions, Place, load_component, takes_load_options
from jdistill.models.clip import LEGACY_EOS_TOKEN_ID, CLIPTextConfig
from jdistill.models.clip_vision import (
    CLIPConfig,
    CLIPVisionConfig,
    clip_model_net,
    clip_vision_net,
)
from jdistill.models.layers import FP32, Precision
from jdistill.models.net import Net

PyTree = Any
# Non-persistent buffers some exports still carry, and the scalars of OpenAI's original state dicts.
OPEN_CLIP_IGNORE = (
    r"(^|\.)attn_mask$",
    r"(^|\.)position_ids$",
    r"^(input_resolution|context_length|vocab_size)$",
)
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPEN_CLIP_CONFIG = "open_clip_config.json"
_OPEN_CLIP_MARKERS = ("visual.class_embedding", "visual.conv1.weight", "visual.proj")


# --- transformers layout ---------------------------------------------------------------------------------


VISION_TOWER = Tower(
    CLIPVisionConfig,
    clip_vision_net,
    "vision_model.",
    "visual_projection.",
    ("CLIPVisionModel", "CLIPVisionModelWithProjection"),
)


@takes_load_options()
def load_clip_vision(
    source: str | Mapping[str, Any],
    config: CLIPVisionConfig | None = None,
    *,
    with_projection: bool | None = None,
    **options: Unpack[LoadOptions],
) -> tuple[Net, PyTree]:
    """(Net, params) of a ``CLIPVisionModel[WithProjection]`` from a folder or a state dict, as
    ``convert.clip.load_clip_text``: the class follows the weights (``visual_projection.weight`` present) unless
    ``with_projection`` is given; the hub layout (``vision_model.`` prefix) and the unprefixed one transformers
    5 saves for ``CLIPVisionModel`` both load."""
    return load_tower(VISION_TOWER, source, config, with_projection, options)


def _convert_clip_model(abstract: PyTree, state: Mapping[str, Any], *, place: Place | None) -> PyTree:
    if any(k in state for k in _OPEN_CLIP_MARKERS):
        raise ConversionError(
            "these are OpenCLIP weights (visual.* / transformer.resblocks.* keys): load them with load_open_clip"
        )
    return load_state_dict(abstract, state, ignore=HF_IGNORE, place=place, what="CLIPModel")


@takes_load_options()
def load_clip_model(
    source: str | Mapping[str, Any], config: CLIPConfig | None = None, **options: Unpack[LoadOptions]
) -> tuple[Net, PyTree]:
    """(Net, params) of a ``CLIPModel`` in transformers' layout.

    ``source``: a folder (config.json + model.safetensors, e.g. a download of ``openai/clip-vit-large-patch14``
    or ``CLIPModel.save_pretrained``), one weights file (its config.json beside it unless ``config`` is given),
    or an in-memory state dict with ``config``. Strict: ``ConversionError`` names missing, unexpected and
    mis-shaped keys.
    """
    if isinstance(source, str) and os.path.isfile(source):
        config = config or _read_config(os.path.join(os.path.dirname(source), "config.json"), CLIPConfig)
        source = lazy_state_dict([_checked_file(source, options["allow_pickle"])])
    elif isinstance(source, str) and config is None:
        config = _read_config(os.path.join(source, "config.json"), CLIPConfig)
    return load_component(source, config, CLIPConfig, clip_model_net, options, _convert_clip_model)


def _read_config(path: str, cls):
    if not os.path.isfile(path):
        raise ConversionError(f"{path} is missing: the model's configuration is needed (or pass config=...)")
    try:
        return cls.from_dict(read_json(path))
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{path}: {err}") from err


def _checked_file(path: str, allow_pickle: bool) -> str:
    if path.endswith(PICKLE_SUFFIXES) and not allow_pickle:
        raise ConversionError(
            f"{path} is a pickle checkpoint; loading pickles can execute arbitrary code. Convert it to "
            "safetensors, or pass allow_pickle=True if you trust the source."
        )
    if not path.endswith((".safetensors", *PICKLE_SUFFIXES)):
        raise ConversionError(f"{path}: not a .safetensors or pickle checkpoint")
    return path


# --- OpenCLIP configuration ------------------------------------------------------------------------------

# OpenCLIP options that must keep their default value here (they change the architecture or the key layout),
# the ones read, and the ones without effect on inference weights (training options, tokenizer settings, and
# options only read by the refused variants). _BLOCK_FIXED: those of the residual blocks both towers build.
_BLOCK_FIXED: dict[str, tuple] = {
    "act_kwargs": (None, {}),
    "block_type": (None, "default"),
    "qk_norm": (False,),
    "scaled_cosine_attn": (False,),
    "scale_heads": (False,),
    "scale_attn_inner": (False,),
    "scale_attn": (False,),
    "scale_fc": (False,),
}
_VISION_FIXED: dict[str, tuple] = {
    "ls_init_value": (None,),
    "attentional_pool": (False,),
    "no_ln_pre": (False,),
    "pos_embed_type": ("learnable",),
    "final_ln_after_pool": (False,),
    "pool_type": ("tok",),
    **_BLOCK_FIXED,
    "timm_model_name": (None,),
}
_VISION_READ = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "norm_kwargs"}
_VISION_INERT = {
    "patch_dropout",
    "output_tokens",
    "attn_pooler_queries",
    "attn_pooler_heads",
    "timm_model_pretrained",
    "timm_pool",
    "timm_proj",
    "timm_proj_bias",
    "timm_drop",
    "timm_drop_path",
}
_TEXT_FIXED: dict[str, tuple] = {
    "ls_init_value": (None,),
    "embed_cls": (False,),
    "no_causal_mask": (False,),
    "final_ln_after_pool": (False,),
    "pool_type": ("argmax",),
    "proj_type": ("linear",),
    "proj_bias": (False,),
    **_BLOCK_FIXED,
    "hf_model_name": (None,),
}
_TEXT_READ = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "norm_kwargs"}
_TEXT_INERT = {
    "hf_tokenizer_name",
    "tokenizer_mode",
    "tokenizer_kwargs",
    "pad_id",
    "eos_id",
    "output_tokens",
    "hf_model_pretrained",
    "hf_proj_type",
    "hf_pooler_type",
    "use_pad_mask",
    "correct_cls_mask",
}
_TOP_FIXED: dict[str, tuple] = {"init_logit_bias": (None,)}
_TOP_READ = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale"}
_TOP_INERT = {"custom_text", "cast_dtype", "nonscalar_logit_scale", "output_dict"}


def _check_options(where: str, cfg: Mapping, fixed: dict, read: set, inert: set) -> None:
    problems = [
        f"{where}{k}={cfg[k]!r} (supported: {', '.join(map(repr, ok))})"
        for k, ok in fixed.items()
        if k in cfg and cfg[k] not in ok
    ]
    unknown = sorted(set(cfg) - set(fixed) - read - inert)
    if unknown:
        problems.append(f"unknown option(s) {', '.join(where + k for k in unknown)}")
    if problems:
        raise ConversionError(
            "OpenCLIP model config not supported (only the standard ViT CLIP is): " + "; ".join(problems)
        )


def _square(where: str, value) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f"OpenCLIP {where}={value!r}: only square sizes are supported")
        value = value[0]
    return int(value)


def _eps(where: str, norm_kwargs: Mapping | None) -> float:
    norm_kwargs = dict(norm_kwargs or {})
    eps = norm_kwargs.pop("eps", 1e-5)  # torch's LayerNorm default
    if norm_kwargs:
        raise ConversionError(f"OpenCLIP {where}norm_kwargs {sorted(norm_kwargs)} not supported (only eps)")
    return float(eps)


def open_clip_config(model_cfg: Mapping[str, Any]) -> CLIPConfig:
    """A ``CLIPConfig`` from OpenCLIP's model config (``{"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}``,
    as in ``open_clip_config.json``'s ``model_cfg``; the whole file's dict is accepted too).

    OpenCLIP's defaults apply to absent fields (vision: head_width 64, mlp_ratio 4; text: context 77, vocab
    49408, width 512, 8 heads, 12 layers). ``quick_gelu`` picks the activation of both towers (OpenAI's
    weights need it; the ``-quickgelu`` model names set it). The text tower pools at the argmax of the token
    ids, as OpenCLIP's ``pool_type="argmax"``: transformers' legacy ``eos_token_id == 2`` rule.
    """
    cfg = dict(model_cfg.get("model_cfg", model_cfg))
    _check_options("", cfg, _TOP_FIXED, _TOP_READ, _TOP_INERT)
    if "embed_dim" not in cfg:
        raise ConversionError("OpenCLIP model config needs embed_dim")
    vision, text = dict(cfg.get("vision_cfg") or {}), dict(cfg.get("text_cfg") or {})
    _check_options("vision_cfg.", vision, _VISION_FIXED, _VISION_READ, _VISION_INERT)
    _check_options("text_cfg.", text, _TEXT_FIXED, _TEXT_READ, _TEXT_INERT)
    act = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
    embed_dim = int(cfg["embed_dim"])

    layers = vision.get("layers", 12)
    if not isinstance(layers, int):
        raise ConversionError(
            f"OpenCLIP vision_cfg.layers={layers!r}: ModifiedResNet towers are not supported"
        )
    width, head_width = int(vision.get("width", 768)), int(vision.get("head_width", 64))
    if width % head_width:
        raise ConversionError(
            f"OpenCLIP vision_cfg.width {width} is not a multiple of head_width {head_width}"
        )
    vision_config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(width * vision.get("mlp_ratio", 4.0)),  # OpenCLIP's rounding
        projection_dim=embed_dim,
        num_hidden_layers=layers,
        num_attention_heads=width // head_width,
        image_size=_square("vision_cfg.image_size", vision.get("image_size", 224)),
        patch_size=_square("vision_cfg.patch_size", vision.get("patch_size", 16)),
        hidden_act=act,
        layer_norm_eps=_eps("vision_cfg.", vision.get("norm_kwargs")),
    )
    text_width = int(text.get("width", 512))
    text_config = CLIPTextConfig(
        vocab_size=int(text.get("vocab_size", 49408)),
        hidden_size=text_width,
        intermediate_size=int(text_width * text.get("mlp_ratio", 4.0)),
        projection_dim=embed_dim,
        num_hidden_layers=int(text.get("layers", 12)),
        num_attention_heads=int(text.get("heads", 8)),
        max_position_embeddings=int(text.get("context_length", 77)),
        hidden_act=act,
        layer_norm_eps=_eps("text_cfg.", text.get("norm_kwargs")),
        eos_token_id=LEGACY_EOS_TOKEN_ID,
    )
    try:
        vision_config.validate()
        text_config.validate()
    except ValueError as err:
        raise ConversionError(f"OpenCLIP model config: {err}") from err
    return CLIPConfig(
        text_config,
        vision_config,
        projection_dim=embed_dim,
        logit_scale_init_value=float(cfg.get("init_logit_scale", math.log(1 / 0.07))),
    )


# --- OpenCLIP weights ------------------------------------------------------------------------------------

Transform = Callable[[np.ndarray], np.ndarray]


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _transposed(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.T)


def _scalar(a: np.ndarray) -> np.ndarray:
    return a.reshape(())


def _row_block(i: int) -> Transform:
    def take(a: np.ndarray) -> np.ndarray:
        n = a.shape[0] // 3
        return np.ascontiguousarray(a[i * n : (i + 1) * n])

    return take


# OpenCLIP key -> (accepted shapes, [(transformers key, transform)]).
Table = dict[str, tuple[tuple[tuple[int, ...], ...], list[tuple[str, Transform]]]]


def _blocks(table: Table, src: str, dst: str, layers: int, width: int, mlp: int) -> None:
    for i in range(layers):
        s, d = f"{src}transformer.resblocks.{i}.", f"{dst}encoder.layers.{i}."
        fused = [(f"{d}self_attn.{n}_proj", _row_block(j)) for j, n in enumerate("qkv")]
        table[s + "attn.in_proj_weight"] = (((3 * width, width),), [(k + ".weight", f) for k, f in fused])
        table[s + "attn.in_proj_bias"] = (((3 * width,),), [(k + ".bias", f) for k, f in fused])
        for name, target, shape in (
            ("attn.out_proj", "self_attn.out_proj", (width, width)),
            ("mlp.c_fc", "mlp.fc1", (mlp, width)),
            ("mlp.c_proj", "mlp.fc2", (width, mlp)),
            ("ln_1", "layer_norm1", (width,)),
            ("ln_2", "layer_norm2", (width,)),
        ):
            table[f"{s}{name}.weight"] = ((shape,), [(f"{d}{target}.weight", _same)])
            table[f"{s}{name}.bias"] = (((shape[0],),), [(f"{d}{target}.bias", _same)])


def _norm(table: Table, src: str, dst: str, width: int) -> None:
    for leaf in ("weight", "bias"):
        table[f"{src}.{leaf}"] = (((width,),), [(f"{dst}.{leaf}", _same)])


def open_clip_table(config: CLIPConfig) -> Table:
    """Every OpenCLIP key of a model with this configuration: its shape and the transformers keys it fills."""
    v, t, e = config.vision_config, config.text_config, config.projection_dim
    vw, tw = v.hidden_size, t.hidden_size
    ve, te = "vision_model.embeddings.", "text_model.embeddings."
    table: Table = {
        "visual.conv1.weight": (
            ((vw, v.num_channels, v.patch_size, v.patch_size),),
            [(ve + "patch_embedding.weight", _same)],
        ),
        "visual.class_embedding": (((vw,),), [(ve + "class_embedding", _same)]),
        "visual.positional_embedding": (
            ((v.num_positions, vw),),
            [(ve + "position_embedding.weight", _same)],
        ),
        "visual.proj": (((vw, e),), [("visual_projection.weight", _transposed)]),
        "token_embedding.weight": (((t.vocab_size, tw),), [(te + "token_embedding.weight", _same)]),
        "positional_embedding": (
            ((t.max_position_embeddings, tw),),
            [(te + "position_embedding.weight", _same)],
        ),
        "text_projection": (((tw, e),), [("text_projection.weight", _transposed)]),
        "logit_scale": (((), (1,)), [("logit_scale", _scalar)]),
    }
    _norm(table, "visual.ln_pre", "vision_model.pre_layrnorm", vw)
    _norm(table, "visual.ln_post", "vision_model.post_layernorm", vw)
    _norm(table, "ln_final", "text_model.final_layer_norm", tw)
    _blocks(table, "visual.", "vision_model.", v.num_hidden_layers, vw, v.intermediate_size)
    _blocks(table, "", "text_model.", t.num_hidden_layers, tw, t.intermediate_size)
    return table


class _Shared:
    """One checkpoint tensor read once for the several parameters cut from it (the fused q/k/v rows)."""

    def __init__(self, value: Any, uses: int):
        self.value, self.uses, self.array = value, uses, None

    def get(self) -> np.ndarray:
        if self.array is None:
            self.array = _materialize(self.value)
        array = self.array
        self.uses -= 1
        if self.uses == 0:
            self.array = None  # release it once every slice is taken
        return array


def _materialize(value: Any) -> np.ndarray:
    value = value() if callable(value) else value
    if hasattr(value, "detach"):  # a torch tensor in an in-memory state dict
        value = (
            value.detach().cpu().float().numpy() if str(value.dtype) == "torch.bfloat16" else value.numpy()
        )
    return np.asarray(value)


class _LazyTensor:
    """One tensor of a safetensors file, read when called; its shape comes from the header (checking shapes
    reads no data)."""

    def __init__(self, path: str, key: str, shape: tuple[int, ...]):
        self.path, self.key, self.shape = path, key, shape

    def __call__(self) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(self.path, framework="numpy") as f:
            return f.get_tensor(self.key)


def _read_weights(path: str) -> Mapping[str, Any]:
    if not path.endswith(".safetensors"):
        return lazy_state_dict([path])  # a trusted pickle: torch.load reads it whole anyway
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return {k: _LazyTensor(path, k, tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else _materialize(value).shape


def open_clip_to_transformers(
    state: Mapping[str, Any], config: CLIPConfig
) -> dict[str, Callable[[], np.ndarray]]:
    """transformers-layout loaders for an OpenCLIP state dict, checked against ``config`` in OpenCLIP's names."""
    if any(k.startswith("text.") for k in state):  # CustomTextCLIP: the text tower is a submodule
        state = {k.removeprefix("text."): v for k, v in state.items()}
    ignore = [re.compile(p) for p in OPEN_CLIP_IGNORE]
    given = {k: v for k, v in state.items() if not any(r.search(k) for r in ignore)}
    table = open_clip_table(config)
    missing, unexpected = sorted(set(table) - set(given)), sorted(set(given) - set(table))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {', '.join(unexpected[:20])}")
    if not problems:
        bad = [
            f"{k}: checkpoint {shape}, model expects {' or '.join(map(str, shapes))}"
            for k, (shapes, _) in table.items()
            if (shape := _shape(given[k])) not in shapes
        ]
        if bad:
            problems.append(f"{len(bad)} mis-shaped: {', '.join(bad[:20])}")
    if problems:
        raise ConversionError("OpenCLIP checkpoint does not match the model config: " + "; ".join(problems))
    out: dict[str, Callable[[], np.ndarray]] = {}
    for key, (_, targets) in table.items():
        shared = _Shared(given[key], len(targets))
        for target, transform in targets:
            out[target] = lambda s=shared, f=transform: f(s.get())
    return out


def load_open_clip(
    source: str | Mapping[str, Any],
    config: CLIPConfig | Mapping[str, Any] | None = None,
    *,
    allow_pickle: bool = False,
    precision: Precision = FP32,
    attention_impl: str = "xla",
    remat: bool = False,
    place: Place | None = None,
) -> tuple[Net, PyTree]:
    """(Net, params) of a ``CLIPModel`` from OpenCLIP weights.

    ``source``: a folder with ``open_clip_model.safetensors`` (or, with ``allow_pickle``,
    ``open_clip_pytorch_model.bin``), one such file, or an in-memory state dict. ``config``: a ``CLIPConfig``,
    OpenCLIP's model config (see ``open_clip_config``), or None to read ``open_clip_config.json`` from the
    folder (beside the file).
    """
    if isinstance(source, str):
        if os.path.isdir(source):
            folder = source
            names = set(os.listdir(folder))
            found = [n for n in OPEN_CLIP_WEIGHTS if n in names]
            if not found:
                raise ConversionError(
                    f"no OpenCLIP weights ({' or '.join(OPEN_CLIP_WEIGHTS)}) in {folder} (files: {sorted(names)})"
                )
            path = os.path.join(folder, found[0])
        elif os.path.isfile(source):
            folder, path = os.path.dirname(source), source
        else:
            raise ConversionError(f"{source} does not exist")
        if config is None:
            config_path = os.path.join(folder, OPEN_CLIP_CONFIG)
            if not os.path.isfile(config_path):
                raise ConversionError(
                    f"{config_path} is missing: OpenCLIP weights carry no architecture; pass config= (a "
                    "CLIPConfig or OpenCLIP's model config, e.g. open_clip's model_configs/ViT-L-14.json)"
                )
            config = read_json(config_path)
        state: Mapping[str, Any] = _read_weights(_checked_file(path, allow_pickle))
    else:
        if config is None:
            raise ValueError(
                "a config (CLIPConfig or OpenCLIP model config) is needed with an in-memory state dict"
            )
        state = source
    if not isinstance(config, CLIPConfig):
        config = open_clip_config(config)
    net = clip_model_net(config, precision=precision, attention_impl=attention_impl, remat=remat)
    converted = open_clip_to_transformers(state, config)
    params = load_state_dict(net.abstract, converted, place=place, what="CLIPModel")
    return net, params


def load_clip(
    source: str,
    *,
    open_clip_model_config: CLIPConfig | Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
    precision: Precision = FP32,
    attention_impl: str = "xla",
    remat: bool = False,
) -> tuple[Net, PyTree]:
    """A CLIP folder in either layout: transformers' when it has ``config.json`` (hub repos that ship both
    layouts load this way), OpenCLIP's otherwise."""
    kw = dict(allow_pickle=allow_pickle, precision=precision, attention_impl=attention_impl, remat=remat)
    if not os.path.isdir(source):
        raise ConversionError(f"{source} is not a directory")
    if os.path.isfile(os.path.join(source, "config.json")):
        return load_clip_model(source, **kw)
    return load_open_clip(source, open_clip_model_config, **kw)
