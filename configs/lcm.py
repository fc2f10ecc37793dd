"""LCM (latent consistency distillation) and LCM-LoRA.

Reference: Luo et al., Latent Consistency Models (arXiv 2310.04378) and LCM-LoRA (arXiv 2311.05556); the
training scripts of luosiallen/latent-consistency-model (= diffusers' examples/consistency_distillation
train_lcm_distill{,_lora}_{sd,sdxl}_wds.py).
CFG convention "cond" (y_c + w (y_c - y_u), LCM's own: w here is the standard guidance scale minus 1);
unconditional input = the null label (gmm), the empty prompt (SD1.5, digits, flow teachers) or zero embeddings
(SDXL, as the SDXL scripts). Method notes: docs/trajectory.md, LCM. Measured runs of the digits and gmm
presets: benchmarks/RESULTS.md, "Preset histories".

Presets:
  gmm        analytic 8-mode Gaussian-mixture teacher on SD's VP schedule, real mixture samples as data; the
             scripts' skipping-step DDIM grid (50 of 1000), boundary scalings (sigma_d 0.5, x10), pseudo-Huber
             c = 1e-3 and EMA target 0.95. The student is an x0-prediction MLP from scratch with a guidance
             embedding (time_cond_proj_dim 32); toy-specific: w ~ U[1, 3] (LCM: [5, 15] for SD), sampled at w = 2.
  gmm_flow   the same on the rectified-flow gmm teacher (LCM's flow variant, see jdistill/methods/lcm.py): the grid
             is 50 points j / 50 of flow time (the teacher's shift is 1), the solver one Euler step of the guided
             teacher velocity, f = the student's x0 (f(x, 0) = x), sampled at flow times (1.0,).
  digits     the shipped digits teacher (jdistill/assets/digits) on its built-in real images: a full student
             (the teacher's UNet plus the guidance embedding, time_cond_proj_dim 64), the scripts' loss, grid,
             boundary scalings, pseudo-Huber c and EMA target 0.95; AdamW (weight decay 0), gradient clip 1, constant
             lr 1e-4 (miniature), batch 32, 800 steps; w ~ U[2, 4] in convention "cond" (standard scales 3-5 around
             the teacher's CFG 4), sampled at w = 3 (= the teacher's 4) on LCMScheduler's 4 steps; exported.
  sd15       LCM on SD1.5 (train_lcm_distill_sd_wds.py): a full student with the teacher's UNet plus the
             guidance embedding (time_cond_proj_dim 256, the new projection random, every other weight from the
             teacher), eps-prediction, EMA target 0.95, real latents of captioned images (teacher.data).
             Script defaults: w ~ U[5, 15] (convention "cond"), 50 DDIM timesteps, timestep scaling 10,
             pseudo-Huber c 1e-3 (the README picks --loss_type=huber; the script's default is L2), AdamW
             (0.9, 0.999, eps 1e-8), gradient clip 1, constant lr (the 500 warm-up steps of the defaults are
             ignored by diffusers' "constant" schedule). README example: lr 1e-6, weight decay 0 (default 1e-2),
             batch 12 per GPU, 1000 steps, 512 px, checkpoints every 200 steps. Not a paper run: the README
             states no GPU count; batch 96 = 12 x 8 GPUs is our assumption (SIM's table: 8 A100s), and the README
             trains in fp16 with 8-bit Adam (here float32 Adam; --config.teacher.dtype=bfloat16 for the
             frozen networks). The paper's runs (LAION-Aesthetics, ~4k iterations at 768 px) are not reproduced.
             Sampling: 4 steps at LCMScheduler's default timesteps (999, 759, 499, 259) with w = 7.5 (diffusers'
             pipeline default guidance_scale 8.5); exported with LCMScheduler and guidance_scale = w + 1.
             Latents are the VAE posterior mean (the scripts sample the posterior).
  sdxl       the same on SDXL (train_lcm_distill_sdxl_wds.py, README example: 1024 px with
             --use_fix_crop_and_size, i.e. the fixed micro-conditioning (1024, 1024, 0, 0, 1024, 1024) jdistill
             uses, and the fp16-fix VAE, not needed in float32); zero unconditional embeddings as the script.
  sd15_lora  LCM-LoRA on SD1.5 (train_lcm_distill_lora_sd_wds.py): a LoRA student of rank 64 (alpha 64, the
             script's defaults), no guidance embedding, the target is the online student under stop-gradient,
             no EMA; README example: lr 1e-4, weight decay 0, batch 12 per GPU (96 here, as sd15), 1000 steps.
             Targets: the script's linear targets that jdistill's LoRA supports: to_q, to_k, to_v, to_out.0,
             ff.net.0.proj, ff.net.2 and time_emb_proj (SD1.5's proj_in/proj_out are 1x1 convolutions, and the
             script's conv1, conv2, conv_shortcut and down/upsampler convolutions are not supported: not the
             script's adapter). Guidance: the released script samples w ~ U[5, 15]; the author states that
             LCM-LoRA distilled a fixed "cfg scale 7.5" (luosiallen/latent-consistency-model#40), read here as the
             standard scale 7.5 = w 6.5 in convention "cond" (set method.guidance_range='(7.5, 7.5)' for the
             other reading, or '(5., 15.)' for the script). Exported as the teacher plus
             pytorch_lora_weights.safetensors, sampled without CFG (guidance_scale 1).
  sdxl_lora  the same on SDXL (train_lcm_distill_lora_sdxl_wds.py), whose linear proj_in/proj_out are targets too.
  flux_dev, flux_schnell, flux_lite, sd3_medium, sd35_medium, sd35_large
             LCM's flow variant (jdistill/methods/lcm.py) on a flow-matching transformer teacher with the sd15
             preset's script settings (a full copy of the transformer, velocity-predicting, EMA target 0.95, AdamW
             lr 1e-6, weight decay 0, gradient clip 1, batch 96, 1000 steps, 50-point grid, pseudo-Huber 1e-3) and
             the real-size levers; the grid follows the teacher pipeline's shift (SD3 3, FLUX-schnell 1,
             FLUX-dev/lite's dynamic one at the resolution: exp(mu) = 3.16 at 1024 px). Guidance: one w, the teacher's own sampling CFG in
             convention "cond" (FLUX-dev/lite 2.5 = guidance 3.5, SD3.5-medium 3.5, FLUX-schnell 0: none), which
             FLUX-dev/lite students also take through their own guidance embedder (a range:
             --config.method.guidance_range='(2., 4.)'); SD3 and schnell transformers have none, so the w is
             distilled in (guidance_embed False, as LCM-LoRA). Four steps at flow times (1, 0.75, 0.5, 0.25)
             re-noised in between (FlowMatchEulerDiscreteScheduler with stochastic_sampling). Not a measured run:
             LCM was published on UNets; its flow variant here is jdistill's.

  python -m jdistill.main --config configs/lcm.py:gmm --workdir runs/lcm_gmm
  python -m jdistill.main --config configs/lcm.py:digits --workdir runs/lcm_digits
  python -m jdistill.main --config configs/lcm.py:gmm --workdir runs/lcm_gmm --mode eval \\
      --config.method.student_timesteps='(999., 499.)'            # the same student, two steps
  python -m jdistill.main --config configs/lcm.py:sd15 --workdir runs/lcm_sd15 \\
      --config.teacher.data=images/metadata.jsonl --config.teacher.prompts=prompts.txt   # prompts: samples only
  python tools/export_diffusers.py --workdir runs/lcm_sd15 --dst runs/lcm_sd15/export
  python -m jdistill.main --config configs/lcm.py:flux_dev --workdir runs/lcm_flux_dev \\
      --config.teacher.path=FLUX.1-dev --config.teacher.data=images/metadata.jsonl \\
      --config.teacher.prompts=prompts.txt
"""

from jdistill.config_base import (
    FLOW_FOUR_STEPS,
    FLOW_TEACHERS,
    base_config,
    digits_student,
    flow_guidance,
    gmm_student,
    unet_distillation,
)
from jdistill.configuration import choose_preset
from jdistill.methods import lcm
from jdistill.teachers.presets import FlowTeacherPreset, get_preset

PRESETS = ("gmm", "gmm_flow", "digits", "sd15", "sdxl", "sd15_lora", "sdxl_lora", *FLOW_TEACHERS)
# diffusers' LCMScheduler with its defaults (50 original steps) at 4 inference steps; all on LCM's DDIM grid.
FOUR_STEPS = (999.0, 759.0, 499.0, 259.0)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "time_emb_proj")
LINEAR_PROJECTIONS = ("proj_in", "proj_out")  # linear in SDXL (use_linear_projection), 1x1 convs in SD1.5


def get_config(arg=None):
    preset = choose_preset(arg, PRESETS, default="gmm")
    c = base_config()
    c.method = lcm.default_config()
    if preset in ("gmm", "gmm_flow"):
        flow = preset == "gmm_flow"
        gmm_student(c, "flow" if flow else "vp", prediction="x0", ema_decay=0.95, time_cond_proj_dim=32)
        if flow:
            c.method.student_timesteps = (1.0,)
        c.method.guidance_range = (1.0, 3.0)
        c.method.sample_guidance = 2.0
        return c
    if preset == "digits":
        digits_student(c, ema_decay=0.95, optimizer="adamw", grad_clip=1.0)
        c.networks.student.model.time_cond_proj_dim = 64
        c.method.student_timesteps = FOUR_STEPS
        c.method.guidance_range = (2.0, 4.0)  # convention "cond": standard scales 3-5 around the teacher's 4
        c.method.sample_guidance = 3.0  # the teacher's CFG 4
        c.export_when_done = True
        return c
    flow = preset in FLOW_TEACHERS
    teacher = preset if flow else "sdxl" if preset.startswith("sdxl") else "sd15"
    lora = preset.endswith("_lora")
    targets = LORA_TARGETS + (LINEAR_PROJECTIONS if teacher == "sdxl" else ())
    unet_distillation(
        c,
        teacher,
        student_lr=1e-4 if lora else 1e-6,
        fake_lr=None,
        batch_size=96,
        num_steps=1000,
        optimizer="adamw",
        weight_decay=0.0,
        grad_clip=1.0,
        student_ema=0.0 if lora else 0.95,
        student_lora=(64, 64.0, targets) if lora else None,
    )
    c.log_every = 50
    c.checkpoint.every = 200
    c.sample.every = 200
    if flow:
        w = flow_guidance(preset, c.method.cfg_convention)
        c.method.guidance_range = (w, w)
        c.method.sample_guidance = w
        # A guidance-distilled FLUX student (dev, lite) takes w through its own guidance embedder.
        transformer = get_preset(preset, FlowTeacherPreset).component_config("transformer")
        c.method.guidance_embed = bool(transformer.get("guidance_embeds"))
        c.method.student_timesteps = FLOW_FOUR_STEPS
        return c
    c.method.student_timesteps = FOUR_STEPS
    if lora:
        c.method.guidance_embed = False
        c.method.target_network = "online"
        c.method.guidance_range = (6.5, 6.5)  # standard CFG 7.5
    else:
        c.networks.student.model.time_cond_proj_dim = 256
    return c
