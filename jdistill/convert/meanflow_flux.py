"""A FLUX transformer with MeanFlow's second time input, for diffusers' FluxPipeline.

jdistill's export writes this file, unchanged, into ``transformer/meanflow_flux.py`` of a MeanFlow student's
pipeline directory; it needs only torch and diffusers.

FluxPipeline's Euler step is x <- x + (sigma' - sigma) v with the transformer's output v; when the transformer
returns the average velocity u(z_t, r, t) over [r, t], with t = sigma and r = sigma', that is MeanFlow's step
z_r = z_t - (t - r) u. The pipeline hands the transformer t only, so this class takes r as the time after t in
its ``meanflow_times`` (the student's sampling times, then 0): call the pipeline with ``sigmas=meanflow_times``
and a scheduler without shift (the exported one). The second time t - r is embedded as the timestep is
(sinusoids, then ``time_text_embed.timestep_delta_embedder``) and added to the conditioning embedding.

``timestep_scale``: the factor timestep, guidance and t - r are embedded with (diffusers' FLUX: 1000;
T2I-Distill's students: 1). The pipeline's ``guidance_scale`` is the guidance input itself, as for FLUX-dev.

Load with ``DiffusionPipeline.from_pretrained(directory, trust_remote_code=True)``, or import this file and
pass ``transformer=MeanFlowFluxTransformer2DModel.from_pretrained(directory, subfolder="transformer")`` to
``FluxPipeline.from_pretrained``.
"""

from __future__ import annotations

import itertools

import torch
from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import (
    CombinedTimestepGuidanceTextProjEmbeddings,
    CombinedTimestepTextProjEmbeddings,
    TimestepEmbedding,
)

PIPELINE_TIME_SCALE = 1000.0  # FluxTransformer2DModel.forward multiplies timestep and guidance by it
TIME_TOLERANCE = 1e-3  # how far a pipeline time may be from one of meanflow_times


def _delta_embedding(base: type) -> type:
    """``base`` (FLUX's time-text embedding, with or without guidance) plus the t - r embedder."""

    class MeanFlowTimeTextEmbedding(base):
        def __init__(self, embedding_dim: int, pooled_projection_dim: int, scale: float, times: list[float]):
            super().__init__(embedding_dim=embedding_dim, pooled_projection_dim=pooled_projection_dim)
            self.timestep_delta_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=embedding_dim)
            self.scale = float(scale)
            self.times = [float(t) for t in times]

        def next_time(self, t: torch.Tensor) -> torch.Tensor:
            """r for each t: the time after t in ``times`` (0 after the last)."""
            grid = torch.tensor(self.times, dtype=torch.float32, device=t.device)
            ends = torch.tensor([*self.times[1:], 0.0], dtype=torch.float32, device=t.device)
            gap = (t.float()[:, None] - grid[None, :]).abs()
            nearest = gap.argmin(dim=1)
            if bool((gap.min(dim=1).values > TIME_TOLERANCE).any()):
                raise ValueError(
                    f"timestep {t.tolist()} is not one of this MeanFlow student's times {self.times}: call the "
                    "pipeline with sigmas=transformer.config.meanflow_times"
                )
            return ends[nearest]

        def forward(self, timestep: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
            # The transformer passes 1000 t (and 1000 g): rescale to this model's factor.
            k = self.scale / PIPELINE_TIME_SCALE
            t = timestep.float() / PIPELINE_TIME_SCALE
            delta = t - self.next_time(t)
            if len(rest) == 2:  # (guidance, pooled)
                rest = (rest[0] * k, rest[1])
            emb = super().forward(timestep * k, *rest)
            proj = self.time_proj(delta * self.scale)
            return emb + self.timestep_delta_embedder(proj.to(dtype=emb.dtype))

    return MeanFlowTimeTextEmbedding


class MeanFlowFluxTransformer2DModel(FluxTransformer2DModel):
    """FluxTransformer2DModel returning a MeanFlow student's average velocity over [r, t] (see the module)."""

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        timestep_delta_embeds: bool = True,
        timestep_scale: float = PIPELINE_TIME_SCALE,
        meanflow_times: tuple[float, ...] = (1.0,),
    ):
        super().__init__(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
        )
        if not timestep_delta_embeds:
            raise ValueError("a MeanFlow FLUX transformer has timestep_delta_embeds")
        times = [float(t) for t in meanflow_times]
        if not times or any(b >= a for a, b in itertools.pairwise(times)) or times[-1] <= 0:
            raise ValueError(f"meanflow_times must be decreasing times in (0, 1], got {times}")
        base = (
            CombinedTimestepGuidanceTextProjEmbeddings
            if guidance_embeds
            else CombinedTimestepTextProjEmbeddings
        )
        self.time_text_embed = _delta_embedding(base)(
            num_attention_heads * attention_head_dim, pooled_projection_dim, timestep_scale, times
        )
