"""Devices, meshes and shardings: multi-host start-up, the (data, fsdp) mesh, logical-axis rules.

Parameters carry logical axis names (``out_sharding`` metadata, e.g. ("embed", "mlp")); the config's
rules map each name to a mesh axis, or to None for replication. A dimension that the mapped mesh axes do not
divide is replicated instead. Batches are sharded over both mesh axes along their first dimension.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jdistill.configuration import ConfigError

PyTree = Any
MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

log = logging.getLogger(__name__)

# Environment variables that announce a multi-process cluster JAX can auto-detect.
_CLUSTER_HINTS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def _cluster_detected() -> bool:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(cfg: ml_collections.ConfigDict) -> None:
    """Start JAX's multi-controller runtime when the config or the environment asks for it.

    ``cfg.coordinator_address`` set: explicit start (num_processes, process_id from the config).
    Otherwise a detected cluster (TPU pod, Slurm, Open MPI, JAX_COORDINATOR_ADDRESS) starts with JAX's own
    auto-detection; a single machine starts nothing.
    """
    if jax.distributed.is_initialized():
        return
    if cfg.coordinator_address:
        if cfg.num_processes < 1 or not 0 <= cfg.process_id < cfg.num_processes:
            raise ValueError(
                "distributed.coordinator_address is set, so distributed.num_processes (>= 1) and "
                f"distributed.process_id (in [0, num_processes)) must be too; got {cfg.num_processes}, {cfg.process_id}"
            )
        jax.distributed.initialize(
            cfg.coordinator_address,
            cfg.num_processes,
            cfg.process_id,
            initialization_timeout=cfg.initialization_timeout,
        )
    elif cfg.auto and _cluster_detected():
        jax.distributed.initialize(initialization_timeout=cfg.initialization_timeout)


def is_main_process() -> bool:
    return jax.process_index() == 0


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp) mesh. ``data = -1`` takes all remaining devices; ``num_devices`` > 0 uses a prefix.

    ``devices`` defaults to ``jax.devices()``; ``tools/plan.py`` passes abstract devices of a TPU topology.
    """
    devices = list(jax.devices() if devices is None else devices)
    if cfg.num_devices > 0:
        if cfg.num_devices > len(devices):
            raise ConfigError(
                f"mesh.num_devices={cfg.num_devices}, but only {len(devices)} device(s) exist; set "
                f"mesh.num_devices to at most {len(devices)}, or -1 for all of them"
            )
        if jax.process_count() > 1 and cfg.num_devices != len(devices):
            raise ConfigError(
                f"mesh.num_devices={cfg.num_devices} must cover every device ({len(devices)}) when running on "
                "several processes; set mesh.num_devices=-1"
            )
        devices = devices[: cfg.num_devices]
    n = len(devices)
    fsdp = cfg.fsdp
    in_use = f"{n} device(s) in use" + (
        f" (mesh.num_devices={cfg.num_devices})" if cfg.num_devices > 0 else ""
    )
    if fsdp < 1:
        raise ConfigError(f"mesh.fsdp={fsdp} must be at least 1 (1: no FSDP)")
    if cfg.data > 0 and cfg.data * fsdp != n:
        raise ConfigError(
            f"mesh.data={cfg.data} x mesh.fsdp={fsdp} = {cfg.data * fsdp} devices, but there are {in_use}; set "
            f"mesh.data=-1 (the devices mesh.fsdp leaves) or make the product {n}"
        )
    if n % fsdp:
        raise ConfigError(
            f"mesh.fsdp={fsdp} does not divide the {in_use}; set mesh.fsdp to a divisor of {n} (1: no FSDP)"
        )
    data = cfg.data if cfg.data > 0 else n // fsdp
    mesh = jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)
    if not _processes_contiguous(mesh):
        # Keep each process's devices together along the batch, so host-local rows form one block.
        ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
        mesh = Mesh(np.asarray(ordered).reshape(data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2)
    return mesh


def _processes_contiguous(mesh: Mesh) -> bool:
    procs = [d.process_index for d in mesh.devices.flat]
    return procs == sorted(procs)


def needs_step_sync(mesh: Mesh) -> bool:
    """Whether to wait for each step before dispatching the next.

    XLA's in-process CPU collectives can deadlock when several multi-device programs are in flight on few
    cores (seen with 8 fake devices on 2 cores: an all-gather rendezvous never completes). Accelerators keep
    asynchronous dispatch.
    """
    return mesh.devices.flat[0].platform == "cpu" and mesh.devices.size > 1


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def spec_for(
    shape: tuple[int, ...], axes: tuple[str | None, ...] | None, rules: Rules, mesh: Mesh, unannotated: str
) -> PartitionSpec:
    """PartitionSpec of one parameter from its logical axes and the rules (dims that do not divide: replicated)."""
    table = dict(rules)
    if axes is None:
        if unannotated == "fsdp" and mesh.shape["fsdp"] > 1:
            return _largest_dim_spec(shape, mesh)
        return PartitionSpec()
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match a parameter of shape {shape}")
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, axes, strict=True):
        target = table.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        size = math.prod(mesh.shape[a] for a in names) if names else 1
        if not names or dim % size or used & set(names):
            out.append(None)
            continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def _largest_dim_spec(shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """FSDP for unannotated parameters: shard the largest dimension that the fsdp axis divides."""
    size = mesh.shape["fsdp"]
    candidates = [(d, i) for i, d in enumerate(shape) if d % size == 0 and d >= size]
    if not candidates or math.prod(shape) < 2**14:
        return PartitionSpec()
    _, dim = max(candidates)
    spec = [None] * len(shape)
    spec[dim] = "fsdp"
    return PartitionSpec(*spec)


def tree_shardings(
    abstract: PyTree, logical_axes: PyTree, rules: Rules, mesh: Mesh, unannotated: str
) -> PyTree:
    """NamedShardings for a parameter tree from its logical axes (a matching tree of tuples or None)."""
    axes_by_path = {path: axes for path, axes in _flatten_with_paths(logical_axes, is_leaf=_is_axes)}

    def one(path, leaf):
        spec = spec_for(tuple(leaf.shape), axes_by_path.get(path), rules, mesh, unannotated)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, abstract)


class ShardingError(ValueError):
    """A large parameter would be replicated on every device under FSDP."""


@dataclasses.dataclass(frozen=True)
class ShardingPolicy:
    """The config's ``sharding`` section: logical-axis rules, what to do with unannotated parameters, and the
    guard against large replicated parameters under FSDP (a parameter over ``max_replicated_mib`` that no
    rule shards is an error, unless its "<network>/<path>" matches a pattern of ``allow_replicated``)."""

    rules: Rules
    unannotated: str = "replicate"
    max_replicated_mib: float = 1.0
    allow_replicated: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> ShardingPolicy:
        return cls(
            tuple(tuple(r) for r in cfg.rules),
            cfg.unannotated,
            cfg.get("max_replicated_mib", 1.0),
            tuple(cfg.get("allow_replicated", ())),
        )

    def shardings(self, network: str, abstract: PyTree, logical_axes: PyTree, mesh: Mesh) -> PyTree:
        """The parameters' NamedShardings; raises ShardingError naming every large replicated parameter."""
        out = tree_shardings(abstract, logical_axes, self.rules, mesh, self.unannotated)
        if mesh.shape["fsdp"] > 1 and self.max_replicated_mib > 0:
            limit = self.max_replicated_mib * 2**20
            bad = [
                (name, leaf)
                for name, leaf, sharding in _named_leaves(network, abstract, out)
                if sharding.is_fully_replicated
                and _nbytes(leaf) > limit
                and not any(fnmatch.fnmatchcase(name, p) for p in self.allow_replicated)
            ]
            if bad:
                listed = ", ".join(f"{n} {tuple(x.shape)} ({_nbytes(x) / 2**20:.1f} MiB)" for n, x in bad[:8])
                more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
                raise ShardingError(
                    f"under mesh fsdp={mesh.shape['fsdp']}, no sharding rule splits {listed}{more}: each would "
                    "be replicated on every device. Map its logical axes in sharding.rules, or allow it with "
                    "sharding.allow_replicated (patterns such as 'teacher/*embedding*') or a higher "
                    "sharding.max_replicated_mib."
                )
        return out


def _nbytes(leaf) -> int:
    return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def _named_leaves(network: str, abstract: PyTree, shardings: PyTree):
    """("<network>/<a>/<b>", leaf, sharding) for every parameter."""
    for (path, leaf), sharding in zip(_flatten_with_paths(abstract), jax.tree.leaves(shardings), strict=True):
        keys = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        yield f"{network}/{keys}", leaf, sharding


def sharding_report(network: str, abstract: PyTree, shardings: PyTree) -> dict[str, Any]:
    """Parameter count, bytes, bytes per device and the replicated fraction (by count) of one network; with
    the replicated parameters' names (largest first)."""
    params = replicated = per_device = total = 0
    names = []
    for name, leaf, sharding in _named_leaves(network, abstract, shardings):
        n = math.prod(leaf.shape)
        params += n
        total += _nbytes(leaf)
        per_device += math.prod(sharding.shard_shape(tuple(leaf.shape))) * np.dtype(leaf.dtype).itemsize
        if sharding.is_fully_replicated and sharding.num_devices > 1:
            replicated += n
            names.append((n, name))
    return {
        "params": params,
        "bytes": total,
        "bytes_per_device": per_device,
        "replicated_fraction": replicated / max(params, 1),
        "replicated": [name for _, name in sorted(names, reverse=True)],
    }


def _is_axes(x) -> bool:
    return x is None or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))


def _flatten_with_paths(tree: PyTree, is_leaf=None):
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return leaves


def follow_params(abstract: PyTree, params_abstract: PyTree, params_shardings: PyTree, mesh: Mesh) -> PyTree:
    """Shardings for a tree holding parameter-shaped leaves (optimizer state): each leaf whose path ends
    with a parameter's path and has its shape gets that parameter's sharding; the rest is replicated."""
    by_path = {}
    for (path, leaf), sharding in zip(
        _flatten_with_paths(params_abstract), jax.tree.leaves(params_shardings), strict=True
    ):
        by_path[tuple(path)] = (tuple(leaf.shape), sharding)

    def one(path, leaf):
        path = tuple(path)
        for start in range(len(path)):
            hit = by_path.get(path[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, abstract)


def batch_spec(mesh, shape: tuple[int, ...], dim: int = 0) -> PartitionSpec | None:
    """The spec that splits dimension ``dim`` of an array of ``shape`` over the batch axes of ``mesh``; None
    without such axes, or where they do not divide it."""
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names) or len(shape) <= dim:
        return None
    n = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if n == 1 or shape[dim] % n:
        return None
    return PartitionSpec(*([None] * dim), BATCH_AXES, *([None] * (len(shape) - dim - 1)))


def constrain_batch(x: jax.Array, dim: int = 0) -> jax.Array:
    """Keep an activation's batch dimension (``dim``, the leading one by default) split over the batch axes.

    Models call this at block boundaries, so XLA's sharding propagation cannot drift into gathering the
    batch when FSDP-sharded weights meet it. It reads the mesh the trainer sets around its steps
    (``jax.set_mesh``); without one, or with a batch the axes do not divide, it does nothing.
    """
    spec = batch_spec(jax.sharding.get_abstract_mesh(), x.shape, dim)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def local_rows(sharding: NamedSharding, global_size: int) -> np.ndarray:
    """Global row indices (ascending) of a batch-sharded array that this process's devices hold."""
    index_map = sharding.addressable_devices_indices_map((global_size,))
    rows = set()
    for index in index_map.values():
        rows.update(range(*index[0].indices(global_size)))
    return np.asarray(sorted(rows), np.int64)


def global_batch(
    local: dict[str, np.ndarray], sharding: NamedSharding, global_size: int
) -> dict[str, jax.Array]:
    """Assemble global arrays from each process's rows (as given by ``local_rows``)."""
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_size, *v.shape[1:]))
        for k, v in local.items()
    }


def to_host(tree: PyTree) -> PyTree:
    """Fetch (possibly multi-process) global arrays to numpy on every process."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def agree(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (e.g. a stop request seen by one host)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def describe(mesh: Mesh) -> str:
    return (
        f"mesh {dict(mesh.shape)} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices, "
        f"{jax.process_count()} process(es)"
    )
