"""Score identity Distillation (SiD), one-step and few-step students.

References: Zhou et al., SiD, ICML 2024 (arXiv 2404.04057); few-step SiD (arXiv 2505.12674);
../shared/reference/methods.md section 3. CFG convention "uncond" (y_u + w (y_c - y_u)); unconditional input =
the null label (gmm). Teacher guidance kappa4 and fake guidance kappa2 are recorded below.

Presets:
  gmm        analytic 8-mode Gaussian-mixture teacher on SD's VP schedule, one-step MLP student.
  gmm_2step  two-step student at (999, 499), uniform mixture over step counts.
  gmm_4step  four-step student at (999, 749, 499, 249).

  python -m jdistill.main --config configs/sid.py:gmm --workdir runs/sid_gmm
"""

from jdistill.config_base import base_config, gmm_teacher
from jdistill.configuration import choose_preset
from jdistill.methods import sid
from jdistill.methods.common import network_config

PRESETS = ("gmm", "gmm_2step", "gmm_4step")


def get_config(arg=None):
    preset = choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = sid.default_config()
    c.teacher = gmm_teacher("vp")
    c.num_steps = 6000
    c.batch_size = 256
    c.log_every = 200
    c.checkpoint.every = 2000
    c.sample.every = 2000
    c.method.alpha = 1.0
    c.method.teacher_guidance = 3.0
    c.method.fake_guidance = 3.0
    c.method.fake_train_guidance = 1.0
    c.method.fake_cond_dropout = 0.1
    c.method.fake_target = "v"
    c.networks.student = network_config(prediction="x0", lr=1e-4, ema_decay=0.99, fourier_features=2)
    c.networks.student.optimizer.schedule = "cosine"
    c.networks.fake_score = network_config(prediction="v", lr=2e-3, fourier_features=4)
    c.networks.fake_score.optimizer.schedule = "cosine"
    if preset == "gmm_2step":
        c.method.student_timesteps = (999.0, 499.0)
    elif preset == "gmm_4step":
        c.method.student_timesteps = (999.0, 749.0, 499.0, 249.0)
    return c
