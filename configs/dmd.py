"""DMD (distribution matching + regression on teacher ODE pairs, one-step student).

Reference: Yin et al., DMD, CVPR 2024 (arXiv 2311.18828); its code is not public (DMD2's repository
reimplements the distribution-matching part). CFG convention "uncond" (y_u + w (y_c - y_u)) on the real score
only; the fake score runs without guidance; unconditional input = the teacher world's: the null label (gmm),
the empty prompt (digits, SD1.5/2.1, flow teachers) or zeros (SDXL). Regression weight 0.25 as the paper's
(MSE in output space in place of LPIPS, see jdistill/methods/dmd.py). Method notes:
docs/distribution_matching.md, DMD. Measured runs of the digits and gmm presets: benchmarks/RESULTS.md,
"Preset histories".

Presets:
  digits  the shipped digits teacher (jdistill/assets/digits), one-step student at t = 999; 512 ODE pairs
       (25 DDIM steps with the same CFG: half the cost of 50; the teacher's Frechet distance at 25 steps 79,
       at 50 steps 74) generated in memory when the run starts; real-score CFG 4 (the teacher's sampling scale), the fake
       score without guidance, regression weight 0.25 (MSE in latent space). Student and fake score are full
       copies of the teacher's UNet with the optimizer below (AdamW, wd 0.01, clip 10, one lr for both) at
       lr 1e-4 with 50 warm-up steps, student EMA 0.99, 1:1 updates, 600 steps of 32.
  gmm  analytic 8-mode Gaussian-mixture teacher on SD's VP schedule; 4096 ODE pairs (50 DDIM steps, same
       CFG) generated in memory when the run starts; real-score CFG w = 3 (the paper's FID model), the
       networks of the swiftbrush preset at half width (64 / 128, 1.7x faster steps): the regression pins the
       modes that DMD2's pure distribution matching leaves wide.
  sd15 SD1.5 at 512, real-score CFG 3 (the paper's FID model), one-step student at t = 999, regression weight
       0.25 on ODE pairs from tools/make_ode_pairs.py (set method.pairs; the paper used ~500k pairs and LPIPS,
       here MSE in latent space). DMD's code is not public: the optimizer settings are DMD2's SD1.5 stage-1
       ones (AdamW (0.9, 0.999), wd 0.01, lr 1e-5 for both networks, 500 warm-up steps, clip 10, batch 2048,
       no EMA) with DMD's 1:1 update ratio [unverified for DMD v1].
  sd21base, sdxl   the same on those teachers (not paper runs).
  flux_dev, flux_schnell, flux_lite, sd3_medium, sd35_medium, sd35_large
       on a flow-matching transformer teacher (not paper runs): one-step student from flow time 1 (pure
       noise), pairs from the teacher's flow Euler sampler with its own CFG (FLUX-dev/lite through the
       guidance embedding), the fake score on the flow-matching (velocity) MSE, lr 1e-6, batch 128, 20k steps.

  python -m jdistill.main --config configs/dmd.py:digits --workdir runs/dmd_digits
  python -m jdistill.main --config configs/dmd.py:gmm --workdir runs/dmd_gmm
  python tools/make_ode_pairs.py --config configs/dmd.py:gmm --out pairs/gmm --count 4096   # pairs on disk
"""

from jdistill.config_base import (
    FLOW_TEACHERS,
    NARROW,
    base_config,
    dmd2_digits,
    dmd2_networks,
    flow_guidance,
    gmm_distillation,
)
from jdistill.configuration import choose_preset
from jdistill.methods import dmd

PRESETS = ("digits", "gmm", "sd15", "sd21base", "sdxl", *FLOW_TEACHERS)
DIGITS_LR = 1e-4


def get_config(arg=None):
    preset = choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = dmd.default_config()
    c.method.guidance_scale = 3.0
    if preset == "digits":
        # DMD2's optimizer (the sd15 preset's, see below) with a short warm-up; 1:1 updates as DMD.
        dmd2_digits(c, lr=DIGITS_LR, num_steps=600)
        c.method.guidance_scale = 4.0  # the teacher's own sampling scale, real score and pairs
        c.method.make_pairs = 512
        c.method.pair_steps = 25
    elif preset == "gmm":
        gmm_distillation(c, student_lr=3e-4, student_size=NARROW, fake_size=NARROW)
        c.method.make_pairs = 4096
    elif preset in FLOW_TEACHERS:
        # DMD's 1:1 updates and regression on teacher ODE pairs (tools/make_ode_pairs.py -> method.pairs),
        # one-step student from flow time 1, the fake score on the velocity MSE, the teacher's own CFG.
        dmd2_networks(c, preset, lr=1e-6, batch_size=128, num_steps=20000)
        c.method.guidance_scale = flow_guidance(preset, c.method.cfg_convention)
        c.method.student_timesteps = (1.0,)
        c.method.fake_target = "velocity"
    else:
        dmd2_networks(c, preset, lr=1e-5, batch_size=2048, num_steps=40000)
    return c
