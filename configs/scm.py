"""sCM: continuous-time consistency distillation in TrigFlow.

Reference: Lu & Song, sCM (arXiv 2410.11081); SANA-Sprint (arXiv 2503.09641, NVlabs/Sana
train_scm_ladd.py) and T2I-Distill's train_sCM.py; ../shared/reference/methods.md section 4.2. CFG convention
"uncond" (y_u + w (y_c - y_u)) on the teacher, w per sample from ``guidance_choices``; unconditional input =
the null label (gmm).

Presets:
  gmm  analytic 8-mode Gaussian-mixture teacher on the TrigFlow path (sigma_d 0.5; the teacher is exact on any
       path), real mixture samples as data; sCM's loss with tangent warm-up, tangent normalisation c = 0.1,
       the learned log-variance weighting and forward-mode JVP. The student is a TrigFlow (F-prediction)
       MLP from scratch with O(1) time input; toy-specific: CFG w = 3. Measured 2026-11-23 (within-0.5 / min
       mode share / class consistency): 1 step 0.980 / 0.114 / 0.991, 2 steps (pi/2, 1.1) 0.982 / 0.118 / 0.992;
       with method.jvp=finite_difference 0.969 / 0.122 / 0.990; the same MLP with its time embedding at 100 t
       (not O(1)) collapsed to 0.0 within-0.5.

  python -m jdistill.main --config configs/scm.py:gmm --workdir runs/scm_gmm
  python -m jdistill.main --config configs/scm.py:gmm --workdir runs/scm_gmm --mode eval \
      --config.method.student_timesteps='(1.5707963, 1.1)'        # the same student, two steps
"""

from jdistill.config_base import base_config, gmm_teacher
from jdistill.configuration import choose_preset
from jdistill.methods import scm
from jdistill.methods.common import network_config

PRESETS = ("gmm",)


def get_config(arg=None):
    preset = choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = scm.default_config()
    if preset == "gmm":
        c.teacher = gmm_teacher("trigflow")
        c.num_steps = 4000
        c.batch_size = 256
        c.log_every = 200
        c.checkpoint.every = 2000
        c.sample.every = 2000
        c.method.guidance_choices = (3.0,)
        c.method.sample_guidance = 3.0
        c.method.tangent_warmup_steps = 1000
        c.networks.student = network_config(
            prediction="velocity", lr=1e-3, ema_decay=0.99, fourier_features=2, time_scale=1.0
        )
        c.networks.student.optimizer.schedule = "cosine"
        c.networks.logvar = scm.logvar_config(lr=1e-2)
    return c
