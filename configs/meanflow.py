"""MeanFlow: average-velocity students distilled from a teacher's flow.

Reference: Geng et al., MeanFlow (arXiv 2505.13447); the distillation recipe of T2I-Distill's
train_meanflow.py; ../shared/reference/methods.md section 5. CFG convention "uncond" (y_u + w (y_c - y_u)) on
the teacher; unconditional input = the null label (gmm), also used for 10% condition dropout.

Presets:
  gmm  analytic 8-mode Gaussian-mixture teacher on the rectified-flow path, real mixture samples as data;
       the recipe's (r, t) sampler (logit-normal(-0.4, 1), r != t for 75%), teacher velocity as the target,
       JVP along the teacher's velocity, adaptive weighting. The student is an MLP from scratch with a
       second time embedding for t - r and O(1) times; toy-specific: CFG w = 3, no student self-guidance, p = 0.5 (the
       recipe's p = 1: within-0.5 0.869 at 4000 steps, 0.907 at 8000; p = 0.5: 0.964).

  python -m jdistill.main --config configs/meanflow.py:gmm --workdir runs/meanflow_gmm
  python -m jdistill.main --config configs/meanflow.py:gmm --workdir runs/meanflow_gmm --mode eval \
      --config.method.student_timesteps='(1.0, 0.5)'              # the same student, two steps
"""

from jdistill.config_base import base_config, gmm_teacher
from jdistill.configuration import choose_preset
from jdistill.methods import meanflow
from jdistill.methods.common import network_config

PRESETS = ("gmm",)


def get_config(arg=None):
    preset = choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = meanflow.default_config()
    if preset == "gmm":
        c.teacher = gmm_teacher("flow")
        c.num_steps = 4000
        c.batch_size = 256
        c.log_every = 200
        c.checkpoint.every = 2000
        c.sample.every = 2000
        c.method.guidance_scale = 3.0
        c.method.adaptive_power = (
            0.5  # measured: p = 1 0.869 within-0.5 at 4000 steps (0.907 at 8000), p = 0.5 0.964
        )
        c.networks.student = network_config(
            prediction="velocity", lr=1e-3, ema_decay=0.99, fourier_features=2, second_time=True
        )
        c.networks.student.optimizer.schedule = "cosine"
    return c
