"""Pieces shared by methods: network construction from config, denoising and pseudo-target losses."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jdistill.diffusion.denoiser import Denoiser, NetworkDenoiser
from jdistill.diffusion.guidance import select_cond
from jdistill.diffusion.parameterization import Prediction, to_prediction
from jdistill.diffusion.schedules import Schedule
from jdistill.diffusion.transformer_denoiser import FlowTransformerDenoiser, transformer_family
from jdistill.methods.recipe import Network
from jdistill.models import build_model, mlp_config
from jdistill.models.lora import DEFAULT_TARGETS, LoRAConfig, LoRANet, init_lora
from jdistill.models.naming import torch_key
from jdistill.models.net import Net
from jdistill.optim import make_optimizer, optimizer_config

TIME_SCALE_OPTION = (
    "timestep_scale"  # FluxConfig field and networks.student.model key (FLUX: 1000 by default)
)

PyTree = Any
WEIGHTINGS = ("uniform", "alpha2", "snr")


def network_config(
    prediction: str = "x0", lr: float = 1e-4, ema_decay: float = 0.0, **model
) -> ml_collections.ConfigDict:
    """The config section of one trained network: model, output parameterization, optimizer, EMA, and
    optionally a LoRA (``lora.rank`` > 0, model arch "teacher"): then only the adapters on the frozen teacher
    are trained."""
    return ml_collections.ConfigDict(
        {
            "model": mlp_config(**model),
            "prediction": prediction,
            "optimizer": optimizer_config(lr),
            "ema_decay": ema_decay,
            "lora": lora_config(),
            "init_from": "",  # a run directory: start from its latest parameters of this network
        }
    )


def lora_config(rank: int = 0, alpha: float = 0.0, targets: tuple[str, ...] = DEFAULT_TARGETS):
    """``alpha`` 0 means alpha = rank (scale 1)."""
    return ml_collections.ConfigDict({"rank": rank, "alpha": alpha, "targets": tuple(targets)})


def _lora(cfg: ml_collections.ConfigDict) -> LoRAConfig | None:
    lora = cfg.get("lora")
    if lora is None or lora.rank == 0:
        return None
    if lora.rank < 0:
        raise ValueError(f"lora.rank must be >= 0, got {lora.rank}")
    if cfg.model.arch != "teacher":
        raise ValueError(
            f"a LoRA needs model.arch='teacher' (adapters on the teacher), got {cfg.model.arch!r}"
        )
    return LoRAConfig(rank=lora.rank, alpha=lora.alpha or None, targets=tuple(lora.targets))


def build_network(
    name: str, cfg: ml_collections.ConfigDict, world, total_updates: int, *, zero_out=False
) -> Network:
    optimizer = make_optimizer(cfg.optimizer, total_updates)
    lora = _lora(cfg)
    if lora is not None:
        if zero_out:
            raise ValueError(f"network {name!r}: a LoRA already starts equal to its base; no residual on it")
        if "teacher" not in world.nets:
            raise ValueError("a LoRA network needs a network teacher (this teacher is analytic)")
        if cfg.model.get("time_cond_proj_dim", 0):
            raise ValueError(
                f"network {name!r}: a LoRA adapts the teacher's own layers and cannot add a guidance embedding "
                "(model.time_cond_proj_dim); LCM-LoRA distils a fixed guidance (method.guidance_embed=False)"
            )
        lora_net = LoRANet(name, world.nets["teacher"], lora)
        return Network(
            net=lora_net,
            optimizer=optimizer,
            ema_decay=cfg.ema_decay,
            init=lambda key, frozen: init_lora(key, frozen["teacher"], lora),
            inputs=lambda params: {"base": params["teacher"], "lora": params[name]},
        )
    net = Net(name, build_model(cfg.model, world, zero_out=zero_out), **_teacher_config(cfg.model, world))
    init = None
    if cfg.model.arch == "teacher" and cfg.model.init == "teacher":

        def init(key, frozen):
            return teacher_copy(key, frozen["teacher"], net.abstract)

    return Network(net=net, optimizer=optimizer, ema_decay=cfg.ema_decay, init=init)


def _teacher_config(model: ml_collections.ConfigDict, world) -> dict[str, Any]:
    """A network with the teacher's architecture keeps the teacher's configuration (with LCM's guidance
    embedding where asked), so plans and exports read its shape like the teacher's."""
    base = world.nets.get("teacher") if model.arch == "teacher" else None
    if base is None or not dataclasses.is_dataclass(base.config):
        return {}
    extra = model.get("time_cond_proj_dim", 0)
    config = dataclasses.replace(base.config, time_cond_proj_dim=extra) if extra else base.config
    return {"config": config, "remake": base.remake}


def teacher_copy(key: jax.Array, teacher: PyTree, abstract: PyTree) -> PyTree:
    """A float32 master copy of the teacher's parameters (which may be stored in bfloat16), laid out as
    ``abstract``. Linear kernels the teacher lacks (LCM's guidance projection ``time_embedding.cond_proj``)
    start as torch's ``nn.Linear`` does, uniform in +-1/sqrt(fan_in), like LCM's scripts, which load the
    teacher's weights into the student with ``strict=False``."""
    own = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(teacher)[0]}
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves, unknown = [], []
    for i, (path, spec) in enumerate(flat):
        x = own.get(jax.tree_util.keystr(path))
        if x is not None:
            if tuple(x.shape) != tuple(spec.shape):
                raise ValueError(
                    f"{torch_key(path)}: the teacher's shape {tuple(x.shape)} differs from the network's "
                    f"{tuple(spec.shape)}"
                )
            leaves.append(jnp.array(x, jnp.float32, copy=True))
        elif getattr(path[-1], "key", None) == "kernel" and len(spec.shape) == 2:
            bound = 1.0 / math.sqrt(spec.shape[0])
            leaves.append(
                jax.random.uniform(jax.random.fold_in(key, i), spec.shape, jnp.float32, -bound, bound)
            )
        else:
            unknown.append(torch_key(path))
    if unknown:
        raise ValueError(f"parameters the teacher lacks, with no initialiser of their own: {unknown[:10]}")
    return jax.tree_util.tree_unflatten(treedef, leaves)


@dataclasses.dataclass(frozen=True, eq=False)
class ResidualDenoiser:
    """A base denoiser plus a learned correction in one parameterization; params = (base, correction).

    With the correction's output layer zero-initialised it starts equal to the base, the way a LoRA fake
    score starts equal to its teacher.
    """

    base: Denoiser
    net: Net
    prediction: str

    @property
    def schedule(self) -> Schedule:
        return self.base.schedule

    def predict(
        self, params: tuple[PyTree, PyTree], x_t: jax.Array, t: jax.Array, cond: PyTree
    ) -> Prediction:
        base_params, own = params
        base = self.base.predict(base_params, x_t, t, cond).as_type(self.prediction)
        out = base + self.net.apply(own, x_t, self.schedule.model_time(t), cond).astype(jnp.float32)
        return to_prediction(out, self.prediction, x_t, self.schedule, t)


def network_denoiser(
    network: Network, cfg: ml_collections.ConfigDict, schedule: Schedule
) -> NetworkDenoiser | FlowTransformerDenoiser:
    """A trained network as a denoiser: a FLUX / SD3 transformer (or a LoRA on one) predicts the flow velocity
    with its own time convention; any other network predicts ``cfg.prediction``."""
    family = transformer_family(network.net)
    if family is not None:
        return FlowTransformerDenoiser(network.net, schedule, family)
    return NetworkDenoiser(network.net, cfg.prediction, schedule)


def per_sample_mean(x: jax.Array) -> jax.Array:
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def loss_weight(kind: str, pred: Prediction) -> jax.Array:
    """Per-sample weight of a denoising loss: uniform, alpha^2 (SwiftBrush's fake score), or SNR."""
    alpha = pred.alpha.reshape(pred.alpha.shape[0], -1)[:, 0] if pred.alpha.ndim else pred.alpha
    sigma = pred.sigma.reshape(pred.sigma.shape[0], -1)[:, 0] if pred.sigma.ndim else pred.sigma
    if kind == "uniform":
        return jnp.ones_like(alpha)
    if kind == "alpha2":
        return alpha**2
    if kind == "snr":
        return alpha**2 / sigma**2
    raise ValueError(f"unknown loss weighting {kind!r}; choose one of {WEIGHTINGS}")


def denoising_loss(
    pred: Prediction, x0: jax.Array, eps: jax.Array, target: str, weighting: str = "uniform"
) -> jax.Array:
    """Weighted MSE between the prediction and the truth, both expressed in parameterization ``target``."""
    truth = pred.replace(x0=x0.astype(jnp.float32), eps=eps.astype(jnp.float32))
    err = per_sample_mean((pred.as_type(target) - truth.as_type(target)) ** 2)
    return jnp.mean(loss_weight(weighting, pred) * err)


def pseudo_target_loss(x: jax.Array, direction: jax.Array) -> jax.Array:
    """0.5 mean((x - sg(x - g))^2): its gradient with respect to x is g / x.size (DMD, SwiftBrush)."""
    x32 = x.astype(jnp.float32)
    target = jax.lax.stop_gradient(x32 - direction.astype(jnp.float32))
    return 0.5 * jnp.mean((x32 - target) ** 2)


def drop_conditions(key: jax.Array, cond: PyTree, uncond: PyTree, rate: float) -> PyTree:
    """Replace each sample's condition by the unconditional one with probability ``rate``."""
    if rate <= 0:
        return cond
    n = jax.tree.leaves(cond)[0].shape[0]
    return select_cond(cond, uncond, jax.random.bernoulli(key, rate, (n,)))


def with_transformer_options(world, **changes):
    """``world`` whose teacher network is built with other config fields (``timestep_delta_embeds``,
    ``timestep_scale``; same precision and options), so that ``build_network`` makes the student's variant of
    the teacher's transformer (the teacher itself, its denoiser and parameters are untouched)."""
    if not changes:
        return world
    base = world.nets["teacher"]
    config = dataclasses.replace(base.config, **changes)
    view = Net(base.name, base.remake(config), config=config, remake=base.remake)
    return dataclasses.replace(world, nets={**world.nets, "teacher": view})


def student_time_scale(model: ml_collections.ConfigDict, family: str | None) -> dict:
    """The student transformer's ``timestep_scale`` asked for by ``networks.<name>.model.timestep_scale`` (0 or
    absent: the teacher's, diffusers' 1000), as config changes; only a FLUX transformer has the option."""
    scale = float(model.get(TIME_SCALE_OPTION, 0.0) or 0.0)
    if not scale:
        return {}
    if family != "flux":
        raise ValueError(
            f"networks.student.model.{TIME_SCALE_OPTION}={scale} is an option of FLUX transformer students "
            "(a copy of a FLUX teacher); this student is not one"
        )
    if scale < 0:
        raise ValueError(f"networks.student.model.{TIME_SCALE_OPTION} must be positive, got {scale}")
    return {TIME_SCALE_OPTION: scale}
