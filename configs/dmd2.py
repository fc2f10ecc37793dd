"""DMD2 (distribution matching with a two time-scale fake score; no regression loss).

Reference: Yin et al., DMD2, NeurIPS 2024 (arXiv 2405.14867), official code tianweiy/DMD2;
../shared/reference/methods.md section 2.2. CFG convention "uncond" (y_u + w (y_c - y_u)) on the real score
only (the fake score runs without guidance, as DMD2 asserts); unconditional input = the null label (gmm).

Presets:
  gmm        analytic 8-mode Gaussian-mixture teacher on SD's VP schedule, one-step MLP student. The losses
             and timestep ranges (DM t ~ U{20..980}, fake t ~ U{0..999}) are the paper's. Toy-specific
             choices, each measured (2026-11-23 sweeps, 8000 steps of 256, within-0.5 / class consistency):
             - real-score CFG w = 2 (1.75, the SD1.5 setting: 0.882 / 0.965; 2: 0.914 / 0.980; 3: 0.822);
             - generator every step (the paper's TTUR 10 is for SD; every 2 over 12000 steps: 0.918);
             - student EMA 0.999 (0.99: 0.914), lr 3e-4 (1e-4: 0.761, 1e-3: 0.630);
             - the fake score from scratch with v-prediction, as swiftbrush's preset (eps-MSE: 0.764).
             Without DMD2's GAN term the student's modes stay about twice as wide as the teacher's
             (median distance to the mode 0.27 vs 0.12), which caps within-0.5 near 0.92.
  gmm_4step  the same with a four-step student at (999, 749, 499, 249) trained by backward simulation.

  python -m jdistill.main --config configs/dmd2.py:gmm --workdir runs/dmd2_gmm
"""

from jdistill.config_base import base_config, gmm_distillation
from jdistill.configuration import choose_preset
from jdistill.methods import dmd2
from jdistill.methods.adversarial import discriminator_config

PRESETS = ("gmm", "gmm_4step")


def get_config(arg=None):
    preset = choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = dmd2.default_config()
    gmm_distillation(c, student_lr=3e-4)
    c.method.guidance_scale = 2.0
    c.method.generator_every = 1
    c.networks.student.ema_decay = 0.999
    c.networks.discriminator = discriminator_config(lr=2e-3)  # used when method.gan is on
    if preset == "gmm_4step":
        c.method.student_timesteps = (999.0, 749.0, 499.0, 249.0)
    return c
