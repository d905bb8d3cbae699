"""Sharding as data: a mesh from config and logical-axis rules that place every array.

Layers annotate each parameter dimension with a logical name (``embed``, ``mlp``,
``heads``, ``kv``, ``vocab``, ``layers``, ``embed_out``); `config.mesh` says how big
the ``data``, ``fsdp`` and ``tensor`` mesh axes are and which mesh axes each logical
name maps onto. From that:

* the frozen base (and base weights that train, as in full fine-tuning) is sharded
  by its logical axes: FSDP over ``embed``, tensor parallelism over the rest;
* method sites are placed as their kind says (`SiteKind.sharding`): the built-in kinds
  (LoRA, prompts, prefixes, adapters, IA3) are replicated unless their path matches
  `mesh.shard_sites`; a kind that does not say cannot be placed on a mesh of several devices;
* optimizer state is sharded like the parameter it belongs to;
* a batch is sharded over ``data`` and ``fsdp``, each process feeding its own rows.

The same code runs on one CPU, fake CPU devices, a GPU box or a TPU pod.
"""

from __future__ import annotations

import math
import os
import re

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ptune import partition
from ptune.errors import UserError
from ptune.models.sites import kind_of

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# logical axis -> mesh axes ("" replicates). Every logical name a model uses needs a rule.
DEFAULT_RULES = {"embed": "fsdp", "mlp": "tensor", "heads": "tensor", "kv": "tensor", "vocab": "tensor",
                 "embed_out": "tensor", "layers": ""}


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, auto: bool = False):
    """Join a multi-process JAX job (one process per host), from arguments or the environment.

    Arguments win over $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES and $JAX_PROCESS_ID; with
    none of them, `auto` lets JAX detect the cluster (TPU pods, SLURM, ...). Neither: one process.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if coordinator_address is None and num_processes is None and process_id is None:
        if auto:
            jax.distributed.initialize()
        return
    if coordinator_address is None or num_processes is None or process_id is None:
        raise UserError("a multi-process run needs all of --coordinator_address, --num_processes and "
                        f"--process_id (got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise UserError(f"--process_id={process_id} must be in 0..{num_processes - 1} "
                        f"(--num_processes={num_processes})")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"${name}={value!r} must be an integer") from None


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with one -1 standing for "the rest of the devices". A mesh without -1
    may use fewer devices than there are (the first ones), if its size divides their number."""
    shape = [int(mesh_config[a]) for a in AXES]
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise UserError(f"config.mesh {dict(zip(AXES, shape))}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
        raise UserError(f"config.mesh {dict(zip(AXES, shape))} does not divide the {num_devices} devices; "
                        "choose sizes whose product divides the device count (or use -1 for the rest)")
    return tuple(num_devices // known if s == -1 else s for s in shape)


def make_mesh(mesh_config, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    try:
        re.compile(mesh_config.get("shard_sites", ""))
    except re.error as e:
        raise UserError(f"config.mesh.shard_sites={mesh_config.shard_sites!r} is not a valid regex ({e}); "
                        "fix it ('' replicates every site)") from None
    shape = mesh_shape(mesh_config, len(devices))
    if math.prod(shape) < len(devices) and jax.process_count() > 1:
        raise UserError(f"config.mesh {dict(zip(AXES, shape))} leaves devices unused; a multi-process job must "
                        f"use all {len(devices)} (set one axis to -1)")
    return Mesh(mesh_utils.create_device_mesh(shape, devices[:math.prod(shape)]), AXES)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def rules_from_config(mesh_config) -> dict[str, tuple[str, ...]]:
    rules = {**DEFAULT_RULES, **dict(mesh_config.get("rules", {}))}
    out = {}
    for name, axes in rules.items():
        axes = tuple(a for a in str(axes or "").replace(" ", "").split(",") if a)
        unknown = [a for a in axes if a not in AXES]
        if unknown:
            raise UserError(f"config.mesh.rules.{name}={rules[name]!r} names mesh axes {unknown}; "
                            f"mesh axes are {AXES}")
        out[name] = axes
    return out


def logical_axes(boxed_params) -> dict[str, tuple]:
    """{path: logical axis names per dimension} from a tree of `nn.Partitioned` boxes."""
    is_box = lambda x: isinstance(x, nn.Partitioned)
    names = jax.tree.map(lambda b: tuple(b.names) if is_box(b) else None, boxed_params, is_leaf=is_box)
    flat = jax.tree_util.tree_flatten_with_path(names, is_leaf=lambda x: x is None or isinstance(x, tuple))[0]
    return {partition.path_str(kp): v for kp, v in flat}


def spec_for(shape, names, rules, mesh: Mesh) -> PartitionSpec:
    """The mesh placement of one array.

    Each dimension takes the mesh axes its logical name's rule gives. An axis that does not
    divide its dimension (GPT-2's 50,257-word vocabulary) moves to the largest other dimension
    it divides, so the array is still split over it; failing that the array stays whole on it.
    """
    if not names:
        return PartitionSpec()
    dims: list[list[str]] = [[] for _ in shape]
    leftover = []
    for i, (size, name) in enumerate(zip(shape, names)):
        if name is None:
            continue
        if name not in rules:
            raise UserError(f"logical axis {name!r} has no sharding rule; add config.mesh.rules.{name} "
                            f"(mesh axes {AXES}, or '' to replicate)")
        for axis in rules[name]:
            if mesh.shape[axis] > 1 and not any(axis in d for d in dims):   # a mesh axis splits one dimension
                (dims[i] if size % (_ways(dims[i], mesh) * mesh.shape[axis]) == 0 else leftover).append(axis)
    for axis in dict.fromkeys(a for a in leftover if not any(a in d for d in dims)):
        fits = [i for i in sorted(range(len(shape)), key=lambda i: -shape[i])
                if shape[i] % (_ways(dims[i], mesh) * mesh.shape[axis]) == 0]
        if fits:
            dims[fits[0]].append(axis)
    return PartitionSpec(*(None if not d else d[0] if len(d) == 1 else tuple(d) for d in dims))


def _ways(axes, mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def param_shardings(params, boxed_params, mesh: Mesh, mesh_config):
    """NamedShardings for `params` (any subtree of the model's tree, e.g. trainable or frozen).

    `boxed_params` is `models.abstract_params(model)`: the logical axis names of every leaf.
    A site leaf is placed as its kind's `sharding` says: "logical" like a base weight, "replicated"
    unless its path matches `mesh_config.shard_sites`.
    """
    rules, axes = rules_from_config(mesh_config), logical_axes(boxed_params)
    shard_sites = mesh_config.get("shard_sites", "") or None

    def sharding(path, leaf):
        names, kind = axes.get(path), kind_of(path)
        if kind is not None and kind.sharding is None and mesh.size > 1:
            raise kind.missing(f"how it is sharded (leaf {path})", "sharding ('replicated' or 'logical')")
        if kind is not None and kind.sharding != "logical" and not (shard_sites and re.search(shard_sites, path)):
            names = None
        return NamedSharding(mesh, spec_for(leaf.shape, names, rules, mesh))
    return partition.unflatten({p: sharding(p, x) for p, x in partition.flatten(params).items()})


def state_shardings(state_shapes, params, params_sharding, mesh: Mesh):
    """Shardings for an optimizer state: a leaf whose path ends with a parameter's path and has
    its shape is sharded like that parameter (Adam's moments); anything else (step counts,
    Adafactor's factored rows) is replicated."""
    shapes, by_path = partition.flatten(params), partition.flatten(params_sharding)

    def sharding(keypath, leaf):
        path = partition.path_str(keypath)
        owner = next((p for p in by_path if path == p or path.endswith("/" + p)), None)
        if owner is not None and tuple(leaf.shape) == tuple(shapes[owner].shape):
            return by_path[owner]
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree_util.tree_map_with_path(sharding, state_shapes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put(tree, shardings):
    """Host arrays (the same on every process) -> global arrays laid out by `shardings`."""
    def place(x, s):
        if isinstance(x, jax.Array) and x.is_fully_addressable and x.sharding.is_equivalent_to(s, x.ndim):
            return x   # already there (one device): no copy
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
    return jax.tree.map(place, tree, shardings)


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
    """A global batch (computed identically on every host) -> global arrays, each process
    contributing only the rows its own devices hold (`make_array_from_process_local_data`)."""
    out = {}
    for k, x in batch.items():
        rows = sorted({idx[0].indices(x.shape[0])[:2]
                       for idx in sharding.addressable_devices_indices_map(x.shape).values()})
        start, stop = rows[0][0], rows[-1][1]
        out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(x[start:stop]), x.shape)
    return out


def to_host(tree):
    """Numpy values of (possibly multi-process) global arrays."""
    from jax.experimental import multihost_utils
    def fetch(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(fetch, tree)


def bytes_per_device(tree) -> dict:
    """{device: bytes of the shards of `tree` it holds} (measured from the arrays' shards)."""
    held: dict = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held
