"""SwiftBrush (variational score distillation, one-step student).

Reference: Nguyen & Tran, SwiftBrush, CVPR 2024 (arXiv 2312.05239); losses and settings of the official code,
../shared/reference/methods.md section 1.1. CFG convention "uncond" (y_u + w (y_c - y_u)) on both the teacher
and the fake score; unconditional input = the null label (gmm).

Presets:
  gmm  analytic 8-mode Gaussian-mixture teacher on SD's VP schedule (scaled_linear betas), MLP student
       (x0 output, fed pure noise labelled t = 999) and an MLP fake score that starts equal to the teacher.

  python -m jdistill.main --config configs/swiftbrush.py:gmm --workdir runs/gmm

Expected (gmm, 2-core CPU): about a minute; samples/final.npy with >= 90% of samples within 0.5 of a mode,
every mode >= 5%, >= 95% of samples on a mode of their class.
"""

from jdistill.config_base import base_config, gmm_teacher
from jdistill.configuration import choose_preset
from jdistill.methods import swiftbrush
from jdistill.methods.common import network_config

PRESETS = ("gmm",)


def get_config(arg=None):
    preset = choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = swiftbrush.default_config()
    if preset == "gmm":
        c.teacher = gmm_teacher("vp")
        c.num_steps = 8000
        c.batch_size = 256
        c.log_every = 200
        c.checkpoint.every = 2000
        c.sample.every = 2000
        c.method.guidance_scale = 3.0
        # The toy student starts class-agnostic (random init), so its fake score starts from scratch too:
        # a fake that starts as the class-conditional teacher cancels the class signal of CFG.
        c.method.fake_score_init = "random"
        c.method.fake_target = "v"
        c.method.fake_weighting = "uniform"
        c.networks.student = network_config(prediction="x0", lr=3e-4, ema_decay=0.99, fourier_features=2)
        c.networks.student.optimizer.schedule = "cosine"
        c.networks.fake_score = network_config(prediction="v", lr=2e-3, fourier_features=4)
        c.networks.fake_score.optimizer.schedule = "cosine"
    return c
