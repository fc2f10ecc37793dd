"""DMD2 (distribution matching with a two time-scale fake score; no regression loss).

Reference: Yin et al., DMD2, NeurIPS 2024 (arXiv 2405.14867), official code tianweiy/DMD2;
../shared/reference/methods.md section 2.2. CFG convention "uncond" (y_u + w (y_c - y_u)) on the real score
only (the fake score runs without guidance, as DMD2 asserts); unconditional input = the null label (gmm).

Presets:
  gmm     analytic 8-mode Gaussian-mixture teacher on SD's VP schedule, one-step MLP student.
  gmm_4step  the same with a four-step student at (999, 749, 499, 249) trained by backward simulation.

  python -m jdistill.main --config configs/dmd2.py:gmm --workdir runs/dmd2_gmm
"""

from jdistill.config_base import base_config, gmm_teacher
from jdistill.configuration import choose_preset
from jdistill.methods import dmd2
from jdistill.methods.common import network_config

PRESETS = ("gmm", "gmm_4step")


def get_config(arg=None):
    preset = choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = dmd2.default_config()
    c.teacher = gmm_teacher("vp")
    c.num_steps = 8000
    c.batch_size = 256
    c.log_every = 200
    c.checkpoint.every = 2000
    c.sample.every = 2000
    c.method.guidance_scale = 3.0
    c.method.generator_every = 2
    c.method.fake_target = "v"
    c.networks.student = network_config(prediction="x0", lr=3e-4, ema_decay=0.99, fourier_features=2)
    c.networks.student.optimizer.schedule = "cosine"
    c.networks.fake_score = network_config(prediction="v", lr=2e-3, fourier_features=4)
    c.networks.fake_score.optimizer.schedule = "cosine"
    if preset == "gmm_4step":
        c.method.student_timesteps = (999.0, 749.0, 499.0, 249.0)
    return c
