"""FSDP all-gathers inside a ``lax.scan`` on simulated CPU devices: a probe for XLA:CPU collective deadlocks.

jit of a function over ``--devices`` fake CPU devices (``--xla_force_host_platform_device_count``, or
``jax_num_cpu_devices`` with ``--use-config``) on a (data, fsdp) mesh: ``--nets`` independent networks, each
``--weights`` parameters of shape (L, D, D) sharded on the last axis over ``fsdp``, scanned over L layers
(``lax.scan``, optionally ``--remat``) with the layer's weights constrained to be replicated, so XLA puts an
all-gather inside the while loop; the batch is sharded over ``data``. ``--grad`` differentiates it (the backward
loop carries all-reduces over ``data``). It prints the compile time, step times, and the XLA:CPU thread pools'
sizes ("XLAEigen" is the intra-op pool the thunk executor offloads work and blocking collectives to).

What it shows (jax/jaxlib 0.10.2, 2 cores, 8 fake devices, mesh 4 x 2):
  * the thread pools are NOT sized by the core count: xla/pjrt/cpu/cpu_client.cc sizes both the intra-op
    ("XLAEigen") and the client pool to max(DefaultThreadPoolSize(), device count) = max(2, 8) = 8 threads;
    DefaultThreadPoolSize() is the PJRT_NPROC (or NPROC) environment variable when set, else the core count.
    PJRT_NPROC=32 gives 32 of each (printed under "threads").
  * this probe has not deadlocked in any setting tried (1-8 nets, 1-4 weights per layer, L 4-8, D 64-512,
    batch 8-512, with and without remat, 10 steps each): the tiny-FLUX DMD2 step of tests/test_recipes_flow.py
    does (rendezvous watchdog abort at ~80 s) and passes with PJRT_NPROC=64; its collective scheduling is
    richer than this probe's.

Run:  python benchmarks/cpu_collective_loop.py --grad [--nets 4 --weights 4 --dim 256 --layers 8 --remat]
      PJRT_NPROC=32 python benchmarks/cpu_collective_loop.py --grad ...   # larger XLA:CPU pools
      python benchmarks/cpu_collective_loop.py --devices 2 --fsdp 2 --grad  # data=1, fsdp=2
"""

import argparse
import os
import pathlib
import time

p = argparse.ArgumentParser()
p.add_argument("--devices", type=int, default=8)
p.add_argument("--fsdp", type=int, default=2)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--dim", type=int, default=64)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--nets", type=int, default=1, help="independent scanned networks in one step")
p.add_argument("--weights", type=int, default=4, help="separate (D, D) matrices per layer")
p.add_argument("--steps", type=int, default=3)
p.add_argument("--grad", action="store_true")
p.add_argument("--remat", action="store_true", help="jax.checkpoint each layer (as the FLUX blocks are)")
p.add_argument("--use-config", action="store_true", help="jax_num_cpu_devices instead of XLA_FLAGS")
p.add_argument("--xla-flags", default="")
args = p.parse_args()

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = args.xla_flags
if not args.use_config:
    flags += f" --xla_force_host_platform_device_count={args.devices}"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

if args.use_config:
    jax.config.update("jax_num_cpu_devices", args.devices)

data = args.devices // args.fsdp
mesh = jax.make_mesh((data, args.fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
L, D, B = args.layers, args.dim, args.batch


def net(ws, x):
    def layer(h, wl):
        outs = []
        for w in wl:  # independent all-gathers and matmuls: the body's thunks can run concurrently
            w = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))
            outs.append(jnp.tanh(h @ w))
        return sum(outs) / len(outs), None

    h, _ = jax.lax.scan(jax.checkpoint(layer) if args.remat else layer, x, ws)
    return jnp.mean(h**2)


def forward(params, x):
    # Independent scans: their while loops are ready at once, so XLA:CPU's thunk executor may run them concurrently.
    return sum(net(ws, x * (i + 1)) for i, ws in enumerate(params))


fn = jax.jit(jax.value_and_grad(forward) if args.grad else forward)
w = [
    [
        jax.device_put(
            jax.random.normal(jax.random.key(100 * n + i), (L, D, D)) / D**0.5,
            NamedSharding(mesh, P(None, None, "fsdp")),
        )
        for i in range(args.weights)
    ]
    for n in range(args.nets)
]
x = jax.device_put(jax.random.normal(jax.random.key(99), (B, D)), NamedSharding(mesh, P("data", None)))
print(
    f"jax {jax.__version__} devices={len(jax.devices())} mesh={dict(mesh.shape)} L={L} D={D} B={B} "
    f"grad={args.grad} XLA_FLAGS={os.environ['XLA_FLAGS']!r} cpus={os.cpu_count()}",
    flush=True,
)
t = time.perf_counter()
out = fn(w, x)
jax.block_until_ready(out)
print(f"compile+first step {time.perf_counter() - t:.2f}s", flush=True)


def thread_names() -> dict[str, int]:
    """Threads of this process by name prefix (XLA:CPU's intra-op pool is "XLAEigen", its client pool
    "XLAPjRtCpuClient"; both are sized max(cores or PJRT_NPROC/NPROC, device count))."""
    counts: dict[str, int] = {}
    for comm in pathlib.Path("/proc/self/task").glob("*/comm"):
        name = comm.read_text().strip().rstrip("0123456789/-_")
        counts[name] = counts.get(name, 0) + 1
    return counts


print(f"threads: {thread_names()}  PJRT_NPROC={os.environ.get('PJRT_NPROC')}", flush=True)
for _ in range(args.steps):
    t = time.perf_counter()
    jax.block_until_ready(fn(w, x))
    print(f"step {time.perf_counter() - t:.3f}s", flush=True)
print("OK")
