"""Device mesh, the logical-axis rules table, and multi-host start-up.

One mesh with axes (data, fsdp, tensor) serves a laptop CPU, a GPU host and a TPU pod. Model code
names its array axes logically ('embed', 'heads', ...); RULES alone decides where they go.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spjax.config import ConfigError, MeshConfig

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # every batch dimension is split over both data-parallel axes

# logical axis -> mesh axis (or axes, or None). The whole sharding strategy lives in this table.
RULES = (
    ("batch", BATCH),
    ("embed", "fsdp"),  # FSDP: params sharded along the model width, gathered per layer
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("head_dim", None),
    ("norm", None),
    ("length", None),
    ("lora", None),  # the adapter rank: small, whole on every device
    ("experts", None),  # a mixture of experts: every device holds each expert's slice (spjax.moe)
    ("quant_groups", None),  # a quantized base's scale groups along the inputs (spjax.quant)
)

# A leaf without an `embed` dim (LoRA adapters, a quantized base's scales) leaves fsdp unused: these
# logical axes then take it, so such leaves split too (the base weights' specs are unchanged).
FALLBACK = {"mlp": "fsdp", "heads": "fsdp", "kv_heads": "fsdp", "quant_groups": "fsdp"}

# Params at least this large must be split when the mesh has fsdp or tensor axes (maxtext-style check).
BIG_PARAM = 1 << 20


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ConfigError("mesh: at most one of data/fsdp/tensor may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh: sizes must be positive or -1, got {sizes}")
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh: {n_devices} devices are not divisible by fixed axes of size {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {n_devices} devices")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(cfg, len(devices))
    try:  # topology-aware placement on TPU/GPU; plain reshape where that is not available (CPU)
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - any failure here only loses placement quality
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, AXES)


def _axes(entry) -> tuple:
    """The mesh axes of a rule's or a PartitionSpec's entry: None, one name, or a tuple of names."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def logical_to_spec(logical: P, shape, mesh: Mesh, rules=RULES, fallback=FALLBACK) -> P:
    """Map a PartitionSpec of logical names onto mesh axes for an array of `shape`.

    A mesh axis is dropped for a dimension it does not divide (e.g. 9 heads over tensor=2), and is
    used at most once per array; such params stay replicated on that axis (see check_sharded). An axis
    no dim took is then given to the first unsplit dim whose name has it as its `fallback`.
    """
    table, names = dict(rules), tuple(logical) + (None,) * (len(shape) - len(logical))
    used, out = set(), []
    for dim, name in zip(shape, names):
        keep, size = [], 1
        for a in _axes(table.get(name) if name is not None else None):
            n = mesh.shape[a]
            if a in used or n == 1 or dim % (size * n):
                continue
            keep.append(a)
            size *= n
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    for i, (dim, name) in enumerate(zip(shape, names)):
        a = fallback.get(name)
        if out[i] is None and a and a not in used and mesh.shape[a] > 1 and dim % mesh.shape[a] == 0:
            out[i] = a
            used.add(a)
    return P(*out)


def tree_shardings(logical_tree, shape_tree, mesh: Mesh, rules=RULES):
    """NamedShardings for a tree of logical PartitionSpecs and matching shapes."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, logical_to_spec(spec, x.shape, mesh, rules)),
        logical_tree, shape_tree, is_leaf=lambda s: isinstance(s, P))


def param_shardings(cfg, mesh: Mesh):
    """NamedShardings for the params of a ModelConfig."""
    from spjax import model
    return tree_shardings(model.param_logical_axes(cfg), model.param_shapes(cfg), mesh)


def without_axis(sharding: NamedSharding, axis: str) -> NamedSharding:
    """`sharding` with mesh axis `axis` taken out of its spec: replicated over that axis."""
    def drop(entry):
        rest = tuple(a for a in _axes(entry) if a != axis)
        return None if not rest else rest[0] if len(rest) == 1 else rest
    return NamedSharding(sharding.mesh, P(*map(drop, sharding.spec)))


def decode_shardings(cfg, mesh: Mesh):
    """The params' shardings for decoding from gathered weights (sampling.weights=gathered): as
    trained, less the fsdp axis. Each device decodes its rows from its own copy (tensor splits
    kept), and no decode step moves weights or activations between the fsdp devices."""
    return jax.tree.map(lambda s: without_axis(s, "fsdp"), param_shardings(cfg, mesh))


def bytes_per_device(tree, shardings=None) -> int:
    """Bytes one device holds of a tree of arrays or ShapeDtypeStructs: placed as they are, or by
    `shardings` (a matching tree)."""
    leaves = jax.tree.leaves(tree)
    placed = [x.sharding for x in leaves] if shardings is None else jax.tree.leaves(shardings)
    return int(sum(math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x, sh in zip(leaves, placed, strict=True)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over both data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def to_host(x) -> np.ndarray:
    """A global array as numpy on every process (all-gathered when other hosts hold parts of it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def host_memory(devices) -> Optional[str]:
    """'pinned_host' where every one of `devices` can hold arrays in pinned host memory (GPU, TPU, and CPU
    too), else None: the memory params may wait in while other programs run."""
    try:
        kinds = [{m.kind for m in d.addressable_memories()} for d in devices]
    except Exception:  # noqa: BLE001 - a runtime without memory spaces: nowhere to wait but the device
        return None
    return "pinned_host" if kinds and all("pinned_host" in k for k in kinds) else None


def to_memory(tree, kind: str):
    """A tree of arrays moved to memory `kind` ('device', 'pinned_host') of the devices they are on, shards
    where they were: each process moves its own shards."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding.with_memory_kind(kind)), tree)


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds whole, placed as a global array (each process
    supplies only the shards its devices own)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def host_box(sharding: NamedSharding, shape: tuple) -> tuple:
    """The smallest box (a slice per dim, start and stop set) of a `shape` array placed by `sharding` that
    holds every shard this process's devices own: what a host needs of a leaf. The whole array on one
    host; 1/n of it where an fsdp axis spans n hosts, each host's devices a run of that axis."""
    spans = [[index[d].indices(n)[:2] for d, n in enumerate(shape)]
             for index in sharding.addressable_devices_indices_map(tuple(shape)).values()]
    return tuple(slice(min(s[d][0] for s in spans), max(s[d][1] for s in spans)) for d in range(len(shape)))


def put_part(part: np.ndarray, box: tuple, shape: tuple, sharding: NamedSharding) -> jax.Array:
    """A global `shape` array from the part of it this process holds (`box`: host_box's), each of its devices
    given its shard out of that part."""
    def shard(index):
        return part[tuple(slice(index[d].indices(n)[0] - b.start, index[d].indices(n)[1] - b.start)
                          for d, (n, b) in enumerate(zip(shape, box)))]
    return jax.make_array_from_callback(tuple(shape), sharding, shard)


def barrier(name: str):
    """All processes meet here (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def on_every_process(ok: bool) -> bool:
    """True when `ok` holds on every process (a collective: every process must call it)."""
    return not failed_processes(ok)


def failed_processes(ok: bool) -> list[int]:
    """The processes where `ok` is false (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return [] if ok else [0]
    from jax.experimental import multihost_utils
    oks = np.asarray(multihost_utils.process_allgather(np.asarray([ok]))).reshape(-1)
    return [int(i) for i in np.flatnonzero(~oks.astype(bool))]


def on_each_process(fn, what: str, error=None):
    """fn() on every process (host-local work: a file each host reads). A failure on any stops all: it is
    raised there, an `error` (ConfigError) naming that process on the others, which would otherwise wait in
    their next collective until the runtime's timeout (5 minutes, then an abort that loses the exit status)."""
    failure, out = None, None
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 (re-raised below, after the others have been told)
        failure = e
    failed = failed_processes(failure is None)
    if failure is not None:
        raise failure
    if failed:
        raise (error or ConfigError)(f"{what} failed on process {failed[0]}: its output says why")
    return out


def on_process_0(fn, what: str):
    """fn() on process 0 alone (None elsewhere), every process then meeting here. A failure on process 0
    stops every process: it is raised there, a ConfigError saying so on the others, which before waited
    in the next collective until the runtime's timeout (minutes) and lost the exit status."""
    failure, out = None, None
    if jax.process_index() == 0:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 (re-raised below, after the others have been told)
            failure = e
    if not on_every_process(failure is None):
        if failure is not None:
            raise failure
        raise ConfigError(f"{what} failed on process 0: its output says why")
    return out


def from_process_0(fn, shapes: Sequence[tuple], error=RuntimeError) -> list:
    """fn()'s float64 arrays (of `shapes`), computed on process 0 alone and the same on every process.

    For host code that need not answer alike on each host (a user's judge that samples, or calls a
    service): it runs once, and every process goes on from one answer. An exception on process 0 is
    raised there, and `error` with its message on the others: none is left waiting in the broadcast.
    (The arrays travel as int32 bits: the broadcast's psum would cast float64 to float32.)"""
    if jax.process_count() == 1:
        return [np.asarray(a, np.float64) for a in fn()]
    from jax.experimental import multihost_utils
    out, failure = [np.zeros(s, np.float64) for s in shapes], None
    if jax.process_index() == 0:
        try:
            out = [np.asarray(a, np.float64).reshape(s) for a, s in zip(fn(), shapes)]
        except Exception as e:  # noqa: BLE001 (re-raised below, after the others have been told)
            failure = e
    text = b"" if failure is None else f"{type(failure).__name__}: {failure}".encode()[:_MESSAGE_BYTES]
    message = np.zeros(_MESSAGE_BYTES, np.int32)
    message[:len(text)] = np.frombuffer(text, np.uint8)
    got = multihost_utils.broadcast_one_to_all([message] + [np.ascontiguousarray(a).view(np.int32) for a in out])
    if failure is not None:
        raise failure
    told = bytes(np.asarray(got[0]).astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
    if told:
        raise error(f"on process 0: {told}")
    return [np.ascontiguousarray(g).view(np.float64).reshape(s) for g, s in zip(got[1:], shapes)]


_MESSAGE_BYTES = 1024


def init_params(cfg, key, mesh: Mesh):
    """Random params born sharded: never materialised whole on one device."""
    return _init_program(cfg, mesh)(key)


@functools.lru_cache(maxsize=4)
def _init_program(cfg, mesh: Mesh):
    """init_params' program, once per (model, mesh): INPO rereads a random pi_0 every round."""
    from spjax import model
    return jax.jit(functools.partial(model.init_params, cfg), out_shardings=param_shardings(cfg, mesh))


def check_sharded(params, mesh: Mesh, min_size: int = BIG_PARAM):
    """Fail when a large param is fully replicated although the mesh has fsdp or tensor devices."""
    if mesh.shape["fsdp"] * mesh.shape["tensor"] == 1:
        return
    bad = []
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        if x.size >= min_size and all(s is None for s in x.sharding.spec):
            bad.append(f"{jax.tree_util.keystr(path)} {tuple(x.shape)}")
    if bad:
        raise ConfigError(f"mesh: params left unsharded on mesh {dict(mesh.shape)}: {', '.join(bad)}; "
                          "choose fsdp/tensor sizes that divide the model's dims")


def unsplit_notes(cfg, mesh: Mesh, min_size: int = BIG_PARAM) -> list:
    """Lines naming the large params that a mesh axis meant for one of their dims left whole because
    it divides none of them (14 heads over tensor=4: q/k/v/o split 2 of 8 ways on fsdp=2 x tensor=4):
    each device then holds more of them than the mesh suggests. Silent before; not an error (it runs)."""
    from spjax import model
    unsplit = {}
    for (path, logical), x in zip(jax.tree_util.tree_leaves_with_path(model.param_logical_axes(cfg),
                                                                     is_leaf=lambda s: isinstance(s, P)),
                                  jax.tree.leaves(model.param_shapes(cfg))):
        if x.size < min_size:
            continue
        table, got = dict(RULES), logical_to_spec(logical, x.shape, mesh)
        meant = {a for name in logical if name is not None for a in _axes(table.get(name))}
        used = {a for e in got for a in _axes(e)}
        for a in sorted(meant - used):
            if mesh.shape[a] > 1:
                unsplit.setdefault(a, []).append(f"{jax.tree_util.keystr(path)} {tuple(x.shape)}")
    return [f"note: mesh.{a}={mesh.shape[a]} divides none of the dims it splits in {len(names)} large params, "
            f"which stay whole over it (e.g. {names[0]}): a size dividing the model's heads and widths splits them"
            for a, names in unsplit.items()]


DISTRIBUTED = False  # init_distributed started the multi-host runtime


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, local_device_ids=None):
    """Start JAX's multi-host runtime. On TPU pods and SLURM all arguments are auto-detected.

    Explicit values (GPU clusters without SLURM) may also come from SPJAX_COORDINATOR,
    SPJAX_NUM_PROCESSES and SPJAX_PROCESS_ID. A single process with nothing set does nothing.
    SPJAX_DISTRIBUTED=1 (launch/tpu_pod.sh's workers) starts it with JAX's detection alone: a Cloud TPU
    VM's workers are known from its metadata server, and no environment variable says there are several.
    """
    coordinator = coordinator or os.environ.get("SPJAX_COORDINATOR")
    if num_processes is None and "SPJAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["SPJAX_NUM_PROCESSES"])
    if process_id is None and "SPJAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["SPJAX_PROCESS_ID"])
    # Auto-detection only inside a real cluster launch: a TPU pod, or an srun step of several tasks
    # (a bare sbatch/salloc shell also sets SLURM_JOB_ID but has no peers to meet).
    slurm = "SLURM_STEP_NODELIST" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    auto = slurm or os.environ.get("SPJAX_DISTRIBUTED") == "1" or any(
        k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
    if coordinator is None and not auto:
        return False
    if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU stand-ins for hosts
    # JAX's preemption service installs a C-level SIGTERM handler that only records the signal (for
    # multihost_utils.reached_preemption_sync_point, which spjax does not use): it replaced spjax.train's,
    # so on several hosts a scheduler's SIGTERM was swallowed and the run went on until SIGKILL.
    try:
        jax.config.update("jax_enable_preemption_service", False)
    except (AttributeError, KeyError):  # a JAX without the option has no such handler either
        pass
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
    global DISTRIBUTED
    DISTRIBUTED = True
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True
