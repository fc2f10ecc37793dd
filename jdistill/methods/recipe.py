"""What a method is to the trainer: networks, their losses and update schedule, and a sampler.

A method never knows about meshes, checkpoints or the training loop; the trainer never knows which method
it runs. The contract between them:

- ``Network``: a trained network (module definition, optimizer, optional EMA decay, optional initialiser
  that may read the frozen parameters, e.g. to start a student from the teacher, and what its module is
  applied to: its own parameters, or e.g. a frozen base plus its LoRA adapters).
- ``Update``: one gradient step of some networks on one loss. ``loss(params, batch, key, carry)`` gets
  every network's current parameters by name (frozen ones included) and returns
  ``(scalar, (metrics, carry))``; gradients are taken with respect to ``trains`` only, so everything else
  is frozen for that update. A network's EMA, if it has one, is there too as "<name>_ema" (LCM's target).
  ``carry`` (a ``Carry``) passes values (e.g. the generated batch) to later updates of the same step; it
  starts as ``Carry(step=the step number)``, and each loss returns it with the fields it fills replaced. An
  update runs on steps where ``step % every == offset``.
- ``sample(params, cond, key)``: student samples for a batch of conditions.
- ``student_timesteps``: where that sampler evaluates the student (predict x0, re-noise with fresh noise).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax
from flax import struct

from jdistill.data.joint import JointSource, split
from jdistill.models.net import Net

PyTree = Any
JOINT = "conditions+data"
DATA_CHOICES = ("conditions", "data", JOINT)
Params = Mapping[str, PyTree]


@struct.dataclass
class Carry:
    """What the updates of one train step hand to the later ones (a pytree: it crosses the programs of
    ``split_updates`` and the micro-batch scan). A field stays None until an update of the step fills it.

    With micro-batches every array field must be per sample (leading dimension the batch's rows) or, like
    ``step``, a scalar that does not depend on the batch (``jdistill/microbatch.py``).
    """

    step: jax.Array  # the train step's number (int32 scalar): warm-ups (sCM's tangent, a GAN's start_step)
    # Under stop-gradient, non-finite rows zeroed: this step's generator sample, for the update that trains on
    # it (SwiftBrush / DMD / DMD2: the student's x, which the fake score denoises; sCM with LADD: x0_G, which
    # the discriminator classifies).
    generated: jax.Array | None = None
    generated_ok: jax.Array | None = None  # bool per sample: the rows of ``generated`` that were finite


CARRIED = tuple(f.name for f in dataclasses.fields(Carry) if f.name != "step")  # what an update may fill
LossFn = Callable[[Params, dict, jax.Array, Carry], tuple[jax.Array, tuple[dict[str, jax.Array], Carry]]]


@dataclasses.dataclass(frozen=True, eq=False)
class Network:
    net: Net
    optimizer: optax.GradientTransformation
    ema_decay: float = 0.0
    init: Callable[[jax.Array, Params], PyTree] | None = None  # (key, frozen params) -> params
    # What ``net.apply`` takes, given every network's parameters by name; default: this network's own.
    # A LoRA network takes {"base": its frozen base, "lora": its own adapters}.
    inputs: Callable[[Params], PyTree] | None = None

    @property
    def name(self) -> str:
        return self.net.name

    def net_params(self, params: Params) -> PyTree:
        return self.inputs(params) if self.inputs else params[self.name]

    def initial_params(self, key: jax.Array, frozen: Params) -> PyTree:
        return self.init(key, frozen) if self.init else self.net.init(key)


GRADS = ("none", "input", "params", "jvp")


@dataclasses.dataclass(frozen=True)
class Pass:
    """A network evaluation an update makes, for the analytic FLOP count of ``tools/plan.py``.

    ``samples`` evaluations of ``network`` per sample of the batch (2 for a CFG pair, (K - 1) / 2 for the
    expected backward simulation of a K-step student), differentiated through nothing ("none": one forward),
    through its input only ("input": about two) or with respect to its parameters ("params": about three), or
    pushed forward along a tangent ("jvp": the primal and a tangent pass, about two).
    ``unless_carried``: not made when an earlier update of the same step filled that ``Carry`` field (the
    fake-score update regenerates x only on steps without a generator update). ``trunk``: only up to the
    bottleneck (a GAN head's features; the head's own few convolutions are not counted).
    """

    network: str
    samples: float = 1.0
    grad: str = "none"
    unless_carried: str = ""
    trunk: bool = False

    def __post_init__(self):
        if self.grad not in GRADS:
            raise ValueError(f"pass grad {self.grad!r}; choose one of {GRADS}")
        if self.unless_carried and self.unless_carried not in CARRIED:
            raise ValueError(
                f"pass unless_carried {self.unless_carried!r}; choose a Carry field of {CARRIED}"
            )


def derivative_passes(network: str, method: str, primal_used: bool = True) -> tuple[Pass, ...]:
    """The passes of ``diffusion.jvp.directional_derivative`` on ``network`` by ``method``: one JVP, or the
    two shifted forwards of a central difference plus the primal when the loss reads it (an unused one is
    dead code to XLA)."""
    if method == "jvp":
        return (Pass(network, 1.0, "jvp"),)
    return (Pass(network, 3.0 if primal_used else 2.0),)


@dataclasses.dataclass(frozen=True, eq=False)
class Update:
    name: str
    trains: tuple[str, ...]
    loss: LossFn
    every: int = 1
    offset: int = 0
    # The network evaluations of ``loss`` (empty: not declared, no analytic count) and the ``Carry`` fields
    # it fills for later updates of the step.
    passes: tuple[Pass, ...] = ()
    carries: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = set(self.carries) - set(CARRIED)
        if unknown:
            raise ValueError(
                f"update {self.name!r} carries {sorted(unknown)}: not Carry fields; choose of {CARRIED}"
            )

    def active(self, step: int) -> bool:
        return step % self.every == self.offset


@dataclasses.dataclass(frozen=True, eq=False)
class Recipe:
    networks: tuple[Network, ...]
    updates: tuple[Update, ...]
    sample: Callable[[Params, PyTree, jax.Array], jax.Array]
    # The world's "conditions" or "data" source, both side by side ("conditions+data": the prepared batch is
    # the conditions' with the data's under "real"), or a DataSource of the recipe's own.
    data: Any = "conditions"
    sample_with: tuple[str, ...] = ("student",)  # networks whose EMA replaces them when sampling
    # LCM's boundary condition (sigma_data, timestep_scaling): the sampler takes c_skip x_t + c_out x0 of the
    # student at each step (diffusers' LCMScheduler); None: the student's x0 as it is.
    consistency_boundary: tuple[float, float] | None = None
    # The guidance w (convention "cond": y_c + w (y_c - y_u)) that the sampler gives the student through its
    # guidance embedding (diffusers' ``timestep_cond``; its pipelines embed guidance_scale - 1); None: no such input.
    student_guidance: float | None = None
    # The timesteps (schedule units) at which the student's sampler evaluates it, in order; export uses them
    # to write a diffusers scheduler that reproduces the sampler. Empty: not a few-step student.
    student_timesteps: tuple[float, ...] = ()
    # The sampler's initial latents are this times prior noise (SiD-LSG: sigma_625); export records it.
    student_input_scale: float = 1.0
    # Why the student cannot be written as a diffusers pipeline (its sampler has no diffusers scheduler);
    # empty: it can.
    no_diffusers_export: str = ""
    # A flow-transformer student's sampler as diffusers' FlowMatchEulerDiscreteScheduler runs it (export): the
    # flow times (sigmas) it steps at when they are not ``student_timesteps`` (sCM's TrigFlow times mapped onto
    # the flow path), and "renoise" (predict x0, fresh noise at the next time: stochastic_sampling) or "euler"
    # (x + (t' - t) v: MeanFlow's z_r = z_t - (t - r) u).
    flow_times: tuple[float, ...] = ()
    flow_update: str = "renoise"
    # The sampling network's parameters as the teacher's architecture takes them (MeanFlow folds its fixed
    # t - r embedding into a bias); None: as they are.
    export_params: Callable[[PyTree], PyTree] | None = None

    def __post_init__(self):
        names = [n.name for n in self.networks]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate network names in recipe: {names}")
        for u in self.updates:
            unknown = set(u.trains) - set(names)
            if unknown:
                raise ValueError(
                    f"update {u.name!r} trains unknown networks {sorted(unknown)}; recipe has {names}"
                )
            if not 0 <= u.offset < u.every:
                raise ValueError(
                    f"update {u.name!r}: offset must be in [0, every), got {u.offset}, {u.every}"
                )
        if isinstance(self.data, str) and self.data not in DATA_CHOICES:
            raise ValueError(f"recipe data must be one of {DATA_CHOICES} or a data source, got {self.data!r}")

    def source(self, world):
        """The data source whose batches feed the train step."""
        if self.data in ("data", JOINT) and world.data is None:
            raise ValueError("this recipe trains on data, and this teacher's world has no data source")
        if self.data == JOINT:
            return JointSource((("gen", world.conditions), ("real", world.data)))
        if self.data == "data":
            return world.data
        return world.conditions if self.data == "conditions" else self.data

    def prepare(self, world) -> Callable[[Params, dict], dict]:
        """``(frozen, batch) -> batch`` for the train step: the world's, applied to each part of a joint batch."""
        if self.data != JOINT:
            return world.prepare

        def prepare(frozen, batch):
            parts = split(batch)
            return {**world.prepare(frozen, parts["gen"]), "real": world.prepare(frozen, parts["real"])}

        return prepare

    def network(self, name: str) -> Network:
        return {n.name: n for n in self.networks}[name]

    def active_updates(self, step: int) -> tuple[Update, ...]:
        return tuple(u for u in self.updates if u.active(step))
