"""The device mesh: six named axes, sized by `MeshConfig` (the `mesh:` section of a training config).

  stage   pipeline stages (parallel/pipeline.py): the MoE layers split into stages; outside the
          pipeline (embedding, dense layers) it carries data like `data`
  data    pure data parallelism: parameters and optimizer state replicated
  fsdp    data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3)
  context each sequence's tokens split (context parallelism): everything but attention is per token;
          MLA gathers its compressed latent over it (moe/mla.py); parameters replicated over it
  expert  routed experts split across ranks (expert parallelism); carries data for everything else
  tensor  attention heads and FFN width split (Megatron-style tensor parallelism)

Sizes come from the config (`mesh.stage=2 mesh.data=2 mesh.fsdp=2 mesh.expert=2`); at most one
may be -1, meaning the devices the others leave. A mesh whose size does not divide the device count
is a one-line ConfigError. Across TPU slices or GPU hosts, `mesh.dcn_stage` / `mesh.dcn_data` /
`mesh.dcn_fsdp` say how many slices (or processes) the stage / data / fsdp axis spans (`mesh_utils.create_hybrid_device_mesh`); the
expert and tensor axes then stay within a slice or host. Without them `mesh_utils.create_device_mesh` orders devices
so that the last axes (expert, tensor) are the closest (splitting physical axes where a size
needs it, e.g. expert=8 on a 4x4x4 slice). Axes are `AxisType.Auto`: inside `jit`, XLA's
partitioner derives the collectives for data/fsdp/tensor from the parameter and activation shardings;
expert parallelism is written by hand with `jax.shard_map` (parallel/expert_parallel/).

`Parallelism` bundles the `MeshConfig` with what is resolved for the devices: the mesh, the logical-axis
rules (parallel/sharding.py), the expert-parallel transport and nodes; it is built once and handed to
the model (moe.runtime.Runtime) and the trainer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Literal

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from parallel import expert_parallel, sharding
from parallel.pipeline import Layout, PipelineConfig
from parallel.common.errors import ConfigError, divisors, require
from parallel.common.typed_config import check_fields

log = logging.getLogger("parallel")

AXES = sharding.MESH_AXES
DCN_AXES = ("stage", "data", "fsdp")  # may span slices / hosts (mesh.dcn_stage, mesh.dcn_data, mesh.dcn_fsdp)
# Asynchronous collectives XLA:GPU's scheduler may keep in flight at once (its default, 1, serialises
# them): V3 on h100x256 forecast 236.8 s a step with 1, 222.7 with 2, 220.5 with 4; with the experts'
# weights gathered in bf16 and the all-to-alls in buffers of their own, 199.5 with 2, 198.1 with 4,
# 195.1 with 8, 195.2 with 16 (docs/pods.md).
GPU_COLLECTIVES_IN_FLIGHT = 8
# XLA:GPU's memory budget for its rematerialization and scheduling, in percent of the device's memory
# (its default: 95), where the step keeps its layer inputs in host memory (remat full_offload): XLA's
# rematerialization counts that host buffer as device memory (V3 on h100x256 at 3 sequences a GPU: 72.33
# GiB by its count against 61.26 compiled, the 10.2 GiB of layer inputs apart) and recomputed matmuls to
# fit a peak the step never has (1.569x the model's FLOPs executed, 213.8 s a step forecast; with 110:
# 1.449x, 205.7 s, 65.51 GiB; fb_overlap 207.5 -> 200.4 s). train.aot checks the compiled peak.
GPU_OFFLOAD_MEMORY_SLOP = 110
# ... and with that budget its rematerialization still recomputed to fit a peak its count puts 13 GiB
# above the compiled one (V3 on h100x256, 3 sequences a GPU with fb_overlap: 80.8 GiB counted, 67.5
# compiled without it, 63.4 with it; 1.450x the model's FLOPs executed, 185.4 s forecast; without it
# 1.397x, 179.3 s), so such steps compile without XLA's rematerialization: the remat policy says what is
# recomputed, and train.aot checks the compiled peak against the device's memory.
GPU_OFFLOAD_PASSES_OFF = "rematerialization"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device-mesh axis sizes; -1 (at most one axis) takes the devices the others leave. `rules`
  overrides entries of the logical-axis -> mesh-axes table (parallel/sharding.py), e.g.
  `mesh.rules.embed=[fsdp,expert]`; a value is a mesh axis, a list of them, or null.
  Expert parallelism (parallel/expert_parallel/): `ep_transport` auto (padded on CPU, ragged
  elsewhere), padded (all_to_all of fixed buffers; assignments past the capacity are dropped and
  counted as `dropped_tokens`) or ragged (ragged_all_to_all, dropless); `capacity_factor` sets the
  padded buffers to ceil(factor * tokens * top_k / expert) rows per rank pair (null: dropless).
  `dcn_stage` / `dcn_data` / `dcn_fsdp`: how many TPU slices (or processes, e.g. GPU hosts) the
  stage / data / fsdp axis spans, for a mesh laid out over a slower outer network."""

  stage: int = 1  # pipeline stages (parallel/pipeline.py; the `pipeline:` section)
  data: int = -1
  fsdp: int = 1
  context: int = 1  # each sequence's tokens in `context` slices, balanced layout (docs/long-context.md)
  # How attention sees the other slices' tokens: all_gather (the whole sequence's latent gathered once
  # a layer) or ring (each slice's latent block passed around the context axis, only the causally
  # visible tiles computed: half the attention work, no slice holding the whole sequence's latent).
  context_attention: Literal["all_gather", "ring"] = "all_gather"
  expert: int = 1
  tensor: int = 1
  dcn_stage: int = 1  # slices (TPU) or processes the stage axis spans; must divide `stage`
  dcn_data: int = 1  # slices (TPU) or processes the data axis spans; must divide `data`
  dcn_fsdp: int = 1  # the same for fsdp
  rules: dict[str, str | list[str] | None] | None = None
  ep_transport: expert_parallel.Transport = "auto"
  capacity_factor: float | None = None
  # Dropless exchanges in this many chunks of each rank's tokens (null: as many as keep a chunk's
  # worst-case receive buffer within the balanced one of all tokens; parallel/expert_parallel/).
  ep_chunks: int | None = None
  # The ragged exchange's fast path: all of a rank's tokens at once, in buffers of this many times
  # the balanced receive (in two levels, also of the rows received across nodes and sent inside one),
  # taken in a layer where no rank would need more; the chunked worst-case exchange otherwise (both
  # dropless). null: always the chunks.
  ep_fast_path: float | None = None
  # The expert-parallel ranks as this many nodes of neighbouring ranks: > 1 sends a token across
  # nodes once per node holding its experts, then to the experts' ranks inside the node (two-level
  # dispatch; parallel/expert_parallel/). null: the nodes the expert axis spans, from the devices
  # (GPU hosts, TPU slices; one on CPU); a number simulates nodes (any split of the expert axis).
  ep_nodes: int | None = None
  # Each MoE layer's tokens in two independent halves, so that one half's all-to-all can run while
  # the other half's experts compute.
  ep_overlap: bool = False
  # TPU v5e only: the weights' all-gathers (FSDP, expert) in steps inside the compute fusions around
  # them (libtpu's async collective fusion, MaxText's CF_FOR_ALL_GATHER flags), not before them.
  # Refused on other TPUs as libtpu 0.0.50 refuses it (check_gather_overlap); on v5p libtpu 0.0.42
  # compiled it (V3 on v5p-1024: 11.15 -> 10.35 s a step forecast; docs/pods.md).
  gather_overlap: bool = False
  # GPU only: XLA's scheduler starts each collective as soon as its operands are ready, not where its
  # latency estimate says the collective is hidden (xla_gpu_experimental_collective_start_as_early_as_
  # possible). Depends on the layout, as a single collective stream runs transfers in the order they
  # start: V3 on h100x256 with fb_overlap, 3 sequences a GPU 203.8 -> 186.4 s a step forecast, 2 in
  # FP8 194.2 -> 217.6 s (docs/pods.md); `train.aot --search` tries both on GPUs.
  early_collectives: bool = False
  # The output head's vocabulary split over fsdp (and tensor), its tokens gathered over fsdp for it:
  # the head's weight is not gathered nor its gradient summed whole (parallel/sharding.py HEAD_OF).
  # Pays when a device's tokens x fsdp < vocabulary and the head is at the peak (a V3-sized head on
  # 4 x v6e-256: 11.38 -> 7.79 GiB per chip; V3 itself peaks elsewhere there; docs/pods.md).
  vocab_parallel: bool = False
  # Extra expert slots, spread evenly over the expert-parallel ranks, holding copies of the most
  # loaded experts (re-chosen from the measured loads every `redundant_every` steps; moe/experts.py).
  redundant_experts: int = 0
  redundant_every: int = 100

  def __post_init__(self):
    check_fields(self, "mesh.")
    for name, n in self.sizes().items():
      require(n == -1 or n >= 1, f"mesh.{name}={n} must be >= 1 or -1")
    require(list(self.sizes().values()).count(-1) <= 1, "mesh: at most one axis may be -1")
    for name in ("dcn_stage", "dcn_data", "dcn_fsdp"):
      require(getattr(self, name) >= 1, f"mesh.{name}={getattr(self, name)} must be >= 1")
    sharding.resolve_rules(self.rules)  # a bad entry is a one-line error here, not at build time
    cf = self.capacity_factor
    require(cf is None or cf > 0, f"mesh.capacity_factor={cf} must be > 0 or null (dropless)")
    require(self.ep_fast_path is None or self.ep_fast_path >= 1,
            f"mesh.ep_fast_path={self.ep_fast_path} must be >= 1 (times the balanced receive) or null")
    require(self.ep_chunks is None or self.ep_chunks >= 1, f"mesh.ep_chunks={self.ep_chunks} must be >= 1 or null")
    require(self.ep_nodes is None or self.ep_nodes >= 1, f"mesh.ep_nodes={self.ep_nodes} must be >= 1 or null")
    require(self.ep_nodes is None or self.expert == -1 or self.expert % self.ep_nodes == 0,
            f"mesh.ep_nodes={self.ep_nodes} must divide mesh.expert={self.expert}: {divisors(self.expert)}")
    require(self.redundant_experts >= 0, f"mesh.redundant_experts={self.redundant_experts} must be >= 0")
    require(self.expert == -1 or self.redundant_experts % self.expert == 0,
            f"mesh.redundant_experts={self.redundant_experts} must be a multiple of mesh.expert={self.expert}"
            f" (the same number of extra slots on every expert-parallel rank): 0, {self.expert}, {2 * self.expert}, ...")
    require(self.redundant_every >= 1, f"mesh.redundant_every={self.redundant_every} must be >= 1")

  def sizes(self) -> dict[str, int]:
    return {a: getattr(self, a) for a in AXES}

  def describe(self) -> str:
    return " x ".join(f"{a}={n}" for a, n in self.sizes().items())


def axis_sizes(mesh_cfg: MeshConfig, n_devices: int) -> dict[str, int]:
  """{axis: size} for `mesh_cfg` on `n_devices`, -1 resolved (the sizes themselves were checked by
  MeshConfig; this checks them against the devices)."""
  sizes = mesh_cfg.sizes()
  known = math.prod(n for n in sizes.values() if n != -1)
  free = [a for a, n in sizes.items() if n == -1]
  if free:
    if n_devices % known:
      raise ConfigError(f"mesh {mesh_cfg.describe()}: the fixed axes ({known} devices) do not divide the"
                        f" {n_devices} devices; {would_divide(sizes, n_devices)}")
    sizes[free[0]] = n_devices // known
  elif n_devices % known:
    raise ConfigError(f"mesh {mesh_cfg.describe()} needs {known} devices, which does not divide the"
                      f" {n_devices} devices; {would_divide(sizes, n_devices)}")
  return sizes


def would_divide(sizes: dict[str, int], n_devices: int) -> str:
  """The sizes of each fixed axis that would divide `n_devices`, the other axes kept, in words."""
  fixed = {a: n for a, n in sizes.items() if n not in (-1, 1)}
  fits = []
  for a, n in fixed.items():
    rest = math.prod(m for b, m in fixed.items() if b != a)
    if n_devices % rest == 0:
      fits.append(f"mesh.{a}={divisors(n_devices // rest)}")
  return f"{'; or '.join(fits) if fits else f'fixed axes multiplying to {divisors(n_devices)}'} would"


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
  """A Mesh with axes (stage, data, fsdp, context, expert, tensor), all `AxisType.Auto`.

  A mesh smaller than the device count (it must divide it) uses the first devices; that is only
  allowed in a single process.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = axis_sizes(mesh_cfg, len(devices))
  n = math.prod(sizes.values())
  if n < len(devices):
    if jax.process_count() > 1:
      raise ConfigError(f"mesh {sizes} uses {n} of {len(devices)} devices; with {jax.process_count()}"
                        " processes it must use them all (set one axis to -1)")
    log.warning("mesh %s uses %d of %d devices", sizes, n, len(devices))
    devices = devices[:n]
  shape = tuple(sizes[a] for a in AXES)
  dcn = {a: getattr(mesh_cfg, f"dcn_{a}") for a in DCN_AXES}
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if math.prod(dcn.values()) == 1:
    if slices > 1:
      raise ConfigError(f"the devices span {slices} slices: set mesh.dcn_data={slices} (or mesh.dcn_fsdp, mesh.dcn_stage)"
                        " so that the axes crossing the data-centre network are the data-parallel or pipeline ones")
    return Mesh(device_grid(shape, devices), AXES, axis_types=(AxisType.Auto,) * len(AXES))
  return Mesh(hybrid_devices(sizes, dcn, devices), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def device_grid(shape: tuple[int, ...], devices):
  """`devices` arranged as `shape`, the last axes on the closest devices. Where an axis is not a
  product of whole physical axes (expert=8 on a 4x4x4 v5p slice) the physical axes are split, which
  jax.make_mesh refuses: any factorisation of the devices is laid out."""
  from jax.experimental import mesh_utils

  try:
    return mesh_utils.create_device_mesh(shape, devices)
  except (NotImplementedError, ValueError, AssertionError):
    log.info("mesh %s: splitting physical device axes to lay it out", "x".join(map(str, shape)))
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def hybrid_devices(sizes: dict[str, int], dcn: dict[str, int], devices):
  """Device array for a mesh whose `data`/`fsdp` axes span slices (TPU multi-slice: devices carry a
  `slice_index`) or hosts (otherwise: one granule per process), `dcn[a]` granules along axis `a`;
  the other axes stay inside a granule, on the fast interconnect."""
  from jax.experimental import mesh_utils

  for a, n in dcn.items():
    if sizes[a] % n:
      raise ConfigError(f"mesh.dcn_{a}={n} does not divide mesh.{a}={sizes[a]}: {divisors(sizes[a])} would")
  ici = tuple(sizes[a] // dcn.get(a, 1) for a in AXES)
  outer = tuple(dcn.get(a, 1) for a in AXES)
  slices = {getattr(d, "slice_index", 0) for d in devices}
  by_process = len(slices) < math.prod(outer)
  granules = len({d.process_index for d in devices}) if by_process else len(slices)
  if granules != math.prod(outer):
    raise ConfigError(f"mesh dcn_stage x dcn_data x dcn_fsdp = {math.prod(outer)} granules, but the devices form {granules}"
                      f" {'processes' if by_process else 'slices'}")
  try:
    return mesh_utils.create_hybrid_device_mesh(ici, outer, devices, process_is_granule=by_process)
  except (NotImplementedError, ValueError, AssertionError):
    return mesh_utils.create_hybrid_device_mesh(ici, outer, devices, process_is_granule=by_process,
                                                allow_split_physical_axes=True)


@dataclasses.dataclass(frozen=True)
class Parallelism:
  """What the model and the trainer need to know about parallelism, built once from the config.

  `cfg`: the `mesh:` section it was built from; the settings that need no devices are read from it
  (`capacity_factor`, `ep_chunks`, `ep_fast_path`, `ep_overlap`, `gather_overlap`, `redundant_experts`,
  `redundant_every`). Resolved for the mesh's devices: `rules`, logical axis -> mesh axes as (name, axes) pairs
  (parallel.sharding.resolve_rules); `ep_transport`, "padded", "ragged" or "ragged_emulated";
  `ep_nodes`, the nodes of expert-parallel ranks of the two-level dispatch (1: one level), and
  `ep_nodes_are`, what they are: "hosts", "slices" (from the devices) or "mesh.ep_nodes".
  """

  mesh: Mesh
  cfg: MeshConfig = dataclasses.field(hash=False)  # (its rules are a dict; hashed through the resolved fields)
  rules: tuple[tuple[str, tuple[str, ...]], ...]
  ep_transport: str
  ep_nodes: int
  ep_nodes_are: str
  pipeline: PipelineConfig  # used when the mesh has stages

  @classmethod
  def from_config(cls, mesh_cfg: MeshConfig, devices=None, pipeline: PipelineConfig = PipelineConfig()) -> Parallelism:
    return cls.on(make_mesh(mesh_cfg, devices), mesh_cfg, pipeline)

  @classmethod
  def on(cls, mesh: Mesh, mesh_cfg: MeshConfig, pipeline: PipelineConfig = PipelineConfig()) -> Parallelism:
    """`mesh_cfg`'s settings resolved on an existing `mesh` (whose axis sizes are used, not mesh_cfg's)."""
    rules = tuple(sharding.resolve_rules(mesh_cfg.rules, mesh_cfg.vocab_parallel).items())
    check_gather_overlap(mesh_cfg.gather_overlap, mesh.devices.flat[0])
    transport = expert_parallel.resolve_transport(mesh_cfg.ep_transport, mesh)
    nodes, are = (mesh_cfg.ep_nodes, "mesh.ep_nodes") if mesh_cfg.ep_nodes is not None else expert_nodes(mesh)
    if mesh_cfg.ep_fast_path and transport == "padded":
      log.warning("mesh.ep_fast_path=%s has no effect: the fast path is the ragged exchange's (here padded)",
                  mesh_cfg.ep_fast_path)
    if mesh_cfg.early_collectives and mesh.devices.flat[0].platform != "gpu":
      log.warning("mesh.early_collectives=true has no effect: it sets XLA:GPU's scheduler (here %s)",
                  mesh.devices.flat[0].platform)
    if mesh_cfg.context_attention != "all_gather" and mesh.shape.get("context", 1) == 1:
      log.warning("mesh.context_attention=%s has no effect: each sequence is whole on a device (mesh.context=1)",
                  mesh_cfg.context_attention)
    return cls(mesh, mesh_cfg, rules, transport, nodes, are, pipeline)

  @property
  def capacity_factor(self) -> float | None:
    """Padded transport: the buffers' size per balanced share (None: dropless)."""
    return self.cfg.capacity_factor

  @property
  def ep_chunks(self) -> int | None:
    """Dropless exchanges: token chunks (None: expert_parallel.dropless_chunks)."""
    return self.cfg.ep_chunks

  @property
  def ep_fast_path(self) -> float | None:
    """The fast path's buffers per balanced share where it applies, the ragged exchange (None: none)."""
    return self.cfg.ep_fast_path if self.ep_transport != "padded" else None

  @property
  def ep_overlap(self) -> bool:
    """Each MoE layer's exchange in two independent halves."""
    return self.cfg.ep_overlap

  @property
  def redundant_experts(self) -> int:
    """Extra expert slots (copies of the hottest experts), over all expert-parallel ranks."""
    return self.cfg.redundant_experts

  @property
  def redundant_every(self) -> int:
    """Steps between re-placements of the copies."""
    return self.cfg.redundant_every

  @property
  def dropless(self) -> bool:
    """Whether the expert-parallel exchange promises to send every (token, expert) assignment."""
    return self.ep_transport != "padded" or self.capacity_factor is None

  @property
  def stages(self) -> int:
    return self.mesh.shape.get("stage", 1)

  @property
  def context(self) -> int:
    """How many slices each sequence's tokens are split into (context parallelism)."""
    return self.mesh.shape.get("context", 1)

  @property
  def context_attention(self) -> str:
    """all_gather or ring (mesh.context_attention); only with context > 1."""
    return self.cfg.context_attention

  def layout(self, layers: int) -> Layout:
    """Where the pipelined stack of `layers` layers is stored (parallel/pipeline.py)."""
    return Layout(layers, self.stages, self.pipeline.repeats if self.stages > 1 else 1)

  @property
  def platform(self) -> str:
    return self.mesh.devices.flat[0].platform

  def compiler_options(self, host_offload: bool = False) -> dict:
    """XLA options for the programs that run on this mesh. GPU: XLA's latency-hiding scheduler, which
    places each asynchronous collective's start early enough for compute to run under it (without it
    XLA:GPU 0.10.2 left most collectives synchronous: V3 on h100x256, 345.7 -> 309.9 s a step
    forecast, docs/pods.md), with up to GPU_COLLECTIVES_IN_FLIGHT collectives in flight at once (it
    allows one by default, and then a layer's all-to-alls wait behind its weights' all-gathers), and
    with `host_offload` (a step keeping its layer inputs in host memory) the memory budget
    GPU_OFFLOAD_MEMORY_SLOP and no rematerialization by XLA (GPU_OFFLOAD_PASSES_OFF), and with
    mesh.early_collectives each collective started as soon as its operands are ready.
    TPU: mesh.ep_overlap: asynchronous all-to-alls, which libtpu otherwise runs synchronously, so
    that one half's exchange can run under the other half's compute; mesh.gather_overlap:
    all-gathers fused, in steps, into the compute around them."""
    if self.platform == "gpu":
      return {"xla_gpu_enable_latency_hiding_scheduler": True,
              "xla_gpu_experimental_parallel_collective_overlap_limit": GPU_COLLECTIVES_IN_FLIGHT,
              **({"xla_gpu_memory_limit_slop_factor": GPU_OFFLOAD_MEMORY_SLOP,
                  "xla_disable_hlo_passes": GPU_OFFLOAD_PASSES_OFF} if host_offload else {}),
              **({"xla_gpu_experimental_collective_start_as_early_as_possible": True}
                 if self.cfg.early_collectives else {})}
    if self.platform != "tpu":
      return {}
    out = {}
    if self.ep_overlap:
      out.update(xla_tpu_enable_async_all_to_all=True, xla_tpu_enable_async_ragged_all_to_all=True)
    if self.cfg.gather_overlap:
      out.update(xla_tpu_enable_async_collective_fusion=True,
                 xla_tpu_enable_async_collective_fusion_fuse_all_gather=True,
                 xla_tpu_enable_async_collective_fusion_multiple_steps=True,
                 xla_tpu_overlap_compute_collective_tc=True, xla_enable_async_all_gather=True)
    return out

  def describe(self) -> str:
    sizes = " x ".join(f"{a}={n}" for a, n in self.mesh.shape.items())
    nodes = f", {self.ep_nodes} expert-parallel nodes ({self.ep_nodes_are})" if self.ep_nodes > 1 else ""
    return (f"mesh {sizes} on {self.mesh.size} {self.platform} device(s), expert-parallel transport"
            f" {self.ep_transport}{nodes}")


def check_gather_overlap(on: bool, device) -> None:
  """mesh.gather_overlap=true only on TPU v5e: libtpu 0.0.42 (jax 0.10.2) compiled its continuation
  fusion of all-gathers for any TPU, but 0.0.50 (jax 0.12) refuses it on every TPU but v5e ("not
  supported/recommended ... might lead to ... incorrect results, hang, SDC"), and so does this
  project whatever libtpu is installed. (On v5e libtpu already makes the all-gathers asynchronous.)"""
  kind = getattr(device, "device_kind", device.platform)
  if on and kind != "TPU v5 lite":
    raise ConfigError(f"mesh.gather_overlap=true: libtpu supports its continuation fusion of all-gathers on TPU v5e"
                      f" only, not on {kind} (libtpu 0.0.50 refuses it there, warning of incorrect results, hangs"
                      f" and silent data corruption); set mesh.gather_overlap=false")


def node_of(devices) -> tuple[str, Callable]:
  """(what a node is, device -> its node) behind the slow links: TPU slices (slice_index), GPU hosts
  (process_index); CPU devices are one node."""
  platform = devices[0].platform
  if platform == "tpu":
    return "slices", lambda d: getattr(d, "slice_index", 0)
  if platform == "cpu":
    return "one node", lambda d: 0
  return "hosts", lambda d: d.process_index


def expert_nodes(mesh: Mesh) -> tuple[int, str]:
  """(nodes, what they are) that the `expert` axis spans, when each is a block of neighbouring
  expert-parallel ranks (else 1: one level, and says why)."""
  kind, node = node_of(list(mesh.devices.flat))
  if mesh.shape.get("expert", 1) == 1 or kind == "one node":
    return 1, kind
  line = np.moveaxis(mesh.devices, list(mesh.axis_names).index("expert"), 0).reshape(mesh.shape["expert"], -1)[:, 0]
  n = nodes_along([node(d) for d in line])
  return (n, kind) if n else (1, f"{kind} not in blocks of the expert axis")


def nodes_along(ids: list) -> int:
  """How many nodes a line of ranks spans, given each rank's node: 0 unless each node holds one block
  of neighbouring ranks, all blocks the same size."""
  n = len(set(ids))
  per = len(ids) // n
  blocks = len(ids) % n == 0 and all(ids[i] == ids[i - i % per] for i in range(len(ids)))
  return n if blocks and len(set(ids[::per])) == n else 0
