"""DMD2 (distribution matching with a two time-scale fake score; no regression loss).

Reference: Yin et al., DMD2, NeurIPS 2024 (arXiv 2405.14867), official code tianweiy/DMD2. CFG convention
"uncond" (y_u + w (y_c - y_u)) on the real score only (the fake score runs without guidance, as DMD2 asserts);
unconditional input = the teacher world's: the null label (gmm), the empty prompt (digits, SD1.5/2.1, flow
teachers) or zeros (SDXL, as DMD2's SDXL code). Method notes: docs/distribution_matching.md, DMD2, and
docs/adversarial.md for the GAN head. Measured runs and the sweeps behind the digits, digits_flux and gmm
choices: benchmarks/RESULTS.md, "Preset histories" and "Flow digits world".

Presets:
  digits     the shipped digits teacher (jdistill/assets/digits), one-step student, GAN off (method.gan
             switches it on: real images come with the world). Student and fake score are full copies of the
             teacher's UNet; DMD2's optimizer (AdamW (0.9, 0.999), wd 0.01, clip 10, one lr for both) at lr
             1e-4 with 50 warm-up steps; real-score CFG 4 (the teacher's sampling scale; the fake score without
             guidance); 2 fake-score updates per generator update (TTUR 10 leaves too few generator updates
             in a short run); student EMA 0.99; 800 steps of 32.
  digits_flux
             the flow digits world (jdistill/assets/digits_flux, a tiny FLUX teacher with true CFG and the
             empty prompt as unconditional input): the flow presets' DMD2 (one step from pure noise at flow
             time 1, velocity fake score, CFG on the real score only) with the digits preset's miniature run
             (lr 1e-4, 2 fake updates per generator update, EMA 0.99, 800 steps of 32) and real CFG 3 (the
             teacher's sampling scale 4 measured a worse Frechet distance, 2 a lower digit accuracy).
  gmm        analytic 8-mode Gaussian-mixture teacher on SD's VP schedule, one-step MLP student. The losses
             and timestep ranges (DM t ~ U{20..980}, fake t ~ U{0..999}) are the paper's. Toy-specific
             choices, each measured: real-score CFG w = 2; the generator every step (the paper's TTUR 10 is
             for SD); student EMA 0.999, lr 3e-4; the fake score from scratch with v-prediction, as
             swiftbrush's preset. Without DMD2's GAN term the student's modes stay wider than the teacher's.
  gmm_4step  the same with a four-step student at (999, 749, 499, 249) trained by backward simulation.
  Official scripts (experiments/*.sh and the paper's appendix, as the author quotes it in DMD2 issue #30;
  docs/distribution_matching.md, DMD2); AdamW (0.9, 0.999), wd 0.01, constant lr after 500 warm-up steps,
  clip 10, no EMA; real images for the GAN from teacher.data:
  sd15        stage 1: lr 1e-5, real CFG 1.75, 10 fake updates per generator update, no GAN, batch 2048,
              40k steps.
  sd15_gan    stage 2: lr 5e-7, GAN lambda_G 1e-3 / lambda_D 1e-2, 5k steps, from stage 1's networks:
              --config.networks.student.init_from=STAGE1_DIR --config.networks.fake_score.init_from=STAGE1_DIR
              (the head starts fresh; without init_from both networks start from the teacher).
  sd21base    stage 1 on SD2.1-base (not a paper run).
  sdxl        four steps (999, 749, 499, 249) with backward simulation: lr 5e-7, CFG 8, 5 fake updates per
              generator update, GAN 5e-3 / 1e-2, batch 128, 19k steps; zero unconditional embeddings.
  sdxl_1step  one step, pure noise labelled t = 399, otherwise as sdxl, 24k steps (the paper first regresses
              2k iterations on 10k ODE pairs; not reproduced here).
  sdxl_lora   sdxl with a LoRA student (rank 64, alpha 8, attention projections), lr 5e-5, 16k steps.
  flux_dev, flux_schnell, flux_lite, sd3_medium, sd35_medium, sd35_large
             on a flow-matching transformer teacher (not a paper run): one-step student from flow time 1 (pure noise), lr 5e-7, 5 fake updates per
             generator update, batch 128, 20k steps; student and fake score full
             copies of the transformer, the fake score trained with the flow-matching (velocity) MSE, CFG = the
             teacher's own sampling scale (FLUX-dev/lite through the guidance embedding, schnell none), the
             optimizer of the sdxl preset; GAN off (the diffusion-GAN head reads a UNet's mid block).

  python -m jdistill.main --config configs/dmd2.py:digits --workdir runs/dmd2_digits
  python -m jdistill.main --config configs/dmd2.py:gmm --workdir runs/dmd2_gmm
"""

from jdistill.config_base import (
    FLOW_TEACHERS,
    base_config,
    dmd2_digits,
    dmd2_networks,
    flow_guidance,
    gmm_distillation,
)
from jdistill.configuration import choose_preset
from jdistill.methods import dmd2
from jdistill.methods.adversarial import discriminator_config

PRESETS = (
    "digits",
    "digits_flux",
    "gmm",
    "gmm_4step",
    "sd15",
    "sd15_gan",
    "sd21base",
    "sdxl",
    "sdxl_1step",
    "sdxl_lora",
    *FLOW_TEACHERS,
)
FOUR_STEPS = (999.0, 749.0, 499.0, 249.0)
DIGITS_LR = 1e-4


def get_config(arg=None):
    preset = choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = dmd2.default_config()
    if preset == "digits":
        # DMD2's optimizer (AdamW, wd 0.01, clip 10, one lr for both networks) with a short warm-up.
        dmd2_digits(c, lr=DIGITS_LR, num_steps=800)
        c.method.guidance_scale = 4.0  # the teacher's own sampling scale, real score only
        c.method.generator_every = 2
        c.networks.discriminator = discriminator_config(lr=DIGITS_LR)  # used when method.gan is on
        return c
    if preset == "digits_flux":
        dmd2_digits_flux(c)
        return c
    if preset.startswith("gmm"):
        gmm_distillation(c, student_lr=3e-4)
        c.method.guidance_scale = 2.0
        c.method.generator_every = 1
        c.networks.student.ema_decay = 0.999
        c.networks.discriminator = discriminator_config(lr=2e-3)  # used when method.gan is on
        if preset == "gmm_4step":
            c.method.student_timesteps = FOUR_STEPS
        return c
    if preset in FLOW_TEACHERS:
        dmd2_networks(c, preset, lr=5e-7, batch_size=128, num_steps=20000)
        c.method.guidance_scale = flow_guidance(preset, c.method.cfg_convention)
        c.method.generator_every = 5
        c.method.student_timesteps = (1.0,)
        c.method.fake_target = "velocity"
        c.networks.discriminator = discriminator_config(lr=5e-7)  # unused: the GAN is off
        return c
    if preset.startswith("sdxl"):
        lora = (64, 8.0, ("to_q", "to_k", "to_v", "to_out.0")) if preset == "sdxl_lora" else None
        lr = 5e-5 if lora else 5e-7
        steps = {"sdxl": 19000, "sdxl_1step": 24000, "sdxl_lora": 16000}[preset]
        dmd2_networks(c, "sdxl", lr=lr, batch_size=128, num_steps=steps, student_lora=lora)
        c.method.guidance_scale = 8.0
        c.method.generator_every = 5
        c.method.gan.generator_weight = 5e-3
        c.method.gan.discriminator_weight = 1e-2
        c.method.student_timesteps = (399.0,) if preset == "sdxl_1step" else FOUR_STEPS
        c.networks.discriminator = discriminator_config(lr=lr, num_down=4)  # SDXL's head: 4 strided convs
        return c
    stage2 = preset == "sd15_gan"
    dmd2_networks(
        c,
        "sd21base" if preset == "sd21base" else "sd15",
        lr=5e-7 if stage2 else 1e-5,
        batch_size=2048,
        num_steps=5000 if stage2 else 40000,
    )
    c.method.guidance_scale = 1.75
    c.method.generator_every = 10
    c.networks.discriminator = discriminator_config(lr=5e-7 if stage2 else 1e-5)
    if stage2:
        c.method.gan.generator_weight = 1e-3
        c.method.gan.discriminator_weight = 1e-2
    return c


def dmd2_digits_flux(c) -> None:
    """The flow presets' DMD2 (one step from pure noise at flow time 1, velocity fake score, real-score CFG at
    the teacher's sampling scale) with the UNet digits preset's miniature run, on the flow digits world."""
    dmd2_digits(c, lr=DIGITS_LR, num_steps=800, flow=True)
    c.method.guidance_scale = 3.0  # real score only; 4 (the teacher's) and 2 measured worse (RESULTS.md)
    c.method.generator_every = 2
    c.method.student_timesteps = (1.0,)
    c.method.fake_target = "velocity"
    c.networks.discriminator = discriminator_config(lr=DIGITS_LR)  # unused: the GAN reads a UNet's mid block
