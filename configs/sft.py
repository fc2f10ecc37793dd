"""Supervised denoising / flow-matching training of a model on data (trains teachers, e.g. the digits one).

Reference: the denoising objective of Ho et al. 2020 and flow matching (Lipman et al. 2023); not a
distillation paper's recipe. Samples with CFG convention "uncond" (y_u + w (y_c - y_u)); unconditional input =
the teacher world's (the null label, the empty prompt), learnt through 10% condition dropout. Method notes:
docs/teachers.md, training and fine-tuning teachers.

Presets:
  gmm       the Gaussian-mixture data on SD's VP schedule, eps-prediction MLP, DDIM sampling
  gmm_flow  the same data on a rectified-flow path, velocity-prediction MLP, flow-Euler sampling
  digits    the digits teacher's UNet (eps-prediction, SD's scaled-linear schedule) from diffusers' default
            initialisation, on the rendered digits with their captions (10% dropped to the empty prompt for
            CFG), through the pipeline's trained text encoder and VAE; AdamW 1e-3 with warm-up and cosine
            decay, EMA 0.999, batch 64. tools/build_digits_world.py runs it on the pipeline it writes
            (teacher.path), then exports the EMA UNet as the shipped teacher.
  digits_flux
            the flow digits teacher's FLUX transformer (velocity on the rectified-flow path, flow times
            uniform) from its own initialisation, on the same captioned digits (10% of captions dropped to the
            empty prompt: the teacher samples with true CFG, it has no guidance embedding), through the
            pipeline's CLIP, T5 and 16-channel VAE; AdamW 1e-3 with warm-up and cosine decay, EMA 0.999, batch
            64; sampled as FluxPipeline does, 28 Euler steps at the scheduler's shift, CFG 4.
            tools/build_flux_digits_world.py runs it on the pipeline it writes (teacher.path) and exports
            the EMA transformer as the shipped teacher (jdistill/assets/digits_flux).
  sd15      fine-tune a diffusers UNet teacher on your images (teacher.data: captions and images) from its
  sdxl      own weights: AdamW 1e-5 (wd 1e-2, clip 1, 500 warm-up steps), EMA 0.9999, 10% of prompts
            dropped, batch 256 (sd15) / 64 (sdxl), 10k steps, the real-size levers (bfloat16 compute over
            float32 master weights, frozen text encoders and VAE in bfloat16, the fused attention). Not a
            paper's recipe: a teacher adapted to a domain before distilling it. Its step is one UNet forward
            and backward, the unit benchmarks/RESULTS.md measures the memory levers with (tools/plan.py).
  flux_dev, flux_schnell, flux_lite, sd3_medium, sd35_medium, sd35_large
            the same fine-tune of a flow-matching transformer teacher (velocity MSE on the rectified-flow
            path, flow times uniform; the pipelines' training used logit-normal times), batch 64, sampled with
            the teacher's own CFG (FLUX-dev/lite through the guidance embedding).

  python -m jdistill.main --config configs/sft.py:gmm --workdir runs/sft_gmm
  python -m jdistill.main --config configs/sft.py:digits --workdir runs/digits_teacher \
      --config.teacher.path=runs/digits_init
"""

from jdistill.config_base import FLOW_TEACHERS, base_config, flow_guidance, gmm_teacher
from jdistill.configuration import choose_preset
from jdistill.methods import sft
from jdistill.methods.common import network_config

PRESETS = ("gmm", "gmm_flow", "digits", "digits_flux", "sd15", "sdxl", *FLOW_TEACHERS)


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
    elif preset == "digits_flux":
        digits_flux_sft(c)
    else:
        diffusers_sft(c, preset)
    return c


def diffusers_sft(c, preset: str) -> None:
    from jdistill.config_base import diffusers_run
    from jdistill.models import teacher_model_config

    flow = preset in FLOW_TEACHERS
    diffusers_run(c, preset, batch_size=256 if preset == "sd15" else 64, num_steps=10000)
    c.sample.every = 1000
    c.networks.model = network_config(prediction="velocity" if flow else "eps", lr=1e-5, ema_decay=0.9999)
    c.networks.model.model = teacher_model_config()
    c.networks.model.optimizer.update(
        {"name": "adamw", "weight_decay": 1e-2, "grad_clip": 1.0, "warmup_steps": 500}
    )
    if flow:
        c.method.sampler.guidance_scale = flow_guidance(preset, c.method.sampler.cfg_convention)
    else:
        c.method.sampler.guidance_scale = 7.5 if preset == "sd15" else 5.0


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


def digits_flux_sft(c) -> None:
    from jdistill.teachers.digits_world import digits_flux_teacher_config

    digits_sft(c)  # the digits UNet's run: data, length, batch, cadence, optimizer, EMA
    c.teacher = digits_flux_teacher_config()
    c.num_steps = 3000  # the shipped teacher's build (jdistill/assets/digits_flux/build.json)
    c.networks.model.prediction = "velocity"
    c.method.sampler.steps = 28  # FluxPipeline's default
