"""LoRA on the Flax UNet: the merge against closed form, its gradients, and both export forms against
diffusers' own LoRA loading (peft) on a tiny pipeline."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jdistill.convert.export import LORA_FILE, export_lora_pipeline
from jdistill.convert.pipeline import load_pipeline
from jdistill.models.lora import LoRAConfig, init_lora, lora_state_dict, merge_lora, target_kernels

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def unet(tiny_pipelines):
    component = load_pipeline(str(tiny_pipelines["sd"]), components=("unet",)).components["unet"]
    return component.net, component.params


def _random_lora(params, config, seed=0):
    lora = init_lora(jax.random.key(seed), params, config)
    # B starts at zero; give it values so that the adapter does something.
    return {
        m: {"A": ab["A"], "B": 0.3 * jax.random.normal(jax.random.key(seed + 1 + i), ab["B"].shape)}
        for i, (m, ab) in enumerate(sorted(lora.items()))
    }


def test_targets_init_and_merge_closed_form(unet):
    _, params = unet
    config = LoRAConfig(rank=2, alpha=6.0)
    targets = target_kernels(params)
    assert Q in targets and all(m.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for m in targets)
    fresh = init_lora(jax.random.key(0), params, config)
    assert sorted(fresh) == sorted(targets)
    assert all(not np.any(np.asarray(ab["B"])) for ab in fresh.values())
    same = merge_lora(params, fresh, config)  # B = 0: the adapted network is the base
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(params), strict=True)
    )

    lora = _random_lora(params, config)
    merged = merge_lora(params, lora, config)
    w = params["down_blocks"][0]["attentions"][0]["transformer_blocks"][0]["attn1"]["to_q"]["kernel"]
    got = merged["down_blocks"][0]["attentions"][0]["transformer_blocks"][0]["attn1"]["to_q"]["kernel"]
    want = np.asarray(w, np.float64) + 3.0 * np.asarray(lora[Q]["A"], np.float64) @ np.asarray(
        lora[Q]["B"], np.float64
    )
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    untouched = params["conv_in"]["kernel"]
    assert np.array_equal(merged["conv_in"]["kernel"], untouched)

    with pytest.raises(ValueError, match="not in the base network"):
        merge_lora(params, {"nowhere.to_q": lora[Q]}, config)
    with pytest.raises(ValueError, match="4-d kernel; only linear"):
        target_kernels(params, ("proj_in",))  # the SD1-like UNet's proj_in is a 1x1 convolution
    with pytest.raises(ValueError, match="no linear layer matches"):
        target_kernels(params, ("no_such_layer",))


def test_merge_gradient_is_closed_form(unet):
    _, params = unet
    config = LoRAConfig(rank=2, alpha=4.0)
    lora = _random_lora(params, config)
    path = ("down_blocks", 0, "attentions", 0, "transformer_blocks", 0, "attn1", "to_q", "kernel")
    r = jax.random.normal(jax.random.key(9), params["conv_in"]["kernel"].shape)  # unused: a target elsewhere
    weight = jax.random.normal(jax.random.key(5), lora[Q]["A"].shape[:1] + lora[Q]["B"].shape[1:])

    def f(lora):
        merged = merge_lora(params, lora, config)
        leaf = merged
        for p in path:
            leaf = leaf[p]
        return jnp.sum(leaf * weight) + 0.0 * jnp.sum(merged["conv_in"]["kernel"] * r)

    grads = jax.grad(f)(lora)
    # d/dA sum(W' * R) = scale R B^T, d/dB = scale A^T R.
    np.testing.assert_allclose(grads[Q]["A"], 2.0 * weight @ lora[Q]["B"].T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[Q]["B"], 2.0 * lora[Q]["A"].T @ weight, rtol=1e-5, atol=1e-6)
    others = [m for m in lora if m != Q]
    assert all(not np.any(np.asarray(grads[m]["A"])) for m in others)


def test_lora_exports_load_in_diffusers(unet, tiny_pipelines, tmp_path):
    from diffusers import DiffusionPipeline

    net, params = unet
    config = LoRAConfig(rank=2, alpha=5.0)
    lora = _random_lora(params, config, seed=3)
    src = str(tiny_pipelines["sd"])
    common = dict(prediction="eps", timesteps=(999.0,))
    adapter = export_lora_pipeline(src, str(tmp_path / "lora"), params, lora, config, merged=False, **common)
    export_lora_pipeline(src, str(tmp_path / "merged"), params, lora, config, merged=True, **common)
    assert adapter["load_lora_weights"] == str(tmp_path / "lora") and (tmp_path / "lora" / LORA_FILE).exists()
    assert not (tmp_path / "merged" / LORA_FILE).exists()
    assert len(lora_state_dict(lora, config)) == 2 * len(lora)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([999, 400])
    ctx = rng.standard_normal((2, 7, 32)).astype(np.float32)
    ours = net.apply(
        merge_lora(params, lora, config),
        jnp.asarray(x.transpose(0, 2, 3, 1)),
        jnp.asarray(t),
        {"encoder_hidden_states": jnp.asarray(ctx)},
    )
    ours = np.asarray(ours).transpose(0, 3, 1, 2)
    base = np.asarray(
        net.apply(
            params,
            jnp.asarray(x.transpose(0, 2, 3, 1)),
            jnp.asarray(t),
            {"encoder_hidden_states": jnp.asarray(ctx)},
        )
    ).transpose(0, 3, 1, 2)
    assert np.abs(ours - base).max() > 1e-2 * np.abs(base).max(), "the LoRA must change the output"

    def run(pipe):
        with torch.no_grad():
            return pipe.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()

    with_adapter = DiffusionPipeline.from_pretrained(tmp_path / "lora")
    with_adapter.load_lora_weights(tmp_path / "lora")
    merged = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    scale = np.abs(ours).max()
    assert np.abs(run(with_adapter) - ours).max() / scale < 1e-5
    assert np.abs(run(merged) - ours).max() / scale < 1e-5


def test_lora_fake_score_network_starts_as_the_teacher_and_trains_only_its_adapters(tiny_pipelines):
    """swiftbrush's SD preset: the fake score is a LoRA on the frozen teacher (rank 64 on to_q / to_v)."""
    from helpers import load

    from jdistill.diffusion.denoiser import NetworkDenoiser
    from jdistill.methods import build_recipe
    from jdistill.teachers import build_world

    config = load(
        "configs/swiftbrush.py:sd15",
        [
            ("teacher.path", str(tiny_pipelines["sd"])),
            ("teacher.prompts", str(tiny_pipelines["prompts"])),
            ("teacher.resolution", "32"),
        ],
    )
    world = build_world(config)
    recipe = build_recipe(config, world)
    fake = recipe.network("fake_score")
    lora = fake.initial_params(jax.random.key(0), world.frozen)
    assert set(lora) == set(target_kernels(world.frozen["teacher"], ("to_q", "to_v")))
    params = {**world.frozen, "fake_score": lora}
    denoiser = NetworkDenoiser(fake.net, "eps", world.teacher.schedule)
    cond = jax.jit(world.prepare)(world.frozen, world.conditions.local_batch(0, 2))["cond"]
    x = jax.random.normal(jax.random.key(1), (2, *world.sample_shape))
    t = jnp.array([100, 700])
    ours = jax.jit(lambda p: denoiser.predict(fake.net_params(p), x, t, cond).eps)(params)
    teacher = jax.jit(lambda p: world.teacher.predict(p, x, t, cond).eps)(world.frozen["teacher"])
    np.testing.assert_array_equal(ours, teacher)  # B = 0: exactly the teacher

    def loss(adapters):
        return jnp.mean(
            denoiser.predict(fake.net_params({**params, "fake_score": adapters}), x, t, cond).eps ** 2
        )

    grads = jax.jit(jax.grad(loss))(lora)
    assert all(float(jnp.abs(g["B"]).sum()) > 0 for g in grads.values())  # B learns first (A B, B = 0)
    assert all(float(jnp.abs(g["A"]).sum()) == 0 for g in grads.values())


def test_lora_on_a_scanned_stack_adapts_every_layer_and_exports_per_layer():
    """A FLUX-style scanned stack: one adapter pair per stacked kernel, each layer's slice its own LoRA."""
    from flax import nnx

    from jdistill.models.layers import FP32, linear
    from jdistill.models.lora import LoRANet
    from jdistill.models.net import Net
    from jdistill.models.stack import Stack

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.to_q = linear(6, 6, rngs, FP32)
            self.other = linear(6, 6, rngs, FP32)

        def __call__(self, x):
            return x + jnp.tanh(self.to_q(x)) + self.other(x)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.transformer_blocks = Stack(Block, 3, rngs)
            self.to_q = linear(6, 4, rngs, FP32)  # an unstacked target beside the stack

        def __call__(self, x):
            return self.to_q(self.transformer_blocks(x))

    base = Net("m", lambda r: Model(r))
    params = base.init(jax.random.key(0))
    config = LoRAConfig(rank=2, alpha=4.0, targets=("to_q",))
    assert target_kernels(params, config.targets) == {
        "transformer_blocks.stacked.to_q": (3, 6, 6),
        "to_q": (6, 4),
    }
    lora = _random_lora(params, config)
    merged = merge_lora(params, lora, config)
    ab = lora["transformer_blocks.stacked.to_q"]
    for i in range(3):  # closed form per layer: W_i + scale A_i B_i
        want = params["transformer_blocks"]["stacked"]["to_q"]["kernel"][i] + 2.0 * ab["A"][i] @ ab["B"][i]
        np.testing.assert_allclose(
            merged["transformer_blocks"]["stacked"]["to_q"]["kernel"][i], want, atol=1e-6
        )
    np.testing.assert_array_equal(
        merged["transformer_blocks"]["stacked"]["other"]["kernel"],
        params["transformer_blocks"]["stacked"]["other"]["kernel"],
    )
    state = lora_state_dict(lora, config, prefix="transformer.")
    assert sorted(state) == sorted(
        [f"transformer.transformer_blocks.{i}.to_q.lora_{m}.weight" for i in range(3) for m in "AB"]
        + [f"transformer.to_q.lora_{m}.weight" for m in "AB"]
    )
    np.testing.assert_allclose(
        state["transformer.transformer_blocks.1.to_q.lora_B.weight"], 2.0 * ab["B"][1].T
    )
    net = LoRANet("m_lora", base, config)
    assert net.abstract["transformer_blocks.stacked.to_q"]["A"].shape == (3, 6, 2)
    assert net.logical_axes["transformer_blocks.stacked.to_q"]["A"] == (None, "lora", None)
    x = jax.random.normal(jax.random.key(1), (2, 6))
    out = net.apply({"base": params, "lora": lora}, x)
    np.testing.assert_allclose(out, base.apply(merged, x), atol=1e-6)
    grads = jax.grad(lambda lo: jnp.sum(net.apply({"base": params, "lora": lo}, x) ** 2))(lora)
    assert all(float(jnp.abs(g["B"]).sum()) > 0 for g in grads.values())  # every layer's adapter trains
    assert all(float(jnp.abs(g).sum()) > 0 for g in grads["transformer_blocks.stacked.to_q"]["B"])
