"""Diffusion-GAN terms on the fake score's bottleneck (DMD2, SiD): where gradients go, the generator term
recomputed by hand, the warm-up switch, the head, the joint (conditions + real data) batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import SMALL, SMALL_SWIFTBRUSH_NETS, load
from helpers import abs_sum as _norm
from helpers import grads_wrt_trained as _grads

from jdistill import configuration, rng
from jdistill.data.joint import JointSource, split
from jdistill.data.sources import SyntheticSource
from jdistill.methods import build_recipe
from jdistill.methods.recipe import JOINT, Carry
from jdistill.models.heads import DiscriminatorHead
from jdistill.teachers import build_world

GAN_ON = [("method.gan.generator_weight", "0.3"), ("method.gan.discriminator_weight", "0.7")]
SMALL_HEAD = [("networks.discriminator.model.hidden", "16")]


def _setup(spec, *overrides):
    config = load(spec, [*SMALL, *SMALL_SWIFTBRUSH_NETS, *SMALL_HEAD, *overrides])
    world = build_world(config)
    recipe = build_recipe(config, world)
    params = {"teacher": {}}
    for i, net in enumerate(recipe.networks):
        params[net.name] = net.initial_params(jax.random.fold_in(jax.random.key(3), i), {})
    # Perturb the zero-initialised residual branches so that labels and features matter.
    params = {
        name: jax.tree.map(lambda p: p + 0.05 * jnp.sign(jnp.sin(jnp.arange(p.size).reshape(p.shape))), tree)
        if name != "teacher"
        else tree
        for name, tree in params.items()
    }
    host = recipe.source(world).local_batch(0, 32)
    batch = jax.jit(recipe.prepare(world))(world.frozen, host)
    return config, world, recipe, params, batch


def _update(recipe, name):
    return next(u for u in recipe.updates if u.name == name)


@pytest.mark.parametrize("spec", ["configs/dmd2.py:gmm", "configs/sid.py:gmm"])
def test_gan_networks_updates_and_gradients(spec):
    _, _, recipe, params, batch = _setup(spec, *GAN_ON)
    assert recipe.data == JOINT and [n.name for n in recipe.networks][-1] == "discriminator"
    gen, fake = _update(recipe, "generator"), _update(recipe, "fake_score")
    assert gen.trains == ("student",)  # the generator step never moves the fake score or the head
    assert fake.trains == ("fake_score", "discriminator")  # the head trains with its trunk, as DMD2's
    key = jax.random.key(0)
    carry = gen.loss(params, batch, key, Carry(step=0))[1][1]
    f = _grads(fake.loss, params, batch, key, carry)
    assert _norm(f["fake_score"]) > 0 and _norm(f["discriminator"]) > 0
    assert _norm(f["student"]) == 0.0  # the discriminator sees sg(x)
    # The GAN term reaches the student: its gradient differs from the GAN-off one.
    g_on = _grads(gen.loss, params, batch, key, Carry(step=0))["student"]
    _, _, recipe_off, _, _ = _setup(spec)
    g_off = _grads(_update(recipe_off, "generator").loss, params, batch, key, Carry(step=0))["student"]
    assert _norm(jax.tree.map(lambda a, b: a - b, g_on, g_off)) > 1e-4 * _norm(g_off)


def test_dmd2_generator_gan_gradient_is_the_softplus_term_through_x():
    """grad(total) - grad(DM only) = lambda_G grad mean softplus(-D(noise(G(z)))), D = head(fake trunk)."""
    config, world, recipe, params, batch = _setup("configs/dmd2.py:gmm", *GAN_ON)
    _, _, recipe_off, _, _ = _setup("configs/dmd2.py:gmm")
    key = jax.random.key(7)
    gen, gen_off = _update(recipe, "generator"), _update(recipe_off, "generator")
    student, fake = recipe.network("student").net, recipe.network("fake_score").net
    head, schedule = recipe.network("discriminator").net, world.teacher.schedule
    cond = batch["cond"]
    n = cond.shape[0]
    k_gen = rng.stream(rng.stream(key, "generate"), "latent")
    k_gan = rng.streams(rng.stream(key, "gan"), "timestep", "noise")

    def adversarial(p_student):
        x = student.apply(p_student, jax.random.normal(k_gen, (n, 2)), jnp.full((n,), 999.0), cond)
        lo, hi = config.method.gan.t_range
        t = jax.random.randint(k_gan["timestep"], (n,), int(lo * 1000), min(int(hi * 1000), 999) + 1)
        abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[t][:, None]
        x_t = jnp.sqrt(abar) * x + jnp.sqrt(1 - abar) * jax.random.normal(k_gan["noise"], x.shape)
        _, features = fake.apply(params["fake_score"], x_t, t.astype(jnp.float32), cond, return_mid=True)
        logits = head.apply(params["discriminator"], features)
        return jnp.mean(jax.nn.softplus(-logits))

    want = jax.tree.map(
        lambda g: config.method.gan.generator_weight * g, jax.grad(adversarial)(params["student"])
    )
    on = _grads(gen.loss, params, batch, key, Carry(step=0))["student"]
    off = _grads(gen_off.loss, params, batch, key, Carry(step=0))["student"]
    got = jax.tree.map(lambda a, b: a - b, on, off)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-6)
    assert _norm(want) > 0


@pytest.mark.parametrize("spec", ["configs/dmd2.py:gmm", "configs/sid.py:gmm"])
def test_gan_terms_wait_for_their_start_step(spec):
    start = [("method.gan.start_step", "100")]
    config, _, recipe, params, batch = _setup(spec, *GAN_ON, *start)
    _, _, recipe_off, _, _ = _setup(spec)
    key = jax.random.key(1)
    for name in ("generator", "fake_score"):
        on, off = _update(recipe, name).loss, _update(recipe_off, name).loss
        carried = {"generated": jnp.zeros((32, 2))} if name == "fake_score" else {}
        before = on(params, batch, key, Carry(step=99, **carried))[0]
        np.testing.assert_allclose(before, off(params, batch, key, Carry(step=99, **carried))[0], rtol=1e-6)
        after = on(params, batch, key, Carry(step=100, **carried))[0]
        assert abs(float(after) - float(before)) > 1e-6
    # SiD (main weight 0.5): once on, total = 0.5 L_SiD + lambda_G L_adv, as its metrics report.
    if config.method.name == "sid":
        loss, (metrics, _) = _update(recipe, "generator").loss(params, batch, key, Carry(step=100))
        want = 0.5 * metrics["sid"] + config.method.gan.generator_weight * metrics["gan_g"]
        np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_discriminator_learns_to_separate_real_from_generated():
    """A few Adam steps of the discriminator loss (head + trunk) push real logits above generated ones."""
    _, _, recipe, params, batch = _setup("configs/dmd2.py:gmm", *GAN_ON)
    disc_loss = _update(recipe, "fake_score").loss
    x_fake = jnp.asarray(np.random.default_rng(0).normal(0, 0.3, (32, 2)), jnp.float32)  # a blob at 0
    trained = {k: params[k] for k in ("fake_score", "discriminator")}
    opt = optax.adam(3e-3)
    state = opt.init(trained)

    @jax.jit
    def step(trained, state, key):
        def loss(tr):
            return disc_loss({**params, **tr}, batch, key, Carry(step=0, generated=x_fake))

        (_, (metrics, _)), grads = jax.value_and_grad(loss, has_aux=True)(trained)
        updates, state = opt.update(grads, state, trained)
        return optax.apply_updates(trained, updates), state, metrics

    first = None
    for i in range(150):
        trained, state, metrics = step(trained, state, jax.random.key(i))
        first = first or {k: float(v) for k, v in metrics.items()}
    assert first["gan_d"] > 1.2  # about log 4 at the start
    assert float(metrics["gan_d"]) < 0.8 * first["gan_d"]
    assert float(metrics["logit_real"]) > float(metrics["logit_fake"])


def test_discriminator_head_shapes():
    spatial = DiscriminatorHead((8, 8, 32), num_down=2, rngs=nnx.Rngs(0))
    assert spatial(jnp.ones((3, 8, 8, 32))).shape == (3,)
    flat = DiscriminatorHead((16,), hidden=8, rngs=nnx.Rngs(0))
    assert flat(jnp.ones((5, 16))).shape == (5,)
    with pytest.raises(ValueError, match=r"\(C,\) or \(H, W, C\)"):
        DiscriminatorHead((4, 4), rngs=nnx.Rngs(0))


def test_joint_source_reads_each_part_at_the_same_position():
    a = SyntheticSource(lambda r, n: {"cond": r.integers(0, 9, n)}, seed=1)
    b = SyntheticSource(lambda r, n: {"x0": r.normal(size=(n, 2)), "cond": r.integers(0, 9, n)}, seed=2)
    joint = JointSource((("gen", a), ("real", b)))
    rows = np.array([1, 3])
    batch = joint.local_batch(5, 4, rows)
    parts = split(batch)
    np.testing.assert_array_equal(parts["gen"]["cond"], a.local_batch(10, 4, rows)["cond"])
    np.testing.assert_array_equal(parts["real"]["x0"], b.local_batch(11, 4, rows)["x0"])
    # Parts seeded alike still draw different rows.
    same = JointSource((("gen", a), ("real", a))).local_batch(5, 64)
    assert not np.array_equal(same["gen/cond"], same["real/cond"])
    with pytest.raises(ValueError, match="no part prefix"):
        split({"cond": np.zeros(2)})


def test_gan_config_errors_name_the_problem():
    with pytest.raises(configuration.ConfigError, match=r"method\.gan\.loss"):
        load("configs/dmd2.py:gmm", [("method.gan.loss", "wasserstein")])
    cfg = load("configs/dmd2.py:gmm")
    cfg.unlock()
    cfg.networks.critic = cfg.networks.student
    with pytest.raises(configuration.ConfigError, match=r"optionally \['discriminator'\].*'critic'"):
        configuration.validate(cfg)
