"""DMD (distribution matching + regression on teacher ODE pairs, one-step student).

Reference: Yin et al., DMD, CVPR 2024 (arXiv 2311.18828); ../shared/reference/methods.md section 2.1.
CFG convention "uncond" (y_u + w (y_c - y_u)) on the real score only; the fake score runs without guidance;
unconditional input = the null label (gmm). Regression weight 0.25 as the paper's (MSE in output space in
place of LPIPS, see jdistill/methods/dmd.py).

Presets:
  gmm  analytic 8-mode Gaussian-mixture teacher on SD's VP schedule; 4096 ODE pairs (50 DDIM steps, same
       CFG) generated in memory when the run starts.

  python -m jdistill.main --config configs/dmd.py:gmm --workdir runs/dmd_gmm
  python tools/make_ode_pairs.py --config configs/dmd.py:gmm --out pairs/gmm --count 4096   # pairs on disk
"""

from jdistill.config_base import base_config, gmm_teacher
from jdistill.configuration import choose_preset
from jdistill.methods import dmd
from jdistill.methods.common import network_config

PRESETS = ("gmm",)


def get_config(arg=None):
    choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = dmd.default_config()
    c.teacher = gmm_teacher("vp")
    c.num_steps = 8000
    c.batch_size = 256
    c.log_every = 200
    c.checkpoint.every = 2000
    c.sample.every = 2000
    c.method.guidance_scale = 3.0
    c.method.make_pairs = 4096
    c.method.fake_target = "v"
    c.networks.student = network_config(prediction="x0", lr=3e-4, ema_decay=0.99, fourier_features=2)
    c.networks.student.optimizer.schedule = "cosine"
    c.networks.fake_score = network_config(prediction="v", lr=2e-3, fourier_features=4)
    c.networks.fake_score.optimizer.schedule = "cosine"
    return c
