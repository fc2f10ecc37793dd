"""Plans of flow-matching teachers (teacher.kind = "flow"): the abstract world against the real one on tiny
pipelines, and real-size plans (CPU lowering only) of FLUX.1-lite sCM and SD3.5-medium DMD2 under fsdp=8:
parameter counts equal to diffusers / transformers on the meta device, every matrix sharded by the logical axes
alone (the replicated d_model-wide vectors counted), and the step's FLOPs (XLA's count, every scanned layer
stack counted as often as it runs) against the hand counts of ``jdistill.flops`` times the passes the step
makes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tiny_flow_pipeline
from helpers import load
from test_describe_teacher import torch_count

from jdistill import flops, plan
from jdistill.convert.pipeline import component_net
from jdistill.diffusion.reparameterize import on_schedule
from jdistill.diffusion.schedules import FlowSchedule, TrigFlowSchedule
from jdistill.diffusion.transformer_denoiser import FlowTransformerDenoiser
from jdistill.models.clip import CLIPTextConfig
from jdistill.models.flux import FluxConfig
from jdistill.models.sd3 import SD3Config
from jdistill.models.t5 import T5Config
from jdistill.models.vae import AutoencoderKLConfig
from jdistill.teachers import build_world
from jdistill.teachers.flow_world import flow_teacher_config
from jdistill.teachers.presets import FlowTeacherPreset, get_preset

QUIET = {"log": lambda *a: None}
FSDP8 = [("mesh.num_devices", "8"), ("mesh.data", "1"), ("mesh.fsdp", "8"), ("batch_size", "8")]
BF16 = [("teacher.dtype", "bfloat16"), ("teacher.param_dtype", "bfloat16")]


def flow(preset: str, resolution: int = 1024) -> list[tuple[str, str]]:
    return [("teacher.kind", "flow"), ("teacher.preset", preset), ("teacher.resolution", str(resolution))]


def stored(preset: str, component: str) -> dict:
    return get_preset(preset, FlowTeacherPreset).component_config(component)


def meta_count(preset: str, component: str) -> int:
    """diffusers' / transformers' parameter count of a stored config, built on the meta device."""
    config = stored(preset, component)
    cls = (config.get("architectures") or [config.get("_class_name")])[0]
    return torch_count(cls, config)


# ------------------------------------------------------------------------------------------ abstract world


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """Tiny pipelines, each saved on first use (a worker running one test builds one)."""
    root = tmp_path_factory.mktemp("flow_abstract")
    (root / "prompts.txt").write_text("a red circle\nthe digit 3\n")
    save = {
        "flux_dev": tiny_flow_pipeline.save_flux_pipeline,
        "sd35_medium": tiny_flow_pipeline.save_sd3_pipeline,
    }
    saved = {}

    def get(preset: str):
        if preset not in saved:
            saved[preset] = save[preset](root / preset)
        return saved[preset]

    get.prompts = root / "prompts.txt"
    return get


def tiny_config(preset: str, pipelines, **teacher) -> ml_collections.ConfigDict:
    t = flow_teacher_config(preset)
    t.update(path=str(pipelines(preset)), prompts=str(pipelines.prompts), resolution=16, **teacher)
    return ml_collections.ConfigDict({"seed": 0, "teacher": t})


def shapes(tree):
    return jax.tree.map(lambda x: (tuple(np.shape(x)), jnp.dtype(x.dtype)), tree)


@pytest.mark.parametrize("preset", ["flux_dev", "sd35_medium"])
def test_abstract_world_has_the_real_worlds_shapes(preset, pipelines, images):
    """On a tiny local pipeline, the abstract world (configs only) and the real one (weights, tokenizers)
    agree on frozen parameters and their logical axes, sample shape, unconditional input, the conditioning
    ``prepare`` gives from prompt and image batches, and the teacher's family and shift."""
    config = tiny_config(preset, pipelines, data=str(images))
    real, abstract = build_world(config), build_world(config, abstract=True)
    assert shapes(abstract.frozen) == shapes(real.frozen)
    assert abstract.frozen_axes == real.frozen_axes
    assert abstract.sample_shape == real.sample_shape
    assert shapes(abstract.uncond) == shapes(real.uncond)
    assert type(abstract.teacher) is type(real.teacher)
    assert abstract.teacher.family == real.teacher.family
    assert abstract.teacher.schedule.shift == real.teacher.schedule.shift
    assert abstract.teacher.embedded_guidance == real.teacher.embedded_guidance
    for source in ("conditions", "data"):
        want = getattr(real, source).local_batch(0, 2)
        got = getattr(abstract, source).local_batch(0, 2)
        assert shapes(got) == shapes(want), source
        prepared = [jax.eval_shape(w.prepare, w.frozen, b) for w, b in ((real, want), (abstract, got))]
        assert shapes(prepared[1]) == shapes(prepared[0]), source
    with pytest.raises(RuntimeError, match="abstract world"):
        abstract.eval_batch(2)
    wrong = tiny_config(preset, pipelines)
    wrong.teacher.preset = "sd15"
    with pytest.raises(ValueError, match="'sd15' is not a flow teacher"):
        build_world(wrong, abstract=True)

    # teacher.embedding_cache (not read here): prompt batches are the cached conditioning and, as in the real
    # world, no text encoder is held, and image batches carry the cached captions' conditioning.
    cached = build_world(tiny_config(preset, pipelines, embedding_cache="/not/read"), abstract=True)
    cond = {"cond." + k: (v[0], v[1]) for k, v in shapes(prepared[0]["cond"]).items()}
    assert shapes(cached.conditions.local_batch(0, 2)) == cond
    assert set(cached.frozen) == set(cached.nets) == {"teacher", "vae"}
    assert shapes(cached.data.local_batch(0, 2)) == {"images": shapes(want)["images"], **cond}
    got = jax.eval_shape(cached.prepare, cached.frozen, cached.conditions.local_batch(0, 2))
    assert shapes(got["cond"]) == shapes(prepared[0]["cond"])


# ------------------------------------------------------------------------------------------ real-size plans


def prepare_flops(preset: str, clips: tuple[str, ...], t5: str, length: int, images: bool) -> float:
    """The step's inputs per sample: CLIP on 77 tokens, T5 on ``length``, the VAE encoder on 1024 px."""
    total = sum(flops.clip_text_forward(CLIPTextConfig.from_dict(stored(preset, c)), 77) for c in clips)
    total += flops.t5_encoder_forward(T5Config.from_dict(stored(preset, t5)), length)
    if images:
        total += flops.vae_encode(AutoencoderKLConfig.from_dict(stored(preset, "vae")), 1024, 1024)
    return total


def test_flux_lite_scm_plan_shards_everything_and_counts_flops():
    """FLUX.1-lite (8.16 B) sCM at 1024 px under fsdp=8, bfloat16 frozen networks, forward-mode JVP: the
    student is a float32 copy with Adam and EMA. sCM trains on captioned images, so CLIP and T5 encode the
    captions in the step (an embedding cache covers prompt-only recipes); the VAE encodes the images."""
    config = load(
        "configs/scm.py:digits",
        [*flow("flux_lite"), *BF16, *FSDP8, ("method.jvp", "jvp")],
    )
    result = plan.plan(config, **QUIET)
    assert result["sample_shape"] == [128, 128, 16]
    # T5's 512 tokens x 4096 and CLIP-L's pooled 768
    assert result["conditioning"] == {"encoder_hidden_states": [512, 4096], "pooled_projections": [768]}
    nets = result["networks"]
    assert set(nets) == {"student", "logvar", "teacher", "vae", "text_encoder", "text_encoder_2"}
    count = meta_count("flux_lite", "transformer")
    assert nets["teacher"]["params"] == nets["student"]["params"] == count == 8_163_264_064
    for name in ("vae", "text_encoder", "text_encoder_2"):
        assert nets[name]["params"] == meta_count("flux_lite", name), name
    # The logical axes alone (no sharding.unannotated) split every matrix. Replicated, by the rule embed ->
    # None: FLUX's d_model-wide biases (the stacked output projections', the input embedders') and the 128-wide
    # q/k RMSNorm scales; T5's norm weights; CLIP's and the VAE's biases and norm scales and CLIP's (77, 768)
    # position table (8 does not divide 77). The log-variance head (129 parameters) is replicated whole.
    flux = FluxConfig.from_dict(stored("flux_lite", "transformer"))
    width, head = flux.num_attention_heads * flux.attention_head_dim, flux.attention_head_dim
    double, single = flux.num_layers, flux.num_single_layers
    # double blocks: ff, ff_context, to_out, to_add_out biases and four q/k norms; single blocks: proj_out's
    # bias and two norms; x_embedder, context_embedder and the time, text and guidance embedders' linear_2
    flux_replicated = (4 * double + single + 5) * width + (4 * double + 2 * single) * head
    assert flux_replicated == 244_224
    t5 = T5Config.from_dict(stored("flux_lite", "text_encoder_2"))
    replicated_count = {
        "student": flux_replicated,
        "teacher": flux_replicated,
        "text_encoder_2": (2 * t5.num_layers + 1) * t5.d_model,
    }
    for name, net in nets.items():
        n = round(net["replicated_fraction"] * net["params"])
        if name == "logvar":
            assert net["params"] == 129 and n == 129, net
            assert sorted(net["replicated"]) == ["logvar/out/bias", "logvar/out/kernel"], net["replicated"]
            continue
        if name in replicated_count:
            assert n == replicated_count[name], (name, n, net["replicated"])
        assert net["replicated_fraction"] < 1e-3, (name, net["replicated"][:5])
        matrices = [r for r in net["replicated"] if r.rsplit("/", 1)[-1] not in ("bias", "scale", "weight")]
        allowed = (
            ["text_encoder/text_model/embeddings/position_embedding/embedding"]
            if name == "text_encoder"
            else []
        )
        assert matrices == allowed, (name, matrices)
        assert net["bytes_per_device"] == pytest.approx(net["bytes"] / 8, rel=0.02), name
    # float32 parameters, two Adam moments and the EMA, split 8 ways
    assert result["state_bytes_per_device"] == pytest.approx(16 * count / 8, rel=1e-3)

    forward = flops.flux_forward(FluxConfig.from_dict(stored("flux_lite", "transformer")), 64 * 64, 512)
    # sCM's teacher is the world's FLUX moved onto TrigFlow (reparameterize.on_schedule): a CFG pair of
    # evaluations, or one where that wrapper hands the guidance embedding through (scm's declared passes
    # must follow it).
    flux = component_net("transformer", stored("flux_lite", "transformer"))
    teacher = on_schedule(
        FlowTransformerDenoiser(flux, FlowSchedule(3.0), "flux"), TrigFlowSchedule(0.5), 0.5
    )
    teacher_evals = 1 if getattr(teacher, "embedded_guidance", False) else 2
    # teacher, the JVP of sg(student) (primal + tangent), the student's forward and backward
    per_sample = (teacher_evals + 2 + 3) * forward
    per_sample += prepare_flops("flux_lite", ("text_encoder",), "text_encoder_2", 512, images=True)
    assert result["analytic_flops_per_step"] == pytest.approx(8 * per_sample, rel=1e-9)
    # XLA counts norms, activations and the JVP's second attention product too (about 3% here).
    assert result["flops_per_step"] == pytest.approx(result["analytic_flops_per_step"], rel=0.05)


def test_sd35_medium_dmd2_plan_with_cached_prompts():
    """SD3.5-medium DMD2 at 1024 px under fsdp=8 with cached prompt embeddings: no text encoder in the step;
    9 transformer forwards per sample (student forward and backward, the teacher's CFG pair, the fake
    score, the fake score's forward and backward)."""
    config = load(
        "configs/dmd2.py:digits",
        [
            *flow("sd35_medium"),
            *BF16,
            *FSDP8,
            ("teacher.embedding_cache", "/not/read"),
            ("method.student_timesteps", "(1.0,)"),
        ],
    )
    result = plan.plan(config, full_step_only=True, **QUIET)
    # 77 CLIP tokens (CLIP-L and CLIP-G zero-padded to T5's 4096) + 256 T5 tokens; both pooled projections
    assert result["conditioning"] == {"encoder_hidden_states": [333, 4096], "pooled_projections": [2048]}
    nets = result["networks"]
    count = meta_count("sd35_medium", "transformer")
    assert nets["teacher"]["params"] == nets["student"]["params"] == nets["fake_score"]["params"] == count
    assert nets["vae"]["params"] == meta_count("sd35_medium", "vae")
    assert not {"text_encoder", "text_encoder_2", "text_encoder_3"} & set(nets)  # cached: none held
    for name, net in nets.items():
        assert net["replicated_fraction"] < 2e-3, (name, net["replicated"][:5])
    # float32 student and fake score with two Adam moments each, and the student's EMA, split 8 ways
    assert result["state_bytes_per_device"] == pytest.approx((2 * 3 + 1) * 4 * count / 8, rel=0.01)
    forward = flops.sd3_forward(SD3Config.from_dict(stored("sd35_medium", "transformer")), 128, 128, 333)
    assert result["analytic_flops_per_step"] == pytest.approx(8 * 9 * forward, rel=1e-9)
    assert result["flops_per_step"] == pytest.approx(result["analytic_flops_per_step"], rel=0.05)


def test_scanned_loops_are_counted_as_often_as_they_run():
    """XLA's cost analysis counts a scan's body once; ``plan.loop_flops`` adds the other iterations (nested
    scans multiply, partly unrolled scans count what XLA sees)."""

    def f(w, x):
        def layer(c, wi):
            inner = jax.lax.scan(lambda h, _: (jnp.tanh(h @ wi), None), c, None, length=3)[0]
            return inner, None

        return jax.lax.scan(layer, x, w)[0]

    w = jax.ShapeDtypeStruct((5, 64, 64), jnp.float32)
    x = jax.ShapeDtypeStruct((16, 64), jnp.float32)
    matmul = 2 * 16 * 64 * 64
    for fn, runs in ((f, 15), (lambda w, x: jax.grad(lambda w: f(w, x).sum())(w), 45)):
        traced = jax.jit(fn).trace(w, x)
        total = traced.lower().cost_analysis()["flops"] + plan.loop_flops(traced.jaxpr)
        assert total == pytest.approx(runs * matmul, rel=0.05)

    def unrolled(w, x):
        return jax.lax.scan(lambda c, wi: (c @ wi, None), x, w, unroll=2)[0]

    traced = jax.jit(unrolled).trace(w, x)
    total = traced.lower().cost_analysis()["flops"] + plan.loop_flops(traced.jaxpr)
    assert total == pytest.approx(5 * matmul, rel=1e-3)
