"""The settings every recipe shares; recipe files in configs/ start from ``base_config()``."""

from __future__ import annotations

import ml_collections


def gmm_teacher(schedule: str = "vp") -> ml_collections.ConfigDict:
    """The analytic Gaussian-mixture teacher on a VP (Stable Diffusion betas) or rectified-flow path."""
    return ml_collections.ConfigDict(
        {
            "kind": "gmm",
            "schedule": schedule_config(schedule),
            "gmm": {"num_modes": 8, "radius": 2.0, "std": 0.1, "num_classes": 2},
        }
    )


def schedule_config(kind: str = "vp") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "kind": kind,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "num_train_timesteps": 1000,
            "shift": 1.0,
            "sigma_data": 0.5,
        }
    )


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 1000
    c.batch_size = 256  # global, over all devices and processes
    # Gradient accumulation: each update's gradient is the mean over this many micro-batches of the batch,
    # run one after another (activations of one micro-batch at a time), then one optimizer update. The
    # same global batch on fewer chips; batch_size must divide by micro_batches x the batch devices.
    c.micro_batches = 1
    # Run each update of a step (e.g. DMD2's generator and fake-score updates) as its own compiled program:
    # smaller programs to compile (an XLA compile's host memory and time grow with the program) and only
    # one update's temporaries alive at a time; the same results up to rounding.
    c.split_updates = False
    c.log_every = 100
    c.progress_bar = True
    c.max_nonfinite_streak = 20  # consecutive skipped (non-finite) updates before the run stops
    c.export_when_done = False  # after training, export the student to DIR/export (as --mode export does)

    c.teacher = gmm_teacher()
    c.method = ml_collections.ConfigDict()  # set by the recipe: name + the method's own settings
    c.networks = ml_collections.ConfigDict()  # one section per trained network

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "num_devices": -1})
    c.sharding = ml_collections.ConfigDict(
        {
            # logical axis name -> mesh axis (or None: replicate). A mesh axis splits at most one dimension of
            # a parameter, the first whose rule names it and which it divides: a convolution kernel is split
            # along its input channels, or its output channels where fsdp does not divide the input's.
            "rules": (
                ("embed", None),
                ("mlp", "fsdp"),
                ("heads", "fsdp"),
                ("vocab", "fsdp"),
                ("conv_in", "fsdp"),
                ("conv_out", "fsdp"),
                ("lora", "fsdp"),
            ),
            "unannotated": "replicate",  # or "fsdp": shard the largest divisible dim of big unannotated params
            # Under fsdp > 1 a parameter over this size that no rule splits is an error naming it...
            "max_replicated_mib": 1.0,
            "allow_replicated": (),  # ...unless "<network>/<path>" matches one of these patterns (fnmatch)
        }
    )
    c.distributed = ml_collections.ConfigDict(
        {
            "auto": True,
            "coordinator_address": "",
            "num_processes": 0,
            "process_id": -1,
            "initialization_timeout": 300,
        }
    )
    # The input pipeline (jdistill/data/pipeline.py): `workers` threads read, decode and tokenize up to
    # `prefetch` batches ahead of the step (0 workers: in the loop's thread, nothing ahead), and
    # `device_prefetch` batches are put on the devices ahead of the one in use.
    c.data = ml_collections.ConfigDict({"workers": 4, "prefetch": 4, "device_prefetch": 2})
    c.checkpoint = ml_collections.ConfigDict({"every": 1000, "keep": 3, "async_save": True})
    c.sample = ml_collections.ConfigDict(
        {"every": 0, "count": 1024, "final_count": 4096, "batch": 1024, "use_ema": True, "seed": 1234}
    )
    # Evaluation during training: every `every` steps (0: only at the end) `count` samples (0: sample.final_count)
    # of the world's evaluation prompts, scored by the world's metrics and, for worlds that decode images, FID
    # against `fid_reference` (statistics from tools/fid_stats.py, with pytorch-fid's Inception weights
    # `fid_inception`) and the CLIP score with `clip_model` (a transformers CLIP directory).
    c.eval = ml_collections.ConfigDict(
        {"every": 0, "count": 0, "fid_inception": "", "fid_reference": "", "clip_model": ""}
    )
    # Metric sinks besides metrics.jsonl: TensorBoard event files in <workdir>/tensorboard, optionally W&B.
    c.logging = ml_collections.ConfigDict({"tensorboard": True, "wandb": False, "wandb_project": "jdistill"})
    # A JAX profiler trace (<workdir>/profile, for TensorBoard's or Perfetto's viewer) of `steps` steps, taken
    # after `warmup` steps of this run (compilation and the first dispatches stay out of it); 0: no trace.
    c.profile = ml_collections.ConfigDict({"steps": 0, "warmup": 3})
    return c


WIDE = (128, 256)  # MLP (width, hidden)
NARROW = (64, 128)  # half the width: about 1.7x faster steps on a 2-core CPU


def gmm_run(c: ml_collections.ConfigDict, schedule: str = "vp", *, num_steps: int) -> None:
    """The Gaussian-mixture presets' run: the analytic teacher on ``schedule``'s path, ``num_steps`` steps of
    256, and their logging, checkpoint and sample cadence."""
    c.teacher = gmm_teacher(schedule)
    c.num_steps = num_steps
    c.batch_size = 256
    c.log_every = 200
    c.checkpoint.every = 2000
    c.sample.every = 2000


def gmm_mlp(prediction: str, *, lr: float, ema_decay: float = 0.0, **model) -> ml_collections.ConfigDict:
    """A Gaussian-mixture preset's network: an MLP from scratch (``model``: its Fourier features, width, ...)
    with a cosine lr schedule."""
    from jdistill.methods.common import network_config

    net = network_config(prediction=prediction, lr=lr, ema_decay=ema_decay, **model)
    net.optimizer.schedule = "cosine"
    return net


def gmm_distillation(
    c: ml_collections.ConfigDict,
    *,
    student_lr: float = 3e-4,
    fake_lr: float = 2e-3,
    student_size: tuple[int, int] = WIDE,
    fake_size: tuple[int, int] = WIDE,
) -> None:
    """The Gaussian-mixture setting the distribution-matching presets share (measured on swiftbrush:
    benchmarks/RESULTS.md, "Preset histories"): the VP teacher, 8000 steps of 256, a one-step x0 MLP student
    with Fourier features, EMA and a cosine schedule, and a v-prediction MLP fake score trained from scratch;
    each MLP (width, hidden) as given (3 residual blocks)."""
    gmm_run(c, "vp", num_steps=8000)
    c.networks.student = gmm_mlp(
        "x0",
        lr=student_lr,
        ema_decay=0.99,
        fourier_features=2,
        width=student_size[0],
        hidden=student_size[1],
    )
    c.networks.fake_score = gmm_mlp(
        "v", lr=fake_lr, fourier_features=4, width=fake_size[0], hidden=fake_size[1]
    )
    c.method.fake_target = "v"


def gmm_student(
    c: ml_collections.ConfigDict, schedule: str, *, prediction: str, ema_decay: float, **model
) -> None:
    """The Gaussian-mixture setting the trajectory presets share (LCM, sCM, MeanFlow; docs/trajectory.md): the
    teacher on ``schedule``'s path, 4000 steps of 256, a student alone: an MLP from scratch (lr 1e-3, 2
    Fourier features, ``model``'s extra inputs) with EMA and a cosine schedule."""
    gmm_run(c, schedule, num_steps=4000)
    c.networks.student = gmm_mlp(prediction, lr=1e-3, ema_decay=ema_decay, fourier_features=2, **model)


def real_size_levers(c: ml_collections.ConfigDict, dtype: str = "bfloat16") -> None:
    """The memory levers of the real-size presets: frozen networks stored and run in ``dtype``, trained copies
    of the teacher computing in it over float32 master weights, the fused attention of the platform (splash
    on TPU, cuDNN on GPU, XLA on CPU), and one compiled program per update (an SD1.5 DMD2 full step as one
    program does not compile in 24 GB of host memory; per update it does). Measured in
    benchmarks/RESULTS.md with tools/plan.py."""
    c.teacher.dtype = dtype
    c.teacher.param_dtype = dtype
    c.teacher.attention_impl = "auto"
    c.split_updates = True


# The flow-matching transformer teachers (teacher.kind = "flow"); every distillation recipe has a preset of each
# name, e.g. configs/dmd2.py:flux_lite.
FLOW_TEACHERS = ("flux_dev", "flux_schnell", "flux_lite", "sd3_medium", "sd35_medium", "sd35_large")
# The CFG each flow teacher's model card samples with (convention "uncond": y_u + w (y_c - y_u)); FLUX-dev and
# lite take it through their guidance embedding, schnell takes none (1: the conditional prediction alone).
FLOW_GUIDANCE = {
    "flux_dev": 3.5,
    "flux_lite": 3.5,
    "flux_schnell": 1.0,
    "sd3_medium": 7.0,
    "sd35_medium": 4.5,
    "sd35_large": 3.5,
}
# Few-step students on the flow path start at t = 1 (pure noise) and step uniformly: SiD-DiT's t_i = 1 - i / K.
FLOW_FOUR_STEPS = (1.0, 0.75, 0.5, 0.25)


def flow_guidance(preset: str, convention: str = "uncond") -> float:
    """The flow teacher's own sampling CFG in a recipe's ``convention`` ("cond": y_c + w (y_c - y_u) = the
    "uncond" scale minus 1)."""
    w = FLOW_GUIDANCE[preset]
    return w - 1.0 if convention == "cond" else w


def diffusers_run(
    c: ml_collections.ConfigDict, preset: str, *, batch_size: int, num_steps: int, dtype: str = "bfloat16"
) -> None:
    """A run on the diffusers teacher ``preset`` (a UNet, or a flow transformer of ``FLOW_TEACHERS``): its
    teacher section, the real-size levers (not for the miniature digits teacher), the length and batch, and the
    logging, checkpoint and sample cadence."""
    from jdistill.teachers.diffusers_world import diffusers_teacher_config
    from jdistill.teachers.flow_world import flow_teacher_config

    c.teacher = flow_teacher_config(preset) if preset in FLOW_TEACHERS else diffusers_teacher_config(preset)
    if preset != "digits":
        real_size_levers(c, dtype)
    c.num_steps = num_steps
    c.batch_size = batch_size
    c.log_every = 100
    c.checkpoint.every = 1000
    c.sample.count = 64
    c.sample.final_count = 64
    c.sample.batch = 16


def unet_distillation(
    c: ml_collections.ConfigDict,
    preset: str,
    *,
    student_lr: float,
    fake_lr: float | None,
    batch_size: int,
    num_steps: int,
    optimizer: str = "adam",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_clip: float = 0.0,
    warmup_steps: int = 0,
    student_ema: float = 0.0,
    fake_lora: tuple[int, float, tuple[str, ...]] | None = None,
    student_lora: tuple[int, float, tuple[str, ...]] | None = None,
    dtype: str = "bfloat16",
) -> None:
    """The student and fake score as the teacher's UNet or flow transformer (float32 master copies of the
    teacher, or LoRAs (rank, alpha, targets) on it; a UNet's copies predict eps, a transformer's the flow
    velocity, as the teacher), one optimizer setting for both, and the diffusers teacher ``preset``.
    ``fake_lr`` None: no fake score (a student alone, e.g. LCM).

    The teacher's weights come from ``teacher.path`` (a local pipeline or converted directory; empty: the
    preset's hub id) and the training prompts from ``teacher.prompts``; both are set on the command line.
    """
    from jdistill.methods.common import lora_config, network_config
    from jdistill.models import teacher_model_config

    diffusers_run(c, preset, batch_size=batch_size, num_steps=num_steps, dtype=dtype)
    nets = [("student", student_lr, student_lora)]
    if fake_lr is not None:
        nets.append(("fake_score", fake_lr, fake_lora))
    for name, lr, lora in nets:
        prediction = "velocity" if preset in FLOW_TEACHERS else "eps"
        net = network_config(
            prediction=prediction, lr=lr, ema_decay=student_ema if name == "student" else 0.0
        )
        net.model = teacher_model_config()
        net.optimizer.update(
            {
                "name": optimizer,
                "b1": betas[0],
                "b2": betas[1],
                "eps": eps,
                "weight_decay": weight_decay,
                "grad_clip": grad_clip,
                "warmup_steps": warmup_steps,
            }
        )
        if lora is not None:
            net.lora = lora_config(*lora)
        c.networks[name] = net


# DMD2's optimizer (official scripts; docs/distribution_matching.md, DMD2): AdamW (0.9, 0.999), weight decay
# 0.01, gradient clip 10.
DMD2_OPTIMIZER = {"optimizer": "adamw", "weight_decay": 0.01, "grad_clip": 10.0}


def dmd2_networks(
    c: ml_collections.ConfigDict, preset: str, *, lr: float, batch_size: int, num_steps: int, **kwargs
) -> None:
    """DMD2's networks and optimizer (official scripts; docs/distribution_matching.md, DMD2): AdamW (0.9,
    0.999), weight decay 0.01, the same lr for generator and fake score, constant after 500 warm-up steps,
    gradient clip 10, no EMA."""
    unet_distillation(
        c,
        preset,
        student_lr=lr,
        fake_lr=lr,
        batch_size=batch_size,
        num_steps=num_steps,
        warmup_steps=500,
        **DMD2_OPTIMIZER,
        **kwargs,
    )


def sid_networks(
    c: ml_collections.ConfigDict, preset: str, *, batch_size: int, num_steps: int, lr: float = 1e-6
) -> None:
    """SiD-LSG's networks and optimizer (run_sid.sh; docs/distribution_matching.md, SiD-LSG): full UNets from
    the teacher, Adam (0, 0.999), eps 1e-8, the same lr for both, float32; the student's EMA half-life of 0.05
    Mimg as a per-step decay 0.5 ** (batch / 50000)."""
    unet_distillation(
        c,
        preset,
        student_lr=lr,
        fake_lr=lr,
        batch_size=batch_size,
        num_steps=num_steps,
        betas=(0.0, 0.999),
        student_ema=0.5 ** (batch_size / 50000),
        dtype="float32",
    )


def digits_distillation(
    c: ml_collections.ConfigDict,
    *,
    student_lr: float,
    fake_lr: float | None,
    num_steps: int,
    batch_size: int = 32,
    flow: bool = False,
    **kwargs,
) -> None:
    """The miniature digits world (the shipped teacher, ``teacher.kind = "digits"``): student and fake score as
    full copies of the teacher's small UNet (``unet_distillation``'s networks, ``kwargs`` passed on), sized
    to finish on a 2-core CPU in minutes; final samples: 10 per (digit, colour) pair, scored by the
    classifier (digit / colour accuracy, Frechet distance, diversity). ``flow``: the flow digits world
    instead (the shipped tiny FLUX teacher, ``teacher.kind = "flow"``), student and fake score float32
    velocity copies of its transformer."""
    from jdistill.teachers.digits_world import digits_flux_teacher_config, digits_teacher_config

    unet_distillation(
        c,
        "digits",
        student_lr=student_lr,
        fake_lr=fake_lr,
        batch_size=batch_size,
        num_steps=num_steps,
        **kwargs,
    )
    c.teacher = digits_flux_teacher_config() if flow else digits_teacher_config()
    if flow:
        for name in ("student", "fake_score"):
            if name in c.networks:
                c.networks[name].prediction = "velocity"  # copies of the teacher's velocity transformer
    c.log_every = 50
    c.checkpoint.every = max(num_steps // 2, 1)
    c.sample.every = 0
    c.sample.count = 64
    c.sample.final_count = 600
    c.sample.batch = 200


def digits_student(c: ml_collections.ConfigDict, *, ema_decay: float, flow: bool = False, **kwargs) -> None:
    """The digits setting the trajectory presets share (LCM, sCM, MeanFlow; docs/trajectory.md): a student
    alone (no fake score), lr 1e-4, 800 steps of 32, on the digits world or (``flow``) the flow digits world;
    ``kwargs``: the recipe's optimizer."""
    digits_distillation(
        c, student_lr=1e-4, fake_lr=None, num_steps=800, flow=flow, student_ema=ema_decay, **kwargs
    )


def dmd2_digits(c: ml_collections.ConfigDict, *, lr: float, num_steps: int, flow: bool = False) -> None:
    """``digits_distillation`` with DMD2's optimizer (AdamW (0.9, 0.999), weight decay 0.01, gradient clip 10,
    one lr for student and fake score; its sd15 preset's) plus a short warm-up and student EMA 0.99, for the
    DMD family's digits presets (``flow``: on the flow digits world)."""
    digits_distillation(
        c,
        student_lr=lr,
        fake_lr=lr,
        num_steps=num_steps,
        flow=flow,
        warmup_steps=50,
        student_ema=0.99,
        **DMD2_OPTIMIZER,
    )


def sid_digits(c: ml_collections.ConfigDict, *, lr: float, flow: bool = False) -> None:
    """``digits_distillation`` with SiD-LSG's optimizer (Adam (0, 0.999), one lr for student and fake score)
    and student EMA 0.99 (the scripts' 0.05 Mimg half-life is longer than the run), 600 steps of 32, for the
    SiD family's digits presets (``flow``: on the flow digits world)."""
    digits_distillation(
        c, student_lr=lr, fake_lr=lr, num_steps=600, flow=flow, betas=(0.0, 0.999), student_ema=0.99
    )


# T2I-Distill's AdamW (train_meanflow.py / train_sCM.py; torch.optim.AdamW (0.9, 0.999), eps 1e-8): weight decay
# 1e-4 (--adam_weight_decay default), gradient clip 0.1 (--max_grad_norm=0.1).
T2I_DISTILL_OPTIMIZER = {"optimizer": "adamw", "weight_decay": 1e-4, "grad_clip": 0.1}


def t2i_distill_networks(
    c: ml_collections.ConfigDict, preset: str, *, num_steps: int, lr: float = 1e-6
) -> None:
    """T2I-Distill's student alone on the flow teacher ``preset``: a copy of its transformer with
    ``T2I_DISTILL_OPTIMIZER``, constant lr 1e-6 (the scripts' example command and README; their LR=${1:-1e-5}
    is only a fallback), no EMA, batch 256 (--train_batch_size 8 on 4 nodes x 8 GPUs)."""
    unet_distillation(
        c,
        preset,
        student_lr=lr,
        fake_lr=None,
        batch_size=256,
        num_steps=num_steps,
        **T2I_DISTILL_OPTIMIZER,
    )


def t2i_distill_flux_lite(c: ml_collections.ConfigDict, *, num_steps: int) -> None:
    """``t2i_distill_networks`` on FLUX.1-lite-8B with the scripts' data settings: 512 px, T5 length 256."""
    t2i_distill_networks(c, "flux_lite", num_steps=num_steps)
    c.teacher.resolution = 512  # --resolution 512
    c.teacher.t5_length = 256  # --max_sequence_length default
