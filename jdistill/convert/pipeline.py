"""Loading a whole diffusers text-to-image pipeline (SD1.x / SD2.x / SDXL) into Flax models.

Sources: a diffusers pipeline directory (``model_index.json`` and component folders with single or sharded
safetensors, optionally a variant such as fp16), a hub id (downloaded where the network allows), or a
directory written by ``tools/convert_teacher.py`` (Flax parameters as Orbax checkpoints: fastest, and read
straight into the target shardings).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.convert.clip import load_clip_text
from jdistill.convert.core import ConversionError
from jdistill.convert.io import read_json, resolve_source
from jdistill.convert.unet import load_unet
from jdistill.convert.vae import load_vae
from jdistill.models.clip import CLIPTextConfig
from jdistill.models.layers import FP32, Precision
from jdistill.models.net import Net
from jdistill.models.unet import UNetConfig
from jdistill.models.vae import AutoencoderKLConfig

PyTree = Any
CONVERTED_MARKER = "jdistill_converted.json"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


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


def load_pipeline(
    src: str,
    *,
    components: tuple[str, ...] = ("unet", "vae", *TEXT_ENCODERS),
    variant: str | None = None,
    allow_pickle: bool = False,
    precision: Precision = FP32,
    attention_impl: str = "xla",
    remat: bool = False,
    shardings: Callable[[str, Net], PyTree] | None = None,
    allow_download: bool = True,
) -> Pipeline:
    """Load the requested components that the pipeline has (``text_encoder_2`` only exists for SDXL).

    ``shardings(component, net)`` may return a tree of target shardings for that component's parameters.
    """
    path = resolve_source(src, allow_download=allow_download)
    index_path = os.path.join(path, "model_index.json")
    if not os.path.exists(index_path):
        raise ConversionError(f"{path} has no model_index.json: not a diffusers pipeline directory")
    model_index = read_json(index_path)
    converted = os.path.exists(os.path.join(path, CONVERTED_MARKER))
    loaded: dict[str, Component] = {}
    for name in components:
        folder = os.path.join(path, name)
        if name not in model_index or model_index[name] in (None, [None, None]):
            continue
        if not os.path.isdir(folder):
            raise ConversionError(f"model_index.json lists {name!r} but {folder} does not exist")
        config = read_json(os.path.join(folder, "config.json"))
        kwargs = dict(precision=precision, attention_impl=attention_impl, remat=remat)
        if converted:
            net = component_net(name, config, **kwargs)
            params = restore_converted(folder, net, shardings(name, net) if shardings else None)
        else:
            net = component_net(name, config, **kwargs)
            place = sharded_placer(shardings(name, net) if shardings else None, net.abstract)
            common = dict(variant=variant, allow_pickle=allow_pickle, place=place, **kwargs)
            if name == "unet":
                net, params = load_unet(folder, UNetConfig.from_dict(config), **common)
            elif name == "vae":
                net, params = load_vae(folder, AutoencoderKLConfig.from_dict(config), **common)
            else:
                net, params = load_clip_text(folder, CLIPTextConfig.from_dict(config), **common)
        loaded[name] = Component(name, net, params, config)
    tokenizers = {}
    for encoder, tok in TOKENIZERS.items():
        if encoder in loaded:
            tokenizers[encoder] = load_tokenizer(os.path.join(path, tok))
    scheduler = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    return Pipeline(path, model_index, loaded, tokenizers, scheduler)


def component_net(name: str, config: dict, **kwargs) -> Net:
    """The Flax module of a pipeline component from its diffusers/transformers config."""
    from jdistill.models.clip import clip_text_net
    from jdistill.models.unet import unet_net
    from jdistill.models.vae import vae_net

    if name == "unet":
        return unet_net(UNetConfig.from_dict(config), **kwargs)
    if name == "vae":
        return vae_net(AutoencoderKLConfig.from_dict(config), **kwargs)
    if name in TEXT_ENCODERS:
        with_projection = "CLIPTextModelWithProjection" in config.get("architectures", [])
        net = clip_text_net(CLIPTextConfig.from_dict(config), with_projection=with_projection, **kwargs)
        return net
    raise ConversionError(f"unknown pipeline component {name!r}")


def load_tokenizer(folder: str):
    if not os.path.isdir(folder):
        raise ConversionError(f"tokenizer folder {folder} is missing")
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


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
