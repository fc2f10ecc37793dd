"""A diffusers pipeline converted once into jdistill's fast-loading form (``tools/convert_teacher.py``).

The converted directory keeps the diffusers layout: ``model_index.json``, the scheduler, tokenizers and any
components a teacher does not use (copied as files, listed as skipped), and for the denoiser (UNet or
transformer), VAE and text encoders their ``config.json`` next to a ``flax_params/`` Orbax checkpoint. A
needed component jdistill cannot convert stops the conversion before anything is written. Orbax reads each parameter straight into its
target sharding, so loading a converted teacher needs no conversion and no full copy on one device. A
``jdistill_converted.json`` marker records the source, dtype and variant.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import jax
import numpy as np

from jdistill.convert.core import ConversionError
from jdistill.convert.export import copy_component, write_json
from jdistill.convert.io import read_json, resolve_source
from jdistill.convert.pipeline import CONVERTED_MARKER, load_pipeline, model_components, save_converted

CONVERTED_DTYPES = ("float32", "bfloat16", "float16")


def convert_pipeline(
    src: str,
    dst: str,
    *,
    dtype: str = "float32",
    variant: str | None = None,
    allow_pickle: bool = False,
    allow_download: bool = True,
) -> dict[str, Any]:
    """Convert the pipeline at ``src`` (directory or hub id) into ``dst``; returns the marker's contents.

    ``dtype`` is the storage dtype of the converted parameters (loading casts to the configured
    ``param_dtype``). Raises ``ConversionError`` naming any missing, unexpected or mis-shaped tensor.
    """
    if dtype not in CONVERTED_DTYPES:
        raise ValueError(f"dtype {dtype!r}; choose one of {CONVERTED_DTYPES}")
    path = resolve_source(src, allow_download=allow_download)
    if os.path.exists(os.path.join(path, CONVERTED_MARKER)):
        raise ConversionError(f"{path} is already a converted directory")
    if os.path.exists(dst) and os.listdir(dst):
        raise FileExistsError(f"destination {dst} exists and is not empty; choose a new directory")
    model_index = read_json(os.path.join(path, "model_index.json"))
    # Refuses, before anything is written, a needed component that jdistill cannot convert.
    modelled, skipped = model_components(path, model_index)
    present = list(modelled)
    os.makedirs(dst, exist_ok=True)
    for name in present:  # one at a time: at most one component's parameters on the host
        pipe = load_pipeline(path, components=(name,), variant=variant, allow_pickle=allow_pickle)
        component = pipe.components[name]
        folder = os.path.join(dst, name)
        os.makedirs(folder, exist_ok=True)
        write_json(os.path.join(folder, "config.json"), component.config)
        save_converted(folder, jax.tree.map(np.asarray, component.params), dtype)
        del pipe, component
    for name in sorted(os.listdir(path)):
        if name in present or not os.path.isdir(os.path.join(path, name)) or name.startswith("."):
            continue
        copy_component(os.path.join(path, name), os.path.join(dst, name), variant)
    write_json(os.path.join(dst, "model_index.json"), model_index)
    marker = {
        "source": src,
        "resolved_source": os.path.abspath(path),
        "dtype": dtype,
        "variant": variant,
        "components": present,
        "skipped": skipped,  # models no teacher uses (class by component), copied as files
        "converted_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    write_json(os.path.join(dst, CONVERTED_MARKER), marker)  # last: a partial conversion has no marker
    return marker
