"""SiD-LSG (Score identity Distillation with long and short guidance, one-step student).

Reference: Zhou et al., SiD-LSG, ICLR 2025 (arXiv 2406.01561), official scripts mingyuanzhou/SiD-LSG;
../shared/reference/methods.md section 3.3. CFG convention "uncond" (y_u + w (y_c - y_u)) with four scales:
kappa1 (fake-score training, 10% prompt dropout), kappa2 = kappa3 (fake score in the generator loss), kappa4
(teacher in the generator loss); unconditional input = the null label (gmm).

Presets:
  gmm  analytic 8-mode Gaussian-mixture teacher on SD's VP schedule, one-step MLP student; the scripts'
       kappa1..kappa4 = 2, alpha = 1, 10% prompt dropout; student lr 1e-3 as the sid preset
       and 5000 steps (measured 2026-11-23: within-0.5 0.954, min mode share 0.106, class consistency
       0.982; 8000 steps: 0.971 / 0.109 / 0.986 in 179 s).

  python -m jdistill.main --config configs/sid_lsg.py:gmm --workdir runs/sid_lsg_gmm
"""

from jdistill.config_base import base_config, gmm_distillation
from jdistill.configuration import choose_preset
from jdistill.methods import sid_lsg
from jdistill.methods.adversarial import discriminator_config

PRESETS = ("gmm",)


def get_config(arg=None):
    choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = sid_lsg.default_config()
    gmm_distillation(c, student_lr=1e-3)
    c.num_steps = 5000
    c.networks.discriminator = discriminator_config(lr=2e-3)  # used when method.gan is on
    return c
