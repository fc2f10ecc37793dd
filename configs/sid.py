"""Score identity Distillation (SiD), one-step and few-step students.

References: Zhou et al., SiD, ICML 2024 (arXiv 2404.04057); few-step SiD (arXiv 2505.12674). CFG convention
"uncond" (y_u + w (y_c - y_u)); unconditional input = the teacher world's: the null label (gmm), the empty
prompt (digits, SD1.5/2.1, flow teachers) or zeros (SDXL). Teacher guidance kappa4 and fake guidance kappa2
are recorded below. Method notes: docs/distribution_matching.md, SiD and few-step SiD / SiD-DiT. Measured runs
and the sweeps behind the digits, digits_flux and gmm choices: benchmarks/RESULTS.md, "Preset histories" and
"Flow digits world".

Presets:
  digits     the shipped digits teacher (jdistill/assets/digits), one-step student from noise at t = 999.
             Student and fake score are full copies of the teacher's UNet; SiD-LSG's scripts (Adam (0, 0.999),
             one lr for both networks, kappa1..kappa4 = 2, alpha 1, 10% prompt dropout) at lr 3e-5, student
             EMA 0.99 (the scripts' 0.05 Mimg half-life is longer than the run), 600 steps of 32. A SiD step
             back-propagates through teacher and fake score (with CFG: four UNet passes), about twice the cost
             of a DMD2 step. With SiD-LSG's input (sigma_625 z at t = 625) instead it matches sid_lsg's digits
             preset: the input, not LSG, makes the difference.
  digits_4step  the same with a four-step student at (999, 749, 499, 249), uniform mixture over step counts
             (no clipping needed at this lr).
  digits_flux
             the flow digits world (jdistill/assets/digits_flux, a tiny FLUX teacher with true CFG and the
             empty prompt as unconditional input): SiD-DiT's four-step setting (flow times (1, .75, .5, .25),
             fresh noise between steps, k ~ U{1..4}, logit-normal times, 1 - t weight, alpha 1, Adam (0,
             0.999) eps 1e-8, LSG by true CFG) with the digits presets' miniature run (lr 3e-5 for both,
             student EMA 0.99, 600 steps of 32) and their kappa 2 (SiD-DiT's 4.5 over-saturates here).
  gmm        analytic 8-mode Gaussian-mixture teacher on SD's VP schedule, one-step MLP student. SiD's
             losses, fake first then generator (1:1), generator t ~ U{20..980}. Measured choices: alpha = 1 as
             SiD-LSG's scripts (not the EDM runs' 1.2); kappa4 = kappa2 = 3 with 10% prompt dropout for the
             fake score; student lr 1e-3; 5000 steps keep the run under 3 minutes. The student at half width
             (64 / 128), the fake score at full width.
  gmm_2step  two-step student at (999, 499), uniform mixture over step counts; student gradient norm
             clipped at 0.3 (without it 5000 steps mode-collapse); both MLPs at half width.
  gmm_4step  four-step student at (999, 749, 499, 249), clipped likewise, half width.

  Few-step SiD (arXiv 2505.12674; its released code ml-sid-dit; docs/distribution_matching.md, few-step SiD)
  on UNet teachers: uniform mixture over step counts, student from noise at t = 999, alpha 1, batch 256,
  Adam (0, 0.999) eps 1e-8, lr 1e-6 for both networks (its AMP setting), EMA as SiD-LSG; guidance kept at
  SiD-LSG's kappa = 2 for SD teachers (the DiT scripts use 4.5 on SANA) and Zero-CFG off; the optional
  diffusion GAN stays off (the README warns against it unless real images beat the student). Run lengths are
  not stated: 20k steps.
  sd15        one step on SD1.5;          sd15_4step   four steps (999, 749, 499, 249) on SD1.5;
  sd21base    one step on SD2.1-base;     sdxl_4step   four steps on SDXL (zero unconditional embeddings).
  flux_dev, sd3_medium, sd35_medium, sd35_large
              SiD-DiT (arXiv 2509.25127; its released code apple-aiml-research/ml-sid-dit, commit 9596ed9, read
              2026-12: training/sid_dit_{sd3,flux}_training_loop.py, sid_dit_*_util.py, sid_dit_*_train.py,
              run_sid_dit.sh, README). The paper's text was not reachable here; the code's settings are used:
              - student: a float32 copy of the transformer, four steps at flow times t_i = t_init (1 - i/K) /
                999 with --init_timestep 999, --num_steps 4: (1, 0.75, 0.5, 0.25), pure noise in, fresh noise
                between steps (--noise_type fresh); each update draws k ~ U{1..K} once for all devices (rank
                0's draw broadcast), runs k - 1 steps without gradient and trains the k-th (rollout.py).
              - fake score: a float32 copy, flow-matching MSE to eps - sg(x) at t = sigmoid(N(ln 2, 1.6^2))
                (loop: logit_mean = log 2, logit_std = 1.6; the SD3-shifted branch is disabled, use_sd3_shift
                0), no prompt dropout (use_context_dropout_train_fake = False).
              - generator: SiD with alpha 1 (--alpha 1.0) at a fresh t from the same logit-normal, weight 1 - t
                (--weighting_scheme 1_minus_sigma, the CLI and loop default; method.generator_weighting="sid"
                gives SiD's 1 / mean|x - f_real|, the code's sid_legacy).
              - guidance: LSG, kappa 4.5 for the teacher, the fake score in the generator loss and its
                training (--cfg_eval_real / --cfg_eval_fake / --cfg_train_fake 4.5 in run_sid_dit.sh and the
                loops' defaults; the README: one set of hyperparameters for every teacher; no per-teacher
                scale is released). FLUX-dev takes 4.5 through its guidance embedding in one pass; the code
                runs a true-CFG pair there with the embedding also at 4.5 (not reproduced). The FLUX student
                gets guidance 1 (the code's sid_dit_generate default), as here.
              - optimizer: Adam (0, 0.999), eps 1e-8, lr = glr = 1e-6 for both networks (the README's AMP
                setting; its pure-bf16 setting is 1e-5 with eps 1e-4; run_sid_dit.sh's SANA run: 5e-6), no
                gradient clipping (the code clips values at 1 only in pure bf16), no EMA (--ema 0; "disabled
                when running FSDP").
              - batch 256 (--batch 256), 1 Mimg (run_sid_dit.sh --duration 1): 3907 steps; 512 px
                (--resolution 512; FLUX-dev at 1024 needs more memory, README); T5 length as the utils
                tokenize: 77 for SD3 / SD3.5, 512 for FLUX.
              Differences: compute float32 (the code: bf16 autocast over float32 weights; set
              teacher.dtype=bfloat16 for that); the generator loss's scale (x --lsg 100, sum over the batch
              / batch) and the fake loss's (sum, / batch) are means here (Adam is indifferent up to eps).
  flux_schnell, flux_lite
              our extrapolation of the same settings: flux_lite as flux_dev (guidance-distilled, kappa 4.5
              through the embedding, T5 512); flux_schnell has no guidance input and no CFG training: kappa 1
              (the conditional prediction), T5 256 (its pipeline's).

  python -m jdistill.main --config configs/sid.py:digits_4step --workdir runs/sid_digits_4step
  python -m jdistill.main --config configs/sid.py:gmm --workdir runs/sid_gmm
"""

import math

from jdistill.config_base import (
    FLOW_FOUR_STEPS,
    FLOW_TEACHERS,
    NARROW,
    WIDE,
    base_config,
    gmm_distillation,
    sid_digits,
    sid_networks,
)
from jdistill.configuration import choose_preset
from jdistill.methods import sid
from jdistill.methods.adversarial import discriminator_config

PRESETS = (
    "digits",
    "digits_4step",
    "digits_flux",
    "gmm",
    "gmm_2step",
    "gmm_4step",
    "sd15",
    "sd15_4step",
    "sd21base",
    "sdxl_4step",
    *FLOW_TEACHERS,
)
FOUR_STEPS = (999.0, 749.0, 499.0, 249.0)
DIGITS_LR = 3e-5
# SiD-DiT's released settings (see the docstring for the script lines)
SID_DIT = {
    "kappa": 4.5,
    "lr": 1e-6,
    "adam_eps": 1e-8,
    "batch": 256,
    "steps": 3907,  # 1 Mimg of 256
    "resolution": 512,
    "alpha": 1.0,
    "logit_normal": (math.log(2.0), 1.6),
    "weighting": "1_minus_sigma",
}
SID_DIT_T5 = {
    "sd3_medium": 77,
    "sd35_medium": 77,
    "sd35_large": 77,
    "flux_dev": 512,
    "flux_lite": 512,
    "flux_schnell": 256,
}


def get_config(arg=None):
    preset = choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = sid.default_config()
    c.method.alpha = 1.0
    c.networks.discriminator = discriminator_config(lr=2e-3)  # used when method.gan is on
    if preset == "digits_flux":
        sid_digits_flux(c)
        return c
    if preset.startswith("digits"):
        # The SiD-LSG scripts' optimizer; the student's EMA shortened to the run.
        sid_digits(c, lr=DIGITS_LR)
        c.networks.discriminator.optimizer.lr = DIGITS_LR
        for key in ("teacher_guidance", "fake_guidance", "fake_train_guidance"):
            c.method[key] = 2.0
        c.method.fake_cond_dropout = 0.1
        if preset == "digits_4step":
            c.method.student_timesteps = FOUR_STEPS
        return c
    if preset in FLOW_TEACHERS:
        sid_dit(c, preset)
        return c
    if not preset.startswith("gmm"):
        sid_networks(c, preset.removesuffix("_4step"), batch_size=256, num_steps=20000)
        c.networks.discriminator.optimizer.lr = 1e-6
        for key in ("teacher_guidance", "fake_guidance", "fake_train_guidance"):
            c.method[key] = 2.0
        c.method.fake_cond_dropout = 0.1
        if preset.endswith("_4step"):
            c.method.student_timesteps = FOUR_STEPS
        return c
    few_step = preset in ("gmm_2step", "gmm_4step")
    gmm_distillation(c, student_lr=1e-3, student_size=NARROW, fake_size=NARROW if few_step else WIDE)
    c.num_steps = 5000
    c.method.teacher_guidance = 3.0
    c.method.fake_guidance = 3.0
    c.method.fake_train_guidance = 1.0
    c.method.fake_cond_dropout = 0.1
    if few_step:
        # Without clipping at lr 1e-3 the few-step student is on the edge of stability and 5000 steps
        # mode-collapse; a student gradient norm clipped at 0.3 stabilises it (benchmarks/RESULTS.md, "Preset
        # histories").
        c.networks.student.optimizer.grad_clip = 0.3
        c.method.student_timesteps = (999.0, 499.0) if preset == "gmm_2step" else FOUR_STEPS
    return c


def sid_dit(c, preset: str) -> None:
    """SiD-DiT's four-step flow-teacher setting on ``preset`` (settings and sources: the module docstring)."""
    sid_networks(c, preset, batch_size=SID_DIT["batch"], num_steps=SID_DIT["steps"], lr=SID_DIT["lr"])
    c.networks.student.ema_decay = 0.0
    for name in ("student", "fake_score"):
        c.networks[name].optimizer.eps = SID_DIT["adam_eps"]
    c.networks.discriminator.optimizer.lr = SID_DIT["lr"]
    c.teacher.resolution = SID_DIT["resolution"]
    c.teacher.t5_length = SID_DIT_T5[preset]
    kappa = 1.0 if preset == "flux_schnell" else SID_DIT["kappa"]
    for key in ("teacher_guidance", "fake_guidance", "fake_train_guidance"):
        c.method[key] = kappa
    sid_dit_method(c)


def sid_dit_method(c) -> None:
    """SiD-DiT's loss settings: four students steps from pure noise with fresh noise between, velocity fake
    score without prompt dropout, logit-normal times, the 1 - t generator weight, alpha 1."""
    c.method.alpha = SID_DIT["alpha"]
    c.method.fake_cond_dropout = 0.0
    c.method.student_timesteps = FLOW_FOUR_STEPS
    c.method.fake_target = "velocity"
    c.method.fake_weighting = "uniform"
    for key in ("t_sampling", "fake_t_sampling"):
        c.method[key] = "logit_normal"
    c.method.t_logit_normal = c.method.fake_t_logit_normal = SID_DIT["logit_normal"]
    c.method.generator_weighting = SID_DIT["weighting"]
    c.method.renoise = "fresh"


def sid_digits_flux(c) -> None:
    """SiD-DiT's four-step setting on the flow digits world, with the UNet digits presets' miniature run."""
    sid_digits(c, lr=DIGITS_LR, flow=True)
    for name in ("student", "fake_score"):
        c.networks[name].optimizer.eps = SID_DIT["adam_eps"]
    c.networks.discriminator.optimizer.lr = DIGITS_LR
    sid_dit_method(c)
    for key in ("teacher_guidance", "fake_guidance", "fake_train_guidance"):
        c.method[key] = 2.0  # the digits presets' kappa (measured: SiD-DiT's 4.5 over-saturates here)
