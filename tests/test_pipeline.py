"""Loading whole diffusers pipelines: components, variants, shards, pickles, converted directories, the
teacher adapter against diffusers' own pipeline (prompt encoding, unconditional rule, CFG), and
tools/convert_teacher.py."""

from __future__ import annotations

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import load, tool

from jdistill.convert.converted import convert_pipeline
from jdistill.convert.core import ConversionError
from jdistill.convert.export import copy_component
from jdistill.convert.pipeline import load_pipeline
from jdistill.diffusion.denoiser import predict_cfg
from jdistill.teachers import build_world


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same(a, b) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def tiny_config(pipelines, preset: str, *overrides):
    return load(
        f"tests/configs/tiny_unet.py:{preset}",
        [
            ("teacher.path", str(pipelines[preset])),
            ("teacher.prompts", str(pipelines["prompts"])),
            *overrides,
        ],
    )


@pytest.mark.parametrize("preset", ["sd", "sdxl"])
def test_load_pipeline_components(tiny_pipelines, preset):
    pipe = load_pipeline(str(tiny_pipelines[preset]))
    encoders = ["text_encoder"] + (["text_encoder_2"] if preset == "sdxl" else [])
    assert sorted(pipe.components) == sorted(["unet", "vae", *encoders])
    assert sorted(pipe.tokenizers) == sorted(encoders)
    assert pipe.prediction == "eps"
    # Only what is asked for is loaded.
    only = load_pipeline(str(tiny_pipelines[preset]), components=("vae",))
    assert list(only.components) == ["vae"] and only.tokenizers == {}


def test_missing_pieces_are_named(tiny_pipelines, tmp_path, monkeypatch):
    with pytest.raises(ConversionError, match=r"no model_index.json"):
        load_pipeline(str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipelines["sd"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ConversionError, match=r"lists 'vae' but .*vae does not exist"):
        load_pipeline(str(broken))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConversionError, match="could not download nobody/no-such-pipeline"):
        load_pipeline("nobody/no-such-pipeline")
    with pytest.raises(ConversionError, match="not a local directory"):
        load_pipeline("no-such-dir", allow_download=False)


def test_variants_shards_and_pickles(tiny_pipelines, tmp_path):
    """fp16 variant (sharded, with an index) and a pickle-only UNet, against the plain safetensors load."""
    from diffusers import UNet2DConditionModel

    src = tiny_pipelines["sd"]
    reference = load_pipeline(str(src), components=("unet",)).components["unet"].params
    model = UNet2DConditionModel.from_pretrained(src, subfolder="unet")

    variant = tmp_path / "variant"
    shutil.copytree(src, variant)
    shutil.rmtree(variant / "unet")
    half = copy.deepcopy(model).to(torch.float16)
    half.save_pretrained(variant / "unet", variant="fp16", max_shard_size="200KB")
    assert any("-00002-of-" in p.name for p in (variant / "unet").iterdir()), "the UNet should be sharded"
    with pytest.raises(ConversionError, match="no safetensors weights in"):
        load_pipeline(str(variant), components=("unet",))
    fp16 = load_pipeline(str(variant), components=("unet",), variant="fp16").components["unet"].params
    want = jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), reference)
    _assert_same(fp16, want)  # read as float16, stored in the float32 parameter dtype

    # Copying the variant for an export turns it into plain-named weights that diffusers reads by default.
    copy_component(str(variant / "unet"), str(tmp_path / "plain_unet"), "fp16")
    names = sorted(p.name for p in (tmp_path / "plain_unet").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in names and not any("fp16" in n for n in names)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "plain_unet", torch_dtype=torch.float16)
    assert torch.equal(reloaded.conv_in.weight, half.conv_in.weight)

    pickled = tmp_path / "pickled"
    shutil.copytree(src, pickled)
    shutil.rmtree(pickled / "unet")
    model.save_pretrained(pickled / "unet", safe_serialization=False)
    with pytest.raises(ConversionError, match=r"pickle.*allow_pickle"):
        load_pipeline(str(pickled), components=("unet",))
    _assert_same(
        load_pipeline(str(pickled), components=("unet",), allow_pickle=True).components["unet"].params,
        reference,
    )


def test_converted_directory_loads_the_same_parameters(tiny_pipelines, tmp_path):
    src = str(tiny_pipelines["sdxl"])
    marker = convert_pipeline(src, str(tmp_path / "f32"))
    assert marker["components"] == ["unet", "vae", "text_encoder", "text_encoder_2"]
    original, converted = load_pipeline(src), load_pipeline(str(tmp_path / "f32"))
    for name in original.components:
        _assert_same(converted.components[name].params, original.components[name].params)
    assert sorted(converted.tokenizers) == sorted(original.tokenizers)
    assert converted.scheduler_config == original.scheduler_config
    # 16-bit storage, read back into float32 parameters.
    convert_pipeline(src, str(tmp_path / "bf16"), dtype="bfloat16")
    half = load_pipeline(str(tmp_path / "bf16"), components=("vae",)).components["vae"].params
    want = jax.tree.map(
        lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32), original.components["vae"].params
    )
    _assert_same(half, want)
    with pytest.raises(FileExistsError, match="not empty"):
        convert_pipeline(src, str(tmp_path / "f32"))
    with pytest.raises(ConversionError, match="already a converted directory"):
        convert_pipeline(str(tmp_path / "f32"), str(tmp_path / "again"))


def test_convert_teacher_tool_verifies_every_component(tiny_pipelines, tmp_path, capsys):
    converter = tool("convert_teacher")
    code = converter.main(["--src", str(tiny_pipelines["sd"]), "--dst", str(tmp_path / "out"), "--verify"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [
        line.split() for line in out.splitlines() if line.split()[:1] in (["unet"], ["vae"], ["text_encoder"])
    ]
    outputs = {(r[0], r[1]) for r in rows}
    assert {("unet", "sample"), ("vae", "decode"), ("text_encoder", "pooler_output")} <= outputs
    assert all(float(r[3]) < 1e-4 for r in rows) and len(rows) == 7
    assert (tmp_path / "out" / "jdistill_converted.json").exists()


def test_convert_teacher_tool_fails_on_wrong_verification_and_names_bad_tensors(
    tiny_pipelines, tmp_path, capsys
):
    from safetensors.numpy import load_file, save_file

    converter = tool("convert_teacher")
    # A tolerance no conversion meets: the verification must be able to fail.
    code = converter.main(
        ["--src", str(tiny_pipelines["sd"]), "--dst", str(tmp_path / "a"), "--verify", "--tolerance", "0"]
    )
    captured = capsys.readouterr()
    assert code == 1 and "verification FAILED" in captured.err and "unet.sample" in captured.err

    bad = tmp_path / "bad"
    shutil.copytree(tiny_pipelines["sd"], bad)
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    key = "down_blocks.0.attentions.0.proj_in.weight"
    state[key] = np.zeros((*state[key].shape[:-1], state[key].shape[-1] + 1), state[key].dtype)
    save_file(state, weights)
    code = converter.main(["--src", str(bad), "--dst", str(tmp_path / "b")])
    captured = capsys.readouterr()
    assert code == 1 and key in captured.err and "mis-shaped" in captured.err
    assert not (tmp_path / "b" / "jdistill_converted.json").exists()


def _diffusers_cfg_x0(pipe_dir, xl: bool, prompts, x, t, scale):
    """x0 of the teacher with CFG (uncond + w (cond - uncond)) computed entirely by diffusers."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    with torch.no_grad():
        if xl:
            cond, uncond, pooled, upooled = pipe.encode_prompt(
                prompts, device="cpu", do_classifier_free_guidance=True
            )
            side = x.shape[-1] * pipe.vae_scale_factor
            time_ids = torch.tensor([[side, side, 0, 0, side, side]] * len(prompts), dtype=torch.float32)
            added = {"text_embeds": torch.cat([upooled, pooled]), "time_ids": torch.cat([time_ids, time_ids])}
        else:
            cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
            added = None
        xt = torch.from_numpy(x)
        eps_u, eps_c = pipe.unet(
            torch.cat([xt, xt]),
            torch.from_numpy(np.concatenate([t, t])),
            torch.cat([uncond, cond]),
            added_cond_kwargs=added,
        ).sample.chunk(2)
        eps = eps_u + scale * (eps_c - eps_u)
        abar = pipe.scheduler.alphas_cumprod[torch.from_numpy(t)].reshape(-1, 1, 1, 1)
        x0 = (xt - (1 - abar).sqrt() * eps) / abar.sqrt()
    return x0.numpy(), {"cond": cond.numpy(), "uncond": uncond.numpy()}


@pytest.mark.parametrize("preset", ["sd", "sdxl"])
def test_teacher_adapter_matches_the_diffusers_pipeline(tiny_pipelines, preset):
    """Prompt encoding, the preset's unconditional rule (empty prompt / zeros) and CFG on x0, against diffusers."""
    config = tiny_config(tiny_pipelines, preset)
    world = build_world(config)
    prompts = ["a red circle", "the digit 3"]
    rng = np.random.default_rng(0)
    h, w, c = world.sample_shape  # the latent size that goes with the preset's micro-conditioning
    x = rng.standard_normal((2, c, h, w)).astype(np.float32)
    t = np.array([150, 800])
    want, embeds = _diffusers_cfg_x0(tiny_pipelines[preset], preset == "sdxl", prompts, x, t, 3.0)

    cond = jax.jit(world.prepare)(world.frozen, world.conditions.tokenize(prompts))["cond"]
    np.testing.assert_allclose(cond["encoder_hidden_states"], embeds["cond"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        world.uncond["encoder_hidden_states"][0], embeds["uncond"][0], rtol=1e-5, atol=1e-5
    )
    if preset == "sdxl":
        assert not np.any(world.uncond["encoder_hidden_states"]) and not np.any(world.uncond["text_embeds"])

    x0 = jax.jit(
        lambda p, xx, tt, c: predict_cfg(world.teacher, p, xx, tt, c, world.uncond, 3.0, "uncond").x0
    )(world.frozen["teacher"], jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t, jnp.float32), cond)
    got = np.asarray(x0).transpose(0, 3, 1, 2)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_teacher_preset_must_match_the_checkpoint(tiny_pipelines, tmp_path):
    v_pipe = tmp_path / "v"
    shutil.copytree(tiny_pipelines["sd"], v_pipe)
    sched = v_pipe / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "v_prediction"}))
    config = tiny_config(tiny_pipelines, "sd", ("teacher.path", str(v_pipe)))
    with pytest.raises(ValueError, match=r"predicts 'eps'.*says 'v'"):
        build_world(config)


@pytest.mark.parametrize("name", ["sd15", "sd21base", "sd21", "sdxl"])
def test_presets_agree_with_the_stored_real_configs(name):
    """Each preset's facts against the real configs kept in the repo: prediction type, resolution, the
    encoders' widths feeding the UNet's cross-attention and (SDXL) its pooled text_time embedding."""
    from jdistill.teachers.presets import get_preset

    preset = get_preset(name)
    unet, vae = preset.component_config("unet"), preset.component_config("vae")
    kind = {"epsilon": "eps", "v_prediction": "v"}[
        preset.scheduler_config.get("prediction_type", "epsilon")
    ]  # diffusers default
    assert kind == preset.prediction
    assert unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1) == preset.resolution
    encoders = [preset.component_config(component) for component, _ in preset.encoders]
    assert sum(e["hidden_size"] for e in encoders) == unet["cross_attention_dim"]
    if preset.pooled_from:
        pooled = preset.component_config(preset.pooled_from)
        assert "CLIPTextModelWithProjection" in pooled["architectures"]
        width = unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"]
        assert pooled["projection_dim"] == width
    else:
        assert unet.get("addition_embed_type") is None


def test_frozen_networks_load_straight_into_their_shardings(tiny_pipelines):
    """With an fsdp mesh the converter places each tensor into its sharding (devices get their slices)."""
    from jdistill import parallel

    config = tiny_config(
        tiny_pipelines, "sdxl", ("mesh.num_devices", "4"), ("mesh.data", "1"), ("mesh.fsdp", "4")
    )
    mesh = parallel.make_mesh(config.mesh)
    rules, unannotated = config.sharding.rules, "fsdp"

    def shardings_for(name, net):
        return parallel.tree_shardings(net.abstract, net.logical_axes, rules, mesh, unannotated)

    sharded = load_pipeline(str(tiny_pipelines["sdxl"]), shardings=shardings_for)
    plain = load_pipeline(str(tiny_pipelines["sdxl"]))
    for name, component in sharded.components.items():
        leaves = jax.tree.leaves(component.params)
        assert all(len(x.sharding.device_set) == 4 for x in leaves), name
        split = [x for x in leaves if x.addressable_shards[0].data.shape != x.shape]
        assert split, f"no parameter of {name} is split over the fsdp axis"
        _assert_same(jax.tree.map(np.asarray, component.params), plain.components[name].params)


def test_bfloat16_safetensors_read_exactly(tmp_path):
    from safetensors.torch import save_file

    from jdistill.convert.io import lazy_state_dict

    tensor = torch.randn(5, 7).to(torch.bfloat16)
    save_file({"w": tensor}, tmp_path / "w.safetensors")
    array = lazy_state_dict([str(tmp_path / "w.safetensors")])["w"]()
    assert array.dtype == jnp.bfloat16
    np.testing.assert_array_equal(array.astype(np.float32), tensor.float().numpy())


def test_conversion_refuses_a_needed_component_it_cannot_convert_and_skips_unused_ones(
    tiny_pipelines, tmp_path
):
    src = tmp_path / "src"
    shutil.copytree(tiny_pipelines["sd"], src)
    index = json.loads((src / "model_index.json").read_text())
    # A component no teacher uses is copied and listed as skipped.
    (src / "safety_checker").mkdir()
    (src / "safety_checker" / "config.json").write_text(
        json.dumps({"architectures": ["StableDiffusionSafetyChecker"]})
    )
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (src / "model_index.json").write_text(json.dumps(index))
    marker = convert_pipeline(str(src), str(tmp_path / "ok"))
    assert marker["components"] == ["unet", "vae", "text_encoder"]
    assert marker["skipped"] == {"safety_checker": "StableDiffusionSafetyChecker"}
    assert (tmp_path / "ok" / "safety_checker" / "config.json").exists()
    # A needed component of a class jdistill has no model for stops the conversion before anything is written.
    unet_config = json.loads((src / "unet" / "config.json").read_text())
    (src / "unet" / "config.json").write_text(
        json.dumps({**unet_config, "_class_name": "UNet3DConditionModel"})
    )
    index["unet"] = ["diffusers", "UNet3DConditionModel"]
    (src / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"cannot convert unet \(UNet3DConditionModel\)"):
        convert_pipeline(str(src), str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
