"""Diffusion core: schedules, parameterizations, guidance and samplers."""

from jdistill.diffusion.guidance import CFG_CONVENTIONS, cfg_combine, guide, guided_predict, select_cond
from jdistill.diffusion.parameterization import PREDICTION_TYPES, Prediction, from_x0, to_prediction
from jdistill.diffusion.samplers import (
    SamplerPlan,
    ddim_plan,
    ddim_timesteps,
    flow_euler_plan,
    flow_sigmas,
    run_sampler,
    student_plan,
)
from jdistill.diffusion.schedules import FlowSchedule, Schedule, TrigFlowSchedule, VPSchedule

__all__ = [
    "CFG_CONVENTIONS",
    "PREDICTION_TYPES",
    "FlowSchedule",
    "Prediction",
    "SamplerPlan",
    "Schedule",
    "TrigFlowSchedule",
    "VPSchedule",
    "cfg_combine",
    "ddim_plan",
    "ddim_timesteps",
    "flow_euler_plan",
    "flow_sigmas",
    "from_x0",
    "guide",
    "guided_predict",
    "run_sampler",
    "select_cond",
    "student_plan",
    "to_prediction",
]
