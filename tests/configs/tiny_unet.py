"""A swiftbrush run on a tiny diffusers pipeline made by tests/tiny_pipeline.py (tests only).

Presets: "sd" (SD1.5-like, eps) and "sdxl" (two encoders, text_time). Tests set teacher.path and
teacher.prompts to the pipeline directory and prompt file they wrote.
"""

from jdistill.config_base import base_config
from jdistill.configuration import choose_preset
from jdistill.methods import swiftbrush
from jdistill.methods.common import network_config
from jdistill.models import teacher_model_config
from jdistill.teachers.diffusers_world import diffusers_teacher_config


def get_config(arg=None):
    preset = choose_preset(arg, ("sd", "sdxl"), default="sd")
    c = base_config()
    c.teacher = diffusers_teacher_config("sd15" if preset == "sd" else "sdxl")
    c.teacher.resolution = 32
    c.method = swiftbrush.default_config()
    c.method.fake_score_init = "network"
    c.method.guidance_scale = 2.0
    for name, lr in (("student", 1e-5), ("fake_score", 1e-4)):
        net = network_config(prediction="eps", lr=lr)
        net.model = teacher_model_config()
        c.networks[name] = net
    c.num_steps = 4
    c.batch_size = 8
    c.log_every = 2
    c.progress_bar = False
    c.checkpoint.every = 2
    c.sample.count = 8
    c.sample.final_count = 8
    c.sample.batch = 8
    c.sample.every = 0
    return c
