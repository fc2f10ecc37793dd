"""MeanFlow on flow-matching transformer students (FLUX, SD3.5): the transformers' second timestep embedding
(``timestep_delta_embeds``), which starts at zero so that a copied student equals its teacher exactly, and two
recipe steps on the tiny FLUX and SD3.5 teachers under fsdp=2."""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny_configs
import tiny_flow_pipeline
from helpers import flow_teacher, load, logged_metrics

from jdistill.methods import meanflow
from jdistill.methods.recipe import Network
from jdistill.models.flux import FluxConfig, flux_net
from jdistill.models.sd3 import SD3Config, sd3_net

FLUX = FluxConfig(
    **tiny_configs.flux(
        num_layers=1,
        num_single_layers=1,
        joint_attention_dim=12,
        pooled_projection_dim=8,
        guidance_embeds=True,
    )
)
SD3 = SD3Config(
    **tiny_configs.sd3(
        sample_size=8,
        num_layers=2,
        joint_attention_dim=12,
        pooled_projection_dim=8,
        pos_embed_max_size=8,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
)
PROMPTS = ["a red circle", "the digit 3 on a blue square", "green of the square", "an 8"]


def model_inputs(family: str):
    rng = np.random.default_rng(0)
    if family == "flux":
        x = rng.standard_normal((2, 4, 4, 4))  # packs to 4 tokens of 16 channels
        cond = {
            "encoder_hidden_states": rng.standard_normal((2, 3, 12)),
            "pooled_projections": rng.standard_normal((2, 8)),
            "guidance": np.array([1.0, 3.5]),
        }
        t = np.array([0.9, 0.4])
    else:
        x = rng.standard_normal((2, 8, 8, 4))
        cond = {
            "encoder_hidden_states": rng.standard_normal((2, 3, 12)),
            "pooled_projections": rng.standard_normal((2, 8)),
        }
        t = np.array([900.0, 400.0])  # SD3 takes 1000 t
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), (x, t, cond))


def make_net(family: str, **changes):
    config = dataclasses.replace(FLUX if family == "flux" else SD3, **changes)
    return (flux_net if family == "flux" else sd3_net)(config)


def caller(net, family, x, t, cond):
    """``call(params, timestep_delta=None)``: the model's output on (x, t, cond), one compile per form."""
    method = "on_latents" if family == "flux" else None
    plain = jax.jit(lambda p: net.apply(p, x, t, cond, method=method))
    delta = jax.jit(lambda p, d: net.apply(p, x, t, cond, method=method, timestep_delta=d))

    def call(params, timestep_delta=None):
        out = (
            plain(params)
            if timestep_delta is None
            else delta(params, jnp.asarray(timestep_delta, jnp.float32))
        )
        return np.asarray(out)

    return call


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_delta_embedder_at_zero_is_the_model_without_it(family):
    teacher = make_net(family)
    student = make_net(family, timestep_delta_embeds=True)
    teacher_params = jax.jit(teacher.init)(jax.random.key(1))
    # meanflow's own init from the teacher: its parameters, the embedder's first linear copied from
    # timestep_embedder.linear_1, its last linear at zero.
    network = Network(net=student, optimizer=optax.identity(), init=lambda key, frozen: None)
    network = meanflow.start_as_teacher(meanflow.copy_with_delta_embedder(network))
    params = jax.jit(network.initial_params)(jax.random.key(2), {"teacher": teacher_params})
    params, teacher_params = jax.tree.map(np.asarray, (params, teacher_params))
    embed = params["time_text_embed"]
    delta = embed.pop("timestep_delta_embedder")
    assert jax.tree.structure(params) == jax.tree.structure(teacher_params)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, teacher_params)))
    np.testing.assert_array_equal(
        delta["linear_1"]["kernel"], embed["timestep_embedder"]["linear_1"]["kernel"]
    )
    assert not np.any(delta["linear_2"]["kernel"]) and not np.any(delta["linear_2"]["bias"])
    embed["timestep_delta_embedder"] = delta

    x, t, cond = model_inputs(family)
    teacher_call, student_call = (caller(n, family, x, t, cond) for n in (teacher, student))
    want = teacher_call(teacher_params)
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    scale = 1.0 if family == "flux" else 1000.0
    for d in (0.0, 0.3, 0.9):
        got = student_call(params, jnp.full((2,), d * scale))
        np.testing.assert_array_equal(got, want)

    # Random weights in the embedder's last linear: the output depends on t - r (and differs from the teacher).
    keys = iter(jax.random.split(jax.random.key(3), 2))
    delta["linear_2"] = jax.tree.map(
        lambda a: np.asarray(0.5 * jax.random.normal(next(keys), a.shape)), delta["linear_2"]
    )
    outs = [student_call(params, jnp.full((2,), d * scale)) for d in (0.0, 0.3, 0.9)]
    for a, b in ((outs[0], want), (outs[1], outs[0]), (outs[2], outs[1])):
        assert np.abs(a - b).max() > 1e-3 * np.abs(want).max()

    # The export's fold: at one fixed t - r the embedding is a bias of the teacher's architecture.
    for d in (0.25, 0.9):
        folded = meanflow.fold_delta_embedding(student, params, d * scale)
        assert jax.tree.structure(folded) == jax.tree.structure(teacher_params)
        got = teacher_call(folded)
        np.testing.assert_allclose(got, student_call(params, jnp.full((2,), d * scale)), rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="timestep_delta is required"):
        student_call(params)
    with pytest.raises(ValueError, match="has no timestep_delta_embeds"):
        teacher_call(teacher_params, jnp.zeros((2,)))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_config_option_is_jdistill_only(family):
    """A config without the option exports diffusers' keys as before; with it, the key round-trips."""
    base = FLUX if family == "flux" else SD3
    assert "timestep_delta_embeds" not in base.to_dict()
    on = dataclasses.replace(base, timestep_delta_embeds=True)
    assert on.to_dict()["timestep_delta_embeds"] is True
    assert type(base).from_dict(on.to_dict()) == on
    names = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(make_net(family).abstract)
    ]
    assert not any("delta" in n for n in names)


def meanflow_overrides(preset: str, pipelines, images, *extra):
    return [
        *flow_teacher(preset, pipelines[preset], pipelines["prompts"], images),
        # 16 px (8x8 latents), 4 samples a batch, one checkpoint: the smallest run that checks the plumbing.
        ("teacher.resolution", "16"),
        ("batch_size", "4"),
        ("sample.count", "4"),
        ("sample.final_count", "4"),
        ("sample.batch", "4"),
        ("checkpoint.every", "2"),
        ("networks.student.model.time_cond_proj_dim", "0"),
        *extra,
    ]


def test_meanflow_refuses_a_transformer_student_without_the_option(pipelines, images):
    world = types.SimpleNamespace(nets={"teacher": make_net("flux")})
    config = load("configs/meanflow.py:digits", meanflow_overrides("flux_dev", pipelines, images))
    with pytest.raises(ValueError, match=r"networks\.student\.model\.timestep_delta_embeds=True"):
        meanflow.build(config, world)
    both = [
        ("networks.student.model.timestep_delta_embeds", "true"),
        ("networks.student.model.time_cond_proj_dim", "64"),
    ]
    config = load("configs/meanflow.py:digits", meanflow_overrides("flux_dev", pipelines, images, *both))
    with pytest.raises(ValueError, match=r"time_cond_proj_dim=0"):
        meanflow.build(config, world)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    return tiny_flow_pipeline.save_flow_pipelines(tmp_path_factory.mktemp("meanflow_flow"), PROMPTS)


@pytest.mark.parametrize(
    "preset",
    ["flux_dev", pytest.param("sd35_medium", marks=pytest.mark.e2e)],  # SD3's JVP step: minutes cold
)
def test_meanflow_runs_on_a_flow_teacher_under_fsdp(preset, pipelines, images, tmp_path):
    """Two MeanFlow steps with a transformer student (forward-mode JVP through it) on the tiny FLUX and SD3.5
    teachers, parameters split over fsdp=2: finite losses and samples, the t - r embedder trained away from
    zero."""
    from jdistill import train

    overrides = meanflow_overrides(
        preset,
        pipelines,
        images,
        ("networks.student.model.timestep_delta_embeds", "true"),
        ("method.jvp", "jvp"),
        ("num_steps", "2"),
        ("mesh.num_devices", "2"),
        ("mesh.data", "1"),
        ("mesh.fsdp", "2"),
    )
    config = load("configs/meanflow.py:digits", overrides)
    workdir = tmp_path / preset
    results = train.train(config, str(workdir))
    assert results["finite"] == 1.0
    lines = logged_metrics(workdir)
    losses = [m["student/loss"] for m in lines if "student/loss" in m]
    assert len(losses) == 2 and np.all(np.isfinite(losses)), lines
    # The last checkpoint's student, read as saved (no second world build): the t - r embedder's last linear,
    # zero at the start, has been trained.
    import orbax.checkpoint as ocp

    student = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "2" / "student")
    last = np.asarray(student["time_text_embed"]["timestep_delta_embedder"]["linear_2"]["kernel"])
    assert np.isfinite(last).all() and np.abs(last).max() > 0
