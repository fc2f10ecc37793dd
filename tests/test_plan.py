"""Plans (tools/plan.py, CPU tier): analytic FLOPs against PyTorch's counter, the abstract plan against a
compiled run of the real setup, real-size sharding and FLOPs, and the guard on large replicated parameters."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_pipeline
import torch
from helpers import TINY_RUN, load
from torch.utils.flop_counter import FlopCounterMode

from jdistill import flops, parallel, plan, train
from jdistill.convert.pipeline import component_net
from jdistill.models.clip import CLIPTextConfig
from jdistill.models.lora import LoRAConfig, LoRANet
from jdistill.models.unet import UNetConfig
from jdistill.models.vae import AutoencoderKLConfig
from jdistill.teachers.presets import get_preset


def torch_flops(make, *inputs, **kwargs) -> float:
    """torch's FLOP counter on the meta device (on the CPU it misses the fused attention kernel)."""
    with torch.device("meta"):
        model = make()
        args = [torch.empty(shape) if isinstance(shape, tuple) else shape for shape in inputs]
        kwargs = {k: torch.empty(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
        with FlopCounterMode(display=False) as counter:
            model(*args, **kwargs)
    return float(counter.get_total_flops())


@pytest.mark.parametrize("xl", [False, True])
def test_unet_flops_equal_torch_counter(xl):
    from diffusers import UNet2DConditionModel

    config = dict(tiny_pipeline.unet(xl=xl).config)
    cfg = UNetConfig.from_dict(config)
    extra = {}
    if xl:
        with torch.device("meta"):
            extra = {"added_cond_kwargs": {"text_embeds": torch.empty(2, 32), "time_ids": torch.empty(2, 6)}}
    reference = torch_flops(
        lambda: UNet2DConditionModel.from_config(config),
        (2, 4, 16, 12),
        (2,),
        (2, 7, cfg.cross_attention_dim),
        **extra,
    )
    assert 2 * flops.unet_forward(cfg, 16, 12, 7) == pytest.approx(reference, rel=1e-9)


def test_full_size_unet_flops_equal_torch_counter():
    """SD1.5's UNet at 512 px: 0.803 TFLOP per sample, by both counts."""
    from diffusers import UNet2DConditionModel

    config = get_preset("sd15").component_config("unet")
    reference = torch_flops(
        lambda: UNet2DConditionModel.from_config(config), (1, 4, 64, 64), (1,), (1, 77, 768)
    )
    assert flops.unet_forward(UNetConfig.from_dict(config), 64, 64, 77) == pytest.approx(reference, rel=1e-9)
    assert reference == pytest.approx(0.8033e12, rel=1e-3)


def test_clip_and_vae_flops_equal_torch_counter():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    encoder_config = tiny_pipeline.text_encoder(tiny_pipeline.tiny_tokenizer()).config
    with torch.device("meta"):
        ids = torch.zeros((3, 11), dtype=torch.long)
    reference = torch_flops(lambda: CLIPTextModel(encoder_config), ids)
    cfg = CLIPTextConfig.from_dict(encoder_config.to_dict())
    assert 3 * flops.clip_text_forward(cfg, 11) == pytest.approx(reference, rel=1e-9)

    vae_config = dict(tiny_pipeline.vae().config)
    vcfg = AutoencoderKLConfig.from_dict(vae_config)

    def part(name):
        def make():
            vae = AutoencoderKL.from_config(vae_config)
            if name == "encode":
                return lambda x: vae.quant_conv(vae.encoder(x))
            return lambda z: vae.decoder(vae.post_quant_conv(z))

        return make

    assert 2 * flops.vae_encode(vcfg, 32, 24) == pytest.approx(
        torch_flops(part("encode"), (2, 3, 32, 24)), rel=1e-9
    )
    assert 2 * flops.vae_decode(vcfg, 16, 12) == pytest.approx(
        torch_flops(part("decode"), (2, 4, 16, 12)), rel=1e-9
    )


def tiny_dmd2(tiny_pipelines, *overrides):
    return load(
        "configs/dmd2.py:sd15",
        [
            ("teacher.path", str(tiny_pipelines["sd"])),
            ("teacher.prompts", str(tiny_pipelines["prompts"])),
            *TINY_RUN,
            ("mesh.num_devices", "8"),
            ("mesh.data", "4"),
            ("mesh.fsdp", "2"),
            ("method.generator_every", "2"),
            *overrides,
        ],
    )


@pytest.mark.e2e  # 109 s from a cold compilation cache (two compiles of the DMD2 step)
def test_plan_agrees_with_a_compiled_run_at_tiny_size(tiny_pipelines, tmp_path):
    """The plan is built from shapes alone; the trainer's own setup loads the weights and compiles the same
    step on the 8 CPU devices: FLOPs and peak memory per device agree within 10%."""
    config = tiny_dmd2(tiny_pipelines)
    result = plan.plan(config, compile=True, full_step_only=True, device_memory=2**20, log=lambda *a: None)
    assert result["devices"] == 8 and result["batch"] == 8
    assert result["fits"] is False and result["advice"]["micro_batches"] is None  # 1 MiB: nothing fits
    assert [e["updates"] for e in result["steps"]] == [["generator", "fake_score"]]

    s = train.setup(config, str(tmp_path))
    state = train.init_train_state(s, jax.random.key(0))
    source = s.recipe.source(s.world)
    batch = parallel.global_batch(source.local_batch(0, 8, s.rows), s.batch_sharding, 8)
    with jax.set_mesh(s.mesh):
        compiled = (
            train.StepFunctions(s)(0).lower(state, s.frozen, batch, np.int32(0), jax.random.key(0)).compile()
        )
    run_flops = compiled.cost_analysis()["flops"] * 8  # the compiled program is one device's share
    memory = compiled.memory_analysis()
    run_peak = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    run_peak += memory.temp_size_in_bytes
    full = next(e for e in result["steps"] if len(e["updates"]) == 2)
    assert result["flops_per_step"] == full["flops"]
    assert result["flops_per_step"] == pytest.approx(run_flops, rel=0.1)
    assert full["memory"]["peak"] == full["memory"]["total"]  # on the CPU: arguments + outputs + temporaries
    assert full["memory"]["peak"] == pytest.approx(run_peak, rel=0.1)
    assert result["peak_bytes_per_device"] >= full["memory"]["peak"]
    # The trained state per device is what the real run holds on device 0.
    held = sum(
        x.addressable_shards[0].data.nbytes
        for x in jax.tree.leaves(state)
        if hasattr(x, "addressable_shards")
    )
    assert result["state_bytes_per_device"] == held


def test_real_size_dmd2_plan_shards_everything_and_counts_flops():
    """SD1.5 DMD2 under fsdp=8 (CPU lowering only): no network keeps more than 1% of its parameters
    replicated, and the lowered step's FLOPs agree with the analytic count within 5%."""
    config = load(
        "configs/dmd2.py:sd15",
        [("mesh.num_devices", "8"), ("mesh.data", "1"), ("mesh.fsdp", "8"), ("batch_size", "8")],
    )
    result = plan.plan(config, log=lambda *a: None)
    json.dumps(result)  # the --json output
    assert set(result["networks"]) == {"student", "fake_score", "teacher", "text_encoder", "vae"}
    for name, net in result["networks"].items():
        assert net["replicated_fraction"] <= 0.01, (name, net["replicated"][:5])
    assert result["networks"]["teacher"]["params"] == 859_520_964  # diffusers' count of SD1.5's UNet
    forward = flops.unet_forward(UNetConfig.from_dict(get_preset("sd15").component_config("unet")), 64, 64)
    # DMD2's full step: student forward + backward, teacher with CFG, fake score, fake score forward + backward
    assert result["analytic_flops_per_step"] == pytest.approx(8 * 9 * forward, rel=0.01)
    assert result["flops_per_step"] == pytest.approx(result["analytic_flops_per_step"], rel=0.05)
    state = result["state_bytes_per_device"]
    # student and fake score: parameters and two Adam moments in float32, split 8 ways (plus small replicas)
    assert state == pytest.approx(2 * 3 * 4 * 859_520_964 / 8, rel=0.01)


def test_large_replicated_parameter_is_an_error_naming_it():
    unet = component_net("unet", get_preset("sd15").component_config("unet"))
    mesh = parallel.make_mesh(
        load("configs/dmd2.py:sd15", [("mesh.num_devices", "8"), ("mesh.fsdp", "8"), ("mesh.data", "1")]).mesh
    )
    without_conv = parallel.ShardingPolicy((("embed", None), ("mlp", "fsdp"), ("heads", "fsdp")))
    with pytest.raises(
        parallel.ShardingError,
        match=r"teacher/down_blocks/0/resnets/0/conv1/kernel \(3, 3, 320, 320\) \(3\.5 MiB\).* and \d+ more",
    ):
        without_conv.shardings("teacher", unet.abstract, unet.logical_axes, mesh)
    allowed = parallel.ShardingPolicy(without_conv.rules, allow_replicated=("teacher/*/kernel",))
    allowed.shardings("teacher", unet.abstract, unet.logical_axes, mesh)  # allowed by pattern: no error
    full = parallel.ShardingPolicy(load("configs/dmd2.py:sd15").sharding.rules)
    report = parallel.sharding_report(
        "teacher", unet.abstract, full.shardings("teacher", unet.abstract, unet.logical_axes, mesh)
    )
    assert report["replicated_fraction"] < 0.001
    assert report["bytes_per_device"] == pytest.approx(report["bytes"] / 8, rel=0.01)


def test_lora_adapters_are_split_like_their_kernels():
    unet = component_net("unet", get_preset("sd15").component_config("unet"))
    lora = LoRANet("fake_score", unet, LoRAConfig(rank=64))
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert lora.logical_axes[module] == {"A": ("lora", None), "B": (None, "lora")}
    mesh = jax.make_mesh((1, 8), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    policy = parallel.ShardingPolicy(load("configs/dmd2.py:sd15").sharding.rules)
    report = parallel.sharding_report(
        "lora", lora.abstract, policy.shardings("lora", lora.abstract, lora.logical_axes, mesh)
    )
    assert report["replicated_fraction"] == 0.0


def test_activations_are_constrained_to_the_batch_axes_under_a_mesh():
    """The UNet marks its block boundaries batch-sharded when the trainer's mesh is set, and not otherwise."""
    net = component_net("unet", dict(tiny_pipeline.unet().config))
    params = net.init(jax.random.key(0))
    cond = {"encoder_hidden_states": np.zeros((8, 7, 32), np.float32)}

    def f(p, x):
        return net.apply(p, x, np.full((8,), 10.0, np.float32), cond)

    x = np.zeros((8, 16, 16, 4), np.float32)
    plain = jax.jit(f).lower(params, x).as_text()
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        constrained = jax.jit(f).lower(params, x).as_text()
    assert "sharding_constraint" not in plain
    n = constrained.count("sharding_constraint")
    assert n == 2 + len(net.config.down_block_types) + len(net.config.up_block_types), n
    assert math.prod(mesh.shape.values()) == 8


def output_dtype(net, params):
    x = jax.ShapeDtypeStruct((1, 64, 64, 4), jnp.float32)
    cond = {"encoder_hidden_states": jax.ShapeDtypeStruct((1, 77, 768), jnp.float32)}
    return jax.eval_shape(lambda p, x, c: net.apply(p, x, jnp.ones((1,)), c), params, x, cond).dtype


def test_trained_copies_keep_float32_master_weights_and_their_own_compute_dtype():
    """bfloat16 storage for the frozen teacher, float32 master weights and optimizer state for the trained
    copies, which compute in the teacher's dtype (the student) unless their model.compute_dtype says
    otherwise (the fake score here)."""
    bf16 = [("teacher.dtype", "bfloat16"), ("teacher.param_dtype", "bfloat16"), ("batch_size", "8")]
    config = load("configs/dmd2.py:sd15", [*bf16, ("networks.fake_score.model.compute_dtype", "float32")])
    s = train.setup(config, None, abstract=True)
    assert {x.dtype for x in jax.tree.leaves(s.frozen["teacher"])} == {jnp.dtype(jnp.bfloat16)}
    for part in ("params", "opt"):
        dtypes = {x.dtype for x in jax.tree.leaves(s.abstract_state[part]) if x.ndim}
        assert dtypes == {jnp.dtype(jnp.float32)}, (part, dtypes)
    params = s.abstract_state["params"]
    assert output_dtype(s.recipe.network("student").net, params["student"]) == jnp.bfloat16
    assert output_dtype(s.recipe.network("fake_score").net, params["fake_score"]) == jnp.float32


def test_micro_batch_advice_scales_the_temporaries():
    """Peak 100 = 20 fixed + 80 temporaries over 8 rows per device (10 a row); the first accumulation adds a
    float32 copy of the trained parameters (10): k = 2 gives 20 + 10 + 40, k = 4 gives 20 + 10 + 20."""
    memory = {"peak": 100, "temp": 80}
    assert plan.micro_batch_advice(memory, 8, 1, 10, 50) == {"micro_batches": 4, "estimated_peak_bytes": 50}
    assert plan.micro_batch_advice(memory, 8, 1, 10, 70)["micro_batches"] == 2
    # Planned with 2 micro-batches already (4 rows each, 20 a row, accumulator included in the peak).
    assert plan.micro_batch_advice(memory, 8, 2, 10, 60) == {"micro_batches": 4, "estimated_peak_bytes": 60}
    assert plan.micro_batch_advice(memory, 8, 1, 10, 39)["micro_batches"] is None


def test_plan_flops_do_not_depend_on_how_the_step_is_cut(tiny_pipelines):
    """XLA counts the micro-batch scan's body once; the plan scales it back, so the step's FLOPs do not
    depend on how the batch is cut. A step split into one program per update (split_updates) adds its
    programs' FLOPs and lists them."""
    one = (("mesh.num_devices", "1"), ("mesh.data", "1"), ("mesh.fsdp", "1"))
    quiet = {"full_step_only": True, "log": lambda *a: None}
    whole = plan.plan(tiny_dmd2(tiny_pipelines, *one), **quiet)
    cut = plan.plan(tiny_dmd2(tiny_pipelines, *one, ("micro_batches", "2")), **quiet)
    assert cut["flops_per_step"] == pytest.approx(whole["flops_per_step"], rel=0.05)
    assert cut["analytic_flops_per_step"] == whole["analytic_flops_per_step"]
    split = plan.plan(tiny_dmd2(tiny_pipelines, *one, ("split_updates", "true")), **quiet)
    (step,) = split["steps"]
    assert [p["updates"] for p in step["programs"]] == [["generator"], ["fake_score"]]
    assert all(p["flops"] > 0 for p in step["programs"])
    assert step["flops"] == sum(p["flops"] for p in step["programs"])
    assert split["flops_per_step"] == pytest.approx(whole["flops_per_step"], rel=0.05)


@pytest.mark.parametrize(
    "spec, overrides",
    [
        ("configs/lcm.py:digits", ()),
        ("configs/scm.py:digits", ()),
        ("configs/meanflow.py:digits", (("method.jvp", "jvp"),)),
    ],
    ids=["lcm", "scm", "meanflow"],
)
def test_trajectory_recipes_declare_their_passes(spec, overrides):
    """The analytic count of LCM (guided teacher pair, target network, student), sCM (guided pair, the
    student's JVP, the student) and MeanFlow (teacher, JVP, student) against XLA's count of the lowered step
    on the digits world (the small UNet: hand counts leave out norms and activations, about 7% here)."""
    config = load(spec, [("mesh.num_devices", "1"), ("mesh.data", "1"), ("mesh.fsdp", "1"), *overrides])
    result = plan.plan(config, log=lambda *a: None)
    assert result["analytic_flops_per_step"] is not None
    assert result["flops_per_step"] == pytest.approx(result["analytic_flops_per_step"], rel=0.1)


@pytest.mark.parametrize("preset", ["flux_dev", "flux_schnell", "flux_lite"])
def test_flux_flops_equal_torch_counter(preset):
    """1024 px (4096 packed tokens) and 512 T5 tokens; FLUX.1-dev is about 107 TFLOP per forward."""
    from diffusers import FluxTransformer2DModel

    from jdistill.models.flux import FluxConfig

    config = get_preset_config(preset, "transformer")
    n, t = 4096, 512
    reference = torch_flops(
        lambda: FluxTransformer2DModel.from_config(config),
        hidden_states=(1, n, 64),
        encoder_hidden_states=(1, t, 4096),
        pooled_projections=(1, 768),
        timestep=(1,),
        img_ids=(n, 3),
        txt_ids=(t, 3),
        guidance=(1,) if config.get("guidance_embeds") else None,
    )
    assert flops.flux_forward(FluxConfig.from_dict(config), n, t) == pytest.approx(reference, rel=1e-9)


@pytest.mark.parametrize("preset", ["sd3_medium", "sd35_medium", "sd35_large"])
def test_sd3_flops_equal_torch_counter(preset):
    from diffusers import SD3Transformer2DModel

    from jdistill.models.sd3 import SD3Config

    config = get_preset_config(preset, "transformer")
    reference = torch_flops(
        lambda: SD3Transformer2DModel.from_config(config),
        hidden_states=(1, 16, 128, 96),  # 1024 x 768 px: a non-square grid
        encoder_hidden_states=(1, 333, 4096),
        pooled_projections=(1, 2048),
        timestep=(1,),
    )
    assert flops.sd3_forward(SD3Config.from_dict(config), 128, 96, 333) == pytest.approx(reference, rel=1e-9)


def test_t5_flops_equal_torch_counter():
    from transformers import T5Config as TorchT5Config
    from transformers import T5EncoderModel

    from jdistill.models.t5 import T5Config

    config = get_preset_config("flux_dev", "text_encoder_2")
    with torch.device("meta"):
        ids = torch.zeros((1, 512), dtype=torch.long)
    reference = torch_flops(lambda: T5EncoderModel(TorchT5Config(**config)), ids)
    assert flops.t5_encoder_forward(T5Config.from_dict(config), 512) == pytest.approx(reference, rel=1e-9)


def get_preset_config(preset: str, component: str) -> dict:
    from jdistill.teachers.presets import CONFIG_ROOT

    with open(f"{CONFIG_ROOT}/{preset}/{component}/config.json") as f:
        return json.load(f)
