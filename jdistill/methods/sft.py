"""``sft``: denoising / flow-matching training of a model on data.

Trains the network ``model`` with the standard diffusion objective on the world's (x0, condition) data:
x_t = alpha_t x0 + sigma_t eps at t uniform over ``t_range``, loss = weighted MSE in parameterization
``target`` (default: the model's own), conditions dropped with probability ``cond_dropout`` so the model
also learns the unconditional denoiser that classifier-free guidance needs. Samples with DDIM (VP) or
flow Euler (flow), with guidance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jdistill.diffusion.denoiser import predict_cfg
from jdistill.diffusion.samplers import ode_plan, run_sampler
from jdistill.diffusion.schedules import sample_timesteps
from jdistill.methods.common import build_network, denoising_loss, drop_conditions, network_denoiser
from jdistill.methods.recipe import Pass, Recipe, Update
from jdistill.rng import streams

NETWORKS = ("model",)


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "name": "sft",
            "t_range": (0.0, 1.0),
            "cond_dropout": 0.1,
            "target": "",  # loss parameterization; empty: the model's own prediction type
            "weighting": "uniform",
            "sampler": {
                "steps": 50,
                "guidance_scale": 1.0,
                "cfg_convention": "uncond",
                "spacing": "trailing",
            },
        }
    )


def build(config: ml_collections.ConfigDict, world) -> Recipe:
    m = config.method
    schedule = world.teacher.schedule
    net_cfg = config.networks.model
    network = build_network("model", net_cfg, world, config.num_steps)
    model = network_denoiser(network, net_cfg, schedule)
    target = m.target or net_cfg.prediction
    lo, hi = m.t_range

    def loss(params, batch, key, carry):
        k = streams(key, "timestep", "noise", "dropout")
        x0 = batch["x0"]
        n = x0.shape[0]
        cond = drop_conditions(k["dropout"], batch["cond"], world.uncond, m.cond_dropout)
        t = sample_timesteps(schedule, k["timestep"], (n,), lo, hi)
        eps = jax.random.normal(k["noise"], x0.shape, jnp.float32)
        pred = model.predict(params["model"], schedule.add_noise(x0, eps, t), t, cond)
        value = denoising_loss(pred, x0, eps, target, m.weighting)
        return value, ({}, carry)

    sampler_cfg = m.sampler
    plan = ode_plan(schedule, sampler_cfg.steps, spacing=sampler_cfg.spacing)

    def sample(params, cond, key):
        n = jax.tree.leaves(cond)[0].shape[0]
        x = schedule.prior_sample(key, (n, *world.sample_shape))

        def denoise(x_t, t):
            return predict_cfg(
                model,
                params["model"],
                x_t,
                t,
                cond,
                world.uncond,
                sampler_cfg.guidance_scale,
                sampler_cfg.cfg_convention,
            )

        return run_sampler(denoise, x, plan)

    return Recipe(
        networks=(network,),
        updates=(Update("model", ("model",), loss, passes=(Pass("model", 1.0, "params"),)),),
        sample=sample,
        data="data",
        sample_with=("model",),
    )
