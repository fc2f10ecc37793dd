"""sCM: continuous-time consistency distillation in TrigFlow.

Reference: Lu & Song, sCM (arXiv 2410.11081); SANA-Sprint (arXiv 2503.09641, NVlabs/Sana
train_scm_ladd.py) and T2I-Distill's train_sCM.py. CFG convention
"uncond" (y_u + w (y_c - y_u)) on the teacher, w per sample from ``guidance_choices``; unconditional input =
the null label (gmm), the empty prompt (digits, SD1.5, flow teachers). Method notes: docs/trajectory.md, sCM
and T2I-Distill, and docs/adversarial.md, LADD. Measured runs of the gmm and digits presets:
benchmarks/RESULTS.md, "Preset histories" and "Flow digits world".

Presets:
  gmm  analytic 8-mode Gaussian-mixture teacher on the TrigFlow path (sigma_d 0.5; the teacher is exact on any
       path), real mixture samples as data; sCM's loss with tangent warm-up, tangent normalisation c = 0.1,
       the learned log-variance weighting and forward-mode JVP. The student is a TrigFlow (F-prediction)
       MLP from scratch with O(1) time input (with its time embedding at 100 t it collapsed); toy-specific:
       CFG w = 3.
  digits  the shipped digits teacher (jdistill/assets/digits, eps on SD's VP schedule) moved onto TrigFlow by
       SNR matching as sd15_ladd does, without the GAN, on its built-in real images: sigma_d 0.5 with the latents
       times sigma_d, P_mean 0.2, P_std 1.6, c = 0.1, the learned log-variance, AdamW with gradient clip 0.1
       (SANA-Sprint's); the student is the teacher's UNet (eps, read on TrigFlow like the teacher). Miniature
       choices: one CFG w = 4 (the teacher's sampling scale) without a guidance embedding, lr 1e-4 for student
       and log-variance head, no lr warm-up, tangent warm-up 200, EMA 0.99, batch 32, 800 steps; dF/dt by
       central differences over 0.01 rad, not forward mode: the teacher learnt integer timesteps only, and its
       exact time derivative carries 3-8x the smooth one in wiggles between them (measured at t = 0.5-1.45).

  digits_flux  the shipped flow digits teacher (jdistill/assets/digits_flux: a tiny FLUX transformer with true
       CFG against the empty prompt, no guidance embedding) read on TrigFlow through the training-free flow ->
       TrigFlow transform, on the world's built-in real images. T2I-Distill's sCM loss settings (sigma_d 0.5
       with the latents times sigma_d, P_mean 0.2, P_std 1.6, c = 0.1, the learned log-variance, forward-mode
       JVP, AdamW weight decay 1e-4, gradient clip 0.1) with the UNet digits preset's miniature choices: lr 1e-4
       for student and log-variance head, tangent warm-up 200, EMA 0.99, batch 32, 800 steps. The student is
       a float32 velocity copy of the teacher's transformer at the teacher's time scale (x1000, not T2I-Distill's
       x1: its x1 teacher is a fine-tuned checkpoint, and a copy at x1 would start away from the teacher) and
       without a guidance input (the teacher has no guidance embedding), so one CFG w = 4, the teacher's
       sampling scale. Forward-mode JVP works here: the teacher learnt continuous flow times.

  sd15_ladd  SANA-Sprint's hybrid (sCM + 0.5 LADD) mapped to an SD1.5 teacher, on real latents of captioned
       images (teacher.data). From SANA-Sprint's released config (configs/sana_sprint_config/1024ms/
       SanaSprint_1600M_1024px_allqknorm_bf16_scm_ladd.yaml) and train_scm_ladd.py: sigma_d 0.5 with the
       latents times sigma_d (its clean_images = z * sigma_data: data_scale 0.5), P_mean 0.2, P_std 1.6, tangent
       warm-up 4000, c = 0.1, the learned log-variance, teacher CFG w per sample from {4, 4.5, 5} given to the
       student (its cfg_embed), adv_lambda 0.5 with scm_lambda 1, hinge loss (D: 0.5 (real + fake), i.e.
       discriminator weight 0.5), t_D from "logit_normal_trigflow" (-0.6, 1.0), train_largest_timestep with
       probability 0.5 at 1.5708, misaligned pairs on, a different t_D per group (diff_timesteps_D), lr 2e-6
       for student and heads, weight decay 0, gradient clip 0.1 for both, constant lr after 5000 warm-up
       steps for the student (its scheduler only steps the generator), batch 16 per GPU, G and D one step
       each. The R1 penalty is off there (r1_penalty's default; its weight when on is 1e-5:
       --config.method.gan.r1_weight=1e-5).
       Assumptions (SANA-Sprint's teacher is a 1.6B linear-attention DiT, not a UNet): heads on the UNet's
       down blocks 0-2 and its mid block (four taps early to late, as SANA's heads on blocks [2, 8, 14, 19]
       of 20), each jdistill's DMD2-style head (strided convolutions, per-location logits) instead of SANA's
       token-wise conv heads; the student is the teacher's UNet plus LCM's guidance embedding
       (time_cond_proj_dim 256, sinusoids of 1000 w) for SANA's cfg_embed; AdamW (0.9, 0.999, eps 1e-8) for
       CAME; 8 GPUs (batch 128) and 10000 steps (the released config gives epochs over its toy data); the
       log-variance head at the student's lr (SANA trains it with the model's optimizer); float32 (SANA: bf16
       with fp32 attention; --config.teacher.dtype=bfloat16 for the frozen networks). The UNet sees its own
       0..999 timesteps through SNR matching; SANA-Sprint first fine-tunes its teacher to a dense O(1) time
       embedding (not done here). One-step sampling at pi/2 (two steps as SANA-Sprint's pipeline:
       --config.method.student_timesteps='(1.5707963, 1.3)'). Not a measured run.

  flux_dev, flux_schnell, sd3_medium, sd35_medium, sd35_large
       on a flow-matching transformer teacher, read on TrigFlow through the training-free transform
       (x^F = x_t / sigma_d N at flow time s = sin t / (sin t + cos t)), with T2I-Distill's optimizer and sCM
       settings (see flux_lite): the student a full copy of the transformer, sigma_d 0.5 with the latents
       times sigma_d, P_mean 0.2, P_std 1.6, tangent warm-up 4000, c = 0.1, the learned log-variance, AdamW
       (0.9, 0.999) lr 1e-6 weight decay 1e-4, gradient clip 0.1, batch 256; one CFG w = the teacher's own
       sampling scale (FLUX-dev through the guidance embedding), the student at the teacher's time scale and
       without a guidance input (these teachers have no T2I-Distill recipe; flux_lite has its settings).

  flux_lite  T2I-Distill's sCM on FLUX.1-lite-8B (arXiv 2512.13006; alibaba-damo-academy/T2I-Distill at
       84ed92b, train_sCM.py and script/train_sCM.sh, its "4m32g" example command):
       - teacher FLUX.1-lite through the training-free FLUX -> TrigFlow transform (FluxTrigFlow.forward),
         sigma_d 0.5 (--sigma_data), latents (z - shift) x scale x sigma_d (train(): model_input);
       - t = arctan(e^tau / 0.5), tau ~ N(0.2, 1.6) (sCMLoss.sample_time_steps; --logit_mean 0.2 --logit_std 1.6
         in the sh), tangent warm-up 4000 (--tangent_warmup_steps), tangent normalisation c = 0.1, the learned
         log-variance in the loss e^-logvar / (sigma_d tan t) |F - F- - g|^2 + logvar;
       - w per sample from {4, 4.5, 5} (--scm_cfg_scale) into the teacher's guidance embedding and the
         student's (transformer_kwargs["guidance"] for both);
       - the student's time and guidance inputs x1 (FluxTransformer2DModelTimestepX1GuidanceX1):
         networks.student.model.timestep_scale = 1 (jdistill's FLUX option); the flow time s enters, as in
         FluxTrigFlow;
       - AdamW (0.9, 0.999, eps 1e-8) lr 1e-6 (the sh's example command and the README; the sh's fallback is
         1e-5), weight decay 1e-4 (--adam_weight_decay), constant lr without warm-up (--lr_scheduler constant),
         gradient clip 0.1 (--max_grad_norm), no EMA; batch 8 per GPU on 32 GPUs = 256; 512 px (--resolution),
         T5 length 256 (--max_sequence_length); forward-mode JVP (torch.func.jvp), bfloat16 compute (DeepSpeed
         bf16) over float32 master weights;
       - sampling: one step at pi/2 with w = 4.5 (README's sCM command, FluxPipeline_sCM's default); two steps
         at (pi/2, 1.3), test_sCM.py's intermediate_timesteps: --config.method.student_timesteps='(1.5707963,
         1.3)'. Exported to plain FluxPipeline: TrigFlow times as the flow times with the same noise-to-data
         ratio (1.3 -> 0.7827), the x1 inputs through the scheduler's num_train_timesteps = 1 and
         guidance_scale = 4.5 / 1000 (jdistill_export.json has the call).
       Differences: T2I-Distill's teacher is its "rescaled checkpoint" of FLUX.1-lite, fine-tuned to x1 inputs
       and not published (T2I-Distill issue #3); here the teacher is FLUX.1-lite as released (x1000 inputs) and
       only the student's embeddings are x1, so the student starts away from the teacher at the same weights.
       Its log-variance head is a linear on the student's whole conditioning embedding (time, w and pooled
       text), jdistill's a small head on t alone (networks.logvar, AdamW at the student's lr, weight decay and
       clip); T2I-Distill clips the student and the head together, jdistill per network. The data are the
       user's (teacher.data: T2I-Distill reads three parquet shards of brivangl/midjourney-v6-llava); the
       length is ours (its max_train_steps is 10M with a checkpoint every 1000).
  python -m jdistill.main --config configs/scm.py:gmm --workdir runs/scm_gmm
  python -m jdistill.main --config configs/scm.py:gmm --workdir runs/scm_gmm --mode eval \
      --config.method.student_timesteps='(1.5707963, 1.1)'        # the same student, two steps
  python -m jdistill.main --config configs/scm.py:digits --workdir runs/scm_digits
  python -m jdistill.main --config configs/scm.py:digits_flux --workdir runs/scm_digits_flux \
      --config.export_when_done=true && python tools/evaluate.py --pipeline runs/scm_digits_flux/export --count 300
  python -m jdistill.main --config configs/scm.py:sd15_ladd --workdir runs/scm_sd15_ladd \
      --config.teacher.data=images/metadata.jsonl --config.teacher.prompts=prompts.txt   # prompts: samples only
  python -m jdistill.main --config configs/scm.py:flux_lite --workdir runs/scm_flux_lite \
      --config.teacher.path=flux.1-lite-8B --config.teacher.data=mj_v6/ --config.teacher.prompts=prompts.txt \
      --config.mesh.fsdp=8      # tests/test_t2i_distill.py runs it on a tiny FLUX.1-lite-like pipeline
"""

import math

from jdistill.config_base import (
    FLOW_TEACHERS,
    T2I_DISTILL_OPTIMIZER,
    base_config,
    digits_student,
    flow_guidance,
    gmm_student,
    t2i_distill_flux_lite,
    t2i_distill_networks,
    unet_distillation,
)
from jdistill.configuration import choose_preset
from jdistill.methods import scm
from jdistill.methods.adversarial import discriminator_config

PRESETS = ("gmm", "digits", "digits_flux", "sd15_ladd", *FLOW_TEACHERS)


def get_config(arg=None):
    preset = choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = scm.default_config()
    if preset == "gmm":
        gmm_student(c, "trigflow", prediction="velocity", ema_decay=0.99, time_scale=1.0)
        c.method.guidance_choices = (3.0,)
        c.method.sample_guidance = 3.0
        c.method.tangent_warmup_steps = 1000
        c.networks.logvar = scm.logvar_config(lr=1e-2)
        return c
    if preset == "digits":
        digits_student(c, ema_decay=0.99, optimizer="adamw", grad_clip=0.1)
        c.networks.logvar = scm.logvar_config(lr=c.networks.student.optimizer.lr)
        m = c.method
        m.data_scale = m.sigma_data  # SANA-Sprint / T2I-Distill: TrigFlow data = latents x sigma_d
        m.guidance_choices = (4.0,)  # the teacher's sampling CFG
        m.sample_guidance = 4.0
        m.tangent_warmup_steps = 200
        # The teacher learnt integer timesteps only: its exact d/dt carries 3-8x the smooth derivative in
        # wiggles between them (SANA-Sprint first fine-tunes a dense time embedding); central differences
        # over 0.01 rad see the smooth one.
        m.jvp = "finite_difference"
        m.jvp_step = 1e-2
        return c
    if preset == "digits_flux":
        return digits_flux(c)
    if preset == "flux_lite":
        return t2i_distill(c)
    if preset in FLOW_TEACHERS:
        t2i_distill_networks(c, preset, num_steps=10000)
        c.networks.logvar = scm.logvar_config(lr=c.networks.student.optimizer.lr)
        m = c.method
        m.data_scale = m.sigma_data
        m.guidance_choices = (flow_guidance(preset, m.cfg_convention),)
        m.sample_guidance = m.guidance_choices[0]
        m.tangent_warmup_steps = 4000
        return c

    lr = 2e-6
    unet_distillation(
        c,
        "sd15",
        student_lr=lr,
        fake_lr=None,
        batch_size=128,
        num_steps=10000,
        optimizer="adamw",
        grad_clip=0.1,
        warmup_steps=5000,
    )
    c.networks.student.model.time_cond_proj_dim = 256
    c.networks.logvar = scm.logvar_config(lr=lr)
    c.networks.discriminator = discriminator_config(lr=lr)
    c.networks.discriminator.optimizer.update({"name": "adamw", "grad_clip": 0.1})
    m = c.method
    m.data_scale = m.sigma_data
    m.guidance_embed = True
    m.gan.update({"generator_weight": 0.5, "discriminator_weight": 0.5, "feature_layers": (0, 1, 2, -1)})
    c.log_every = 50
    c.checkpoint.every = 500
    c.sample.every = 500
    return c


def t2i_distill(c):
    """T2I-Distill's sCM on FLUX.1-lite-8B (train_sCM.py and script/train_sCM.sh; see the module docstring)."""
    # lr 1e-6, batch 256 (the "4m32g" run), AdamW, 512 px, T5 length 256
    t2i_distill_flux_lite(c, num_steps=10000)
    # x1 timestep and guidance inputs (FluxTransformer2DModelTimestepX1GuidanceX1), jdistill's timestep_scale.
    c.networks.student.model.timestep_scale = 1.0
    # logvar_linear belongs to the student module: the same AdamW, weight decay and clip.
    c.networks.logvar = scm.logvar_config(lr=c.networks.student.optimizer.lr)
    c.networks.logvar.optimizer.update({"name": "adamw", "weight_decay": 1e-4, "grad_clip": 0.1})
    m = c.method
    m.data_scale = m.sigma_data  # model_input = (z - shift) * scale * sigma_data
    m.guidance_choices = (4.0, 4.5, 5.0)  # --scm_cfg_scale default, per sample
    m.guidance_embed = True  # the student's guidance embedding gets the teacher's w
    m.sample_guidance = 4.5  # README's sCM inference (--guidance_scale 4.5), FluxPipeline_sCM's default
    m.tangent_warmup_steps = 4000  # --tangent_warmup_steps default
    m.student_timesteps = (math.pi / 2,)  # one step; two: (pi/2, 1.3), test_sCM.py's intermediate_timesteps
    return c


def digits_flux(c):
    """sCM on the flow digits world (see the module docstring): T2I-Distill's sCM loss settings with the
    UNet digits preset's miniature optimizer, length and batch."""
    digits_student(c, ema_decay=0.99, flow=True, **T2I_DISTILL_OPTIMIZER)
    c.networks.logvar = scm.logvar_config(lr=c.networks.student.optimizer.lr)
    m = c.method
    m.data_scale = m.sigma_data  # T2I-Distill: TrigFlow data = latents x sigma_d
    # The teacher has no guidance embedding (true CFG, as schnell): one w, the teacher's sampling scale.
    m.guidance_choices = (4.0,)
    m.sample_guidance = 4.0
    m.tangent_warmup_steps = 200
    m.student_timesteps = (math.pi / 2,)  # two steps: (pi/2, 1.3)
    return c
