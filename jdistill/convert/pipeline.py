"""Loading a whole diffusers text-to-image pipeline (SD1.x / SD2.x / SDXL, FLUX.1, SD3 / SD3.5) into Flax models.

Sources: a diffusers pipeline directory (``model_index.json`` and component folders with single or sharded
safetensors, optionally a variant such as fp16), a hub id (downloaded where the network allows), or a
directory written by ``tools/convert_teacher.py`` (Flax parameters as Orbax checkpoints: fastest, and read
straight into the target shardings).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.convert.core import ConversionError
from jdistill.convert.io import read_json, resolve_source
from jdistill.models.layers import FP32, Precision
from jdistill.models.net import Net
from jdistill.models.registry import CLASSES, class_of
from jdistill.models.registry import component_net as registry_net

PyTree = Any
CONVERTED_MARKER = "jdistill_converted.json"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}
# What a teacher needs: a component with one of these names that jdistill cannot convert stops a conversion.
NEEDED = ("unet", "transformer", "vae", *TEXT_ENCODERS)
# Each modelled class's loader (module, function); the Flax twins themselves are in models/registry.py.
LOADERS = {
    "UNet2DConditionModel": ("unet", "load_unet"),
    "AutoencoderKL": ("vae", "load_vae"),
    "CLIPTextModel": ("clip", "load_clip_text"),  # with or without projection: the weights decide
    "CLIPTextModelWithProjection": ("clip", "load_clip_text"),
    "T5EncoderModel": ("t5", "load_t5"),
    "FluxTransformer2DModel": ("flux", "load_flux"),
    "SD3Transformer2DModel": ("sd3", "load_sd3"),
}
# ... and the inverse: each class's (module, function) from parameters to its diffusers/transformers state dict.
EXPORTERS = {
    "UNet2DConditionModel": ("core", "to_state_dict"),
    "AutoencoderKL": ("vae", "vae_state_dict"),
    "CLIPTextModel": ("clip", "clip_state_dict"),
    "CLIPTextModelWithProjection": ("clip", "clip_state_dict"),
    "T5EncoderModel": ("t5", "t5_state_dict"),
    "FluxTransformer2DModel": ("flux", "flux_state_dict"),
    "SD3Transformer2DModel": ("sd3", "sd3_state_dict"),
}


@dataclasses.dataclass
class Component:
    name: str
    net: Net
    params: PyTree
    config: dict


@dataclasses.dataclass
class Pipeline:
    path: str
    model_index: dict
    components: dict[str, Component]
    tokenizers: dict[str, Any]  # text encoder name -> transformers tokenizer
    scheduler_config: dict

    @property
    def prediction(self) -> str:
        """The UNet's parameterization according to the scheduler config: "eps" or "v"."""
        return prediction_type(self.scheduler_config, self.path)


def prediction_type(scheduler_config: dict, where: str) -> str:
    """jdistill's name ("eps", "v", "x0") of a diffusers scheduler config's ``prediction_type``."""
    kind = scheduler_config.get("prediction_type", "epsilon")
    mapping = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
    if kind not in mapping:
        raise ConversionError(f"unsupported scheduler prediction_type {kind!r} in {where}")
    return mapping[kind]


def sharded_placer(
    shardings: PyTree | None, abstract: PyTree
) -> Callable[[tuple[str, ...], np.ndarray], Any] | None:
    """A ``place`` callback that puts each converted array straight into its sharding: every device receives
    only its own slice, nothing is first gathered on one device."""
    if shardings is None:
        return None
    by_path = {
        tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): s
        for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]
    }

    def place(path: tuple[str, ...], array: np.ndarray):
        sharding = by_path[path]
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    return place


def model_components(path: str, model_index: dict) -> tuple[dict[str, str], dict[str, str]]:
    """({component: class} that jdistill converts, {component: class} of the models a teacher does not use,
    such as a safety checker). Tokenizers, schedulers and absent (null) entries are in neither.

    Raises ``ConversionError`` naming a component a teacher needs (denoiser, text encoders, VAE) whose class
    jdistill has no model for, so nothing is half converted."""
    modelled, other, unsupported = {}, {}, []
    for name, entry in model_index.items():
        if name.startswith("_") or not isinstance(entry, list | tuple):
            continue
        if entry[0] is None:
            continue
        config_path = os.path.join(path, name, "config.json")
        config = read_json(config_path) if os.path.isfile(config_path) else {}
        cls = class_of(config, entry)
        if cls in LOADERS:
            modelled[name] = cls
        elif name in NEEDED:
            unsupported.append(f"{name} ({cls})")
        elif config:  # a model (it has a config.json) that no teacher uses
            other[name] = str(cls)
    if unsupported:
        raise ConversionError(
            f"{path}: jdistill cannot convert {', '.join(unsupported)}; supported classes: {sorted(LOADERS)}"
        )
    order = {n: i for i, n in enumerate(NEEDED)}  # denoiser, VAE, text encoders, then the rest
    return dict(sorted(modelled.items(), key=lambda kv: order.get(kv[0], len(order)))), other


def load_pipeline(
    src: str,
    *,
    components: tuple[str, ...] | None = None,
    variant: str | None = None,
    allow_pickle: bool = False,
    precision: Precision = FP32,
    attention_impl: str = "xla",
    remat: bool = False,
    shardings: Callable[[str, Net], PyTree] | None = None,
    allow_download: bool = True,
) -> Pipeline:
    """Load the requested components that the pipeline has (None: every component jdistill models; e.g.
    ``text_encoder_2`` only exists for SDXL, FLUX and SD3).

    ``shardings(component, net)`` may return a tree of target shardings for that component's parameters.
    """
    path = resolve_source(src, allow_download=allow_download)
    index_path = os.path.join(path, "model_index.json")
    if not os.path.exists(index_path):
        raise ConversionError(f"{path} has no model_index.json: not a diffusers pipeline directory")
    model_index = read_json(index_path)
    converted = os.path.exists(os.path.join(path, CONVERTED_MARKER))
    modelled, _ = model_components(path, model_index)
    loaded: dict[str, Component] = {}
    for name in modelled if components is None else components:
        folder = os.path.join(path, name)
        if name not in model_index or model_index[name] in (None, [None, None]):
            continue
        if not os.path.isdir(folder):
            raise ConversionError(f"model_index.json lists {name!r} but {folder} does not exist")
        if name not in modelled:
            raise ConversionError(f"{path}: {name!r} is not a component jdistill can load")
        config = read_json(os.path.join(folder, "config.json"))
        kwargs = dict(precision=precision, attention_impl=attention_impl, remat=remat)
        net = component_net(name, config, **kwargs)
        if converted:
            params = restore_converted(folder, net, shardings(name, net) if shardings else None)
        else:
            place = sharded_placer(shardings(name, net) if shardings else None, net.abstract)
            options = dict(variant=variant, allow_pickle=allow_pickle, place=place, **kwargs)
            net, params = _load(modelled[name], folder, config, options)
        loaded[name] = Component(name, net, params, config)
    tokenizers = {}
    for encoder, tok in TOKENIZERS.items():
        if encoder in loaded:
            tokenizers[encoder] = load_tokenizer(os.path.join(path, tok), model_index.get(tok))
    scheduler = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    return Pipeline(path, model_index, loaded, tokenizers, scheduler)


def _load(cls: str, folder: str, config: dict, options: dict) -> tuple[Net, PyTree]:
    """One component through its class's loader (options it does not take are dropped)."""
    module_name, fn_name = LOADERS[cls]
    module = importlib.import_module(f"jdistill.convert.{module_name}")
    loader = getattr(module, fn_name)
    twin = CLASSES[cls]
    cfg = getattr(importlib.import_module(f"jdistill.models.{twin.module}"), twin.config).from_dict(config)
    accepted = inspect.signature(loader).parameters
    return loader(folder, cfg, **{k: v for k, v in options.items() if k in accepted})


# The class of a component whose config does not say (an in-memory diffusers config has no ``_class_name``).
DEFAULT_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}


def component_net(name: str, config: dict, **kwargs) -> Net:
    """The Flax module of a pipeline component from its diffusers/transformers config."""
    default = "CLIPTextModel" if name in TEXT_ENCODERS else DEFAULT_CLASSES.get(name)
    cls = class_of(config) or default
    if cls not in CLASSES:
        raise ConversionError(f"pipeline component {name!r}: no jdistill model for class {cls!r}")
    return registry_net(cls, config, **kwargs)


def load_tokenizer(folder: str, index_entry: Any = None):
    """The tokenizer of a text encoder: the class ``model_index.json`` names (CLIP or T5), CLIP by default."""
    if not os.path.isdir(folder):
        raise ConversionError(f"tokenizer folder {folder} is missing")
    import transformers

    name = index_entry[1] if isinstance(index_entry, list | tuple) and index_entry[1] else "CLIPTokenizer"
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ConversionError(f"{folder}: unknown tokenizer class {name!r}")
    return cls.from_pretrained(folder)


def restore_converted(folder: str, net: Net, shardings: PyTree | None) -> PyTree:
    """Parameters saved by ``save_converted``, read into ``shardings`` (or the default device)."""
    import orbax.checkpoint as ocp

    target = net.abstract
    if shardings is not None:
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings
        )
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), target)
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(os.path.abspath(os.path.join(folder, "flax_params")), target)


def save_converted(folder: str, params: PyTree, dtype: str | None = None) -> None:
    import orbax.checkpoint as ocp

    if dtype:  # jnp.dtype knows bfloat16 (ml_dtypes), numpy's string lookup may not
        params = jax.tree.map(lambda x: np.asarray(x).astype(jnp.dtype(dtype)), params)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.abspath(os.path.join(folder, "flax_params")), params)
