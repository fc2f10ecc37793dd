"""Supervised denoising / flow-matching training of a model on data (trains teachers, e.g. the digits one).

Presets:
  gmm       the Gaussian-mixture data on SD's VP schedule, eps-prediction MLP, DDIM sampling
  gmm_flow  the same data on a rectified-flow path, velocity-prediction MLP, flow-Euler sampling

  python -m jdistill.main --config configs/sft.py:gmm --workdir runs/sft_gmm
"""

from jdistill.config_base import base_config, gmm_teacher
from jdistill.configuration import choose_preset
from jdistill.methods import sft
from jdistill.methods.common import network_config

PRESETS = ("gmm", "gmm_flow")


def get_config(arg=None):
    preset = choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = sft.default_config()
    c.num_steps = 3000
    c.batch_size = 512
    c.checkpoint.every = 1000
    c.sample.every = 1000
    if preset == "gmm":
        c.teacher = gmm_teacher("vp")
        c.networks.model = network_config(prediction="eps", lr=1e-3, ema_decay=0.999)
    elif preset == "gmm_flow":
        c.teacher = gmm_teacher("flow")
        c.networks.model = network_config(prediction="velocity", lr=1e-3, ema_decay=0.999)
    return c
