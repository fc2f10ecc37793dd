"""SiD-LSG (Score identity Distillation with long and short guidance, one-step student).

Reference: Zhou et al., SiD-LSG, ICLR 2025 (arXiv 2406.01561), official scripts mingyuanzhou/SiD-LSG.
CFG convention "uncond" (y_u + w (y_c - y_u)) with four scales: kappa1 (fake-score training, 10% prompt
dropout), kappa2 = kappa3 (fake score in the generator loss), kappa4 (teacher in the generator loss);
unconditional input = the teacher world's: the null label (gmm), the empty prompt (digits, SD1.5/2.1, flow
teachers). Method notes: docs/distribution_matching.md, SiD-LSG. Measured runs of the digits and gmm presets:
benchmarks/RESULTS.md, "Preset histories".

Presets:
  digits  the shipped digits teacher (jdistill/assets/digits), one-step student with the scripts' generator
       (a zero image noised to t = 625, labelled 625; t ~ U{20..979}), kappa1..kappa4 = 2, alpha 1, 10%
       prompt dropout, Adam (0, 0.999) with one lr for both networks. Student and fake score are full copies
       of the teacher's UNet; lr 3e-5, student EMA 0.99 (the scripts' 0.05 Mimg half-life is longer than the
       run), 600 steps of 32. The same settings from pure noise at t = 999 (sid.py:digits) are far worse: the
       t = 625 input is what makes the one-step student sharp.
  gmm  analytic 8-mode Gaussian-mixture teacher on SD's VP schedule, one-step MLP student; the scripts'
       kappa1..kappa4 = 2, alpha = 1, 10% prompt dropout; student lr 1e-3 as the sid preset
       and 5000 steps, both MLPs at half width.

  sd15       the official scripts (run_sid.sh; docs/distribution_matching.md, SiD-LSG): SD1.5 at 512,
             kappa1..kappa4 = 2, alpha 1, generator input sigma_625 z labelled t = 625, generator
             t ~ U{20..979}, 10% prompt dropout, eps-MSE fake loss; Adam (0, 0.999), eps 1e-8, lr 1e-6 for both
             networks, batch 512, float32, EMA half-life 0.05 Mimg. The run length is not stated in the repo:
             100k steps (51 Mimg) here. Reported (COCO-2014 30k, 1 step): kappa 1.5 FID 8.71, kappa 2 FID 9.56.
  sd21base   the same on SD2.1-base (kappa 1.5: FID 9.52).
  flux_dev, flux_schnell, flux_lite, sd3_medium, sd35_medium, sd35_large
             the same networks and optimizer on a flow-matching transformer teacher, with SiD-DiT's
             (ml-sid-dit) flow settings: the generator starts from pure noise at flow time 1 (the scripts'
             sigma_625 z is a VP-schedule input), the fake score on the flow-matching (velocity) MSE,
             kappa1..kappa4 = the teacher's own sampling CFG (SiD-DiT's LSG: all 4.5 on SANA; FLUX-dev/lite
             through the guidance embedding), batch 256, 20k steps.

  python -m jdistill.main --config configs/sid_lsg.py:digits --workdir runs/sid_lsg_digits
  python -m jdistill.main --config configs/sid_lsg.py:gmm --workdir runs/sid_lsg_gmm
"""

from jdistill.config_base import (
    FLOW_TEACHERS,
    NARROW,
    base_config,
    flow_guidance,
    gmm_distillation,
    sid_digits,
    sid_networks,
)
from jdistill.configuration import choose_preset
from jdistill.methods import sid_lsg
from jdistill.methods.adversarial import discriminator_config

PRESETS = ("digits", "gmm", "sd15", "sd21base", *FLOW_TEACHERS)
DIGITS_LR = 3e-5


def get_config(arg=None):
    preset = choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = sid_lsg.default_config()
    c.networks.discriminator = discriminator_config(lr=2e-3)  # used when method.gan is on
    if preset == "gmm":
        gmm_distillation(c, student_lr=1e-3, student_size=NARROW, fake_size=NARROW)
        c.num_steps = 5000
        return c
    if preset == "digits":
        # The scripts' Adam (0, 0.999) and one lr for both networks; the student's EMA shortened to the run;
        # kappa1..kappa4 = 2, alpha 1 and 10% prompt dropout are the scripts' (the method's defaults).
        sid_digits(c, lr=DIGITS_LR)
        c.networks.discriminator.optimizer.lr = DIGITS_LR
    elif preset in FLOW_TEACHERS:
        sid_networks(c, preset, batch_size=256, num_steps=20000)
        c.networks.discriminator.optimizer.lr = 1e-6
        for key in ("teacher_guidance", "fake_guidance", "fake_train_guidance"):
            c.method[key] = flow_guidance(preset, c.method.cfg_convention)
        c.method.student_timesteps = (1.0,)
        c.method.fake_target = "velocity"
        return c
    else:
        sid_networks(c, preset, batch_size=512, num_steps=100000)
        c.networks.discriminator.optimizer.lr = 1e-6
    # The scripts' generator: a zero image noised to t = 625, labelled 625; t ~ U{20..979}.
    c.method.student_input = "noised_zero"
    c.method.student_timesteps = (625.0,)
    c.method.t_range = (0.02, 0.979)
    return c
