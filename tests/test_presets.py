"""Every preset of every recipe in configs/ loads and validates, and the SD presets carry the papers' settings
(from the papers and their official training scripts, as each config's docstring cites them), the CFG
convention and the unconditional input of each teacher, and the real-size memory levers."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from helpers import REPO, load

from jdistill.config_base import FLOW_TEACHERS
from jdistill.teachers.presets import FlowTeacherPreset, get_preset

RECIPES = tuple(sorted(path.stem for path in (REPO / "configs").glob("*.py")))
# CFG conventions: "uncond" y_u + w (y_c - y_u) unless listed; LCM's is y_c + w (y_c - y_u).
CFG_CONVENTIONS = {"lcm": "cond"}


def _presets(recipe: str) -> tuple[str, ...]:
    spec = importlib.util.spec_from_file_location(recipe, REPO / "configs" / f"{recipe}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PRESETS


ALL = [(r, p) for r in RECIPES for p in _presets(r)]


def test_every_recipe_is_found():
    assert {"swiftbrush", "dmd", "dmd2", "sid", "sid_lsg", "lcm", "scm", "meanflow", "sft"} <= set(RECIPES)


@pytest.mark.parametrize(("recipe", "preset"), ALL)
def test_every_preset_loads_with_its_cfg_convention_and_unconditional_input(recipe, preset):
    c = load(f"configs/{recipe}.py:{preset}")
    convention = c.method.get("cfg_convention") or c.method.sampler.cfg_convention  # sft: its sampler's
    assert c.method.name == recipe and convention == CFG_CONVENTIONS.get(recipe, "uncond")
    if preset.startswith("gmm"):
        assert c.teacher.kind == "gmm"  # unconditional input: the null label
        return
    if preset == "digits_flux":  # the shipped flow digits teacher: the flow world, velocity-predicting copies
        assert c.teacher.kind == "flow" and c.teacher.preset == preset and c.teacher.uncond == ""
        assert get_preset(preset, FlowTeacherPreset).uncond == "empty_prompt"
        assert all(
            c.networks[n].prediction == "velocity"
            for n in ("student", "fake_score", "model")
            if n in c.networks
        )
        return
    if preset.startswith("digits"):  # the shipped digits teacher, encoding the empty prompt
        assert c.teacher.kind == "digits" and c.teacher.preset == "digits" and c.teacher.uncond == ""
        assert get_preset("digits").uncond == "empty_prompt"
        return
    if preset in FLOW_TEACHERS:
        _check_flow_preset(c, preset)
        return
    assert c.teacher.kind == "diffusers" and c.teacher.preset in preset
    # SD1.5 / SD2.1 encode the empty prompt; the SDXL recipes use zero embeddings (DMD2's convention).
    rule = get_preset(c.teacher.preset).uncond
    assert rule == ("zeros" if c.teacher.preset == "sdxl" else "empty_prompt") and c.teacher.uncond == ""
    assert all(c.networks[n].model.arch == "teacher" for n in ("student", "fake_score") if n in c.networks)


def _check_flow_preset(c, preset: str) -> None:
    """A flow teacher's preset: the flow world, velocity-predicting transformer copies, student times in flow
    units (sCM's in TrigFlow's [0, pi/2]), the teacher's uncond rule (SD3: the empty prompt as negative)."""
    assert c.teacher.kind == "flow" and c.teacher.preset == preset and c.teacher.uncond == ""
    assert get_preset(preset, FlowTeacherPreset).uncond == "empty_prompt"
    for name in ("student", "fake_score", "model"):
        if name in c.networks:
            assert c.networks[name].model.arch == "teacher" and c.networks[name].prediction == "velocity"
    times = c.method.get("student_timesteps") or (c.method.get("student_timestep"),)
    if c.method.name == "sft":
        return
    limit = math.pi / 2 if c.method.name == "scm" else 1.0
    assert times[0] == pytest.approx(limit) and all(0 < t <= limit + 1e-9 for t in times)
    assert c.teacher.attention_impl == "auto" and c.split_updates  # the real-size levers


def test_sd_presets_carry_the_papers_settings():
    sb = load("configs/swiftbrush.py:sd21base")
    assert (sb.networks.student.optimizer.lr, sb.networks.fake_score.optimizer.lr) == (1e-6, 1e-3)
    assert sb.method.guidance_scale == 4.5 and sb.batch_size == 16
    lora = sb.networks.fake_score.lora
    assert (lora.rank, lora.alpha, tuple(lora.targets)) == (64, 108.0, ("to_q", "to_v"))
    assert sb.networks.student.lora.rank == 0 and sb.networks.fake_score.optimizer.grad_clip == 1.0

    d1 = load("configs/dmd2.py:sd15")
    assert d1.method.guidance_scale == 1.75 and d1.method.generator_every == 10
    assert d1.method.gan.generator_weight == 0 and d1.batch_size == 2048
    opt = d1.networks.student.optimizer
    assert (opt.name, opt.lr, opt.weight_decay, opt.warmup_steps, opt.grad_clip) == (
        "adamw",
        1e-5,
        0.01,
        500,
        10.0,
    )
    d2 = load("configs/dmd2.py:sd15_gan")
    assert (d2.method.gan.generator_weight, d2.method.gan.discriminator_weight) == (1e-3, 1e-2)
    xl = load("configs/dmd2.py:sdxl")
    assert xl.method.guidance_scale == 8.0 and xl.method.generator_every == 5
    assert tuple(xl.method.student_timesteps) == (999.0, 749.0, 499.0, 249.0)
    assert (xl.method.gan.generator_weight, xl.networks.student.optimizer.lr) == (5e-3, 5e-7)
    assert tuple(load("configs/dmd2.py:sdxl_1step").method.student_timesteps) == (399.0,)
    xl_lora = load("configs/dmd2.py:sdxl_lora").networks.student
    assert (xl_lora.lora.rank, xl_lora.lora.alpha, xl_lora.optimizer.lr) == (64, 8.0, 5e-5)

    lsg = load("configs/sid_lsg.py:sd15")
    m = lsg.method
    assert (m.teacher_guidance, m.fake_guidance, m.fake_train_guidance, m.alpha) == (2.0, 2.0, 2.0, 1.0)
    assert m.student_input == "noised_zero" and tuple(m.student_timesteps) == (625.0,)
    assert tuple(m.t_range) == (0.02, 0.979) and m.fake_cond_dropout == 0.1
    opt = lsg.networks.student.optimizer
    assert (opt.b1, opt.b2, opt.lr, lsg.batch_size) == (0.0, 0.999, 1e-6, 512)
    assert lsg.networks.student.ema_decay == pytest.approx(0.5 ** (512 / 50000))

    few = load("configs/sid.py:sd15_4step")
    assert tuple(few.method.student_timesteps) == (999.0, 749.0, 499.0, 249.0) and few.batch_size == 256


def test_real_size_presets_choose_the_memory_levers():
    """bfloat16 frozen networks and compute over float32 master weights (SiD: float32 throughout, as its
    scripts), the platform's fused attention and one program per update; the digits presets keep float32."""
    for spec in ("dmd2.py:sd15", "dmd2.py:sdxl", "swiftbrush.py:sd21base", "lcm.py:sdxl", "sft.py:sd15"):
        c = load(f"configs/{spec}")
        assert (c.teacher.dtype, c.teacher.param_dtype, c.teacher.attention_impl) == (
            "bfloat16",
            "bfloat16",
            "auto",
        ), spec
        assert c.split_updates, spec
    sid = load("configs/sid_lsg.py:sd15").teacher
    assert (sid.dtype, sid.attention_impl) == ("float32", "auto")
    digits = load("configs/dmd2.py:digits")
    assert (digits.teacher.dtype, digits.split_updates) == ("float32", False)


def test_lcm_presets_carry_the_scripts_settings():
    """LCM's training scripts and README examples (docs/trajectory.md, LCM); see configs/lcm.py."""
    for preset in ("sd15", "sdxl", "sd15_lora", "sdxl_lora"):
        c = load(f"configs/lcm.py:{preset}")
        lora = preset.endswith("_lora")
        m, student = c.method, c.networks.student
        assert set(c.networks) == {"student"} and student.prediction == "eps"
        assert (m.num_ddim_timesteps, m.huber_c, m.sigma_data, m.timestep_scaling) == (50, 1e-3, 0.5, 10.0)
        assert tuple(m.student_timesteps) == (999.0, 759.0, 499.0, 259.0) and m.sample_guidance == 7.5
        opt = student.optimizer
        assert (opt.name, opt.weight_decay, opt.grad_clip, opt.warmup_steps) == ("adamw", 0.0, 1.0, 0)
        assert (opt.b1, opt.b2, opt.eps, opt.schedule) == (0.9, 0.999, 1e-8, "constant")
        assert (c.batch_size, c.num_steps) == (96, 1000)
        if lora:
            assert opt.lr == 1e-4 and student.ema_decay == 0.0 and student.model.time_cond_proj_dim == 0
            assert (m.guidance_embed, m.target_network, tuple(m.guidance_range)) == (
                False,
                "online",
                (6.5, 6.5),
            )
            assert (student.lora.rank, student.lora.alpha) == (64, 64.0)
            targets = {"to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "time_emb_proj"}
            if preset == "sdxl_lora":
                targets |= {"proj_in", "proj_out"}
            assert set(student.lora.targets) == targets
        else:
            assert opt.lr == 1e-6 and student.ema_decay == 0.95 and student.lora.rank == 0
            assert (m.guidance_embed, m.target_network, tuple(m.guidance_range)) == (True, "ema", (5.0, 15.0))
            assert student.model.time_cond_proj_dim == 256 and student.model.init == "teacher"


def test_distribution_digits_flux_presets_keep_the_flow_recipes_losses():
    """sid/dmd2 digits_flux: the flow presets' loss settings (SiD-DiT's four steps and times; DMD2's one step
    from t = 1 with a velocity fake score), the miniature run's optimizer, true CFG by the world's teacher."""
    sid, flux = load("configs/sid.py:digits_flux"), load("configs/sid.py:flux_dev")
    for key in (
        "student_timesteps",
        "t_sampling",
        "fake_t_sampling",
        "t_logit_normal",
        "fake_t_logit_normal",
    ):
        assert tuple(np.atleast_1d(sid.method[key])) == tuple(np.atleast_1d(flux.method[key])), key
    for key in (
        "alpha",
        "fake_cond_dropout",
        "fake_target",
        "fake_weighting",
        "generator_weighting",
        "renoise",
    ):
        assert sid.method[key] == flux.method[key], key
    assert (sid.method.teacher_guidance, sid.method.fake_guidance, sid.method.fake_train_guidance) == (
        2.0,
    ) * 3
    opt = sid.networks.student.optimizer
    assert (opt.b1, opt.b2, opt.eps, opt.lr, sid.batch_size, sid.num_steps) == (
        0.0,
        0.999,
        1e-8,
        3e-5,
        32,
        600,
    )
    dmd2 = load("configs/dmd2.py:digits_flux")
    assert tuple(dmd2.method.student_timesteps) == (1.0,) and dmd2.method.fake_target == "velocity"
    assert dmd2.method.guidance_scale == 3.0 and (dmd2.batch_size, dmd2.num_steps) == (32, 800)
    for c in (sid, dmd2):
        assert c.teacher.kind == "flow" and c.teacher.preset == "digits_flux" and c.teacher.dtype == "float32"
