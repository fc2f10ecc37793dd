"""Memory (compiled temporaries per chip) and CPU time of the attention implementations on one layer.

    python benchmarks/attention.py --target tpu      # deviceless TPU v5p compiles (needs libtpu: '.[tpu-plan]')
    python benchmarks/attention.py --target cpu --tokens 1024 --batch 1   # wall time on this machine

The default layer is SD1.5's largest self-attention: 4096 tokens (64x64 latents), 8 heads x 40, 4 samples per
chip (a v5p 2x2x1 mesh, batch 16 over fsdp=4). Modes: forward, gradient of a scalar loss with respect to q, k
and v, and a JVP traced inside ``forward_mode_attention()`` (how sCM and MeanFlow call networks).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

MODES = ("fwd", "grad", "jvp")


def functions(impl: str):
    import jax
    import jax.numpy as jnp

    from jdistill.models.attention import attention, forward_mode_attention

    def fwd(q, k, v):
        return attention(q, k, v, impl=impl)

    def grad(q, k, v):
        return jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32) ** 2), argnums=(0, 1, 2))(q, k, v)

    def jvp(q, k, v):
        with forward_mode_attention():
            return jax.jvp(fwd, (q, k, v), (q, k, v))

    return {"fwd": fwd, "grad": grad, "jvp": jvp}


def tpu(args) -> None:
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name="v5p:2x2x1",
        chip_config_name="megacore",
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
    )
    mesh = Mesh(np.asarray(desc.devices).reshape(1, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    print(
        f"TPU v5p 2x2x1, per chip: batch {args.batch}, {args.tokens} tokens, {args.heads} heads x {args.dim}"
    )
    print("dtype     impl     mode  temp MiB  compile s  pallas")
    for dtype in (jnp.float32, jnp.bfloat16):
        spec = jax.ShapeDtypeStruct(
            (4 * args.batch, args.tokens, args.heads, args.dim), dtype, sharding=batch
        )
        for impl in args.impls:
            for mode, f in functions(impl).items():
                t0 = time.perf_counter()
                with jax.set_mesh(mesh):
                    compiled = jax.jit(f, in_shardings=(batch,) * 3).lower(spec, spec, spec).compile()
                temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
                pallas = "tpu_custom_call" in compiled.as_text()
                name = jnp.dtype(dtype).name
                print(f"{name:9s} {impl:8s} {mode:5s} {temp:8.0f}  {time.perf_counter() - t0:9.1f}  {pallas}")


def cpu(args) -> None:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    shape = (args.batch, args.tokens, args.heads, args.dim)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
    print(
        f"CPU ({jax.device_count()} devices), batch {args.batch}, {args.tokens} tokens, {args.heads}x{args.dim}"
    )
    print("impl     mode  compile s  run ms (best of 3)")
    for impl in args.impls:
        if impl == "splash":
            continue
        for mode, f in functions(impl).items():
            fn = jax.jit(f)
            t0 = time.perf_counter()
            jax.block_until_ready(fn(q, k, v))
            compile_s = time.perf_counter() - t0
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(q, k, v))
                runs.append(time.perf_counter() - t0)
            print(f"{impl:8s} {mode:5s} {compile_s:9.1f}  {1000 * min(runs):8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--target", choices=("tpu", "cpu"), default="tpu")
    parser.add_argument("--impls", nargs="+", default=["xla", "chunked", "splash"])
    parser.add_argument("--batch", type=int, default=4, help="per chip (tpu) or in all (cpu)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=40)
    args = parser.parse_args()
    (tpu if args.target == "tpu" else cpu)(args)


if __name__ == "__main__":
    main()
