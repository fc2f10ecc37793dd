"""Compile time and program size of a tiny FLUX transformer's training step as layers are added.

    python benchmarks/compile_depth.py                   # depths 1 2 4 8 16 (double and single blocks each)
    python benchmarks/compile_depth.py --depths 1 8 32

The transformer stacks are scanned (``jdistill/models/stack.py``): XLA sees one block per stack whatever the
depth, so lowering, compiling and the optimized program's size should stay flat. Each depth lowers and
compiles the forward+backward (gradients of every parameter) from abstract shapes (no weights), once, in a
fresh jit; the table gives seconds and the optimized HLO text's size. Results go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from jdistill.models.flux import FluxConfig, flux_net, image_ids
from tests import tiny_configs  # the tests' tiny FLUX, four heads instead of two


def measure(depth: int, batch: int = 2, side: int = 8, text: int = 16) -> dict[str, float]:
    cfg = FluxConfig.from_dict(
        tiny_configs.flux(
            patch_size=1,
            num_layers=depth,
            num_single_layers=depth,
            num_attention_heads=4,
            guidance_embeds=True,
        )
    )
    net = flux_net(cfg)
    ids = image_ids(side // 2, side // 2)
    tokens = (side // 2) ** 2

    def loss(params, x, t, context, pooled):
        cond = {"encoder_hidden_states": context, "pooled_projections": pooled, "guidance": 3.5}
        out = net.apply(params, x, t, cond, img_ids=ids)
        return jnp.sum(out**2)

    args = (
        net.abstract,
        jax.ShapeDtypeStruct((batch, tokens, cfg.in_channels), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.float32),
        jax.ShapeDtypeStruct((batch, text, cfg.joint_attention_dim), jnp.float32),
        jax.ShapeDtypeStruct((batch, cfg.pooled_projection_dim), jnp.float32),
    )
    start = time.perf_counter()
    lowered = jax.jit(jax.grad(loss)).lower(*args)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    return {
        "params": net.num_params(),
        "lower_s": lower_s,
        "compile_s": compile_s,
        "hlo_kchars": len(compiled.as_text()) / 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; double = single blocks = depth")
    print(f"{'depth':>5s} {'params':>10s} {'lower s':>8s} {'compile s':>9s} {'HLO kchars':>10s}")
    for depth in args.depths:
        r = measure(depth)
        print(
            f"{depth:5d} {r['params']:10,d} {r['lower_s']:8.2f} {r['compile_s']:9.2f} {r['hlo_kchars']:10.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
