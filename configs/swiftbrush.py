"""SwiftBrush (variational score distillation, one-step student).

Reference: Nguyen & Tran, SwiftBrush, CVPR 2024 (arXiv 2312.05239); losses and settings of the official code,
../shared/reference/methods.md section 1.1. CFG convention "uncond" (y_u + w (y_c - y_u)) on both the teacher
and the fake score; unconditional input = the null label (gmm).

Presets:
  gmm  analytic 8-mode Gaussian-mixture teacher on SD's VP schedule (scaled_linear betas). The losses,
       timestep ranges (VSD t ~ U{20..980}, fake t ~ U{0..999}), 1:1 update order and 10% prompt dropout
       are the paper's. Toy-specific choices, each measured (2026-11-23 sweeps):
       - guidance w = 3 on teacher and fake score (w = 1.5: class consistency ~0.85; w >= 5 bends modes);
       - the fake score starts from scratch, v-prediction, uniform v-MSE: a fake that starts as the
         class-conditional teacher (the paper's LoRA) cancels the CFG class signal while the random-init
         student is still class-agnostic (class consistency stayed at 0.50);
       - Fourier input features (student 2, fake 4) and cosine learning rates: the fake score's precision
         limits the student; with an oracle fake (kernel score of fresh student samples) the same student
         reached 0.95 within-mode.

  python -m jdistill.main --config configs/swiftbrush.py:gmm --workdir runs/gmm

Expected (gmm, 2-core CPU): about 100 s; samples/final.npy with 0.95 of samples within 0.5 of a mode, every
mode 11-13%, class consistency 0.98 (thresholds checked by tests: 0.90, 0.05, 0.95).
"""

from jdistill.config_base import base_config, gmm_distillation
from jdistill.configuration import choose_preset
from jdistill.methods import swiftbrush

PRESETS = ("gmm",)


def get_config(arg=None):
    preset = choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = swiftbrush.default_config()
    if preset == "gmm":
        gmm_distillation(c)
        c.method.guidance_scale = 3.0
        # The toy student starts class-agnostic (random init), so its fake score starts from scratch too:
        # a fake that starts as the class-conditional teacher cancels the class signal of CFG.
        c.method.fake_score_init = "network"
        c.method.fake_weighting = "uniform"
    return c
