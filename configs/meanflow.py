"""MeanFlow: average-velocity students distilled from a teacher's flow.

Reference: Geng et al., MeanFlow (arXiv 2505.13447); the distillation recipe of T2I-Distill's
train_meanflow.py. CFG convention "uncond" (y_u + w (y_c - y_u)) on
the teacher; unconditional input = the null label (gmm), the empty prompt (digits, flow teachers), also used
for 10% condition dropout. Method notes: docs/trajectory.md, MeanFlow and T2I-Distill. Measured runs of the
gmm and digits presets: benchmarks/RESULTS.md, "Preset histories" and "Flow digits world".

Presets:
  gmm  analytic 8-mode Gaussian-mixture teacher on the rectified-flow path, real mixture samples as data;
       the recipe's (r, t) sampler (logit-normal(-0.4, 1), r != t for 75%), teacher velocity as the target,
       JVP along the teacher's velocity, adaptive weighting. The student is an MLP from scratch with a
       second time embedding for t - r and O(1) times; toy-specific: CFG w = 3, no student self-guidance,
       p = 0.5 (the recipe's p = 1 reached a lower within-0.5 here).
  digits  the shipped digits teacher (jdistill/assets/digits, eps on SD's VP schedule) moved onto the
       rectified-flow path by SNR matching, its built-in real images as data; the recipe's (r, t) sampler, CFG
       w = 4 (the teacher's sampling scale) on the teacher, 10% condition dropout, p = 1, no student
       self-guidance. The student is the teacher's UNet read on the flow path like the teacher (u = eps - x0),
       taking t - r through diffusers' time_cond_proj_dim (64; sinusoids of 1000 (t - r) minus those of 0,
       the projection starting at zero, so u starts as the teacher's velocity; T2I-Distill instead copies the
       first time embedder). AdamW (weight decay 1e-4, gradient clip 0.1, T2I-Distill's), lr 1e-4, EMA 0.99,
       batch 32, 800 steps. du/dt by central differences over 0.01 of flow time, not forward mode: the
       teacher learnt integer timesteps only, and its exact time derivative carries 3-8x the smooth one in
       wiggles between them (measured at t = 0.3-0.9); with jax.jvp the same run's target MSE grew instead of
       falling. Not exportable to diffusers (no scheduler takes t - r; --mode sample).
  digits_flux  the shipped flow digits teacher (jdistill/assets/digits_flux: a tiny FLUX transformer with true
       CFG against the empty prompt, no guidance embedding) on its own rectified-flow path, the world's built-in
       real images as data; T2I-Distill's MeanFlow settings where they carry over (the (r, t) sampler
       logit-normal(-0.4, 1) with r != t for 75%, 10% of prompts dropped to the empty one, the data velocity
       eps - x as the JVP's z tangent of unguided samples with the teacher's velocity as the target, adaptive
       weighting p = 1, forward-mode JVP, AdamW weight decay 1e-4, gradient clip 0.1) with the UNet digits
       preset's miniature choices (lr 1e-4, EMA 0.99, batch 32, 800 steps). The student is a float32 velocity
       copy of the teacher's transformer plus a second timestep embedding for t - r starting at zero (so u
       starts as the teacher's velocity), at the teacher's x1000 time scale and without a guidance input (the
       teacher has none): one CFG w = 4 on the teacher. The CFG-MeanFlow mix is off: with (omega, kappa) =
       (1, 0.5) the same run over-guided (worse than the teacher's four steps). Four equal steps (1, 0.75, 0.5,
       0.25), exported to plain FluxPipeline with the t - r embedding folded in (called with those sigmas).
  flux_dev, flux_schnell, sd3_medium, sd35_medium, sd35_large
       on a flow-matching transformer teacher with T2I-Distill's MeanFlow loss settings (see flux_lite): the
       student is the teacher's transformer with a second timestep embedding for t - r (timestep_delta_embeds;
       its last layer starts at zero, so u starts as the teacher's velocity), the data velocity eps - x as the
       JVP's z tangent of unguided samples with the teacher's velocity as the target, self-guidance mix (omega,
       kappa) = (1, 0.5) on the conditioned samples at the paper's u(z, t, t), 10% condition dropout, p = 1,
       forward-mode JVP, AdamW lr 1e-6 (weight decay 1e-4, gradient clip 0.1), batch 256; CFG = the teacher's
       own sampling scale (FLUX-dev through the guidance embedding) at diffusers' time scale; four equal steps
       (1, 0.75, 0.5, 0.25), exported with the t - r embedding folded into a bias (plain pipelines).

  flux_lite  T2I-Distill's MeanFlow on FLUX.1-lite-8B (arXiv 2512.13006; alibaba-damo-academy/T2I-Distill at
       84ed92b, train_meanflow.py and script/train_meanflow.sh with its example command):
       - student FluxTransformer2DModelDualTimestep...X1: temb = time_text_embed(t, w, pooled) +
         timestep_embedder2(sinusoids(t - r)), the second embedder loaded from the first's state dict
         (networks.student.model.timestep_delta_embeds, timestep_delta_init "copy"; the other presets' "zero"
         starts it as the teacher), t, t - r and w x1 (timestep_scale 1);
       - (r, t) the sorted pair of two logit-normal(-0.4, 1.0) draws, r = t for 25% (--time_mu, --time_sigma,
         --ratio_r_not_equal_t 0.75), z_t = (1 - t) x + t eps on real latents (no sigma_d);
       - 10% of prompts replaced by the embedding of " " (--cfg_prob 0.1; here the teacher's unconditional
         input, FLUX's empty prompt);
       - w per sample from {4, 4.5, 5} (--cfg_scale) into the teacher's and the student's guidance embeddings;
       - CFG-MeanFlow on (train_meanflow.sh: CFG_MEANFLOW True, omega 1, kappa 0.5, cfg_min_t 0, cfg_max_t 1):
         on conditioned samples with t in [0, 1], v~ = omega v_teacher + kappa u(z, r, t | c) + (1 - omega -
         kappa) u(z, r, t | empty), with the script's timestep2 = t - r for those student passes (method.mix_delta
         "interval"; the paper's u(z, t, t) is "zero"), v~ both the target's velocity and the JVP's z tangent;
         other samples: target from v_teacher, tangent eps - x (method.tangent "data"); off:
         --config.method.guidance_mix='(1.0, 0.0)';
       - adaptive weighting 1 / (|u - u_tgt|^2 + 1e-3)^p, p = 1 (--weighting adaptive, --adaptive_p), per-sample
         sums of squares;
       - AdamW (0.9, 0.999, eps 1e-8) lr 1e-6 (the sh's example command and README; its fallback 1e-5), weight
         decay 1e-4, constant lr, gradient clip 0.1, no EMA, batch 8 per GPU on 32 GPUs = 256, 512 px, T5 length
         256, forward-mode JVP, bfloat16 compute over float32 master weights;
       - sampling (FluxPipeline_MeanFlow): four steps at sigmas linspace(1, 1/4, 4) through the teacher
         scheduler's dynamic shift at the image's token count (method.student_shift 0: at 512 px (1, 0.849,
         0.653, 0.385)), r = the next time (0 last), guidance 3.5 (README's MeanFlow command and
         geneval_meanflow.sh). Export: FluxPipeline with the student's transformer class written into the export
         (transformer/meanflow_flux.py, our own; DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)),
         called with sigmas = those times (jdistill_export.json has the call).
       Differences: T2I-Distill's teacher is its unpublished x1 "rescaled checkpoint" of FLUX.1-lite; here the
       teacher is FLUX.1-lite as released (x1000) and only the student is x1. The data are the user's
       (teacher.data; the script reads brivangl/midjourney-v6-llava parquet shards); the length is ours.
  python -m jdistill.main --config configs/meanflow.py:gmm --workdir runs/meanflow_gmm
  python -m jdistill.main --config configs/meanflow.py:gmm --workdir runs/meanflow_gmm --mode eval \
      --config.method.student_timesteps='(1.0, 0.5)'              # the same student, two steps
  python -m jdistill.main --config configs/meanflow.py:digits --workdir runs/meanflow_digits
  python -m jdistill.main --config configs/meanflow.py:digits_flux --workdir runs/meanflow_digits_flux \
      --config.export_when_done=true && python tools/evaluate.py --pipeline runs/meanflow_digits_flux/export --count 300
  python -m jdistill.main --config configs/meanflow.py:flux_lite --workdir runs/meanflow_flux_lite \
      --config.teacher.path=flux.1-lite-8B --config.teacher.data=mj_v6/ --config.teacher.prompts=prompts.txt \
      --config.mesh.fsdp=8      # tests/test_t2i_distill.py runs it on a tiny FLUX.1-lite-like pipeline

On a flow teacher (FLUX / SD3, teacher.kind=flow) the digits preset's student is the teacher's transformer with a
second timestep embedding for t - r (jdistill's timestep_delta_embeds, starting at zero; methods/meanflow.py):
  --config.teacher.kind=flow --config.teacher.preset=flux_dev --config.teacher.path=... \
  --config.networks.student.model.time_cond_proj_dim=0 --config.networks.student.model.timestep_delta_embeds=true \
  --config.method.jvp=jvp   (forward mode through the transformer; tests/test_meanflow_flow.py runs two steps)
"""

from jdistill.config_base import (
    FLOW_FOUR_STEPS,
    FLOW_TEACHERS,
    T2I_DISTILL_OPTIMIZER,
    base_config,
    digits_student,
    flow_guidance,
    gmm_student,
    t2i_distill_flux_lite,
    t2i_distill_networks,
)
from jdistill.configuration import choose_preset
from jdistill.methods import meanflow

PRESETS = ("gmm", "digits", "digits_flux", *FLOW_TEACHERS)


def get_config(arg=None):
    preset = choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = meanflow.default_config()
    if preset == "gmm":
        gmm_student(c, "flow", prediction="velocity", ema_decay=0.99, second_time=True)
        c.method.guidance_scale = 3.0
        c.method.adaptive_power = 0.5  # p = 1 scored lower on this toy (benchmarks/RESULTS.md)
    elif preset == "digits":
        # T2I-Distill's optimizer (AdamW, weight decay 1e-4, gradient clip 0.1) at a miniature's lr.
        digits_student(c, ema_decay=0.99, **T2I_DISTILL_OPTIMIZER)
        c.networks.student.model.time_cond_proj_dim = 64  # t - r through the UNet's timestep condition
        # On a flow teacher (teacher.kind=flow, FLUX / SD3): set True and time_cond_proj_dim=0 (t - r through
        # the transformer's second timestep embedding).
        c.networks.student.model.timestep_delta_embeds = False
        c.method.guidance_scale = 4.0  # the teacher's sampling CFG
        # The teacher learnt integer timesteps only: its exact d/dt carries 3-8x the smooth derivative in
        # wiggles between them (and the MSE to the target grew from 17 to 116); central differences over
        # 0.01 of flow time (about 10-20 of the UNet's timesteps) see the smooth derivative.
        c.method.jvp = "finite_difference"
        c.method.jvp_step = 1e-2
    elif preset == "digits_flux":
        digits_flux(c)
    elif preset == "flux_lite":
        t2i_distill(c)
    elif preset in FLOW_TEACHERS:
        t2i_distill_networks(c, preset, num_steps=20000)
        c.networks.student.model.timestep_delta_embeds = True
        m = c.method
        m.guidance_scale = flow_guidance(preset, m.cfg_convention)
        m.guidance_mix = (1.0, 0.5)
        m.tangent = "data"
        m.student_timesteps = FLOW_FOUR_STEPS
    return c


def t2i_distill(c):
    """T2I-Distill's MeanFlow on FLUX.1-lite-8B (train_meanflow.py and script/train_meanflow.sh; see the module
    docstring)."""
    t2i_distill_flux_lite(c, num_steps=20000)  # lr 1e-6, batch 256, AdamW, 512 px, T5 length 256
    model = c.networks.student.model
    model.timestep_delta_embeds = True  # FluxTransformer2DModelDualTimestep: timestep_embedder2 on t - r
    model.timestep_delta_init = "copy"  # loaded from time_text_embed.timestep_embedder's state dict
    model.timestep_scale = 1.0  # ...TimestepX1GuidanceX1: t, t - r and guidance x1
    m = c.method
    # --time_mu, --time_sigma, --ratio_r_not_equal_t
    m.time_mean, m.time_std, m.ratio_r_not_t = -0.4, 1.0, 0.75
    m.cond_dropout = 0.1  # --cfg_prob: prompts replaced by the empty prompt's embedding
    m.adaptive_power, m.adaptive_eps = 1.0, 1e-3  # --weighting adaptive, --adaptive_p
    m.guidance_choices = (4.0, 4.5, 5.0)  # --cfg_scale default, per sample, into both guidance embeddings
    m.guidance_scale = 4.5  # not used in training (guidance_choices); the default of sample_guidance
    m.sample_guidance = 3.5  # README's MeanFlow inference and geneval_meanflow.sh (--guidance_scale 3.5)
    # CFG-MeanFlow: on in train_meanflow.sh (CFG_MEANFLOW=${4:-True}, omega 1, kappa 0.5, t in [0, 1]);
    # off: --config.method.guidance_mix='(1.0, 0.0)'.
    m.guidance_mix = (1.0, 0.5)
    m.mix_delta = "interval"  # the script's student velocities take timestep2 = t - r
    m.mix_window = (0.0, 1.0)
    m.tangent = "data"  # unguided samples: JVP along noise - x, target from the teacher's velocity
    # FluxPipeline_MeanFlow: sigmas linspace(1, 1/4, 4) through FLUX-lite's dynamic shift at the resolution.
    m.student_timesteps = FLOW_FOUR_STEPS
    m.student_shift = 0.0
    return c


def digits_flux(c) -> None:
    """MeanFlow on the flow digits world (see the module docstring): T2I-Distill's MeanFlow settings with the
    UNet digits preset's miniature optimizer, length and batch; four equal steps."""
    digits_student(c, ema_decay=0.99, flow=True, **T2I_DISTILL_OPTIMIZER)
    c.networks.student.model.timestep_delta_embeds = True  # t - r through a second timestep embedding (zero)
    m = c.method
    m.guidance_scale = 4.0  # the teacher's sampling CFG (true CFG: no guidance embedding)
    m.time_mean, m.time_std, m.ratio_r_not_t = -0.4, 1.0, 0.75
    m.cond_dropout = 0.1
    # No CFG-MeanFlow mix: with T2I-Distill's (1, 0.5) the run over-guided (diversity 0.50, Frechet 591, worse
    # than the teacher's four Euler steps); without it 250.
    m.guidance_mix = (1.0, 0.0)
    m.tangent = "data"
    m.student_timesteps = FLOW_FOUR_STEPS
