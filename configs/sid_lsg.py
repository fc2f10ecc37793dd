"""SiD-LSG (Score identity Distillation with long and short guidance, one-step student).

Reference: Zhou et al., SiD-LSG, ICLR 2025 (arXiv 2406.01561), official scripts mingyuanzhou/SiD-LSG;
../shared/reference/methods.md section 3.3. CFG convention "uncond" (y_u + w (y_c - y_u)) with four scales:
kappa1 (fake-score training, 10% prompt dropout), kappa2 = kappa3 (fake score in the generator loss), kappa4
(teacher in the generator loss); unconditional input = the null label (gmm).

Presets:
  gmm  analytic 8-mode Gaussian-mixture teacher on SD's VP schedule, one-step MLP student.

  python -m jdistill.main --config configs/sid_lsg.py:gmm --workdir runs/sid_lsg_gmm
"""

from jdistill.config_base import base_config, gmm_distillation
from jdistill.configuration import choose_preset
from jdistill.methods import sid_lsg

PRESETS = ("gmm",)


def get_config(arg=None):
    choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = sid_lsg.default_config()
    gmm_distillation(c, student_lr=1e-4)
    return c
