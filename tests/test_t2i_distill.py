"""T2I-Distill's sCM and MeanFlow settings on FLUX.1-lite (configs/scm.py:flux_lite, configs/meanflow.py:flux_lite).

- the x1 time scale (``timestep_scale``) against diffusers' FluxTransformer2DModel fed the same numbers / 1000;
- MeanFlow's second time embedder copied from the first, and the exported diffusers class (with that embedder)
  against jdistill's transformer;
- MeanFlow's (r, t) draws against the logit-normal they come from;
- the acceptance runs: ``python -m jdistill.main --config configs/<recipe>.py:flux_lite`` with only the teacher
  path, data, resolution, batch and step count overridden, on 8 fake devices with fsdp, resumed bit-exactly and
  exported; diffusers draws what jdistill's sampler draws (sCM: plain FluxPipeline at one and two steps;
  MeanFlow: FluxPipeline with the exported MeanFlow transformer class at four steps).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_flux import LATENT, TEXT, inputs, rel_err, torch_flux, torch_forward

from jdistill.convert.flux import flux_state_dict, load_flux
from jdistill.models.flux import FluxConfig, image_ids, pack_latents, text_ids


@pytest.fixture(scope="module")
def guided_flux():
    """(torch FluxTransformer2DModel with a guidance embedding, its numpy state dict)."""
    model = torch_flux(True)
    return model, {k: v.numpy() for k, v in model.state_dict().items()}


def test_time_scale_one_is_diffusers_fed_times_over_1000(guided_flux):
    """x1 time and guidance inputs: our FLUX at (t, g) is diffusers' at (t / 1000, g / 1000) (diffusers multiplies
    both by 1000); the default scale is diffusers' own."""
    model, state = guided_flux
    config = dataclasses.replace(FluxConfig.from_dict(dict(model.config)), timestep_scale=1.0)
    net, params = load_flux(state, config)
    latents, t, cond = inputs(True)
    t = np.array([0.3, 0.85], np.float32)
    cond["guidance"] = np.array([4.0, 5.0], np.float32)
    packed = pack_latents(latents)
    grid = image_ids(LATENT[0] // 2, LATENT[1] // 2)
    ours = jax.jit(lambda p, x, s, c: net.apply(p, x, s, c, img_ids=grid))(
        params, packed, t, jax.tree.map(jnp.asarray, cond)
    )
    scaled = {**cond, "guidance": cond["guidance"] / 1000.0}
    with torch.no_grad():
        ref = torch_forward(model, packed, t / 1000.0, scaled).numpy()
        plain = torch_forward(model, packed, t, cond).numpy()
    assert rel_err(ours, ref) < 1e-4
    assert rel_err(ours, plain) > 1e-2  # the scale matters


def test_time_scale_is_a_jdistill_only_config_key():
    base = FluxConfig()
    assert "timestep_scale" not in base.to_dict()  # a teacher's config.json stays diffusers'
    own = dataclasses.replace(base, timestep_scale=1.0)
    assert own.to_dict()["timestep_scale"] == 1.0
    assert FluxConfig.from_dict(own.to_dict()) == own
    with pytest.raises(ValueError, match="timestep_scale"):
        FluxConfig.from_dict({**own.to_dict(), "timestep_scale": 0})


def _torch_meanflow(model, state, scale: float, times):
    """The exported diffusers class (jdistill/convert/meanflow_flux.py) built from ``model``'s config."""
    from jdistill.convert.meanflow_flux import MeanFlowFluxTransformer2DModel

    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    out = MeanFlowFluxTransformer2DModel(**config, timestep_scale=scale, meanflow_times=list(times)).eval()
    missing, unexpected = out.load_state_dict(
        {k: torch.from_numpy(v) for k, v in state.items()}, strict=False
    )
    assert not unexpected and missing and all("timestep_delta_embedder" in k for k in missing)
    return out


def test_exported_meanflow_class_matches_jdistill_with_its_second_time(guided_flux):
    """jdistill's FLUX with the t - r embedder (x1 scale) and the diffusers class the export writes, given the
    same weights: equal at (t, r) where r is the next of the class's times; a time off the list is refused."""
    model, state = guided_flux
    config = dataclasses.replace(
        FluxConfig.from_dict(dict(model.config)), timestep_scale=1.0, timestep_delta_embeds=True
    )
    rng = np.random.default_rng(3)
    dim = config.inner_dim
    delta = {
        "time_text_embed.timestep_delta_embedder.linear_1.weight": 0.2 * rng.standard_normal((dim, 256)),
        "time_text_embed.timestep_delta_embedder.linear_1.bias": 0.2 * rng.standard_normal(dim),
        "time_text_embed.timestep_delta_embedder.linear_2.weight": 0.2 * rng.standard_normal((dim, dim)),
        "time_text_embed.timestep_delta_embedder.linear_2.bias": 0.2 * rng.standard_normal(dim),
    }
    full = {**state, **{k: v.astype(np.float32) for k, v in delta.items()}}
    net, params = load_flux(full, config)
    assert set(flux_state_dict(params)) == set(full)  # the embedder round-trips under its diffusers names
    times = (1.0, 0.85, 0.6, 0.3)
    theirs = _torch_meanflow(model, state, 1.0, times)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in full.items()})
    latents, _, cond = inputs(True)
    cond["guidance"] = np.array([4.5, 4.5], np.float32)
    t, r = np.array([0.85, 0.3], np.float32), np.array([0.6, 0.0], np.float32)
    packed = pack_latents(latents)
    grid = image_ids(LATENT[0] // 2, LATENT[1] // 2)
    ours = jax.jit(lambda p, x, a, b, c: net.apply(p, x, a, c, img_ids=grid, timestep_delta=a - b))(
        params, packed, t, r, jax.tree.map(jnp.asarray, cond)
    )
    kwargs = dict(
        hidden_states=torch.from_numpy(packed),
        encoder_hidden_states=torch.from_numpy(cond["encoder_hidden_states"]),
        pooled_projections=torch.from_numpy(cond["pooled_projections"]),
        img_ids=torch.tensor(grid),
        txt_ids=torch.tensor(text_ids(TEXT)),
        guidance=torch.from_numpy(cond["guidance"]),  # FluxPipeline passes the guidance scale as is
    )
    with torch.no_grad():
        ref = theirs(
            timestep=torch.from_numpy(t), **kwargs
        ).sample.numpy()  # FluxPipeline: sigma * 1000 / 1000
        with pytest.raises(ValueError, match="meanflow_times"):
            theirs(timestep=torch.tensor([0.5, 0.5]), **kwargs)
    assert rel_err(ours, ref) < 1e-4
    # r matters: the same t with r = t (delta 0) differs.
    same = jax.jit(lambda p, x, a, c: net.apply(p, x, a, c, img_ids=grid, timestep_delta=0.0 * a))(
        params, packed, t, jax.tree.map(jnp.asarray, cond)
    )
    assert rel_err(same, ref) > 1e-2
