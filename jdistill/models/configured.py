"""How a model is built from its config: the constructor every diffusers/transformers twin shares
(``ConfiguredModule``) and the Net factory around it (``configured_net``)."""

from __future__ import annotations

from flax import nnx

from jdistill.models.layers import FP32, Precision
from jdistill.models.net import Net


class ConfiguredModule(nnx.Module):
    """A model built from its config with the options every Net factory passes: ``Model(config, *, rngs,
    precision, attention_impl, remat)`` (``configured_net``). The constructor is declared here once; a model
    keeps its config as ``self.config`` and builds its layers in ``build``."""

    def __init__(
        self,
        config,
        *,
        rngs: nnx.Rngs,
        precision: Precision = FP32,
        attention_impl: str = "xla",
        remat: bool | str = False,
    ):
        self.config = config
        self.build(config, rngs, precision, attention_impl, remat)

    def build(self, cfg, rngs: nnx.Rngs, p: Precision, impl: str, remat: bool | str) -> None:
        raise NotImplementedError(f"{type(self).__name__} builds its layers in build()")


def configured_net(
    name: str, module_cls: type, config, *, precision: Precision, attention_impl: str, remat: bool | str
) -> Net:
    """A Net of ``module_cls(config, rngs=, precision=, attention_impl=, remat=)``; ``net.variant(**fields)``
    builds it with other config fields and ``net.remake(config, dtype=, param_dtype=, remat_policy=)`` with
    other options (None: these). The UNet, FLUX and SD3 factories share it."""

    def remake(cfg, *, dtype=None, param_dtype=None, remat_policy=None):
        p = Precision(dtype=dtype or precision.dtype, param_dtype=param_dtype or precision.param_dtype)
        r = remat if remat_policy is None else remat_policy
        return lambda rngs: module_cls(cfg, rngs=rngs, precision=p, attention_impl=attention_impl, remat=r)

    return Net(name, remake(config), config=config, remake=remake)
