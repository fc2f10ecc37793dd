"""LCM (latent consistency distillation) and LCM-LoRA.

Reference: Luo et al., Latent Consistency Models (arXiv 2310.04378) and LCM-LoRA (arXiv 2311.05556); the
training scripts of luosiallen/latent-consistency-model, ../shared/reference/methods.md section 4.1.
CFG convention "cond" (y_c + w (y_c - y_u), LCM's own); unconditional input = the null label (gmm).

Presets:
  gmm  analytic 8-mode Gaussian-mixture teacher on SD's VP schedule, real mixture samples as data; the
       scripts' skipping-step DDIM grid (50 of 1000), boundary scalings (sigma_d 0.5, x10), pseudo-Huber
       c = 1e-3 and EMA target 0.95. The student is an x0-prediction MLP from scratch with a guidance
       embedding (time_cond_proj_dim 32); toy-specific: w ~ U[1, 3] (LCM: [5, 15] for SD), sampled at w = 2.

  python -m jdistill.main --config configs/lcm.py:gmm --workdir runs/lcm_gmm
  python -m jdistill.main --config configs/lcm.py:gmm --workdir runs/lcm_gmm --mode eval \
      --config.method.student_timesteps='(999., 499.)'            # the same student, two steps
"""

from jdistill.config_base import base_config, gmm_teacher
from jdistill.configuration import choose_preset
from jdistill.methods import lcm
from jdistill.methods.common import network_config

PRESETS = ("gmm",)


def get_config(arg=None):
    preset = choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = lcm.default_config()
    if preset == "gmm":
        c.teacher = gmm_teacher("vp")
        c.num_steps = 4000
        c.batch_size = 256
        c.log_every = 200
        c.checkpoint.every = 2000
        c.sample.every = 2000
        c.method.guidance_range = (1.0, 3.0)
        c.method.sample_guidance = 2.0
        c.networks.student = network_config(
            prediction="x0", lr=1e-3, ema_decay=0.95, fourier_features=2, time_cond_proj_dim=32
        )
        c.networks.student.optimizer.schedule = "cosine"
    return c
