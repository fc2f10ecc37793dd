"""DMD2 (distribution matching with a two time-scale fake score; no regression loss).

Reference: Yin et al., DMD2, NeurIPS 2024 (arXiv 2405.14867), official code tianweiy/DMD2;
../shared/reference/methods.md section 2.2. CFG convention "uncond" (y_u + w (y_c - y_u)) on the real score
only (the fake score runs without guidance, as DMD2 asserts); unconditional input = the null label (gmm).

Presets:
  gmm     analytic 8-mode Gaussian-mixture teacher on SD's VP schedule, one-step MLP student.
  gmm_4step  the same with a four-step student at (999, 749, 499, 249) trained by backward simulation.

  python -m jdistill.main --config configs/dmd2.py:gmm --workdir runs/dmd2_gmm
"""

from jdistill.config_base import base_config, gmm_distillation
from jdistill.configuration import choose_preset
from jdistill.methods import dmd2

PRESETS = ("gmm", "gmm_4step")


def get_config(arg=None):
    preset = choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = dmd2.default_config()
    gmm_distillation(c, student_lr=3e-4)
    c.method.guidance_scale = 3.0
    c.method.generator_every = 2
    if preset == "gmm_4step":
        c.method.student_timesteps = (999.0, 749.0, 499.0, 249.0)
    return c
