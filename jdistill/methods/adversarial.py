"""Diffusion-GAN terms whose discriminator is a head on the fake score's bottleneck features.

DMD2 (../shared/reference/methods.md 2.2) and SiDA / few-step SiD (3.2, 3.4) classify noised real and generated
samples with a small head on the fake score network's mid-block features, so the fake score's trunk learns
from both its denoising loss and the classification loss. Real and generated samples are noised at
t ~ U(``gan.t_range``) (their own draws) and classified with their conditions.

- discriminator side (trained with the fake score: ``trains = (fake_score, discriminator)``): on sg(x),
  ``gan_losses``' D loss, times ``discriminator_weight``;
- generator side (fake score and head frozen, the gradient flows through their inputs): the G loss, times
  ``generator_weight``, optionally per-sample weighted (SiD's omega);
- both on from step ``start_step`` (SiD's warm-up); logits optionally clamped to +-``logit_clamp`` (SiD: 10).

Real samples come from the world's data source: the recipe trains on conditions and data side by side
(``Recipe.data = "conditions+data"``) and finds them under ``batch["real"]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdistill.diffusion.schedules import Schedule, sample_timesteps
from jdistill.methods.distribution import GAN_KINDS, gan_losses, masked_mean
from jdistill.methods.recipe import Network
from jdistill.models.heads import DiscriminatorHead
from jdistill.models.net import Net
from jdistill.optim import make_optimizer, optimizer_config
from jdistill.rng import streams

PyTree = Any


def gan_config(**overrides) -> ml_collections.ConfigDict:
    """``method.gan``: off unless a weight is positive."""
    cfg = ml_collections.ConfigDict(
        {
            "generator_weight": 0.0,  # lambda_G (DMD2 SD1.5 stage 2: 1e-3, SDXL: 5e-3)
            "discriminator_weight": 0.0,  # lambda_D (DMD2: 1e-2)
            "main_weight": 1.0,  # the generator's main loss is scaled by this while the GAN is on (SiD: 0.5)
            "loss": "bce",  # bce (non-saturating) | hinge
            "t_range": (0.0, 1.0),  # noise levels of the diffusion GAN (DMD2: U{0..999})
            "logit_clamp": 0.0,  # 0: none; SiD clamps logits to +-10
            "start_step": 0,  # warm-up: adversarial terms from this step on
        }
    )
    cfg.update(overrides)
    return cfg


def discriminator_config(lr: float = 1e-5, hidden: int = 0, num_down: int = 2) -> ml_collections.ConfigDict:
    """``networks.discriminator``: the head (``hidden`` 0: the feature width) and its optimizer."""
    return ml_collections.ConfigDict(
        {
            "model": {"arch": "head", "hidden": hidden, "num_down": num_down},
            "optimizer": optimizer_config(lr),
            "ema_decay": 0.0,
            "init_from": "",  # a run directory: start from its latest head
        }
    )


def enabled(gan: ml_collections.ConfigDict | None) -> bool:
    return gan is not None and (gan.generator_weight > 0 or gan.discriminator_weight > 0)


@dataclasses.dataclass(frozen=True, eq=False)
class Discriminator:
    head: Network
    trunk: Network  # the fake score whose bottleneck features the head reads
    schedule: Schedule
    cfg: ml_collections.ConfigDict  # method.gan

    def logits(self, params, x_t: jax.Array, t: jax.Array, cond: PyTree) -> jax.Array:
        """One float32 logit per sample; trunk and head run on ``params`` (frozen or not: the caller's grad)."""
        trunk_in = self.trunk.net_params(params)
        _, features = self.trunk.net.apply(trunk_in, x_t, self.schedule.model_time(t), cond, return_mid=True)
        logits = self.head.net.apply(params[self.head.name], features)
        clamp = self.cfg.logit_clamp
        return jnp.clip(logits, -clamp, clamp) if clamp > 0 else logits

    def on(self, carry) -> jax.Array:
        """1.0 from ``start_step`` on (the trainer passes the step number in ``carry``), else 0.0."""
        return (jnp.asarray(carry["step"]) >= self.cfg.start_step).astype(jnp.float32)

    def noised(self, key: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        k = streams(key, "timestep", "noise")
        t = sample_timesteps(self.schedule, k["timestep"], (x.shape[0],), *self.cfg.t_range)
        eps = jax.random.normal(k["noise"], x.shape, jnp.float32)
        return self.schedule.add_noise(x.astype(jnp.float32), eps, t), t

    def discriminator_loss(self, params, batch, key, x_fake, ok, carry) -> tuple[jax.Array, dict]:
        """Weighted D loss on sg(x_fake) (conditions ``batch["cond"]``) and the real ``batch["real"]``."""
        k = streams(key, "fake", "real")
        real = batch["real"]
        fake_t, t_fake = self.noised(k["fake"], jax.lax.stop_gradient(x_fake))
        real_t, t_real = self.noised(k["real"], real["x0"])
        # One trunk pass over generated and real samples together.
        both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), batch["cond"], real["cond"])
        logits = self.logits(
            params, jnp.concatenate([fake_t, real_t]), jnp.concatenate([t_fake, t_real]), both
        )
        l_fake, l_real = jnp.split(logits, [fake_t.shape[0]])
        d, _ = gan_losses(l_real, l_fake, self.cfg.loss)
        loss = masked_mean(d, ok)
        metrics = {"gan_d": loss, "logit_real": jnp.mean(l_real), "logit_fake": jnp.mean(l_fake)}
        return self.on(carry) * self.cfg.discriminator_weight * loss, metrics

    def generator_loss(
        self, params, x_t: jax.Array, t: jax.Array, cond: PyTree, ok: jax.Array, weight=None
    ) -> tuple[jax.Array, dict]:
        """The unweighted G loss of noised generated samples ``x_t`` (gradient through them), masked mean."""
        logits = self.logits(params, x_t, t, cond)
        _, g = gan_losses(logits, logits, self.cfg.loss)
        if weight is not None:
            g = g * weight
        loss = masked_mean(g, ok)
        return loss, {"gan_g": loss, "logit_generated": jnp.mean(logits)}

    def combine(self, main: jax.Array, adversarial: jax.Array, carry) -> jax.Array:
        """The generator's total: main alone before ``start_step``; main_weight main + lambda_G adv after."""
        on = self.on(carry)
        scale = 1.0 + on * (self.cfg.main_weight - 1.0)
        return scale * main + on * self.cfg.generator_weight * adversarial


def build_discriminator(config: ml_collections.ConfigDict, world, trunk: Network) -> Discriminator:
    """The head network ``discriminator`` on ``trunk``'s bottleneck features, shaped from an abstract call."""
    gan = config.method.gan
    if gan.loss not in GAN_KINDS:
        raise ValueError(f"method.gan.loss={gan.loss!r}; choose one of {GAN_KINDS}")
    if "discriminator" not in config.networks:
        raise ValueError("method.gan is on, but config.networks has no 'discriminator' section")
    if world.data is None:
        raise ValueError("method.gan needs real samples, and this teacher's world has no data source")
    cfg = config.networks.discriminator
    schedule = world.teacher.schedule
    cond = jax.tree.map(lambda u: jnp.reshape(jnp.asarray(u), (1, *np.shape(u)[1:])), world.uncond)
    x = jax.ShapeDtypeStruct((1, *world.sample_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    abstract = {**world.frozen, trunk.name: trunk.net.abstract}

    def features(params, x, t):
        return trunk.net.apply(trunk.net_params(params), x, t, cond, return_mid=True)[1]

    shape = tuple(jax.eval_shape(features, abstract, x, t).shape[1:])
    model = cfg.model
    net = Net(
        "discriminator",
        lambda rngs: DiscriminatorHead(shape, hidden=model.hidden, num_down=model.num_down, rngs=rngs),
    )
    head = Network(net, make_optimizer(cfg.optimizer, config.num_steps), cfg.ema_decay)
    return Discriminator(head, trunk, schedule, gan)
