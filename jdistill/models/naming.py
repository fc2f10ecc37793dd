"""Parameter paths and the torch state-dict keys they stand for.

jdistill's modules carry the attribute names of their diffusers / transformers twins, so a parameter path
("down_blocks", 0, "resnets", 0, "conv1", "kernel") is the torch key "down_blocks.0.resnets.0.conv1.weight":
the leaf is renamed (``LEAF_NAMES``) and a scanned stack's ``stacked`` element is replaced by the layer index.
The conversion code (``jdistill.convert``) and the models that name parameters (LoRA targets) share this.
"""

from __future__ import annotations

LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# The path element under which parameters carry a leading layer axis (``models/stack.py``'s scanned stacks).
STACKED = "stacked"


def key_str(k) -> str:
    """One element of a pytree path (dict key, sequence index or attribute) as a string."""
    return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


def torch_key(path: tuple, layer: int | None = None) -> str:
    """The torch state-dict key of a Flax parameter path (tuple of names / indices); ``layer`` replaces the
    ``stacked`` element of a scanned stack's parameter."""
    *prefix, leaf = (key_str(p) for p in path)
    if STACKED in prefix:
        if layer is None:
            raise ValueError(f"{'.'.join(prefix)}: a stacked parameter's torch key needs its layer index")
        prefix[prefix.index(STACKED)] = str(layer)
    return ".".join([*prefix, LEAF_NAMES.get(leaf, leaf)])
