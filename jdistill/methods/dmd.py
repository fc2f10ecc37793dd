"""``dmd``: Distribution Matching Distillation (DMD v1): the distribution-matching gradient plus a regression
loss on precomputed teacher ODE pairs.

Reference: Yin et al., "One-step Diffusion with Distribution Matching Distillation", CVPR 2024
(arXiv 2311.18828) (the official code is not public; DMD2's
repository reimplements the distribution-matching part, which ``methods.dmd2`` shares).

Per step: generator update = 0.5 mean((x - sg(x - g))^2) with DMD2's direction g (teacher CFG w, fake score
without guidance, t ~ U{20..980}) + ``regression_weight`` * regression(G(z_ref, c_ref), y_ref) on a batch of
pairs; then the fake-score update on sg(x) (1:1). The batches come from the pairs (their conditions feed
the distribution-matching term too). The paper's regression is LPIPS on decoded images (lambda 0.25);
jdistill regresses in the student's output space with MSE, the choice that needs no extra network.
Pairs: ``method.pairs`` names a directory written by ``tools/make_ode_pairs.py``; with it empty,
``method.make_pairs`` pairs are generated in memory when the recipe is built (small teachers).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from jdistill.data.pairs import PairsSource
from jdistill.methods import dmd2
from jdistill.methods.distribution import finite_rows, masked_mean
from jdistill.methods.ode_pairs import generate_ode_pairs
from jdistill.methods.recipe import Pass, Recipe

NETWORKS = ("student", "fake_score")
REGRESSION_LOSSES = ("mse",)


def default_config() -> ml_collections.ConfigDict:
    config = dmd2.default_config()
    config.name = "dmd"
    del config.gan  # DMD has no GAN term (DMD2's addition)
    config.guidance_scale = 3.0  # the real score's CFG (the paper's FID model)
    config.generator_every = 1  # DMD updates generator and fake score 1:1
    config.regression_weight = 0.25
    config.regression_loss = "mse"
    config.pairs = ""  # directory from tools/make_ode_pairs.py
    config.make_pairs = 0  # with pairs empty: generate this many pairs in memory at build time
    config.pair_steps = 50  # teacher sampler steps for in-memory pairs
    return config


def build(config: ml_collections.ConfigDict, world) -> Recipe:
    m = config.method
    if len(m.student_timesteps) != 1:
        raise ValueError("dmd trains one-step students (student_timesteps must have one entry); see dmd2")
    if m.regression_loss not in REGRESSION_LOSSES:
        raise ValueError(f"method.regression_loss={m.regression_loss!r}; choose one of {REGRESSION_LOSSES}")
    if m.pairs:
        source = PairsSource.from_dir(m.pairs, seed=config.seed)
    elif m.make_pairs > 0:
        arrays = generate_ode_pairs(
            world,
            count=m.make_pairs,
            guidance_scale=m.guidance_scale,
            cfg_convention=m.cfg_convention,
            steps=m.pair_steps,
            seed=config.seed,
        )
        source = PairsSource(arrays, seed=config.seed)
    else:
        raise ValueError(
            "dmd needs teacher ODE pairs: set method.pairs (tools/make_ode_pairs.py) or method.make_pairs"
        )
    parts, _, dm_loss, dm_passes = dmd2.distribution_matching(config, world)
    (t_student,) = parts.student.timesteps

    def generator_loss(params, batch, key, carry):
        loss, (metrics, carry) = dm_loss(params, batch, key, carry)
        z, target = batch["z"], batch["x0"].astype(jnp.float32)
        n = z.shape[0]
        x_ref = parts.student.denoiser.predict(
            parts.student_params(params), z, jnp.full((n,), t_student), batch["cond"]
        ).x0
        per_sample = jnp.mean(((x_ref - target) ** 2).reshape(n, -1), axis=1)
        regression, dropped = masked_mean(per_sample, finite_rows(target))
        metrics = {
            **metrics,
            "regression": regression,
            "regression_nonfinite_rows": dropped,  # pairs left out (target or prediction not finite)
            "distribution_matching": loss,
        }
        return loss + m.regression_weight * regression, (metrics, carry)

    return parts.recipe(
        (
            # plus the regression's student forward on the pair's noise, differentiated
            parts.generator_update(
                generator_loss, (*dm_passes, Pass("student", 1.0, "params")), every=m.generator_every
            ),
            parts.fake_score_update(world, m),
        ),
        data=source,
    )
