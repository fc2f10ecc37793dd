"""Diffusion-GAN terms whose discriminator is a head on the fake score's bottleneck features.

DMD2 and SiDA / few-step SiD classify noised real and generated
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

``TeacherDiscriminator`` is LADD as SANA-Sprint adds it to sCM (docs/adversarial.md): heads on several feature
maps of the frozen teacher itself (for a UNet: its down blocks' and mid block's outputs), the teacher shared and
never trained or copied, only the heads in ``networks.discriminator``. Samples are noised on the TrigFlow path
at t_D = arctan(e^tau / sigma_d), tau ~ N(``time_mean``, ``time_std``), which is the logit-normal flow time
s = sigmoid(tau) carried to TrigFlow by matching noise-to-signal ratios (flow: s / (1 - s) = e^tau, TrigFlow:
sigma_d tan t) and is SANA-Sprint's own "logit_normal_trigflow" sampler; the teacher reads them at the time of
its own path with the same ratio (``diffusion.reparameterize``). Logits are per location (SANA-Sprint's heads
classify every token), losses their per-sample means. The discriminator update sees sg(student x0), the real
images, and (``misaligned``) the real images with rolled conditions as extra fakes, plus an R1-style penalty
on the heads' inputs for the real samples (``r1_weight``; 0: off); the generator's loss flows through the
frozen teacher into the student's x0, the heads held fixed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdistill.configuration import ConfigError
from jdistill.diffusion.denoiser import Denoiser, NetworkDenoiser
from jdistill.diffusion.reparameterize import MatchedDenoiser
from jdistill.diffusion.schedules import Schedule, TrigFlowSchedule, sample_timesteps
from jdistill.methods.distribution import GAN_KINDS, gan_losses, masked_mean
from jdistill.methods.recipe import Carry, Network
from jdistill.methods.trajectory import per_sample_sum, trigflow_times
from jdistill.models.heads import DiscriminatorHead, DiscriminatorHeads
from jdistill.models.net import Net
from jdistill.optim import make_optimizer, optimizer_config
from jdistill.rng import stream, streams

# The settings a method with a GAN term (method.gan, networks.discriminator) adds to its CONFIG_CHOICES.
GAN_CHOICES = {"method.gan.loss": GAN_KINDS, "networks.discriminator.model.arch": ("head",)}

PyTree = Any
Features = Callable[[PyTree, jax.Array, jax.Array, PyTree], tuple[jax.Array, ...]]


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


def ladd_config(**overrides) -> ml_collections.ConfigDict:
    """``method.gan`` of sCM's LADD term (SANA-Sprint): ``gan_config``'s switches without its t_range (t_D is
    drawn as below); off unless a weight is positive."""
    cfg = gan_config(loss="hinge")
    del cfg["t_range"]
    cfg.update(
        {
            "time_mean": -0.6,  # t_D = arctan(exp(tau) / sigma_d), tau ~ N(time_mean, time_std)
            "time_std": 1.0,
            "max_time_prob": 0.5,  # the generator's adversarial pass starts from pure noise (t = pi/2)
            "misaligned": True,  # real images with shifted prompts as extra fakes
            "r1_weight": 0.0,  # R1-style penalty on the heads' inputs; 0: off
            "feature_layers": (),  # which teacher feature maps get a head (UNet: down blocks, then mid); (): all
        }
    )
    cfg.update(overrides)
    return cfg


def enabled(gan: ml_collections.ConfigDict | None) -> bool:
    return gan is not None and (gan.generator_weight > 0 or gan.discriminator_weight > 0)


class _Switched:
    """The warm-up switch and the generator's total of a GAN term configured by ``self.cfg`` (method.gan)."""

    cfg: ml_collections.ConfigDict

    def on(self, carry: Carry) -> jax.Array:
        """1.0 from ``start_step`` on (the step number is the carry's), else 0.0."""
        return (jnp.asarray(carry.step) >= self.cfg.start_step).astype(jnp.float32)

    def combine(self, main: jax.Array, adversarial: jax.Array, carry: Carry) -> jax.Array:
        """The generator's total: main alone before ``start_step``; main_weight main + lambda_G adv after."""
        on = self.on(carry)
        scale = 1.0 + on * (self.cfg.main_weight - 1.0)
        return scale * main + on * self.cfg.generator_weight * adversarial

    def clamped(self, logits: jax.Array) -> jax.Array:
        """Logits clamped to +-``logit_clamp`` (0: as they are)."""
        clamp = self.cfg.logit_clamp
        return jnp.clip(logits, -clamp, clamp) if clamp > 0 else logits


@dataclasses.dataclass(frozen=True, eq=False)
class Discriminator(_Switched):
    head: Network
    trunk: Network  # the fake score whose bottleneck features the head reads
    schedule: Schedule
    cfg: ml_collections.ConfigDict  # method.gan

    def logits(self, params, x_t: jax.Array, t: jax.Array, cond: PyTree) -> jax.Array:
        """One float32 logit per sample; trunk and head run on ``params`` (frozen or not: the caller's grad)."""
        trunk_in = self.trunk.net_params(params)
        features = self.trunk.net.apply(trunk_in, x_t, self.schedule.model_time(t), cond, mid_only=True)
        return self.clamped(self.head.net.apply(params[self.head.name], features))

    def noised(self, key: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        k = streams(key, "timestep", "noise")
        t = sample_timesteps(self.schedule, k["timestep"], (x.shape[0],), *self.cfg.t_range)
        eps = jax.random.normal(k["noise"], x.shape, jnp.float32)
        return self.schedule.add_noise(x.astype(jnp.float32), eps, t), t

    def discriminator_loss(self, params, batch, key, x_fake, ok, carry: Carry) -> tuple[jax.Array, dict]:
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
        loss, dropped = masked_mean(d, ok)
        metrics = {
            "gan_d": loss,
            "gan_d_nonfinite_rows": dropped,
            "logit_real": jnp.mean(l_real),
            "logit_fake": jnp.mean(l_fake),
        }
        return self.on(carry) * self.cfg.discriminator_weight * loss, metrics

    def generator_loss(
        self, params, x_t: jax.Array, t: jax.Array, cond: PyTree, ok: jax.Array, weight=None
    ) -> tuple[jax.Array, dict]:
        """The unweighted G loss of noised generated samples ``x_t`` (gradient through them), masked mean."""
        logits = self.logits(params, x_t, t, cond)
        _, g = gan_losses(logits, logits, self.cfg.loss)
        if weight is not None:
            g = g * weight
        loss, dropped = masked_mean(g, ok)
        return loss, {"gan_g": loss, "gan_g_nonfinite_rows": dropped, "logit_generated": jnp.mean(logits)}


def _check(config: ml_collections.ConfigDict, world) -> None:
    gan = config.method.gan
    if gan.loss not in GAN_KINDS:
        raise ConfigError(f"method.gan.loss={gan.loss!r}; choose one of {GAN_KINDS}")
    if "discriminator" not in config.networks:
        raise ConfigError("method.gan is on, but config.networks has no 'discriminator' section")
    if world.data is None:
        raise ConfigError(
            "method.gan needs real samples, and this teacher's world has no data source "
            "(teacher.data: a folder or table of captioned images)"
        )


def _probe(world) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct, PyTree]:
    """(x, t, cond) of one sample, for abstract calls that shape the heads."""
    cond = jax.tree.map(lambda u: jnp.reshape(jnp.asarray(u), (1, *np.shape(u)[1:])), world.uncond)
    x = jax.ShapeDtypeStruct((1, *world.sample_shape), jnp.float32)
    return x, jax.ShapeDtypeStruct((1,), jnp.float32), cond


def _heads(config: ml_collections.ConfigDict, make) -> Network:
    """The trained network ``discriminator`` (``make(model config) -> module constructor``) and its optimizer."""
    cfg = config.networks.discriminator
    net = Net("discriminator", make(cfg.model))
    return Network(net, make_optimizer(cfg.optimizer, config.num_steps), cfg.ema_decay)


def build_discriminator(config: ml_collections.ConfigDict, world, trunk: Network) -> Discriminator:
    """The head network ``discriminator`` on ``trunk``'s bottleneck features, shaped from an abstract call."""
    from jdistill.diffusion.transformer_denoiser import transformer_family

    _check(config, world)
    if transformer_family(trunk.net) is not None:
        raise ValueError(
            f"the diffusion-GAN head reads a UNet's mid block; network {trunk.name!r} is a flow transformer "
            "(FLUX / SD3), which has no head yet: set method.gan.generator_weight=0"
        )
    x, t, cond = _probe(world)
    abstract = {**world.frozen, trunk.name: trunk.net.abstract}

    def features(params, x, t):
        return trunk.net.apply(trunk.net_params(params), x, t, cond, mid_only=True)

    shape = tuple(jax.eval_shape(features, abstract, x, t).shape[1:])
    head = _heads(
        config,
        lambda model: (
            lambda rngs: DiscriminatorHead(shape, hidden=model.hidden, num_down=model.num_down, rngs=rngs)
        ),
    )
    return Discriminator(head, trunk, world.teacher.schedule, config.method.gan)


# ------------------------------------------------------------------------------------------------ LADD


def r1_penalty(heads: Callable[[list[jax.Array]], jax.Array], features: Sequence[jax.Array]) -> jax.Array:
    """SANA-Sprint's R1-style penalty: mean over samples of sum_h |d sum(D_h) / d f_h|^2, divided by the number
    of heads, in float32. ``heads`` maps the feature maps to logits; a sample's logits depend on its own
    features only (group norm is per sample), so one gradient of the total gives every per-sample gradient."""
    feats = [jnp.asarray(f, jnp.float32) for f in features]
    grads = jax.grad(lambda fs: jnp.sum(heads(fs)))(feats)
    return jnp.mean(sum(per_sample_sum(g**2) for g in grads)) / len(feats)


def teacher_features(teacher: Denoiser, world) -> Features:
    """(teacher params, x_t, t, cond) -> the teacher network's feature maps, for ``teacher`` the world's teacher
    as seen on another path (``on_schedule``): the network reads (x_t, t) at its own path's time of the same
    noise-to-signal ratio, rescaled, as its predictions do."""
    matched = isinstance(teacher, MatchedDenoiser)
    base = teacher.base if matched else teacher
    if "teacher" not in world.nets or not isinstance(base, NetworkDenoiser):
        raise ConfigError(
            f"method.gan (LADD) puts its heads on features of the teacher network, and this teacher "
            f"({type(base).__name__}) has none: the analytic gmm teacher is a closed form; use a UNet teacher"
        )

    def features(params, x_t, t, cond):
        x, s = teacher.base_inputs(x_t, t) if matched else (x_t, t)
        return base.net.apply(params, x, base.schedule.model_time(s), cond, return_features=True)[1]

    return features


@dataclasses.dataclass(frozen=True, eq=False)
class TeacherDiscriminator(_Switched):
    heads: Network  # "discriminator": one head per teacher feature map, the only trained part
    trunk: Features  # the frozen teacher's chosen feature maps at TrigFlow (x_t, t)
    schedule: TrigFlowSchedule
    cfg: ml_collections.ConfigDict  # method.gan
    time_eps: float = 1e-3

    def noised(self, key: jax.Array, x0: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(x_t, t_D): ``x0`` (TrigFlow data) noised at t_D = arctan(e^tau / sigma_d),
        tau ~ N(time_mean, time_std)."""
        k = streams(key, "time", "noise")
        n = x0.shape[0]
        sigma_data = self.schedule.sigma_data
        t = trigflow_times(k["time"], n, self.cfg.time_mean, self.cfg.time_std, sigma_data, self.time_eps)
        eps = jax.random.normal(k["noise"], x0.shape, jnp.float32)
        return self.schedule.add_noise(x0.astype(jnp.float32), eps, t), t

    def features(self, params, x_t: jax.Array, t: jax.Array, cond: PyTree) -> list[jax.Array]:
        return [f.astype(jnp.float32) for f in self.trunk(params["teacher"], x_t, t, cond)]

    def logits(self, head_params, features: Sequence[jax.Array]) -> jax.Array:
        """Per-location logits of every head, (B, L), optionally clamped."""
        return self.clamped(self.heads.net.apply(head_params, features))

    def generator_loss(
        self, params, x0: jax.Array, cond: PyTree, key: jax.Array, ok: jax.Array
    ) -> tuple[jax.Array, dict]:
        """The unweighted G loss of the student's ``x0``, re-noised at t_D: its gradient flows through the frozen
        teacher into x0; the heads are held fixed (only the discriminator update trains them)."""
        x_t, t = self.noised(key, x0)
        heads = jax.lax.stop_gradient(params[self.heads.name])
        logits = self.logits(heads, self.features(params, x_t, t, cond))
        _, g = gan_losses(logits, logits, self.cfg.loss)
        loss, dropped = masked_mean(g, ok)
        return loss, {"gan_g": loss, "gan_g_nonfinite_rows": dropped, "logit_generated": jnp.mean(logits)}

    def discriminator_inputs(self, x_fake: jax.Array, real: dict, key: jax.Array) -> dict[str, tuple]:
        """(x_t, t_D, cond) per group, each noised with its own draws: "fake" (sg(x_fake) with the batch's
        conditions), "misaligned" (the real images with the conditions rolled by one, SANA-Sprint's shifted
        pairs: extra fakes; with ``cfg.misaligned`` and more than one sample) and "real"."""
        cond, n = real["cond"], real["x0"].shape[0]
        groups = {"fake": (jax.lax.stop_gradient(x_fake), cond)}
        if self.cfg.misaligned and n > 1:
            groups["misaligned"] = (real["x0"], jax.tree.map(lambda c: jnp.roll(c, 1, axis=0), cond))
        groups["real"] = (real["x0"], cond)
        return {name: (*self.noised(stream(key, name), x), c) for name, (x, c) in groups.items()}

    def discriminator_loss(
        self, params, x_fake: jax.Array, ok: jax.Array, real: dict, key: jax.Array, carry: Carry
    ) -> tuple[jax.Array, dict]:
        """discriminator_weight x the GAN loss of real pairs against sg(x_fake) and the misaligned pairs (the
        fakes' per-location terms averaged together) + r1_weight x R1 on the real samples' head inputs."""
        inputs = self.discriminator_inputs(x_fake, real, key)
        names = list(inputs)
        x_t, t, cond = (
            jax.tree.map(lambda *parts: jnp.concatenate(parts), *(inputs[g][i] for g in names))
            for i in range(3)
        )
        # One teacher pass over every group; its features are constants for the heads.
        features = jax.lax.stop_gradient(self.features(params, x_t, t, cond))
        head = params[self.heads.name]
        parts = dict(zip(names, jnp.split(self.logits(head, features), len(names)), strict=True))
        fakes = jnp.concatenate([parts[g] for g in names if g != "real"], axis=1)
        d, _ = gan_losses(parts["real"], fakes, self.cfg.loss)
        loss, dropped = masked_mean(d, ok)
        metrics = {
            "gan_d": loss,
            "gan_d_nonfinite_rows": dropped,
            "logit_real": jnp.mean(parts["real"]),
            "logit_fake": jnp.mean(parts["fake"]),
        }
        if "misaligned" in parts:
            metrics["logit_misaligned"] = jnp.mean(parts["misaligned"])
        total = self.cfg.discriminator_weight * loss
        if self.cfg.r1_weight > 0:
            n = real["x0"].shape[0]  # the real group comes last
            r1 = r1_penalty(lambda fs: self.heads.net.apply(head, fs), [f[-n:] for f in features])
            metrics["r1"] = r1
            total = total + self.cfg.r1_weight * r1
        return self.on(carry) * total, metrics


def build_teacher_discriminator(
    config: ml_collections.ConfigDict, world, teacher: Denoiser, time_eps: float = 1e-3
) -> TeacherDiscriminator:
    """LADD's heads on ``teacher`` (the world's teacher on the TrigFlow path), one per chosen feature map,
    shaped from an abstract call."""
    _check(config, world)
    if not isinstance(teacher.schedule, TrigFlowSchedule):
        raise ValueError(
            "LADD's discriminator noises on the TrigFlow path; put the teacher on it (on_schedule)"
        )
    every = teacher_features(teacher, world)
    x, t, cond = _probe(world)
    try:
        shapes = jax.eval_shape(lambda p, x, t: every(p, x, t, cond), world.frozen["teacher"], x, t)
    except TypeError as err:  # a network whose call has no return_features
        raise ConfigError(
            f"method.gan (LADD) needs the teacher network's intermediate features, and it returns none ({err})"
        ) from err
    gan, count = config.method.gan, len(shapes)
    layers = tuple(gan.feature_layers) or tuple(range(count))
    bad = [i for i in layers if not -count <= i < count]
    if bad or len(set(i % count for i in layers)) != len(layers):
        raise ConfigError(
            f"method.gan.feature_layers={tuple(gan.feature_layers)}: the teacher has {count} feature maps "
            f"(indices 0..{count - 1}: down blocks, then the mid block), each used at most once"
        )
    layers = tuple(i % count for i in layers)
    chosen = [tuple(shapes[i].shape[1:]) for i in layers]

    def trunk(params, x_t, t, cond):
        features = every(params, x_t, t, cond)
        return tuple(features[i] for i in layers)

    heads = _heads(
        config,
        lambda model: (
            lambda rngs: DiscriminatorHeads(chosen, hidden=model.hidden, num_down=model.num_down, rngs=rngs)
        ),
    )
    return TeacherDiscriminator(heads, trunk, teacher.schedule, gan, time_eps)
