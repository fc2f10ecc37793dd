"""Supervised denoising / flow-matching training of a model on data (trains teachers, e.g. the digits one).

Presets:
  gmm       the Gaussian-mixture data on SD's VP schedule, eps-prediction MLP, DDIM sampling
  gmm_flow  the same data on a rectified-flow path, velocity-prediction MLP, flow-Euler sampling
  digits    the digits teacher's UNet (eps-prediction, SD's scaled-linear schedule) from diffusers' default
            initialisation, on the rendered digits with their captions (10% dropped to the empty prompt for
            CFG), through the pipeline's trained text encoder and VAE; AdamW 1e-3 with warm-up and cosine
            decay, EMA 0.999, batch 64. tools/build_digits_world.py runs it on the pipeline it writes
            (teacher.path), then exports the EMA UNet as the shipped teacher.

  python -m jdistill.main --config configs/sft.py:gmm --workdir runs/sft_gmm
  python -m jdistill.main --config configs/sft.py:digits --workdir runs/digits_teacher \
      --config.teacher.path=runs/digits_init
"""

from jdistill.config_base import base_config, gmm_teacher
from jdistill.configuration import choose_preset
from jdistill.methods import sft
from jdistill.methods.common import network_config

PRESETS = ("gmm", "gmm_flow", "digits")


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
    elif preset == "digits":
        digits_sft(c)
    return c


def digits_sft(c) -> None:
    from jdistill.models import teacher_model_config
    from jdistill.teachers.digits_world import digits_teacher_config

    c.teacher = digits_teacher_config()
    c.num_steps = 5000  # the shipped teacher's build (jdistill/assets/digits/build.json)
    c.batch_size = 64
    c.log_every = 200
    c.checkpoint.every = 1000
    c.sample.every = 2000
    c.sample.count = 64
    c.sample.final_count = 600  # 10 per (digit, colour)
    c.sample.batch = 200
    c.networks.model = network_config(prediction="eps", lr=1e-3, ema_decay=0.999)
    c.networks.model.model = teacher_model_config(init="random")
    c.networks.model.optimizer.update(
        {"name": "adamw", "weight_decay": 1e-4, "grad_clip": 1.0, "warmup_steps": 200, "schedule": "cosine"}
    )
    c.method.sampler.steps = 50
    c.method.sampler.guidance_scale = 4.0
